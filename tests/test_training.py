"""Fine-tuning a converted model is fine-tuning the original: trained side by side (float64, AdamW
with weight decay, dropout off), the losses and the final logits agree; the tuned model saves centred
weights and reloads to the same logits; the opt-out (plain Pre-RMSNorm training) drifts."""

from __future__ import annotations

import pytest
import torch
import transformers

from conftest import conversion_cache
from prenorm_convert.examples import build_checkpoint

DROPOUT_OFF = {
    "gpt2": {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
    "opt": {"dropout": 0.0, "attention_dropout": 0.0, "layerdrop": 0.0},
    "bloom": {"hidden_dropout": 0.0, "attention_dropout": 0.0},
}
STEPS = 12


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    def build(family: str):
        folder = tmp_path_factory.mktemp("train") / family
        build_checkpoint(folder, family, seed=5, dtype=torch.float64)  # stored in float64: nothing rounded
        return folder

    return conversion_cache(tmp_path_factory, build)


def load64(folder, family: str, remote: bool):
    transformers.utils.logging.disable_progress_bar()
    return transformers.AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=remote, dtype=torch.float64, **DROPOUT_OFF[family])


def batches(vocab: int) -> list[torch.Tensor]:
    """Two batches, alternated: the runs fit them, so the loss falls."""
    generator = torch.Generator().manual_seed(0)
    pair = [torch.randint(0, vocab, (2, 16), generator=generator) for _ in range(2)]
    return [pair[step % 2] for step in range(STEPS)]


def fine_tune(model, data: list[torch.Tensor]) -> list[float]:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1)
    losses = []
    for ids in data:
        # next-token cross entropy in float64 (transformers' own loss casts the logits to float32)
        scores = model(ids).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(scores.reshape(-1, scores.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


def relative(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("family", ["gpt2", "opt", "bloom"])  # BLOOM: its stem norm trains as the original's
def test_fine_tuning_the_converted_model_is_fine_tuning_the_original(converted, family, tmp_path):
    src, out = converted(family)
    original, candidate = load64(src, family, remote=False), load64(out, family, remote=True)
    data = batches(original.config.vocab_size)
    expected, actual = fine_tune(original, data), fine_tune(candidate, data)
    assert expected[-1] < expected[0], "the runs train"
    assert relative(actual, expected) <= 1e-9, (actual, expected)
    probe = data[0]
    assert relative(logits(candidate, probe), logits(original, probe)) <= 1e-9
    # eval mode re-centred the trained weights: the saved folder holds a zero-mean stream, same logits
    candidate.save_pretrained(str(tmp_path / "tuned"))
    reloaded = load64(tmp_path / "tuned", family, remote=True)
    assert relative(logits(reloaded, probe), logits(candidate, probe)) <= 1e-12
    block = reloaded.config.prenorm
    for path in block["train_centered"]:
        module = reloaded.get_submodule(path)
        axis = -1 if isinstance(module, torch.nn.Embedding) else (0 if isinstance(module, torch.nn.Linear) else 1)
        assert float(module.weight.detach().mean(axis).abs().max()) < 1e-12, path


def test_the_opt_out_trains_plain_pre_rmsnorm_and_drifts(converted):
    src, out = converted("gpt2")
    original, candidate = load64(src, "gpt2", remote=False), load64(out, "gpt2", remote=True)
    candidate.prenorm_train_centering = False
    data = batches(original.config.vocab_size)
    expected, actual = fine_tune(original, data), fine_tune(candidate, data)
    assert relative(actual, expected) > 1e-6, "without centring, training leaves the original's function"


def test_training_a_folded_model_warns_once(converted):
    _, out = converted("gpt2", ("--fold-affine",))
    model = load64(out, "gpt2", remote=True)
    with pytest.warns(UserWarning, match="different parametrization"):
        model.train()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.train()  # once only


def test_a_trainer_run_matches_the_originals_and_saves_centred_weights(converted, tmp_path):
    """Smoke test with transformers' Trainer (its own loop, loss and AdamW): the converted
    model's training losses follow the original's, and save_model writes centred writers."""
    src, out = converted("gpt2")
    vocab = transformers.AutoConfig.from_pretrained(str(src)).vocab_size
    data = [{"input_ids": row, "labels": row} for ids in batches(vocab) for row in ids]

    def train(folder, remote: bool, name: str) -> tuple[list[float], object]:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=remote, **DROPOUT_OFF["gpt2"])
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / name), max_steps=6, per_device_train_batch_size=2, learning_rate=1e-3, weight_decay=0.1,
            logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
        )
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        trainer.save_model(str(tmp_path / name / "saved"))
        return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry], model

    expected, _ = train(src, False, "original")
    actual, _ = train(out, True, "converted")
    assert len(actual) == len(expected) == 6
    assert relative(actual, expected) < 1e-4, (actual, expected)
    saved = load64(tmp_path / "converted" / "saved", "gpt2", remote=True)
    for path in saved.config.prenorm["train_centered"]:
        module = saved.get_submodule(path)
        axis = -1 if isinstance(module, torch.nn.Embedding) else 1  # GPT-2's Conv1D writers: [in, out]
        assert float(module.weight.detach().mean(axis).abs().max()) < 1e-6, path


LORA_TARGETS = {
    # readers and writers: GPT-2's fused qkv, both c_proj writers (attention and MLP), the MLP's input
    "gpt2": {"target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True},
    "opt": {"target_modules": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]},
    "bloom": {"target_modules": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]},
}


def with_lora(model, family: str, **extra):
    peft = pytest.importorskip("peft", reason="peft is in the `train` extra")
    torch.manual_seed(0)  # the same adapter initialisation for both models
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights="gaussian", **LORA_TARGETS[family], **extra)
    return peft.get_peft_model(model, config)


@pytest.mark.parametrize("family", ["gpt2", "opt", "bloom"])
def test_lora_on_readers_and_writers_is_exact_and_survives_save_load_and_merge(converted, family, tmp_path):
    peft = pytest.importorskip("peft", reason="peft is in the `train` extra")
    src, out = converted(family)
    original = with_lora(load64(src, family, remote=False), family)
    candidate = with_lora(load64(out, family, remote=True), family)
    data = batches(original.config.vocab_size)
    expected, actual = fine_tune(original, data), fine_tune(candidate, data)
    assert relative(actual, expected) <= 1e-9, (actual, expected)
    probe = data[0]
    tuned = logits(original, probe)
    assert relative(logits(candidate, probe), tuned) <= 1e-9
    candidate.save_pretrained(str(tmp_path / "adapter"))  # after eval(): the LoRA updates are stored centred
    reloaded = peft.PeftModel.from_pretrained(load64(out, family, remote=True), str(tmp_path / "adapter")).eval()
    assert relative(logits(reloaded, probe), tuned) <= 1e-9
    merged = reloaded.merge_and_unload()
    assert relative(logits(merged, probe), tuned) <= 1e-9


def test_dora_on_a_writer_is_refused_with_the_reason(converted):
    pytest.importorskip("peft", reason="peft is in the `train` extra")
    _, out = converted("gpt2")
    model = with_lora(load64(out, "gpt2", remote=True), "gpt2", use_dora=True)
    model.train()
    with pytest.raises(ValueError, match="DoRA on transformer.h.0.attn.c_proj, a writer of the residual stream"):
        model(batches(model.config.vocab_size)[0])


def test_with_dropout_on_it_is_the_original_started_from_the_centred_weights(converted):
    """Dropout draws the same masks in both runs (same seed, same calls); the converted model centres
    its norms' inputs, so it trains exactly as the stock class holding the same (centred) weights."""
    _, out = converted("gpt2")
    kwargs = {"resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1}
    stock = transformers.AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=False, dtype=torch.float64, **kwargs)
    candidate = transformers.AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True, dtype=torch.float64, **kwargs)
    assert type(stock).__name__ == "GPT2LMHeadModel" and any("RMSNorm" in type(m).__name__ for m in candidate.modules())
    data = batches(stock.config.vocab_size)
    torch.manual_seed(1)
    expected = fine_tune(stock, data)
    torch.manual_seed(1)
    actual = fine_tune(candidate, data)
    assert relative(actual, expected) <= 1e-9, (actual, expected)
