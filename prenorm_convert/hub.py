"""The hub: a hub id as SRC (fetch only what a conversion reads), and pushing a converted folder.

huggingface_hub does all the talking, so the standard cache, HF_TOKEN / --token, HF_HUB_OFFLINE
and HF_ENDPOINT behave exactly as they do for transformers. Every failure becomes one HubError
line (exit 2) raised before anything is written to OUT. Every request times out (see
hub_timeouts): a hub that accepts connections and never answers cannot hang a command.
"""

from __future__ import annotations

import glob
import json
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from .checkpoint import PICKLE_INDEX, PICKLE_SINGLE, SAFE_INDEX, SAFE_SINGLE, checked_weight_map, converted_folder_config, is_side_file
from .digests import changed_files
from .errors import BadInputError, CorruptCheckpointError, HubError, option
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
            reason = _timeout_reason(exc) or f"could not be reached ({type(exc).__name__})"
            why = f"the hub ({constants.ENDPOINT}) {reason}"
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
        if file_name not in self.headers:
            raise CorruptCheckpointError(
                f"{SAFE_INDEX} of hub repository '{self.repo_id}' (commit {self.commit[:12]}) names {file_name!r} "
                "as a shard, which is not a safetensors file; the repository is broken"
            )
        return self.headers[file_name]

    def open(self, file: Path) -> "RangeReader":
        from huggingface_hub import hf_hub_url

        name = file.relative_to(self.folder).as_posix() if file.is_relative_to(self.folder) else file.name
        url = hf_hub_url(self.repo_id, name, revision=self.commit, endpoint=self.api.endpoint)
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
            with get_session().stream("GET", self.url, headers=headers, timeout=hub_timeouts()[1]) as response:
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
    names, complete_listing = None, True
    cached_tree = getattr(huggingface_hub, "get_cached_repo_tree", None)
    if cached_tree is not None:
        try:
            names = [entry.path for entry in cached_tree(repo_id, revision=commit)]
        except Exception:  # no tree listing cached (a cache written by another tool): use the folder itself
            names = None
    if names is None:  # what the folder holds is not the repository's file list: a missing shard is "not cached"
        names, complete_listing = [entry.name for entry in folder.iterdir() if entry.is_file()], False

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

    files = select_files(repo_id, commit, names, allow_pickle, read_json, complete_listing)
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        raise incomplete(missing)
    return ResolvedSource(folder, repo_id, commit)


def select_files(
    repo_id: str,
    commit: str,
    names: list[str],
    allow_pickle: bool,
    read_json: Callable[[str], dict],
    complete_listing: bool = True,
) -> list[str]:
    """What a conversion reads: config.json, one weight format (safetensors first) and the top-level side files.

    Never pickles unless allowed, never other frameworks' weights, subfolders or the source's README.
    An index may name only files of this repository at this commit (``names``, when ``complete_listing``).
    """
    top = {name for name in names if "/" not in name}
    where = f"hub repository '{repo_id}' (commit {commit[:12]})"
    if CONFIG not in top:
        raise HubError(f"{where} has no config.json, so it is not a transformers checkpoint")
    listed = set(names) if complete_listing else None
    weights = _weight_files(where, top, listed, SAFE_INDEX, SAFE_SINGLE, read_json)
    if not weights:
        if PICKLE_INDEX not in top and PICKLE_SINGLE not in top:
            raise HubError(f"{where} holds no weights ({SAFE_SINGLE}, {SAFE_INDEX} or {PICKLE_SINGLE})")
        if not allow_pickle:
            raise HubError(
                f"{where} stores its weights as pickled *.bin files, which can run code when loaded; "
                "pass --allow-pickle to download them and load them with torch.load(weights_only=True)"
            )
        weights = _weight_files(where, top, listed, PICKLE_INDEX, PICKLE_SINGLE, read_json)
    side = [name for name in top if is_side_file(name)]
    return sorted({CONFIG, *side, *weights})


def _weight_files(
    where: str, top: set[str], listed: set[str] | None, index: str, single: str, read_json: Callable[[str], dict]
) -> list[str]:
    if index in top:
        return [index, *_index_shards(where, read_json(index), index, listed)]
    return [single] if single in top else []


def _index_shards(where: str, content: object, index: str, listed: set[str] | None) -> list[str]:
    """The shard files an index names, checked before any is fetched or read: each a plain relative
    name (check_shard_name) and, when the repository's file list is known, one of its files. So an
    index cannot reach another repository's files in the cache, nor anything else on disk."""
    weight_map = checked_weight_map(content, f"{index} of {where}", "the repository is broken")
    for tensor, file_name in weight_map.items():
        if listed is not None and file_name not in listed:
            raise CorruptCheckpointError(
                f"{index} of {where} maps tensor '{tensor}' to shard {file_name!r}, which is not a file of that "
                f"repository at that commit; refusing to read it: fix the repository's index, or pick another {option('--revision')}"
            )
    return sorted(set(weight_map.values()))


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
    """The folder's conversion report when it vouches for the folder as it is now (its files_sha256
    matches the files); a BadInputError when the report is missing, failed or describes other files,
    unless force (then None when no report describes these files: the card keeps its own section)."""
    folder = Path(folder)
    converted_folder_config(folder)
    report_path = folder / REPORT
    verify_again = f"run `prenorm-convert verify ORIGINAL {folder} --json {report_path}`"
    if not report_path.exists():
        if force:
            return None
        raise BadInputError(
            f"'{folder}' has no {REPORT} (converted with --no-verify?), so nothing shows it matches the original; "
            f"{verify_again} first, or pass {option('--force')} to push it unverified"
        )
    report = _read_report(report_path)
    if report.get("passed") is not True and not force:
        failures = "; ".join(str(f) for f in report.get("failures") or []) or "its report does not say passed"
        raise BadInputError(f"'{folder}' did not pass verification ({failures}); refusing to push it ({option('--force')} pushes anyway)")
    problem = _report_mismatch(folder, report)
    if problem is None:
        return report
    if force:
        return None
    raise BadInputError(f"'{folder}' {problem}; {verify_again} again, or pass {option('--force')} to push it anyway")


def _read_report(report_path: Path) -> dict:
    try:
        report = json.loads(report_path.read_text())
    except ValueError:
        return {"passed": None, "failures": [f"{REPORT} is not valid JSON"]}
    if not isinstance(report, dict):
        return {"passed": None, "failures": [f"{REPORT} is not a JSON object"]}
    return report


def _report_mismatch(folder: Path, report: dict) -> str | None:
    """Why the report does not vouch for the folder's files as they are now; None when it does."""
    recorded = report.get("files_sha256")
    valid = isinstance(recorded, dict) and all(isinstance(v, str) for v in recorded.values())
    if not valid:
        return (
            f"has a {REPORT} without valid files_sha256 (written by an older prenorm-convert?), "
            "so nothing ties it to the files it would push"
        )
    changed = changed_files(folder, recorded)
    if not changed:
        return None
    shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
    return f"changed after it was verified: {shown} no longer match{'es' if len(changed) == 1 else ''} what its {REPORT} vouches for"


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
    """Create REPO_ID if needed and upload the converted folder; refuses a folder that is unverified, failed,
    or changed since its report was written (check_pushable), unless force."""
    folder = Path(folder)
    report = check_pushable(folder, force)
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
        operations = _upload_operations(folder, repo_id, report)
        info = api.create_commit(repo_id, operations, commit_message=message, token=token)
    return PushResult(repo_id, str(repo_url), getattr(info, "oid", None), getattr(info, "commit_url", None))


def _upload_operations(folder: Path, repo_id: str, report: dict | None) -> list:
    """Every file of the folder (as upload_folder would send it, without .git/ and .cache/), the
    model card with its loading snippet naming repo_id and its report section showing ``report``
    (which `verify --json` may have written after the card)."""
    from huggingface_hub import CommitOperationAdd

    from .card import card_for_repo

    operations = []
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if not path.is_file() or name.split("/")[0] in (".git", ".cache"):
            continue
        content = card_for_repo(path.read_text(), repo_id, report).encode() if name == "README.md" else str(path)
        operations.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=content))
    return operations


def _commit_message(folder: Path) -> str:
    from ._version import __version__

    block = json.loads((folder / CONFIG).read_text())["prenorm"]
    return f"{block.get('family', 'model')} converted to {block.get('target', 'rmsnorm')} by prenorm-convert {__version__}"


# -- timeouts -----------------------------------------------------------------------------------

# seconds without an answer, when HF_HUB_ETAG_TIMEOUT / HF_HUB_DOWNLOAD_TIMEOUT are not set
METADATA_TIMEOUT = 10.0
TRANSFER_TIMEOUT = 30.0
_TIMEOUT_LOCK = threading.Lock()


def hub_timeouts() -> tuple[float, float]:
    """(metadata, transfer) timeouts in seconds, read now: HF_HUB_ETAG_TIMEOUT for metadata calls,
    HF_HUB_DOWNLOAD_TIMEOUT for file downloads and uploads (huggingface_hub's variables), else the defaults."""
    return _env_seconds("HF_HUB_ETAG_TIMEOUT", METADATA_TIMEOUT), _env_seconds("HF_HUB_DOWNLOAD_TIMEOUT", TRANSFER_TIMEOUT)


def _env_seconds(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name, ""))
    except ValueError:
        return default
    return value if value > 0 and value != float("inf") else default


def _request_limit(request) -> tuple[float, str]:
    """The timeout a request gets, and the variable that sets it."""
    metadata, transfer = hub_timeouts()
    path = request.url.path
    if request.method == "PUT" or "/resolve/" in path or "/commit/" in path:
        return transfer, "HF_HUB_DOWNLOAD_TIMEOUT"
    return metadata, "HF_HUB_ETAG_TIMEOUT"


def _cap_timeouts(request) -> None:
    """A request hook: no phase of a request (connect, each read or write, waiting for a pooled
    connection) waits longer than its limit. Most HfApi calls pass timeout=None, which means none."""
    limit, _ = _request_limit(request)
    asked = request.extensions.get("timeout") or {}
    request.extensions["timeout"] = {
        phase: limit if asked.get(phase) is None else min(asked[phase], limit) for phase in ("connect", "read", "write", "pool")
    }


def _bound_timeouts() -> None:
    """Makes every client huggingface_hub creates from now on cap its requests' timeouts (_cap_timeouts):
    its default client has no timeout. Wraps whatever client factory is set (a user's proxy settings stay)."""
    from huggingface_hub.utils import _http, set_client_factory

    with _TIMEOUT_LOCK:
        current = getattr(_http, "_GLOBAL_CLIENT_FACTORY", _http.default_client_factory)
        if getattr(current, "caps_timeouts", False):
            return

        def capped_client():
            client = current()
            hooks = client.event_hooks
            client.event_hooks = {**hooks, "request": [*hooks.get("request", []), _cap_timeouts]}
            return client

        capped_client.caps_timeouts = True
        set_client_factory(capped_client)  # closes the current client: the next call makes a capped one


def _timeout_reason(exc: BaseException) -> str | None:
    """'did not answer within N s (...)' when a request in the exception's chain timed out, else None."""
    import httpx2

    seen: BaseException | None = exc
    for _ in range(16):  # a chain is short; a cycle is not followed forever
        if seen is None:
            return None
        if isinstance(seen, httpx2.TimeoutException):
            try:
                request = seen.request
            except RuntimeError:  # raised without its request
                return "did not answer in time (the limit HF_HUB_ETAG_TIMEOUT / HF_HUB_DOWNLOAD_TIMEOUT sets)"
            limit, variable = _request_limit(request)
            applied = (request.extensions.get("timeout") or {}).get("read") or limit
            return f"did not answer within {applied:g} s (the limit {variable} sets)"
        seen = seen.__cause__ or seen.__context__
    return None


# -- huggingface_hub plumbing -----------------------------------------------------------------


def _unreachable() -> tuple[type[BaseException], ...]:
    """The client's 'the hub cannot be reached' exceptions: any transport failure (refused, reset, timed
    out, a broken answer), offline mode, RevisionResolutionError (the hub unreachable and no ref cached)."""
    import httpx2
    from huggingface_hub.errors import OfflineModeIsEnabled, RevisionResolutionError

    return (httpx2.TransportError, OfflineModeIsEnabled, RevisionResolutionError)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


@contextmanager
def _hub_errors(repo_id: str, revision: str | None, pushing: bool = False) -> Iterator[None]:
    """The client's exceptions, as one line naming the problem and the fix; every request made
    inside has bounded timeouts."""
    from huggingface_hub import constants
    from huggingface_hub import errors as hf

    token_hint = "pass a token (--token or HF_TOKEN)"
    _bound_timeouts()
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
    except hf.LocalEntryNotFoundError as exc:
        raise HubError(
            f"could not download '{repo_id}': the hub {_timeout_reason(exc) or 'stopped answering'} "
            "and the files are not in the local cache; check the network and retry"
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
        reason = _timeout_reason(exc) or f"could not be reached ({type(exc).__name__})"
        raise HubError(f"the hub at {constants.ENDPOINT} {reason}; check the network or HF_ENDPOINT") from None
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
