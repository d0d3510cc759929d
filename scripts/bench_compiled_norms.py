"""The compiled CPU norms of the remote code against its eager norms and LayerNorm's kernel.

Micro-benchmark: one norm call on a ROWS × D input (default 1024 × 768, GPT-2 small at 8×128),
per dtype and kind (RMSNorm with γ, β; with γ; weightless; CRMSNorm on D-1), forward under
inference mode and forward + backward, with warm caches and with the caches evicted before each
call (a 16 MiB copy, as a model's weights stream through them between two norms: the per-call cost
of Python and of torch's dispatch grows several-fold then); the paths are interleaved call by call,
and the minimum and median over the calls are reported in µs. Compile cost: the first calls of a fresh process, with an
empty inductor cache (cold) and again with the cache the cold run left (warm), each in its own
process.

    python scripts/bench_compiled_norms.py                    # 2 threads, bf16 and float32
    python scripts/bench_compiled_norms.py --rows 512 --calls 400 --json norms.json
    python scripts/bench_compiled_norms.py --skip-micro         # the compile cost alone
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

KINDS = ("weight+bias", "weight", "weightless", "crmsnorm")


def norm_calls(kind: str, dtype: torch.dtype, rows: int, d: int, backward: bool) -> dict:
    """name -> a call of one norm on the same input: compiled, eager, LayerNorm."""
    from prenorm_convert import modeling, norm_functions

    generator = torch.Generator().manual_seed(0)
    width = d - 1 if kind == "crmsnorm" else d
    source = (torch.randn(rows, width, generator=generator) + 0.5).to(dtype)
    x = source.clone().requires_grad_(backward)
    weight = (1 + 0.1 * torch.randn(width, generator=generator)).to(dtype).requires_grad_(backward)
    bias = (0.1 * torch.randn(width, generator=generator)).to(dtype).requires_grad_(backward)
    params = {"weight+bias": (weight, bias), "weight": (weight, None), "weightless": (None, None)}.get(kind)
    crms = modeling.PrenormCRMSNorm(d - 1, 1e-5)

    def norm():
        return crms(x) if params is None else norm_functions.rms_norm(x, *params, 1e-5)

    def layer_norm():
        return torch.nn.functional.layer_norm(x, (width,), *(params or (None, None)), 1e-5)

    def path(function, compiled):
        def call():
            norm_functions._COMPILE["on"] = compiled
            out = function()
            if backward:
                out.sum().backward()

        def touch():  # the input written just before the norm, as the residual add writes it
            with torch.no_grad():
                x.copy_(source)

        call.touch = touch
        return call

    return {"compiled": path(norm, True), "eager": path(norm, False), "layer_norm": path(layer_norm, False)}


def timed(calls: dict, count: int, backward: bool, evict: torch.Tensor | None) -> dict:
    """µs per call; with ``evict``, a copy of that buffer before each call leaves the caches as a
    model's weights do between two norms (the input itself is written just before the call)."""
    mode = torch.enable_grad() if backward else torch.inference_mode()
    times = {name: [] for name in calls}
    with mode:
        for call in calls.values():  # the first compiled call compiles
            call(), call()
        for _ in range(count):
            for name, call in calls.items():
                if evict is not None:
                    evict.copy_(evict.flip(0))
                call.touch()
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
    return {name: {"min_us": 1e6 * min(v), "median_us": 1e6 * statistics.median(v)} for name, v in times.items()}


def micro(args) -> list[dict]:
    from prenorm_convert import norm_functions

    norm_functions.COMPILED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # float32 measured too
    evict = torch.zeros(args.evict_mib << 18)  # float32: 4 bytes each
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for kind in args.kinds:
            for backward in (False, True):
                for caches in ("warm", "evicted"):
                    calls = norm_calls(kind, dtype, args.rows, args.d, backward)
                    result = timed(calls, args.calls, backward, evict if caches == "evicted" else None)
                    rows.append({"dtype": dtype_name, "kind": kind, "backward": backward, "caches": caches, **result})
                    print(json.dumps(rows[-1]), flush=True)
    return rows


FIRST_CALL = """
import time, torch
torch.set_num_threads({threads})
from prenorm_convert import modeling, norm_functions
x = torch.randn({rows}, {d}).to(torch.bfloat16)
times = []
for step in (
    lambda: norm_functions.rms_norm(x, None, None, 1e-5),
    lambda: modeling.PrenormCRMSNorm({d} - 1, 1e-5)(x[:, 1:]),
    lambda: norm_functions.rms_norm(x.clone().requires_grad_(), None, None, 1e-5).sum().backward(),
):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
print(*times, sorted(key[:2] for key in norm_functions._COMPILED))
"""


def compile_cost(args) -> dict:
    """First calls of a fresh process, empty caches (cold) and the caches that run left (warm):
    an inference norm (AOTInductor package), a second one (CRMSNorm), a training norm (torch.compile,
    forward and backward)."""
    code = FIRST_CALL.format(threads=args.threads, rows=args.rows, d=args.d)
    result = {}
    with tempfile.TemporaryDirectory() as cache:
        environment = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "PRENORM_COMPILE": "1"}
        for run in ("cold", "warm", "warm again"):
            output = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, check=True)
            first, second, train, compiled = output.stdout.split(maxsplit=3)
            assert compiled.count("infer") == 2 and "train" in compiled, output.stderr
            result[run] = {"first_norm_s": float(first), "second_norm_s": float(second), "training_norm_s": float(train)}
            print(run, result[run], flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--evict-mib", type=int, default=16, help="buffer copied before each call in the 'evicted' runs")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"some of {','.join(KINDS)}")
    parser.add_argument("--skip-compile-cost", action="store_true")
    parser.add_argument("--skip-micro", action="store_true", help="only the compile cost")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    args.dtypes, args.kinds = args.dtypes.split(","), args.kinds.split(",")
    torch.set_num_threads(args.threads)
    report = {
        "torch": torch.__version__,
        "threads": args.threads,
        "shape": [args.rows, args.d],
        "load_average_before": os.getloadavg(),
        "compile_cost": None if args.skip_compile_cost else compile_cost(args),
        "micro": None if args.skip_micro else micro(args),
        "load_average_after": os.getloadavg(),
    }
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
