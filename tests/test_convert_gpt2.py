"""GPT-2 end to end: convert on-disk checkpoints with the CLI, load with transformers, compare."""

from __future__ import annotations

import gc
import json
import re
import sys
import weakref

import pytest
import torch
import transformers
from safetensors import safe_open

import prenorm_convert
from equivalence import assert_equivalent, load, norm_types, sample_ids
from conftest import conversion_cache, run_cli

CASES = [
    pytest.param("gpt2_dir", [], id="rmsnorm"),
    pytest.param("gpt2_dir", ["--fold-affine"], id="fold-affine"),
    pytest.param("gpt2_bare_dir", [], id="bare-keys-rmsnorm"),
    pytest.param("gpt2_bare_dir", ["--fold-affine"], id="bare-keys-fold-affine"),
]


@pytest.fixture(scope="module")
def converted(request, tmp_path_factory):
    """Memoised conversions: (fixture name, options) -> (source folder, output folder)."""
    return conversion_cache(tmp_path_factory, request.getfixturevalue)


@pytest.mark.parametrize("source, options", CASES)
def test_converted_checkpoint_matches_original(converted, source, options):
    src, out = converted(source, tuple(options))
    compared = assert_equivalent(src, out, remote=True)
    assert norm_types(compared["converted"]) == {"PrenormRMSNorm"}, "no LayerNorm may remain"
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["passed"] and report["greedy_match"]["identical"]
    assert report["greedy_match"]["tokens_compared"] >= 32
    assert report["relative_max_abs_logit_diff"] <= 1e-5
    assert report["residual_mean_max"] < 1e-5
    assert report["top1_agreement"] == 1.0


@pytest.mark.parametrize("source", ["gpt2_dir", "gpt2_bare_dir"])
def test_rmsnorm_output_loads_as_stock_gpt2_without_remote_code(converted, source):
    src, out = converted(source, ())
    compared = assert_equivalent(src, out, remote=False, padded=False)
    assert type(compared["converted"]) is transformers.GPT2LMHeadModel
    assert norm_types(compared["converted"]) == {"LayerNorm"}


def test_fold_affine_output_refuses_to_load_without_remote_code(converted):
    _, out = converted("gpt2_dir", ("--fold-affine",))
    with pytest.raises(ValueError, match="trust_remote_code"):
        transformers.AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=False)


def test_output_layout_index_side_files_and_the_head_kept_tied(converted, gpt2_dir):
    src, out = converted("gpt2_dir", ())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / name).exists() for name in shards)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True, "a tied source stays tied"
    block = config["prenorm"]
    assert block["target"] == "rmsnorm" and block["untied_head"] is False and block["centered_at_lookup"] == ["transformer.wte"]
    code_files = ("modeling_prenorm.py", "norm_functions.py")
    assert all((out / name).exists() for name in code_files)
    imports = [line for name in code_files for line in (out / name).read_text().splitlines() if line.startswith(("import ", "from "))]
    # remote code may need nothing beyond what loading the model needs anyway: torch, transformers, the
    # standard library, and the code files written beside it
    relative = [line.split()[1] for line in imports if line.split()[1].startswith(".")]
    assert relative == [".norm_functions"], relative
    others = [line for line in imports if not line.split()[1].startswith(".")]
    assert all(line.split()[1].split(".")[0] in {"torch", "transformers"} | sys.stdlib_module_names for line in others), imports
    # the table is stored once, as it is (the converted model centres its rows at lookup); no head of its own
    original = load(src, remote=False)
    assert "lm_head.weight" not in index["weight_map"]
    with safe_open(str(out / index["weight_map"]["transformer.wte.weight"]), "pt") as handle:
        wte = handle.get_tensor("transformer.wte.weight")
    assert torch.equal(wte, original.transformer.wte.weight)
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["params_converted"] == report["params_original"]
    sizes = [sum(p.stat().st_size for p in folder.glob("*.safetensors")) for folder in (src, out)]
    assert sizes[1] <= 1.01 * sizes[0], f"the converted weights ({sizes[1]} B) are no larger than the original's ({sizes[0]} B)"
    # the centring at lookup makes the converted stream zero-mean, the stock class needs none
    assert 0 < report["residual_mean_max"] < 1e-5
    assert_equivalent(src, out, remote=False, padded=False)


def test_untie_head_stores_the_centred_table_and_the_head_apart(converted, gpt2_dir):
    src, out = converted("gpt2_dir", ("--untie-head",))
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["prenorm"]["untied_head"] is True
    assert config["prenorm"]["centered_at_lookup"] == []
    index = json.loads((out / "model.safetensors.index.json").read_text())
    original = load(src, remote=False)
    with safe_open(str(out / index["weight_map"]["lm_head.weight"]), "pt") as handle:
        head = handle.get_tensor("lm_head.weight")
    with safe_open(str(out / index["weight_map"]["transformer.wte.weight"]), "pt") as handle:
        wte = handle.get_tensor("transformer.wte.weight")
    assert torch.equal(head, original.transformer.wte.weight)
    assert wte.double().mean(-1).abs().max() < 1e-6
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["params_converted"] - report["params_original"] == wte.numel()
    assert_equivalent(src, out, remote=True)
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "trust_remote_code=True" in card and "top-1 agreement" in card


def test_bare_key_buffers_are_dropped_not_converted(converted, gpt2_bare_dir):
    _, out = converted("gpt2_bare_dir", ())
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"] if (
        out / "model.safetensors.index.json"
    ).exists() else None
    names = set(weight_map) if weight_map else set(safe_open(str(out / "model.safetensors"), "pt").keys())
    assert not [name for name in names if re.fullmatch(r"(transformer\.)?h\.\d+\.attn\.(masked_)?bias", name)]
    assert "transformer.h.0.attn.c_attn.bias" in names
    assert all(name.startswith(("transformer.", "lm_head.")) for name in names)


def test_load_converted_api_and_save_pretrained_round_trip(converted, tmp_path):
    src, out = converted("gpt2_dir", ("--fold-affine",))
    model = prenorm_convert.load_converted(out)
    assert norm_types(model) == {"PrenormRMSNorm"}
    model.save_pretrained(str(tmp_path / "again"))
    again = load(tmp_path / "again", remote=True)
    ids = sample_ids(model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    assert again.config.prenorm == model.config.prenorm


def test_python_api_mirrors_cli(gpt2_dir, tmp_path):
    result = prenorm_convert.convert(gpt2_dir, tmp_path / "api", fold_affine=True)
    assert result.report["passed"]
    assert json.loads((tmp_path / "api" / "conversion_report.json").read_text()) == result.report
    again = prenorm_convert.verify(gpt2_dir, tmp_path / "api")
    assert again["passed"] and again["max_abs_logit_diff"] == result.report["max_abs_logit_diff"]


@pytest.mark.parametrize("options", [[], ["--fold-affine"]], ids=["rmsnorm", "fold-affine"])
def test_bfloat16_adds_no_error_beyond_the_dtype(gpt2_dir, tmp_path, options):
    out = tmp_path / "bf16"
    result = run_cli("convert", gpt2_dir, out, "--dtype", "bfloat16", "--quiet", "--json", tmp_path / "r.json", *options)
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["dtype"] == "bfloat16"
    own = report["original_in_dtype"]
    # the converted bf16 model is compared with the float32 original, next to the bf16 original's own error
    assert report["max_abs_logit_diff"] <= 1.5 * own["max_abs_logit_diff"]
    assert report["top1_agreement"] >= own["top1_agreement"] - 0.05
    print(f"bf16 {options}: converted {report['max_abs_logit_diff']:.4g} vs original-in-bf16 {own['max_abs_logit_diff']:.4g}")
    model = load(out, remote=True, dtype=torch.bfloat16)
    assert model.transformer.wte.weight.dtype == torch.bfloat16


def test_verify_cli_json_and_exit_codes(converted, gpt2_dir, gpt2_bare_dir, tmp_path):
    _, out = converted("gpt2_dir", ())
    result = run_cli("verify", gpt2_dir, out, "--quiet", "--json", "-")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    for key in ("max_abs_logit_diff", "mean_abs_logit_diff", "max_kl_divergence", "top1_agreement", "greedy_match",
                "residual_mean_max", "params_original", "params_converted", "dtype", "tolerances", "passed"):
        assert key in report
    # a different model is not equivalent: exit 1
    mismatch = run_cli("verify", gpt2_bare_dir, out, "--quiet", "--json", tmp_path / "bad.json")
    assert mismatch.exit_code == 1
    assert json.loads((tmp_path / "bad.json").read_text())["passed"] is False


def test_inspect_and_families(gpt2_dir, checkpoints):
    before = sorted(p.name for p in gpt2_dir.iterdir())
    result = run_cli("inspect", gpt2_dir, "--fold-affine", "--json")
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["family"] == "gpt2" and info["untie_head"] is False and info["requires_remote_code"] is True
    assert info["biases_added"] == [] and info["centered_at_lookup"] == ["transformer.wte"], "ln_f keeps β for the tied head"
    assert any("stays tied" in note for note in info["notes"])
    untied = json.loads(run_cli("inspect", gpt2_dir, "--fold-affine", "--untie-head", "--json").stdout)
    assert untied["untie_head"] is True and untied["biases_added"] == ["lm_head"] and untied["centered_at_lookup"] == []
    assert sorted(p.name for p in gpt2_dir.iterdir()) == before
    text = run_cli("inspect", gpt2_dir)
    assert text.exit_code == 0 and "center" in text.stdout
    families = run_cli("families")
    assert families.exit_code == 0 and "gpt2" in families.stdout and "add_cross_attention" in families.stdout


@pytest.mark.parametrize("options", [(), ("--target", "crmsnorm")], ids=["rmsnorm", "crmsnorm"])
def test_a_dropped_converted_model_is_freed_without_a_garbage_collection(converted, options):
    """Its hooks hold the model weakly: no reference cycle keeps a dropped model's weights in memory
    until the next full collection (verification drops models between its runs)."""
    _, out = converted("gpt2_dir", options)
    gc.collect()
    gc.disable()
    try:
        model = prenorm_convert.load_converted(out)
        model.train()  # the training hooks run too
        model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
        model.eval()
        alive = weakref.ref(model)
        del model
        assert alive() is None, "the converted model outlived its last reference"
    finally:
        gc.enable()
