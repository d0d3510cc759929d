"""The compiled CPU norms of the remote code against its eager norms and LayerNorm's kernel.

Micro-benchmark: one norm call on a ROWS × D input (default 1024 × 768, GPT-2 small at 8×128),
per dtype and kind (RMSNorm with γ, β; with γ; weightless; CRMSNorm on D-1), forward under
inference mode and forward + backward; the paths are interleaved call by call, and the minimum and
median over the calls are reported in µs. Compile cost: the first call of a fresh process, with an
empty inductor cache (cold) and again with the cache the cold run left (warm), each in its own
process; and a second kernel compiled in the same process.

    python scripts/bench_compiled_norms.py                    # 2 threads, bf16 and float32
    python scripts/bench_compiled_norms.py --rows 512 --calls 400 --json norms.json
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
    from prenorm_convert import modeling

    generator = torch.Generator().manual_seed(0)
    width = d - 1 if kind == "crmsnorm" else d
    x = (torch.randn(rows, width, generator=generator) + 0.5).to(dtype).requires_grad_(backward)
    weight = (1 + 0.1 * torch.randn(width, generator=generator)).to(dtype).requires_grad_(backward)
    bias = (0.1 * torch.randn(width, generator=generator)).to(dtype).requires_grad_(backward)
    params = {"weight+bias": (weight, bias), "weight": (weight, None), "weightless": (None, None)}.get(kind)
    crms = modeling.PrenormCRMSNorm(d - 1, 1e-5)

    def norm():
        return crms(x) if params is None else modeling.rms_norm(x, *params, 1e-5)

    def layer_norm():
        return torch.nn.functional.layer_norm(x, (width,), *(params or (None, None)), 1e-5)

    def path(function, compiled):
        def call():
            modeling._COMPILE["on"] = compiled
            out = function()
            if backward:
                out.sum().backward()

        return call

    return {"compiled": path(norm, True), "eager": path(norm, False), "layer_norm": path(layer_norm, False)}


def timed(calls: dict, count: int, backward: bool) -> dict:
    for call in calls.values():  # the first compiled call compiles
        call(), call()
    times = {name: [] for name in calls}
    mode = torch.enable_grad() if backward else torch.inference_mode()
    with mode:
        for _ in range(count):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
    return {name: {"min_us": 1e6 * min(v), "median_us": 1e6 * statistics.median(v)} for name, v in times.items()}


def micro(args) -> list[dict]:
    from prenorm_convert import modeling

    modeling.COMPILED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for kind in KINDS:
            for backward in (False, True):
                result = timed(norm_calls(kind, dtype, args.rows, args.d, backward), args.calls, backward)
                rows.append({"dtype": dtype_name, "kind": kind, "backward": backward, **result})
                print(json.dumps(rows[-1]), flush=True)
    return rows


FIRST_CALL = """
import time, torch
torch.set_num_threads({threads})
from prenorm_convert import modeling
x = torch.randn({rows}, {d}).to(torch.bfloat16)
start = time.perf_counter()
modeling.rms_norm(x, None, None, 1e-5)
first = time.perf_counter() - start
start = time.perf_counter()
modeling.PrenormCRMSNorm({d} - 1, 1e-5)(x[:, 1:])
print(first, time.perf_counter() - start, "_crms_kernel" in str(list(modeling._COMPILED)))
"""


def compile_cost(args) -> dict:
    """First call of a fresh process, cold and warm inductor cache; then a second kernel in it."""
    code = FIRST_CALL.format(threads=args.threads, rows=args.rows, d=args.d)
    result = {}
    with tempfile.TemporaryDirectory() as cache:
        environment = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "PRENORM_COMPILE": "1"}
        for run in ("cold", "warm", "warm again"):
            output = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, check=True)
            first, second, compiled = output.stdout.split()
            assert compiled == "True", output.stderr
            result[run] = {"first_call_s": float(first), "second_kernel_s": float(second)}
            print(run, result[run], flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--skip-compile-cost", action="store_true")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    args.dtypes = args.dtypes.split(",")
    torch.set_num_threads(args.threads)
    report = {
        "torch": torch.__version__,
        "threads": args.threads,
        "shape": [args.rows, args.d],
        "load_average_before": os.getloadavg(),
        "compile_cost": None if args.skip_compile_cost else compile_cost(args),
        "micro": micro(args),
        "load_average_after": os.getloadavg(),
    }
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
