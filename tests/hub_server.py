"""A loopback stand-in for the Hugging Face hub, for tests that drive the real huggingface_hub client.

It serves the endpoints the client calls, with the headers the client relies on:
  GET  /api/models/{id}[/revision/{rev}]     model info: sha, siblings, gated
  GET  /api/models/{id}/tree/{rev}           file listing (snapshot_download)
  HEAD /{id}/resolve/{rev}/{path}            X-Repo-Commit, ETag, Content-Length
  GET  /{id}/resolve/{rev}/{path}            the bytes; `Range: bytes=A-B` answers 206 with those bytes
  POST /api/repos/create                     409 when it exists (create_repo(exist_ok=True) accepts that)
  POST /api/models/{id}/preupload/{rev}      every file "regular": sent inline in the commit
  POST /api/models/{id}/commit/{rev}         NDJSON commit (header, file, deletedFile)
  POST /api/validate-yaml                    README front matter must parse
Errors carry the hub's X-Error-Code (RepoNotFound 401, GatedRepo 401/403, RevisionNotFound 404,
EntryNotFound 404), which is what the client turns into its typed exceptions.

Not served: LFS / Xet transfers (the preupload answer keeps every file "regular"), pagination,
pull requests. Plus `write_cache`, which lays files out in the standard cache by hand, and
`SilentEndpoint`, a hub that accepts connections and never answers.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import yaml

WRITE_TOKEN = "hf_loopback_write"


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    gated: bool = False
    private: bool = False
    read_token: str | None = None  # the token that may read a gated or private repo


@dataclass
class Request:
    method: str
    path: str
    authorization: str | None
    range: str | None = None
    bytes_sent: int = 0  # body bytes of a resolve GET


class FakeHub:
    def __init__(self):
        self.honor_range = True  # False: answer every GET with the whole file, as some mirrors do
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    # -- state ------------------------------------------------------------------------------
    def add_repo(self, repo_id: str, files: dict[str, bytes], *, gated=False, private=False, read_token=None, tags=()) -> str:
        with self.lock:
            self.repos[repo_id] = Repo(gated=gated, private=private, read_token=read_token)
        commit = self.commit(repo_id, files)
        for tag in tags:
            self.repos[repo_id].refs[tag] = commit
        return commit

    def commit(self, repo_id: str, files: dict[str, bytes], ref: str = "main", replace: bool = True) -> str:
        with self.lock:
            repo = self.repos[repo_id]
            parent = repo.refs.get(ref)
            tree = dict(files) if replace or parent is None else {**repo.commits[parent], **files}
            digest = hashlib.sha1((parent or "").encode())
            for name in sorted(tree):
                digest.update(name.encode() + b"\0" + hashlib.sha256(tree[name]).digest())
            sha = digest.hexdigest()
            repo.commits[sha] = tree
            repo.refs[ref] = sha
            return sha

    def files(self, repo_id: str, ref: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.commits[repo.refs[ref]]

    def paths_requested(self) -> list[str]:
        return [request.path for request in self.requests]


class SilentEndpoint:
    """A loopback endpoint that accepts every TCP connection and never answers (a hung hub or proxy).

    Each connection is closed after ``hang_for`` seconds, so a client without timeouts fails a test
    instead of hanging it."""

    def __init__(self, hang_for: float = 60.0):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.endpoint = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.hang_for = hang_for
        self.held: list[tuple[socket.socket, float]] = []  # (connection, when accepted)
        self.accepted = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self):
        while not self.stop.is_set():
            try:
                connection, _ = self.listener.accept()
                self.held.append((connection, time.monotonic()))  # never read from or written to
                self.accepted += 1
            except TimeoutError:
                pass
            for connection, since in [item for item in self.held if time.monotonic() - item[1] > self.hang_for]:
                connection.close()
                self.held.remove((connection, since))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        for connection in [self.listener, *(connection for connection, _ in self.held)]:
            connection.close()


def write_cache(cache: Path, repo_id: str, commit: str, files: dict[str, bytes], refs: dict[str, str]) -> Path:
    """The standard hub cache layout: blobs by etag, snapshots/<commit>/<file> -> ../../blobs/<etag>, refs/<name>."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    for name, data in files.items():
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = storage / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref, sha in refs.items():
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(sha)
    return storage / "snapshots" / commit


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        # -- plumbing -------------------------------------------------------------------------
        def _reply(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, data, headers: dict | None = None):
            self._reply(status, json.dumps(data).encode(), headers)

        def _error(self, status: int, code: str | None, message: str, headers: dict | None = None):
            extra = {"X-Error-Message": message, **(headers or {})}
            if code:
                extra["X-Error-Code"] = code
            self._json(status, {"error": message}, extra)

        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _token(self) -> str | None:
            auth = self.headers.get("Authorization") or ""
            return auth.removeprefix("Bearer ").strip() or None

        def _record(self):
            self.request_record = Request(
                self.command, urlsplit(self.path).path, self.headers.get("Authorization"), self.headers.get("Range")
            )
            with hub.lock:
                hub.requests.append(self.request_record)

        # -- routing --------------------------------------------------------------------------
        def do_HEAD(self):
            self._record()
            self._route()

        def do_GET(self):
            self._record()
            self._route()

        def do_POST(self):
            self._record()
            self._route()

        def _route(self):
            path = urlsplit(self.path).path
            parts = [unquote(part) for part in path.strip("/").split("/")]
            if self.command == "POST" and parts == ["api", "repos", "create"]:
                return self._create()
            if self.command == "POST" and parts == ["api", "validate-yaml"]:
                return self._validate_yaml()
            if len(parts) >= 4 and parts[:2] == ["api", "models"]:
                repo_id, rest = f"{parts[2]}/{parts[3]}", parts[4:]
                if self.command == "GET" and (not rest or rest[0] == "revision"):
                    return self._model_info(repo_id, rest[1] if len(rest) > 1 else "main")
                if self.command == "GET" and rest and rest[0] == "tree":
                    return self._tree(repo_id, rest[1])
                if self.command == "POST" and rest and rest[0] == "preupload":
                    return self._preupload(repo_id)
                if self.command == "POST" and rest and rest[0] == "commit":
                    return self._commit(repo_id, rest[1])
            if len(parts) >= 5 and parts[2] == "resolve" and self.command in ("GET", "HEAD"):
                return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
            self._error(404, None, "Not Found")

        # -- reads ------------------------------------------------------------------------------
        def _readable(self, repo_id: str) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None or (repo.private and self._token() != repo.read_token):
                self._error(401, "RepoNotFound", "Repository not found")
                return None
            return repo

        def _commit_of(self, repo: Repo, revision: str) -> str | None:
            sha = repo.refs.get(revision) or (revision if revision in repo.commits else None)
            if sha is None:
                self._error(404, "RevisionNotFound", "Invalid rev id: " + revision)
            return sha

        def _model_info(self, repo_id: str, revision: str):
            repo = self._readable(repo_id)
            sha = repo and self._commit_of(repo, revision)
            if sha:
                self._json(200, {
                    "id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private,
                    "gated": "manual" if repo.gated else False, "disabled": False, "tags": [],
                    "siblings": [{"rfilename": name} for name in sorted(repo.commits[sha])],
                })

        def _tree(self, repo_id: str, revision: str):
            repo = self._readable(repo_id)
            sha = repo and self._commit_of(repo, revision)
            if sha:
                files = repo.commits[sha]
                self._json(200, [
                    {"type": "file", "path": name, "size": len(data), "oid": git_blob_id(data)}
                    for name, data in sorted(files.items())
                ])

        def _resolve(self, repo_id: str, revision: str, name: str):
            repo = self._readable(repo_id)
            if repo is None:
                return
            if repo.gated and self._token() != repo.read_token:
                status = 401 if self._token() is None else 403
                return self._error(status, "GatedRepo", "Access to model " + repo_id + " is restricted.")
            sha = self._commit_of(repo, revision)
            if sha is None:
                return
            data = repo.commits[sha].get(name)
            if data is None:
                return self._error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": sha})
            headers = {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
            status, body = 200, data
            wanted = self.headers.get("Range")
            if wanted and self.command == "GET" and hub.honor_range:
                first, _, last = wanted.removeprefix("bytes=").partition("-")
                start, stop = int(first), min(int(last) + 1 if last else len(data), len(data))
                status, body = 206, data[start:stop]
                headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(data)}"
            if self.command == "GET":
                self.request_record.bytes_sent = len(body)
            try:
                self._reply(status, body, headers, content_type="application/octet-stream")
            except (BrokenPipeError, ConnectionResetError):  # a client that stopped reading
                self.close_connection = True

        # -- writes ----------------------------------------------------------------------------
        def _writer(self) -> bool:
            if self._token() != WRITE_TOKEN:
                self._error(401, None, "Invalid credentials in Authorization header")
                return False
            return True

        def _create(self):
            payload = json.loads(self._body())
            if not self._writer():
                return
            repo_id = f"{payload['organization']}/{payload['name']}"
            if repo_id in hub.repos:
                return self._json(409, {"error": "You already created this model repo", "url": f"{hub.endpoint}/{repo_id}"})
            hub.add_repo(repo_id, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                         private=payload.get("visibility") == "private", read_token=WRITE_TOKEN)
            self._json(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})

        def _preupload(self, repo_id: str):
            payload = json.loads(self._body())
            if not self._writer():
                return
            if repo_id not in hub.repos:
                return self._error(404, "RepoNotFound", "Repository not found")
            self._json(200, {"files": [
                {"path": item["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                for item in payload["files"]
            ]})

        def _commit(self, repo_id: str, revision: str):
            lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
            if not self._writer():
                return
            if repo_id not in hub.repos:
                return self._error(404, "RepoNotFound", "Repository not found")
            repo = hub.repos[repo_id]
            tree = dict(repo.commits[repo.refs[revision]]) if revision in repo.refs else {}
            for item in lines:
                value = item["value"]
                if item["key"] == "file":
                    tree[value["path"]] = base64.b64decode(value["content"])
                elif item["key"] == "deletedFile":
                    tree.pop(value["path"], None)
                elif item["key"] != "header":
                    return self._error(400, None, f"unsupported commit operation {item['key']}")
            sha = hub.commit(repo_id, tree, ref=revision)
            self._json(200, {"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None})

        def _validate_yaml(self):
            content = json.loads(self._body())["content"]
            try:
                if content.startswith("---\n"):
                    yaml.safe_load(content.split("---\n", 2)[1])
            except yaml.YAMLError as exc:
                return self._json(400, {"errors": [{"message": str(exc)}]})
            self._json(200, {"warnings": []})

    return Handler
