"""Modeling code for checkpoints written by prenorm-convert.

This file is copied into every converted folder as ``modeling_prenorm.py`` and loaded by
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``. It imports only torch,
transformers and its norm functions (``norm_functions.py``, copied beside it). A converted model is the stock transformers class of its family, with the
module swaps recorded in ``config.prenorm`` applied right after construction:

- ``resized``: parameters whose shape changed (crmsnorm: the residual stream is d-1 wide, or
  zero-padded with --pad-to; docs/math.md "Pre-CRMSNorm"); config.hidden_size stays d, so attention
  splits heads as before, and ``output_hidden_states`` returns the narrow stream
  (``restore_full_width`` rebuilds the d-wide one);
- ``norms``: LayerNorm -> RMSNorm (docs/math.md "Why it is exact"), affine kept or folded away, or
  CRMSNorm on the compressed stream;
- ``biased``: linears that gained a bias when the norm's β was folded into them;
- ``removed``: main-branch norms baked into the embedding table (docs/math.md, stem norms).

Classes are made on demand from the stock class name: ``PrenormGPT2LMHeadModel`` is
``GPT2LMHeadModel`` plus the swaps, ``PrenormGPT2Config`` is ``GPT2Config`` under its own
model_type (used when the folder must not load without this code).
"""

from __future__ import annotations

import warnings
import weakref

import torch
import transformers
from torch import nn

from .norm_functions import crms_norm, rms_norm

PREFIX = "Prenorm"
STOCK_PREFIX = "PrenormStock"


class PrenormRMSNorm(nn.Module):
    """RMSNorm(x) = γ ⊙ x / sqrt(mean(x²) + ε) + β; equals LayerNorm on a zero-mean x."""

    def __init__(self, width: int, eps: float, affine: bool = True, bias: bool = True):
        super().__init__()
        self.width = width
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width)) if affine else None
        self.bias = nn.Parameter(torch.zeros(width)) if affine and bias else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.width}, eps={self.eps}, affine={self.weight is not None}, bias={self.bias is not None}"


NORM_KINDS = {"rmsnorm": PrenormRMSNorm}


class PrenormCRMSNorm(nn.Module):
    """CRMSNorm(x̃) = x̃ / sqrt((Σ x̃² + (Σ x̃)²) / d + ε) on the (d-1)-wide compressed stream.

    It returns the first d-1 components of the affine-free RMSNorm of the zero-mean x = [x̃, -Σ x̃]
    (docs/math.md "Pre-CRMSNorm"); γ and β are always folded into the readers. Both sums are taken in
    float32 (or wider) whatever the input dtype, and the result is rounded once to it.
    """

    def __init__(self, width: int, eps: float, affine: bool = False, bias: bool = False):
        super().__init__()
        if affine:
            raise ValueError("CRMSNorm has no affine parameters: the conversion folds γ and β into the readers")
        self.width = width  # d - 1
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return crms_norm(hidden_states, self.width + 1, self.eps)

    def extra_repr(self) -> str:
        return f"{self.width} (full width {self.width + 1}), eps={self.eps}"


NORM_KINDS["crmsnorm"] = PrenormCRMSNorm


class PrenormCRMSNormOutput(nn.Module):
    """The last norm of a crmsnorm model whose output is one of the model's outputs (an encoder's
    last_hidden_state): it rebuilds the d-wide zero-mean stream from the (d-1)-wide one and applies
    the original's γ, β, so its output is the original norm's, full width (docs/math.md "Norms whose
    output leaves the model")."""

    def __init__(self, width: int, eps: float, affine: bool = True, bias: bool = True):
        super().__init__()
        self.width = width  # d - 1: the residual features (zero padding, if any, follows them)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width + 1)) if affine else None
        self.bias = nn.Parameter(torch.zeros(width + 1)) if bias else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        full = restore_full_width(hidden_states, self.width)
        return rms_norm(full, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.width} -> {self.width + 1}, eps={self.eps}, affine={self.weight is not None}, bias={self.bias is not None}"


def _norm_class(norm: dict) -> type:
    return PrenormCRMSNormOutput if norm.get("output") and norm["kind"] == "crmsnorm" else NORM_KINDS[norm["kind"]]


def restore_full_width(hidden_states: torch.Tensor, residual_width: int | None = None) -> torch.Tensor:
    """The d-wide zero-mean vector behind a crmsnorm model's (d-1)-wide hidden state: x_d = -Σ x̃.

    Holds for the residual stream (``output_hidden_states``) and for CRMSNorm outputs alike. Pass
    ``config.prenorm["residual_width"]`` for a checkpoint converted with --pad-to (its zero padding is dropped).
    """
    compressed = hidden_states if residual_width is None else hidden_states[..., :residual_width]
    return torch.cat([compressed, -compressed.sum(-1, keepdim=True)], dim=-1)


def _size_attributes(module: nn.Module) -> tuple[tuple[str, int], ...]:
    """(attribute, weight axis) pairs that a module's forward reads its sizes from."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, nn.Embedding):
        return (("num_embeddings", 0), ("embedding_dim", 1))
    if isinstance(module, nn.Linear):
        return (("out_features", 0), ("in_features", 1))
    if isinstance(module, Conv1D):  # weight [in, out]; forward shapes its output with self.nf
        return (("nx", 0), ("nf", 1))
    if isinstance(module, nn.Conv2d):  # a patch projection writing the stream: weight [out, in, kh, kw]
        return (("out_channels", 0),)
    raise TypeError(f"cannot resize a {type(module).__name__}: only Embedding, Linear, Conv1D and Conv2d are supported")


def _resize_parameters(model: nn.Module, resized: dict) -> None:
    """Give every listed parameter its written shape (config.prenorm["resized"]: name -> shape) and
    keep the owning module's size attributes in step. Values are copied where old and new overlap,
    so a model built without weights is still initialized."""
    owners = {}
    for name, shape in resized.items():
        path, _, attribute = name.rpartition(".")
        module = model.get_submodule(path)
        old = getattr(module, attribute)
        new = torch.zeros(tuple(shape), dtype=old.dtype, device=old.device)
        overlap = tuple(slice(0, min(a, b)) for a, b in zip(old.shape, shape))
        new[overlap] = old.detach()[overlap]
        setattr(module, attribute, nn.Parameter(new, requires_grad=old.requires_grad))
        if attribute in ("weight", "bias"):  # a layer's own weights; ViT's cls_token sizes nothing
            owners[path] = module
    for module in owners.values():
        for attribute, axis in _size_attributes(module):
            setattr(module, attribute, module.weight.shape[axis])


def center_rows_hook(_module: nn.Module, _args, output: torch.Tensor, axis: int = -1) -> torch.Tensor:
    """Rows centred over the features (the last axis, or ``axis``): the mean is taken in float32
    (float64 stays) and subtracted with one rounding, as a stored centred table would have been
    rounded once."""
    work = output.to(torch.promote_types(output.dtype, torch.float32))
    return (work - work.mean(axis, keepdim=True)).to(output.dtype)


class _ModelHook:
    """A hook that reads the model's switches through a weak reference: a hook holding the model
    itself puts the model in a reference cycle (model -> module -> hook -> model), which keeps a
    dropped model in memory until the next full garbage collection."""

    def __init__(self, model: nn.Module):
        self._model = weakref.ref(model)

    @property
    def model(self) -> nn.Module:
        return self._model()


class _CenterAtLookup(_ModelHook):
    """An embedding table stored once, tied to the head, uncentred: its rows centred at lookup
    (docs/math.md "Tied embeddings"). While the model trains with its norm inputs centred
    (_CenterNormInput), the rows are left as they are, as the original's are."""

    def __call__(self, module: nn.Module, args, output: torch.Tensor):
        if module.training and _centring_on(self.model):
            return None
        return center_rows_hook(module, args, output)


class PrenormCenteredLayerNorm(nn.LayerNorm):
    """A stem norm (a LayerNorm on the stream itself: BLOOM's word_embeddings_layernorm) kept as the
    original's, its output centred over the features: that output is where the stream starts
    (docs/math.md "Stem norms: a norm on the main branch itself"). Its γ, β and the table it reads
    train as the original's do. Computed in float32 (float64 stays), rounded once."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        work = hidden_states.to(torch.promote_types(hidden_states.dtype, torch.float32))
        weight = None if self.weight is None else self.weight.to(work.dtype)
        bias = None if self.bias is None else self.bias.to(work.dtype)
        out = nn.functional.layer_norm(work, self.normalized_shape, weight, bias, self.eps)
        return (out - out.mean(-1, keepdim=True)).to(hidden_states.dtype)


class _CenterAtEntry:
    """Forward pre-hook of the first layer of a stream whose start no stored weight can centre
    (Whisper's encoder: GELU(conv) + positions): the stream entering it, centred over its d features
    (docs/math.md "Streams centred at entry"); for crmsnorm also compressed to its first d-1 features,
    zero-padded to the stored stream width."""

    def __init__(self, block: dict):
        self.compress = block["target"] == "crmsnorm"
        self.residual_width, self.stream_width = block["residual_width"], block.get("stream_width") or block["residual_width"]

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        stream = args[0] if args else kwargs["hidden_states"]
        # the mean in float64: an error e in it would come back d times over in crmsnorm's implied
        # last feature, -Σ x̃ (docs/math.md "Streams centred at entry"); one rounding to the stream's dtype
        work = stream.to(torch.float64)
        centred = (work - work.mean(-1, keepdim=True)).to(stream.dtype)
        if self.compress:
            centred = nn.functional.pad(centred[..., : self.residual_width], (0, self.stream_width - self.residual_width))
        if args:
            return (centred,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": centred}


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def _out_features(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.nf


def apply_prenorm_swaps(model: nn.Module, block: dict) -> None:
    """Rebuild the converted architecture in place from the ``prenorm`` config block."""
    _resize_parameters(model, block.get("resized", {}))
    for path, norm in block["norms"].items():
        old = model.get_submodule(path)
        width = norm["width"] if "width" in norm else old.normalized_shape[0]
        new = _norm_class(norm)(width, norm.get("eps", getattr(old, "eps", None)), affine=norm["affine"], bias=norm.get("bias", True))
        _set_submodule(model, path, new)
    for path in block.get("biased", []):
        linear = model.get_submodule(path)
        if getattr(linear, "bias", None) is None:
            linear.bias = nn.Parameter(torch.zeros(_out_features(linear)))
    for path in block.get("removed", []):
        _set_submodule(model, path, nn.Identity())
    for path in block.get("centered_at_lookup", []):
        model.get_submodule(path).register_forward_hook(_CenterAtLookup(model))
    for path in block.get("centered_stems", []):
        old = model.get_submodule(path)
        stem = PrenormCenteredLayerNorm(old.normalized_shape, eps=old.eps, bias=old.bias is not None)
        _set_submodule(model, path, stem.to(old.weight.device, old.weight.dtype) if old.weight.device.type != "meta" else stem)
    for path in block.get("stream_entries", []):
        model.get_submodule(path).register_forward_pre_hook(_CenterAtEntry(block), with_kwargs=True)
    for path in block.get("train_centered", []):
        _install_training_centering(model, path)
    if block.get("train_centered"):
        for path in block["norms"]:
            model.get_submodule(path).register_forward_pre_hook(_CenterNormInput(model))


# -- training (docs/training.md) ------------------------------------------------------------------


def _centring_on(model: nn.Module) -> bool:
    return getattr(model, "prenorm_train_centering", True)


class _CenterNormInput(_ModelHook):
    """Forward pre-hook of every norm while the model trains: its input centred over the features.
    RMSNorm of the centred stream is LayerNorm of the stream, whatever the parameters have become
    (docs/training.md), so the converted model's loss is the original's loss of the same parameters
    and fine-tuning it takes the original's steps, dropout included. In eval mode it does nothing:
    the stored weights are centred, and leaving training centres the trained ones."""

    def __call__(self, module: nn.Module, args):
        if not module.training or not _centring_on(self.model):
            return None
        self.model._prenorm_trained = True
        return (center_rows_hook(module, args, args[0]),) + tuple(args[1:])


class _TrainingCentering(_ModelHook):
    """Forward hook of an embedding or a writer wrapped by an adapter (peft's LoRA): in eval mode its
    output, the adapter's update included, centred over the features (an unmerged update is not
    centred in the stored weights). Training needs nothing here: the norms centre their inputs."""

    def __call__(self, module: nn.Module, _args, output: torch.Tensor):
        if module.training or not hasattr(module, "base_layer") or not _centring_on(self.model):
            return None
        return center_rows_hook(module, _args, output, _feature_axis(module.base_layer))


def _feature_axis(module: nn.Module) -> int:
    """The axis of a writer's output that holds the stream's d features: a convolution's channels,
    axis 1 (ViT's patch projection writes [batch, d, h, w]: docs/math.md "Stream parameters and
    patch projections"), the last axis for linears and embeddings."""
    return 1 if isinstance(module, nn.modules.conv._ConvNd) else -1


def _install_training_centering(model: nn.Module, path: str) -> None:
    """The centring hook on the module at ``path``, and a pre-hook on its parent that puts it on
    whatever module sits there later (peft replaces a targeted linear by a wrapper of it)."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    hook = _TrainingCentering(model)

    def sync(owner, _args):  # the parent itself, as torch passes it: no reference kept to it here
        child = getattr(owner, name)
        _refuse_inexact_adapter(child, path)
        if getattr(child, "_prenorm_centering", None) is not hook:
            child.register_forward_hook(hook)
            child._prenorm_centering = hook

    sync(parent, ())
    parent.register_forward_pre_hook(sync)


def _refuse_inexact_adapter(module: nn.Module, path: str) -> None:
    """DoRA rescales by the norm of the whole (centred) weight and IA³ scales features: on a writer
    of the stream neither is the original's function; LoRA is (its update is centred)."""
    dora = any(getattr(module, "use_dora", {}).values()) if isinstance(getattr(module, "use_dora", None), dict) else False
    if dora or ".ia3." in type(module).__module__:
        kind = "DoRA" if dora else "IA³"
        raise ValueError(
            f"{kind} on {path}, a writer of the residual stream of a converted model, is not exact against the "
            "original; use plain LoRA there (use_dora=False), or put the adapter on the readers only (docs/training.md)"
        )


def recenter_weights(model: nn.Module) -> None:
    """Centre the stored weights of every train-centred module in place (C·V: the function does not
    change), after training and before saving, so that eval mode and the saved folder need no hook."""
    block = model.config.prenorm
    with torch.no_grad():
        for path in block.get("train_centered", []):
            module = model.get_submodule(path)
            for lora_b in getattr(module, "lora_B", {}).values():  # peft LoRA: the update B·A, centred
                lora_b.weight.sub_(lora_b.weight.mean(0, keepdim=True))
            # peft LoRA on an embedding keeps B [d, r] as a bare parameter: the rows it adds, (B·A)ᵀ,
            # centred as a table's (docs/math.md "Embeddings"), so that merge_and_unload() writes a
            # centred table (the eval hook centres an unmerged update, not a merged one)
            for lora_b in getattr(module, "lora_embedding_B", {}).values():
                lora_b.sub_(lora_b.mean(0, keepdim=True))
            module = getattr(module, "base_layer", module)
            weight = module.weight
            if isinstance(module, nn.Embedding):
                weight.sub_(weight.mean(-1, keepdim=True))
                continue
            weight.sub_(weight.mean(1 if type(module).__name__ == "Conv1D" else 0, keepdim=True))  # Conv1D: [in, out]
            if getattr(module, "bias", None) is not None:
                module.bias.sub_(module.bias.mean())
        for name in block.get("train_centered_parameters", []):  # cls_token, position_embeddings
            parameter = model.get_parameter(name)
            parameter.sub_(parameter.mean(-1, keepdim=True))
    model._prenorm_trained = False


def _warn_if_training_changes_parametrization(model: nn.Module) -> None:
    block = model.config.prenorm
    kept = block["target"] == "rmsnorm" and not block["fold_affine"] and not block["removed"] and not block.get("folded_layer_scales")
    if getattr(model, "_prenorm_warned", False) or kept:
        return
    model._prenorm_warned = True
    warnings.warn(
        "training a converted model whose norms' γ, β were folded into the linears (--fold-affine, crmsnorm) or "
        "whose embedding LayerNorm was baked into the table (BLOOM) or whose layer scales were folded into the writers "
        "(DINOv2) starts from the original's function but trains "
        "a different parametrization: fine-tuning it is not step for step the original's (docs/training.md)",
        stacklevel=3,
    )


def _before_train(model: nn.Module, mode: bool) -> None:
    """model.train(mode): leaving training centres the trained weights; entering it warns once where
    training is not the original's."""
    if getattr(model.config, "prenorm", None) is None:
        return
    if not mode and getattr(model, "_prenorm_trained", False):
        recenter_weights(model)
    if mode:
        _warn_if_training_changes_parametrization(model)


def _before_save(model: nn.Module) -> None:
    if getattr(model.config, "prenorm", None) is not None and getattr(model, "_prenorm_trained", False):
        recenter_weights(model)


def _make_config_class(base_name: str) -> type:
    base = getattr(transformers, base_name)
    return type(PREFIX + base_name, (base,), {"model_type": "prenorm_" + base.model_type, "__module__": __name__})


def _make_model_class(base_name: str, stock_config: bool) -> type:
    base = getattr(transformers, base_name)

    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        # a stock config (no prenorm block) builds the stock model: transformers versions that
        # register remote classes for stock configs must not change how plain checkpoints load
        block = getattr(config, "prenorm", None)
        if block is not None:
            apply_prenorm_swaps(self, block)

    # transformers checks that a remote model class names the config class of the folder:
    # PrenormStockX for folders that keep the stock model_type, PrenormX (with PrenormXConfig)
    # for folders whose model_type is prenorm_* because they must not load without this code.
    name = (STOCK_PREFIX if stock_config else PREFIX) + base_name
    config_class = base.config_class if stock_config else prenorm_class(PREFIX + base.config_class.__name__)
    def train(self, mode: bool = True):
        _before_train(self, mode)
        return base.train(self, mode)

    def save_pretrained(self, *args, **kwargs):
        _before_save(self)
        return base.save_pretrained(self, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        # transformers' Auto classes map a config class to the first remote class they loaded for it
        # in a process: CLIPTextModel and CLIPTextModelWithProjection share theirs, so a folder of
        # the other architecture is handed to the class its config.json names
        named = (getattr(kwargs.get("config"), "architectures", None) or [""])[0] or ""
        named = named.removeprefix(STOCK_PREFIX).removeprefix(PREFIX)  # save_pretrained records PrenormX
        other = getattr(transformers, named, None) if named and named != base_name else None
        if other is not None and getattr(other, "config_class", None) is base.config_class:
            return prenorm_class((STOCK_PREFIX if stock_config else PREFIX) + named).from_pretrained(*args, **kwargs)
        return super(model_class, cls).from_pretrained(*args, **kwargs)

    namespace = {
        "__init__": __init__, "__module__": __name__, "config_class": config_class, "train": train,
        "save_pretrained": save_pretrained, "from_pretrained": from_pretrained,
    }
    model_class = type(name, (base,), namespace)
    if stock_config:
        # a stock config's model keeps the stock class name: pipeline() accepts a model by its class
        # name, and save_pretrained records it (architectures, auto_map), which prenorm_class resolves
        model_class.__name__ = model_class.__qualname__ = base_name
    return model_class


_CLASSES: dict[str, type] = {}


def prenorm_class(name: str) -> type:
    """``PrenormXConfig``, ``PrenormXModel`` or ``PrenormStockXModel`` for a stock transformers class X."""
    if not name.startswith(PREFIX) and hasattr(transformers, name) and not name.endswith("Config"):
        name = STOCK_PREFIX + name  # the name a stock-config model class is saved under
    if name not in _CLASSES:
        stock_config = name.startswith(STOCK_PREFIX)
        base_name = name[len(STOCK_PREFIX if stock_config else PREFIX):]
        if not name.startswith(PREFIX) or not hasattr(transformers, base_name):
            raise AttributeError(name)
        if base_name.endswith("Config"):
            _CLASSES[name] = _make_config_class(base_name)
        else:
            _CLASSES[name] = _make_model_class(base_name, stock_config)
    return _CLASSES[name]


def __getattr__(name: str):
    return prenorm_class(name)
