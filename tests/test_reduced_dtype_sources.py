"""Checkpoints stored in bfloat16 and converted in bfloat16: the conversion rounds every rewritten
tensor once, which the original never had to; the report measures that cost (`rounded_weights`)
and checks that the stored tensors are exactly the rewrite rounded once (docs/report.md)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_cli
from prenorm_convert.examples import build_checkpoint

WIDTH_KEY = {"gpt2": "n_embd", "bloom": "hidden_size"}


@pytest.fixture(scope="module")
def bf16_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16-sources")
    folders = {}
    for family in WIDTH_KEY:
        folders[family] = root / family
        build_checkpoint(folders[family], family, seed=0, dtype=torch.bfloat16, overrides={WIDTH_KEY[family]: 256}, max_shard_size="100MB")
    return folders


@pytest.mark.parametrize("family", list(WIDTH_KEY))
def test_a_bf16_source_converts_within_what_the_dtype_costs(bf16_sources, tmp_path, family):
    out = tmp_path / "out"
    result = run_cli("convert", bf16_sources[family], out, "--quiet", "--json", "-")
    assert result.exit_code == 0, result.stderr + result.stdout
    report = json.loads(result.stdout)
    own, rounding = report["original_in_dtype"], report["rounded_weights"]
    assert report["dtype"] == "bfloat16" and rounding["stored_dtype"] == "bfloat16"
    assert rounding["tensors_rewritten"] > 0 and rounding["tensors_not_matching"] == []
    # rounding the rewritten tensors costs about as much as running in bf16 does (the source's own
    # weights cost nothing: they are bf16 already), and the converted model carries both
    assert 0 < rounding["max_abs_logit_diff"] < 2 * own["max_abs_logit_diff"]
    assert report["max_abs_logit_diff"] <= 1.5 * (own["max_abs_logit_diff"] + rounding["max_abs_logit_diff"])
    assert report["tolerances"]["max_abs_logit_diff"] == pytest.approx(1.5 * (own["max_abs_logit_diff"] + rounding["max_abs_logit_diff"]))
    print(
        f"{family} bf16 source: converted max|Δ| {report['max_abs_logit_diff']:.3g}, original in bf16 "
        f"{own['max_abs_logit_diff']:.3g}, rounding the rewrite {rounding['max_abs_logit_diff']:.3g}"
    )


def test_stored_tensors_that_are_not_the_rounded_rewrite_fail(bf16_sources, tmp_path):
    out = tmp_path / "out"
    assert run_cli("convert", bf16_sources["gpt2"], out, "--quiet", "--no-verify").exit_code == 0
    weights = out / "model.safetensors"
    tensors = load_file(weights)
    writer = tensors["transformer.h.0.attn.c_proj.weight"]  # a rewritten (centred) tensor
    writer[0, 0] = writer[0, 0] * 1.01  # a percent off in one element: far below any logit tolerance
    save_file(tensors, weights, metadata={"format": "pt"})
    result = run_cli("verify", bf16_sources["gpt2"], out, "--quiet", "--json", "-")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["rounded_weights"]["tensors_not_matching"] == ["transformer.h.0.attn.c_proj.weight"]
    assert any("are not the rewrite of ORIGINAL rounded to bfloat16" in failure for failure in report["failures"])


def test_a_wrong_rewrite_still_fails_in_bf16(bf16_sources, tmp_path, monkeypatch):
    """The rounding cost is measured against the same rewrite, so a wrong rewrite cannot widen the
    tolerance: here the embeddings are left uncentred (the stream keeps their mean)."""
    from dataclasses import replace

    from prenorm_convert import transform

    monkeypatch.setitem(transform.STEPS, "center_rows", replace(transform.STEPS["center_rows"], fn=lambda x: x))
    result = run_cli("convert", bf16_sources["gpt2"], tmp_path / "out", "--quiet", "--json", "-")
    assert result.exit_code == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["rounded_weights"]["tensors_not_matching"] == []
    assert any(failure.startswith("max |Δlogit|") for failure in report["failures"]), report["failures"]
    assert report["first_bad_layer"] == 0, report["per_layer"]  # the stream is off from the first layer on
    print(f"uncentred embeddings: max|Δ| {report['max_abs_logit_diff']:.3g} > tolerance {report['tolerances']['max_abs_logit_diff']:.3g}")
