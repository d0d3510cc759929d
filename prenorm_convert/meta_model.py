"""The stock transformers model of a config, built on the meta device (nothing is allocated),
and a forward pass of the converted architecture with fake tensors: what planning checks on the
model itself rather than on the checkpoint's files.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .errors import BadInputError, UnsupportedModelError
from .model_io import forward_feed, model_class
from .spec_loader import config_object


def from_config(loader, config):
    """A model built from a config object by an Auto class or by a model class itself."""
    return loader.from_config(config) if loader.__name__.startswith("Auto") else loader._from_config(config)


def build_meta_model(config: dict, spec):
    """The stock transformers model for this config, on the meta device (no memory)."""
    built = config_object(config)
    try:
        with torch.device("meta"):
            return from_config(model_class(config, spec), built)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInputError(f"transformers cannot build a model from this config.json ({reason}); fix or re-download it") from None


def swaps_block(plan) -> dict:
    """The part of config.prenorm that the remote code (modeling.apply_prenorm_swaps) rebuilds from."""
    return {
        "target": plan.target,
        "hidden_size": plan.hidden_size,
        "residual_width": plan.residual_width,
        "stream_width": plan.stream_width,
        "norms": plan.norms,
        "biased": plan.biased,
        "removed": plan.removed,
        "resized": plan.resized,
        "stream_entries": plan.stream_entries,
        "centered_stems": plan.centered_stems,
    }


def check_resized_forward(model: nn.Module, plan) -> None:
    """Run one forward pass of the resized architecture of ``plan`` (a plan.ConversionPlan) with fake
    tensors (no memory, no data).

    The family's transformers code may assume somewhere that the residual width equals hidden_size
    (e.g. an accumulator made with ``zeros_like`` of a hidden_size-wide tensor); a shape error here
    refuses the conversion up front instead of writing a checkpoint that cannot run. The stock model
    runs first: if even it cannot run with fake tensors, nothing can be learned and the check is skipped.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .modeling import apply_prenorm_swaps

    def forward() -> None:
        fake_tensor_log = logging.getLogger("torch._subclasses.fake_tensor")  # logs every failed op at ERROR
        level = fake_tensor_log.level
        fake_tensor_log.setLevel(logging.CRITICAL)
        try:
            with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
                # a batch of one, three positions long, of what the family's models take
                model(**forward_feed(plan.spec, model.config, torch.float32, "meta", 0)(1, 3))
        finally:
            fake_tensor_log.setLevel(level)

    try:
        forward()
    except Exception:  # noqa: BLE001 - the stock model is not traceable this way; nothing to compare
        return
    # the new modules in the model's dtype, as from_pretrained builds them (a float32 norm in a bf16
    # model would hand float32 to the bf16 module that reads it, which the loaded model never does)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(model.dtype if model.dtype.is_floating_point else previous)
    try:
        with torch.device("meta"):
            apply_prenorm_swaps(model, swaps_block(plan))
    finally:
        torch.set_default_dtype(previous)
    try:
        forward()
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModelError(
            f"the {plan.target} target cannot run this {plan.spec.family} checkpoint: the installed transformers' "
            f"{plan.base_model_class} assumes a {plan.hidden_size}-wide residual stream somewhere ({first_line}); "
            "use --target rmsnorm, which keeps the width"
        ) from None
