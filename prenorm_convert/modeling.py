"""Modeling code for checkpoints written by prenorm-convert.

This file is copied into every converted folder as ``modeling_prenorm.py`` and loaded by
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``. It imports only torch
and transformers. A converted model is the stock transformers class of its family, with the
module swaps recorded in ``config.prenorm`` applied right after construction:

- ``norms``: LayerNorm -> RMSNorm (MATH.md "Why it is exact"), affine kept or folded away;
- ``biased``: linears that gained a bias when the norm's β was folded into them;
- ``removed``: main-branch norms baked into the embedding table (MATH.md, stem norms).

Classes are made on demand from the stock class name: ``PrenormGPT2LMHeadModel`` is
``GPT2LMHeadModel`` plus the swaps, ``PrenormGPT2Config`` is ``GPT2Config`` under its own
model_type (used when the folder must not load without this code).
"""

from __future__ import annotations

import torch
import transformers
from torch import nn

PREFIX = "Prenorm"


class PrenormRMSNorm(nn.Module):
    """RMSNorm(x) = γ ⊙ x / sqrt(mean(x²) + ε) + β; equals LayerNorm on a zero-mean x."""

    def __init__(self, width: int, eps: float, affine: bool = True, bias: bool = True):
        super().__init__()
        self.width = width
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width)) if affine else None
        self.bias = nn.Parameter(torch.zeros(width)) if affine and bias else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out = nn.functional.rms_norm(hidden_states, (self.width,), self.weight, self.eps)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"{self.width}, eps={self.eps}, affine={self.weight is not None}, bias={self.bias is not None}"


NORM_KINDS = {"rmsnorm": PrenormRMSNorm}


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def _out_features(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.nf


def apply_prenorm_swaps(model: nn.Module, block: dict) -> None:
    """Rebuild the converted architecture in place from the ``prenorm`` config block."""
    for path, norm in block["norms"].items():
        old = model.get_submodule(path)
        width = norm.get("width", old.normalized_shape[0])
        new = NORM_KINDS[norm["kind"]](width, old.eps, affine=norm["affine"], bias=norm.get("bias", True))
        _set_submodule(model, path, new)
    for path in block.get("biased", []):
        linear = model.get_submodule(path)
        if getattr(linear, "bias", None) is None:
            linear.bias = nn.Parameter(torch.zeros(_out_features(linear)))
    for path in block.get("removed", []):
        _set_submodule(model, path, nn.Identity())


def _make_config_class(base_name: str) -> type:
    base = getattr(transformers, base_name)
    return type(PREFIX + base_name, (base,), {"model_type": "prenorm_" + base.model_type, "__module__": __name__})


def _make_model_class(base_name: str) -> type:
    base = getattr(transformers, base_name)

    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        apply_prenorm_swaps(self, config.prenorm)

    # config_class must be the Prenorm config so that transformers can register the pair when the
    # folder's model_type is prenorm_*; a stock config (graceful rmsnorm folders) is a base of it.
    config_class = prenorm_class(PREFIX + base.config_class.__name__)
    return type(PREFIX + base_name, (base,), {"__init__": __init__, "__module__": __name__, "config_class": config_class})


_CLASSES: dict[str, type] = {}


def prenorm_class(name: str) -> type:
    """``PrenormXConfig`` or ``PrenormXModel`` for a stock transformers class X."""
    if name not in _CLASSES:
        if not name.startswith(PREFIX) or not hasattr(transformers, name[len(PREFIX):]):
            raise AttributeError(name)
        base_name = name[len(PREFIX):]
        if base_name.endswith("Config"):
            _CLASSES[name] = _make_config_class(base_name)
        else:
            _CLASSES[name] = _make_model_class(base_name)
    return _CLASSES[name]


def __getattr__(name: str):
    return prenorm_class(name)
