"""Numerical error of the crmsnorm target next to the rmsnorm target, on the same models.

For each example family (and a wider GPT-2), converts to rmsnorm, rmsnorm --fold-affine and
crmsnorm in each output dtype and prints the verify report's error against the float32 original;
for reduced dtypes, next to the original model's own error in that dtype (docs/math.md "Numerics").

    python scripts/crmsnorm_numerics.py [--dtypes float32 bfloat16 float16]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import prenorm_convert
from prenorm_convert.examples import SHAPES, build_checkpoint
from prenorm_convert.spec_loader import load_specs

TARGETS = (("rmsnorm", {}), ("rmsnorm --fold-affine", {"fold_affine": True}), ("crmsnorm", {"target": "crmsnorm"}))


def models() -> list[tuple[str, str, dict]]:
    families = {spec.family for spec in load_specs()}
    cases = [(family, family, {}) for family in SHAPES if family in families]
    cases.append(("gpt2 d=256 L=6", "gpt2", {"n_embd": 256, "n_layer": 6, "n_head": 8}))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16", "float16"])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case, family, overrides in models():
            src = Path(tmp) / case.replace(" ", "_")
            build_checkpoint(src, family, seed=5, overrides=overrides)
            for dtype in args.dtypes:
                for target, options in TARGETS:
                    out = Path(tmp) / "out"
                    try:
                        report = prenorm_convert.convert(src, out, dtype=dtype, overwrite=True, **options).report
                    except prenorm_convert.VerificationFailed as failure:  # written anyway: report it
                        report = failure.report
                    own = report.get("original_in_dtype") or {}
                    rows.append(
                        {
                            "model": case,
                            "dtype": dtype,
                            "target": target,
                            "max_abs_logit_diff": report["max_abs_logit_diff"],
                            "relative": report["relative_max_abs_logit_diff"],
                            "mean_abs_logit_diff": report["mean_abs_logit_diff"],
                            "max_kl": report["max_kl_divergence"],
                            "top1": report["top1_agreement"],
                            "original_in_dtype_max_abs": own.get("max_abs_logit_diff"),
                            "original_in_dtype_mean_abs": own.get("mean_abs_logit_diff"),
                            "original_in_dtype_top1": own.get("top1_agreement"),
                            "passed": report["passed"],
                        }
                    )
    header = f"{'model':16} {'dtype':9} {'target':22} {'max|Δ|':>9} {'mean|Δ|':>9} {'max KL':>9} {'top1':>6} | {'orig max|Δ|':>11} {'orig mean|Δ|':>12} {'orig top1':>9}"
    print(header)
    for row in rows:
        own = "" if row["original_in_dtype_max_abs"] is None else (
            f"{row['original_in_dtype_max_abs']:11.3e} {row['original_in_dtype_mean_abs']:12.3e} {row['original_in_dtype_top1']:9.4f}"
        )
        print(f"{row['model']:16} {row['dtype']:9} {row['target']:22} {row['max_abs_logit_diff']:9.2e} {row['mean_abs_logit_diff']:9.2e} "
              f"{row['max_kl']:9.2e} {row['top1']:6.4f} | {own}{'' if row['passed'] else '  FAILED'}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
