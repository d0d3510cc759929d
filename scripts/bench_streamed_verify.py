"""Streamed verification of a checkpoint larger than its memory budget (docs/performance.md).

Builds a random GPT-2-large-shaped (or, with --shape gpt2-xl, GPT-2-XL-shaped: 1.56e9 parameters,
6.2 GB) float32 checkpoint (774M parameters, 3.1 GB; no tokenizer, so
the prompts are seeded random ids), converts it, then runs `prenorm-convert verify --max-memory`
in a child process and reports its wall time and peak resident memory (VmHWM, read by the child
itself just before it exits, so nothing of this script's memory counts), both for the correct
conversion and for a copy with one writer of layer K changed, which must fail with exit 1 and
first_bad_layer = K.

    python scripts/bench_streamed_verify.py --workdir /tmp/streamed --max-memory 1GiB --json streamed.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SHAPES = {
    "gpt2-large": {"n_embd": 1280, "n_layer": 36, "n_head": 20, "n_positions": 1024, "vocab_size": 50257},
    "gpt2-xl": {"n_embd": 1600, "n_layer": 48, "n_head": 25, "n_positions": 1024, "vocab_size": 50257},
}
CHILD = (
    "import sys; from prenorm_convert.cli import main; sys.argv = ['prenorm-convert'] + sys.argv[1:]\n"
    "try:\n    main()\nexcept SystemExit as exit:\n"
    "    peak = [line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM:')][0]\n"
    "    print('VmHWM_KiB', peak, file=sys.stderr); raise\n"
)


def build(workdir: Path, shape: str) -> tuple[Path, Path]:
    from prenorm_convert.conversion import convert
    from prenorm_convert.examples import build_checkpoint

    src, out = workdir / shape, workdir / f"{shape}-rms"
    if not src.exists():
        started = time.perf_counter()
        build_checkpoint(src, "gpt2", seed=3, overrides=SHAPES[shape], tokenizer=False, max_shard_size="1GB")
        print(f"built {src} in {time.perf_counter() - started:.0f} s", flush=True)
    if not out.exists():
        started = time.perf_counter()
        convert(src, out, verify_output=False, max_shard_size="1GB")
        print(f"converted in {time.perf_counter() - started:.0f} s", flush=True)
    return src, out


def tampered_copy(out: Path, layer: int) -> Path:
    broken = out.parent / f"{out.name}-layer{layer}-changed"
    if broken.exists():
        shutil.rmtree(broken)
    shutil.copytree(out, broken)
    name = f"transformer.h.{layer}.mlp.c_proj.weight"
    for shard in sorted(broken.glob("*.safetensors")):
        tensors = load_file(shard)
        if name in tensors:
            generator = torch.Generator().manual_seed(0)
            tensors[name] += 0.05 * torch.randn(tensors[name].shape, generator=generator)
            save_file(tensors, shard, metadata={"format": "pt"})
            return broken
    raise SystemExit(f"{name} not found")


def verify_in_child(src: Path, out: Path, max_memory: str | None, report: Path) -> dict:
    started = time.perf_counter()
    budget = ["--max-memory", max_memory] if max_memory else []
    command = [sys.executable, "-c", CHILD, "verify", str(src), str(out), *budget, "--json", str(report), "--quiet"]
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    peak = next(int(line.split()[1]) * 1024 for line in result.stderr.splitlines() if line.startswith("VmHWM_KiB"))
    verdict = json.loads(report.read_text()) if report.exists() else {}
    return {
        "exit_code": result.returncode,
        "seconds": round(seconds, 1),
        "peak_rss_bytes": peak,
        "peak_rss_gib": round(peak / 2**30, 3),
        "passed": verdict.get("passed"),
        "first_bad_layer": verdict.get("first_bad_layer"),
        "first_bad_writer": verdict.get("first_bad_writer"),
        "max_abs_logit_diff": verdict.get("max_abs_logit_diff"),
        "tolerance": verdict.get("tolerances", {}).get("max_abs_logit_diff"),
        "streamed": verdict.get("streamed"),
        "stderr_tail": result.stderr.strip().splitlines()[-3:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="gpt2-large")
    parser.add_argument("--max-memory", default="1GiB")
    parser.add_argument("--in-memory", action="store_true", help="also verify without --max-memory (both models in memory), the baseline")
    parser.add_argument("--tamper-layer", type=int, default=17)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    src, out = build(args.workdir, args.shape)
    results = {"shape": SHAPES[args.shape], "weights_bytes": sum(p.stat().st_size for p in src.glob("*.safetensors")), "max_memory": args.max_memory}
    results["correct"] = verify_in_child(src, out, args.max_memory, args.workdir / "report.json")
    print(json.dumps(results["correct"], indent=2), flush=True)
    if args.in_memory:
        results["in_memory"] = verify_in_child(src, out, None, args.workdir / "report-in-memory.json")
        print(json.dumps(results["in_memory"], indent=2), flush=True)
    broken = tampered_copy(out, args.tamper_layer)
    results["tampered_layer"] = args.tamper_layer
    results["tampered"] = verify_in_child(src, broken, args.max_memory, args.workdir / "report-tampered.json")
    print(json.dumps(results["tampered"], indent=2), flush=True)
    shutil.rmtree(broken)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
