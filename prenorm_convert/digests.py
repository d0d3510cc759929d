"""What a report vouches for: the SHA-256 of every file of a converted folder that decides what the
model computes or how it is loaded, so that `push` can tell a folder edited after verification."""

from __future__ import annotations

import hashlib
from pathlib import Path

# written after the report, or the report itself: not what it vouches for
NOT_VOUCHED = {"README.md", "conversion_report.json"}
_CHUNK = 16 * 2**20


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def folder_digests(folder: str | Path) -> dict[str, str]:
    """{file name: sha256 hex} for the folder's top-level files, hidden ones and NOT_VOUCHED excepted."""
    folder = Path(folder)
    return {
        entry.name: file_digest(entry)
        for entry in sorted(folder.iterdir())
        if entry.is_file() and not entry.name.startswith(".") and entry.name not in NOT_VOUCHED
    }


def changed_files(folder: str | Path, recorded: dict[str, str]) -> list[str]:
    """Files added, removed or changed since ``recorded`` was taken (sorted names)."""
    current = folder_digests(folder)
    return sorted(name for name in set(current) | set(recorded) if current.get(name) != recorded.get(name))
