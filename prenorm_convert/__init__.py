"""prenorm-convert: Pre-LN checkpoints -> exactly equivalent Pre-RMSNorm / Pre-CRMSNorm checkpoints."""

from ._version import __version__
from .errors import (
    BadInputError,
    CorruptCheckpointError,
    HubError,
    PrenormError,
    UnsupportedModelError,
    VerificationFailed,
)


def __getattr__(name):
    # heavy imports (torch, transformers) only when the API is used
    if name in {"convert", "ConversionResult"}:
        from . import conversion as module
    elif name in {"verify", "load_converted"}:
        from . import verification as module
    elif name == "Tolerances":
        from . import tolerances as module
    elif name in {"describe", "families"}:
        from . import inspection as module
    elif name in {"push", "resolve_source"}:
        from . import hub as module
    elif name in {"benchmark", "BenchSettings"}:
        # the function is not called `bench`: importing the submodule prenorm_convert.bench would shadow it
        from . import bench as module
    else:
        raise AttributeError(name)
    return getattr(module, name)


__all__ = [
    "convert",
    "verify",
    "load_converted",
    "describe",
    "families",
    "push",
    "resolve_source",
    "benchmark",
    "BenchSettings",
    "Tolerances",
    "ConversionResult",
    "PrenormError",
    "BadInputError",
    "UnsupportedModelError",
    "CorruptCheckpointError",
    "HubError",
    "VerificationFailed",
]
