"""Pure tensor rewrites (docs/math.md). Callers pass float64 tensors; nothing here knows a model family.

Layouts: "linear" weights are [out, in] (nn.Linear); "conv1d" weights are [in, out]
(transformers' Conv1D). Every function is a registered step that a plan entry names.

``STEPS`` is the one registry of steps: each entry carries the function, the words ``inspect``
prints for it, its row rule (row_blocks.py: which inputs a block of rows may be cut from) and
whether a spec may name it as a stem-norm hook. ``apply_steps`` is the one executor of a plan
entry's steps: on float64 tensors for a conversion, on meta tensors for the planned shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

# (step parameters, number of dims of the first input) -> the inputs sliced by rows, or None
RowRule = Callable[[dict, int], "tuple[str, ...] | None"]


@dataclass(frozen=True)
class Step:
    name: str
    fn: Callable[..., torch.Tensor]
    words: str | None  # what `inspect` says the step does; None: it changes nothing
    rows: RowRule | None = None  # None: never row-wise (the step runs on whole tensors)
    stem_hook: bool = False  # a spec's stem_norms[].hook may name it


STEPS: dict[str, Step] = {}


def step(words: str | None, rows: RowRule | None = None, stem_hook: bool = False):
    """Register the decorated function as the step of its name."""

    def register(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        STEPS[fn.__name__] = Step(fn.__name__, fn, words, rows, stem_hook)
        return fn

    return register


def stem_hooks() -> tuple[str, ...]:
    """The steps a spec may name as the hook of a stem norm."""
    return tuple(name for name, entry in STEPS.items() if entry.stem_hook)


def apply_steps(steps, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Run a plan entry's steps: the first takes the named inputs, each later one the previous result."""
    value = None
    for index, (name, params) in enumerate(steps):
        fn = STEPS[name].fn
        value = fn(**inputs, **params) if index == 0 else fn(value, **params)
    return value


def output_shape(steps, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    """The shape the steps produce from inputs of these shapes (run on meta tensors: no data)."""
    inputs = {arg: torch.empty(shape, device="meta", dtype=torch.float64) for arg, shape in shapes.items()}
    return tuple(apply_steps(steps, inputs).shape)


# -- Row rules (row_blocks.py): a step is row-wise when it neither reduces nor mixes along rows ---


def _rows_always(*args: str) -> RowRule:
    return lambda params, ndim: args


def _rows_if_matrix(*args: str) -> RowRule:
    """Row-wise on a matrix (one row per token); a vector is averaged or cut as a whole."""
    return lambda params, ndim: args if ndim >= 2 else None


def _rows_by_layout(linear: tuple[str, ...] | None, conv1d: tuple[str, ...] | None) -> RowRule:
    """Linear rows are outputs, Conv1D rows are inputs: row-wise for the layout(s) given."""
    return lambda params, ndim: linear if params["layout"] == "linear" else conv1d


def _out_axis(layout: str) -> int:
    """Axis of a weight that indexes output features."""
    return 0 if layout == "linear" else 1


def _in_axis(layout: str) -> int:
    return 1 - _out_axis(layout)


@step(None, rows=_rows_always("x"))
def identity(x: torch.Tensor) -> torch.Tensor:
    return x


# -- Roles: embedding and writer recentering ("Roles a tensor can have") ------------------


@step("center rows", rows=_rows_if_matrix("x"))
def center_rows(x: torch.Tensor) -> torch.Tensor:
    """Embedding table [V, d] (or any [..., d]): every row gets zero mean."""
    return x - x.mean(dim=-1, keepdim=True)


# a Linear writer is centred a fixed number of its input columns at a time: each column's mean is
# its own, and fixed chunks make the float64 sums the same whether the whole weight is in memory or
# the conversion works through it chunk by chunk (row_blocks.run_op_by_columns)
LINEAR_COLUMN_CHUNK = 256


@step("center output columns", rows=_rows_by_layout(linear=None, conv1d=("weight",)))
def center_writer_weight(weight: torch.Tensor, layout: str) -> torch.Tensor:
    """Writer weight: every output column zero-mean over the d output features."""
    if layout != "linear" or weight.dim() != 2:
        return weight - weight.mean(dim=_out_axis(layout), keepdim=True)
    out = torch.empty_like(weight)
    chunk = LINEAR_COLUMN_CHUNK
    for start in range(0, weight.shape[1], chunk):
        columns = weight[:, start : start + chunk].contiguous()
        out[:, start : start + chunk] = columns - columns.mean(dim=0, keepdim=True)
    return out


@step("center")
def center_vector(x: torch.Tensor) -> torch.Tensor:
    """Writer bias."""
    return x - x.mean()


@step("scale outputs by the layer scale", rows=_rows_by_layout(linear=("weight", "scale"), conv1d=("weight",)))
def scale_outputs(weight: torch.Tensor, scale: torch.Tensor, layout: str) -> torch.Tensor:
    """Writer weight diag(λ)·W: a LayerScale folded in (docs/math.md "LayerScale")."""
    shape = [1] * weight.dim()
    shape[_out_axis(layout)] = -1
    return weight * scale.reshape(shape)


@step("scale by the layer scale")
def scale_features(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Writer bias λ ⊙ b (docs/math.md "LayerScale")."""
    return x * scale


# -- Folding the affine ("Folding the affine") ------------------------------------------------


@step("γ = 1 (the stock RMSNorm's weight)")
def ones(width: int) -> torch.Tensor:
    """The weight of a stock RMSNorm standing for a norm without γ (docs/architecture.md, lands_in)."""
    return torch.ones(width, dtype=torch.float64)


@step("add the norm's weight offset", rows=_rows_always("x"))
def add_offset(x: torch.Tensor, value: float) -> torch.Tensor:
    """γ as the norm computes with it, from a stored γ − offset (docs/math.md "Norms"); 0 changes nothing."""
    return x + value if value else x


@step("fold γ", rows=_rows_by_layout(linear=("weight",), conv1d=("weight", "gamma")))
def fold_gamma(weight: torch.Tensor, gamma: torch.Tensor, layout: str, gamma_offset: float = 0.0) -> torch.Tensor:
    """Reader weight W·diag(γ) — scale each input feature (γ = stored + gamma_offset)."""
    gamma = gamma + gamma_offset if gamma_offset else gamma
    return weight * (gamma[None, :] if layout == "linear" else gamma[:, None])


@step("fold β", rows=_rows_by_layout(linear=("weight", "bias"), conv1d=None))
def fold_beta(weight: torch.Tensor, beta: torch.Tensor, layout: str, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reader bias b + W β (uses the weight before γ is folded in). A missing bias counts as 0.

    Linear: one dot product per weight row, summed row by row rather than by a matrix-vector
    product, whose rounding may depend on how many rows it is given; so a block of rows gives
    bit-for-bit the rows of the whole (row_blocks.py)."""
    shifted = (weight * beta).sum(dim=-1) if layout == "linear" else beta @ weight
    return shifted if bias is None else bias + shifted


# -- Stem norms ("norm on the main branch itself") ---------------------------------------------


@step("bake the stem LayerNorm", rows=_rows_if_matrix("table"), stem_hook=True)
def bake_layernorm(table: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> torch.Tensor:
    """Apply a LayerNorm to every row of an embedding table (the norm depends only on the token id)."""
    return torch.nn.functional.layer_norm(table, (table.shape[-1],), gamma, beta, eps)


# -- Pre-CRMSNorm ("Pre-CRMSNorm: lossless compression to d−1") --------------------------------


@step("drop last feature", rows=_rows_if_matrix("x"))
def drop_last_feature(x: torch.Tensor) -> torch.Tensor:
    """Embedding [V, d] -> [V, d-1]; writer bias [d] -> [d-1]."""
    return x[..., :-1]


@step("drop last output", rows=_rows_by_layout(linear=None, conv1d=("weight",)))
def drop_last_output(weight: torch.Tensor, layout: str) -> torch.Tensor:
    """Writer weight: drop the last output feature."""
    return weight[:-1, :] if layout == "linear" else weight[:, :-1]


@step("merge last input column", rows=_rows_by_layout(linear=("weight",), conv1d=None))
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


@step("zero-pad features")
def zero_pad_feature(x: torch.Tensor, width: int) -> torch.Tensor:
    """Embedding [V, d-1] or writer bias [d-1] -> zero features up to ``width``."""
    return _zero_pad(x, -1, width)


@step("zero-pad outputs")
def zero_pad_output(weight: torch.Tensor, layout: str, width: int) -> torch.Tensor:
    """Writer weight: zero output features up to ``width``, so the padding of the stream stays zero."""
    return _zero_pad(weight, _out_axis(layout), width)


@step("zero-pad input columns")
def zero_pad_input(weight: torch.Tensor, layout: str, width: int) -> torch.Tensor:
    """Reader weight: zero input columns for the padding, so it is never read."""
    return _zero_pad(weight, _in_axis(layout), width)
