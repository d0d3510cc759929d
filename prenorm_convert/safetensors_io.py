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
import stat
import struct
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

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
_MAX_HEADER = 100_000_000  # the safetensors library's limit


@dataclass(frozen=True)
class StoredTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int = 0  # absolute byte offset of the data in the file (safetensors only)
    nbytes: int = 0


def read_tensor(handle, info: StoredTensor, into: torch.Tensor | None = None) -> torch.Tensor:
    """Read one tensor with a plain positioned read: no memory map, so nothing of the file stays
    resident in this process once the tensor is consumed. ``into``: a uint8 tensor of at least
    ``info.nbytes`` to read into (reused by block-wise readers; the result is a view of it)."""
    dtype = DTYPES[info.dtype]
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=dtype)
    buffer = into[: info.nbytes] if into is not None else torch.empty(info.nbytes, dtype=torch.uint8)
    handle.seek(info.offset)
    if handle.readinto(memoryview(buffer.numpy())) != info.nbytes:
        raise CorruptCheckpointError(f"{info.file.name} ended while reading '{info.name}'; re-download it")
    return buffer.view(dtype).reshape(info.shape)


def row_block(info: StoredTensor, start: int, stop: int) -> StoredTensor:
    """The rows start..stop of a stored tensor (its leading axis): a contiguous byte range."""
    row_bytes = info.nbytes // info.shape[0] if info.shape and info.shape[0] else 0
    shape = (stop - start, *info.shape[1:])
    return StoredTensor(info.name, info.dtype, shape, info.file, info.offset + start * row_bytes, (stop - start) * row_bytes)


def element_size(dtype: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype]).element_size()


def read_header(path: Path) -> dict[str, StoredTensor]:
    """Parse and cross-check one shard's header against the file size; raise on any damage."""
    try:
        status = path.stat()
        if not stat.S_ISREG(status.st_mode):  # a FIFO or device would block or never end: never opened
            raise _corrupt(path, "it is not a regular file")
        size = status.st_size
        with open(path, "rb") as handle:
            return read_header_from(handle, path, size)
    except OSError as exc:
        raise CorruptCheckpointError(f"{path.name} is not a readable safetensors file ({exc}); re-download it") from exc


def read_header_from(handle, path: Path, size: int) -> dict[str, StoredTensor]:
    """The header of a safetensors file of ``size`` bytes open as ``handle`` (seek, read): a local
    file, or a hub file read by range requests. Checked as strictly as the safetensors library
    checks it (or more), so that nothing it would refuse is ever read."""
    handle.seek(0)
    raw_len = handle.read(8)
    if len(raw_len) < 8:
        raise _corrupt(path, "it is truncated (shorter than the 8-byte header length)")
    (header_len,) = struct.unpack("<Q", raw_len)
    if header_len == 0 or header_len > _MAX_HEADER or header_len > size - 8:
        raise _corrupt(path, f"its header length {header_len} does not fit a file of {size} bytes (truncated, or not a safetensors file)")
    raw = handle.read(header_len)
    if len(raw) != header_len:
        raise _corrupt(path, "it is truncated inside its header")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys, parse_int=_parse_int, parse_constant=_no_constant)
    except UnicodeDecodeError as exc:
        raise _corrupt(path, f"its header is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except _DuplicateKey as exc:
        raise _corrupt(path, f"its header names '{_printable(exc.args[0])}' twice") from None
    except ValueError as exc:
        raise _corrupt(path, f"its header is not valid JSON ({_printable(str(exc))})") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "its header is not a JSON object")
    return parse_header(header, path, 8 + header_len, size - 8 - header_len)


def parse_header(header: dict, path: Path, data_start: int, data_size: int) -> dict[str, StoredTensor]:
    """The tensors a safetensors header describes, each checked as the safetensors library checks
    them: known dtype, shape and offsets of non-negative integers, the byte count the shape and
    dtype give, and byte ranges that, sorted, tile the data section exactly (no overlap, no gap,
    nothing past its end or left after it); ``__metadata__``, if any, maps strings to strings."""
    tensors = {}
    for name, info in header.items():
        if not _is_text(name):
            raise _corrupt(path, f"its header has a name that is not valid text ({_printable(name)})")
        if name == "__metadata__":
            if info is not None and not (isinstance(info, dict) and all(_is_text(k) and _is_text(v) for k, v in info.items())):
                raise _corrupt(path, "its __metadata__ is not a map of strings to strings")
            continue
        shown = _printable(name)
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise _corrupt(path, f"the header entry for '{shown}' is not an object with dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            what = f"dtype {_printable(dtype)}" if isinstance(dtype, str) else "a dtype that is not a string"
            raise _corrupt(path, f"tensor '{shown}' has {what}, which prenorm-convert does not read (it reads {', '.join(DTYPES)})")
        if not isinstance(shape, list) or not all(_is_size(dim, _MAX_DIM) for dim in shape):
            raise _corrupt(path, f"tensor '{shown}' has shape {_printable(shape)}, which is not a list of non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_size(offset, _MAX_SIZE) for offset in offsets):
            raise _corrupt(path, f"tensor '{shown}' has data_offsets {_printable(offsets)}, which are not two non-negative integers")
        begin, end = offsets
        nbytes = element_size(dtype)
        for dim in shape:
            nbytes *= dim
            if nbytes > _MAX_SIZE:
                raise _corrupt(path, f"tensor '{shown}' has shape {shape}, whose size overflows")
        if end < begin or end - begin != nbytes:
            raise _corrupt(
                path, f"tensor '{shown}' has data_offsets [{begin}, {end}], but its shape {shape} in {dtype} needs {nbytes} bytes"
            )
        if end > data_size:
            raise _corrupt(path, f"it is truncated: tensor '{shown}' needs bytes {begin}..{end} but the file holds {data_size} data bytes")
        tensors[name] = StoredTensor(name, dtype, tuple(shape), path, data_start + begin, nbytes)
    covered = 0
    for stored in sorted(tensors.values(), key=lambda t: (t.offset, t.offset + t.nbytes)):
        begin = stored.offset - data_start
        if begin != covered:
            problem = "overlaps the tensor before it" if begin < covered else f"leaves a gap of {begin - covered} bytes before it"
            raise _corrupt(path, f"tensor '{_printable(stored.name)}' (bytes {begin}..{begin + stored.nbytes}) {problem}")
        covered = begin + stored.nbytes
    if covered != data_size:
        raise _corrupt(path, f"its tensors cover {covered} of its {data_size} data bytes; the rest belongs to no tensor")
    return tensors


_MAX_SIZE = 2**64 - 1  # the library's usize
_MAX_DIM = 2**63 - 1  # torch's int64 sizes


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object as a dict, refusing a key given twice (readers disagree on which one counts)."""
    result = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _parse_int(text: str):
    # "-0" is a float to the library (no usize); keep it one here so that it is refused as such
    return -0.0 if text == "-0" else int(text)


def _no_constant(text: str):
    raise ValueError(f"{text} is not JSON")


def _is_size(value, limit: int) -> bool:
    return type(value) is int and 0 <= value <= limit


def _is_text(value) -> bool:
    """A str that is valid UTF-8 (JSON escapes can produce lone surrogates, which the library refuses)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(value, limit: int = 60) -> str:
    """A header value for an error line: one line, valid text, bounded length."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)[: limit + 1]
    text = "".join(char if char.isprintable() else repr(char)[1:-1] for char in text[: limit + 1])
    return text if len(text) <= limit else text[:limit] + "…"


def _corrupt(path: Path, problem: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{path.name} is not a valid safetensors file: {problem}; re-download it")


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

    Memory held: the tensor being written. Usage: ``write(name, tensor)`` (or ``write_blocks``)
    for every planned tensor in order, then ``close()`` (or ``abort()``).

    The file jobs run in order on one background thread, so the caller computes the next tensor
    or block while the previous one goes to disk. Jobs that hold a tensor are in flight one at a
    time: a written tensor or block must stay untouched until the next one is handed over. Jobs
    that hold no memory (file-to-file copies, a shard's fsync) queue freely behind them.
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
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prenorm-writer")
        self._pending: deque[tuple[Future, bool]] = deque()  # (job, holds a tensor)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self._begin(name)
        if tuple(tensor.shape) != expected.shape or tensor.dtype != expected.dtype:
            raise RuntimeError(
                f"writer expected {expected.name} {expected.shape} {expected.dtype}, got {name} {tuple(tensor.shape)} {tensor.dtype}"
            )
        self._write_data(tensor)
        self._next += 1

    def write_blocks(self, name: str, blocks: Iterable[torch.Tensor]) -> None:
        """Write one tensor given as consecutive blocks of rows (its leading axis), each written as
        soon as it arrives: memory holds one block, not the tensor."""
        expected = self._begin(name)
        rows = 0
        for block in blocks:
            if block.dtype != expected.dtype or block.dim() == 0 or tuple(block.shape[1:]) != expected.shape[1:]:
                raise RuntimeError(f"writer expected rows of {expected.name} {expected.shape} {expected.dtype}, got {tuple(block.shape)} {block.dtype}")
            self._write_data(block)
            rows += block.shape[0]
        if rows != expected.shape[0]:
            raise RuntimeError(f"writer expected {expected.shape[0]} rows of {expected.name}, got {rows}")
        self._next += 1

    def copy_stored(self, name: str, stored: StoredTensor) -> None:
        """Write a tensor whose bytes are exactly a stored one's (an unchanged tensor in the same
        dtype): copied file to file by the kernel where it can, never through this process's memory."""
        expected = self._begin(name)
        if expected.nbytes != stored.nbytes or DTYPE_NAMES[expected.dtype] != stored.dtype:
            raise RuntimeError(f"writer expected {expected.name} {expected.shape} {expected.dtype}, got the stored bytes of {stored.name}")
        self._submit(_copy_range, self._handle, stored, holds_tensor=False)
        self._next += 1

    def _begin(self, name: str) -> OutputTensor:
        """Check that ``name`` is the next planned tensor; open its shard (header first) if needed."""
        shard_index, expected = self._order[self._next]
        if name != expected.name:
            raise RuntimeError(f"writer expected {expected.name} {expected.shape} {expected.dtype} next, got {name}")
        if shard_index != self._open_shard:
            self._finish_shard()
            self._handle = open(self.folder / self.file_names[shard_index], "wb")
            self._handle.write(_header_bytes(self.shards[shard_index]))
            self._open_shard = shard_index
        return expected

    def _write_data(self, tensor: torch.Tensor) -> None:
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._submit(self._handle.write, memoryview(data.numpy()))

    def _submit(self, job, *args, holds_tensor: bool = True) -> None:
        """Queue a file job; one that holds a tensor first waits for the previous such job."""
        if holds_tensor:
            while any(holds for _, holds in self._pending):
                self._pending.popleft()[0].result()
        self._pending.append((self._io.submit(job, *args), holds_tensor))

    def _wait(self) -> None:
        """Wait for every queued job; the first error is raised here."""
        while self._pending:
            self._pending.popleft()[0].result()

    def _finish_shard(self) -> None:
        if self._handle is not None:
            self._submit(_flush_and_close, self._handle, holds_tensor=False)
            self._handle = None

    def close(self) -> None:
        if self._next != len(self._order):
            self.abort()
            raise RuntimeError(f"writer closed after {self._next} of {len(self._order)} tensors")
        self._finish_shard()
        self._wait()
        self._io.shutdown()
        if len(self.shards) > 1:
            weight_map = {
                tensor.name: self.file_names[i] for i, shard in enumerate(self.shards) for tensor in shard
            }
            total = sum(tensor.nbytes for shard in self.shards for tensor in shard)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        try:
            self._wait()
        except Exception:  # noqa: BLE001 - the caller is already handling the original failure
            pass
        self._io.shutdown()
        if self._handle is not None:
            self._handle.close()
            self._handle = None


_COPY_CHUNK = 64 * 2**20


def _copy_range(handle, stored: StoredTensor) -> None:
    """Append the stored tensor's bytes to ``handle``: os.copy_file_range (Linux; in-kernel, or a
    reflink on file systems that share blocks), else a plain read/write loop in bounded chunks."""
    handle.flush()
    position = handle.tell()
    source = os.open(stored.file, os.O_RDONLY)
    try:
        done = 0
        if hasattr(os, "copy_file_range"):
            try:
                while done < stored.nbytes:
                    count = os.copy_file_range(source, handle.fileno(), stored.nbytes - done, stored.offset + done, position + done)
                    if count == 0:
                        raise CorruptCheckpointError(f"{stored.file.name} ended while reading '{stored.name}'; re-download it")
                    done += count
            except OSError:
                done = 0  # not supported here (file system, kernel): fall back to copying through memory
        while done < stored.nbytes:
            chunk = os.pread(source, min(_COPY_CHUNK, stored.nbytes - done), stored.offset + done)
            if not chunk:
                raise CorruptCheckpointError(f"{stored.file.name} ended while reading '{stored.name}'; re-download it")
            os.pwrite(handle.fileno(), chunk, position + done)
            done += len(chunk)
    finally:
        os.close(source)
    handle.seek(position + stored.nbytes)


def _flush_and_close(handle) -> None:
    handle.flush()
    os.fsync(handle.fileno())
    handle.close()
