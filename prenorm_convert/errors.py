"""Typed errors. Library code raises these; only the CLI turns them into exit codes."""

from __future__ import annotations

import contextvars
from pathlib import Path

# messages name options as the caller spells them: `--allow-pickle` on the command line,
# `allow_pickle=True` in Python (the CLI sets this while it runs a command)
SPELL_FOR_CLI = contextvars.ContextVar("prenorm_spell_for_cli", default=False)
# CLI options whose Python spelling is not the flag's name with '_' for '-' (=True for a flag)
_PYTHON_SPELLING = {"--no-verify": "verify_output=False", "--prompts": "prompts_file=..."}
_VALUED = {"--revision", "--token", "--dtype", "--target", "--greedy-tokens", "--pad-to", "--max-shard-size"}


def option(cli_flag: str) -> str:
    """``cli_flag`` as the caller spells it: e.g. '--overwrite' (CLI) or 'overwrite=True' (Python)."""
    if SPELL_FOR_CLI.get():
        return cli_flag
    if cli_flag in _PYTHON_SPELLING:
        return _PYTHON_SPELLING[cli_flag]
    name = cli_flag.removeprefix("--").replace("-", "_")
    return f"{name}=..." if cli_flag in _VALUED else f"{name}=True"


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


def is_out_of_memory(exc: BaseException) -> bool:
    """Python's MemoryError, torch's OutOfMemoryError (an accelerator's), or the RuntimeError torch's
    CPU allocator raises when an allocation fails: the machine's limit, not the input's or a bug."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(exc)
