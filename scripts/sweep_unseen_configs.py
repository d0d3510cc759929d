"""Robustness sweep: configs, shapes, dtypes, storage formats and trained-like weights that the
conformance suite (tests/test_family_conformance.py) does not build. Opt-in, not part of the tests.

For every variant below it builds a tiny random checkpoint with transformers (the family's SHAPES
from prenorm_convert/examples.py overridden by the variant's config), perturbs the weights like a
trained model's (LayerNorm γ far from 1, some near 0 or negative, large β; embedding tables with a
large common mean and a few ×50 outlier feature columns; large linear biases), stores it in the
variant's dtype (float32, bfloat16, float16) and format (sharded safetensors, or pytorch_model.bin),
converts it with the CLI to every target, and records the exit code, whether the report passed,
the relative max |Δlogit|, the per-layer audit's first layer off and any traceback. A variant marked
`refused` must exit 2 with a message; any other must pass with no layer named off.

    python scripts/sweep_unseen_configs.py [--jobs 2] [--only SUBSTRING ...] [--dtypes float32,bfloat16,float16]
        [--targets rmsnorm,fold-affine,crmsnorm]
        [--workdir DIR] [--json results.json] [--plain]   # --plain: the examples' perturbation only

Prints a markdown table; a row is OK when every target gives the expected result.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from prenorm_convert import examples  # noqa: E402

TARGETS = {"rmsnorm": [], "fold-affine": ["--fold-affine"], "crmsnorm": ["--target", "crmsnorm"]}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Variant:
    id: str
    family: str
    overrides: dict = field(default_factory=dict)
    dtype: str = "float32"
    # "safetensors:SIZE" (save_pretrained's max_shard_size) or "bin" (one pytorch_model.bin)
    storage: str = "safetensors:40KB"
    auto_class: str | None = None
    # "ok": every target passes; "refused": exit 2 on every target; {target: "refused"} per target
    expect: str | dict = "ok"
    tie: bool = True


V = Variant
VARIANTS = [
    # --- GPT-2: odd widths, the attention-scaling flags, relu MLP, untied
    V("gpt2-w40-h5-invlayer-upcast-untied", "gpt2", {"n_embd": 40, "n_head": 5, "scale_attn_by_inverse_layer_idx": True, "reorder_and_upcast_attn": True}, tie=False),
    V("gpt2-w72-h6-ninner100-relu-noscale-bf16", "gpt2", {"n_embd": 72, "n_head": 6, "n_inner": 100, "activation_function": "relu", "scale_attn_weights": False}, dtype="bfloat16"),
    V("gpt2-w40-fp16-bin", "gpt2", {"n_embd": 40, "n_head": 5}, dtype="float16", storage="bin"),
    V("gpt2-cross-attention", "gpt2", {"add_cross_attention": True}, expect="refused"),
    # --- OPT: projected embeddings, no biases, norms without affine, Post-LN
    V("opt-w48-proj32-tied", "opt", {"hidden_size": 48, "word_embed_proj_dim": 32, "ffn_dim": 100}),
    V("opt-w48-proj32-untied-bf16", "opt", {"hidden_size": 48, "word_embed_proj_dim": 32, "ffn_dim": 100}, dtype="bfloat16", tie=False),
    V("opt-w40-h5-nobias-untied-bin", "opt", {"hidden_size": 40, "num_attention_heads": 5, "enable_bias": False, "ffn_dim": 72}, storage="bin", tie=False),
    V("opt-no-elementwise-affine", "opt", {"hidden_size": 40, "num_attention_heads": 5, "layer_norm_elementwise_affine": False}),
    V("opt-post-ln", "opt", {"do_layer_norm_before": False}, expect="refused"),
    V("opt-removed-final-ln", "opt", {"_remove_final_layer_norm": True}, expect="refused"),
    # --- BLOOM
    V("bloom-w40-h5-untied", "bloom", {"hidden_size": 40, "n_head": 5}, tie=False),
    V("bloom-w72-h6-tp2-slow-fp16", "bloom", {"hidden_size": 72, "n_head": 6, "pretraining_tp": 2, "slow_but_exact": True}, dtype="float16", expect={"crmsnorm": "refused"}),
    V("bloom-post-ln-residual", "bloom", {"apply_residual_connection_post_layernorm": True}, expect="refused"),
    # --- GPT-NeoX
    V("gpt_neox-w72-h6-rot0.5-nobias-tied", "gpt_neox", {"hidden_size": 72, "num_attention_heads": 6, "rotary_pct": 0.5, "attention_bias": False, "intermediate_size": 100}),
    V("gpt_neox-w40-h5-seq-rot1-untied-bf16-bin", "gpt_neox", {"hidden_size": 40, "num_attention_heads": 5, "use_parallel_residual": False, "rotary_pct": 1.0}, dtype="bfloat16", storage="bin", tie=False),
    # --- GPT-J / CodeGen
    V("gptj-w40-h5-fullrot-tied", "gptj", {"n_embd": 40, "n_head": 5, "rotary_dim": 8}),
    V("gptj-w72-h6-rot4-untied-fp16", "gptj", {"n_embd": 72, "n_head": 6, "rotary_dim": 4, "n_inner": 100}, dtype="float16", tie=False),
    V("codegen-w72-h8-rot4-tied", "codegen", {"n_embd": 72, "n_head": 8, "rotary_dim": 4}),
    V("codegen-w48-h4-fullrot-untied-bf16", "codegen", {"n_embd": 48, "n_head": 4, "rotary_dim": 12}, dtype="bfloat16", tie=False),
    # --- GPT-Neo
    V("gpt_neo-w40-h5-local-tied", "gpt_neo", {"hidden_size": 40, "num_heads": 5, "attention_types": [[["local"], 2]], "window_size": 4, "intermediate_size": 100}),
    V("gpt_neo-w72-h6-global-untied-fp16", "gpt_neo", {"hidden_size": 72, "num_heads": 6, "attention_types": [[["global"], 2]]}, dtype="float16", tie=False),
    # --- Phi
    V("phi-w40-h5-mqa-qkln-tied", "phi", {"hidden_size": 40, "num_attention_heads": 5, "num_key_value_heads": 1, "partial_rotary_factor": 0.5, "qk_layernorm": True}),
    V("phi-w72-h6-gqa-rot1-untied-bf16", "phi", {"hidden_size": 72, "num_attention_heads": 6, "num_key_value_heads": 2, "partial_rotary_factor": 1.0, "intermediate_size": 100}, dtype="bfloat16", tie=False),
    # --- Falcon
    V("falcon-new-mqa-w72-h6-bias-tied", "falcon", {"hidden_size": 72, "num_attention_heads": 6, "new_decoder_architecture": True, "num_kv_heads": 1, "bias": True}),
    V("falcon-new-1ln-gqa-untied-bf16", "falcon", {"hidden_size": 72, "num_attention_heads": 6, "new_decoder_architecture": True, "num_ln_in_parallel_attn": 1, "num_kv_heads": 3}, dtype="bfloat16", tie=False),
    V("falcon-parallel-alibi-mha-bias-untied", "falcon", {"hidden_size": 40, "num_attention_heads": 5, "new_decoder_architecture": False, "parallel_attn": True, "alibi": True, "multi_query": False, "bias": True}, tie=False),
    V("falcon-seq-rotary-w40-fp16-bin", "falcon", {"hidden_size": 40, "num_attention_heads": 5, "new_decoder_architecture": False, "parallel_attn": False, "alibi": False, "multi_query": True}, dtype="float16", storage="bin"),
    V("falcon-new-seq", "falcon", {"new_decoder_architecture": True, "parallel_attn": False}, expect="refused"),
    # --- GPT-BigCode
    V("gpt_bigcode-w40-h5-mq-noscale-untied", "gpt_bigcode", {"n_embd": 40, "n_head": 5, "multi_query": True, "scale_attn_weights": False, "n_inner": 100}, tie=False),
    V("gpt_bigcode-w72-h6-mha-bf16", "gpt_bigcode", {"n_embd": 72, "n_head": 6, "multi_query": False}, dtype="bfloat16"),
    V("gpt_bigcode-cross-attention", "gpt_bigcode", {"add_cross_attention": True, "multi_query": False}, expect="refused"),
    # --- MPT
    V("mpt-w40-h5-bias-untied", "mpt", {"d_model": 40, "n_heads": 5, "no_bias": False, "expansion_ratio": 3}, tie=False),
    V("mpt-w72-h6-clipqkv-noalibi-fp16", "mpt", {"d_model": 72, "n_heads": 6, "attn_config": {"clip_qkv": 2.0, "alibi": False}}, dtype="float16"),
    # --- StableLM
    V("stablelm-w40-h5-mqa-par-qkbias-qkln-tied", "stablelm", {"hidden_size": 40, "num_attention_heads": 5, "num_key_value_heads": 1, "partial_rotary_factor": 0.5, "use_qkv_bias": True, "use_parallel_residual": True, "qk_layernorm": True}),
    V("stablelm-w72-h6-gqa-seq-untied-bf16-bin", "stablelm", {"hidden_size": 72, "num_attention_heads": 6, "num_key_value_heads": 2, "partial_rotary_factor": 1.0}, dtype="bfloat16", storage="bin", tie=False),
    # --- StarCoder2
    V("starcoder2-w72-h6-mqa-nobias-untied", "starcoder2", {"hidden_size": 72, "num_attention_heads": 6, "num_key_value_heads": 1, "use_bias": False}, tie=False),
    V("starcoder2-w40-h5-fp16", "starcoder2", {"hidden_size": 40, "num_attention_heads": 5, "num_key_value_heads": 5}, dtype="float16"),
    # --- Cohere / Cohere2
    V("cohere-w40-h5-mqa-qknorm-tied", "cohere", {"hidden_size": 40, "num_attention_heads": 5, "num_key_value_heads": 1, "use_qk_norm": True, "logit_scale": 0.0625}),
    V("cohere-w72-h6-bias-untied-bf16", "cohere", {"hidden_size": 72, "num_attention_heads": 6, "num_key_value_heads": 6, "attention_bias": True}, dtype="bfloat16", tie=False),
    V("cohere2-w72-h6-gqa-untied", "cohere2", {"hidden_size": 72, "num_attention_heads": 6, "num_key_value_heads": 3, "sliding_window": 4}, tie=False),
    V("cohere2-w40-h5-fp16-bin", "cohere2", {"hidden_size": 40, "num_attention_heads": 5, "num_key_value_heads": 1}, dtype="float16", storage="bin"),
    # --- Persimmon
    V("persimmon-w40-h5-noqkln-tied", "persimmon", {"hidden_size": 40, "num_attention_heads": 5, "qk_layernorm": False, "partial_rotary_factor": 0.5}),
    V("persimmon-w72-h6-bf16", "persimmon", {"hidden_size": 72, "num_attention_heads": 6, "intermediate_size": 100}, dtype="bfloat16", tie=False),
    # --- Nemotron
    V("nemotron-w40-h5-mqa-rot0.5-tied", "nemotron", {"hidden_size": 40, "num_attention_heads": 5, "num_key_value_heads": 1, "head_dim": 8, "partial_rotary_factor": 0.5}),
    V("nemotron-w72-h6-bias-fp16", "nemotron", {"hidden_size": 72, "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 12, "attention_bias": True, "mlp_bias": True}, dtype="float16", tie=False),
    # --- BioGPT
    V("biogpt-w40-h5-noscale-untied", "biogpt", {"hidden_size": 40, "num_attention_heads": 5, "scale_embedding": False}, tie=False),
    V("biogpt-w72-h6-bf16-bin", "biogpt", {"hidden_size": 72, "num_attention_heads": 6, "intermediate_size": 100}, dtype="bfloat16", storage="bin"),
    # --- OLMo
    V("olmo-w40-h5-mqa-clip-untied", "olmo", {"hidden_size": 40, "num_attention_heads": 5, "num_key_value_heads": 1, "clip_qkv": 2.0}, tie=False),
    V("olmo-w72-h6-bias-tied-bf16", "olmo", {"hidden_size": 72, "num_attention_heads": 6, "num_key_value_heads": 2, "attention_bias": True}, dtype="bfloat16"),
    # --- ViT / DINOv2: non-square images, other patch sizes, one channel
    V("vit-cls-12x20-p4-w40-noqkvbias", "vit", {"hidden_size": 40, "num_attention_heads": 5, "image_size": [12, 20], "patch_size": 4, "num_channels": 1, "qkv_bias": False, "num_labels": 3}, auto_class="ViTForImageClassification"),
    V("vit-model-15-p5-w72-bf16", "vit", {"hidden_size": 72, "num_attention_heads": 6, "image_size": 15, "patch_size": 5}, dtype="bfloat16", auto_class="ViTModel"),
    # transformers' DINOv2 interpolates its positions as a square grid: a non-square one cannot run
    V("dinov2-14x21-p7-nonsquare", "dinov2", {"hidden_size": 40, "num_attention_heads": 5, "image_size": [14, 21], "patch_size": 7}, expect="refused"),
    V("dinov2-21-p7-w40-swiglu-fp16", "dinov2", {"hidden_size": 40, "num_attention_heads": 5, "image_size": 21, "patch_size": 7, "use_swiglu_ffn": True, "layerscale_value": 0.1, "num_channels": 1}, dtype="float16"),
    V("dinov2-cls-20-p5-w72", "dinov2", {"hidden_size": 72, "num_attention_heads": 6, "image_size": 20, "patch_size": 5, "mlp_ratio": 3, "num_labels": 4}, auto_class="Dinov2ForImageClassification", storage="bin"),
    # --- ESM
    V("esm-w40-h5-absolute-nodropout-untied", "esm", {"hidden_size": 40, "num_attention_heads": 5, "position_embedding_type": "absolute", "token_dropout": False}, tie=False),
    V("esm-w72-h6-rotary-bf16", "esm", {"hidden_size": 72, "num_attention_heads": 6, "intermediate_size": 100}, dtype="bfloat16"),
    V("esm-emb-ln-before", "esm", {"emb_layer_norm_before": True}, expect="refused"),
    V("esm-emb-ln-before-nodropout", "esm", {"emb_layer_norm_before": True, "token_dropout": False}, expect="refused"),
    # --- CLIP text
    V("clip_text-w40-h5-quickgelu", "clip_text_model", {"hidden_size": 40, "num_attention_heads": 5, "hidden_act": "quick_gelu"}),
    V("clip_text-proj-w72-h6-fp16", "clip_text_model", {"hidden_size": 72, "num_attention_heads": 6, "projection_dim": 24}, dtype="float16", auto_class="CLIPTextModelWithProjection"),
    # --- pooled classifiers in reduced dtypes: their logits average away the layers' rounding
    V("esm-seqcls-w72-h6-bf16", "esm", {"hidden_size": 72, "num_attention_heads": 6, "num_labels": 2}, dtype="bfloat16", auto_class="EsmForSequenceClassification"),
    V("esm-tokcls-w40-h5-absolute-fp16", "esm", {"hidden_size": 40, "num_attention_heads": 5, "num_labels": 7, "position_embedding_type": "absolute"}, dtype="float16", auto_class="EsmForTokenClassification"),
    V("whisper-audiocls-w72-h6-bf16", "whisper", {"d_model": 72, "encoder_layers": 3, "encoder_attention_heads": 6, "num_labels": 5, "classifier_proj_size": 32}, dtype="bfloat16", auto_class="WhisperForAudioClassification"),
    V("dinov2-classifier-w72-h6-bf16", "dinov2", {"hidden_size": 72, "num_attention_heads": 6, "num_labels": 3}, dtype="bfloat16", auto_class="Dinov2ForImageClassification"),
    # --- the other heads in reduced dtypes
    V("vit-mim-16-p4-w40-stride4-bf16", "vit", {"hidden_size": 40, "num_attention_heads": 5, "image_size": 16, "patch_size": 4, "encoder_stride": 4}, dtype="bfloat16", auto_class="ViTForMaskedImageModeling"),
    V("esm-model-w72-h6-fp16", "esm", {"hidden_size": 72, "num_attention_heads": 6}, dtype="float16", auto_class="EsmModel"),
    V("whisper-model-enc2-dec2-w40-fp16", "whisper", {"d_model": 40, "encoder_attention_heads": 5, "decoder_attention_heads": 5}, dtype="float16", auto_class="WhisperModel"),
    V("clip_text-w40-h5-bf16", "clip_text_model", {"hidden_size": 40, "num_attention_heads": 5}, dtype="bfloat16"),
    V("dinov2-cls-swiglu-ls-w40-fp16", "dinov2", {"hidden_size": 40, "num_attention_heads": 5, "use_swiglu_ffn": True, "layerscale_value": 0.5, "num_labels": 6}, dtype="float16", auto_class="Dinov2ForImageClassification"),
    V("vit-cls-w72-h6-fp16", "vit", {"hidden_size": 72, "num_attention_heads": 6, "num_labels": 2}, dtype="float16", auto_class="ViTForImageClassification"),
    # --- Whisper: other layer counts, widths, untied head
    V("whisper-enc1-dec3-w40-h5", "whisper", {"d_model": 40, "encoder_layers": 1, "decoder_layers": 3, "encoder_attention_heads": 5, "decoder_attention_heads": 5, "encoder_ffn_dim": 72, "decoder_ffn_dim": 100}),
    V("whisper-enc3-dec1-w72-untied-bf16", "whisper", {"d_model": 72, "encoder_layers": 3, "decoder_layers": 1, "encoder_attention_heads": 6, "decoder_attention_heads": 3}, dtype="bfloat16", tie=False),
]


@torch.no_grad()
def trained_like(model: torch.nn.Module, seed: int) -> None:
    """On top of the examples' perturbation: what trained checkpoints look like."""
    generator = torch.Generator().manual_seed(seed + 7919)

    def noise(shape, scale=1.0):
        return torch.randn(shape, generator=generator) * scale

    def pick(n, k):
        return torch.randperm(n, generator=generator)[: max(1, min(k, n))]

    for _name, module in model.named_modules():
        kind = type(module).__name__
        weight = getattr(module, "weight", None)
        bias = getattr(module, "bias", None)
        if isinstance(module, torch.nn.LayerNorm) or "layernorm" in kind.lower():
            if isinstance(weight, torch.nn.Parameter):
                gamma = 0.6 + noise(weight.shape, 1.0)  # far from 1, many negative
                flat = gamma.view(-1)
                chosen = pick(flat.numel(), max(2, flat.numel() // 10))
                half = len(chosen) // 2
                flat[chosen[:half]] = noise(half, 1e-3)  # near 0
                flat[chosen[half:]] = -flat[chosen[half:]].abs() - 0.5  # negative
                weight.copy_(gamma)
            if isinstance(bias, torch.nn.Parameter):
                bias.copy_(noise(bias.shape, 2.0))  # large β
        elif isinstance(module, torch.nn.Embedding):
            rows, width = module.weight.shape
            module.weight.add_(2.0 + noise((1, width), 1.0))  # a large common mean
            module.weight[:, pick(width, 2)] *= 50.0  # a few outlier feature columns
        elif isinstance(bias, torch.nn.Parameter):
            bias.add_(noise(bias.shape, 1.5))  # large writer (and reader) biases
        elif "norm" not in kind.lower() and not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv1d)) and kind != "Conv1D":
            for parameter in module.parameters(recurse=False):  # ViT / DINOv2 cls token, positions
                if parameter.dim() >= 2:
                    parameter.add_(2.0 + noise(parameter.shape[-1:], 1.0))


BUILD_LOCK = threading.Lock()  # builds patch examples.perturb and import transformers lazily: one at a time


def build(variant: Variant, folder: Path, plain: bool) -> None:
    with BUILD_LOCK:
        _build(variant, folder, plain)


def _build(variant: Variant, folder: Path, plain: bool) -> None:
    seed = sum(map(ord, variant.id)) % 10007
    original = examples.perturb

    def perturb(model, seed_):
        original(model, seed_)
        if not plain:
            trained_like(model, seed_)

    examples.perturb = perturb
    try:
        shard = variant.storage.split(":", 1)[1] if variant.storage.startswith("safetensors:") else "100GB"
        examples.build_checkpoint(
            folder, variant.family, seed=seed, overrides=variant.overrides, dtype=DTYPES[variant.dtype],
            max_shard_size=shard, tie_word_embeddings=variant.tie, auto_class=variant.auto_class,
        )
    finally:
        examples.perturb = original
    if variant.storage == "bin":
        from safetensors.torch import load_file

        files = sorted(folder.glob("*.safetensors"))
        state = {}
        for file in files:
            state.update(load_file(str(file)))
            file.unlink()
        (folder / "model.safetensors.index.json").unlink(missing_ok=True)
        torch.save(state, folder / "pytorch_model.bin")


def convert(src: Path, out: Path, target: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    # the CLI entry point installed beside this interpreter; the package imported is this checkout's (PYTHONPATH)
    installed = Path(sys.executable).parent / "prenorm-convert"
    cli = [str(installed)] if installed.exists() else [sys.executable, "-c", "import sys; from prenorm_convert.cli import app; sys.exit(app())"]
    command = [*cli, "convert", str(src), str(out), "--quiet", "--overwrite", "--allow-pickle", *TARGETS[target]]
    started = time.time()
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
    result = {"target": target, "rc": done.returncode, "seconds": round(time.time() - started, 1)}
    report_path = out / "conversion_report.json"
    if report_path.exists():
        report = json.loads(report_path.read_text())
        result.update(
            passed=report.get("passed"), rel=report.get("relative_max_abs_logit_diff"), failures=report.get("failures"),
            greedy=(report.get("greedy_match") or {}).get("identical"), dtype=report.get("dtype"),
            first_bad_layer=report.get("first_bad_layer"),
        )
    stderr = done.stderr.strip()
    if done.returncode != 0:
        result["message"] = stderr[-1500:]
        saved = re.search(r"saved to (\S+\.txt)", stderr)
        if saved and Path(saved.group(1)).exists():
            result["traceback"] = Path(saved.group(1)).read_text()[-3000:]
    return result


def expected(variant: Variant, target: str) -> str:
    if isinstance(variant.expect, dict):
        return variant.expect.get(target, "ok")
    return variant.expect


def verdict(variant: Variant, result: dict) -> bool:
    if expected(variant, result["target"]) == "refused":
        return result["rc"] == 2
    # the per-layer audit must agree with the gate: a passing conversion has no layer off
    return result["rc"] == 0 and bool(result.get("passed")) and result.get("first_bad_layer") is None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=[])
    parser.add_argument("--dtypes", default=None, help="comma-separated: only the variants stored in these (float32,bfloat16,float16)")
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--plain", action="store_true", help="only the examples' perturbation (no trained-like weights)")
    args = parser.parse_args()
    targets = args.targets.split(",")
    variants = [v for v in VARIANTS if not args.only or any(s in v.id for s in args.only)]
    if args.dtypes:
        variants = [v for v in variants if v.dtype in args.dtypes.split(",")]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="prenorm-sweep-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []

    def run_variant(variant: Variant) -> dict:
        src = work / variant.id / "src"
        row = {"id": variant.id, "family": variant.family, "dtype": variant.dtype, "storage": variant.storage, "results": []}
        try:
            if src.exists():
                shutil.rmtree(src)
            build(variant, src, args.plain)
        except Exception as error:  # a config transformers cannot build: reported, not a tool failure
            row["build_error"] = f"{type(error).__name__}: {error}"[:500]
            return row
        for target in targets:
            result = convert(src, work / variant.id / target, target)
            result["ok"] = verdict(variant, result)
            result["expected"] = expected(variant, target)
            row["results"].append(result)
        return row

    print("| variant | dtype | storage | " + " | ".join(targets) + " |")
    print("|---|---|---|" + "---|" * len(targets), flush=True)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for row in pool.map(run_variant, variants):
            rows.append(row)
            if "build_error" in row:
                cells = ["build error: " + row["build_error"][:80]] * 1 + [""] * (len(targets) - 1)
            else:
                cells = []
                for r in row["results"]:
                    mark = "✓" if r["ok"] else "✗"
                    detail = f"rc={r['rc']}"
                    if r.get("rel") is not None:
                        detail += f" rel={r['rel']:.1e}"
                    if r.get("first_bad_layer") is not None:
                        detail += f" layer {r['first_bad_layer']} off"
                    if r["expected"] == "refused":
                        detail += " (refusal expected)"
                    cells.append(f"{mark} {detail}")
            print(f"| {row['id']} | {row['dtype']} | {row['storage']} | " + " | ".join(cells) + " |", flush=True)
    results = [r for row in rows for r in row.get("results", [])]
    failed = [(row["id"], r) for row in rows for r in row.get("results", []) if not r["ok"]]
    print(f"\n{len(rows)} variants, {len(results)} conversions, {len(results) - len(failed)} as expected, "
          f"{len(failed)} not, {sum('build_error' in row for row in rows)} not buildable", flush=True)
    for variant_id, r in failed:
        print(f"\n## {variant_id} [{r['target']}] rc={r['rc']} passed={r.get('passed')} rel={r.get('rel')} first_bad_layer={r.get('first_bad_layer')}")
        if r.get("failures"):
            print("failures:", r["failures"])
        if r.get("message"):
            print(r["message"][-800:])
        if r.get("traceback"):
            print(r["traceback"][-1500:])
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    print(f"\nwork folder: {work}")


if __name__ == "__main__":
    main()
