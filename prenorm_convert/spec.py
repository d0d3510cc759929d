"""Family specs: declarative descriptions of where each tensor role lives (docs/families.md,
docs/architecture.md "Spec format").

A spec is a YAML file in ``prenorm_convert/configs``. Validation is strict: a missing or unknown
key is an error naming the file and the key, so a typo never silently drops a role.

An embedding, writer, reader or inner-norm entry is a module name, or ``{module: NAME, when:
CONDITIONS}`` when the module's role depends on the config (OPT's project_in/project_out); a norm
group may carry ``when:`` too (Falcon's layouts). CONDITIONS is one condition or a list of them,
all of which must hold. ``FamilySpec.resolve`` turns a spec into the plain-name spec of one model,
and records every entry it switched off: such a module must then be absent from the model (or
active in another role, or off the residual stream), which check_structure verifies.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any, Union

import yaml

from .errors import BadInputError, SpecError, UnsupportedModelError

LAYER = "{L}"
LAYOUTS = ("linear", "conv1d")


@dataclass(frozen=True)
class Condition:
    """A test on the model's config that switches a spec entry on or off.

    Example (OPT): ``project_in`` exists, and writes the main branch, only when
    ``word_embed_proj_dim`` differs from ``hidden_size``. Values are read from the config object
    transformers builds (defaults and legacy names resolved), never from the raw config.json.
    """

    config_key: str
    equal: bool  # True: holds when the values are equal; False: when they differ
    value: Any
    value_is_config_key: bool

    def holds(self, config: Any) -> bool:
        left = _config_attribute(config, self.config_key)
        right = _config_attribute(config, self.value) if self.value_is_config_key else self.value
        return (left == right) == self.equal

    def describe(self) -> str:
        value = self.value if self.value_is_config_key else json.dumps(self.value)
        return f"{self.config_key}{'=' if self.equal else '!='}{value}"


def _config_attribute(config: Any, key: str) -> Any:
    if not hasattr(config, key):
        raise UnsupportedModelError(
            f"a spec condition reads config key '{key}', which the installed transformers' "
            f"{type(config).__name__} does not have; this transformers version is not supported"
        )
    return getattr(config, key)


def all_hold(conditions: tuple[Condition, ...], config: Any) -> bool:
    return all(condition.holds(config) for condition in conditions)


@dataclass(frozen=True)
class Conditional:
    """A spec entry (embedding, writer, reader or inner norm) that applies only when every
    condition in ``when`` holds."""

    module: str
    when: tuple[Condition, ...]


Entry = Union[str, Conditional]


@dataclass(frozen=True)
class NormGroup:
    """One norm on the way from the main branch into a branch, and the linears that read it; a
    parallel block lists the attention's and the MLP's readers under one norm."""

    norm: str
    readers: tuple[Entry, ...]
    when: tuple[Condition, ...] = ()


@dataclass(frozen=True)
class StemNorm:
    """A norm applied to the main branch itself (not a pre-norm), rewritten by a named hook."""

    norm: str
    embedding: str
    hook: str


@dataclass(frozen=True)
class NormModule:
    """How a family's stream norms are stored and what they compute, beyond torch's nn.LayerNorm:
    the module class (matched by exact name, so a subclass that computes something else is never
    taken for it), the attributes holding γ, β and ε (None: the module has none; ε may be given as
    a number when the module hard-codes it), and an offset the module adds to its stored γ
    (Nemotron's LayerNorm1P computes with weight + 1)."""

    class_name: str = "LayerNorm"
    weight: str | None = "weight"
    bias: str | None = "bias"
    eps: str | float = "eps"
    weight_offset: float = 0.0

    def epsilon(self, module: Any) -> float:
        return float(self.eps) if isinstance(self.eps, (int, float)) else float(getattr(module, self.eps))


@dataclass(frozen=True)
class Landing:
    """A stock RMSNorm architecture that a converted model *is*, exactly (docs/architecture.md
    "Spec format", lands_in): OLMo v1 with its stream centred is a LlamaForCausalLM. When every
    condition in ``when`` holds and the target is rmsnorm with norms that end without β, the output
    is written as that architecture: config.json gets ``model_type`` and ``architecture``, the
    ``config`` values set and ``drop_config_keys`` removed; tensor names change by the ``rename``
    prefix pairs; a norm without γ gets γ = 1. It then loads without remote code anywhere that
    architecture runs."""

    when: tuple[Condition, ...]
    model_type: str
    architecture: str
    config: dict
    drop_config_keys: tuple[str, ...]
    rename: tuple[tuple[str, str], ...]

    def renamed(self, name: str) -> str:
        for old, new in self.rename:
            if name.startswith(old):
                return new + name[len(old):]
        return name


@dataclass(frozen=True)
class Refusal:
    """Refuse a checkpoint whose config object meets every condition in ``when``, saying ``why``."""

    when: tuple[Condition, ...]
    why: str

    def describe(self) -> str:
        return " and ".join(condition.describe() for condition in self.when)


@dataclass(frozen=True)
class FamilySpec:
    family: str
    description: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    key_aliases: tuple[tuple[str, str], ...]
    config_keys: dict[str, str]
    layout: str
    embeddings: tuple[Entry, ...]
    norms: tuple[NormGroup, ...]
    writers: tuple[Entry, ...]
    head: str
    head_tied_to: str | None
    stem_norms: tuple[StemNorm, ...]
    ignore: tuple[str, ...]
    refuse: tuple[Refusal, ...]
    # LayerNorms that never read the residual stream (e.g. Phi's per-head q/k norms): left as they are
    inner_norms: tuple[Entry, ...] = ()
    norm_module: NormModule = field(default_factory=NormModule)
    lands_in: Landing | None = None
    source_file: str = field(default="", compare=False)
    # after resolve(): role -> the templates switched off by the config (check_structure: such a
    # module is absent, active in another role, or off the residual stream)
    switched_off: dict[str, tuple[str, ...]] = field(default_factory=dict, compare=False)

    def resolve(self, config: Any) -> "FamilySpec":
        """This spec for one model: conditional entries and norm groups kept (as plain names) where
        their conditions hold on ``config`` (the config object of the model transformers builds),
        dropped elsewhere and recorded in ``switched_off``."""

        def on(entry: Entry) -> bool:
            return isinstance(entry, str) or all_hold(entry.when, config)

        def active(entries: tuple[Entry, ...]) -> tuple[str, ...]:
            return tuple(_entry_module(e) for e in entries if on(e))

        def off(entries) -> tuple[str, ...]:
            return tuple(_entry_module(e) for e in entries if not on(e))

        groups = [group for group in self.norms if all_hold(group.when, config)]
        dropped = [group for group in self.norms if not all_hold(group.when, config)]
        return replace(
            self,
            embeddings=active(self.embeddings),
            writers=active(self.writers),
            inner_norms=active(self.inner_norms),
            norms=tuple(NormGroup(group.norm, active(group.readers)) for group in groups),
            switched_off={
                "embedding": off(self.embeddings),
                "writer": off(self.writers),
                "inner norm": off(self.inner_norms),
                "norm": tuple(group.norm for group in dropped),
                "reader": tuple(
                    _entry_module(r) for group in self.norms for r in group.readers if group in dropped or not on(r)
                ),
            },
        )

    def refusal_for(self, config: Any) -> Refusal | None:
        """The first refuse rule whose conditions all hold on the config object, if any."""
        return next((rule for rule in self.refuse if all_hold(rule.when, config)), None)

    # -- config access -------------------------------------------------------------------
    def config_value(self, config: dict, role: str, default: Any = None) -> Any:
        return config.get(self.config_keys[role], default)

    def hidden_size(self, config: dict) -> int:
        return int(self.config_value(config, "hidden_size"))

    def num_layers(self, config: dict) -> int:
        return int(self.config_value(config, "num_layers"))

    def is_tied(self, config: dict) -> bool:
        return bool(self.config_value(config, "tie_word_embeddings", True)) and self.head_tied_to is not None

    def layout_of(self, module: str) -> str:
        """The head is always an nn.Linear; every other reader/writer uses the family layout."""
        return "linear" if module == self.head else self.layout

    # -- names ---------------------------------------------------------------------------
    def canonical_key(self, stored_key: str, known: set[str]) -> str:
        """Map a key as stored on disk to the name the transformers model uses in memory."""
        if stored_key in known:
            return stored_key
        for canonical, stored in self.key_aliases:
            if stored_key.startswith(stored):
                candidate = canonical + stored_key[len(stored):]
                if candidate in known:
                    return candidate
        return stored_key

    def is_ignored(self, key: str, num_layers: int) -> bool:
        return any(key in expand(pattern, num_layers) for pattern in self.ignore)


def expand(template: str, num_layers: int) -> list[str]:
    """Expand a '{L}' name template over every layer index (a name without '{L}' stays one)."""
    if LAYER not in template:
        return [template]
    return [template.replace(LAYER, str(i)) for i in range(num_layers)]


def expand_group(group: NormGroup, num_layers: int) -> list[tuple[str, list[str]]]:
    """(norm, its readers) per layer: '{L}' in a norm and its readers is the same layer."""
    indices = range(num_layers) if LAYER in group.norm else [None]
    pairs = []
    for index in indices:
        def at(template: str) -> str:
            return template if index is None else template.replace(LAYER, str(index))

        pairs.append((at(group.norm), [at(reader) for reader in group.readers]))
    return pairs


# -- loading and validation ---------------------------------------------------------------

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
_OPTIONAL_SPEC_KEYS = {"inner_norms": list, "norm_module": dict, "lands_in": dict}


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


def _entry_module(entry: Entry) -> str:
    return entry if isinstance(entry, str) else entry.module


def parse_spec(data: Any, source_file: str) -> FamilySpec:
    _require_keys(source_file, data, _SPEC_KEYS, _OPTIONAL_SPEC_KEYS)
    config_keys = data["config_keys"]
    if set(config_keys) != _CONFIG_ROLES:
        raise SpecError(f"{source_file}: config_keys must name exactly {sorted(_CONFIG_ROLES)}, got {sorted(config_keys)}")
    if data["layout"] not in LAYOUTS:
        raise SpecError(f"{source_file}: layout must be one of {LAYOUTS}, got '{data['layout']}'")
    norms = []
    for i, group in enumerate(data["norms"]):
        _require_keys(f"{source_file}: norms[{i}]", group, {"norm": str, "readers": list}, {"when": (dict, list)})
        readers = _parse_entries(f"{source_file}: norms[{i}].readers", group["readers"])
        if LAYER not in group["norm"] and any(LAYER in _entry_module(reader) for reader in readers):
            raise SpecError(f"{source_file}: norms[{i}]: readers use '{LAYER}' but the norm '{group['norm']}' does not")
        when = _parse_when(f"{source_file}: norms[{i}].when", group["when"]) if "when" in group else ()
        norms.append(NormGroup(group["norm"], readers, when))
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
    head = data["head"]
    _require_keys(f"{source_file}: head", head, {"module": str}, {"tied_to": str})
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
        source_file=source_file,
    )


def _config_files():
    return sorted(
        (entry for entry in resources.files("prenorm_convert").joinpath("configs").iterdir() if entry.name.endswith(".yaml")),
        key=lambda entry: entry.name,
    )


@functools.lru_cache(maxsize=1)
def load_specs() -> tuple[FamilySpec, ...]:
    specs = []
    for entry in _config_files():
        if entry.name == "not_convertible.yaml":
            continue
        try:
            data = yaml.safe_load(entry.read_text())
        except yaml.YAMLError as exc:
            raise SpecError(f"configs/{entry.name} is not valid YAML: {exc}") from exc
        specs.append(parse_spec(data, f"configs/{entry.name}"))
    return tuple(specs)


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
    for spec in load_specs():
        if model_type in spec.model_types:
            if architectures and not set(architectures) & set(spec.architectures):
                raise UnsupportedModelError(
                    f"cannot convert architecture {'/'.join(architectures)}: for the {spec.family} family only "
                    f"{'/'.join(spec.architectures)} checkpoints are supported"
                )
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
