"""What storing the rewritten tensors in a reduced dtype costs by itself (docs/math.md "Numerics").

The conversion recomputes every rewritten tensor in float64 and rounds it once; the original never
had those values to round. Measured on the converted architecture, run in float32: its weights as
stored against the same model holding the rewritten tensors at their exact values, recomputed from
ORIGINAL (and a kept stem norm's centred output rounded to the stored dtype against not rounded).
Every stored rewritten tensor must be exactly that rewrite rounded to the stored dtype
(``tensors_not_matching`` lists any that is not), so this is the cost of rounding and nothing else:
a wrong rewrite is the same in both and shows up only in the comparison with the original.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

from .checkpoint import SourceCheckpoint, converted_folder_config
from .metrics import Batches, batch_logits, compare_logits
from .row_blocks import DEFAULT_BLOCK_BYTES, op_rows
from .streaming import parameter_tensors, replace_offloaded
from .tolerances import dtype_name

BLOCK_BYTES = DEFAULT_BLOCK_BYTES  # float64 bytes of rewritten rows computed at once (tests make it tiny)


@torch.no_grad()
def rounded_weights_error(
    original: Path, converted: Path, batches: Batches, load_converted: Callable, stored_dtype: torch.dtype, allow_pickle: bool = False
) -> dict:
    """``load_converted(dtype)``: the converted model, placed as the verification places it (in
    memory, on a device, or with its weights on disk)."""
    from .plan import make_plan
    from .spec_loader import match_spec

    block = converted_folder_config(converted)["prenorm"]
    source = SourceCheckpoint.open(original, allow_pickle=allow_pickle)
    try:
        spec = match_spec(source.config)
        # an untied head (asked for, or needed) is planned untied again: the same tensors
        plan = make_plan(
            source, spec, block["target"], block["fold_affine"], torch.float64, block.get("pad_to"), untie_head=block.get("untied_head", False)
        )
        model = load_converted(torch.float32)
        with _stems_rounded(model, block.get("centered_stems", []), stored_dtype):
            stored = batch_logits(model, batches)
        rewritten = [op for op in plan.ops if op.changed]
        exact = _ExactRewrites(source, stored_dtype)
        exact.install(model, rewritten)
        exact_logits = batch_logits(model, batches)
        exact.check_unread(model)
    finally:
        source.close()
    return {
        **compare_logits(exact_logits, stored),
        "stored_dtype": dtype_name(stored_dtype),
        "tensors_rewritten": len(rewritten),
        "tensors_not_matching": exact.not_matching,
    }


@contextmanager
def _stems_rounded(model, stems: list[str], dtype: torch.dtype) -> Iterator[None]:
    """A kept stem norm's centred output is a value the original never had to round: the converted
    model rounds it to the stored dtype at run time (docs/math.md "Stem norms: a norm on the main
    branch itself"), as a baked table would be rounded once when stored. So the stored-weights run
    rounds it too, and the exact run does not: what the rounding costs is counted like a stored
    rewrite's."""
    handles = [
        model.get_submodule(path).register_forward_hook(lambda _module, _args, output: output.to(dtype).to(output.dtype))
        for path in stems
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class _ExactRewrites:
    """Gives a converted model every rewritten tensor at its exact value: copied into parameters held
    in memory, or swapped in as an offloaded module loads its weights. Each stored tensor is first
    checked against the exact rewrite rounded to the stored dtype (``not_matching`` lists the
    mismatches; an offloaded one is checked when its module runs, or by check_unread)."""

    def __init__(self, source: SourceCheckpoint, stored_dtype: torch.dtype):
        self.source, self.stored_dtype = source, stored_dtype
        self.not_matching: list[str] = []
        self.pending: set[str] = set()

    def install(self, model, rewritten) -> None:
        for op in rewritten:
            try:
                param = model.get_parameter(op.name)
            except AttributeError:
                param = None
            if param is None or tuple(param.shape) != tuple(op.shape):  # not the model this rewrite makes
                self.not_matching.append(op.name)
            elif param.device.type == "meta":
                replace_offloaded(model, op.name, lambda stored, op=op: self.exact(op, stored, torch.empty_like(stored)))
                self.pending.add(op.name)
            else:
                self.exact(op, param.detach(), param.detach())

    def exact(self, op, stored: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``op``'s exact rewrite written into ``out`` block by block (``out`` may be ``stored``), each
        block of ``stored`` checked first against the block rounded to the stored dtype."""
        self.pending.discard(op.name)
        for start, rows in op_rows(op, self.source, block_bytes=BLOCK_BYTES):  # a block is valid until the next is asked for
            if op.name not in self.not_matching and not torch.equal(rows.to(self.stored_dtype).to(stored.dtype), stored[start : start + rows.shape[0]]):
                self.not_matching.append(op.name)
            out[start : start + rows.shape[0]].copy_(rows)
        return out

    def check_unread(self, model) -> None:
        """Offloaded rewrites whose module did not run: reading them through the module's weights
        map runs the check."""
        if self.pending:
            for _name, _values in parameter_tensors(model, only=set(self.pending)):
                pass
