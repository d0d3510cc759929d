"""Convert and verify a 7B-class checkpoint on a small machine (docs/performance.md).

Writes a random checkpoint of Pythia-6.9B's shape (GPT-NeoX: hidden 4096, 32 layers, 32 heads,
MLP 16384, vocabulary 50432, rotary on a quarter of each head, untied head; 6.86e9 parameters) in
bfloat16, tensor by tensor from the names and shapes of the model transformers builds on the
meta device (so nothing of its size is ever in memory), with LayerNorm γ around 1, β, biases and
embedding means away from 0. Then, each in a child process that reports its own peak resident
memory (VmHWM) and wall time: `prenorm-convert convert SRC OUT --no-verify`, and `prenorm-convert
verify SRC OUT --max-memory 3GiB`.

    python scripts/bench_large_checkpoint.py --workdir /tmp/large --json large.json
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

PYTHIA_6_9B = {
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "intermediate_size": 16384,
    "vocab_size": 50432,
    "rotary_pct": 0.25,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "use_parallel_residual": True,
}
CHILD = (
    "import sys; from prenorm_convert.cli import main; sys.argv = ['prenorm-convert'] + sys.argv[1:]\n"
    "try:\n    main()\nexcept SystemExit:\n"
    "    peak = [line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM:')][0]\n"
    "    print('VmHWM_KiB', peak, file=sys.stderr); raise\n"
)


def stored_tensors(config) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes save_pretrained would write, from the model built on the meta device."""
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return [(name, tuple(tensor.shape)) for name, tensor in model.state_dict().items()]


def values(name: str, shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype):
    """Blocks of rows: γ ≈ 1, embeddings with a row mean, everything else small noise."""
    row = max(1, int(torch.Size(shape[1:]).numel()))
    for start in range(0, shape[0], max(1, 2**22 // row)):
        rows = min(max(1, 2**22 // row), shape[0] - start)
        noise = torch.randn((rows, *shape[1:]), generator=generator)
        if "layernorm.weight" in name or "layer_norm.weight" in name:
            yield (1.0 + 0.2 * noise).to(dtype)
        elif name.endswith("embed_in.weight"):
            yield (0.02 * noise + 0.01).to(dtype)
        else:
            yield (0.02 * noise).to(dtype)


def generate(folder: Path, dtype: torch.dtype, shard_bytes: int) -> int:
    import transformers

    from prenorm_convert.safetensors_io import OutputTensor, StreamingShardWriter

    config = transformers.GPTNeoXConfig(**PYTHIA_6_9B, dtype=str(dtype).removeprefix("torch."))
    folder.mkdir(parents=True)
    config.save_pretrained(str(folder))
    tensors = stored_tensors(config)
    writer = StreamingShardWriter(folder, [OutputTensor(name, dtype, shape) for name, shape in tensors], shard_bytes)
    generator = torch.Generator().manual_seed(0)
    try:
        for name, shape in tensors:
            writer.write_blocks(name, values(name, shape, generator, dtype))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def measured(arguments: list[str]) -> dict:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", CHILD, *arguments], capture_output=True, text=True)
    peak = next((int(line.split()[1]) * 1024 for line in result.stderr.splitlines() if line.startswith("VmHWM_KiB")), None)
    tail = [line for line in result.stderr.strip().splitlines() if not line.startswith("VmHWM")][-2:]
    return {"exit_code": result.returncode, "seconds": round(time.perf_counter() - started, 1), "peak_rss_gib": peak and round(peak / 2**30, 3), "stderr_tail": tail}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--max-memory", default="3GiB")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    src, out, report = args.workdir / "pythia-6.9b-shape", args.workdir / "converted", args.workdir / "report.json"
    results: dict = {"shape": PYTHIA_6_9B, "dtype": "bfloat16", "max_memory": args.max_memory}
    started = time.perf_counter()
    if not src.exists():
        results["weights_bytes"] = generate(src, torch.bfloat16, 2 * 10**9)
        results["write_seconds"] = round(time.perf_counter() - started, 1)
        print(f"wrote {results['weights_bytes'] / 1e9:.1f} GB in {results['write_seconds']} s", flush=True)
    if out.exists():
        shutil.rmtree(out)
    results["convert"] = measured(["convert", str(src), str(out), "--no-verify", "--quiet"])
    print("convert", results["convert"], flush=True)
    results["verify"] = measured(["verify", str(src), str(out), "--max-memory", args.max_memory, "--json", str(report), "--quiet"])
    print("verify", results["verify"], flush=True)
    if report.exists():
        verdict = json.loads(report.read_text())
        results["report"] = {key: verdict.get(key) for key in ("passed", "max_abs_logit_diff", "tolerances", "first_bad_layer", "streamed", "rounded_weights", "greedy_match", "positions")}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
