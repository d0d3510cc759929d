"""What a verification measures (docs/report.md): logits on batches of prompts and how two sets of
them differ, greedy generations, the residual stream's mean, and non-finite weights."""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from .model_io import model_output
from .streaming import input_device, parameter_blocks

Batches = list[tuple[torch.Tensor, list[int | None]]]  # prompts.batched: (right-padded ids, lengths; None: every position)


def per_prompt(logits: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
    """One batch's logits split per prompt (its own positions only), on the CPU: float32 for any
    dtype up to float32 (exact), float64 for a float64 run."""
    kept = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return [(row if length is None else row[:length]).to("cpu", kept) for row, length in zip(logits, lengths)]


@torch.no_grad()
def batch_logits(model, batches: Batches, after_batch: Callable[[], None] = lambda: None) -> list[torch.Tensor]:
    """The model's logits on every prompt, in prompt order."""
    logits = []
    for ids, lengths in batches:
        logits += per_prompt(model_output(model, ids), lengths)
        after_batch()
    return logits


def compare_logits(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> dict:
    """max/mean |Δlogit|, max KL(reference ‖ candidate) and top-1 agreement over every position,
    computed in float64 one prompt at a time (a NaN anywhere stays NaN)."""
    max_abs = max_kl = torch.zeros((), dtype=torch.float64)
    sum_abs = torch.zeros((), dtype=torch.float64)
    agreeing = positions = count = 0
    for ref, cand in zip(reference, candidate):
        ref, cand = ref.to(torch.float64), cand.to(torch.float64)
        diff = (ref - cand).abs()
        log_p, log_q = torch.log_softmax(ref, dim=-1), torch.log_softmax(cand, dim=-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        max_abs = torch.maximum(max_abs, diff.max())
        max_kl = torch.maximum(max_kl, kl.max())
        sum_abs = sum_abs + diff.sum()
        count += diff.numel()
        agreeing += int((ref.argmax(-1) == cand.argmax(-1)).sum())
        positions += ref.shape[0]
    return {
        "max_abs_logit_diff": float(max_abs),
        "mean_abs_logit_diff": float(sum_abs / max(count, 1)),
        "max_kl_divergence": float(max_kl.clamp_min(0)),
        "top1_agreement": agreeing / max(positions, 1),
        "positions": positions,
    }


def logit_scale(logits: list[torch.Tensor]) -> float:
    """The largest |logit| of a run (a NaN stays NaN)."""
    return float(torch.stack([row.abs().max().to(torch.float64) for row in logits]).max()) if logits else 0.0


def top_two_margins(logits: list[torch.Tensor]) -> torch.Tensor:
    """Per position, how far the top logit is above the second (near ties may legitimately swap);
    infinite where there is one logit (a regression head's, num_labels=1): nothing to swap with."""
    margins = []
    for row in logits:
        row = row.to(torch.float64)
        if row.shape[-1] < 2:
            margins.append(torch.full(row.shape[:-1], math.inf, dtype=torch.float64))
        else:
            top = row.topk(2, dim=-1).values
            margins.append(top[..., 0] - top[..., 1])
    return torch.cat(margins)


def largest_kl_within(logits: list[torch.Tensor], delta: float) -> float:
    """The largest KL(reference ‖ candidate) that any candidate whose every logit is within ``delta``
    of the reference's can have, over the positions of ``logits`` (the reference's), in float64.

    With Δ = candidate − reference logits, KL = log E_p[e^Δ] − E_p[Δ], convex in Δ: over the box
    |Δ_i| ≤ δ its maximum is at a vertex, Δ_i = ±δ, where it is f(P) = log(P e^δ + (1−P) e^−δ) −
    δ(2P − 1), P the reference's probability on the +δ outputs. f is concave in P with its maximum at
    P* = (sinh δ / δ − e^−δ) / (2 sinh δ); a set of outputs either holds the top one (P ≥ p_max) or
    not (P ≤ 1 − p_max), so where P* falls between those, the maximum is at one of the two ends.
    Near one-hot distributions (p_max → 1) allow almost none; at most δ²/2 (Hoeffding's lemma)."""
    if not logits or delta == 0:
        return 0.0
    if not 0 < delta < math.inf:
        return float(delta)  # NaN stays NaN; an infinite bar allows any KL
    d = torch.tensor(float(delta), dtype=torch.float64)
    p_star = (torch.sinh(d) / d - torch.exp(-d)) / (2 * torch.sinh(d))

    def f(mass: torch.Tensor) -> torch.Tensor:
        return torch.logaddexp(torch.log(mass) + d, torch.log1p(-mass) - d) - d * (2 * mass - 1)

    largest = torch.zeros((), dtype=torch.float64)
    for row in logits:
        p_max = torch.softmax(row.to(torch.float64), dim=-1).amax(-1).clamp(0.5, 1.0)
        in_gap = (p_star > 1 - p_max) & (p_star < p_max)
        ends = torch.maximum(f(1 - p_max), f(p_max)).nan_to_num(0.0)  # p_max = 1: f(0) = f(1) = 0
        largest = torch.maximum(largest, torch.where(in_gap, ends, f(p_star)).max())
    return float(largest.clamp_min(0))


@torch.no_grad()
def greedy(model, prompt: torch.Tensor, new_tokens: int, pad_token_id: int) -> torch.Tensor:
    prompt = prompt.to(input_device(model))
    output = model.generate(
        prompt[None, :],
        attention_mask=torch.ones_like(prompt)[None, :],
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=pad_token_id,
    )
    return output[0, prompt.numel():].cpu()


def pad_id(model) -> int:
    generation = getattr(model, "generation_config", None)
    for candidate in (getattr(generation, "pad_token_id", None), getattr(generation, "eos_token_id", None)):
        if isinstance(candidate, list):
            candidate = candidate[0] if candidate else None
        if candidate is not None:
            return int(candidate)
    return 0


@torch.no_grad()
@contextmanager
def residual_mean_max(model) -> Iterator[list[float]]:
    """While the block runs, every forward pass of ``model`` appends the largest |mean(x)| / rms(x)
    over the tokens entering a converted norm (the residual stream); the caller takes the max of
    the list it is given. Measured during the comparison's own forward passes, so it costs none."""
    block = model.config.prenorm
    worst = [0.0]  # one entry per norm call

    def hook(_module, args):
        stream = args[0]
        padding = None
        if block["target"] == "crmsnorm":
            # compressed stream, docs/math.md "Pre-CRMSNorm": its implied last component is x_d = -Σ x̃.
            # Rebuild it in the stream's own dtype, as a full-width stream would hold it, and measure
            # the full vector like any other: what remains is that dtype's rounding. Zero padding
            # (--pad-to) must stay exactly zero; whatever it holds counts against the stream too.
            width = block["residual_width"]
            stream, padding = stream[..., :width], stream[..., width:]
            stream = torch.cat([stream, -stream.sum(-1, keepdim=True)], dim=-1)
        x = stream.to(torch.float64)
        mean = x.mean(-1).abs()
        rms = x.pow(2).mean(-1).sqrt().clamp_min(1e-30)
        if padding is not None and padding.shape[-1]:
            mean = torch.maximum(mean, padding.to(torch.float64).abs().amax(-1))
        worst.append(float((mean / rms).max()))  # NaN stays NaN: builtin max() would drop it

    handles = [model.get_submodule(path).register_forward_pre_hook(hook) for path in block["norms"]]
    try:
        yield worst
    finally:
        for handle in handles:
            handle.remove()


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def non_finite_parameters(model) -> list[str]:
    """Names of the parameters holding a NaN or an infinity (read from disk in blocks when offloaded)."""
    return [name for name, blocks in parameter_blocks(model) if not all(bool(torch.isfinite(block).all()) for block in blocks)]


def non_finite_failures(non_finite: dict[str, list[str]], measured: dict) -> list[str]:
    """Failure lines for non-finite weights or measurements: any of them fails the gate, whatever the
    thresholds (a NaN compares false against every limit)."""
    failures = []
    advice = {
        "original": "the original itself is broken: fix or re-download it",
        "converted": "with a finite original this is an overflow of the output dtype: convert with --dtype float32",
    }
    for side in ("original", "converted"):
        names = non_finite[side]
        if names:
            failures.append(f"{side.upper()} holds NaN or infinite values in {len(names)} tensor(s), e.g. {names[0]} ({advice[side]})")
    bad = [key for key, value in measured.items() if isinstance(value, float) and not math.isfinite(value)]
    if bad:
        failures.append(f"non-finite measurements ({', '.join(bad)}): the models' outputs hold NaN or infinite values")
    return failures
