#!/usr/bin/env python
"""Fidelity of conversions of checkpoints stored in bfloat16/float16 and kept in that dtype.

Builds tiny random checkpoints (GPT-2, OPT, BLOOM; widths and seeds from the command line) stored
in the reduced dtype, converts each with the defaults (verification on) and prints, per seed, the
converted model's error against the float32-run original as a ratio to the original's own error
in the dtype (mean |Δlogit|, max |Δlogit|, max KL), whether the default gate passed, and whether
a gate built from the original's own error alone (what the report used before `rounded_weights`)
would have passed. Numbers quoted in docs/report.md come from:

    python scripts/reduced_dtype_sources.py --widths 64,256 --seeds 6
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from prenorm_convert.conversion import convert
from prenorm_convert.errors import VerificationFailed
from prenorm_convert.examples import build_checkpoint
from prenorm_convert.tolerances import REDUCED_DTYPE_ERROR_RATIO, REDUCED_DTYPE_TOP1_SLACK

WIDTH_KEY = {"gpt2": "n_embd", "opt": "hidden_size", "bloom": "hidden_size"}


def own_error_gate(report: dict) -> bool:
    own = report["original_in_dtype"]
    return (
        report["max_abs_logit_diff"] <= REDUCED_DTYPE_ERROR_RATIO * own["max_abs_logit_diff"]
        and report["max_kl_divergence"] <= REDUCED_DTYPE_ERROR_RATIO * own["max_kl_divergence"]
        and report["top1_agreement"] >= own["top1_agreement"] - REDUCED_DTYPE_TOP1_SLACK
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="gpt2,opt,bloom")
    parser.add_argument("--widths", default="64,256")
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    totals = {"passed": 0, "own_error_gate": 0, "runs": 0}
    with tempfile.TemporaryDirectory() as root:
        for family in args.families.split(","):
            for width in (int(w) for w in args.widths.split(",")):
                cells = []
                for seed in range(args.seeds):
                    folder = Path(root) / f"{family}-{width}-{seed}"
                    overrides = {WIDTH_KEY[family]: width, **({"ffn_dim": 4 * width} if family == "opt" else {})}
                    build_checkpoint(folder / "src", family, seed=seed, dtype=dtype, overrides=overrides, max_shard_size="100MB")
                    try:
                        report, passed = convert(folder / "src", folder / "out").report, True
                    except VerificationFailed as failure:
                        report, passed = failure.report, False
                    own = report["original_in_dtype"]
                    ratios = [report[key] / max(own[key], 1e-30) for key in ("mean_abs_logit_diff", "max_abs_logit_diff", "max_kl_divergence")]
                    old = own_error_gate(report)
                    cells.append(f"{'P' if passed else 'F'}{'p' if old else 'f'}(" + ",".join(f"{r:.2f}" for r in ratios) + ")")
                    totals["passed"] += passed
                    totals["own_error_gate"] += old
                    totals["runs"] += 1
                    shutil.rmtree(folder)
                print(f"{family:6s} d={width:<4d} " + " ".join(cells), flush=True)
    print(
        f"{totals['runs']} conversions: {totals['passed']} pass the default gate, {totals['own_error_gate']} would pass a "
        "gate on the original's own error alone. Cells: P/F default gate, p/f own-error gate, "
        "(mean, max |Δlogit|, max KL) as ratios to the original's own error in the dtype."
    )


if __name__ == "__main__":
    main()
