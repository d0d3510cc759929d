"""Pure tensor rewrites (MATH.md). Callers pass float64 tensors; nothing here knows a model family.

Layouts: "linear" weights are [out, in] (nn.Linear); "conv1d" weights are [in, out]
(transformers' Conv1D). Every function is a registered step that a plan entry names.
"""

from __future__ import annotations

from typing import Callable

import torch

STEPS: dict[str, Callable[..., torch.Tensor]] = {}


def step(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    STEPS[fn.__name__] = fn
    return fn


def _out_axis(layout: str) -> int:
    """Axis of a weight that indexes output features."""
    return 0 if layout == "linear" else 1


def _in_axis(layout: str) -> int:
    return 1 - _out_axis(layout)


@step
def identity(x: torch.Tensor) -> torch.Tensor:
    return x


# -- Roles: embedding and writer recentering ("Roles a tensor can have") ------------------


@step
def center_rows(x: torch.Tensor) -> torch.Tensor:
    """Embedding table [V, d] (or any [..., d]): every row gets zero mean."""
    return x - x.mean(dim=-1, keepdim=True)


@step
def center_writer_weight(weight: torch.Tensor, layout: str) -> torch.Tensor:
    """Writer weight: every output column zero-mean over the d output features."""
    return weight - weight.mean(dim=_out_axis(layout), keepdim=True)


@step
def center_vector(x: torch.Tensor) -> torch.Tensor:
    """Writer bias."""
    return x - x.mean()


# -- Folding the affine ("Folding the affine") ------------------------------------------------


@step
def fold_gamma(weight: torch.Tensor, gamma: torch.Tensor, layout: str) -> torch.Tensor:
    """Reader weight W·diag(γ) — scale each input feature."""
    return weight * (gamma[None, :] if layout == "linear" else gamma[:, None])


@step
def fold_beta(weight: torch.Tensor, beta: torch.Tensor, layout: str, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reader bias b + W β (uses the weight before γ is folded in). A missing bias counts as 0.

    Linear: one dot product per weight row, summed row by row rather than by a matrix-vector
    product, whose rounding may depend on how many rows it is given; so a block of rows gives
    bit-for-bit the rows of the whole (row_blocks.py)."""
    shifted = (weight * beta).sum(dim=-1) if layout == "linear" else beta @ weight
    return shifted if bias is None else bias + shifted


# -- Stem norms ("norm on the main branch itself") ---------------------------------------------


@step
def bake_layernorm(table: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> torch.Tensor:
    """Apply a LayerNorm to every row of an embedding table (the norm depends only on the token id)."""
    return torch.nn.functional.layer_norm(table, (table.shape[-1],), gamma, beta, eps)


# -- Pre-CRMSNorm ("Pre-CRMSNorm: lossless compression to d−1") --------------------------------


@step
def drop_last_feature(x: torch.Tensor) -> torch.Tensor:
    """Embedding [V, d] -> [V, d-1]; writer bias [d] -> [d-1]."""
    return x[..., :-1]


@step
def drop_last_output(weight: torch.Tensor, layout: str) -> torch.Tensor:
    """Writer weight: drop the last output feature."""
    return weight[:-1, :] if layout == "linear" else weight[:, :-1]


@step
def merge_last_input(weight: torch.Tensor, layout: str) -> torch.Tensor:
    """Reader weight: x_d = -Σ x̃, so W[:, :d-1] - W[:, d-1:] reads x̃ exactly."""
    if layout == "linear":
        return weight[:, :-1] - weight[:, -1:]
    return weight[:-1, :] - weight[-1:, :]


# -- Pre-CRMSNorm zero padding (--pad-to): the d-1 wide stream stored in an aligned width ---------


def _zero_pad(x: torch.Tensor, axis: int, width: int) -> torch.Tensor:
    """Append zeros along ``axis`` up to ``width``."""
    pad = [0, 0] * (x.ndim - 1 - axis % x.ndim) + [0, width - x.shape[axis]]
    return torch.nn.functional.pad(x, pad)


@step
def zero_pad_feature(x: torch.Tensor, width: int) -> torch.Tensor:
    """Embedding [V, d-1] or writer bias [d-1] -> zero features up to ``width``."""
    return _zero_pad(x, -1, width)


@step
def zero_pad_output(weight: torch.Tensor, layout: str, width: int) -> torch.Tensor:
    """Writer weight: zero output features up to ``width``, so the padding of the stream stays zero."""
    return _zero_pad(weight, _out_axis(layout), width)


@step
def zero_pad_input(weight: torch.Tensor, layout: str, width: int) -> torch.Tensor:
    """Reader weight: zero input columns for the padding, so it is never read."""
    return _zero_pad(weight, _in_axis(layout), width)
