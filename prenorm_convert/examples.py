"""Small, offline example checkpoints (the demo and the tests build them here).

Random init leaves LayerNorm γ=1, β=0 and zero biases, which hides folding bugs, so every
parameter is perturbed: γ far from 1, β, linear biases and embedding row means far from 0.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import BadInputError

# a folder holding this file was made by `prenorm-convert demo`, which may then replace its outputs
DEMO_MARKER = ".prenorm-demo"
DEMO_OUTPUTS = ("original", "converted")

TRAINING_TEXT = """
The quick brown fox jumps over the lazy dog. Pre-LayerNorm transformers normalise every branch input.
In 1905, Albert Einstein published four papers that changed physics: the photoelectric effect,
Brownian motion, special relativity and mass-energy equivalence. def fibonacci(n): return n if n < 2
else fibonacci(n - 1) + fibonacci(n - 2). Les modèles de langage apprennent à prédire le mot suivant.
Q: What is 17 times 23? A: 391. Once upon a time, in a village by the sea, there lived a fisherman.
SELECT name, count(*) FROM users GROUP BY name ORDER BY 2 DESC; The residual stream is zero-mean.
"""

SHAPES = {
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128},
    # opt-125m / bloom-560m structure, scaled down (OPT: relu MLP 4x wide, biases, learned positions)
    "opt": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "ffn_dim": 256, "max_position_embeddings": 128},
    "bloom": {"hidden_size": 64, "n_layer": 2, "n_head": 4},
    # parallel-block families: partial rotary where the family has it, biases as their configs give them
    "gpt_neox": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256, "max_position_embeddings": 128},
    "gptj": {"n_embd": 64, "n_layer": 2, "n_head": 4, "rotary_dim": 8, "n_positions": 128},
    "codegen": {"n_embd": 64, "n_layer": 2, "n_head": 4, "rotary_dim": 8, "n_positions": 128, "n_ctx": 128},
    "gpt_neo": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "attention_types": [[["global", "local"], 1]], "window_size": 8, "max_position_embeddings": 128},
    "phi": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256, "max_position_embeddings": 128},
    "falcon": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
    "gpt_bigcode": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128},
    "mpt": {"d_model": 64, "n_layers": 2, "n_heads": 4, "max_seq_len": 128},
    "stablelm": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 128, "max_position_embeddings": 128},
    "starcoder2": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128, "max_position_embeddings": 128},
    "cohere": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128, "max_position_embeddings": 128},
    "cohere2": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128, "max_position_embeddings": 128, "sliding_window": 8},
    "persimmon": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128, "max_position_embeddings": 128},
    "nemotron": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128, "max_position_embeddings": 128},
    "biogpt": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128, "max_position_embeddings": 128},
    "olmo": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128, "max_position_embeddings": 128},
    # encoders and vision models (loaded with the Auto class their spec names)
    "esm": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128, "max_position_embeddings": 130,
            "position_embedding_type": "rotary", "token_dropout": True, "pad_token_id": 1, "emb_layer_norm_before": False},
    "clip_text_model": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128, "max_position_embeddings": 64, "projection_dim": 32},
    "vit": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128, "image_size": 16, "patch_size": 4, "num_labels": 7},
    "dinov2": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "mlp_ratio": 2, "image_size": 16, "patch_size": 4},
    "whisper": {"d_model": 64, "encoder_layers": 2, "decoder_layers": 3, "encoder_attention_heads": 4, "decoder_attention_heads": 4,
                "encoder_ffn_dim": 128, "decoder_ffn_dim": 128, "num_mel_bins": 8, "max_source_positions": 16, "max_target_positions": 64},
}


def build_tokenizer(folder: Path, vocab_size: int = 384):
    """A byte-level BPE tokenizer trained on a few built-in sentences (no download)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator([TRAINING_TEXT] * 4, vocab_size=vocab_size, min_frequency=1, special_tokens=["<|endoftext|>"], show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=trainer, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    tokenizer.save_pretrained(str(folder))
    return tokenizer


_LEAVES = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv2d, torch.nn.LayerNorm)


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int) -> None:
    """Make every LayerNorm, bias and embedding mean non-trivial (deterministically)."""
    generator = torch.Generator().manual_seed(seed)

    def noise(shape, scale):
        return torch.randn(shape, generator=generator) * scale

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.LayerNorm) or "layernorm" in type(module).__name__.lower():
            # torch's LayerNorm, and the families' own (CohereLayerNorm: γ only; Nemotron stores γ - 1)
            if isinstance(getattr(module, "weight", None), torch.nn.Parameter):
                module.weight.copy_(1.0 + noise(module.weight.shape, 0.4))
            if isinstance(getattr(module, "bias", None), torch.nn.Parameter):
                module.bias.copy_(noise(module.bias.shape, 0.3))
        elif isinstance(module, torch.nn.Embedding):
            rows, width = module.weight.shape
            module.weight.add_(noise((rows, 1), 0.3) + noise((1, width), 0.2) + 0.5)
        elif getattr(module, "bias", None) is not None and isinstance(module.bias, torch.nn.Parameter):
            module.bias.copy_(noise(module.bias.shape, 0.1))
        if not isinstance(module, _LEAVES) and type(module).__name__ != "Conv1D" and "norm" not in type(module).__name__.lower():
            # parameters a module holds itself: ViT's cls_token and position embeddings (means far
            # from 0), DINOv2's LayerScale λ (far from 1)
            for parameter in module.parameters(recurse=False):
                parameter.add_(noise(parameter.shape, 0.3) + noise(parameter.shape[:-1] + (1,), 0.3) + 0.5)


def build_checkpoint(
    folder: str | Path,
    family: str = "gpt2",
    *,
    seed: int = 0,
    overrides: dict | None = None,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str = "100KB",
    tokenizer: bool = True,
    tie_word_embeddings: bool = True,
    auto_class: str | None = None,
):
    """Write a tiny random-but-non-trivial checkpoint of `family` to `folder` with save_pretrained,
    built by ``auto_class`` (default: the one the family's spec names)."""
    import transformers

    from .meta_model import from_config

    transformers.utils.logging.disable_progress_bar()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec = _family_spec(family)
    settings = dict(SHAPES[family])
    if spec is None or spec.inputs != "image":
        vocab_size, special = 384, {}
        if tokenizer:
            built = build_tokenizer(folder)
            vocab_size = len(built)
            special = {"bos_token_id": built.bos_token_id, "eos_token_id": built.eos_token_id}
        settings.update({"vocab_size": vocab_size, "tie_word_embeddings": tie_word_embeddings, **special})
        if family == "esm":  # ESM's token dropout rescales by the share of <mask> tokens in a sequence
            settings["mask_token_id"] = vocab_size - 1
        if family == "whisper":  # its default special ids are beyond a tiny vocabulary
            settings.update(pad_token_id=special.get("eos_token_id", 0), decoder_start_token_id=special.get("bos_token_id", 0))
    config = transformers.AutoConfig.for_model(family, **{**settings, **(overrides or {})})
    torch.manual_seed(seed)
    loader = getattr(transformers, auto_class or (spec.auto_class if spec else "AutoModelForCausalLM"))
    model = from_config(loader, config)
    perturb(model, seed)
    model.to(dtype)
    model.save_pretrained(str(folder), max_shard_size=max_shard_size)
    return model.eval()


def _family_spec(family: str):
    """The first spec of a model_type (its default architecture), or None."""
    from .spec_loader import load_specs

    return next((spec for spec in load_specs() if family in spec.model_types), None)


def strip_prefix(folder: str | Path, prefix: str, extra: dict[str, torch.Tensor] | None = None) -> None:
    """Rewrite a saved checkpoint in the older key style (keys without `prefix`), adding `extra`
    tensors (e.g. GPT-2's `h.N.attn.bias` causal-mask buffers) as the original uploads have them."""
    rename_prefix(folder, prefix, "", extra)


def rename_prefix(folder: str | Path, old: str, new: str, extra: dict[str, torch.Tensor] | None = None) -> None:
    """Rewrite a saved checkpoint with every key starting with `old` starting with `new` instead
    (e.g. Pythia's uploads name transformers' `lm_head.` `embed_out.`), adding `extra` tensors."""
    folder = Path(folder)
    index_path = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index_path.read_text())["weight_map"].values())) if index_path.exists() else ["model.safetensors"]
    weight_map = {}
    for position, file_name in enumerate(files):
        with safe_open(str(folder / file_name), framework="pt") as handle:
            tensors = {(new + key[len(old):] if key.startswith(old) else key): handle.get_tensor(key) for key in handle.keys()}
        if position == 0 and extra:
            tensors.update(extra)
        save_file(tensors, str(folder / file_name), metadata={"format": "pt"})
        weight_map.update({key: file_name for key in tensors})
    if index_path.exists():
        index = json.loads(index_path.read_text())
        index["weight_map"] = weight_map
        index_path.write_text(json.dumps(index, indent=2))


def prepare_demo_folder(workdir: str | Path) -> tuple[Path, Path]:
    """(original, converted) inside ``workdir``, ready to be written: a new or empty folder is claimed
    for the demo (a marker file, and a .gitignore so it never shows up in a repository); a folder an
    earlier demo made has its two outputs removed, and nothing else; any other folder is refused."""
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise BadInputError(f"--workdir '{workdir}' is a file; give a folder that is new, empty, or made by an earlier demo")
    if workdir.exists() and any(workdir.iterdir()) and not (workdir / DEMO_MARKER).is_file():
        raise BadInputError(
            f"--workdir '{workdir}' already holds files that `prenorm-convert demo` did not create, and the demo "
            "replaces what is in it; choose a new or empty folder (e.g. --workdir prenorm-demo-2)"
        )
    if not workdir.parent.is_dir():
        raise BadInputError(f"the parent folder of --workdir '{workdir}' does not exist; create it first")
    workdir.mkdir(exist_ok=True)
    (workdir / DEMO_MARKER).write_text("made by `prenorm-convert demo`, which replaces original/ and converted/ here\n")
    (workdir / ".gitignore").write_text("# made by `prenorm-convert demo`\n*\n")
    for name in DEMO_OUTPUTS:
        if (workdir / name).is_dir() and not (workdir / name).is_symlink():
            shutil.rmtree(workdir / name)
        elif (workdir / name).exists() or (workdir / name).is_symlink():
            (workdir / name).unlink()
    return workdir / "original", workdir / "converted"
