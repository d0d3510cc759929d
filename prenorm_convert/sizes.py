"""Byte counts as users write them ('5GB', '500MB', '2GiB') and as reports print them."""

from __future__ import annotations

from .errors import BadInputError


def parse_size(text: str | int, option_name: str = "--max-shard-size") -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes."""
    if isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    stripped = text.strip().upper()
    number = stripped.rstrip("KMGIB")
    unit = stripped[len(number):]
    try:
        value = int(float(number) * units[unit])
    except (ValueError, KeyError, OverflowError):  # OverflowError: inf
        raise BadInputError(f"{option_name} must look like 5GB, 500MB or 2GiB, got '{text}'") from None
    if value <= 0:
        raise BadInputError(f"{option_name} must be positive, got '{text}'")
    return value


def format_bytes(count: int) -> str:
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.0f} MiB"
