"""Streamed verification (docs/report.md "Streamed verification"): models that do not fit in
--max-memory (or the memory available) are run with their weights on disk, one module at a time,
and the report means what it means in memory.

Tiny models always fit, so the tests that need streaming make the in-memory estimate huge
(``memory_plan.IN_MEMORY_BYTES_PER_PARAMETER``): the choice is then the one a large model gets.
Peak memory is measured in child processes (VmHWM restarts at exec), as tests/test_memory_depth.py does.
"""

from __future__ import annotations

import json
import shutil
import pytest
import torch

import prenorm_convert
from conftest import child_peak_rss, run_cli, snapshot, tamper
from prenorm_convert import memory_plan
from prenorm_convert.examples import build_checkpoint

STREAM = 10**12  # bytes per parameter "needed" in memory: nothing fits, everything streams


@pytest.fixture
def streamed(monkeypatch):
    monkeypatch.setattr(memory_plan, "IN_MEMORY_BYTES_PER_PARAMETER", STREAM)


@pytest.fixture(scope="module")
def pair(tmp_path_factory, gpt2_dir):
    """The session's GPT-2 and its default conversion, verified in memory."""
    out = tmp_path_factory.mktemp("streamed") / "out"
    prenorm_convert.convert(gpt2_dir, out)
    return gpt2_dir, out, json.loads((out / "conversion_report.json").read_text())


def test_a_streamed_report_says_what_the_in_memory_one_says(pair, streamed):
    src, out, in_memory = pair
    report = prenorm_convert.verify(src, out, max_memory="64GB")
    assert in_memory["streamed"] is None and report["streamed"] is not None
    assert report["streamed"]["max_memory"] == 64 * 10**9 and "--max-memory" in report["streamed"]["reason"]
    assert report["passed"] and report["failures"] == []
    assert report["positions"] == in_memory["positions"] and report["prompts"] == in_memory["prompts"]
    assert report["params_original"] == in_memory["params_original"] and report["params_converted"] == in_memory["params_converted"]
    # the same comparison, prompts batched instead of one at a time: the same function to float32 rounding
    assert report["max_abs_logit_diff"] < report["tolerances"]["max_abs_logit_diff"]
    assert report["top1_agreement"] == 1.0 and report["residual_mean_max"] < 1e-5
    assert [entry["layer"] for entry in report["per_layer"]] == [entry["layer"] for entry in in_memory["per_layer"]]
    assert report["first_bad_layer"] is None
    for streamed_layer, layer in zip(report["per_layer"], in_memory["per_layer"]):
        assert streamed_layer["max_abs_diff"] < report["layer_tolerance"] and layer["max_abs_diff"] < in_memory["layer_tolerance"]
    # greedy decoding is capped, and the report says so
    assert report["greedy_match"] == {
        "prompts": memory_plan.STREAMED_GREEDY_PROMPTS,
        "tokens_compared": memory_plan.STREAMED_GREEDY_TOKENS * memory_plan.STREAMED_GREEDY_PROMPTS,
        "identical": True,
        "reference": "float32 original",
    }
    assert report["original_float32_error"]["positions"] == report["positions"]


def test_a_tampered_layer_is_named_when_streamed(pair, streamed, tmp_path):
    src, out, _ = pair
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    tamper(broken, "transformer.h.1.mlp.c_proj.weight")
    report = prenorm_convert.verify(src, broken, max_memory="64GB")
    assert report["streamed"] is not None and not report["passed"]
    assert report["first_bad_layer"] == 1 and report["first_bad_writer"] == "transformer.h.1.mlp.c_proj"
    assert report["per_layer"][0]["max_abs_diff"] < report["layer_tolerance"] < report["per_layer"][1]["max_abs_diff"]


def test_bf16_streamed_checks_every_stored_rewrite(gpt2_dir, streamed, tmp_path):
    out = tmp_path / "bf16"
    prenorm_convert.convert(gpt2_dir, out, dtype="bfloat16", max_memory="64GB")
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["streamed"] is not None and report["passed"], report["failures"]
    weights = report["rounded_weights"]
    assert weights["tensors_rewritten"] > 0 and weights["tensors_not_matching"] == []
    assert 0 < weights["max_abs_logit_diff"] < report["tolerances"]["max_abs_logit_diff"]
    tamper(out, "transformer.h.0.attn.c_proj.weight", scale=1e-3)  # a small change of a rewritten tensor
    report = prenorm_convert.verify(gpt2_dir, out, max_memory="64GB")
    assert report["rounded_weights"]["tensors_not_matching"] == ["transformer.h.0.attn.c_proj.weight"]
    assert not report["passed"] and "not the rewrite of ORIGINAL" in report["failures"][0]


@pytest.mark.parametrize("streamed_run", [False, True], ids=["in-memory", "streamed"])
def test_rewrites_computed_in_many_blocks_are_checked_block_by_block(tmp_path, monkeypatch, streamed_run):
    # a rewritten embedding (untied GPT-NeoX) in blocks of a few rows: each block is valid only until
    # the next is computed, so the check and the exact model must use it at once
    from prenorm_convert import rounded_weights

    src, out = tmp_path / "src", tmp_path / "out"
    build_checkpoint(src, "gpt_neox", seed=5, overrides={"tie_word_embeddings": False}, dtype=torch.bfloat16)
    prenorm_convert.convert(src, out, verify_output=False)
    monkeypatch.setattr(rounded_weights, "BLOCK_BYTES", 4096)
    if streamed_run:
        monkeypatch.setattr(memory_plan, "IN_MEMORY_BYTES_PER_PARAMETER", STREAM)
    report = prenorm_convert.verify(src, out, max_memory="64GB")
    assert (report["streamed"] is not None) == streamed_run
    assert report["passed"] and report["rounded_weights"]["tensors_not_matching"] == [], report["failures"]
    assert report["rounded_weights"]["max_abs_logit_diff"] > 0


def test_without_max_memory_a_model_larger_than_the_available_memory_streams(pair, monkeypatch):
    src, out, _ = pair
    monkeypatch.setattr(memory_plan, "available_bytes", lambda: 64 * 10**9)
    monkeypatch.setattr(memory_plan, "IN_MEMORY_BYTES_PER_PARAMETER", STREAM)
    report = prenorm_convert.verify(src, out)
    assert report["passed"] and report["streamed"] is not None and "available" in report["streamed"]["reason"]


def test_a_budget_that_cannot_hold_one_layer_is_refused_before_any_work(pair, tmp_path):
    src, out, _ = pair
    before = snapshot(tmp_path)
    result = run_cli("verify", src, out, "--max-memory", "1MB", "--json", tmp_path / "report.json")
    assert result.exit_code == 2
    assert "even one layer does not fit in --max-memory" in result.stderr and "give a larger --max-memory" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and snapshot(tmp_path) == before


@pytest.mark.parametrize("value", ["lots", "-3GB", "infGB"])
def test_a_malformed_max_memory_is_bad_input(pair, tmp_path, value):
    src, out, _ = pair
    for command in (("verify", src, out), ("convert", src, tmp_path / "never")):
        result = run_cli(*command, "--max-memory", value)
        assert result.exit_code == 2 and "--max-memory must" in result.stderr, result.stderr
    assert not (tmp_path / "never").exists()


def test_max_memory_does_not_combine_with_a_device_map(pair):
    src, out, _ = pair
    result = run_cli("verify", src, out, "--max-memory", "3GiB", "--device-map", "auto")
    assert result.exit_code == 2 and "--max-memory" in result.stderr and "--device" in result.stderr


# -- memory does not grow with depth -----------------------------------------------------------

SHAPE = {"n_embd": 384, "n_head": 6, "n_positions": 256}
VERIFY_STREAMED = (
    "import sys; from prenorm_convert import memory_plan; memory_plan.IN_MEMORY_BYTES_PER_PARAMETER = 10**12; "
    "from prenorm_convert.verification import verify; report = verify(sys.argv[1], sys.argv[2], max_memory='64GB'); "
    "assert report['passed'] and report['streamed'], report['failures']"
)


def test_streamed_peak_memory_is_flat_from_4_to_16_layers(tmp_path):
    peaks, sizes = {}, {}
    for layers in (4, 16):
        src, out = tmp_path / f"gpt2-{layers}", tmp_path / f"out-{layers}"
        build_checkpoint(src, "gpt2", seed=layers, overrides={**SHAPE, "n_layer": layers}, tokenizer=False, max_shard_size="50MB")
        prenorm_convert.convert(src, out, verify_output=False)
        sizes[layers] = sum(path.stat().st_size for path in src.glob("*.safetensors"))
        peaks[layers] = child_peak_rss(VERIFY_STREAMED, src, out)
    added_weights = sizes[16] - sizes[4]
    assert added_weights > 80e6
    growth = peaks[16] - peaks[4]
    print(f"streamed verify peak RSS: 4 layers {peaks[4] / 2**20:.0f} MiB, 16 layers {peaks[16] / 2**20:.0f} MiB; weights +{added_weights / 1e6:.0f} MB")
    # in memory, verification holds both models and a float64 copy: over 3x the added weights
    assert growth < 0.2 * added_weights, (peaks, sizes)


def test_streamed_passes_show_progress_layer_by_layer(pair, streamed):
    src, out, _ = pair
    result = run_cli("verify", src, out, "--max-memory", "64GB")
    assert result.exit_code == 0, result.stderr
    layers = json.loads((src / "config.json").read_text())["n_layer"]
    # two models over one batch, every decoder layer: a bar that moves while a large model streams
    assert f"{2 * layers}/{2 * layers}" in result.stderr and "comparing logits and every layer's output" in result.stderr
    assert "verifying with the weights streamed from disk" in result.stderr
