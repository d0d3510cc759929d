"""Every model type in configs/not_convertible.yaml, checked against what the installed transformers'
modeling code computes (issue 12: `cohere` was once refused as "already uses RMSNorm" although its
CohereLayerNorm subtracts the mean).

The audit is parametrized over the YAML itself, so a model type added later is audited too, and a
group without a check here fails ("unaudited group"): a new refusal reason needs a new check.

Checks by group:
- already_rmsnorm: the default model of that type, built on the meta device; one instance of every
  norm class in it (class name containing "Norm", or a torch.nn.LayerNorm) is materialised with
  random γ/β and must NOT be invariant to adding a constant to every feature (a LayerNorm is; an
  RMSNorm is not).
- rmsnorm_language_model_layernorm_vision: the same, except that mean-subtracting norms are allowed,
  and required, under `vision_tower.` only.
- post_layernorm: a tiny model in eval mode with default init (γ=1, β=0): every layer's output
  hidden state is normalised per token (mean 0, std 1), which a LayerNorm after the residual add
  produces and a Pre-LN stream never is (the control test shows GPT-2 fails it).
- sinusoidal_positions: the position embedding holds no stored weight (no parameter, nothing in the
  state dict), its vectors' means differ from position to position, and token + position embedding
  is exactly what enters the first layer (the residual stream).
- embedding_layernorm: `layernorm_embedding` is a LayerNorm applied to token + position embeddings
  whose output enters the first layer unchanged (it is the stream), and whose per-token mean varies
  once γ is not constant.
- raw_stream_vision_output: CLIP's vision tower (a tiny CLIPModel and CLIPVisionModel): the output
  of pre_layrnorm, a LayerNorm, is exactly what enters the first layer, and last_hidden_state is
  exactly the last layer's output (the raw stream, whose mean varies).
- legacy_remote_code, remote_code_rmsnorm: not a transformers model type (AutoConfig refuses it, no
  CONFIG_MAPPING entry). For remote_code_rmsnorm (InternLM2) the RMSNorm claim itself cannot be
  checked here: its modeling code lives in the hub repositories (`InternLM2RMSNorm`, a copy of
  LlamaRMSNorm), not in the installed transformers; the test says exactly that instead of skipping.
"""

from __future__ import annotations

import json
from importlib import resources

import pytest
import torch
import transformers
import yaml
from transformers import CONFIG_MAPPING

from conftest import run_cli, snapshot
from prenorm_convert.spec_loader import load_not_convertible, load_specs

GROUPS: dict = yaml.safe_load(resources.files("prenorm_convert").joinpath("configs", "not_convertible.yaml").read_text())
CASES = [(group, model_type) for group, data in GROUPS.items() for model_type in data["model_types"]]

# Small sizes for the tiny CPU models: only the keys the config class has are set.
TINY = {
    "vocab_size": 100,
    "hidden_size": 32, "d_model": 32, "dim": 32,
    "num_hidden_layers": 2, "n_layers": 2, "num_layers": 2, "encoder_layers": 2, "decoder_layers": 2,
    "num_attention_heads": 4, "n_heads": 4, "encoder_attention_heads": 4, "decoder_attention_heads": 4,
    "intermediate_size": 64, "hidden_dim": 64, "ffn_dim": 64, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
    "embedding_size": 16,
    "max_position_embeddings": 64,
}
SEQ = 9


# ---------------------------------------------------------------- helpers


def tiny_model(model_type: str):
    config_class = CONFIG_MAPPING[model_type]
    defaults = config_class()
    config = config_class(**{key: value for key, value in TINY.items() if hasattr(defaults, key)})
    torch.manual_seed(0)
    return transformers.AutoModel.from_config(config).eval()


def meta_model(model_type: str):
    config = transformers.AutoConfig.for_model(model_type)
    with torch.device("meta"):
        return transformers.AutoModel.from_config(config)


def random_ids(generator: torch.Generator) -> torch.Tensor:
    return torch.randint(3, TINY["vocab_size"], (2, SEQ), generator=generator)


def norm_modules(model) -> dict[type, list[tuple[str, torch.nn.Module]]]:
    """Every norm module of the model (class name containing "Norm", or a torch.nn.LayerNorm), by class."""
    found: dict[type, list[tuple[str, torch.nn.Module]]] = {}
    for name, module in model.named_modules():
        if "Norm" in type(module).__name__ or isinstance(module, torch.nn.LayerNorm):
            found.setdefault(type(module), []).append((name, module))
    return found


def randomise(module: torch.nn.Module, generator: torch.Generator, spread: float = 0.3) -> None:
    """Deterministic random γ around 1 and β around 0 (a norm computing with 1 + γ is fine too)."""
    with torch.no_grad():
        for name, parameter in module.named_parameters(recurse=False):
            if parameter.is_floating_point():
                centre = 0.0 if name.endswith("bias") else 1.0
                parameter.copy_(centre + spread * torch.randn(parameter.shape, generator=generator))


def subtracts_mean(name: str, module: torch.nn.Module) -> bool:
    """Materialise the (meta) norm module and tell whether adding a constant to every feature
    leaves its output unchanged, as a LayerNorm's is and an RMSNorm's is not."""
    module.to_empty(device="cpu")
    floating_buffers = [key for key, buffer in module.named_buffers() if buffer.is_floating_point()]
    assert not floating_buffers, f"{name} ({type(module).__name__}) has buffers {floating_buffers} the probe cannot fill"
    generator = torch.Generator().manual_seed(0)
    randomise(module, generator)
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        width = weight.shape[-1]
    elif getattr(module, "normalized_shape", None):
        width = tuple(module.normalized_shape)[-1]
    else:
        raise AssertionError(f"{name} ({type(module).__name__}): cannot tell the normalised width")
    x = torch.randn(4, width, generator=generator)
    with torch.no_grad():
        change = (module(x + 3.0) - module(x)).abs().max().item()
    assert change < 1e-4 or change > 1e-2, f"{name} ({type(module).__name__}): ambiguous response {change:.2e} to a shift"
    return change < 1e-4


def mean_subtracting_norms(model) -> dict[str, list[str]]:
    """class name -> every module name of that class, for each norm class that subtracts the mean."""
    return {
        cls.__name__: [name for name, _ in instances]
        for cls, instances in norm_modules(model).items()
        if subtracts_mean(*instances[0])
    }


class Recorder:
    """Forward hooks: the output of some modules and the hidden-state input of others."""

    def __init__(self):
        self.outputs: dict[str, torch.Tensor] = {}
        self.inputs: dict[str, torch.Tensor] = {}
        self.handles = []

    def output_of(self, key: str, module: torch.nn.Module):
        def hook(_module, _args, output):
            assert key not in self.outputs, f"{key} ran twice"
            self.outputs[key] = output.detach().clone()

        self.handles.append(module.register_forward_hook(hook))

    def input_of(self, key: str, module: torch.nn.Module):
        def hook(_module, args, kwargs):
            assert key not in self.inputs, f"{key} ran twice"
            self.inputs[key] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

        self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def close(self):
        for handle in self.handles:
            handle.remove()


def stacks_of(model, child: str) -> list[str]:
    """Names of the stacks (the model itself: "", or "encoder"/"decoder") that own a module `child`."""
    stacks = [name.rsplit(".", 1)[0] if "." in name else "" for name, _ in model.named_modules() if name.split(".")[-1] == child]
    assert stacks, f"{type(model).__name__} has no module named {child}"
    return stacks


def run_stack(model, stack_name: str, ids: torch.Tensor, generator: torch.Generator) -> None:
    """Run one stack of the model on its own, so that every hook fires exactly once."""
    stack = model.get_submodule(stack_name) if stack_name else model
    kwargs = {}
    if stack_name == "decoder" and model.config.is_encoder_decoder:
        kwargs["encoder_hidden_states"] = torch.randn(ids.shape[0], 5, model.config.d_model, generator=generator)
    with torch.no_grad():
        stack(input_ids=ids, **kwargs)


def first_layer(stack) -> torch.nn.Module:
    layers = getattr(stack, "layers", None)
    assert isinstance(layers, torch.nn.ModuleList) and len(layers) > 0, f"{type(stack).__name__} has no .layers"
    return layers[0]


# ---------------------------------------------------------------- audits, one per group


def audit_already_rmsnorm(model_type: str) -> None:
    model = meta_model(model_type)
    assert norm_modules(model), f"{model_type}: no norm module found"
    wrong = mean_subtracting_norms(model)
    assert not wrong, f"{model_type} is listed as already RMSNorm, but these norms subtract the mean: {wrong}"


def audit_rmsnorm_language_model_layernorm_vision(model_type: str) -> None:
    model = meta_model(model_type)
    wrong = mean_subtracting_norms(model)
    assert wrong, f"{model_type}: no mean-subtracting norm at all, so the vision-tower LayerNorm reason is stale"
    outside = {cls: [n for n in names if not n.startswith("vision_tower.")] for cls, names in wrong.items()}
    outside = {cls: names for cls, names in outside.items() if names}
    assert not outside, f"{model_type}: mean-subtracting norms outside the vision tower: {outside}"
    rms_outside = [
        name for cls, instances in norm_modules(model).items() if cls.__name__ not in wrong
        for name, _ in instances if not name.startswith("vision_tower.")
    ]
    assert rms_outside, f"{model_type}: the language model has no RMSNorm"


def audit_post_layernorm(model_type: str) -> None:
    model = tiny_model(model_type)
    ids = random_ids(torch.Generator().manual_seed(1))
    kwargs = {"decoder_input_ids": ids} if model.config.is_encoder_decoder else {}
    with torch.no_grad():
        output = model(input_ids=ids, output_hidden_states=True, **kwargs)
    streams = {key: value for key, value in output.items() if key.endswith("hidden_states") and isinstance(value, tuple)}
    assert streams, f"{model_type}: no hidden states returned"
    for key, states in streams.items():
        assert len(states) >= 3, f"{model_type} {key}: need two layers, so that one output is not the last"
        for index, state in enumerate(states[1:], start=1):
            mean = state.mean(-1).abs().max().item()
            std = (state.std(-1, unbiased=False) - 1).abs().max().item()
            assert mean < 1e-3 and std < 1e-2, (
                f"{model_type} {key}[{index}] is not normalised per token (|mean| {mean:.2e}, |std-1| {std:.2e}): "
                "not a LayerNorm after the residual add"
            )


def audit_sinusoidal_positions(model_type: str) -> None:
    model = tiny_model(model_type)
    state_keys = list(model.state_dict())
    generator = torch.Generator().manual_seed(2)
    ids = random_ids(generator)
    for stack_name in stacks_of(model, "embed_positions"):
        prefix = f"{stack_name}." if stack_name else ""
        stack = model.get_submodule(stack_name) if stack_name else model
        positions = stack.embed_positions
        assert not list(positions.parameters()), f"{model_type} {prefix}embed_positions has learned parameters"
        stored = [key for key in state_keys if key.startswith(f"{prefix}embed_positions")]
        assert not stored, f"{model_type}: {stored} would be stored in the checkpoint"
        recorder = Recorder()
        recorder.output_of("tokens", stack.embed_tokens)
        recorder.output_of("positions", positions)
        recorder.input_of("layer0", first_layer(stack))
        try:
            run_stack(model, stack_name, ids, generator)
        finally:
            recorder.close()
        tokens, position_vectors, stream = recorder.outputs["tokens"], recorder.outputs["positions"], recorder.inputs["layer0"]
        torch.testing.assert_close(stream, tokens + position_vectors.expand_as(tokens), rtol=1e-6, atol=1e-6)
        means = position_vectors.reshape(-1, SEQ, position_vectors.shape[-1])[0].mean(-1)
        assert means.std().item() > 1e-3, f"{model_type}: every position vector has the same mean {means.tolist()}"


def audit_embedding_layernorm(model_type: str) -> None:
    model = tiny_model(model_type)
    assert model.config.is_encoder_decoder
    generator = torch.Generator().manual_seed(3)
    ids = random_ids(generator)
    stacks = stacks_of(model, "layernorm_embedding")
    assert {"encoder", "decoder"} <= set(stacks), stacks
    for stack_name in stacks:
        stack = model.get_submodule(stack_name)
        norm = stack.layernorm_embedding
        assert isinstance(norm, torch.nn.LayerNorm) and norm.weight is not None and norm.bias is not None
        randomise(norm, generator, spread=0.5)
        recorder = Recorder()
        recorder.output_of("tokens", stack.embed_tokens)
        recorder.output_of("positions", stack.embed_positions)
        recorder.input_of("norm", norm)
        recorder.output_of("norm", norm)
        recorder.input_of("layer0", first_layer(stack))
        try:
            run_stack(model, stack_name, ids, generator)
        finally:
            recorder.close()
        tokens, positions = recorder.outputs["tokens"], recorder.outputs["positions"]
        torch.testing.assert_close(recorder.inputs["norm"], tokens + positions.expand_as(tokens), rtol=1e-6, atol=1e-6)
        normed = recorder.outputs["norm"]
        torch.testing.assert_close(recorder.inputs["layer0"], normed, rtol=0, atol=0)  # the output IS the stream
        means = normed.mean(-1)
        assert means.std().item() > 1e-3, f"{model_type} {stack_name}: the embedding LayerNorm's output mean does not vary"


def audit_raw_stream_vision_output(model_type: str) -> None:
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=8, patch_size=4)
    if model_type == "clip":
        text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100}
        model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision.to_dict())).eval()
    else:
        model = transformers.CLIPVisionModel(vision).eval()
    tower = next(module for module in model.modules() if isinstance(getattr(module, "pre_layrnorm", None), torch.nn.Module))
    generator = torch.Generator().manual_seed(5)
    randomise(tower.pre_layrnorm, generator, spread=0.5)
    recorder = Recorder()
    recorder.output_of("pre", tower.pre_layrnorm)
    recorder.input_of("layer0", first_layer(tower.encoder))
    recorder.output_of("last", tower.encoder.layers[-1])
    try:
        with torch.no_grad():
            output = tower(pixel_values=torch.randn((2, 3, 8, 8), generator=generator))
    finally:
        recorder.close()
    assert isinstance(tower.pre_layrnorm, torch.nn.LayerNorm)
    torch.testing.assert_close(recorder.inputs["layer0"], recorder.outputs["pre"], rtol=0, atol=0)  # its output IS the stream
    torch.testing.assert_close(output.last_hidden_state, recorder.outputs["last"], rtol=0, atol=0)  # the raw stream is an output
    assert output.last_hidden_state.mean(-1).abs().max().item() > 1e-3, "the raw stream's mean is what a conversion would remove"


def audit_not_a_transformers_model_type(model_type: str) -> None:
    assert model_type not in CONFIG_MAPPING, f"{model_type} is a transformers model type now: audit it like one"
    with pytest.raises(ValueError):
        transformers.AutoConfig.for_model(model_type)


def audit_remote_code_rmsnorm(model_type: str) -> None:
    # What can be checked offline: transformers has no code for it (so the claim rests on the remote
    # code, InternLM2RMSNorm), and the reason says so.
    audit_not_a_transformers_model_type(model_type)
    assert "trust_remote_code" in GROUPS["remote_code_rmsnorm"]["why"]


AUDITS = {
    "already_rmsnorm": audit_already_rmsnorm,
    "rmsnorm_language_model_layernorm_vision": audit_rmsnorm_language_model_layernorm_vision,
    "post_layernorm": audit_post_layernorm,
    "sinusoidal_positions": audit_sinusoidal_positions,
    "embedding_layernorm": audit_embedding_layernorm,
    "legacy_remote_code": audit_not_a_transformers_model_type,
    "remote_code_rmsnorm": audit_remote_code_rmsnorm,
    "raw_stream_vision_output": audit_raw_stream_vision_output,
}


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("group, model_type", CASES, ids=[f"{g}:{t}" for g, t in CASES])
def test_listed_reason_matches_what_transformers_computes(group, model_type):
    audit = AUDITS.get(group)
    assert audit is not None, f"unaudited group {group!r} in not_convertible.yaml: add a check for it here"
    audit(model_type)


def test_every_group_has_a_reason_and_no_model_type_is_listed_twice_or_supported():
    listed = [model_type for _, model_type in CASES]
    assert len(listed) == len(set(listed)), "a model type is listed twice (the last reason would win silently)"
    assert set(listed) == set(load_not_convertible())
    for group, data in GROUPS.items():
        assert data["why"].strip() and data["model_types"], group
    supported = {model_type for spec in load_specs() for model_type in spec.model_types}
    assert not set(listed) & supported, "a supported family is matched first, so its refusal would never show"


# Controls: each probe tells the two cases apart, so a wrong listing fails.


def test_norm_probe_catches_cohere_layernorm_listed_as_rmsnorm():
    """The bug issue 12 reports: CohereLayerNorm (weight only) subtracts the mean."""
    assert "CohereLayerNorm" in mean_subtracting_norms(meta_model("cohere"))
    with pytest.raises(AssertionError, match="subtract the mean"):
        audit_already_rmsnorm("cohere")
    assert not mean_subtracting_norms(meta_model("llama"))


def test_post_layernorm_probe_rejects_pre_ln_models():
    for model_type in ("gpt2", "mbart"):
        with pytest.raises(AssertionError, match="not normalised per token"):
            audit_post_layernorm(model_type)


def test_sinusoidal_probe_rejects_learned_positions():
    with pytest.raises(AssertionError, match="learned parameters"):
        audit_sinusoidal_positions("mbart")


def test_convert_refuses_xglm_with_the_reason_and_writes_nothing(tmp_path):
    src = tmp_path / "xglm"
    config = transformers.XGLMConfig(
        vocab_size=100, d_model=32, num_layers=2, attention_heads=4, ffn_dim=64, max_position_embeddings=64
    )
    torch.manual_seed(0)
    transformers.XGLMForCausalLM(config).save_pretrained(src)
    assert json.loads((src / "config.json").read_text())["model_type"] == "xglm"
    assert list(src.glob("*.safetensors"))
    before = snapshot(tmp_path)
    result = run_cli("convert", src, tmp_path / "out")
    message = " ".join(result.stderr.split())
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    assert "cannot convert model_type 'xglm'" in message and "sinusoids" in message and "does not write" in message
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()
