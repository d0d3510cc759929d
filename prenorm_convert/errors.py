"""Typed errors. Library code raises these; only the CLI turns them into exit codes."""

from __future__ import annotations

from pathlib import Path


class PrenormError(Exception):
    """Base class for every error this package raises on purpose."""

    exit_code = 2


class BadInputError(PrenormError):
    """The input (path, checkpoint, options) cannot be converted; nothing was written."""


class UnsupportedModelError(BadInputError):
    """The checkpoint is a transformers model this tool does not (or cannot) convert."""


class CorruptCheckpointError(BadInputError):
    """Weights on disk are truncated, inconsistent with their index, or unreadable."""


class HubError(BadInputError):
    """The hub could not serve (or refused) a repository, revision, file or upload."""


class SpecError(PrenormError):
    """A family spec file is malformed (a bug in the package, not in the user's input)."""


class VerificationFailed(PrenormError):
    """The converted model does not match the original within tolerance."""

    exit_code = 1

    def __init__(self, message: str, report: dict | None = None, written: Path | None = None):
        super().__init__(message)
        self.report = report
        self.written = written  # the output folder, when it was written all the same
