"""The per-layer audit: every verification reports, per decoder layer, how far the converted stream is
from zero-mean and from the original's centred stream, and names the first layer (and its worst
writer) that departs, so a failure says where."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import run_cli, tamper

from prenorm_convert.examples import build_checkpoint


@pytest.mark.parametrize("options", [(), ("--target", "crmsnorm")], ids=["rmsnorm", "crmsnorm"])
def test_a_correct_conversion_has_every_layer_centred_and_equal(gpt2_dir, tmp_path, options):
    result = run_cli("convert", gpt2_dir, tmp_path / "out", "--quiet", *options, "--json", "-")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    layers = json.loads((gpt2_dir / "config.json").read_text())["n_layer"]
    assert [entry["layer"] for entry in report["per_layer"]] == list(range(layers))
    for entry in report["per_layer"]:
        # crmsnorm's last feature is rebuilt as minus the sum: zero mean by construction
        assert 0 <= entry["mean_over_rms"] < 1e-5 and (entry["mean_over_rms"] > 0 or options)
        assert 0 < entry["max_abs_diff"] < report["layer_tolerance"]
        # float32: every layer is held to the logit bar's relative value, with nothing of a reduced dtype
        assert entry["tolerance"] == report["layer_tolerance"] and entry["original_in_dtype"] is None
    assert report["first_bad_layer"] is None and report["first_bad_writer"] is None
    assert report["layer_tolerance"] == pytest.approx(report["tolerances"]["max_abs_logit_diff"] / report["logit_scale"])


@pytest.fixture(scope="module")
def converted_gpt2(gpt2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("audit") / "out"
    assert run_cli("convert", gpt2_dir, out, "--quiet").exit_code == 0
    return out


def test_a_tampered_writer_is_named_with_its_layer(gpt2_dir, converted_gpt2, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(converted_gpt2, broken)
    tamper(broken, "transformer.h.1.mlp.c_proj.weight")
    result = run_cli("verify", gpt2_dir, broken, "--json", "-")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["first_bad_layer"] == 1 and report["first_bad_writer"] == "transformer.h.1.mlp.c_proj"
    assert report["per_layer"][0]["max_abs_diff"] < report["layer_tolerance"] < report["per_layer"][1]["max_abs_diff"]
    assert "first layer off: 1, worst writer transformer.h.1.mlp.c_proj" in result.stderr
    assert "first layer off" in result.stderr and "transformer.h.1.mlp.c_proj" in result.stderr


def test_the_first_layers_attention_writer_is_told_from_its_mlp(gpt2_dir, converted_gpt2, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(converted_gpt2, broken)
    tamper(broken, "transformer.h.0.attn.c_proj.weight")
    report = json.loads(run_cli("verify", gpt2_dir, broken, "--json", "-").stdout)
    assert report["first_bad_layer"] == 0 and report["first_bad_writer"] == "transformer.h.0.attn.c_proj"


def test_in_bf16_each_layer_is_held_to_the_originals_own_error_there_and_a_tampered_writer_is_named(tmp_path):
    """In a reduced dtype a layer's error is the dtype's, which the logits may average away (a
    classifier's pooled output): each layer is held to the original's own error at that layer (run in
    the dtype) times LAYER_OWN_ERROR_MARGIN, or a few units of the dtype's resolution, not to the
    logit bar (which the measured cost of rounding the stored tensors widens when a stored tensor is
    tampered with)."""
    from prenorm_convert.tolerances import LAYER_OWN_ERROR_MARGIN, LAYER_RESOLUTION_ULPS

    src, out, broken = tmp_path / "src", tmp_path / "out", tmp_path / "broken"
    build_checkpoint(src, "gpt2", seed=3, dtype=torch.bfloat16, overrides={"n_layer": 3})
    result = run_cli("convert", src, out, "--quiet", "--greedy-tokens", "4", "--json", "-")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["first_bad_layer"] is None and len(report["per_layer"]) == 3
    resolution = LAYER_RESOLUTION_ULPS * torch.finfo(torch.bfloat16).eps
    for entry in report["per_layer"]:
        assert 0 < entry["original_in_dtype"] and 0 < entry["max_abs_diff"] <= entry["tolerance"]
        assert entry["tolerance"] == pytest.approx(max(resolution, LAYER_OWN_ERROR_MARGIN * entry["original_in_dtype"]))
    assert any(entry["tolerance"] > resolution for entry in report["per_layer"]), "the original's own error counts"

    shutil.copytree(out, broken)
    tamper(broken, "transformer.h.1.mlp.c_proj.weight")
    result = run_cli("verify", src, broken, "--greedy-tokens", "4", "--json", "-")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["first_bad_layer"] == 1 and report["first_bad_writer"] == "transformer.h.1.mlp.c_proj"
    assert report["per_layer"][0]["max_abs_diff"] <= report["per_layer"][0]["tolerance"]
    assert "first layer off: 1, worst writer transformer.h.1.mlp.c_proj" in result.stderr
