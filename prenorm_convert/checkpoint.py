"""Source checkpoints: find config and weights, cross-check them, read tensors lazily."""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import stat
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path, PureWindowsPath
from typing import BinaryIO, Callable, Iterator, Protocol

import torch

from .errors import BadInputError, CorruptCheckpointError, option
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
_NOT_COPIED_NAMES = {"config.json", SAFE_INDEX, PICKLE_INDEX, "README.md", "conversion_report.json", "modeling_prenorm.py", "norm_functions.py"}


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
        return read_header(local_file(self.path, file_name, SAFE_INDEX if file_name != SAFE_SINGLE else "the checkpoint"))

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
                f"re-save them as safetensors, or pass {option('--allow-pickle')} to load them with torch.load(weights_only=True)"
            )
        return "pickle"
    raise BadInputError(f"'{path}' holds no weights (no {SAFE_SINGLE}, {SAFE_INDEX} or {PICKLE_SINGLE}); is the download complete?")


def read_config(path: Path) -> dict:
    config_path = path / "config.json"
    if not config_path.exists():
        raise BadInputError(f"'{path}' is not a transformers checkpoint: it has no config.json")
    _check_regular(config_path, "config.json")
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
    weight_map = _read_weight_map(index_path)
    files = sorted(set(weight_map.values()))
    if isinstance(shards, LocalShards):  # every shard checked before any is opened
        for file_name in files:
            local_file(path, file_name, SAFE_INDEX)
    headers = {file_name: shards.header(file_name) for file_name in files}
    tensors = {}
    for name, file_name in weight_map.items():
        if name not in headers[file_name]:
            raise CorruptCheckpointError(
                f"{SAFE_INDEX} says tensor '{name}' is in {file_name}, but that shard does not hold it; "
                "the index and shards are from different versions: re-download the checkpoint"
            )
        tensors[name] = headers[file_name][name]
    return tensors


def _read_weight_map(index_path: Path) -> dict[str, str]:
    """A local index's weight_map, checked by checked_weight_map."""
    index_name = index_path.name
    _check_regular(index_path, index_name)
    try:
        content = json.loads(index_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(f"{index_name} is not a valid index (no weight_map); re-download it") from exc
    return checked_weight_map(content, index_name, "re-download it")


def checked_weight_map(content: object, index_name: str, fix: str) -> dict[str, str]:
    """An index's weight_map (tensor name -> shard file name) from its parsed JSON, every file name
    checked by check_shard_name: nothing outside the checkpoint folder (or hub repository) is ever
    named. ``fix`` ends the message of a malformed index (local: re-download; hub: the repo is broken)."""
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if weight_map is None:
        raise CorruptCheckpointError(f"{index_name} is not a valid index (no weight_map); {fix}")
    if not isinstance(weight_map, dict):
        raise CorruptCheckpointError(f"{index_name} is not a valid index (its weight_map is not a JSON object); {fix}")
    for name, file_name in weight_map.items():
        check_shard_name(file_name, index_name, name)
    return weight_map


def check_shard_name(file_name: object, index_name: str, tensor: str) -> None:
    """A shard name from an index must be a plain relative path inside the checkpoint folder:
    a non-empty string of '/'-separated parts, none of them empty, '.' or '..', no backslash,
    no NUL, not absolute and no drive (on any OS)."""
    shown = repr(file_name) if isinstance(file_name, str) else json.dumps(file_name, default=str)
    shown = shown if len(shown) <= 80 else shown[:80] + "…"
    problem = None
    if not isinstance(file_name, str) or not file_name:
        problem = "is not a file name"
    elif "\\" in file_name or "\0" in file_name or not file_name.isprintable():
        problem = "holds a backslash or control character"
    elif file_name.startswith("/") or PureWindowsPath(file_name).drive or PureWindowsPath(file_name).root:
        problem = "is an absolute path"
    elif any(part in ("", ".", "..") for part in file_name.split("/")):
        problem = "is not a plain relative path (it has an empty, '.' or '..' part)"
    if problem is not None:
        raise CorruptCheckpointError(
            f"{index_name} maps tensor '{tensor}' to shard {shown}, which {problem}; shard names must be files "
            "inside the checkpoint folder: fix the index or re-download the checkpoint"
        )


def local_file(folder: Path, file_name: str, named_by: str) -> Path:
    """``folder / file_name`` checked before it is opened: its parent folders (symlinks followed)
    lie inside ``folder``, and it is an existing regular file (a symlink to one is fine: a hub cache
    snapshot links every file to ../../blobs/<hash>)."""
    file = folder / file_name
    if "/" in file_name:
        root, parent = folder.resolve(), file.parent.resolve()
        if parent != root and root not in parent.parents:
            raise CorruptCheckpointError(
                f"{named_by} names {file_name}, whose folder leads outside the checkpoint folder (a symlink); "
                "shards must be files inside the checkpoint folder: fix the index or re-download the checkpoint"
            )
    if not file.exists():
        raise CorruptCheckpointError(f"{named_by} refers to {file_name}, which is missing; re-download it")
    _check_regular(file, file_name)
    return file


def _check_regular(file: Path, shown: str) -> None:
    """A FIFO, device or folder where a file belongs is refused before anything opens it (a FIFO
    would block forever)."""
    try:
        mode = file.stat().st_mode
    except OSError as exc:
        raise CorruptCheckpointError(f"{shown} cannot be read ({exc.strerror or exc}); re-download the checkpoint") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        raise CorruptCheckpointError(f"{shown} in the checkpoint is {kind}, not a regular file; replace it with the real file")


def converted_folder_config(path: str | Path) -> dict:
    """config.json of a folder written by prenorm-convert (it has a prenorm block); BadInputError
    otherwise (no folder, no or unreadable config.json, or no prenorm block)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        config = None
    if not isinstance(config, dict) or not isinstance(config.get("prenorm"), dict):
        raise BadInputError(f"'{path}' is not a folder written by prenorm-convert (its config.json has no prenorm block)")
    return config


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
        files, named_by = sorted(set(_read_weight_map(index_path).values())), PICKLE_INDEX
    else:
        files, named_by = [PICKLE_SINGLE], "the checkpoint"
    local = [local_file(path, file_name, named_by) for file_name in files]  # every file checked before any is loaded
    tensors = {}
    for file in local:
        state = _load_pickle(file)
        if not isinstance(state, dict) or not all(isinstance(name, str) and isinstance(t, torch.Tensor) for name, t in state.items()):
            raise CorruptCheckpointError(f"{file.name} does not hold a state dict (tensor names -> tensors); re-download it")
        for name, tensor in state.items():
            if tensor.dtype not in DTYPE_NAMES:
                raise CorruptCheckpointError(
                    f"{file.name}: tensor '{name}' is stored as {str(tensor.dtype).removeprefix('torch.')}, which prenorm-convert "
                    "does not read; convert float16/bfloat16/float32 weights"
                )
            tensors[name] = StoredTensor(name, DTYPE_NAMES[tensor.dtype], tuple(tensor.shape), file)
    return tensors


# -- output folder --------------------------------------------------------------------------


def check_path_encoding(path: str | os.PathLike, what: str) -> None:
    """Paths must be valid UTF-8: safetensors and transformers cannot open any other (a bad input, exit 2)."""
    try:
        os.fspath(Path(path).absolute()).encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        raise BadInputError(f"{what} '{shown}' is not a valid UTF-8 path, which safetensors cannot open; rename it") from None


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


OWNER_FILE = ".prenorm-owner.json"  # in a staging folder while it is written: which process owns it
_UNOWNED_GRACE_SECONDS = 60  # a staging folder without an owner file is a just-made one, or stale after this


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (Linux clock ticks), to tell it from a later process with the same pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def _claim(staging: Path) -> None:
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": _process_start(os.getpid())}
    (staging / OWNER_FILE).write_text(json.dumps(owner))


def _owner_alive(folder: Path) -> bool | None:
    """True: a live process owns the staging folder; False: nobody does (stale); None: cannot tell (another host)."""
    try:
        owner = json.loads((folder / OWNER_FILE).read_text())
        pid, host, started = int(owner["pid"]), owner["host"], owner.get("started")
    except FileNotFoundError:
        age = time.time() - folder.stat().st_mtime
        return age < _UNOWNED_GRACE_SECONDS
    except (OSError, ValueError, KeyError, TypeError):
        return False  # an owner file we cannot read was not written by a run that is still going
    if host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    return started is None or _process_start(pid) in (None, started)


def remove_stale_partials(out: Path) -> list[Path]:
    """Remove the staging folders of OUT that interrupted runs (kill -9, power loss) left behind and no
    live process owns; returns them. Folders owned on another host are left alone."""
    removed = []
    for folder in sorted(out.parent.glob(f".{glob.escape(out.name)}.partial-*")):
        if folder.is_dir() and not folder.is_symlink() and _owner_alive(folder) is False:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


@contextmanager
def atomic_output_dir(out: Path, overwrite: bool, on_stale: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of OUT; on success it replaces OUT, on any failure it vanishes.

    An existing OUT is untouched unless everything succeeded and overwrite was asked for; an OUT
    that appears while the work runs is never replaced without overwrite. OUT gets the permissions
    of a folder made with mkdir under the current umask (not mkdtemp's private 0700).
    """
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise BadInputError(f"'{out}' already exists; pass {option('--overwrite')} to replace it, or choose another output folder")
    if out.exists() and not out.is_dir():
        raise BadInputError(f"'{out}' exists and is not a folder; remove it or choose another output folder")
    if not out.parent.exists():
        raise BadInputError(f"the parent folder of '{out}' does not exist; create it first")
    for stale in remove_stale_partials(out):
        if on_stale is not None:
            on_stale(stale)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        _claim(staging)
        os.chmod(staging, 0o777 & ~_umask())
        yield staging
        if out.exists() and not overwrite:
            raise BadInputError(f"'{out}' appeared while converting; it was left as it is (pass {option('--overwrite')} to replace it)")
        (staging / OWNER_FILE).unlink()
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
