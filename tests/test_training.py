"""Fine-tuning a converted model is fine-tuning the original: trained side by side (float64, AdamW
with weight decay, dropout off), the losses and the final logits agree; the tuned model saves centred
weights and reloads to the same logits; the opt-out (plain Pre-RMSNorm training) drifts. Decoders
(GPT-2, OPT, BLOOM) with a next-token loss; an image classifier (ViT: cls_token and position
embeddings trained), a masked LM (ESM-2: tied head, token dropout) and an encoder-decoder (Whisper:
its encoder stream centred at entry) with their own losses."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
import transformers

from conftest import conversion_cache
from prenorm_convert.examples import build_checkpoint

STEPS = 12


def _token_batch(config, generator) -> dict:
    return {"input_ids": torch.randint(0, config.vocab_size, (2, 16), generator=generator)}


def _image_batch(config, generator) -> dict:
    pixels = torch.randn((2, 3, config.image_size, config.image_size), generator=generator, dtype=torch.float64)
    return {"pixel_values": pixels, "labels": torch.randint(0, config.num_labels, (2,), generator=generator)}


def _masked_batch(config, generator) -> dict:
    """A third of the tokens <mask>ed (ESM's token dropout rescales by their share), a padded row."""
    ids = torch.randint(2, config.mask_token_id, (2, 14), generator=generator)
    mask = torch.ones_like(ids)
    ids[1, 10:], mask[1, 10:] = config.pad_token_id, 0
    chosen = (torch.rand(ids.shape, generator=generator) < 0.3) & mask.bool()
    chosen[0, 3] = True
    labels = torch.where(chosen, ids, -100)
    return {"input_ids": ids.masked_fill(chosen, config.mask_token_id), "attention_mask": mask, "labels": labels}


def _speech_batch(config, generator) -> dict:
    """Log-mel features and target tokens, one row shorter (-100): the decoder's inputs are the
    labels shifted right, as transformers makes them."""
    features = torch.randn((2, config.num_mel_bins, 2 * config.max_source_positions), generator=generator, dtype=torch.float64)
    labels = torch.randint(2, config.vocab_size, (2, 10), generator=generator)
    labels[1, 7:] = -100
    return {"input_features": features, "labels": labels}


@dataclass(frozen=True)
class Family:
    model_type: str
    loader: str  # the Auto class both models load with (the converted one through its auto_map)
    dropout_off: dict  # with dropout on, the runs agree only in expectation (docs/training.md)
    batch: Callable  # (config, generator) -> model inputs; with labels: the model's own loss
    lora: dict = field(default_factory=dict)  # LoraConfig targets: readers and writers
    built_as: str | None = None  # build_checkpoint's auto_class where not the spec's default
    overrides: dict = field(default_factory=dict)


FAMILIES = {
    "gpt2": Family(
        "gpt2", "AutoModelForCausalLM", {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}, _token_batch,
        # GPT-2's fused qkv, both c_proj writers (attention and MLP), the MLP's input; wpe, a table
        {"target_modules": ["c_attn", "c_proj", "c_fc", "wpe"], "fan_in_fan_out": True},
    ),
    "opt": Family(
        "opt", "AutoModelForCausalLM", {"dropout": 0.0, "attention_dropout": 0.0, "layerdrop": 0.0}, _token_batch,
        {"target_modules": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]},
    ),
    "bloom": Family(
        "bloom", "AutoModelForCausalLM", {"hidden_dropout": 0.0, "attention_dropout": 0.0}, _token_batch,
        {"target_modules": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]},
    ),
    "vit": Family(
        "vit", "AutoModelForImageClassification", {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}, _image_batch,
        # the Conv2d patch projection is a writer too (its channels are the stream's features)
        {"target_modules": ["query", "key", "value", "o_proj", "fc1", "fc2", "projection"]},
        built_as="ViTForImageClassification",
    ),
    "esm": Family(
        "esm", "AutoModelForMaskedLM", {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}, _masked_batch,
        # dense: both writers, the MLP's input and the head's dense (which feeds the head's own norm)
        {"target_modules": ["query", "key", "value", "dense"]},
    ),
    "whisper": Family(
        "whisper", "AutoModelForSpeechSeq2Seq",
        {"dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0, "encoder_layerdrop": 0.0, "decoder_layerdrop": 0.0},
        _speech_batch, {"target_modules": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]},
    ),
    # LayerScale folded into the writers: not the original's parametrization (docs/training.md)
    "dinov2": Family(
        "dinov2", "AutoModelForImageClassification", {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}, _image_batch,
        built_as="Dinov2ForImageClassification", overrides={"num_labels": 5},
    ),
}
EXACT = ["gpt2", "opt", "bloom", "vit", "esm", "whisper"]  # BLOOM: its stem norm trains as the original's


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny float64 models: a second intra-op thread only adds synchronisation, which on a loaded
    two-core machine made these runs several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    def build(family: str):
        spec = FAMILIES[family]
        folder = tmp_path_factory.mktemp("train") / family
        # stored in float64: nothing rounded
        build_checkpoint(folder, spec.model_type, seed=5, dtype=torch.float64, auto_class=spec.built_as, overrides=spec.overrides)
        return folder

    cache = conversion_cache(tmp_path_factory, build)
    # the runs below compare the converted model with the original themselves (the first step's loss
    # is the untrained one); test_family_conformance verifies the conversions
    return lambda family, options=(): cache(family, ("--no-verify", *options))


def load64(folder, family: str, remote: bool):
    transformers.utils.logging.disable_progress_bar()
    spec = FAMILIES[family]
    return getattr(transformers, spec.loader).from_pretrained(str(folder), trust_remote_code=remote, dtype=torch.float64, **spec.dropout_off)


def batches(config, family: str) -> list[dict]:
    """Two batches, alternated: the runs fit them, so the loss falls."""
    generator = torch.Generator().manual_seed(0)
    pair = [FAMILIES[family].batch(config, generator) for _ in range(2)]
    return [pair[step % 2] for step in range(STEPS)]


def loss_of(model, batch: dict) -> torch.Tensor:
    output = model(**batch)
    if "labels" in batch:  # the family's own loss: cross entropy in the logits' dtype
        return output.loss
    # next-token cross entropy in float64 (transformers' own causal LM loss casts the logits to float32)
    scores, ids = output.logits[:, :-1], batch["input_ids"]
    return torch.nn.functional.cross_entropy(scores.reshape(-1, scores.shape[-1]), ids[:, 1:].reshape(-1))


def fine_tune(model, data: list[dict]) -> list[float]:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1)
    losses = []
    for batch in data:
        loss = loss_of(model, batch)
        assert loss.dtype == torch.float64
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def logits(model, batch: dict) -> torch.Tensor:
    return model(**batch).logits


def relative(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max())


def centring_left(model) -> dict[str, float]:
    """max |mean over the stream's features| of every train-centred weight and stream parameter."""
    block, left = model.config.prenorm, {}
    for path in block["train_centered"]:
        module = model.get_submodule(path)
        # an embedding's rows; a Linear's or a Conv2d's output axis 0; GPT-2's Conv1D is [in, out]
        axis = -1 if isinstance(module, torch.nn.Embedding) else (1 if type(module).__name__ == "Conv1D" else 0)
        left[path] = float(module.weight.detach().mean(axis).abs().max())
    for name in block.get("train_centered_parameters", []):  # ViT's cls_token and position embeddings
        left[name] = float(model.get_parameter(name).detach().mean(-1).abs().max())
    return left


@pytest.mark.parametrize("family", EXACT)
def test_fine_tuning_the_converted_model_is_fine_tuning_the_original(converted, family, tmp_path):
    src, out = converted(family)
    original, candidate = load64(src, family, remote=False), load64(out, family, remote=True)
    assert any("RMSNorm" in type(module).__name__ for module in candidate.modules()), "the remote code's model"
    data = batches(original.config, family)
    stream_parameters = {name: candidate.get_parameter(name).detach().clone() for name in candidate.config.prenorm.get("train_centered_parameters", [])}
    expected, actual = fine_tune(original, data), fine_tune(candidate, data)
    assert expected[-1] < expected[0], "the runs train"
    assert relative(actual, expected) <= 1e-9, (actual, expected)
    probe = data[0]
    assert relative(logits(candidate, probe), logits(original, probe)) <= 1e-9
    for name, before in stream_parameters.items():
        assert relative(candidate.get_parameter(name).detach(), before) > 1e-3, f"{name} trains"
    # eval mode re-centred the trained weights: the saved folder holds a zero-mean stream, same logits
    candidate.save_pretrained(str(tmp_path / "tuned"))
    reloaded = load64(tmp_path / "tuned", family, remote=True)
    assert relative(logits(reloaded, probe), logits(candidate, probe)) <= 1e-12
    left = centring_left(reloaded)
    assert left and max(left.values()) < 1e-12, left


def test_the_opt_out_trains_plain_pre_rmsnorm_and_drifts(converted):
    src, out = converted("gpt2")
    original, candidate = load64(src, "gpt2", remote=False), load64(out, "gpt2", remote=True)
    candidate.prenorm_train_centering = False
    data = batches(original.config, "gpt2")
    expected, actual = fine_tune(original, data), fine_tune(candidate, data)
    assert relative(actual, expected) > 1e-6, "without centring, training leaves the original's function"


# where docs/training.md says fine-tuning is not the original's: the converted model starts from the
# original's function (its first loss), warns once that it trains another parametrization, and does not
# take the original's steps
NOT_THE_ORIGINALS = [
    ("gpt2", "--fold-affine"),
    ("vit", "--fold-affine"),
    ("vit", "--target=crmsnorm"),
    ("esm", "--fold-affine"),
    ("esm", "--target=crmsnorm"),
    ("whisper", "--fold-affine"),
    ("whisper", "--target=crmsnorm"),
    ("dinov2", None),  # the default target: LayerScale λ folded into the writers
]


@pytest.mark.parametrize(("family", "option"), NOT_THE_ORIGINALS, ids=[f"{f}-{o or 'rmsnorm'}" for f, o in NOT_THE_ORIGINALS])
def test_another_parametrization_starts_as_the_original_warns_once_and_trains_otherwise(converted, family, option):
    src, out = converted(family, (option,) if option else ())
    original, candidate = load64(src, family, remote=False), load64(out, family, remote=True)
    with pytest.warns(UserWarning, match="different parametrization"):
        candidate.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        candidate.train()  # once only
    data = batches(original.config, family)[:3]
    expected, actual = fine_tune(original, data), fine_tune(candidate, data)
    assert relative(actual[:1], expected[:1]) <= 1e-9, "the same function before the first step"
    assert relative(actual, expected) > 1e-6, "not the original's steps, as documented"


def test_a_trainer_run_matches_the_originals_and_saves_centred_weights(converted, tmp_path):
    """Smoke test with transformers' Trainer (its own loop, loss and AdamW): the converted
    model's training losses follow the original's, and save_model writes centred writers."""
    src, out = converted("gpt2")
    config = transformers.AutoConfig.from_pretrained(str(src))
    data = [{"input_ids": row, "labels": row} for batch in batches(config, "gpt2") for row in batch["input_ids"]]

    def train(folder, remote: bool, name: str) -> tuple[list[float], object]:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=remote, **FAMILIES["gpt2"].dropout_off)
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
    left = centring_left(saved)
    assert max(left.values()) < 1e-6, left


def with_lora(model, family: str, **extra):
    peft = pytest.importorskip("peft", reason="peft is in the `train` extra")
    torch.manual_seed(0)  # the same adapter initialisation for both models
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights="gaussian", **{**FAMILIES[family].lora, **extra})
    return peft.get_peft_model(model, config)


@pytest.mark.parametrize("family", EXACT)
def test_lora_on_readers_and_writers_is_exact_and_survives_save_load_and_merge(converted, family, tmp_path):
    peft = pytest.importorskip("peft", reason="peft is in the `train` extra")
    src, out = converted(family)
    original = with_lora(load64(src, family, remote=False), family)
    candidate = with_lora(load64(out, family, remote=True), family)
    data = batches(original.config, family)
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
    model = with_lora(load64(out, "gpt2", remote=True), "gpt2", use_dora=True, target_modules=["c_attn", "c_proj", "c_fc"])
    model.train()
    with pytest.raises(ValueError, match="DoRA on transformer.h.0.attn.c_proj, a writer of the residual stream"):
        model(**batches(model.config, "gpt2")[0])


def test_with_dropout_on_it_is_the_original_started_from_the_centred_weights(converted):
    """Dropout draws the same masks in both runs (same seed, same calls); the converted model centres
    its norms' inputs, so it trains exactly as the stock class holding the same (centred) weights."""
    _, out = converted("gpt2")
    kwargs = {"resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1}
    stock = transformers.AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=False, dtype=torch.float64, **kwargs)
    candidate = transformers.AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True, dtype=torch.float64, **kwargs)
    assert type(stock).__name__ == "GPT2LMHeadModel" and any("RMSNorm" in type(m).__name__ for m in candidate.modules())
    data = batches(stock.config, "gpt2")
    torch.manual_seed(1)
    expected = fine_tune(stock, data)
    torch.manual_seed(1)
    actual = fine_tune(candidate, data)
    assert relative(actual, expected) <= 1e-9, (actual, expected)
