"""Smoke test of `prenorm-convert bench`: the shape of its output, never its timings."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from prenorm_convert.bench import VARIANTS, BenchSettings, NormFree, benchmark
from prenorm_convert.conversion import convert
from prenorm_convert.verification import load_original
from conftest import run_cli

TINY = BenchSettings(batch_sizes=(1, 2), seq_lens=(4,), rounds=2, decode_tokens=2, decode_prompt=3, train=True)


@pytest.fixture(scope="module")
def converted_dir(gpt2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "converted"
    convert(gpt2_dir, out, verify_output=False)
    return out


def check_block(block: dict, rounds: int) -> None:
    assert set(block["seconds"]) == set(VARIANTS)
    for times in block["seconds"].values():
        assert len(times["all"]) == rounds
        assert 0 < times["min"] <= times["median"]
    assert set(block["ratio_to_original"]) == {"converted", "norm_free"}
    for ratio in block["ratio_to_original"].values():
        assert ratio["of_min"] > 0 and ratio["median_of_rounds"] > 0


def test_benchmark_report_shape(gpt2_dir, converted_dir):
    report = benchmark(gpt2_dir, converted_dir, dtype="float32", threads=1, settings=TINY)
    assert report["variants"] == list(VARIANTS)
    assert report["threads"] == 1 and report["dtype"] == "float32" and report["device"] == "cpu"
    assert report["target"] == "rmsnorm" and report["fold_affine"] is False
    assert [(point["batch"], point["seq"]) for point in report["prefill"]] == [(1, 4), (2, 4)]
    for point in report["prefill"]:
        check_block(point, TINY.rounds)
    check_block(report["decode"], TINY.rounds)
    assert report["decode"]["new_tokens"] == 2
    assert set(report["decode"]["tokens_per_second"]) == set(VARIANTS)
    norms = report["norms"]
    assert (norms["batch"], norms["seq"]) == (2, 4)
    assert set(norms["norm_seconds"]) == {"original", "converted"}
    assert all(len(times["all"]) == TINY.rounds and times["min"] > 0 for times in norms["norm_seconds"].values())
    assert 0 < norms["share_of_prefill_original"] < 1 and 0 < norms["share_of_prefill_converted"] < 1
    assert norms["estimated_converted_over_original"] > 0
    check_block(report["train"], TINY.rounds)
    assert (report["train"]["batch"], report["train"]["seq"]) == (2, 4)
    assert report["machine"]["torch"] and report["machine"]["cpu_count"] >= 1


def test_norm_free_swaps_layernorms_and_restores_them(gpt2_dir):
    model = load_original(gpt2_dir, torch.float32)
    norm_free = NormFree(model)
    count = sum(isinstance(module, nn.LayerNorm) for module in model.modules())
    assert len(norm_free.norms) == count > 0
    with norm_free.active():
        assert not any(isinstance(module, nn.LayerNorm) for module in model.modules())
    assert sum(isinstance(module, nn.LayerNorm) for module in model.modules()) == count


def test_cli_bench_writes_json(gpt2_dir, converted_dir, tmp_path):
    path = tmp_path / "bench.json"
    result = run_cli(
        "bench", gpt2_dir, converted_dir, "--batch-sizes", "1", "--seq-lens", "4", "--rounds", "1",
        "--decode-tokens", "0", "--threads", "1", "--json", path, "--quiet",
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads(path.read_text())
    assert report["decode"] is None and report["train"] is None
    check_block(report["prefill"][0], 1)


def test_cli_bench_bad_input(gpt2_dir, converted_dir, tmp_path):
    result = run_cli("bench", gpt2_dir, converted_dir, "--batch-sizes", "1,x", "--quiet")
    assert result.exit_code == 2 and "--batch-sizes" in result.stderr
    result = run_cli("bench", gpt2_dir, tmp_path / "missing", "--quiet")
    assert result.exit_code == 2 and "missing" in result.stderr
    result = run_cli("bench", gpt2_dir, converted_dir, "--seq-lens", "100000", "--quiet")
    assert result.exit_code == 2 and "positions" in result.stderr


def test_compiled_norms_variant_switches_the_remote_code_on_only_while_it_runs(gpt2_dir, converted_dir, tmp_path):
    """--compiled-norms adds converted_compiled: the same converted model, its remote code's
    compiled norms on while it is timed (the tiny model's norms stay below the size thresholds, so
    nothing compiles here), off again afterwards."""
    from prenorm_convert.bench import CompiledNorms
    from prenorm_convert.verification import load_converted

    switches = CompiledNorms(load_converted(converted_dir, dtype=torch.float32))
    before = switches.switch["on"]
    with switches.active():
        assert switches.switch["on"] is True
    assert switches.switch["on"] is before
    path = tmp_path / "bench.json"
    result = run_cli(
        "bench", gpt2_dir, converted_dir, "--batch-sizes", "2", "--seq-lens", "4", "--rounds", "2", "--decode-tokens", "2",
        "--threads", "1", "--compiled-norms", "--train", "--json", path, "--quiet",
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads(path.read_text())
    assert report["variants"] == ["original", "converted", "norm_free", "converted_compiled"]
    for block in (report["prefill"][0], report["decode"], report["train"]):
        assert set(block["ratio_to_original"]) == {"converted", "norm_free", "converted_compiled"}
    assert set(report["norms"]["norm_seconds"]) == {"original", "converted", "converted_compiled"}
    assert report["norms"]["estimated_converted_over_original_compiled"] > 0
