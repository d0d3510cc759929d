"""The safetensors format, read and written one tensor at a time.

Format: 8-byte little-endian header length N, N bytes of JSON header
({name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}), then the data.
Offsets are relative to the end of the header. Because every output shape and dtype is known
from the plan before any tensor is computed, the header can be written first and each tensor
streamed after it, so peak memory is one tensor, not one shard.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CorruptCheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class StoredTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int = 0  # absolute byte offset of the data in the file (safetensors only)
    nbytes: int = 0


def read_tensor(handle, info: StoredTensor) -> torch.Tensor:
    """Read one tensor with a plain positioned read: no memory map, so nothing of the file stays
    resident in this process once the tensor is consumed."""
    dtype = DTYPES[info.dtype]
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=dtype)
    buffer = bytearray(info.nbytes)
    handle.seek(info.offset)
    if handle.readinto(buffer) != info.nbytes:
        raise CorruptCheckpointError(f"{info.file.name} ended while reading '{info.name}'; re-download it")
    return torch.frombuffer(buffer, dtype=dtype).reshape(info.shape)


def element_size(dtype: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype]).element_size()


def read_header(path: Path) -> dict[str, StoredTensor]:
    """Parse and cross-check one shard's header against the file size; raise on any damage."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            raw_len = handle.read(8)
            if len(raw_len) < 8:
                raise CorruptCheckpointError(f"{path.name} is truncated (no safetensors header); re-download it")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > min(_MAX_HEADER, size - 8):
                raise CorruptCheckpointError(f"{path.name} is truncated or not a safetensors file (bad header length); re-download it")
            header = json.loads(handle.read(header_len))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, CorruptCheckpointError):
            raise
        raise CorruptCheckpointError(f"{path.name} is not a readable safetensors file ({exc}); re-download it") from exc
    data_size = size - 8 - header_len
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptCheckpointError(f"{path.name}: malformed header entry for '{name}'; re-download it") from exc
        if dtype not in DTYPES:
            raise CorruptCheckpointError(f"{path.name}: tensor '{name}' has unsupported dtype {dtype}")
        numel = 1
        for dim in shape:
            numel *= dim
        if end - begin != numel * element_size(dtype) or end > data_size:
            raise CorruptCheckpointError(
                f"{path.name} is truncated or corrupt: tensor '{name}' needs bytes {begin}..{end} but the file holds "
                f"{data_size} data bytes; re-download it"
            )
        tensors[name] = StoredTensor(name, dtype, shape, path, 8 + header_len + begin, end - begin)
    return tensors


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(tensors: list[OutputTensor], max_shard_bytes: int) -> list[list[OutputTensor]]:
    """Group tensors, in order, into shards of at most max_shard_bytes (a bigger tensor gets its own)."""
    shards: list[list[OutputTensor]] = [[]]
    used = 0
    for tensor in tensors:
        if shards[-1] and used + tensor.nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(tensor)
        used += tensor.nbytes
    return shards


def _header_bytes(shard: list[OutputTensor]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for tensor in shard:
        header[tensor.name] = {
            "dtype": DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded


class StreamingShardWriter:
    """Writes tensors, in plan order, into standard safetensors shards plus an index.

    Memory held: the tensor being written. Usage: ``write(name, tensor)`` for every planned
    tensor in order, then ``close()``.
    """

    def __init__(self, folder: Path, tensors: list[OutputTensor], max_shard_bytes: int):
        self.folder = Path(folder)
        self.shards = plan_shards(tensors, max_shard_bytes)
        count = len(self.shards)
        self.file_names = (
            ["model.safetensors"]
            if count == 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        self._order = [(shard_index, tensor) for shard_index, shard in enumerate(self.shards) for tensor in shard]
        self._next = 0
        self._handle = None
        self._open_shard = -1

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard_index, expected = self._order[self._next]
        if name != expected.name or tuple(tensor.shape) != expected.shape or tensor.dtype != expected.dtype:
            raise RuntimeError(
                f"writer expected {expected.name} {expected.shape} {expected.dtype}, got {name} {tuple(tensor.shape)} {tensor.dtype}"
            )
        if shard_index != self._open_shard:
            self._finish_shard()
            self._handle = open(self.folder / self.file_names[shard_index], "wb")
            self._handle.write(_header_bytes(self.shards[shard_index]))
            self._open_shard = shard_index
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._handle.write(memoryview(data.numpy()))
        self._next += 1

    def _finish_shard(self) -> None:
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None

    def close(self) -> None:
        if self._next != len(self._order):
            self.abort()
            raise RuntimeError(f"writer closed after {self._next} of {len(self._order)} tensors")
        self._finish_shard()
        if len(self.shards) > 1:
            weight_map = {
                tensor.name: self.file_names[i] for i, shard in enumerate(self.shards) for tensor in shard
            }
            total = sum(tensor.nbytes for shard in self.shards for tensor in shard)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
