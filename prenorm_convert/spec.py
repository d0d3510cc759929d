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

import json
from dataclasses import dataclass, field, replace
from typing import Any, Union

from .errors import UnsupportedModelError

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
    # the norm's output is one of the model's outputs (an encoder's last_hidden_state): its γ, β are
    # kept and its readers left as they are; under crmsnorm it restores the full width first
    output: bool = False


@dataclass(frozen=True)
class StemNorm:
    """A norm applied to the main branch itself (not a pre-norm), rewritten by a named hook."""

    norm: str
    embedding: str
    hook: str


@dataclass(frozen=True)
class LayerScale:
    """A per-channel scale λ on a writer's output before it joins the stream (DINOv2's LayerScale):
    folded into the writer's rows and bias, then written as ones (docs/math.md "LayerScale")."""

    scale: str  # the parameter path, '{L}' for every layer
    writer: str
    when: tuple[Condition, ...] = ()


@dataclass(frozen=True)
class StreamEntry:
    """Where a stream whose start no stored weight can centre enters its first layer (Whisper's
    encoder: GELU(conv) + positions): the converted model centres the stream there, once (docs/math.md
    "Streams centred at entry"). ``fed_by``: the d-wide modules that build that start, left as they are."""

    module: str
    fed_by: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExtraStream:
    """A second residual stream of the same width (an encoder's, beside the decoder's that the head
    reads): its own embeddings, norms and writers, its own number of layers (the config key
    ``num_layers``), and where it enters its layers, if it must be centred there."""

    name: str
    num_layers: str
    embeddings: tuple["Entry", ...] = ()
    stream_parameters: tuple["Entry", ...] = ()
    norms: tuple["NormGroup", ...] = ()
    writers: tuple["Entry", ...] = ()
    layer_scales: tuple["LayerScale", ...] = ()
    entry: StreamEntry | None = None


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
    head: str | None  # None: the model has no head (an encoder whose output is its last norm's)
    head_tied_to: str | None
    stem_norms: tuple[StemNorm, ...]
    ignore: tuple[str, ...]
    refuse: tuple[Refusal, ...]
    # LayerNorms that never read the residual stream (e.g. Phi's per-head q/k norms): left as they are
    inner_norms: tuple[Entry, ...] = ()
    norm_module: NormModule = field(default_factory=NormModule)
    lands_in: Landing | None = None
    # the transformers Auto class the family's checkpoints load with, and what they take as input
    auto_class: str = "AutoModelForCausalLM"
    inputs: str = "text"
    # parameters (not modules) whose last axis is the stream: ViT's cls_token and position_embeddings
    stream_parameters: tuple[Entry, ...] = ()
    layer_scales: tuple[LayerScale, ...] = ()
    entry: StreamEntry | None = None
    streams: tuple[ExtraStream, ...] = ()
    # modules off the stream (a pooler beside last_hidden_state) whose weights a checkpoint may not
    # store: transformers initialises them at load, the original and the converted model alike
    may_be_absent: tuple[str, ...] = ()
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
            return tuple(entry_module(e) for e in entries if on(e))

        def off(entries) -> tuple[str, ...]:
            return tuple(entry_module(e) for e in entries if not on(e))

        groups = [group for group in self.norms if all_hold(group.when, config)]
        dropped = [group for group in self.norms if not all_hold(group.when, config)]
        return replace(
            self,
            embeddings=active(self.embeddings),
            writers=active(self.writers),
            inner_norms=active(self.inner_norms),
            stream_parameters=active(self.stream_parameters),
            layer_scales=tuple(scale for scale in self.layer_scales if all_hold(scale.when, config)),
            norms=tuple(NormGroup(group.norm, active(group.readers), output=group.output) for group in groups),
            switched_off={
                "embedding": off(self.embeddings),
                "stream parameter": off(self.stream_parameters),
                "writer": off(self.writers),
                "inner norm": off(self.inner_norms),
                "norm": tuple(group.norm for group in dropped),
                "reader": tuple(
                    entry_module(r) for group in self.norms for r in group.readers if group in dropped or not on(r)
                ),
            },
        )

    def views(self) -> list["FamilySpec"]:
        """One spec per residual stream: this one (the stream the head reads), then each extra
        stream as a spec of its own roles, sharing the family's head, norm class and layout."""
        views = [replace(self, streams=())]
        for stream in self.streams:
            views.append(
                replace(
                    self,
                    streams=(),
                    config_keys={**self.config_keys, "num_layers": stream.num_layers},
                    embeddings=stream.embeddings,
                    stream_parameters=stream.stream_parameters,
                    norms=stream.norms,
                    writers=stream.writers,
                    layer_scales=stream.layer_scales,
                    entry=stream.entry,
                    stem_norms=(),
                    inner_norms=(),
                    lands_in=None,
                )
            )
        return views

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

    @property
    def causal(self) -> bool:
        """A causal language model: verified and benchmarked by generating as well."""
        return self.auto_class == "AutoModelForCausalLM"

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

    def layer_scale_pairs(self, num_layers: int) -> list[tuple[str, str]]:
        """(scale parameter, its writer) for every layer."""
        return [pair for scale in self.layer_scales for pair in expand_pair(scale.scale, scale.writer, num_layers)]

    def is_ignored(self, key: str, num_layers: int) -> bool:
        return any(key in expand(pattern, num_layers) for pattern in self.ignore)


def expand(template: str, num_layers: int) -> list[str]:
    """Expand a '{L}' name template over every layer index (a name without '{L}' stays one)."""
    if LAYER not in template:
        return [template]
    return [template.replace(LAYER, str(i)) for i in range(num_layers)]


def expand_pair(first: str, second: str, num_layers: int) -> list[tuple[str, str]]:
    """Two templates expanded together: '{L}' is the same layer in both."""
    if LAYER not in first:
        return [(first, second)]
    return [(first.replace(LAYER, str(i)), second.replace(LAYER, str(i))) for i in range(num_layers)]


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


def entry_module(entry: Entry) -> str:
    return entry if isinstance(entry, str) else entry.module
