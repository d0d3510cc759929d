"""The conformance suite every supported family and layout goes through.

Adding a family costs one entry in CASES (plus its spec file and its docs row): each case is a
tiny checkpoint built with transformers' own config and model classes (random γ, β, biases and
embedding means; sharded; tied or untied as the config allows; stored in the family's well-known
hub key layout where it differs), converted with the CLI to every target, loaded back with
transformers and compared with the original: float32 relative max |Δlogit| ≤ 1e-5 and 32 greedy
tokens identical, cached, uncached and left-padded. The default target must load without remote
code wherever the stock class suffices, and a bf16 source must pass the default bf16 gate.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import prenorm_convert
from conftest import conversion_cache, run_cli
from equivalence import assert_equivalent, norm_types
from prenorm_convert import memory_plan
from prenorm_convert.examples import build_checkpoint, rename_prefix


@dataclass(frozen=True)
class Case:
    id: str
    model_type: str
    overrides: dict = field(default_factory=dict)
    # the stored key layout of the family's well-known uploads: (old prefix, new prefix, buffers to add)
    hub_layout: tuple | None = None
    # the default target loads as the stock class, without remote code
    loads_without_remote_code: bool = True
    # norms that never read the residual stream, left as they are: class name -> count
    inner_norms: dict = field(default_factory=dict)
    # one case per family also converts a bf16 source (the other layouts share its numerics)
    bf16: bool = True
    # (model_type, class) of the stock RMSNorm architecture the default output is (spec lands_in)
    lands_in: tuple[str, str] | None = None
    # targets also verified streamed from disk (docs/report.md "Streamed verification"): one case per
    # structural variety (key renames, baked stem, in-place writer sums, landing, no β)
    streamed: tuple[str, ...] = ()


def _mask_buffers(template: str, layers: int = 2, positions: int = 128) -> dict[str, torch.Tensor]:
    mask = torch.tril(torch.ones(positions, positions, dtype=torch.bool)).view(1, 1, positions, positions)
    return {template.format(L=i): mask.clone() for i in range(layers)}


CASES = [
    Case("gpt2", "gpt2"),
    Case("opt", "opt"),
    Case("bloom", "bloom", loads_without_remote_code=False, streamed=("rmsnorm", "crmsnorm")),  # its stem norm is baked into the table
    # Pythia's uploads: the head stored as embed_out, causal-mask and rotary buffers
    Case(
        "gpt_neox-parallel",
        "gpt_neox",
        {"rotary_pct": 0.25, "tie_word_embeddings": False},
        hub_layout=("lm_head.", "embed_out.", {**_mask_buffers("gpt_neox.layers.{L}.attention.bias"), "gpt_neox.layers.0.attention.rotary_emb.inv_freq": torch.ones(2)}),
        streamed=("rmsnorm", "fold-affine"),
    ),
    Case("gpt_neox-sequential-tied", "gpt_neox", {"use_parallel_residual": False, "tie_word_embeddings": True}, bf16=False),
    Case("gptj", "gptj", {"tie_word_embeddings": False}, hub_layout=("transformer.", "transformer.", _mask_buffers("transformer.h.{L}.attn.bias"))),
    Case("codegen", "codegen", {"tie_word_embeddings": False}),
    Case("gpt_neo-untied", "gpt_neo", {"tie_word_embeddings": False}),
    Case("phi", "phi", {"partial_rotary_factor": 0.5, "tie_word_embeddings": False}),
    Case("phi-qk_layernorm-tied", "phi", {"qk_layernorm": True}, inner_norms={"LayerNorm": 4}, bf16=False),
    Case("falcon-7b", "falcon", {"new_decoder_architecture": False, "parallel_attn": True, "multi_query": True}, streamed=("rmsnorm",)),
    Case("falcon-40b", "falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}, bf16=False),
    Case("falcon2-11b", "falcon", {"new_decoder_architecture": True, "num_ln_in_parallel_attn": 1, "num_kv_heads": 2}, bf16=False),
    Case(
        "falcon-rw-1b-untied",
        "falcon",
        {"new_decoder_architecture": False, "parallel_attn": False, "alibi": True, "bias": True, "multi_query": False, "tie_word_embeddings": False},
        bf16=False,
    ),
    Case("gpt_bigcode-multi_query", "gpt_bigcode", {"multi_query": True}),
    Case("gpt_bigcode-untied", "gpt_bigcode", {"multi_query": False, "tie_word_embeddings": False}, bf16=False),
    Case("mpt", "mpt", streamed=("rmsnorm",)),  # LayerNorms without β
    Case("stablelm-sequential", "stablelm", {"use_parallel_residual": False, "tie_word_embeddings": False}),
    Case(
        "stablelm-parallel-qk_layernorm",
        "stablelm",
        {"use_parallel_residual": True, "qk_layernorm": True, "tie_word_embeddings": False},
        inner_norms={"StableLmLayerNormPerHead": 4, "LayerNorm": 16},
        bf16=False,
    ),
    Case("starcoder2", "starcoder2"),
    Case("cohere", "cohere", {"logit_scale": 0.5}),  # CohereLayerNorm: γ only, mean subtracted
    Case("cohere-qk_norm-untied", "cohere", {"use_qk_norm": True, "tie_word_embeddings": False}, inner_norms={"CohereLayerNorm": 4}, bf16=False),
    Case("cohere2", "cohere2"),
    Case("persimmon", "persimmon", {"tie_word_embeddings": False}, inner_norms={"LayerNorm": 4}),
    Case("nemotron", "nemotron", {"tie_word_embeddings": False}, loads_without_remote_code=False),  # stores γ - 1
    Case("biogpt", "biogpt"),
    # LayerNorms without parameters: the default output is a stock Llama (tied and untied sources)
    Case("olmo-untied", "olmo", {"tie_word_embeddings": False}, lands_in=("llama", "LlamaForCausalLM"), streamed=("rmsnorm",)),
    Case("olmo-tied", "olmo", {"tie_word_embeddings": True}, lands_in=("llama", "LlamaForCausalLM"), bf16=False),
    Case("olmo-clip_qkv-tied", "olmo", {"clip_qkv": 0.5}, bf16=False),
]
BY_ID = {case.id: case for case in CASES}
TARGETS = {"rmsnorm": (), "fold-affine": ("--fold-affine",), "crmsnorm": ("--target", "crmsnorm")}


def _build(case: Case, folder: Path, dtype: torch.dtype = torch.float32) -> None:
    build_checkpoint(folder, case.model_type, seed=sum(map(ord, case.id)), overrides=case.overrides, dtype=dtype)
    if case.hub_layout is not None:
        rename_prefix(folder, *case.hub_layout)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    cache: dict[str, Path] = {}

    def get(case_id: str) -> Path:
        if case_id not in cache:
            cache[case_id] = tmp_path_factory.mktemp("family") / case_id
            _build(BY_ID[case_id], cache[case_id])
        return cache[case_id]

    return get


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
    return conversion_cache(tmp_path_factory, source)


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_every_target_is_equivalent_with_every_norm_replaced(converted, case, target):
    src, out = converted(case.id, TARGETS[target])
    compared = assert_equivalent(src, out, remote=True)
    expected = {"crmsnorm": "PrenormCRMSNorm"}.get(target, "PrenormRMSNorm")
    if case.lands_in and target != "crmsnorm":  # the stock architecture's own RMSNorm
        expected = case.lands_in[1].replace("ForCausalLM", "RMSNorm")
    converted_norms = Counter(type(m).__name__ for m in compared["converted"].modules() if "Norm" in type(m).__name__)
    stream_norms = converted_norms - Counter(case.inner_norms)
    assert set(stream_norms) == {expected}, f"only inner norms may keep their class: {dict(converted_norms)}"
    assert converted_norms - stream_norms == Counter(case.inner_norms), "every inner norm is left as it is"
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["passed"] and report["residual_mean_max"] < 1e-5
    assert report["first_bad_layer"] is None and len(report["per_layer"]) == 2, "every layer audited, none off"


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_the_default_target_loads_as_the_stock_class_where_it_can(converted, case):
    src, out = converted(case.id, TARGETS["rmsnorm"])
    config = json.loads((out / "config.json").read_text())
    model_type = case.lands_in[0] if case.lands_in else case.model_type
    assert (config["model_type"] == model_type) == case.loads_without_remote_code
    if case.loads_without_remote_code:
        compared = assert_equivalent(src, out, remote=False, padded=case.lands_in is not None)
        if case.lands_in:  # the stock RMSNorm architecture: no remote code written or needed
            assert type(compared["converted"]).__name__ == case.lands_in[1] and "auto_map" not in config
            assert not (out / "modeling_prenorm.py").exists()
        else:
            assert type(compared["converted"]).__name__ == type(compared["original"]).__name__
            assert norm_types(compared["converted"]) == norm_types(compared["original"])


STREAMED = [(case, target) for case in CASES for target in case.streamed]


@pytest.mark.parametrize(("case", "target"), STREAMED, ids=[f"{case.id}-{target}" for case, target in STREAMED])
def test_streamed_verification_says_what_the_in_memory_one_says(converted, case, target, monkeypatch):
    src, out = converted(case.id, TARGETS[target])
    monkeypatch.setattr(memory_plan, "IN_MEMORY_BYTES_PER_PARAMETER", 10**12)  # as if the models did not fit
    report = prenorm_convert.verify(src, out, max_memory="64GB")
    in_memory = json.loads((out / "conversion_report.json").read_text())
    assert report["streamed"] is not None and report["passed"], report["failures"]
    assert report["first_bad_layer"] is None and len(report["per_layer"]) == len(in_memory["per_layer"]) == 2
    assert report["residual_mean_max"] < 1e-5 and report["top1_agreement"] == 1.0
    for key in ("params_original", "params_converted", "positions", "logit_scale"):
        assert report[key] == pytest.approx(in_memory[key], rel=1e-5), key


BF16_CASES = [case for case in CASES if case.bf16]


@pytest.mark.parametrize("case", BF16_CASES, ids=[case.id for case in BF16_CASES])
def test_a_bf16_source_passes_the_default_bf16_gate(case, tmp_path):
    src = tmp_path / "src"
    _build(case, src, dtype=torch.bfloat16)
    result = run_cli("convert", src, tmp_path / "out", "--quiet", "--greedy-tokens", "8", "--json", "-")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] and report["dtype"] == "bfloat16" and report["rounded_weights"]["tensors_not_matching"] == []
    assert report["first_bad_layer"] is None, report["per_layer"]


def test_families_and_inspect_list_every_case(source):
    result = run_cli("families", "--json")
    assert result.exit_code == 0, result.stderr
    listed = {model_type for row in json.loads(result.stdout)["families"] for model_type in row["model_types"]}
    assert {case.model_type for case in CASES} <= listed
    for case in CASES:
        shown = run_cli("inspect", source(case.id), "--json")
        assert shown.exit_code == 0, (case.id, shown.stderr)
        assert json.loads(shown.stdout)["family"] == case.model_type
