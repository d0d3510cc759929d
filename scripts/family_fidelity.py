"""Fidelity of every family and layout in the conformance suite, as a markdown table.

Builds each case of tests/test_family_conformance.py (tiny, random γ/β/biases), converts it to
every target with the Python API, and prints the report's relative max |Δlogit| (float32) and
whether greedy generation matched. Usage:

    python scripts/family_fidelity.py [CASE_ID ...]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_family_conformance import BY_ID, CASES, _build  # noqa: E402

import prenorm_convert  # noqa: E402

TARGETS = {"rmsnorm": {}, "fold-affine": {"fold_affine": True}, "crmsnorm": {"target": "crmsnorm"}}


def main(case_ids: list[str]) -> None:
    cases = [BY_ID[case_id] for case_id in case_ids] if case_ids else CASES
    print("| case | " + " | ".join(TARGETS) + " |")
    print("|---|" + "---|" * len(TARGETS))
    with tempfile.TemporaryDirectory() as work:
        for case in cases:
            src = Path(work) / case.id
            _build(case, src)
            cells = []
            for target, options in TARGETS.items():
                report = prenorm_convert.convert(src, Path(work) / f"{case.id}-{target}", **options).report
                greedy = "greedy ✓" if report["greedy_match"]["identical"] else "greedy ✗"
                cells.append(f"{report['relative_max_abs_logit_diff']:.1e} {greedy}")
            print(f"| {case.id} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
