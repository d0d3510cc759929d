"""Strict JSON for everything the tool writes (reports, inspect, bench): no bare NaN or Infinity,
which strict parsers (jq, JavaScript, most JSON libraries outside Python) reject."""

from __future__ import annotations

import json
import math


def finite_or_none(value):
    """``value`` with every non-finite float (NaN, ±Inf) replaced by None, in nested dicts and lists.

    A report states what was non-finite in its ``failures`` lines; the number itself is written as null
    (docs/report.md, "Strict JSON")."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_none(inner) for key, inner in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(inner) for inner in value]
    return value


def dumps(data) -> str:
    """Indented strict JSON with a final newline; raises ValueError rather than writing NaN."""
    return json.dumps(finite_or_none(data), indent=2, allow_nan=False) + "\n"
