"""Run a plan entry, whole or block by block along rows, so that memory is a fixed budget, not the tensor.

A step may be applied to a block of rows (the leading axis) of its input when it treats every
row on its own: it neither reduces nor mixes along that axis. Each step's row rule is registered
with it (transform.STEPS); per step and weight layout
(docs/math.md "Roles a tensor can have", "Folding the affine", "Pre-CRMSNorm"; Linear weights are
[out, in], Conv1D weights [in, out]):

- embeddings (``center_rows``, ``bake_layernorm``, ``drop_last_feature``): one row per token — row-wise;
- ``center_writer_weight`` takes the mean over the output axis: row-wise for Conv1D (rows are
  inputs), not for Linear (rows are the outputs it averages), which instead works through fixed
  chunks of its input columns (``run_op_by_columns``);
- ``fold_gamma`` scales the input axis: Linear rows are outputs (γ stays whole), Conv1D rows are
  inputs (γ is sliced with them);
- ``fold_beta`` computes W β, a sum over the input axis: row-wise for Linear (the bias rows go
  with the weight rows), not for Conv1D;
- ``drop_last_output`` / ``merge_last_input`` drop or mix along the output / input axis:
  row-wise for Conv1D / Linear respectively;
- ``center_vector`` averages a whole bias: never (biases are small).

Anything else (a step without a row rule, or one that is not row-wise for this layout) runs whole.
Every block is computed in float64 and cast once, like the whole tensor (docs/math.md "Numerics"),
and gives bit-for-bit the same rows (tests/test_row_blocks.py).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterator

import torch

from .safetensors_io import DTYPE_NAMES
from . import transform
from .transform import STEPS, apply_steps, center_writer_weight

# Two block sizes. I/O blocks: rows read, staged and handed to the writer at once, sized so that
# one holds this many float64 bytes (the stored-dtype buffers are half or a quarter of it). Compute
# blocks: rows taken through float64 at once, small enough for the float64 temporaries to stay in
# cache and be recycled by the allocator (no page faults, no fragmentation block after block).
DEFAULT_BLOCK_BYTES = 64 * 2**20
DEFAULT_COMPUTE_BYTES = 2**20



class RecentTensors:
    """The last few float64 inputs: a reader's weight is read for its weight and again for its folded bias."""

    def __init__(self, source, size: int = 2):
        self.source, self.size = source, size
        self.cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def get(self, key: str) -> torch.Tensor:
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        tensor = self.source.read(key).to(torch.float64)
        self.cache[key] = tensor
        if len(self.cache) > self.size:
            self.cache.popitem(last=False)
        return tensor


def run_op(op, tensors: RecentTensors) -> torch.Tensor:
    """Execute one plan entry whole, in float64, and cast once to the output dtype (docs/math.md "Numerics")."""
    inputs = {arg: tensors.get(key) for arg, key in op.inputs.items()}
    return apply_steps(op.steps, inputs).to(op.dtype)


def op_rows(op, source, workspace: "Workspace | None" = None, block_bytes: int = DEFAULT_BLOCK_BYTES) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, rows) of one plan entry's result: block by block when it is row-wise (memory stays
    a fixed budget; a block is valid until the next one is asked for), else whole."""
    sliced = sliced_inputs(op, {arg: source.tensors[key].shape for arg, key in op.inputs.items()})
    if sliced is None:
        yield 0, run_op(op, RecentTensors(source))
        return
    start = 0
    for block in run_op_in_blocks(op, source, sliced, block_bytes, workspace):
        yield start, block
        start += block.shape[0]


def by_columns(op) -> bool:
    """Whether ``op`` is a Linear writer's centring alone, which works column chunk by column chunk
    (transform.center_writer_weight): the one whole-tensor op whose float64 copies grow with the
    model (a 7B MLP output projection: 537 MB each)."""
    return len(op.inputs) == 1 and len(op.steps) == 1 and op.steps[0] == ("center_writer_weight", {"layout": "linear"}) and len(op.shape) == 2


def run_op_by_columns(op, source) -> torch.Tensor:
    """``op`` (see by_columns) with only the stored tensor, the result and one float64 column chunk
    in memory: the same chunks, so bit for bit what run_op computes on the whole tensor."""
    stored = source.read(next(iter(op.inputs.values())))
    out = torch.empty(op.shape, dtype=op.dtype)
    chunk = transform.LINEAR_COLUMN_CHUNK
    for start in range(0, stored.shape[1], chunk):
        out[:, start : start + chunk] = center_writer_weight(stored[:, start : start + chunk].to(torch.float64), "linear")
    return out


def stored_copy(op, source):
    """The stored tensor whose bytes are exactly ``op``'s result (an unchanged tensor kept in its
    dtype), or None. Such a tensor is copied file to file, not computed."""
    if source.pickled or len(op.inputs) != 1 or any(name != "identity" for name, _ in op.steps):
        return None
    stored = source.tensors[next(iter(op.inputs.values()))]
    if stored.dtype != DTYPE_NAMES.get(op.dtype) or tuple(stored.shape) != tuple(op.shape):
        return None
    return stored


def sliced_inputs(op, shapes: dict[str, tuple[int, ...]]) -> tuple[str, ...] | None:
    """The inputs of ``op`` to slice by rows, or None when the op must run on whole tensors.

    ``shapes`` maps each input argument to its stored shape."""
    if not op.steps or not shapes:
        return None
    ndim = len(next(iter(shapes.values())))
    sliced: tuple[str, ...] | None = None
    for index, (name, params) in enumerate(op.steps):
        rule = STEPS[name].rows if name in STEPS else None
        args = rule(params, ndim) if rule is not None else None
        if args is None:
            return None
        if index == 0:
            sliced = tuple(arg for arg in args if arg in shapes)
    if not sliced:
        return None
    rows = {shapes[arg][0] if shapes[arg] else None for arg in sliced}
    if len(rows) != 1 or None in rows or not op.shape or op.shape[0] != rows.pop():
        return None
    return sliced


class Workspace:
    """Byte buffers kept across ops and blocks, grown on demand. The big buffers are allocated once
    per conversion, not once per block, so they are neither page-faulted in again and again nor
    left as holes in the heap: resident memory stays flat, whatever the model's depth.

    Blocks alternate between two buffers (across ops too): the writer writes one while the next
    is made in the other."""

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}
        self.parity = 0

    def take(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = _numel(shape) * torch.empty((), dtype=dtype).element_size()
        buffer = self.buffers.get(key)
        if buffer is None or buffer.numel() < nbytes:
            self.buffers.pop(key, None)  # a pending write may still hold the old one; it is freed after
            buffer = self.buffers[key] = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        return buffer[:nbytes].view(dtype).reshape(shape)

    def flip(self) -> int:
        self.parity ^= 1
        return self.parity


def run_op_in_blocks(
    op,
    source,
    sliced: tuple[str, ...],
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    workspace: Workspace | None = None,
    compute_bytes: int | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the rows of ``op``'s result, block by block, in the output dtype.

    A block is a view of a workspace buffer; it stays valid while the next block is computed
    and is overwritten by the one after (the writer keeps exactly one block in flight)."""
    workspace = workspace or Workspace()
    infos = {arg: source.tensors[op.inputs[arg]] for arg in sliced}
    rows = infos[sliced[0]].shape[0]
    row_elements = max(max(_numel(info.shape[1:]) for info in infos.values()), 1)
    step = max(1, min(rows, block_bytes // (8 * row_elements)))
    inner = max(1, min(step, (compute_bytes or DEFAULT_COMPUTE_BYTES) // (8 * row_elements)))
    identity = all(name == "identity" for name, _ in op.steps)
    whole = {} if identity else {arg: source.read(key).to(torch.float64) for arg, key in op.inputs.items() if arg not in sliced}
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        parity = workspace.flip()
        stored = {}
        for arg, info in infos.items():
            buffer = workspace.take(f"read:{arg}:{parity}", (info.nbytes // max(rows, 1) * (stop - start),), torch.uint8)
            stored[arg] = source.read_rows(op.inputs[arg], start, stop, into=buffer)
        if identity:
            # a copy: casting the stored value directly rounds exactly as casting its (exact) float64 copy
            yield stored[sliced[0]].to(op.dtype)
            continue
        block = workspace.take(f"out:{parity}", (stop - start, *op.shape[1:]), op.dtype)
        for first in range(0, stop - start, inner):
            last = min(stop - start, first + inner)
            inputs = {arg: tensor[first:last].to(torch.float64) for arg, tensor in stored.items()}
            block[first:last].copy_(apply_steps(op.steps, {**inputs, **whole}))
        yield block


def _numel(shape) -> int:
    numel = 1
    for dim in shape:
        numel *= dim
    return numel
