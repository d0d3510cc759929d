"""Structural checks: the model transformers builds from a config must be exactly what its spec
describes before anything is planned (docs/architecture.md "Structural checks").

Names alone are not trusted: every embedding, norm, reader and writer is checked for its type and
for the residual width on the side that touches the stream, every d-wide embedding and every
LayerNorm of the model must be declared, and a module the config switched off must not be a
d-wide part of the stream that the conversion would then leave unconverted.
"""

from __future__ import annotations

from torch import nn

from .errors import SpecError, UnsupportedModelError
from .spec import FamilySpec, expand, expand_group


def module_at(model: nn.Module, path: str, spec: FamilySpec) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise UnsupportedModelError(
            f"{spec.source_file} names module '{path}', which the installed transformers' "
            f"{type(model).__name__} does not have; this transformers version is not supported for {spec.family}"
        ) from None


def _has_module(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:  # absent, or an attribute set to None (e.g. OPT's project_in)
        return False
    return True


def _in_out(module: nn.Module, layout: str) -> tuple[int, int] | None:
    """(in, out) features of a linear of the given layout; subclasses count (Falcon's FalconLinear
    computes x @ Wᵀ + b like nn.Linear). A Conv2d (ViT's patch projection, weight [out, in, kh, kw])
    counts as a linear layout writer: its output channels are the stream."""
    if layout == "linear" and isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if layout == "linear" and isinstance(module, nn.Conv2d) and module.groups == 1:
        return module.in_channels, module.out_channels
    if layout == "conv1d" and type(module).__name__ == "Conv1D":
        return module.nx, module.nf
    return None


def _check_linear(model, path, spec, d, reads: bool) -> None:
    module = module_at(model, path, spec)
    layout = spec.layout_of(path)
    dims = _in_out(module, layout)
    if dims is None or (dims[0] if reads else dims[1]) != d:
        expected = "Linear" if layout == "linear" else "Conv1D"
        raise UnsupportedModelError(
            f"{spec.source_file} declares '{path}' as a {expected} {'reading' if reads else 'writing'} the "
            f"{d}-wide residual stream, but the model has {module}; refusing to convert silently wrong"
        )


def is_norm_like(module: nn.Module, spec: FamilySpec) -> bool:
    """A module that normalises its input the LayerNorm way: torch's nn.LayerNorm (or a subclass),
    the family's declared norm class, or any class named like one (CohereLayerNorm, OlmoLayerNorm)."""
    name = type(module).__name__
    return isinstance(module, nn.LayerNorm) or name == spec.norm_module.class_name or "layernorm" in name.lower()


def _is_stream_norm(module: nn.Module, spec: FamilySpec, d: int) -> bool:
    """The family's norm class exactly (a subclass may compute something else: Nemotron's
    LayerNorm1P adds 1 to γ), over d features (from γ, or the module's normalized_shape)."""
    if type(module).__name__ != spec.norm_module.class_name:
        return False
    weight = getattr(module, spec.norm_module.weight, None) if spec.norm_module.weight else None
    if isinstance(weight, nn.Parameter):
        return tuple(weight.shape) == (d,)
    shape = getattr(module, "normalized_shape", None)
    return shape is None or tuple(shape) == (d,)


def _touches_stream(module: nn.Module, role: str, spec: FamilySpec, path: str, d: int) -> bool:
    """Whether a module sits on the d-wide residual stream in ``role`` (a switched-off module that
    does would be left unconverted)."""
    if role == "embedding":
        return isinstance(module, nn.Embedding) and module.embedding_dim == d
    if role == "stream parameter":
        return False  # a parameter, not a module: _check_stream_parameters looks at it
    if role in ("norm", "inner norm"):
        return any(is_norm_like(m, spec) for m in module.modules())
    dims = _in_out(module, spec.layout_of(path))
    return dims is not None and (dims[0] if role == "reader" else dims[1]) == d


def check_streams(model: nn.Module, views: list[tuple[FamilySpec, int, int]]) -> None:
    """Every stream's spec (resolved, with its width and layer count) describes its part of ``model``
    exactly, and together they declare every d-wide embedding, loose parameter and LayerNorm."""
    declared = [check_structure(model, view, d, num_layers) for view, d, num_layers in views]
    spec, d, _ = views[0]
    union = {key: set().union(*(found[key] for found in declared)) for key in declared[0]}
    _check_nothing_undeclared(model, spec, d, union["embeddings"], union["norms"], union["inner"])
    _check_stray_parameters(model, spec, d, union["parameters"])


def check_structure(model: nn.Module, spec: FamilySpec, d: int, num_layers: int) -> dict[str, set[str]]:
    """``spec`` (resolved for this model's config) describes its stream of ``model``; returns what it
    declares (check_streams checks that nothing is left undeclared)."""
    embeddings = {path for template in spec.embeddings for path in expand(template, num_layers)}
    # the modules that build a stream centred at entry: declared, left as they are
    fed_by = set(spec.entry.fed_by) if spec.entry is not None else set()
    for path in sorted(embeddings):
        module = module_at(model, path, spec)
        if not isinstance(module, nn.Embedding) or module.embedding_dim != d:
            raise UnsupportedModelError(f"{spec.source_file}: '{path}' is not a {d}-wide embedding ({module})")
    stream_norms = _stream_norms(model, spec, d, num_layers)
    readers = {reader for group in spec.norms for _, names in expand_group(group, num_layers) for reader in names}
    for path in sorted(readers):
        _check_linear(model, path, spec, d, reads=True)
    writers = {path for template in spec.writers for path in expand(template, num_layers)}
    for path in sorted(writers):
        _check_linear(model, path, spec, d, reads=False)
    inner = {path for template in spec.inner_norms for path in expand(template, num_layers)}
    for path in sorted(inner):
        if not any(is_norm_like(m, spec) for m in module_at(model, path, spec).modules()):
            raise UnsupportedModelError(f"{spec.source_file}: inner norm '{path}' holds no LayerNorm")
    embeddings |= fed_by
    active = {"embedding": embeddings, "norm": stream_norms, "reader": readers, "writer": writers, "inner norm": inner}
    _check_switched_off(model, spec, d, num_layers, set().union(*active.values()) | {spec.head})
    parameters = _check_stream_parameters(model, spec, d, num_layers, writers)
    if spec.entry is not None:
        module_at(model, spec.entry.module, spec)
    for path in (path for template in spec.may_be_absent for path in expand(template, num_layers)):
        module_at(model, path, spec)
    return {"embeddings": embeddings, "norms": stream_norms | inner, "inner": inner, "parameters": parameters}


_LEAF_MODULES = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _check_stream_parameters(model: nn.Module, spec: FamilySpec, d: int, num_layers: int, writers: set[str]) -> set[str]:
    """Declared stream parameters and layer scales exist, d-wide on their last axis; returns them."""
    params = dict(model.named_parameters())
    declared = {path for template in spec.stream_parameters for path in expand(template, num_layers)}
    scales = dict(spec.layer_scale_pairs(num_layers))
    for path in sorted(declared | set(scales)):
        if path not in params or params[path].shape[-1] != d:
            found = tuple(params[path].shape) if path in params else "nothing"
            raise UnsupportedModelError(f"{spec.source_file} declares '{path}' as a {d}-wide parameter of the stream, found {found}")
    for scale, writer in scales.items():
        if params[scale].dim() != 1 or writer not in writers:
            raise SpecError(f"{spec.source_file}: layer scale '{scale}' must be a [{d}] vector on a declared writer, not on '{writer}'")
    for path in spec.switched_off.get("stream parameter", ()):
        for name in expand(path, num_layers):
            if name in params and name not in declared and params[name].shape[-1] == d:
                raise UnsupportedModelError(
                    f"the model has '{name}', which {spec.source_file} expects on the stream only under another config; "
                    "refusing to leave a part of the residual stream unconverted"
                )
    return declared | set(scales)


def _check_stray_parameters(model: nn.Module, spec: FamilySpec, d: int, declared: set[str]) -> None:
    """Every parameter held loose by a module (not a linear, conv, embedding or norm) that is d-wide
    on its last axis is on the stream or scales it: it must be declared."""
    params = dict(model.named_parameters())
    owners = dict(model.named_modules())

    def loose(name: str) -> bool:
        owner = owners[name.rpartition(".")[0]]
        return not isinstance(owner, _LEAF_MODULES) and type(owner).__name__ != "Conv1D" and not is_norm_like(owner, spec)

    stray = [
        name for name, param in params.items()
        if param.dim() >= 1 and param.shape[-1] == d and name not in declared and loose(name)
    ]
    if stray:
        raise UnsupportedModelError(
            f"the model has {d}-wide parameter(s) {stray[:3]} that {spec.source_file} does not declare (stream_parameters or "
            "layer_scales); refusing to leave a part of the residual stream unconverted"
        )


def _stream_norms(model: nn.Module, spec: FamilySpec, d: int, num_layers: int) -> set[str]:
    """Every norm that reads the stream (pre-norms and stem norms), each a LayerNorm over d
    features and declared once."""
    paths = [norm for group in spec.norms for norm, _ in expand_group(group, num_layers)]
    paths += [path for stem in spec.stem_norms for path in expand(stem.norm, num_layers)]
    twice = sorted({path for path in paths if paths.count(path) > 1})
    if twice:
        raise SpecError(f"{spec.source_file}: norm '{twice[0]}' is declared by two norm groups that both apply to this config")
    for path in paths:
        module = module_at(model, path, spec)
        if not _is_stream_norm(module, spec, d):
            raise UnsupportedModelError(
                f"{spec.source_file}: '{path}' should be a {spec.norm_module.class_name} over {d} features, found "
                f"{type(module).__name__} {module}; refusing to convert a norm the spec does not describe"
            )
    return set(paths)


def _check_switched_off(model: nn.Module, spec: FamilySpec, d: int, num_layers: int, active: set[str]) -> None:
    for role, templates in spec.switched_off.items():
        for template in templates:
            for path in expand(template, num_layers):
                if path in active or not _has_module(model, path):
                    continue
                if _touches_stream(model.get_submodule(path), role, spec, path, d):
                    raise UnsupportedModelError(
                        f"the model has '{path}', which {spec.source_file} expects as a {role} only under another "
                        "config; refusing to leave a part of the residual stream unconverted"
                    )


def _check_nothing_undeclared(
    model: nn.Module, spec: FamilySpec, d: int, embeddings: set[str], norms: set[str], inner: set[str]
) -> None:
    # anything d-wide that embeds token ids writes the main branch: it must be declared (and centered)
    stray = [name for name, m in model.named_modules() if isinstance(m, nn.Embedding) and m.embedding_dim == d and name not in embeddings]
    if stray:
        raise UnsupportedModelError(
            f"the model has {d}-wide embedding(s) {stray[:3]} that {spec.source_file} does not declare; "
            "refusing to leave a writer of the residual stream unconverted"
        )
    # a declared inner norm covers its submodules (StableLM's per-head norms hold one LayerNorm per head)
    def declared(name: str) -> bool:
        return name in norms or any(name.startswith(path + ".") for path in inner)

    stray = [name for name, m in model.named_modules() if is_norm_like(m, spec) and not declared(name)]
    if stray:
        raise UnsupportedModelError(
            f"the model has LayerNorm module(s) {stray[:3]} that {spec.source_file} does not describe; "
            "refusing to convert a structure the spec does not cover"
        )
