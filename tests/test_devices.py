"""verify on a chosen device or an accelerate device map (tested here on the CPU only): the same
report as the default run, and a clear exit 2 when the device is absent."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli, snapshot

KEYS = ("max_abs_logit_diff", "max_kl_divergence", "top1_agreement", "residual_mean_max", "first_bad_layer", "passed")


@pytest.fixture(scope="module")
def converted_gpt2(gpt2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("devices") / "out"
    assert run_cli("convert", gpt2_dir, out, "--quiet", "--no-verify").exit_code == 0
    return out


@pytest.mark.parametrize("placement", [("--device", "cpu"), ("--device-map", "auto"), ("--device-map", "sequential")])
def test_a_placed_verification_reports_what_the_default_one_does(gpt2_dir, converted_gpt2, placement):
    default = json.loads(run_cli("verify", gpt2_dir, converted_gpt2, "--quiet", "--json", "-").stdout)
    result = run_cli("verify", gpt2_dir, converted_gpt2, "--quiet", *placement, "--json", "-")
    assert result.exit_code == 0, result.stderr
    placed = json.loads(result.stdout)
    for key in KEYS:
        assert placed[key] == pytest.approx(default[key], rel=1e-6, abs=1e-12) if isinstance(default[key], float) else placed[key] == default[key], key


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
@pytest.mark.parametrize(
    "placement, words",
    [
        (("--device", "cuda"), "torch sees no CUDA device"),
        (("--device", "warp9"), "is not a torch device"),
        (("--device-map", "everywhere"), "--device-map must be one of auto"),
        (("--device", "cuda", "--device-map", "auto"), "give --device or --device-map, not both"),
    ],
)
def test_an_absent_device_is_bad_input_before_any_work(gpt2_dir, converted_gpt2, tmp_path, placement, words):
    before = snapshot(tmp_path)
    result = run_cli("verify", gpt2_dir, converted_gpt2, *placement, "--json", tmp_path / "report.json")
    assert result.exit_code == 2 and words in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert snapshot(tmp_path) == before


def test_bench_runs_with_a_device_map(gpt2_dir, converted_gpt2):
    result = run_cli(
        "bench", gpt2_dir, converted_gpt2, "--device-map", "auto", "--batch-sizes", "1", "--seq-lens", "4",
        "--rounds", "1", "--decode-tokens", "2", "--threads", "1", "--json", "-", "--quiet",
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["device"] == "cpu"  # accelerate's map on a machine without accelerators
    for block in (report["prefill"][0], report["decode"]):
        assert all(times["min"] > 0 for times in block["seconds"].values()) and block["ratio_to_original"]["converted"]["of_min"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_bench_refuses_an_absent_device_and_a_double_placement(gpt2_dir, converted_gpt2):
    for placement, words in ((("--device", "cuda"), "torch sees no CUDA device"), (("--device", "cuda", "--device-map", "auto"), "not both")):
        result = run_cli("bench", gpt2_dir, converted_gpt2, *placement, "--quiet")
        assert result.exit_code == 2 and words in result.stderr, result.stderr
