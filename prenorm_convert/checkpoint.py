"""Source checkpoints: find config and weights, cross-check them, read tensors lazily."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator, Protocol

import torch

from .errors import BadInputError, CorruptCheckpointError
from .safetensors_io import DTYPE_NAMES, DTYPES, StoredTensor, read_header, read_tensor, row_block

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
# files a conversion rewrites (or must not carry over); every other top-level file is copied as-is
# (weights of any framework, and pickles of any kind: a hub download never fetches these as side files)
_NOT_COPIED_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf",
    ".ot", ".tflite", ".mlmodel", ".pkl", ".pickle", ".joblib", ".npy", ".npz", ".nemo", ".tar", ".gz", ".zip",
)
_NOT_COPIED_NAMES = {"config.json", SAFE_INDEX, PICKLE_INDEX, "README.md", "conversion_report.json", "modeling_prenorm.py"}


def is_side_file(name: str) -> bool:
    """A top-level file copied unchanged into the output (tokenizer, generation config, ...)."""
    return not name.startswith(".") and name not in _NOT_COPIED_NAMES and not name.endswith(_NOT_COPIED_SUFFIXES)


class Shards(Protocol):
    """Where the safetensors files of a checkpoint are read from."""

    def header(self, file_name: str) -> dict[str, StoredTensor]: ...

    def open(self, file: Path) -> BinaryIO: ...


class LocalShards:
    """The files next to config.json."""

    def __init__(self, path: Path):
        self.path = path

    def header(self, file_name: str) -> dict[str, StoredTensor]:
        shard = self.path / file_name
        if not shard.exists():
            raise CorruptCheckpointError(f"{SAFE_INDEX} refers to shard {file_name}, which is missing; re-download it")
        return read_header(shard)

    def open(self, file: Path) -> BinaryIO:
        return open(file, "rb")


class SourceCheckpoint:
    """A transformers checkpoint: its config and a lazy view of its weights."""

    def __init__(self, path: Path, config: dict, tensors: dict[str, StoredTensor], pickled: bool, shards: Shards | None = None):
        self.path = path
        self.config = config
        self.tensors = tensors
        self.pickled = pickled
        self.shards = shards or LocalShards(path)
        self._handles: dict[Path, object] = {}

    # -- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, allow_pickle: bool = False, shards: Shards | None = None) -> "SourceCheckpoint":
        """``shards``: where the safetensors files are read from when ``path`` holds only config.json
        and the index (a hub source read by range requests, for `inspect`)."""
        path = Path(path)
        if not path.exists():
            raise BadInputError(f"'{path}' does not exist; pass a checkpoint folder (holding config.json and weights)")
        if not path.is_dir():
            raise BadInputError(f"'{path}' is a file, not a checkpoint folder; pass the folder that holds config.json")
        config = read_config(path)
        if "prenorm" in config:
            target = config["prenorm"].get("target", "?")
            raise BadInputError(
                f"'{path}' was already converted by prenorm-convert (target {target}); convert the original checkpoint instead"
            )
        if shards is not None or weights_format(path, allow_pickle) == "safetensors":
            shards = shards or LocalShards(path)
            return cls(path, config, _safetensors_tensors(path, shards), pickled=False, shards=shards)
        return cls(path, config, _pickle_tensors(path), pickled=True)

    # -- reading -------------------------------------------------------------------------
    def read(self, name: str) -> torch.Tensor:
        """One tensor, as stored (a positioned read of its bytes; nothing else is loaded)."""
        info = self.tensors[name]
        if info.file not in self._handles:
            self._handles[info.file] = _load_pickle(info.file) if self.pickled else self.shards.open(info.file)
        handle = self._handles[info.file]
        return handle[name] if self.pickled else read_tensor(handle, info)

    def read_rows(self, name: str, start: int, stop: int, into: torch.Tensor | None = None) -> torch.Tensor:
        """Rows start..stop (leading axis) of one tensor, as stored; only those bytes are read
        (into ``into`` when given: the result is then a view of that reused buffer)."""
        if self.pickled:
            return self.read(name)[start:stop]
        info = self.tensors[name]
        if info.file not in self._handles:
            self._handles[info.file] = self.shards.open(info.file)
        return read_tensor(self._handles[info.file], row_block(info, start, stop), into)

    def close(self) -> None:
        for handle in self._handles.values():
            if hasattr(handle, "close"):
                handle.close()
        self._handles.clear()

    def side_files(self) -> list[Path]:
        """Tokenizer, generation config and other files copied unchanged into the output."""
        return sorted(
            entry
            for entry in self.path.iterdir()
            if entry.is_file() and is_side_file(entry.name)
        )

    @property
    def weight_bytes(self) -> int:
        total = 0
        for info in self.tensors.values():
            numel = 1
            for dim in info.shape:
                numel *= dim
            total += numel * torch.empty((), dtype=_torch_dtype(info.dtype)).element_size()
        return total

    def stored_dtype(self) -> torch.dtype:
        """The dtype most floating-point weights are stored in."""
        sizes: dict[str, int] = {}
        for info in self.tensors.values():
            if _torch_dtype(info.dtype).is_floating_point:
                numel = 1
                for dim in info.shape:
                    numel *= dim
                sizes[info.dtype] = sizes.get(info.dtype, 0) + numel
        if not sizes:
            return torch.float32
        return _torch_dtype(max(sizes, key=sizes.get))


def weights_format(path: Path, allow_pickle: bool) -> str:
    """'safetensors' or 'pickle' (only when allowed): how the folder stores its weights."""
    if (path / SAFE_INDEX).exists() or (path / SAFE_SINGLE).exists():
        return "safetensors"
    if (path / PICKLE_INDEX).exists() or (path / PICKLE_SINGLE).exists():
        if not allow_pickle:
            raise BadInputError(
                f"'{path}' stores its weights as pickled *.bin files, which can run code when loaded; "
                "re-save them as safetensors, or pass --allow-pickle to load them with torch.load(weights_only=True)"
            )
        return "pickle"
    raise BadInputError(f"'{path}' holds no weights (no {SAFE_SINGLE}, {SAFE_INDEX} or {PICKLE_SINGLE}); is the download complete?")


def read_config(path: Path) -> dict:
    config_path = path / "config.json"
    if not config_path.exists():
        raise BadInputError(f"'{path}' is not a transformers checkpoint: it has no config.json")
    try:
        config = json.loads(config_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadInputError(f"'{config_path}' is not valid JSON ({exc}); re-download the checkpoint") from exc
    if not isinstance(config, dict) or "model_type" not in config:
        raise BadInputError(f"'{config_path}' has no model_type, so it is not a transformers model config")
    return config


def _torch_dtype(name: str) -> torch.dtype:
    return DTYPES[name]


def _safetensors_tensors(path: Path, shards: Shards) -> dict[str, StoredTensor]:
    index_path = path / SAFE_INDEX
    if not index_path.exists():
        return shards.header(SAFE_SINGLE)
    try:
        weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptCheckpointError(f"{SAFE_INDEX} is not a valid index (no weight_map); re-download it") from exc
    headers = {file_name: shards.header(file_name) for file_name in sorted(set(weight_map.values()))}
    tensors = {}
    for name, file_name in weight_map.items():
        if name not in headers[file_name]:
            raise CorruptCheckpointError(
                f"{SAFE_INDEX} says tensor '{name}' is in {file_name}, but that shard does not hold it; "
                "the index and shards are from different versions: re-download the checkpoint"
            )
        tensors[name] = headers[file_name][name]
    return tensors


def _load_pickle(file: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        # legacy (non-zip) pickles cannot be memory-mapped
        try:
            return torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CorruptCheckpointError(f"{file.name} cannot be loaded safely ({exc})") from exc
    except Exception as exc:
        raise CorruptCheckpointError(f"{file.name} cannot be loaded with weights_only=True ({exc})") from exc


def _pickle_tensors(path: Path) -> dict[str, StoredTensor]:
    index_path = path / PICKLE_INDEX
    if index_path.exists():
        files = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
    else:
        files = [PICKLE_SINGLE]
    tensors = {}
    for file_name in files:
        file = path / file_name
        if not file.exists():
            raise CorruptCheckpointError(f"{PICKLE_INDEX} refers to {file_name}, which is missing; re-download it")
        for name, tensor in _load_pickle(file).items():
            tensors[name] = StoredTensor(name, DTYPE_NAMES[tensor.dtype], tuple(tensor.shape), file)
    return tensors


# -- output folder --------------------------------------------------------------------------


def check_output_location(src: Path, out: Path) -> None:
    """OUT may be neither SRC, nor a folder holding SRC, nor inside SRC (paths compared resolved:
    `..` and symlinks followed), so that replacing OUT can never touch the original."""
    src_real, out_real = Path(src).resolve(), Path(out).resolve()
    holds_src = out_real == src_real or out_real in src_real.parents
    if not holds_src and out_real.exists():  # the same folder under another spelling (case-insensitive disks, bind mounts)
        holds_src = any(os.path.samefile(out_real, folder) for folder in (src_real, *src_real.parents))
    if holds_src:
        raise BadInputError(
            f"OUT '{out}' is SRC or a folder that holds it, and OUT gets replaced; the original checkpoint is never "
            "modified: choose another output folder"
        )
    if src_real in out_real.parents:
        raise BadInputError(f"OUT '{out}' is inside SRC '{src}'; write the converted checkpoint outside the original's folder")


@contextmanager
def atomic_output_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling of OUT; on success it replaces OUT, on any failure it vanishes.

    An existing OUT is untouched unless everything succeeded and overwrite was asked for; an OUT
    that appears while the work runs is never replaced without overwrite. OUT gets the permissions
    of a folder made with mkdir under the current umask (not mkdtemp's private 0700).
    """
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise BadInputError(f"'{out}' already exists; pass --overwrite to replace it, or choose another output folder")
    if out.exists() and not out.is_dir():
        raise BadInputError(f"'{out}' exists and is not a folder; remove it or choose another output folder")
    if not out.parent.exists():
        raise BadInputError(f"the parent folder of '{out}' does not exist; create it first")
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        os.chmod(staging, 0o777 & ~_umask())
        yield staging
        if out.exists() and not overwrite:
            raise BadInputError(f"'{out}' appeared while converting; it was left as it is (pass --overwrite to replace it)")
        _replace_folder(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _replace_folder(staging: Path, out: Path) -> None:
    if not out.exists():
        os.replace(staging, out)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, retired / out.name)
    try:
        os.replace(staging, out)
    except BaseException:
        os.replace(retired / out.name, out)  # put the previous OUT back
        retired.rmdir()
        raise
    shutil.rmtree(retired, ignore_errors=True)


def _umask() -> int:
    """The process umask, read without changing it where the kernel says it (Linux), since setting it
    even briefly races with other threads creating files."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
