"""Verification of checkpoints larger than memory (docs/report.md "Streamed verification").

Both models are loaded with every weight left on disk (accelerate's disk offload through
transformers' own ``from_pretrained``, so each family's forward is transformers' modeling code):
each module's tensors are read when its forward runs and dropped after it. All prompts go through
in one right-padded batch, so a forward pass reads each weight once; the per-layer audit spills
the original's layer outputs to a temporary folder and compares the converted model's with them
as they come. What stays in memory is one module's weights, the activations and the logits.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from .safetensors_io import DTYPES, StoredTensor, read_header, read_tensor, row_block

# layer-streamed greedy decoding reads the whole model once per token: a few tokens on one prompt,
# next to the teacher-forced top-1 agreement over every position of every prompt
STREAMED_GREEDY_TOKENS = 4
STREAMED_GREEDY_PROMPTS = 1

# -- offloaded models ------------------------------------------------------------------------


@dataclass
class Offload:
    """Loads models with every weight left on disk, in place in their safetensors files (a folder
    for what accelerate cannot read in place, pickled originals, removed on close)."""

    folder: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="prenorm-offload-")))

    def __post_init__(self):
        self._headers: dict[str, dict[str, StoredTensor]] = {}
        _return_large_blocks_to_the_system()

    def placement(self) -> dict:
        return {"device_map": {"": "disk"}, "offload_folder": str(self.folder)}

    def load(self, load: Callable, path: Path, dtype: torch.dtype, stored_dtype: torch.dtype):
        """``load(path, dtype, **placement)`` in the dtype the weights are stored in, then given the
        dtypes a model built in ``dtype`` has. Asked for another dtype, transformers reads and casts
        every tensor while loading, only to leave it on disk: the pages it touches (the whole
        checkpoint) count against this process's memory. Here each is cast when its module runs."""
        model = load(path, stored_dtype, **self.placement())
        if dtype != stored_dtype:
            retype(model, dtype)
        read_by_positioned_reads(model, self.headers)
        return model

    def headers(self, file: str) -> dict[str, StoredTensor]:
        if file not in self._headers:
            self._headers[file] = read_header(Path(file))
        return self._headers[file]

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


# glibc's malloc raises its mmap threshold each time a large block is freed, after which blocks of
# that size come from the heap and stay with the process once freed: streaming frees one module's
# weights after another, so the process would keep growing with the model's depth. A fixed
# threshold (which also stops the adjustment) hands every block of 128 KiB or more back when freed.
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 128 << 10  # glibc's own starting value


def _return_large_blocks_to_the_system() -> None:
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):  # not glibc: nothing to adjust
        pass


def retype(model, dtype: torch.dtype) -> None:
    """Give an offloaded model's parameters (meta tensors, read from disk and cast to their dtype when
    their module runs) and buffers the dtypes the same class built in ``dtype`` gives them."""
    with torch.device("meta"):
        skeleton = type(model)._from_config(model.config, dtype=dtype)
    wanted = {name: tensor.dtype for name, tensor in skeleton.named_parameters(remove_duplicate=False)}
    wanted.update({name: tensor.dtype for name, tensor in skeleton.named_buffers(remove_duplicate=False)})
    replaced: dict[int, torch.nn.Parameter] = {}  # tied parameters stay one object
    for prefix, module in model.named_modules(remove_duplicate=False):
        prefix = prefix + "." if prefix else ""
        for name, param in list(module._parameters.items()):
            target = wanted.get(prefix + name)
            if param is None or target is None or param.dtype == target:
                continue
            if id(param) not in replaced:
                replaced[id(param)] = torch.nn.Parameter(param.detach().to(target), requires_grad=False)
            module._parameters[name] = replaced[id(param)]
        for name, buffer in list(module._buffers.items()):
            target = wanted.get(prefix + name)
            if buffer is not None and target is not None and buffer.dtype != target:
                module._buffers[name] = buffer.to(target)


# rows read at a time into the module's own dtype: the only copy in the stored dtype is this block
READ_BLOCK_BYTES = 16 << 20


class PositionedReads(Mapping):
    """An offloaded module's weights as accelerate loads them when the module runs; those that must
    be cast (a float64 run, a bf16 checkpoint run in float32) are read from their safetensors files
    by positioned reads, a block of rows at a time, straight into the dtype the module runs in.
    accelerate's own loader memory-maps the file and casts a full copy: the mapped pages of the
    tensor count as this process's memory next to both copies. A tensor used as stored is left
    to it (a view of the mapped file: no copy at all)."""

    def __init__(self, module, prefix: str, index: dict, fallback: Mapping, headers: Callable[[str], dict]):
        self.module, self.prefix, self.index, self.fallback, self.headers = module, prefix, index, fallback, headers

    def __getitem__(self, key: str) -> torch.Tensor:
        info = self.stored_info(key)
        if info is None:  # re-saved by transformers (a pickled original)
            return self.fallback[key]
        owner, _, leaf = key.rpartition(".")
        current = getattr(self.module.get_submodule(owner), leaf)
        if not current.is_floating_point() or current.dtype == DTYPES[info.dtype]:
            return self.fallback[key]
        return read_as(info, current.dtype)

    def stored_info(self, key: str) -> StoredTensor | None:
        """Where ``key`` is stored, when it is read in place from a safetensors file."""
        entry = self.index.get(self.prefix + key, {})
        if entry.get("safetensors_file") is None:
            return None
        return self.headers(entry["safetensors_file"])[entry.get("weight_name", self.prefix + key)]

    def __iter__(self):
        return iter(self.fallback)

    def __len__(self) -> int:
        return len(self.fallback)


def stored_blocks(info: StoredTensor) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, rows) of one stored tensor as stored, read a block of rows at a time into one
    reused buffer (each block is a view of it, valid until the next)."""
    rows = info.shape[0] if info.shape else 0
    with open(info.file, "rb") as handle:
        if rows == 0 or info.nbytes == 0:
            yield 0, read_tensor(handle, info)
            return
        row_bytes = info.nbytes // rows
        block = max(1, READ_BLOCK_BYTES // max(1, row_bytes))
        buffer = torch.empty(min(info.nbytes, block * row_bytes), dtype=torch.uint8)
        for start in range(0, rows, block):
            stop = min(rows, start + block)
            yield start, read_tensor(handle, row_block(info, start, stop), into=buffer)


def read_as(info: StoredTensor, dtype: torch.dtype) -> torch.Tensor:
    """One stored tensor cast to ``dtype``, read a block of rows at a time (see PositionedReads)."""
    out = torch.empty(info.shape, dtype=dtype)
    for start, rows in stored_blocks(info):
        if out.dim() == 0:
            out.copy_(rows)
        else:
            out[start : start + rows.shape[0]].copy_(rows)
    return out


def read_by_positioned_reads(model, headers: Callable[[str], dict]) -> None:
    """Swap accelerate's loader for PositionedReads in every offloaded module of ``model``."""
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        weights = getattr(hook, "weights_map", None)
        index = getattr(getattr(weights, "dataset", None), "index", None)
        if getattr(hook, "offload", False) and index is not None:
            hook.weights_map = PositionedReads(module, weights.prefix, index, weights, headers)


def input_device(model) -> torch.device:
    """Where a model's inputs go: its device, or the CPU for a model whose weights are on disk."""
    device = model.device
    return torch.device("cpu") if device.type == "meta" else device


def parameter_tensors(model, only: set[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter (or those named in ``only``) with its values, read from disk one at a time
    for an offloaded model."""
    for name, param in model.named_parameters():
        if only is not None and name not in only:
            continue
        if param.device.type != "meta":
            yield name, param.detach()
            continue
        module_path, _, leaf = name.rpartition(".")
        yield name, model.get_submodule(module_path)._hf_hook.weights_map[leaf]


def parameter_blocks(model) -> Iterator[tuple[str, Iterator[torch.Tensor]]]:
    """Every parameter's values in pieces: itself when in memory; for an offloaded one read in place,
    blocks of rows as stored (never the whole tensor at once)."""
    for name, param in model.named_parameters():
        module_path, _, leaf = name.rpartition(".")
        weights = getattr(getattr(model.get_submodule(module_path), "_hf_hook", None), "weights_map", None)
        info = weights.stored_info(leaf) if param.device.type == "meta" and isinstance(weights, PositionedReads) else None
        if info is not None:
            yield name, (rows for _, rows in stored_blocks(info))
        elif param.device.type == "meta":
            yield name, iter([weights[leaf]])
        else:
            yield name, iter([param.detach()])


class RewrittenWeights(Mapping):
    """An offloaded module's weights as it loads them, with some replaced (rounded_weights_error: a
    rewrite at its exact value): ``entries[leaf](stored)`` gets the stored tensor, as the module
    runs it, and returns what the module gets instead."""

    def __init__(self, stored: Mapping):
        self.stored = stored
        self.entries: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}

    def __getitem__(self, key: str) -> torch.Tensor:
        stored = self.stored[key]
        return self.entries[key](stored) if key in self.entries else stored

    def __iter__(self):
        return iter(self.stored)

    def __len__(self) -> int:
        return len(self.stored)


def replace_offloaded(model, name: str, replacement: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Make the offloaded parameter ``name`` load as ``replacement(stored)`` (see RewrittenWeights)."""
    module_path, _, leaf = name.rpartition(".")
    hook = model.get_submodule(module_path)._hf_hook
    if not isinstance(hook.weights_map, RewrittenWeights):
        hook.weights_map = RewrittenWeights(hook.weights_map)
    hook.weights_map.entries[leaf] = replacement


class SpilledOutputs:
    """The original's audited outputs for one batch, kept on disk (one file per module) until the
    converted model's pass compares with them."""

    def __init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="prenorm-audit-"))
        self.files: dict[str, Path] = {}

    def __setitem__(self, path: str, tensor: torch.Tensor) -> None:
        file = self.folder / f"{len(self.files)}.pt"
        torch.save(tensor, file)
        self.files[path] = file

    def __getitem__(self, path: str) -> torch.Tensor:
        return torch.load(self.files[path], weights_only=True)

    def __contains__(self, path: str) -> bool:
        return path in self.files

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
