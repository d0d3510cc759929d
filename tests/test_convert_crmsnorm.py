"""--target crmsnorm end to end, in depth (hidden states, save_pretrained, verify, inspect), for one family
of each structural kind: convert an on-disk checkpoint with the CLI, load it with transformers (remote
code), compare. Every family and layout also converts to crmsnorm in tests/test_family_conformance.py."""

from __future__ import annotations

import json

import pytest
import torch

import prenorm_convert
from conftest import run_cli
from equivalence import assert_equivalent, load, sample_ids
from prenorm_convert.examples import SHAPES, build_checkpoint
from prenorm_convert.modeling import restore_full_width
from prenorm_convert.spec_loader import load_specs

SPECS = {spec.family: spec for spec in load_specs()}
# Conv1D (gpt2), learned positions + projections (opt), a stem norm (bloom), parallel blocks (gpt_neox,
# falcon), inner norms (phi), a norm class of its own (cohere), norms without parameters (olmo)
KINDS = ["gpt2", "opt", "bloom", "gpt_neox", "falcon", "phi", "cohere", "olmo"]
FAMILIES = [family for family in KINDS if family in SHAPES and family in SPECS]
# variants beyond the family's default shape: (case id, family, config overrides)
VARIANTS = [(family, family, {}) for family in FAMILIES]
if "opt" in SPECS:  # project_in writes and project_out reads the stream; the head keeps its tie
    VARIANTS.append(("opt-projected", "opt", {"word_embed_proj_dim": 32}))
CASE_IDS = [case for case, _, _ in VARIANTS]


@pytest.fixture(scope="module")
def crmsnorm_case(tmp_path_factory):
    """case id -> (source folder, converted folder, hidden size); each built and converted once."""
    cache = {}

    def get(case: str):
        if case not in cache:
            _, family, overrides = next(variant for variant in VARIANTS if variant[0] == case)
            root = tmp_path_factory.mktemp(f"crmsnorm-{case}")
            model = build_checkpoint(root / "original", family, seed=11, overrides=overrides)
            out = root / "converted"
            result = run_cli(
                "convert", root / "original", out, "--target", "crmsnorm", "--quiet", "--max-shard-size", "200KB",
                "--json", root / "report.json",
            )
            assert result.exit_code == 0, result.stderr
            hidden = SPECS[family].hidden_size(model.config.to_dict())
            cache[case] = (root / "original", out, hidden)
        return cache[case]

    return get


@pytest.mark.parametrize("case", CASE_IDS)
def test_crmsnorm_checkpoint_matches_original(crmsnorm_case, case):
    src, out, d = crmsnorm_case(case)
    compared = assert_equivalent(src, out, remote=True)  # logits, greedy 32, uncached, left-padded
    converted = compared["converted"]
    config = json.loads((out / "config.json").read_text())
    block = config["prenorm"]
    assert {type(converted.get_submodule(path)).__name__ for path in block["norms"]} == {"PrenormCRMSNorm"}

    def other_norms(model) -> set[str]:
        return {name for name, m in model.named_modules() if "Norm" in type(m).__name__ and type(m).__name__ != "PrenormCRMSNorm"}

    assert other_norms(converted) == other_norms(compared["original"]) - set(block["norms"]) - set(block["removed"]), (
        "every stream norm is a CRMSNorm; only inner norms stay as they were"
    )
    assert block["target"] == "crmsnorm" and block["hidden_size"] == d and block["residual_width"] == d - 1
    assert block["requires_remote_code"] and config["model_type"].startswith("prenorm_")
    assert converted.config.hidden_size == d, "attention keeps hidden_size: heads split the same way"
    parameters = dict(converted.named_parameters())
    assert block["resized"], "the d-1 wide stream changes tensor shapes"
    for name, shape in block["resized"].items():
        assert list(parameters[name].shape) == shape, name
    report = json.loads((src.parent / "report.json").read_text())
    assert report["passed"] and report["target"] == "crmsnorm" and report["greedy_match"]["identical"]
    assert report["relative_max_abs_logit_diff"] <= 1e-5 and report["top1_agreement"] == 1.0
    assert 0 < report["residual_mean_max"] < 1e-5, "measured on the rebuilt full-width stream, not assumed"


@pytest.mark.parametrize("family", FAMILIES)
def test_input_embedding_is_d_minus_1_wide(crmsnorm_case, family):
    src, out, d = crmsnorm_case(family)
    model = load(out, remote=True)
    assert model.get_input_embeddings().weight.shape[1] == d - 1
    assert load(src, remote=False).get_input_embeddings().weight.shape[1] == d


@pytest.mark.parametrize("case", CASE_IDS)
def test_hidden_states_are_the_original_centered_stream_minus_its_last_feature(crmsnorm_case, case):
    src, out, d = crmsnorm_case(case)
    original, converted = load(src, remote=False), load(out, remote=True)
    ids = sample_ids(original.config.vocab_size, batch=2, length=9)
    with torch.no_grad():
        expected = original(ids, output_hidden_states=True).hidden_states
        actual = converted(ids, output_hidden_states=True).hidden_states
    assert len(actual) == len(expected)
    # every entry but the last (which comes after the final norm) is the residual stream
    for stream, reference in zip(actual[:-1], expected[:-1]):
        assert stream.shape[-1] == d - 1
        centered = reference.double() - reference.double().mean(-1, keepdim=True)
        scale = float(centered.abs().max())
        assert float((restore_full_width(stream.double()) - centered).abs().max()) <= 1e-5 * scale


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_round_trip(crmsnorm_case, family, tmp_path):
    _, out, d = crmsnorm_case(family)
    model = prenorm_convert.load_converted(out)
    model.save_pretrained(str(tmp_path / "again"))
    again = load(tmp_path / "again", remote=True)
    assert again.config.prenorm == model.config.prenorm
    assert again.get_input_embeddings().weight.shape[1] == d - 1
    ids = sample_ids(model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_verify_cli_reports_every_metric(crmsnorm_case, family):
    src, out, _ = crmsnorm_case(family)
    result = run_cli("verify", src, out, "--quiet", "--json", "-")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    for key in ("max_abs_logit_diff", "mean_abs_logit_diff", "max_kl_divergence", "top1_agreement", "greedy_match",
                "residual_mean_max", "params_original", "params_converted", "dtype", "tolerances", "passed"):
        assert key in report, key
    assert report["passed"] and report["target"] == "crmsnorm"
    assert 0 < report["residual_mean_max"] < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_inspect_shows_the_width_change(crmsnorm_case, family):
    src, _, d = crmsnorm_case(family)
    result = run_cli("inspect", src, "--target", "crmsnorm", "--json")
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["hidden_size"] == d and info["residual_width"] == d - 1
    assert info["tensors_resized"] > 0 and info["requires_remote_code"] and info["fold_affine"]
    assert any(f"from {d} to {d - 1}" in note for note in info["notes"])
    text = run_cli("inspect", src, "--target", "crmsnorm")
    assert text.exit_code == 0 and "residual width" in text.stdout and str(d - 1) in text.stdout
    assert "merge last input column" in text.stdout and "drop last output" in text.stdout


def test_bfloat16_crmsnorm_adds_no_error_beyond_the_dtype(crmsnorm_case, tmp_path):
    src, _, d = crmsnorm_case(FAMILIES[0])
    out = tmp_path / "bf16"
    result = run_cli("convert", src, out, "--target", "crmsnorm", "--dtype", "bfloat16", "--quiet", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    own = report["original_in_dtype"]
    assert report["dtype"] == "bfloat16" and report["passed"]
    assert report["max_abs_logit_diff"] <= 1.5 * own["max_abs_logit_diff"]
    model = load(out, remote=True, dtype=torch.bfloat16)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.get_input_embeddings().weight.shape[1] == d - 1


@pytest.mark.skipif("bloom" not in SPECS, reason="no BLOOM spec")
def test_code_that_assumes_the_full_width_is_refused_before_writing(tmp_path):
    """BLOOM's pretraining_tp>1 + slow_but_exact attention accumulates into a hidden_size-wide zeros_like."""
    src = tmp_path / "bloom-tp"
    build_checkpoint(src, "bloom", seed=3, overrides={"pretraining_tp": 2, "slow_but_exact": True}, tokenizer=False)
    result = run_cli("convert", src, tmp_path / "out", "--target", "crmsnorm", "--quiet")
    assert result.exit_code == 2
    assert "residual stream" in result.stderr and "--target rmsnorm" in result.stderr
    assert not (tmp_path / "out").exists()
    assert run_cli("convert", src, tmp_path / "rms", "--quiet", "--no-verify").exit_code == 0


@pytest.mark.parametrize("multiple, width", [(8, 64), (48, 96)], ids=["pad-to-d", "pad-past-d"])
def test_pad_to_stores_an_aligned_stream_with_the_same_function(crmsnorm_case, tmp_path, multiple, width):
    src, _, d = crmsnorm_case(FAMILIES[0])
    out = tmp_path / "padded"
    result = run_cli("convert", src, out, "--target", "crmsnorm", "--pad-to", multiple, "--quiet", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.stderr
    compared = assert_equivalent(src, out, remote=True)
    model = compared["converted"]
    block = model.config.prenorm
    assert block["residual_width"] == d - 1 and block["stream_width"] == width and block["pad_to"] == multiple
    table = model.get_input_embeddings().weight
    assert table.shape[1] == width and not table[:, d - 1:].any(), "padding features are zero"
    ids = sample_ids(model.config.vocab_size, batch=2, length=7)
    with torch.no_grad():
        streams = model(ids, output_hidden_states=True).hidden_states[:-1]
    assert all(s.shape[-1] == width and not s[..., d - 1:].any() for s in streams), "the padding stays zero"
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] and report["residual_mean_max"] < 1e-5
    info = json.loads(run_cli("inspect", src, "--target", "crmsnorm", "--pad-to", multiple, "--json").stdout)
    assert info["stream_width"] == width and any(f"zero-padded to {width}" in note for note in info["notes"])


def test_pad_to_needs_the_crmsnorm_target(crmsnorm_case, tmp_path):
    src, _, _ = crmsnorm_case(FAMILIES[0])
    result = run_cli("convert", src, tmp_path / "out", "--pad-to", "64", "--quiet")
    assert result.exit_code == 2 and "--pad-to needs --target crmsnorm" in result.stderr
    assert not (tmp_path / "out").exists()
