"""The prompts a verification runs: the checkpoint's own tokenizer on varied texts (or a --prompts
file), seeded random ids without a tokenizer, cut to the model's positions."""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import BadInputError

DEFAULT_PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "In 1905, Albert Einstein published four papers that changed physics:",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Pre-LayerNorm transformers normalise the input of every branch, so",
    "Les modèles de langage apprennent à prédire le mot suivant.",
    "Q: What is 17 times 23?\nA:",
    "Once upon a time, in a village by the sea, there lived",
    "SELECT name, count(*) FROM users GROUP BY name ORDER BY 2 DESC;",
)
RANDOM_PROMPTS = 4
RANDOM_PROMPT_LENGTH = 24




def build_prompts(original: str | Path, vocab_size: int, prompt_lines: list[str] | None = None) -> list[torch.Tensor]:
    """Token-id prompts: the model's own tokenizer on varied texts (``prompt_lines``, from a --prompts
    file, or the built-in ones), or seeded random ids."""
    texts = list(DEFAULT_PROMPTS) if prompt_lines is None else prompt_lines
    tokenizer = _tokenizer(original)
    if tokenizer is not None:
        encoded = [torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long) for text in texts]
        return [ids for ids in encoded if ids.numel() > 0]
    if prompt_lines is not None:
        raise BadInputError(f"--prompts needs a tokenizer, and '{original}' has none")
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab_size, (RANDOM_PROMPT_LENGTH,), generator=generator) for _ in range(RANDOM_PROMPTS)]


def read_prompt_lines(prompts_file: str | Path) -> list[str]:
    """The non-empty lines of a --prompts file (UTF-8 text); checked before any work starts."""
    path = Path(prompts_file)
    if not path.exists():
        raise BadInputError(f"--prompts file '{path}' does not exist")
    if not path.is_file():
        raise BadInputError(f"--prompts '{path}' is not a file; give a text file with one prompt per line")
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise BadInputError(f"--prompts file '{path}' is not UTF-8 text") from None
    if not lines:
        raise BadInputError(f"--prompts file '{path}' holds no non-empty line")
    return lines


def check_greedy_fits(config: dict, greedy_tokens: int) -> int | None:
    """The model's number of positions (None: unlimited); --greedy-tokens must leave room for a prompt."""
    limit = config.get("n_positions") or config.get("max_position_embeddings")
    if limit and greedy_tokens >= limit:
        raise BadInputError(f"--greedy-tokens {greedy_tokens} does not fit the model's {limit} positions; ask for fewer")
    return limit


def fit_positions(prompts: list[torch.Tensor], config, greedy_tokens: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(prompts cut to the model's positions, the first two cut to leave room for greedy_tokens)."""
    limit = check_greedy_fits(config.to_dict(), greedy_tokens)
    if not limit:  # no learned positions (BLOOM's ALiBi): any length
        return prompts, prompts[:2] if greedy_tokens > 0 else []
    greedy_prompts = [ids[: limit - greedy_tokens] for ids in prompts[:2]] if greedy_tokens > 0 else []
    return [ids[:limit] for ids in prompts], greedy_prompts


def _tokenizer(path: str | Path):
    import transformers

    folder = Path(path)
    if not any((folder / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder))
    except Exception:
        return None




def batched(prompts: list[torch.Tensor], sizes: list[int]) -> list[tuple[torch.Tensor, list[int]]]:
    """Consecutive prompts in batches of ``sizes[i]`` prompts, each right-padded to its longest
    prompt: (ids, lengths).

    Exact for causal models: a position never attends to the ones after it, so each prompt's
    positions compute what they would alone; the padded positions are a valid continuation (the
    prompt followed by token 0), compared in both models like any other, and left out of the logits."""
    batches, start = [], 0
    for size in sizes:
        group, start = prompts[start : start + size], start + size
        if isinstance(group[0], dict):  # audio features (one size), and right-padded decoder ids if any
            batch, lengths = {"input_features": torch.stack([p["input_features"] for p in group])}, [None] * len(group)
            if "decoder_input_ids" in group[0]:
                batch["decoder_input_ids"], lengths = _right_padded([prompt["decoder_input_ids"] for prompt in group])
            batches.append((batch, lengths))
            continue
        if group[0].is_floating_point():  # images: all of one size, every output position compared
            batches.append((torch.stack(group), [None] * len(group)))
            continue
        batches.append(_right_padded(group))
    return batches


def _right_padded(group: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    lengths = [ids.numel() for ids in group]
    ids = torch.zeros(len(group), max(lengths), dtype=torch.long)
    for row, prompt in enumerate(group):
        ids[row, : prompt.numel()] = prompt
    return ids, lengths
