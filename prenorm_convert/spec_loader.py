"""Loading family specs: parse and validate the YAML files in ``prenorm_convert/configs`` (strictly:
a missing or unknown key is an error naming the file and the key), and match a checkpoint's config
to its spec or to the reason it cannot be converted (docs/architecture.md "Spec format")."""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

import yaml

from .errors import BadInputError, SpecError, UnsupportedModelError
from .spec import (
    LAYER,
    LAYOUTS,
    Condition,
    Conditional,
    Entry,
    ExtraStream,
    FamilySpec,
    Landing,
    LayerScale,
    StreamEntry,
    NormGroup,
    NormModule,
    Refusal,
    StemNorm,
    entry_module,
)


_SPEC_KEYS = {
    "family": str,
    "description": str,
    "model_types": list,
    "architectures": list,
    "key_aliases": list,
    "config_keys": dict,
    "layout": str,
    "embeddings": list,
    "norms": list,
    "writers": list,
    "head": dict,
    "stem_norms": list,
    "ignore": list,
    "refuse": list,
}
_OPTIONAL_SPEC_KEYS = {
    "inner_norms": list,
    "norm_module": dict,
    "lands_in": dict,
    "auto_class": str,
    "inputs": str,
    "stream_parameters": list,
    "layer_scales": list,
    "entry": dict,
    "streams": list,
    "may_be_absent": list,
}
INPUT_KINDS = ("text", "image", "audio", "audio_features")


def _parse_landing(where: str, data: Any) -> Landing | None:
    if data is None:
        return None
    optional = {"config": dict, "drop_config_keys": list, "rename": list}
    _require_keys(where, data, {"when": (dict, list), "model_type": str, "architecture": str}, optional)
    rename = data.get("rename", [])
    if not all(isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair) for pair in rename):
        raise SpecError(f"{where}: rename must be a list of [old_prefix, new_prefix] pairs")
    return Landing(
        when=_parse_when(f"{where}.when", data["when"]),
        model_type=data["model_type"],
        architecture=data["architecture"],
        config=dict(data.get("config", {})),
        drop_config_keys=tuple(data.get("drop_config_keys", [])),
        rename=tuple((old, new) for old, new in rename),
    )


def _parse_norm_module(where: str, data: Any) -> NormModule:
    """``norm_module: {class, weight, bias, eps, weight_offset}``; omitted keys keep nn.LayerNorm's."""
    if data is None:
        return NormModule()
    optional = {"weight": (str, type(None)), "bias": (str, type(None)), "eps": (str, int, float), "weight_offset": (int, float)}
    _require_keys(where, data, {"class": str}, optional)
    values = {key: data[key] for key in optional if key in data}
    return NormModule(class_name=data["class"], **{**values, "weight_offset": float(values.get("weight_offset", 0.0))})
_CONFIG_ROLES = {"hidden_size", "num_layers", "tie_word_embeddings"}


def _require_keys(where: str, data: Any, required: dict[str, type], optional: dict[str, type] | None = None):
    optional = optional or {}
    if not isinstance(data, dict):
        raise SpecError(f"{where}: expected a mapping, got {type(data).__name__}")
    unknown = set(data) - set(required) - set(optional)
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {sorted(unknown)}")
    missing = set(required) - set(data)
    if missing:
        raise SpecError(f"{where}: missing key(s) {sorted(missing)}")
    for key, kind in {**required, **optional}.items():
        if key in data and not isinstance(data[key], kind):
            names = " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__
            raise SpecError(f"{where}: key '{key}' must be a {names}, got {type(data[key]).__name__}")


_CONDITION_TESTS = {"equals": (True, False), "differs_from": (False, False), "equals_config_key": (True, True), "differs_from_config_key": (False, True)}


def _parse_when(where: str, data: Any) -> tuple[Condition, ...]:
    """One condition (a mapping) or a non-empty list of them, all of which must hold."""
    items = data if isinstance(data, list) else [data]
    if not items:
        raise SpecError(f"{where}: give at least one condition")
    return tuple(_parse_condition(f"{where}[{i}]" if isinstance(data, list) else where, item) for i, item in enumerate(items))


def _parse_condition(where: str, data: Any) -> Condition:
    _require_keys(where, data, {"config_key": str}, {test: object for test in _CONDITION_TESTS})
    tests = [test for test in _CONDITION_TESTS if test in data]
    if len(tests) != 1:
        raise SpecError(f"{where}: give exactly one of {sorted(_CONDITION_TESTS)}, got {sorted(tests)}")
    equal, value_is_key = _CONDITION_TESTS[tests[0]]
    if value_is_key and not isinstance(data[tests[0]], str):
        raise SpecError(f"{where}: '{tests[0]}' must name a config key")
    return Condition(data["config_key"], equal, data[tests[0]], value_is_key)


def _parse_entries(where: str, entries: list) -> tuple[Entry, ...]:
    """A module name, or {module: name, when: condition} for an entry that depends on the config."""
    parsed: list[Entry] = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            parsed.append(entry)
            continue
        _require_keys(f"{where}[{i}]", entry, {"module": str, "when": (dict, list)})
        parsed.append(Conditional(entry["module"], _parse_when(f"{where}[{i}].when", entry["when"])))
    return tuple(parsed)


def _parse_norm_groups(where: str, groups: list) -> tuple[NormGroup, ...]:
    norms = []
    for i, group in enumerate(groups):
        _require_keys(f"{where}[{i}]", group, {"norm": str, "readers": list}, {"when": (dict, list), "output": bool})
        readers = _parse_entries(f"{where}[{i}].readers", group["readers"])
        if LAYER not in group["norm"] and any(LAYER in entry_module(reader) for reader in readers):
            raise SpecError(f"{where}[{i}]: readers use '{LAYER}' but the norm '{group['norm']}' does not")
        when = _parse_when(f"{where}[{i}].when", group["when"]) if "when" in group else ()
        norms.append(NormGroup(group["norm"], readers, when, output=group.get("output", False)))
    return tuple(norms)


def _parse_layer_scales(where: str, items: list) -> tuple[LayerScale, ...]:
    scales = []
    for i, scale in enumerate(items):
        _require_keys(f"{where}[{i}]", scale, {"scale": str, "writer": str}, {"when": (dict, list)})
        when = _parse_when(f"{where}[{i}].when", scale["when"]) if "when" in scale else ()
        scales.append(LayerScale(scale["scale"], scale["writer"], when))
    return tuple(scales)


def _parse_entry(where: str, data: Any) -> StreamEntry | None:
    if data is None:
        return None
    _require_keys(where, data, {"module": str}, {"fed_by": list})
    return StreamEntry(data["module"], tuple(data.get("fed_by", [])))


def _parse_stream(where: str, data: Any) -> ExtraStream:
    """An extra residual stream: ``{name, num_layers, embeddings, stream_parameters, norms, writers,
    layer_scales, entry}`` (num_layers names the config key holding its layer count)."""
    optional = {"embeddings": list, "stream_parameters": list, "writers": list, "layer_scales": list, "entry": dict}
    _require_keys(where, data, {"name": str, "num_layers": str, "norms": list}, optional)
    return ExtraStream(
        name=data["name"],
        num_layers=data["num_layers"],
        embeddings=_parse_entries(f"{where}.embeddings", data.get("embeddings", [])),
        stream_parameters=_parse_entries(f"{where}.stream_parameters", data.get("stream_parameters", [])),
        norms=_parse_norm_groups(f"{where}.norms", data["norms"]),
        writers=_parse_entries(f"{where}.writers", data.get("writers", [])),
        layer_scales=_parse_layer_scales(f"{where}.layer_scales", data.get("layer_scales", [])),
        entry=_parse_entry(f"{where}.entry", data.get("entry")),
    )


def parse_spec(data: Any, source_file: str) -> FamilySpec:
    return _check_may_be_absent(_parse_spec(data, source_file))


def _parse_spec(data: Any, source_file: str) -> FamilySpec:
    _require_keys(source_file, data, _SPEC_KEYS, _OPTIONAL_SPEC_KEYS)
    config_keys = data["config_keys"]
    if set(config_keys) != _CONFIG_ROLES:
        raise SpecError(f"{source_file}: config_keys must name exactly {sorted(_CONFIG_ROLES)}, got {sorted(config_keys)}")
    if data["layout"] not in LAYOUTS:
        raise SpecError(f"{source_file}: layout must be one of {LAYOUTS}, got '{data['layout']}'")
    norms = _parse_norm_groups(f"{source_file}: norms", data["norms"])
    stems = []
    for i, stem in enumerate(data["stem_norms"]):
        _require_keys(f"{source_file}: stem_norms[{i}]", stem, {"norm": str, "embedding": str, "hook": str})
        from .transform import stem_hooks  # the step registry (torch), needed only by a spec with stem norms

        if stem["hook"] not in stem_hooks():
            raise SpecError(
                f"{source_file}: stem_norms[{i}].hook: unknown hook '{stem['hook']}'; known hooks: {', '.join(stem_hooks())}"
            )
        stems.append(StemNorm(stem["norm"], stem["embedding"], stem["hook"]))
    refusals = []
    for i, rule in enumerate(data["refuse"]):
        _require_keys(f"{source_file}: refuse[{i}]", rule, {"when": (dict, list), "why": str})
        refusals.append(Refusal(_parse_when(f"{source_file}: refuse[{i}].when", rule["when"]), rule["why"]))
    if data.get("inputs", "text") not in INPUT_KINDS:
        raise SpecError(f"{source_file}: inputs must be one of {INPUT_KINDS}, got '{data['inputs']}'")
    if not data.get("auto_class", "Auto").startswith("Auto"):
        raise SpecError(f"{source_file}: auto_class must name a transformers Auto class (AutoModel, ...), got '{data['auto_class']}'")
    scales = _parse_layer_scales(f"{source_file}: layer_scales", data.get("layer_scales", []))
    head = data["head"]
    _require_keys(f"{source_file}: head", head, {"module": (str, type(None))}, {"tied_to": str})
    aliases = []
    for i, pair in enumerate(data["key_aliases"]):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise SpecError(f"{source_file}: key_aliases[{i}] must be a [canonical_prefix, stored_prefix] pair")
        aliases.append((pair[0], pair[1]))
    return FamilySpec(
        family=data["family"],
        description=data["description"],
        model_types=tuple(data["model_types"]),
        architectures=tuple(data["architectures"]),
        key_aliases=tuple(aliases),
        config_keys=dict(config_keys),
        layout=data["layout"],
        embeddings=_parse_entries(f"{source_file}: embeddings", data["embeddings"]),
        norms=tuple(norms),
        writers=_parse_entries(f"{source_file}: writers", data["writers"]),
        head=head["module"],
        head_tied_to=head.get("tied_to"),
        stem_norms=tuple(stems),
        ignore=tuple(data["ignore"]),
        refuse=tuple(refusals),
        inner_norms=_parse_entries(f"{source_file}: inner_norms", data.get("inner_norms", [])),
        norm_module=_parse_norm_module(f"{source_file}: norm_module", data.get("norm_module")),
        lands_in=_parse_landing(f"{source_file}: lands_in", data.get("lands_in")),
        auto_class=data.get("auto_class", "AutoModelForCausalLM"),
        inputs=data.get("inputs", "text"),
        stream_parameters=_parse_entries(f"{source_file}: stream_parameters", data.get("stream_parameters", [])),
        layer_scales=scales,
        entry=_parse_entry(f"{source_file}: entry", data.get("entry")),
        streams=tuple(_parse_stream(f"{source_file}: streams[{i}]", stream) for i, stream in enumerate(data.get("streams", []))),
        may_be_absent=_parse_may_be_absent(f"{source_file}: may_be_absent", data),
        source_file=source_file,
    )


def _parse_may_be_absent(where: str, data: dict) -> tuple[str, ...]:
    names = data.get("may_be_absent", [])
    if not all(isinstance(name, str) for name in names):
        raise SpecError(f"{where} must be a list of module names")
    return tuple(names)


def _check_may_be_absent(spec: FamilySpec) -> FamilySpec:
    """No module a checkpoint may not store has a role in the conversion: a module the conversion
    rewrites, centres or reads through must be stored."""
    declared = {spec.head, *(stem.norm for stem in spec.stem_norms), *(stem.embedding for stem in spec.stem_norms)}
    for view in spec.views():
        groups = [(group.norm, *group.readers) for group in view.norms]
        for entries in (view.embeddings, view.writers, view.inner_norms, view.stream_parameters, *groups):
            declared.update(entry_module(entry) for entry in entries)
        declared.update(view.entry.fed_by if view.entry is not None else ())
    for name in spec.may_be_absent:
        if name in declared:
            raise SpecError(f"{spec.source_file}: may_be_absent: '{name}' has a role in the conversion, so the checkpoint must store it")
    return spec


def _config_files():
    return sorted(
        (entry for entry in resources.files("prenorm_convert").joinpath("configs").iterdir() if entry.name.endswith(".yaml")),
        key=lambda entry: entry.name,
    )


@functools.lru_cache(maxsize=1)
def load_specs() -> tuple[FamilySpec, ...]:
    files = {entry.name: entry for entry in _config_files() if entry.name != "not_convertible.yaml"}
    raw = {name: _read_yaml(entry) for name, entry in files.items()}
    return tuple(parse_spec(resolve_extends(name, raw), f"configs/{name}") for name in files)


def _read_yaml(entry) -> Any:
    try:
        return yaml.safe_load(entry.read_text())
    except yaml.YAMLError as exc:
        raise SpecError(f"configs/{entry.name} is not valid YAML: {exc}") from exc


def resolve_extends(name: str, raw: dict[str, Any], seen: tuple[str, ...] = ()) -> Any:
    """A spec file's data with ``extends: OTHER.yaml`` resolved: OTHER's keys, then this file's own
    keys in their place (a key given replaces the inherited one whole: a list is not appended to).
    One more architecture of a family (another head, the bare backbone) then states only what
    differs: its classes, the norm its head reads, the head."""
    data = raw[name]
    if not isinstance(data, dict) or "extends" not in data:
        return data
    parent = data["extends"]
    if parent in seen + (name,):
        raise SpecError(f"configs/{name}: extends: '{parent}' extends {name} again (a cycle)")
    if not isinstance(parent, str) or parent not in raw:
        raise SpecError(f"configs/{name}: extends: '{parent}' is not a spec file in configs/ (one of {', '.join(sorted(raw))})")
    inherited = resolve_extends(parent, raw, seen + (name,))
    if not isinstance(inherited, dict):
        raise SpecError(f"configs/{name}: extends: '{parent}' holds no spec (not a mapping of keys)")
    return {**inherited, **{key: value for key, value in data.items() if key != "extends"}}


@functools.lru_cache(maxsize=1)
def load_not_convertible() -> dict[str, str]:
    """model_type -> reason it cannot be converted."""
    entry = resources.files("prenorm_convert").joinpath("configs", "not_convertible.yaml")
    data = yaml.safe_load(entry.read_text())
    reasons = {}
    for group_name, group in data.items():
        _require_keys(f"configs/not_convertible.yaml: {group_name}", group, {"why": str, "model_types": list})
        for model_type in group["model_types"]:
            reasons[model_type] = group["why"]
    return reasons


def config_object(config: dict):
    """The config object transformers builds from a config.json (defaults filled in, legacy names
    mapped): what spec conditions read."""
    import transformers

    try:
        return transformers.AutoConfig.for_model(**config)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInputError(f"transformers cannot build a model from this config.json ({reason}); fix or re-download it") from None


def supported_families_line() -> str:
    return ", ".join(f"{s.family} ({'/'.join(s.architectures)})" for s in load_specs())


def match_spec(config: dict) -> FamilySpec:
    """Pick the spec for a checkpoint's config.json, or explain why there is none."""
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    candidates = [spec for spec in load_specs() if model_type in spec.model_types]
    if candidates:
        # a model type may have one spec per architecture (ViTModel and ViTForImageClassification
        # name their modules differently); a config without architectures takes the first
        matching = [spec for spec in candidates if not architectures or set(architectures) & set(spec.architectures)]
        if not matching:
            supported = "/".join(arch for spec in candidates for arch in spec.architectures)
            raise UnsupportedModelError(
                f"cannot convert architecture {'/'.join(architectures)}: for the {candidates[0].family} family only "
                f"{supported} checkpoints are supported"
            )
        spec = matching[0]
        rule = spec.refusal_for(config_object(config))
        if rule is not None:
            raise UnsupportedModelError(f"cannot convert this {spec.family} checkpoint: {rule.why}")
        return spec
    reason = load_not_convertible().get(model_type)
    name = model_type or "/".join(architectures) or "unknown"
    if reason:
        raise UnsupportedModelError(f"cannot convert model_type '{name}': {reason}")
    raise UnsupportedModelError(
        f"model_type '{name}' is not supported; supported families: {supported_families_line()}. "
        "Run `prenorm-convert families` for details"
    )
