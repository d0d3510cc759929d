"""What a family's models take and give: the Auto class a folder loads with, its inputs (token ids,
or pixel values for vision models) and the output a verification compares (the logits, or the last
hidden state of a model without a head), whatever the family (docs/report.md "Encoders and vision
models")."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import UnsupportedModelError
from .streaming import input_device

CAUSAL = "AutoModelForCausalLM"
RANDOM_IMAGES = 4


def folder_loader(path: str | Path):
    """The class a checkpoint folder loads with: for a converted folder the Auto class its auto_map
    names, for an original the class its family's spec builds (model_class)."""
    import transformers

    config = json.loads((Path(path) / "config.json").read_text())
    if "prenorm" in config:
        return getattr(transformers, next((name for name in config.get("auto_map", {}) if name != "AutoConfig"), CAUSAL))
    from .spec_loader import match_spec

    return model_class(config, match_spec(config))


def auto_class(name: str):
    """The transformers Auto class a spec names (AutoModelForCausalLM, AutoModel, ...)."""
    import transformers

    found = getattr(transformers, name, None)
    if found is None:
        raise UnsupportedModelError(f"the installed transformers has no {name}; this transformers version is not supported")
    return found


def model_class(config: dict, spec):
    """The class transformers loads this checkpoint as: the architecture its config.json names, where
    the spec accepts it and transformers has it (CLIPTextModelWithProjection, which AutoModel would
    build as CLIPTextModel), else the spec's Auto class."""
    import transformers

    named = [arch for arch in config.get("architectures") or [] if arch in spec.architectures and hasattr(transformers, arch)]
    return getattr(transformers, named[0]) if named else auto_class(spec.auto_class)


def model_output(model, inputs: torch.Tensor) -> torch.Tensor:
    """The compared output for a batch [batch, positions, features]: token ids (integers) go in as
    input_ids, pixel values (floating point, cast to the model's dtype) as pixel_values, and a dict
    (an encoder-decoder's audio features and decoder token ids) as keywords; the
    logits come out, a masked image model's reconstruction, or the last hidden state when the model
    has no head. An output with no positions axis (an image classifier's logits) gets one position;
    an image ([batch, channels, height, width]) has one position per pixel, its channels the features."""
    if not isinstance(inputs, dict):
        inputs = {"pixel_values" if inputs.is_floating_point() else "input_ids": inputs}
    device = input_device(model)
    output = model(**{key: value.to(device, model.dtype if value.is_floating_point() else None) for key, value in inputs.items()})
    value = compared_output(output)
    if value.dim() == 4:
        return value.flatten(2).transpose(1, 2)
    return value if value.dim() == 3 else value[:, None, :]


def compared_output(output) -> torch.Tensor:
    """The logits, a masked image model's reconstructed pixels, or the last hidden state of a model
    without a head."""
    for name in ("logits", "reconstruction"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    return output.last_hidden_state


def image_size(config) -> tuple[int, int]:
    """(height, width) of the images a vision model's config is made for."""
    size = config.image_size
    return (size, size) if isinstance(size, int) else tuple(size)


def image_positions(config) -> int:
    """Positions a vision transformer's stream has for one image of its configured size: its
    patches and the class token."""
    height, width = image_size(config)
    return (height // config.patch_size) * (width // config.patch_size) + 1


def forward_feed(spec, config, dtype: torch.dtype, device, seed: int):
    """(batch, sequence length) -> the keyword inputs of one forward pass of the family's models,
    seeded (``bench``, and planning's forward pass on fake tensors): token ids (a causal LM without
    its cache), images of the configured size (the length is the model's own), or audio features
    (the length the encoder takes), with the decoder's token ids where the model has a decoder."""

    def feed(batch: int, seq: int) -> dict:
        generator = torch.Generator().manual_seed(seed)
        if spec.inputs == "image":
            pixels = torch.randn((batch, config.num_channels, *image_size(config)), generator=generator)
            return {"pixel_values": pixels.to(device, dtype)}
        if spec.inputs == "audio_features":
            features = torch.randn((batch, config.num_mel_bins, 2 * config.max_source_positions), generator=generator)
            return {"input_features": features.to(device, dtype)}
        ids = torch.randint(0, config.vocab_size, (batch, seq), generator=generator).to(device)
        if spec.inputs == "audio":
            features = torch.randn((batch, config.num_mel_bins, 2 * config.max_source_positions), generator=generator)
            return {"input_features": features.to(device, dtype), "decoder_input_ids": ids}
        return {"input_ids": ids, "use_cache": False} if spec.causal else {"input_ids": ids}

    return feed


def image_inputs(original: str | Path, config) -> list[torch.Tensor]:
    """Seeded random pixel values [channels, height, width] of the size the checkpoint's image
    processor crops to (preprocessor_config.json), or the model's image_size without one."""
    cropped = _processor_size(Path(original))
    height, width = (cropped, cropped) if cropped is not None else image_size(config)
    generator = torch.Generator().manual_seed(0)
    return [torch.randn((config.num_channels, height, width), generator=generator) for _ in range(RANDOM_IMAGES)]


def audio_inputs(config, prompts: list[torch.Tensor]) -> list[dict]:
    """One input per prompt: seeded random log-mel features [mel bins, frames] of the length the
    encoder takes (2 × max_source_positions), and the prompt as the decoder's token ids, cut to its
    positions."""
    generator = torch.Generator().manual_seed(0)
    frames, limit = 2 * config.max_source_positions, config.max_target_positions
    return [
        {"input_features": torch.randn((config.num_mel_bins, frames), generator=generator), "decoder_input_ids": ids[:limit]}
        for ids in prompts
    ]


def audio_feature_inputs(config) -> list[dict]:
    """Seeded random log-mel features [mel bins, frames] of the length the encoder takes, alone (an
    audio classifier has no decoder): as many as the random images of a vision model."""
    generator = torch.Generator().manual_seed(0)
    frames = 2 * config.max_source_positions
    return [{"input_features": torch.randn((config.num_mel_bins, frames), generator=generator)} for _ in range(RANDOM_IMAGES)]


def fixed_positions(spec, config) -> int | None:
    """The sequence length of a model whose inputs fix it (an image's patches and class token, an
    audio encoder's frames after its strided convolution), or None where the prompts set it."""
    if spec.inputs == "image":
        return image_positions(config)
    if spec.inputs == "audio_features":
        return config.max_source_positions
    return None


def _processor_size(folder: Path) -> int | None:
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return None
    try:
        processor = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    for key in ("crop_size", "size"):
        size = processor.get(key)
        if isinstance(size, int):
            return size
        if isinstance(size, dict) and isinstance(size.get("height"), int):
            return size["height"]
        if isinstance(size, dict) and isinstance(size.get("shortest_edge"), int):
            return size["shortest_edge"]
    return None
