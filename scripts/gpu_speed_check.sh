#!/usr/bin/env bash
# Speed of converted models on one CUDA GPU, in about 5 minutes on an H100.
#
#   bash scripts/gpu_speed_check.sh OUT_DIR [medium]
#
# Builds a random GPT-2-small-shaped checkpoint (d=768, 12 layers, vocabulary 50257, 1024
# positions; with "medium" also GPT-2-medium: d=1024, 24 layers), converts it (--target rmsnorm,
# and --fold-affine), then runs `prenorm-convert bench ... --device cuda` in float32 and bfloat16,
# writing one JSON per run into OUT_DIR (plus env.txt and cuda_exactness.txt).
#
# DEVICE=cpu QUICK=1 bash scripts/gpu_speed_check.sh /tmp/x   checks the script itself on a CPU.
#
# Needs no network and no install: the package runs from this checkout (PYTHONPATH). It needs
# python3 with torch (CUDA), transformers>=5, safetensors, typer, rich, pyyaml, tokenizers —
# all present in the lent GPU machines' image (/work/.library/device/KINDS.md); nothing to carry.
set -euo pipefail

OUT="${1:?usage: gpu_speed_check.sh OUT_DIR [medium]}"
SIZES="small ${2:-}"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
GRID=(--batch-sizes 1,8 --seq-lens 128,512 --rounds 10 --decode-tokens 64 --train)
[ -n "${QUICK:-}" ] && GRID=(--batch-sizes 1 --seq-lens 8 --rounds 1 --decode-tokens 2)
cli() { "$PY" -c "import sys; from prenorm_convert.cli import app; sys.argv[0] = 'prenorm-convert'; app()" "$@"; }

"$PY" - > "$OUT/env.txt" <<'EOF'
import platform, torch, transformers, safetensors, typer, rich, yaml
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("transformers", transformers.__version__, "safetensors", safetensors.__version__, "typer", typer.__version__)
print("gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NONE")
EOF
cat "$OUT/env.txt"

# the fast RMSNorm path on CUDA against the float64 formula (docs/math.md "Why it is exact"), not zero-mean inputs on purpose
"$PY" - > "$OUT/cuda_exactness.txt" <<'EOF'
import torch
from prenorm_convert.modeling import rms_norm
g = torch.Generator().manual_seed(0)
x = torch.randn(8, 128, 768, generator=g) * 3 + 2
w, b = 1 + 0.4 * torch.randn(768, generator=g), 0.3 * torch.randn(768, generator=g)
ref = x.double() / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5) * w.double() + b.double()
device = "cuda" if torch.cuda.is_available() else "cpu"
for dtype in (torch.float32, torch.bfloat16):
    out = rms_norm(x.to(device, dtype), w.to(device, dtype), b.to(device, dtype), 1e-5).double().cpu()
    print(device, dtype, "max |fast - float64 formula| =", float((out - ref).abs().max()), "max |ref| =", float(ref.abs().max()))
EOF
cat "$OUT/cuda_exactness.txt"

for size in $SIZES; do
  case "$size" in
    small) shape='{"n_embd": 768, "n_layer": 12, "n_head": 12}' ;;
    medium) shape='{"n_embd": 1024, "n_layer": 24, "n_head": 16}' ;;
    *) echo "unknown size $size" >&2; exit 2 ;;
  esac
  src="$WORK/gpt2-$size"
  "$PY" - "$src" "$shape" <<'EOF'
import json, sys
from prenorm_convert.examples import build_checkpoint
shape = {**json.loads(sys.argv[2]), "n_positions": 1024, "vocab_size": 50257}
build_checkpoint(sys.argv[1], "gpt2", overrides=shape, tokenizer=False, max_shard_size="2GB")
EOF
  cli convert "$src" "$WORK/gpt2-$size-rms" --no-verify --quiet
  cli convert "$src" "$WORK/gpt2-$size-folded" --fold-affine --no-verify --quiet
  for dtype in float32 bfloat16; do
    for variant in rms folded; do
      echo "== $size $variant $dtype" >&2
      cli bench "$src" "$WORK/gpt2-$size-$variant" --device "$DEVICE" --dtype "$dtype" "${GRID[@]}" \
        --json "$OUT/bench-$size-$variant-$dtype.json"
    done
  done
done
ls -l "$OUT"
