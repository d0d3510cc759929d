"""Where models run: a torch device checked before any work (a clear error when it is absent), or an
accelerate device map spread over several devices (`verify --device-map auto`)."""

from __future__ import annotations

import torch

from .errors import BadInputError

# the device-map strategies accelerate (through transformers' from_pretrained) accepts by name
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BadInputError(f"--device '{name}' is not a torch device (try cpu or cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadInputError("--device cuda was asked for, but torch sees no CUDA device")
    try:  # any other device type (mps, xpu, a missing cuda:N): usable only if torch can allocate on it
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError, AttributeError, NotImplementedError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise BadInputError(f"--device '{name}' is not usable on this machine ({reason}); try --device cpu") from None
    return device


def placement(device: str | None, device_map: str | None) -> dict:
    """from_pretrained keyword arguments that put a model where asked: nothing for the CPU, the whole
    model on one device, or an accelerate device map (several GPUs, or GPU and CPU)."""
    if device_map is not None:
        if device is not None and device != "cpu":
            raise BadInputError("give --device or --device-map, not both")
        if device_map not in DEVICE_MAPS:
            raise BadInputError(f"--device-map must be one of {', '.join(DEVICE_MAPS)}, got '{device_map}'")
        return {"device_map": device_map}
    if device is None or device == "cpu":
        return {}
    return {"device_map": {"": str(resolve_device(device))}}
