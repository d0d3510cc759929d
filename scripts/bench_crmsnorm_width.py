"""Forward speed of the crmsnorm (d-1 wide) conversion against the original and the rmsnorm target.

Builds one random GPT-2-shaped checkpoint (default: GPT-2 small, d=768, 12 layers, vocab 50257),
converts it with the real converter to `rmsnorm`, `rmsnorm --fold-affine`, `crmsnorm` and
`crmsnorm --pad-to N` (the d-1 wide stream zero-padded back to an aligned width, the paper's
suggestion; docs/math.md "Pre-CRMSNorm"). Every variant is checked against the original's logits,
then timed in interleaved rounds (one forward of each per round), so that drift of the machine hits
all of them alike; ratios are medians of the per-round ratios to the original.

    python scripts/bench_crmsnorm_width.py                         # CPU, float32, batch 8x128
    python scripts/bench_crmsnorm_width.py --device cuda --dtype bfloat16 --batch 64 --seq 512
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

ORIGINAL = "original (LayerNorm)"


def build_variants(workdir: Path, args) -> dict[str, Path]:
    import prenorm_convert
    from prenorm_convert.examples import build_checkpoint

    original = workdir / "original"
    overrides = {"n_embd": args.d, "n_layer": args.layers, "n_head": args.heads, "n_positions": max(1024, args.seq), "vocab_size": args.vocab}
    build_checkpoint(original, "gpt2", seed=0, overrides=overrides, tokenizer=False, max_shard_size="4GB")
    folders = {ORIGINAL: original}
    variants = [("rmsnorm", {}), ("rmsnorm --fold-affine", {"fold_affine": True}), ("crmsnorm", {"target": "crmsnorm"})]
    widths = {args.d - 1}
    for multiple in args.pad_to:
        width = -(-(args.d - 1) // multiple) * multiple
        if width not in widths:
            widths.add(width)
            variants.append((f"crmsnorm --pad-to {multiple} ({width})", {"target": "crmsnorm", "pad_to": multiple}))
    for name, options in variants:
        out = workdir / "".join(c for c in name if c.isalnum())
        prenorm_convert.convert(original, out, verify_output=False, max_shard_size="4GB", **options)
        folders[name] = out
    return folders


def load(folder: Path, dtype: torch.dtype, device: str, attention: str):
    """The converted classes come straight from prenorm_convert.modeling (the code written into each
    folder as modeling_prenorm.py), so older transformers' remote-code registration checks don't apply."""
    import transformers

    from prenorm_convert.modeling import prenorm_class

    config = json.loads((folder / "config.json").read_text())
    if "prenorm" in config:
        model_class = prenorm_class(config["auto_map"]["AutoModelForCausalLM"].rsplit(".", 1)[-1])
    else:
        model_class = transformers.AutoModelForCausalLM
    model = model_class.from_pretrained(str(folder), dtype=dtype, attn_implementation=attention)
    return model.to(device).eval()


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def time_forward(model, ids, device: str, calls: int) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        model(ids, use_cache=False)
    synchronize(device)
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=2, help="forward calls per timing")
    parser.add_argument("--pad-to", type=int, nargs="*", default=[8, 64], help="aligned widths to try (multiples)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the temporary checkpoints go")
    parser.add_argument("--cache", type=Path, default=None, help="keep the built checkpoints here and reuse them")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = args.cache or Path(tmp)
        marker = root / f"built-d{args.d}-L{args.layers}-h{args.heads}-V{args.vocab}-pad{'-'.join(map(str, args.pad_to))}.json"
        if marker.exists():
            folders = {name: Path(folder) for name, folder in json.loads(marker.read_text()).items()}
        else:
            folders = build_variants(root, args)
            marker.write_text(json.dumps({name: str(folder) for name, folder in folders.items()}))
        models = {name: load(folder, dtype, args.device, args.attention) for name, folder in folders.items()}

    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(args.device)
    with torch.no_grad():
        reference = models[ORIGINAL](ids).logits.double()
        errors = {name: float((model(ids).logits.double() - reference).abs().max() / reference.abs().max()) for name, model in models.items()}
    widths = {name: model.get_input_embeddings().weight.shape[1] for name, model in models.items()}

    for model in models.values():  # warm-up
        time_forward(model, ids, args.device, 1)
    times = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            times[name].append(time_forward(model, ids, args.device, args.calls))
    base = times[ORIGINAL]
    rows = []
    for name, series in times.items():
        ratios = [t / b for t, b in zip(series, base)]
        rows.append(
            {
                "variant": name,
                "stream_width": widths[name],
                "median_ms": 1e3 * statistics.median(series),
                "ratio_to_original": statistics.median(ratios),
                "ratio_spread": [min(ratios), max(ratios)],
                "relative_logit_error": errors[name],
            }
        )
    machine = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    print(f"{args.batch}x{args.seq} tokens, d={args.d}, {args.layers} layers, vocab {args.vocab}, {args.dtype}, "
          f"{args.device} ({machine['device']}, {machine['threads']} threads), attention {args.attention}, {args.rounds} rounds")
    print(f"{'variant':34} {'width':>5} {'median ms':>10} {'vs original':>12} {'spread':>15} {'rel logit err':>14}")
    for row in rows:
        spread = f"{row['ratio_spread'][0]:.3f}-{row['ratio_spread'][1]:.3f}"
        print(f"{row['variant']:34} {row['stream_width']:5d} {row['median_ms']:10.2f} {row['ratio_to_original']:12.3f} "
              f"{spread:>15} {row['relative_logit_error']:14.2e}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
