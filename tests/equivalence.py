"""Load an original and a converted checkpoint with transformers and compare what they compute."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

REL_LOGIT_TOL = 1e-5  # float32: max |Δlogit| over the logit scale (issue acceptance)
GREEDY_TOKENS = 32


def load(folder: Path, remote: bool, dtype=torch.float32):
    transformers.utils.logging.disable_progress_bar()
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), trust_remote_code=remote, dtype=dtype, output_loading_info=True
    )
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["unexpected_keys"], info["unexpected_keys"]
    return model.eval()


def sample_ids(vocab_size: int, batch: int = 3, length: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def relative_logit_error(original, converted, ids: torch.Tensor) -> float:
    reference = original(ids).logits.double()
    candidate = converted(ids).logits.double()
    return float((reference - candidate).abs().max() / reference.abs().max())


@torch.no_grad()
def greedy(model, ids, attention_mask=None, use_cache=True, tokens=GREEDY_TOKENS):
    return model.generate(
        ids,
        attention_mask=attention_mask if attention_mask is not None else torch.ones_like(ids),
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        do_sample=False,
        use_cache=use_cache,
        pad_token_id=0,
    )


def left_padded_batch(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = sample_ids(vocab_size, batch=2, length=12, seed=7)
    mask = torch.ones_like(ids)
    ids[1, :5] = 0
    mask[1, :5] = 0
    return ids, mask


def assert_equivalent(original_dir: Path, converted_dir: Path, remote: bool = True, padded: bool = True) -> dict:
    """Logits within float32 noise; greedy, uncached and left-padded generations identical."""
    original = load(original_dir, remote=False)
    converted = load(converted_dir, remote=remote)
    vocab = original.config.vocab_size
    ids = sample_ids(vocab)
    error = relative_logit_error(original, converted, ids)
    assert error <= REL_LOGIT_TOL, f"relative max |Δlogit| {error:.3g} > {REL_LOGIT_TOL}"
    prompt = ids[:1, :8]
    expected = greedy(original, prompt)
    assert expected.shape[1] == 8 + GREEDY_TOKENS
    assert torch.equal(expected, greedy(converted, prompt)), "cached greedy generations differ"
    assert torch.equal(expected, greedy(converted, prompt, use_cache=False)), "uncached greedy generations differ"
    if padded:
        padded_ids, mask = left_padded_batch(vocab)
        assert torch.equal(greedy(original, padded_ids, mask, tokens=12), greedy(converted, padded_ids, mask, tokens=12)), (
            "left-padded generations differ"
        )
    return {"relative_error": error, "original": original, "converted": converted}


def norm_types(model) -> set[str]:
    return {type(module).__name__ for module in model.modules() if "Norm" in type(module).__name__}


# -- encoders and vision models: no generation, several outputs ---------------------------------

ENCODER_OUTPUTS = ("logits", "reconstruction", "last_hidden_state", "pooler_output", "text_embeds", "encoder_last_hidden_state")


def load_class(folder: Path, class_name: str, remote: bool):
    transformers.utils.logging.disable_progress_bar()
    model, info = getattr(transformers, class_name).from_pretrained(
        str(folder), trust_remote_code=remote, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["unexpected_keys"], info["unexpected_keys"]
    return model.eval()


@torch.no_grad()
def encoder_outputs(model, inputs: dict) -> dict[str, torch.Tensor]:
    output = model(**inputs)
    return {key: getattr(output, key).double() for key in ENCODER_OUTPUTS if getattr(output, key, None) is not None}


def assert_outputs_match(original, converted, inputs: dict) -> float:
    """Every output the model gives (logits, last hidden state, pooled, projected) within float32 noise."""
    expected, found = encoder_outputs(original, inputs), encoder_outputs(converted, inputs)
    assert expected and set(found) == set(expected), (set(expected), set(found))
    worst = 0.0
    for key, reference in expected.items():
        error = float((reference - found[key]).abs().max() / reference.abs().max())
        assert error <= REL_LOGIT_TOL, f"{key}: relative max |Δ| {error:.3g} > {REL_LOGIT_TOL}"
        worst = max(worst, error)
    return worst
