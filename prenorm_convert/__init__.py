"""prenorm-convert: Pre-LN checkpoints -> exactly equivalent Pre-RMSNorm / Pre-CRMSNorm checkpoints."""

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    BadInputError,
    CorruptCheckpointError,
    PrenormError,
    UnsupportedModelError,
    VerificationFailed,
)


def __getattr__(name):
    # heavy imports (torch, transformers) only when the API is used
    if name in {"convert", "ConversionResult"}:
        from . import conversion as module
    elif name in {"verify", "load_converted", "Tolerances"}:
        from . import verification as module
    elif name in {"describe", "families"}:
        from . import inspection as module
    else:
        raise AttributeError(name)
    return getattr(module, name)


__all__ = [
    "convert",
    "verify",
    "load_converted",
    "describe",
    "families",
    "Tolerances",
    "ConversionResult",
    "PrenormError",
    "BadInputError",
    "UnsupportedModelError",
    "CorruptCheckpointError",
    "VerificationFailed",
]
