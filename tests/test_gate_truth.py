"""The gate never lies: non-finite weights or measurements always fail (exit 1) and are named, reports
are strict JSON, and the float32 tolerance follows the measured float32 error of the original itself,
so a wide prompt set passes a correct conversion while a wrong rewrite still fails."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_cli


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, as jq, JavaScript and most parsers do."""

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def with_tensor(src, tmp_path, name_part: str, edit) -> tuple:
    """A copy of ``src`` whose first tensor with ``name_part`` in its name is edited in place: (folder, name)."""
    folder = tmp_path / "src"
    shutil.copytree(src, folder)
    for shard in sorted(folder.glob("*.safetensors")):
        tensors = load_file(shard)
        names = [name for name in tensors if name_part in name]
        if names:
            edit(tensors[names[0]])
            save_file(tensors, shard, metadata={"format": "pt"})
            return folder, names[0]
    raise AssertionError(f"no tensor named like {name_part}")


@pytest.fixture(scope="module")
def nan_source(gpt2_dir, tmp_path_factory):
    def poison(tensor):
        tensor[0, 0] = float("nan")

    return with_tensor(gpt2_dir, tmp_path_factory.mktemp("nan"), "mlp.c_fc.weight", poison)


@pytest.mark.parametrize("thresholds", [(), ("--max-abs-logit-diff", "1e3", "--max-kl", "1e3", "--min-top1", "0")])
def test_a_nan_weight_fails_the_gate_by_name_even_with_loose_thresholds(nan_source, tmp_path, thresholds):
    src, poisoned = nan_source
    out = tmp_path / "out"
    result = run_cli("convert", src, out, "--quiet", "--json", "-", *thresholds)
    assert result.exit_code == 1, result.stderr
    report = strict_json(result.stdout)
    assert report["passed"] is False
    assert poisoned in report["non_finite_tensors"]["original"]
    assert report["non_finite_tensors"]["converted"], "the NaN spreads into the rewritten tensors"
    message = " ".join(result.stderr.split())
    assert f"ORIGINAL holds NaN or infinite values in 1 tensor(s), e.g. {poisoned}" in message
    assert "non-finite measurements" in message and "max_abs_logit_diff" in message
    assert report["max_abs_logit_diff"] is None, "non-finite numbers are written as null"
    strict_json((out / "conversion_report.json").read_text())
    # verify says the same, and push refuses the folder
    verify = run_cli("verify", src, out, "--quiet", "--json", "-", *thresholds)
    assert verify.exit_code == 1 and strict_json(verify.stdout)["passed"] is False
    push = run_cli("push", out, "me/nan-model", "--quiet")
    assert push.exit_code == 2 and "did not pass verification" in push.stderr


def test_an_overflow_of_the_output_dtype_fails_and_names_the_converted_tensor(gpt2_dir, tmp_path):
    def huge(tensor):
        # finite in float32, beyond float16's largest value (65504); zero-mean, so centering keeps it
        tensor[0, 0::2] = 7e4
        tensor[0, 1::2] = -7e4

    src, name = with_tensor(gpt2_dir, tmp_path, "mlp.c_proj.weight", huge)
    result = run_cli("convert", src, tmp_path / "out", "--quiet", "--dtype", "float16", "--json", "-")
    assert result.exit_code == 1, result.stderr
    report = strict_json(result.stdout)
    assert report["non_finite_tensors"]["original"] == []
    assert name in report["non_finite_tensors"]["converted"]
    assert "CONVERTED holds NaN or infinite values" in " ".join(result.stderr.split())


def test_json_output_never_holds_bare_nan():
    from prenorm_convert.jsonout import dumps

    text = dumps({"a": float("nan"), "b": [float("inf"), 1.5], "c": {"d": -math.inf}})
    assert strict_json(text) == {"a": None, "b": [None, 1.5], "c": {"d": None}}


@pytest.fixture(scope="module")
def converted_gpt2(gpt2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gate32") / "out"
    assert run_cli("convert", gpt2_dir, out, "--quiet", "--no-verify").exit_code == 0
    return out


def test_float32_tolerance_follows_the_originals_own_error_on_a_wide_prompt_set(gpt2_dir, converted_gpt2, tmp_path):
    words = "the quick brown fox jumps over lazy dog def return SELECT FROM 1905 physics village sea".split()
    generator = torch.Generator().manual_seed(3)
    lines = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (20,), generator=generator)) for _ in range(300)]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(lines) + "\n")
    result = run_cli("verify", gpt2_dir, converted_gpt2, "--quiet", "--prompts", prompts, "--greedy-tokens", "4", "--json", "-")
    assert result.exit_code == 0, result.stderr
    report = strict_json(result.stdout)
    own = report["original_float32_error"]
    assert report["prompts"] == 300 and own["positions"] == report["positions"]
    assert 0 < own["max_abs_logit_diff"] < 1e-4 * report["logit_scale"], "float32 noise, measured against float64"
    expected = max(1e-5 * report["logit_scale"], 1.5 * 2 * own["max_abs_logit_diff"])
    assert report["tolerances"]["max_abs_logit_diff"] == pytest.approx(expected)
    assert report["max_abs_logit_diff"] <= report["tolerances"]["max_abs_logit_diff"]
    print(
        f"300 prompts: converted max|Δ| {report['max_abs_logit_diff']:.3g}, original float32 vs float64 "
        f"{own['max_abs_logit_diff']:.3g}, tolerance {report['tolerances']['max_abs_logit_diff']:.3g}"
    )


def test_a_wrong_rewrite_still_fails_the_float32_gate(gpt2_dir, tmp_path, monkeypatch):
    from dataclasses import replace

    from prenorm_convert import transform

    monkeypatch.setitem(transform.STEPS, "center_rows", replace(transform.STEPS["center_rows"], fn=lambda x: x))  # embeddings left uncentred
    result = run_cli("convert", gpt2_dir, tmp_path / "out", "--quiet", "--json", "-")
    assert result.exit_code == 1, result.stderr
    report = strict_json(result.stdout)
    assert report["max_abs_logit_diff"] > 100 * report["tolerances"]["max_abs_logit_diff"]
    assert any(failure.startswith("max |Δlogit|") for failure in report["failures"])


def test_top1_may_differ_only_at_near_ties():
    from prenorm_convert.tolerances import Tolerances

    limits = Tolerances().resolve(
        torch.float32, 10.0, None, float32_error={"max_abs_logit_diff": 1e-4, "max_kl_divergence": 1e-12}, near_tie_fraction=lambda gap: 0.01 if gap >= 6e-4 else 0.0
    )
    assert limits["max_abs_logit_diff"] == pytest.approx(3e-4)
    assert limits["min_top1"] == pytest.approx(0.99)
    assert limits["max_kl"] == 1e-6


def test_a_single_logit_has_no_near_tie():
    """A regression head (num_labels=1) gives one logit per row: no second one it could swap with."""
    from prenorm_convert.metrics import top_two_margins

    margins = top_two_margins([torch.tensor([[0.5]]), torch.tensor([[3.0, 1.0, 2.5]])])
    assert margins[0] == math.inf and margins[1].item() == pytest.approx(0.5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_reduced_dtype_kl_bar_is_never_stricter_than_the_float32_one(dtype):
    # a near one-hot next-token distribution (logits thousands apart) makes every KL noise, ~1e-8
    # nats or far less: 1.5x the original's own noise failed correct conversions (max |Δlogit| within its bar)
    from prenorm_convert.tolerances import FLOAT32_KL_FLOOR, Tolerances

    own = {"max_abs_logit_diff": 3.4, "max_kl_divergence": 8e-9, "top1_agreement": 1.0}
    rounded = {"max_abs_logit_diff": 0.6, "max_kl_divergence": 5e-14, "top1_agreement": 1.0}
    limits = Tolerances().resolve(dtype, 3750.0, own, rounded)
    assert limits["max_kl"] == FLOAT32_KL_FLOOR == 1e-6
    assert limits["max_abs_logit_diff"] == pytest.approx(1.5 * 4.0), "the |Δlogit| bar is unchanged"
    assert Tolerances().resolve(dtype, 10.0, {**own, "max_kl_divergence": 1e-4}, rounded)["max_kl"] > 1e-4


@pytest.mark.parametrize("classes", [2, 3, 8])
@pytest.mark.parametrize("scale", [0.1, 3.0, 40.0], ids=["flat", "spread", "peaked"])
def test_the_largest_kl_within_a_logit_bar_bounds_every_candidate_and_is_reached(classes, scale):
    """float64: no candidate whose logits are all within δ of the reference's has a larger KL than
    largest_kl_within(δ) (every ±δ vertex tried, the maximum of a convex function over the box, and
    random points inside it), which is never above Hoeffding's δ²/2. With a few outputs the sets of
    outputs cannot hold every probability the bound allows for; with more, the best vertex comes
    within 5% of it."""
    import itertools

    from prenorm_convert.metrics import compare_logits, largest_kl_within

    generator = torch.Generator().manual_seed(classes)
    reference = torch.randn(12, classes, generator=generator, dtype=torch.float64) * scale
    for delta in (1e-3, 0.2, 3.0):
        bound = largest_kl_within([reference], delta)
        vertices = [compare_logits([reference], [reference + delta * torch.tensor(signs, dtype=torch.float64)])["max_kl_divergence"]
                    for signs in itertools.product((-1.0, 1.0), repeat=classes)]
        inside = [compare_logits([reference], [reference + delta * (2 * torch.rand(reference.shape, generator=generator, dtype=torch.float64) - 1)])["max_kl_divergence"]
                  for _ in range(10)]
        slack = 1e-6 * bound + 1e-15  # compare_logits' own float64 rounding of a KL of 1e-9
        assert max(vertices + inside) <= bound + slack and bound <= delta * delta / 2 * (1 + 1e-12)
        if classes >= 8:
            assert max(vertices) >= 0.95 * bound, (delta, max(vertices), bound)


def test_near_one_hot_outputs_allow_almost_no_kl_and_a_nan_bar_stays_nan():
    from prenorm_convert.metrics import largest_kl_within

    one_hot = torch.tensor([[0.0, 3000.0, -200.0]], dtype=torch.float64)
    assert largest_kl_within([one_hot], 6.0) == 0.0 and largest_kl_within([one_hot], 0.0) == 0.0
    assert math.isnan(largest_kl_within([one_hot], math.nan))


def test_a_reduced_dtype_kl_bar_allows_what_logits_within_the_logit_bar_can_give():
    """Found by scripts/sweep_unseen_configs.py on a correct bf16 Dinov2ForImageClassification with
    trained-like weights (3 labels, 4 images): the original's own bf16 error was mostly a shift of the
    logits (max |Δ| 3.1e-3, max KL 2.9e-7), the converted model's was not (max |Δ| 4.0e-3, within
    its 5.6e-3 bar; max KL 2.67e-6), and 2.25 x the cost's KL (1.16e-6) failed it. Logits within
    the |Δlogit| bar can give up to largest_kl_within(bar): the KL bar is never below that."""
    from prenorm_convert.metrics import largest_kl_within
    from prenorm_convert.tolerances import Tolerances

    own = {"max_abs_logit_diff": 3.1e-3, "max_kl_divergence": 2.9e-7, "top1_agreement": 1.0}
    rounded = {"max_abs_logit_diff": 6.1e-4, "max_kl_divergence": 3.2e-8, "top1_agreement": 1.0}
    reference = [torch.tensor([[0.9, -0.4, 1.9], [1.2, 0.3, -0.8]], dtype=torch.float64)]  # a 3-label classifier's scale
    limits = Tolerances().resolve(torch.bfloat16, 2.0, own, rounded, largest_kl_within=lambda delta: largest_kl_within(reference, delta))
    bar = 1.5 * (3.1e-3 + 6.1e-4)
    assert limits["max_abs_logit_diff"] == pytest.approx(bar), "the |Δlogit| bar is unchanged"
    assert limits["max_kl"] == pytest.approx(largest_kl_within(reference, bar)) and limits["max_kl"] > 2.67e-6
    assert Tolerances(max_kl=1e-6).resolve(torch.bfloat16, 2.0, own, rounded, largest_kl_within=lambda delta: 1.0)["max_kl"] == 1e-6


def test_kl_bars_square_the_logit_margin():
    """KL is quadratic in small logit differences: the 1.5x margin on |Δlogit| is 1.5² on KL."""
    from prenorm_convert.tolerances import Tolerances

    own = {"max_abs_logit_diff": 0.05, "max_kl_divergence": 1e-4, "top1_agreement": 1.0}
    rounded = {"max_abs_logit_diff": 0.01, "max_kl_divergence": 1e-6, "top1_agreement": 1.0}
    limits = Tolerances().resolve(torch.bfloat16, 10.0, own, rounded)
    assert limits["max_abs_logit_diff"] == pytest.approx(1.5 * 0.06)
    assert limits["max_kl"] == pytest.approx(1.5**2 * (1e-2 + 1e-3) ** 2)
    float32_own = {"max_abs_logit_diff": 1e-4, "max_kl_divergence": 1e-5, "top1_agreement": 1.0}
    limits = Tolerances().resolve(torch.float32, 10.0, None, None, float32_own, lambda gap: 0.0)
    assert limits["max_kl"] == pytest.approx(1.5**2 * 4 * 1e-5)
