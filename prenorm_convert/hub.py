"""The hub: a hub id as SRC (fetch only what a conversion reads), and pushing a converted folder.

huggingface_hub does all the talking, so the standard cache, HF_TOKEN / --token, HF_HUB_OFFLINE
and HF_ENDPOINT behave exactly as they do for transformers. Every failure becomes one HubError
line (exit 2) raised before anything is written to OUT.
"""

from __future__ import annotations

import glob
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from .checkpoint import PICKLE_INDEX, PICKLE_SINGLE, SAFE_INDEX, SAFE_SINGLE, is_side_file
from .errors import BadInputError, CorruptCheckpointError, HubError
from .progress import SILENT, Reporter
from .safetensors_io import StoredTensor, read_header_from

CONFIG = "config.json"
REPORT = "conversion_report.json"
# `org/name` as the hub spells repository ids (the client validates the finer rules)
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class ResolvedSource:
    """A SRC argument made local: the folder holding its files, and what to record about its origin."""

    path: Path
    name: str  # what the user named: the hub id, or the local path as given
    revision: str | None = None  # the commit hash a hub source was read at; None for a local folder
    # set when only config.json and the index were fetched (``headers_only``): the safetensors files,
    # read from the hub by range requests; pass it to SourceCheckpoint.open
    shards: "HubShards | None" = field(default=None, compare=False, repr=False)

    @property
    def from_hub(self) -> bool:
        return self.revision is not None


def is_hub_id(src: str | os.PathLike) -> bool:
    """`org/name` that is not an existing path. Path objects, `./x`, `../x`, `/x`, `~/x` are always local."""
    if not isinstance(src, str):
        return False
    text = src
    if text.startswith((".", "/", "~", "\\")) or os.path.isabs(text) or os.path.exists(text):
        return False
    return HUB_ID.fullmatch(text) is not None


def resolve_source(
    src: str | os.PathLike | ResolvedSource,
    *,
    revision: str | None = None,
    token: str | None = None,
    allow_pickle: bool = False,
    reporter: Reporter = SILENT,
    headers_only: bool = False,
) -> ResolvedSource:
    """A local folder as is, or a hub id downloaded (config, weights, side files) into the hub cache.

    ``headers_only`` (what `inspect` needs): fetch config.json and the safetensors index, read each
    shard's header by range requests, and any tensor only when asked for (range requests again)
    instead of downloading the weights. Offline, from the cache, and for pickled weights (which
    have no header), the files are fetched or found as usual."""
    if isinstance(src, ResolvedSource):
        return src
    if not is_hub_id(src):
        if revision is not None:
            raise BadInputError(f"--revision applies to hub ids (org/name), and '{src}' is a local path")
        return ResolvedSource(Path(src), str(src))
    return download(str(src), revision=revision, token=token, allow_pickle=allow_pickle, reporter=reporter, headers_only=headers_only)


def recorded_revision(src: str | os.PathLike, converted: str | os.PathLike) -> str | None:
    """The commit a converted folder was made from, when SRC is the hub id it records as its source."""
    if not is_hub_id(src):
        return None
    try:
        block = json.loads((Path(converted) / CONFIG).read_text()).get("prenorm") or {}
    except (OSError, ValueError, AttributeError):
        return None
    if block.get("source") == src:
        return block.get("source_revision")
    return None


# -- download ---------------------------------------------------------------------------------


def download(
    repo_id: str,
    *,
    revision: str | None = None,
    token: str | None = None,
    allow_pickle: bool = False,
    reporter: Reporter = SILENT,
    headers_only: bool = False,
) -> ResolvedSource:
    from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download

    with _hub_errors(repo_id, revision), _hub_progress_bars(enabled=not reporter.quiet):
        if constants.is_offline_mode():
            return _from_cache(repo_id, revision, allow_pickle, "HF_HUB_OFFLINE is set", "unset HF_HUB_OFFLINE to download it")
        api = HfApi(token=token)
        try:
            with reporter.step(f"looking up {repo_id} on the hub"):
                # pins the revision to a commit and records branch/tag -> commit in the cache's refs/,
                # so a later offline run finds this snapshot by the same name
                pinned = api.resolve_revision(repo_id, revision=revision, token=token).resolved
                info = api.model_info(repo_id, revision=pinned, token=token)
        except _unreachable() as exc:
            why = f"the hub ({constants.ENDPOINT}) could not be reached ({type(exc).__name__})"
            return _from_cache(repo_id, revision, allow_pickle, why, "check the network or HF_ENDPOINT")
        commit = info.sha
        names = [sibling.rfilename for sibling in info.siblings or ()]

        def read_json(name: str) -> dict:
            return _read_json(Path(hf_hub_download(repo_id, name, revision=commit, token=token)))

        files = select_files(repo_id, commit, names, allow_pickle, read_json)
        shards = [name for name in files if name.endswith(".safetensors")]
        if headers_only and shards:
            files = [name for name in files if name in (CONFIG, SAFE_INDEX)]
        reporter.log(f"downloading {len(files)} files of {repo_id} at {commit[:12]} (the hub cache keeps them)")
        folder = Path(snapshot_download(repo_id, revision=commit, allow_patterns=[glob.escape(name) for name in files], token=token))
        if not (headers_only and shards):
            return ResolvedSource(folder, repo_id, commit)
        with reporter.step(f"reading the headers of {len(shards)} safetensors file(s), not their weights"):
            remote = HubShards(api, repo_id, commit, token, folder, shards)
    return ResolvedSource(folder, repo_id, commit, shards=remote)


class HubShards:
    """The safetensors files of one hub commit, read by HTTP range requests (checkpoint.Shards):
    every header when made (in parallel), tensor bytes only when read."""

    def __init__(self, api, repo_id: str, commit: str, token: str | None, folder: Path, names: list[str]):
        from huggingface_hub.utils import build_hf_headers

        self.api, self.repo_id, self.commit = api, repo_id, commit
        self.request_headers = build_hf_headers(token=token)
        self.folder = folder
        with ThreadPoolExecutor(max_workers=min(8, len(names))) as pool:
            self.headers = dict(zip(names, pool.map(self._read_header, names)))

    def header(self, file_name: str) -> dict[str, StoredTensor]:
        return self.headers[file_name]

    def open(self, file: Path) -> "RangeReader":
        from huggingface_hub import hf_hub_url

        url = hf_hub_url(self.repo_id, file.name, revision=self.commit, endpoint=self.api.endpoint)
        return RangeReader(url, self.request_headers, self.repo_id, self.commit)

    def _read_header(self, name: str) -> dict[str, StoredTensor]:
        reader = self.open(self.folder / name)
        reader.read(8)  # learns the file size; read_header_from reads these 8 bytes again, from memory
        return read_header_from(reader, self.folder / name, reader.size)


class RangeReader:
    """One hub file as a seekable binary reader: each read is one HTTP range request."""

    def __init__(self, url: str, request_headers: dict, repo_id: str, commit: str):
        self.url, self.request_headers, self.repo_id, self.commit = url, request_headers, repo_id, commit
        self.position = 0
        self.size = 0
        self.last: tuple[int, bytes] = (0, b"")  # the last range fetched: (start, bytes)

    def seek(self, position: int) -> None:
        self.position = position

    def read(self, count: int) -> bytes:
        from huggingface_hub import constants
        from huggingface_hub.utils import get_session, hf_raise_for_status

        if count <= 0:
            return b""
        start, kept = self.last
        if start <= self.position and self.position + count <= start + len(kept):
            data = kept[self.position - start : self.position - start + count]
            self.position += len(data)
            return data
        wanted = {"range": f"bytes={self.position}-{self.position + count - 1}"}
        headers = {**self.request_headers, **wanted}
        with _hub_errors(self.repo_id, self.commit):
            with get_session().stream("GET", self.url, headers=headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as response:
                if response.status_code >= 400:
                    response.read()
                    hf_raise_for_status(response)
                if response.status_code == 206:
                    data = response.read()
                    total = response.headers.get("Content-Range", "").rpartition("/")[2]
                    self.size = int(total) if total.isdigit() else self.size
                else:  # a server that ignores Range sends the whole file: keep only the range, stop there
                    self.size = int(response.headers.get("Content-Length") or 0)
                    data = _stream_slice(response.iter_bytes(), self.position, count)
        self.last = (self.position, data)
        self.position += len(data)
        return data

    def readinto(self, view) -> int:
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        pass


def _stream_slice(chunks: Iterator[bytes], start: int, count: int) -> bytes:
    """Bytes start..start+count of a stream, holding no more than those in memory."""
    kept, offset = bytearray(), 0
    for chunk in chunks:
        end = offset + len(chunk)
        if end > start:
            kept += chunk[max(0, start - offset) : start + count - offset]
        offset = end
        if offset >= start + count:
            break
    return bytes(kept)


def _from_cache(repo_id: str, revision: str | None, allow_pickle: bool, why: str, fix: str) -> ResolvedSource:
    """The snapshot the standard cache holds for this revision (its refs/ map branches and tags to commits)."""
    import huggingface_hub
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    at = f" at revision '{revision}'" if revision else ""
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, local_files_only=True, allow_patterns=[CONFIG]))
    except LocalEntryNotFoundError:
        raise HubError(
            f"'{repo_id}'{at} is not in the local hub cache ({constants.HF_HUB_CACHE}) and {why}; {fix}, "
            "or pass a local folder"
        ) from None
    commit = folder.name
    names = None
    cached_tree = getattr(huggingface_hub, "get_cached_repo_tree", None)
    if cached_tree is not None:
        try:
            names = [entry.path for entry in cached_tree(repo_id, revision=commit)]
        except Exception:  # no tree listing cached (a cache written by another tool): use the folder itself
            names = None
    if names is None:
        names = [entry.name for entry in folder.iterdir() if entry.is_file()]

    def incomplete(missing: list[str]) -> HubError:
        listed = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        return HubError(
            f"the cached snapshot of '{repo_id}' (commit {commit[:12]}) lacks {listed}, and {why}; "
            f"{fix} to complete it"
        )

    def read_json(name: str) -> dict:
        if not (folder / name).is_file():
            raise incomplete([name])
        return _read_json(folder / name)

    files = select_files(repo_id, commit, names, allow_pickle, read_json)
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        raise incomplete(missing)
    return ResolvedSource(folder, repo_id, commit)


def select_files(
    repo_id: str, commit: str, names: list[str], allow_pickle: bool, read_json: Callable[[str], dict]
) -> list[str]:
    """What a conversion reads: config.json, one weight format (safetensors first) and the top-level side files.

    Never pickles unless allowed, never other frameworks' weights, subfolders or the source's README.
    """
    top = {name for name in names if "/" not in name}
    where = f"hub repository '{repo_id}' (commit {commit[:12]})"
    if CONFIG not in top:
        raise HubError(f"{where} has no config.json, so it is not a transformers checkpoint")
    weights = _weight_files(top, SAFE_INDEX, SAFE_SINGLE, read_json)
    if not weights:
        if PICKLE_INDEX not in top and PICKLE_SINGLE not in top:
            raise HubError(f"{where} holds no weights ({SAFE_SINGLE}, {SAFE_INDEX} or {PICKLE_SINGLE})")
        if not allow_pickle:
            raise HubError(
                f"{where} stores its weights as pickled *.bin files, which can run code when loaded; "
                "pass --allow-pickle to download them and load them with torch.load(weights_only=True)"
            )
        weights = _weight_files(top, PICKLE_INDEX, PICKLE_SINGLE, read_json)
    side = [name for name in top if is_side_file(name)]
    return sorted({CONFIG, *side, *weights})


def _weight_files(top: set[str], index: str, single: str, read_json: Callable[[str], dict]) -> list[str]:
    if index in top:
        try:
            shards = sorted(set(read_json(index)["weight_map"].values()))
        except (KeyError, TypeError, AttributeError) as exc:
            raise CorruptCheckpointError(f"{index} is not a valid index (no weight_map); the repository is broken") from exc
        return [index, *shards]
    return [single] if single in top else []


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise CorruptCheckpointError(f"{path.name} downloaded from the hub is not valid JSON ({exc})") from exc


# -- push -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    url: str
    commit: str | None
    commit_url: str | None


def check_pushable(folder: str | os.PathLike, force: bool = False) -> dict | None:
    """The folder's conversion report, if it passed; a BadInputError unless it passed (or force)."""
    folder = Path(folder)
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError):
        config = None
    if not isinstance(config, dict) or "prenorm" not in config:
        raise BadInputError(f"'{folder}' is not a folder written by prenorm-convert (no config.json with a prenorm block)")
    report_path = folder / REPORT
    if not report_path.exists():
        if force:
            return None
        raise BadInputError(
            f"'{folder}' has no {REPORT} (converted with --no-verify?), so nothing shows it matches the original; "
            f"run `prenorm-convert verify ORIGINAL {folder} --json {report_path}` first, or pass --force to push it unverified"
        )
    try:
        report = json.loads(report_path.read_text())
    except ValueError:
        report = {"passed": None, "failures": [f"{REPORT} is not valid JSON"]}
    if not isinstance(report, dict):
        report = {"passed": None, "failures": [f"{REPORT} is not a JSON object"]}
    if report.get("passed") is not True and not force:
        failures = "; ".join(report.get("failures") or []) or "its report does not say passed"
        raise BadInputError(f"'{folder}' did not pass verification ({failures}); refusing to push it (--force pushes anyway)")
    return report


def push(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    force: bool = False,
    commit_message: str | None = None,
    reporter: Reporter = SILENT,
) -> PushResult:
    """Create REPO_ID if needed and upload the converted folder; refuses an unverified or failed folder unless force."""
    folder = Path(folder)
    check_pushable(folder, force)
    if HUB_ID.fullmatch(repo_id) is None:
        raise BadInputError(f"'{repo_id}' is not a hub repository id; use org/name or user/name")
    from huggingface_hub import HfApi, constants

    if constants.is_offline_mode():
        raise HubError("HF_HUB_OFFLINE is set, and pushing needs the hub; unset it to push")
    api = HfApi(token=token)
    message = commit_message or _commit_message(folder)
    with _hub_errors(repo_id, None, pushing=True), _hub_progress_bars(enabled=not reporter.quiet):
        with reporter.step(f"creating {repo_id} on the hub unless it exists"):
            repo_url = api.create_repo(repo_id, private=True if private else None, exist_ok=True, token=token)
        reporter.log(f"uploading {folder} to {repo_id}")
        info = api.create_commit(repo_id, _upload_operations(folder, repo_id), commit_message=message, token=token)
    return PushResult(repo_id, str(repo_url), getattr(info, "oid", None), getattr(info, "commit_url", None))


def _upload_operations(folder: Path, repo_id: str) -> list:
    """Every file of the folder (as upload_folder would send it, without .git/ and .cache/), the
    model card with its loading snippet naming repo_id."""
    from huggingface_hub import CommitOperationAdd

    from .card import card_for_repo

    operations = []
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if not path.is_file() or name.split("/")[0] in (".git", ".cache"):
            continue
        content = card_for_repo(path.read_text(), repo_id).encode() if name == "README.md" else str(path)
        operations.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=content))
    return operations


def _commit_message(folder: Path) -> str:
    from . import __version__

    block = json.loads((folder / CONFIG).read_text())["prenorm"]
    return f"{block.get('family', 'model')} converted to {block.get('target', 'rmsnorm')} by prenorm-convert {__version__}"


# -- huggingface_hub plumbing -----------------------------------------------------------------


def _unreachable() -> tuple[type[BaseException], ...]:
    """The client's 'the hub cannot be reached' exceptions (RevisionResolutionError: and no ref is cached)."""
    import httpx2
    from huggingface_hub.errors import OfflineModeIsEnabled, RevisionResolutionError

    return (httpx2.ConnectError, httpx2.TimeoutException, OfflineModeIsEnabled, RevisionResolutionError)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


@contextmanager
def _hub_errors(repo_id: str, revision: str | None, pushing: bool = False) -> Iterator[None]:
    """The client's exceptions, as one line naming the problem and the fix."""
    from huggingface_hub import constants
    from huggingface_hub import errors as hf

    token_hint = "pass a token (--token or HF_TOKEN)"
    try:
        yield
    except HubError:
        raise
    except hf.GatedRepoError:
        raise HubError(
            f"hub repository '{repo_id}' is gated: accept its conditions at {constants.ENDPOINT}/{repo_id} with your "
            "account, then pass that account's token (--token or HF_TOKEN)"
        ) from None
    except hf.RevisionNotFoundError:
        raise HubError(
            f"revision '{revision or 'main'}' does not exist in hub repository '{repo_id}'; "
            "pass a branch, tag or commit hash that does (--revision)"
        ) from None
    except hf.RepositoryNotFoundError:
        if pushing:
            raise HubError(f"hub repository '{repo_id}' could not be created or found with this token; {token_hint} with write access") from None
        raise HubError(
            f"hub repository '{repo_id}' was not found, or it is private and this token cannot see it; "
            f"check the id, or {token_hint}"
        ) from None
    except hf.HFValidationError as exc:
        raise HubError(f"'{repo_id}' (revision {revision or 'main'}) is not valid for the hub: {_first_line(exc)}") from None
    except hf.LocalEntryNotFoundError:
        raise HubError(
            f"could not download '{repo_id}': the hub stopped answering and the files are not in the local cache; "
            "check the network and retry"
        ) from None
    except hf.HfHubHTTPError as exc:
        status = exc.response.status_code if getattr(exc, "response", None) is not None else None
        if status == 401:
            raise HubError(f"the hub rejected the token (HTTP 401) for '{repo_id}'; {token_hint} that is valid") from None
        if status == 403 and pushing:
            raise HubError(f"this token may not write to '{repo_id}' (HTTP 403); use a token with write access to that namespace") from None
        action = "the upload to" if pushing else "the download of"
        raise HubError(f"the hub refused {action} '{repo_id}' (HTTP {status}): {_first_line(exc)}") from None
    except _unreachable() as exc:
        raise HubError(f"could not reach the hub at {constants.ENDPOINT} ({type(exc).__name__}); check the network or HF_ENDPOINT") from None
    except ValueError as exc:
        if pushing:  # e.g. README metadata the hub rejects
            raise HubError(f"the hub refused the upload to '{repo_id}': {_first_line(exc)}") from None
        raise


@contextmanager
def _hub_progress_bars(enabled: bool) -> Iterator[None]:
    """huggingface_hub's own download/upload bars (stderr) follow --quiet."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    silence = not enabled and not are_progress_bars_disabled()
    if silence:
        disable_progress_bars()
    try:
        yield
    finally:
        if silence:
            enable_progress_bars()
