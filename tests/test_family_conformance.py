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

import inspect
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import prenorm_convert
from conftest import conversion_cache, run_cli
from equivalence import assert_equivalent, assert_outputs_match, load_class, norm_types
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
    # the class the source is built as, when not the one its spec's Auto class builds
    auto_class: str | None = None
    # stem norms (a LayerNorm on the stream itself) kept on the rmsnorm targets, their output centred
    kept_stems: int = 0


def _mask_buffers(template: str, layers: int = 2, positions: int = 128) -> dict[str, torch.Tensor]:
    mask = torch.tril(torch.ones(positions, positions, dtype=torch.bool)).view(1, 1, positions, positions)
    return {template.format(L=i): mask.clone() for i in range(layers)}


CASES = [
    Case("gpt2", "gpt2"),
    Case("opt", "opt"),
    # its stem norm is kept (rmsnorm: computed, then centred) or baked into the table (crmsnorm)
    Case("bloom", "bloom", streamed=("rmsnorm", "crmsnorm"), kept_stems=1),
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
# encoders and vision models (docs/families.md): no generation; every output compared
ENCODER_CASES = [
    Case("vit", "vit", auto_class="ViTForImageClassification"),
    Case("vit-model", "vit", auto_class="ViTModel"),
    # the mask token is a stream parameter; the 1×1 conv decoder reads an output norm (copied)
    Case("vit-mim", "vit", {"encoder_stride": 4}, bf16=False, auto_class="ViTForMaskedImageModeling"),
    Case("dinov2", "dinov2"),  # LayerScale λ far from 1
    # the SwiGLU MLP's input projections stored as one weights_in, split by transformers at load
    Case("dinov2-swiglu", "dinov2", {"use_swiglu_ffn": True}, bf16=False),
    # the classifier reads the final norm's CLS row and mean patch row: that norm is an output norm
    Case("dinov2-classifier", "dinov2", {"num_labels": 5}, bf16=False, auto_class="Dinov2ForImageClassification"),
    # the tied head reads the head's own norm (an inner norm); token dropout
    Case("esm-rotary", "esm", inner_norms={"LayerNorm": 1}),
    Case("esm-absolute-untied", "esm", {"position_embedding_type": "absolute", "tie_word_embeddings": False}, inner_norms={"LayerNorm": 1}, bf16=False),
    # no head: the final norm is an output norm (last_hidden_state), read by the pooler (copied)
    Case("esm-model", "esm", bf16=False, auto_class="EsmModel"),
    # the classifiers read the final norm (row 0 / every row): they are its readers; bf16: a pooled
    # output averages away the layers' rounding, which the audit must not call a layer off
    Case("esm-sequence-classifier", "esm", {"num_labels": 3}, auto_class="EsmForSequenceClassification"),
    Case("esm-token-classifier", "esm", {"num_labels": 5, "position_embedding_type": "absolute"}, bf16=False, auto_class="EsmForTokenClassification"),
    Case("clip_text", "clip_text_model"),
    # CLIPTextModel's config class and Auto class: both load in one process (modeling's from_pretrained)
    Case("clip_text-projection", "clip_text_model", auto_class="CLIPTextModelWithProjection", bf16=False),
    # two streams: the encoder's, centred where it enters its first layer, and the decoder's
    Case("whisper", "whisper"),
    # no head: both streams end in output norms (last_hidden_state, encoder_last_hidden_state)
    Case("whisper-model", "whisper", bf16=False, auto_class="WhisperModel"),
    # the encoder alone, its stream centred at entry; the projector reads the final norm (before a mean;
    # bf16 as for the ESM sequence classifier)
    Case("whisper-audio-classifier", "whisper", {"num_labels": 4, "classifier_proj_size": 24}, auto_class="WhisperForAudioClassification"),
]
BY_ID = {case.id: case for case in CASES + ENCODER_CASES}
TARGETS = {"rmsnorm": (), "fold-affine": ("--fold-affine",), "crmsnorm": ("--target", "crmsnorm")}


def _build(case: Case, folder: Path, dtype: torch.dtype = torch.float32) -> None:
    build_checkpoint(folder, case.model_type, seed=sum(map(ord, case.id)), overrides=case.overrides, dtype=dtype, auto_class=case.auto_class)
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
    # the tool's own greedy check runs on 8 tokens here: assert_equivalent generates 32 itself,
    # cached, uncached and left-padded (the report's 32-token default is tested in test_convert_gpt2)
    return conversion_cache(tmp_path_factory, source, common=("--greedy-tokens", "8"))


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_every_target_is_equivalent_with_every_norm_replaced(converted, case, target):
    src, out = converted(case.id, TARGETS[target])
    compared = assert_equivalent(src, out, remote=True)
    expected = {"crmsnorm": "PrenormCRMSNorm"}.get(target, "PrenormRMSNorm")
    if case.lands_in and target != "crmsnorm":  # the stock architecture's own RMSNorm
        expected = case.lands_in[1].replace("ForCausalLM", "RMSNorm")
    converted_norms = Counter(type(m).__name__ for m in compared["converted"].modules() if "Norm" in type(m).__name__)
    stems = Counter({"PrenormCenteredLayerNorm": case.kept_stems if target != "crmsnorm" else 0})
    stream_norms = converted_norms - Counter(case.inner_norms) - stems
    assert set(stream_norms) == {expected}, f"only inner and stem norms may keep their class: {dict(converted_norms)}"
    assert converted_norms["PrenormCenteredLayerNorm"] == stems["PrenormCenteredLayerNorm"], "stems kept on rmsnorm, baked for crmsnorm"
    assert converted_norms - stream_norms == Counter(case.inner_norms) + stems, "every inner norm is left as it is"
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


BF16_CASES = [case for case in CASES + ENCODER_CASES if case.bf16]


@pytest.mark.parametrize("case", BF16_CASES, ids=[case.id for case in BF16_CASES])
def test_a_bf16_source_passes_the_default_bf16_gate(case, tmp_path):
    src = tmp_path / "src"
    _build(case, src, dtype=torch.bfloat16)
    result = run_cli("convert", src, tmp_path / "out", "--quiet", "--greedy-tokens", "8", "--json", "-")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] and report["dtype"] == "bfloat16" and report["rounded_weights"]["tensors_not_matching"] == []
    assert report["first_bad_layer"] is None, report["per_layer"]


def test_a_bf16_masked_image_model_converts_to_crmsnorm(tmp_path):
    """Its decoder convolution reads the output norm: planning's check forward built the swapped
    norms in float32 inside the bf16 model, handed the convolution float32 and refused the
    conversion as a width problem (found by scripts/sweep_unseen_configs.py)."""
    src = tmp_path / "src"
    _build(BY_ID["vit-mim"], src, dtype=torch.bfloat16)
    result = run_cli("convert", src, tmp_path / "out", "--target", "crmsnorm", "--quiet", "--json", "-")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] and report["dtype"] == "bfloat16" and report["first_bad_layer"] is None


def test_families_and_inspect_list_every_case(source):
    result = run_cli("families", "--json")
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)["families"]
    listed = {model_type for row in rows for model_type in row["model_types"]}
    assert {case.model_type for case in CASES + ENCODER_CASES} <= listed
    for case in CASES + ENCODER_CASES:
        shown = run_cli("inspect", source(case.id), "--json")
        assert shown.exit_code == 0, (case.id, shown.stderr)
        assert json.loads(shown.stdout)["family"] in {row["family"] for row in rows if case.model_type in row["model_types"]}


# -- encoders and vision models ----------------------------------------------------------------


def _encoder_inputs(model) -> list[dict]:
    """Batches each family's models take, covering the paths that touch the stream: pixel values at
    the trained size and (ViT, DINOv2) at another size, positions interpolated; the mask token where
    the model has one (DINOv2, ViT's masked image model); token ids with padding and, for ESM,
    <mask> tokens (token dropout)."""
    config = model.config
    generator = torch.Generator().manual_seed(11)
    if hasattr(config, "image_size"):
        batches = [{"pixel_values": torch.randn((2, 3, 16, 16), generator=generator)}]
        larger = {"pixel_values": torch.randn((1, 3, 24, 24), generator=generator)}
        if config.model_type == "vit":
            larger["interpolate_pos_encoding"] = True
        if any(name.endswith("mask_token") for name, _ in model.named_parameters()):
            batches.append({**batches[0], "bool_masked_pos": torch.rand((2, 16), generator=generator) < 0.3})
        return batches + [larger]
    ids = torch.randint(2, config.vocab_size, (2, 12), generator=generator)
    mask = torch.ones_like(ids)
    ids[1, 9:], mask[1, 9:] = 1, 0  # padding
    if config.model_type == "esm":
        ids[0, 3] = ids[1, 5] = config.mask_token_id
    if config.model_type == "whisper":
        features = torch.randn((2, config.num_mel_bins, 2 * config.max_source_positions), generator=generator)
        if "decoder_input_ids" not in inspect.signature(model.forward).parameters:  # an audio classifier
            return [{"input_features": features}]
        return [{"input_features": features, "decoder_input_ids": ids, "decoder_attention_mask": mask}]
    return [{"input_ids": ids, "attention_mask": mask}]


def _assert_encoder_equivalent(src: Path, out: Path, remote: bool):
    config = json.loads((out / "config.json").read_text())
    architecture = json.loads((src / "config.json").read_text())["architectures"][0]
    original = load_class(src, architecture, remote=False)
    auto = next((name for name in config.get("auto_map", {}) if name != "AutoConfig"), None)
    converted = load_class(out, auto if remote else architecture, remote=remote)
    for inputs in _encoder_inputs(original):
        assert_outputs_match(original, converted, inputs)
    if original.can_generate():  # an encoder-decoder with its head: the decoder generates: greedy tokens identical
        features = _encoder_inputs(original)[0]["input_features"]
        expected = original.generate(input_features=features, max_new_tokens=12, do_sample=False)
        assert expected.shape[1] >= 12 and torch.equal(expected, converted.generate(input_features=features, max_new_tokens=12, do_sample=False))
    return original, converted


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("case", ENCODER_CASES, ids=[case.id for case in ENCODER_CASES])
def test_encoders_and_vision_models_are_equivalent_on_every_target(converted, case, target, tmp_path):
    src, out = converted(case.id, TARGETS[target])
    original, model = _assert_encoder_equivalent(src, out, remote=True)
    expected = {"crmsnorm": {"PrenormCRMSNorm", "PrenormCRMSNormOutput"}}.get(target, {"PrenormRMSNorm"})
    stream_norms = Counter(type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__) - Counter(case.inner_norms)
    assert set(stream_norms) <= expected and "LayerNorm" not in stream_norms, dict(stream_norms)
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["passed"] and report["residual_mean_max"] < 1e-5 and report["greedy_match"]["identical"] is None
    layers = sum(len(m) for name, m in original.named_modules() if isinstance(m, torch.nn.ModuleList) and name.rpartition(".")[2] in ("layer", "layers"))
    assert report["first_bad_layer"] is None and len(report["per_layer"]) == layers, "every layer of every stream audited, none off"
    # save_pretrained round trip: the converted class saves and reloads as itself
    model.save_pretrained(tmp_path / "saved")
    auto = next(name for name in json.loads((out / "config.json").read_text())["auto_map"] if name != "AutoConfig")
    reloaded = load_class(tmp_path / "saved", auto, remote=True)
    for inputs in _encoder_inputs(original):
        assert_outputs_match(original, reloaded, inputs)


@pytest.mark.parametrize("case", ENCODER_CASES, ids=[case.id for case in ENCODER_CASES])
def test_encoders_default_target_loads_as_the_stock_class(converted, case):
    src, out = converted(case.id, TARGETS["rmsnorm"])
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == case.model_type, "the default target keeps the stock model_type"
    original, model = _assert_encoder_equivalent(src, out, remote=False)
    assert type(model).__name__ == type(original).__name__ and norm_types(model) == norm_types(original)


@pytest.mark.parametrize(
    ("model_type", "overrides", "auto_class", "reason"),
    [
        ("esm", {"emb_layer_norm_before": True}, None, "emb_layer_norm_before=true"),
        # the classifier reads a weighted sum of raw hidden states, which a conversion changes
        ("whisper", {"use_weighted_layer_sum": True}, "WhisperForAudioClassification", "use_weighted_layer_sum=true"),
        # without token dropout the refusal must not blame it (the message named it whatever the config)
        ("esm", {"emb_layer_norm_before": True, "token_dropout": False}, None, "token_dropout=false"),
    ],
)
def test_refused_encoder_variants_say_why_and_write_nothing(tmp_path, model_type, overrides, auto_class, reason):
    src = tmp_path / "src"
    build_checkpoint(src, model_type, overrides=overrides, auto_class=auto_class)
    result = run_cli("convert", src, tmp_path / "out", "--quiet")
    assert result.exit_code == 2, result.stderr
    assert reason in result.stderr and "cannot convert" in result.stderr
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_an_original_transformers_cannot_run_is_bad_input_not_an_internal_error(tmp_path):
    # positions for a 2 x 3 patch grid: transformers' DINOv2 interpolates them as a square and cannot
    # run its own config (was exit 3, "please report"), for convert and verify alike
    src = tmp_path / "src"
    build_checkpoint(src, "dinov2", overrides={"image_size": [14, 21], "patch_size": 7})
    result = run_cli("convert", src, tmp_path / "out", "--quiet")
    assert result.exit_code == 2, result.stderr
    assert "original model does not run in the installed transformers" in result.stderr and "Dinov2Model" in result.stderr
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("case_id", ["vit", "esm-rotary", "whisper"])
def test_bench_times_encoders_on_their_own_inputs(converted, case_id):
    from prenorm_convert.bench import BenchSettings, benchmark

    src, out = converted(case_id, TARGETS["crmsnorm"])
    settings = BenchSettings(batch_sizes=(1, 2), seq_lens=(8,), rounds=1, decode_tokens=4, train=True)
    report = benchmark(src, out, settings=settings)
    assert report["decode"] is None, "only causal language models decode token by token"
    assert {point["batch"] for point in report["prefill"]} == {1, 2} and report["train"] is not None
    for point in report["prefill"] + [report["train"]]:
        assert all(point["seconds"][name]["min"] > 0 for name in ("original", "converted", "norm_free"))
    if case_id == "vit":  # an image's length is its patches and class token: 16 / 4 → 4 × 4 + 1
        assert {point["seq"] for point in report["prefill"]} == {17}
    assert report["norms"]["norm_seconds"]["converted"]["min"] > 0


def test_prompts_are_refused_for_vision_models(converted, tmp_path):
    src, out = converted("vit", TARGETS["rmsnorm"])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n")
    result = run_cli("verify", src, out, "--prompts", prompts, "--quiet")
    assert result.exit_code == 2 and "--prompts gives text" in result.stderr
    assert not any(tmp_path.glob("*.json")), "nothing written"
