"""Pass criteria of a verification (docs/report.md "Default tolerances"): what a float32 comparison
may differ by, what a reduced dtype may cost, and the one line a failed report is summed up in."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import BadInputError

# how much worse than the original's own reduced-precision error the converted model may be
REDUCED_DTYPE_ERROR_RATIO = 1.5
# the same margin for KL divergences, which grow with the square of small logit differences: logits
# within 1.5x of an error give a KL within 1.5² of that error's
KL_MARGIN = REDUCED_DTYPE_ERROR_RATIO**2
REDUCED_DTYPE_TOP1_SLACK = 0.05
# a reduced dtype's per-layer audit (reduced_layer_tolerance): the converted model's layer carries the
# dtype's rounding of its activations, as the original run in that dtype does, and that of its
# rewritten weights, which the original's stored weights never had: twice the original's own error
# at that layer, with the margin; and never less than a few units of the dtype's resolution at the
# layer's largest value, where two correct models that round differently differ by an ulp or two
# whatever the original's own error there happened to be
LAYER_OWN_ERROR_MARGIN = REDUCED_DTYPE_ERROR_RATIO * 2
LAYER_RESOLUTION_ULPS = 3
# float32: the bar never drops below this fraction of the logit scale, nor a KL of FLOAT32_KL_FLOOR
# (nor does a reduced dtype's KL bar)
FLOAT32_RELATIVE_FLOOR = 1e-5
FLOAT32_KL_FLOOR = 1e-6


@dataclass
class Tolerances:
    """Pass criteria. None means 'derive from the dtype' (see resolve)."""

    max_abs_logit_diff: float | None = None
    max_kl: float | None = None
    min_top1: float | None = None
    greedy_tokens: int = 32
    require_greedy_match: bool | None = None

    def __post_init__(self):
        # checked when built (before any conversion work), so a bad threshold is a usage error: exit 2
        for name in ("max_abs_logit_diff", "max_kl"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise BadInputError(f"--{name.replace('_', '-')} must be 0 or more, got {value}")
        if self.min_top1 is not None and not 0 <= self.min_top1 <= 1:
            raise BadInputError(f"--min-top1 is a fraction of positions, between 0 and 1, got {self.min_top1}")
        if self.greedy_tokens < 0:
            raise BadInputError(f"--greedy-tokens must be 0 (no generation compared) or more, got {self.greedy_tokens}")

    def resolve(
        self,
        dtype: torch.dtype,
        logit_scale: float,
        original_error: dict | None,
        weights_error: dict | None = None,
        float32_error: dict | None = None,
        near_tie_fraction=None,
        largest_kl_within=None,
    ) -> dict:
        """The limits applied (docs/report.md, "Default tolerances"). float32: ``float32_error`` is the
        original's own float32 run against its float64 self, and ``near_tie_fraction(gap)`` the share
        of positions whose reference top two logits are within ``gap``. A reduced dtype:
        ``largest_kl_within(δ)`` the largest KL any logits within δ of the reference's can have."""
        if dtype == torch.float32 or dtype == torch.float64:
            return self._resolve_float32(logit_scale, float32_error, near_tie_fraction)
        assert original_error is not None
        dtype_cost = dtype_cost_of(original_error, weights_error)
        max_abs = self.max_abs_logit_diff
        if max_abs is None:
            max_abs = REDUCED_DTYPE_ERROR_RATIO * dtype_cost["max_abs_logit_diff"]
        return {
            "max_abs_logit_diff": max_abs,
            "max_kl": self.max_kl if self.max_kl is not None else _reduced_dtype_kl_bar(dtype_cost, max_abs, largest_kl_within),
            "min_top1": self.min_top1 if self.min_top1 is not None else dtype_cost["top1_agreement"] - REDUCED_DTYPE_TOP1_SLACK,
            "require_greedy_match": False if self.require_greedy_match is None else self.require_greedy_match,
            "basis": f"{dtype_name(dtype)}: no more than {REDUCED_DTYPE_ERROR_RATIO}x what the dtype costs: the original "
            f"model's own {dtype_name(dtype)} error against its float32 self, plus what rounding the rewritten tensors "
            f"to {dtype_name(dtype)} costs (rounded_weights); {KL_MARGIN:g}x for KL, which is quadratic in logit differences, "
            "and never below the largest KL that logits within the |Δlogit| bar can give on these positions",
        }

    def _resolve_float32(self, logit_scale: float, float32_error: dict | None, near_tie_fraction) -> dict:
        # two float32 models each carry about the original's own float32 rounding error, which grows
        # with the prompts compared: the bar is their sum with the reduced-dtype margin, and never
        # below FLOAT32_RELATIVE_FLOOR x the logit scale (docs/report.md, "Default tolerances")
        own_abs = _finite_or_zero(float32_error["max_abs_logit_diff"]) if float32_error else 0.0
        own_kl = _finite_or_zero(float32_error["max_kl_divergence"]) if float32_error else 0.0
        max_abs = self.max_abs_logit_diff
        if max_abs is None:
            max_abs = max(FLOAT32_RELATIVE_FLOOR * logit_scale, REDUCED_DTYPE_ERROR_RATIO * 2 * own_abs)
        min_top1 = self.min_top1
        if min_top1 is None:
            # logits that all move by at most max_abs can swap the top token only where the top two
            # were within 2 x max_abs: those positions may disagree, no other
            min_top1 = 1.0 - (near_tie_fraction(2 * max_abs) if near_tie_fraction is not None else 0.0)
        return {
            "max_abs_logit_diff": max_abs,
            "max_kl": self.max_kl if self.max_kl is not None else max(FLOAT32_KL_FLOOR, KL_MARGIN * 4 * own_kl),
            "min_top1": min_top1,
            "require_greedy_match": True if self.require_greedy_match is None else self.require_greedy_match,
            "basis": f"float32: max |Δlogit| within the larger of {FLOAT32_RELATIVE_FLOOR:g} of the logit scale and "
            f"{REDUCED_DTYPE_ERROR_RATIO}x the float32 error of two models, each the original's own against its "
            "float64 self (original_float32_error); the top token may differ only where the reference's top two "
            "logits are closer than twice that",
        }


def _reduced_dtype_kl_bar(dtype_cost: dict, max_abs: float, largest_kl_within) -> float:
    """KL is quadratic in small logit differences: the margin on |Δlogit| is squared for it. Never
    stricter than the float32 bar: on near one-hot distributions every KL is noise far below it, and
    the ratio of two such noises says nothing about the rewrite. Nor than the largest KL that logits
    within the |Δlogit| bar can give on these positions: the original's own error can be mostly a
    shift of every logit, which softmax ignores, and a correct conversion's rounding need not be one
    (docs/report.md "Default tolerances")."""
    bar = _floored(KL_MARGIN * dtype_cost["max_kl_divergence"], FLOAT32_KL_FLOOR)
    return _floored(bar, largest_kl_within(max_abs)) if largest_kl_within is not None else bar


def reduced_layer_tolerance(dtype: torch.dtype, original_error: float) -> float:
    """The bound on a layer's relative error in a reduced dtype, from the original's own error at
    that layer in the dtype (docs/report.md "Per-layer audit")."""
    return max(LAYER_OWN_ERROR_MARGIN * original_error, LAYER_RESOLUTION_ULPS * torch.finfo(dtype).eps)


def dtype_cost_of(original_error: dict, weights_error: dict | None) -> dict:
    """The error a reduced dtype costs a converted model: the original's own error in that dtype, plus
    the cost of rounding the rewritten tensors (which the original never had to round), combined
    as independent errors add at worst: logit differences add, the square roots of KL divergences
    add (KL is quadratic in small logit differences), and so do the disagreeing positions."""
    if weights_error is None:
        return original_error
    return {
        "max_abs_logit_diff": original_error["max_abs_logit_diff"] + weights_error["max_abs_logit_diff"],
        "max_kl_divergence": (original_error["max_kl_divergence"] ** 0.5 + weights_error["max_kl_divergence"] ** 0.5) ** 2,
        "top1_agreement": original_error["top1_agreement"] + weights_error["top1_agreement"] - 1,
    }


def _floored(value: float, floor: float) -> float:
    """max(value, floor), except that a NaN stays NaN (a non-finite measurement shows in the bar)."""
    return value if math.isnan(value) else max(value, floor)


def _finite_or_zero(value: float) -> float:
    return value if math.isfinite(value) else 0.0


def failure_message(report: dict) -> str:
    """The one line a failed report is summed up in (CLI and VerificationFailed), naming the first
    layer whose output departs from the original's (and its worst writer) when the audit found one."""
    where = ""
    if report.get("first_bad_layer") is not None:
        writer = f", worst writer {report['first_bad_writer']}" if report.get("first_bad_writer") else ""
        where = f" (first layer off: {report['first_bad_layer']}{writer})"
    return "verification failed: " + "; ".join(report["failures"]) + where


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


