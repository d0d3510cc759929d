#!/usr/bin/env python
"""Conversion time and peak memory on a synthetic GPT-2-XL-shaped checkpoint.

Writes a random GPT-2 checkpoint on disk (by default GPT-2-XL's shape: n_embd 1600, 48 layers,
25 heads, vocabulary 50257, 1024 positions, float32, tied head: 1.56e9 parameters, 6.2 GB) one
tensor at a time with prenorm-convert's own streaming writer, so the generator never holds the
model. Then, in the same run and alternating (A B B A ...), it times

- ``prenorm-convert convert SRC OUT --no-verify --quiet`` and
- a plain copy: every shard read whole with ``safetensors.torch.load_file`` and written back with
  ``save_file``, then fsync'ed (the converter fsyncs its shards too), index and config copied,

each in its own subprocess, recording wall time and the command's own peak RSS (VmHWM), and
the start-up of each (interpreter and imports, timed alone) so that the ratio can also be read
without it. Output folders are deleted after each run and the checkpoints at the end.

    python scripts/bench_conversion.py --workdir /tmp/pc-bench --json conversion.json
    python scripts/bench_conversion.py --layers 24,48 --rounds 1     # is peak RSS flat in depth?
    python scripts/bench_conversion.py --layers 4,16 --n-embd 512 --n-head 8 --rounds 1 --no-copy
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


# Each measured command reports its own peak resident memory at exit: VmHWM restarts at exec,
# while ru_maxrss from wait4 would also count the pages of this (forked) process.
REPORT_PEAK = (
    "import atexit, os; atexit.register(lambda: open(os.environ['PEAK_FILE'], 'w').write("
    "[line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM:')][0])); "
)
CONVERT_SCRIPT = REPORT_PEAK + "import sys; from prenorm_convert.cli import app; sys.argv[0] = 'prenorm-convert'; app()"
COPY_SCRIPT = REPORT_PEAK + r"""
import json, os, shutil, sys
from pathlib import Path
from safetensors.torch import load_file, save_file
src, out = Path(sys.argv[1]), Path(sys.argv[2])
out.mkdir()
index = src / "model.safetensors.index.json"
shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
for name in shards:
    tensors = load_file(str(src / name))
    save_file(tensors, str(out / name), metadata={"format": "pt"})
    del tensors
    with open(out / name, "rb+") as handle:
        os.fsync(handle.fileno())
for name in ("config.json", "model.safetensors.index.json"):
    if (src / name).exists():
        shutil.copy2(src / name, out / name)
"""
# what each command costs before it touches a tensor: interpreter, imports (the converter also builds
# the model skeleton on the meta device, importing transformers' modeling code)
CONVERT_STARTUP = REPORT_PEAK + (
    "import sys, json; from prenorm_convert import cli, conversion; from prenorm_convert.meta_model import build_meta_model; "
    "build_meta_model(json.load(open(sys.argv[1])))"
)
COPY_STARTUP = REPORT_PEAK + "import safetensors.torch"


def gpt2_tensors(n_embd: int, n_layer: int, vocab: int, positions: int) -> list[tuple[str, tuple[int, ...]]]:
    """Stored names and shapes, in save_pretrained's order, of a tied GPT2LMHeadModel."""
    d = n_embd
    tensors = [("transformer.wte.weight", (vocab, d)), ("transformer.wpe.weight", (positions, d))]
    for i in range(n_layer):
        block = f"transformer.h.{i}."
        tensors += [
            (block + "ln_1.weight", (d,)),
            (block + "ln_1.bias", (d,)),
            (block + "attn.c_attn.weight", (d, 3 * d)),
            (block + "attn.c_attn.bias", (3 * d,)),
            (block + "attn.c_proj.weight", (d, d)),
            (block + "attn.c_proj.bias", (d,)),
            (block + "ln_2.weight", (d,)),
            (block + "ln_2.bias", (d,)),
            (block + "mlp.c_fc.weight", (d, 4 * d)),
            (block + "mlp.c_fc.bias", (4 * d,)),
            (block + "mlp.c_proj.weight", (4 * d, d)),
            (block + "mlp.c_proj.bias", (d,)),
        ]
    tensors += [("transformer.ln_f.weight", (d,)), ("transformer.ln_f.bias", (d,))]
    return tensors


def generate(folder: Path, n_embd: int, n_layer: int, n_head: int, vocab: int, positions: int, shard_bytes: int, seed: int = 0) -> int:
    """Write the checkpoint tensor by tensor (big ones in row blocks); returns its size in bytes."""
    import torch
    import transformers

    from prenorm_convert.safetensors_io import OutputTensor, StreamingShardWriter

    folder.mkdir(parents=True)
    transformers.GPT2Config(
        n_embd=n_embd, n_layer=n_layer, n_head=n_head, vocab_size=vocab, n_positions=positions, tie_word_embeddings=True
    ).save_pretrained(str(folder))
    tensors = gpt2_tensors(n_embd, n_layer, vocab, positions)
    writer = StreamingShardWriter(folder, [OutputTensor(name, torch.float32, shape) for name, shape in tensors], shard_bytes)
    generator = torch.Generator().manual_seed(seed)

    def blocks(name: str, shape: tuple[int, ...]):
        rows_per_block = max(1, 2**22 // max(1, int(torch.Size(shape[1:]).numel())))
        for start in range(0, shape[0], rows_per_block):
            rows = min(rows_per_block, shape[0] - start)
            noise = torch.randn((rows, *shape[1:]), generator=generator)
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                yield 1.0 + 0.2 * noise
            elif name.endswith(("wte.weight", "wpe.weight")):
                yield 0.02 * noise + 0.01  # embedding rows with a non-zero mean, as trained ones have
            else:
                yield 0.02 * noise

    try:
        for name, shape in tensors:
            writer.write_blocks(name, blocks(name, shape))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def run_measured(command: list[str]) -> dict:
    """Run a command in a subprocess; its wall time and its own peak resident memory (VmHWM)."""
    with tempfile.NamedTemporaryFile("r", suffix=".peak") as peak:
        start = time.perf_counter()
        result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "PEAK_FILE": peak.name})
        seconds = time.perf_counter() - start
        if result.returncode != 0:
            raise SystemExit(f"command failed ({result.returncode}): {' '.join(command)}\n{result.stderr.decode(errors='replace')[-2000:]}")
        return {"seconds": seconds, "peak_rss_bytes": int(peak.read()) * 1024}  # the kernel reports KiB


def measure_convert(src: Path, out: Path, extra: list[str]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    result = run_measured([sys.executable, "-c", CONVERT_SCRIPT, "convert", str(src), str(out), "--no-verify", "--quiet", *extra])
    result["output_bytes"] = sum(path.stat().st_size for path in out.glob("*.safetensors"))
    shutil.rmtree(out, ignore_errors=True)
    return result


def measure_startup(src: Path) -> dict:
    return {
        "convert": run_measured([sys.executable, "-c", CONVERT_STARTUP, str(src / "config.json")]),
        "copy": run_measured([sys.executable, "-c", COPY_STARTUP]),
    }


def measure_copy(src: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    result = run_measured([sys.executable, "-c", COPY_SCRIPT, str(src), str(out)])
    shutil.rmtree(out, ignore_errors=True)
    return result


def summary(runs: list[dict]) -> dict:
    return {
        "seconds_min": min(run["seconds"] for run in runs),
        "seconds_all": [round(run["seconds"], 2) for run in runs],
        "peak_rss_bytes_max": max(run["peak_rss_bytes"] for run in runs),
        "peak_rss_bytes_all": [run["peak_rss_bytes"] for run in runs],
    }


def bench_depth(args, n_layer: int) -> dict:
    work = Path(args.workdir)
    src, converted, copied = work / f"src-{n_layer}", work / f"converted-{n_layer}", work / f"copy-{n_layer}"
    shutil.rmtree(src, ignore_errors=True)
    print(f"[{n_layer} layers] generating {src} ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    size = generate(src, args.n_embd, n_layer, args.n_head, args.vocab, args.positions, args.shard_bytes, args.seed)
    print(f"[{n_layer} layers] {size / 1e9:.2f} GB written in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    convert_runs, copy_runs, startups = [], [], []
    extra = ["--fold-affine"] if args.fold_affine else []
    try:
        for round_index in range(args.rounds):
            order = ("copy", "convert") if round_index % 2 == 0 else ("convert", "copy")
            for kind in order:
                if kind == "copy" and not args.copy:
                    continue
                run = measure_copy(src, copied) if kind == "copy" else measure_convert(src, converted, extra)
                (copy_runs if kind == "copy" else convert_runs).append(run)
                print(f"[{n_layer} layers] {kind}: {run['seconds']:.1f} s, peak RSS {run['peak_rss_bytes'] / 2**20:.0f} MiB", file=sys.stderr, flush=True)
            startups.append(measure_startup(src))
    finally:
        if not args.keep:
            for folder in (src, converted, copied):
                shutil.rmtree(folder, ignore_errors=True)
    result = {
        "n_layer": n_layer,
        "checkpoint_bytes": size,
        "parameters": sum(math.prod(shape) for _, shape in gpt2_tensors(args.n_embd, n_layer, args.vocab, args.positions)),
        "convert": summary(convert_runs),
        "convert_output_bytes": convert_runs[0]["output_bytes"],
    }
    startup = {kind: min(run[kind]["seconds"] for run in startups) for kind in ("convert", "copy")}
    result["startup_seconds_min"] = startup
    # resident memory of each command before it reads a tensor (interpreter and imports)
    result["startup_peak_rss_bytes"] = {kind: max(run[kind]["peak_rss_bytes"] for run in startups) for kind in ("convert", "copy")}
    if copy_runs:
        result["copy"] = summary(copy_runs)
        result["convert_over_copy_time"] = result["convert"]["seconds_min"] / result["copy"]["seconds_min"]
        # the same, after taking off each command's fixed start-up (interpreter and imports)
        result["convert_over_copy_time_after_startup"] = (result["convert"]["seconds_min"] - startup["convert"]) / (
            result["copy"]["seconds_min"] - startup["copy"]
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/prenorm-conversion-bench")
    parser.add_argument("--layers", default="48", help="comma-separated depths to measure, e.g. 24,48")
    parser.add_argument("--n-embd", type=int, default=1600)
    parser.add_argument("--n-head", type=int, default=25)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--positions", type=int, default=1024)
    parser.add_argument("--shard-bytes", type=int, default=2 * 10**9, help="shard size of the generated checkpoint")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each command, alternating (A B B A ...)")
    parser.add_argument("--no-copy", dest="copy", action="store_false", help="skip the plain-copy baseline")
    parser.add_argument("--fold-affine", action="store_true", help="convert with --fold-affine")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", dest="json_path", help="write the results here")
    args = parser.parse_args()
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.workdir).free
    print(f"free disk in {args.workdir}: {free / 1e9:.0f} GB", file=sys.stderr)
    depths = [bench_depth(args, int(n)) for n in args.layers.split(",")]
    result = {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version()},
        "load_average_after": [round(value, 2) for value in os.getloadavg()],
        "shape": {"n_embd": args.n_embd, "n_head": args.n_head, "vocab": args.vocab, "positions": args.positions, "dtype": "float32"},
        "fold_affine": args.fold_affine,
        "depths": depths,
    }
    if len(depths) > 1:
        peaks = [depth["convert"]["peak_rss_bytes_max"] for depth in depths]
        result["convert_peak_rss_deepest_over_shallowest"] = peaks[-1] / peaks[0]
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_path:
        Path(args.json_path).write_text(text + "\n")


if __name__ == "__main__":
    main()
