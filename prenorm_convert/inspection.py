"""`inspect` and `families`: what a conversion would do, and what the tool supports. Writes nothing."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .checkpoint import SourceCheckpoint, check_path_encoding
from .dtype_checks import parse_dtype
from .hub import resolve_source
from .plan import make_plan
from .spec_loader import load_not_convertible, load_specs, match_spec
from .transform import STEPS


def describe(
    src: str | Path,
    target: str = "rmsnorm",
    fold_affine: bool = False,
    dtype: str = "auto",
    allow_pickle: bool = False,
    revision: str | None = None,
    token: str | None = None,
    pad_to: int | None = None,
    untie_head: bool = False,
) -> dict:
    # a hub id: config, index and safetensors headers, and the few tensors the plan reads (β)
    resolved = resolve_source(src, revision=revision, token=token, allow_pickle=allow_pickle, headers_only=True)
    check_path_encoding(resolved.path, "SRC")
    source = SourceCheckpoint.open(resolved.path, allow_pickle=allow_pickle, shards=resolved.shards)
    spec = match_spec(source.config)
    plan = make_plan(source, spec, target=target, fold_affine=fold_affine, dtype=parse_dtype(dtype), pad_to=pad_to, untie_head=untie_head)
    changes = Counter()
    for op in plan.ops:
        words = [STEPS[name].words for name, _ in op.steps if STEPS[name].words]
        if words:
            changes[f"{op.role}: {', '.join(words)}"] += 1
    width = plan.residual_width
    return {
        "source": resolved.name,
        "source_revision": resolved.revision,
        "family": spec.family,
        "model_type": source.config.get("model_type"),
        "architectures": source.config.get("architectures"),
        "hidden_size": plan.hidden_size,
        "residual_width": width,
        "num_layers": plan.num_layers,
        "untie_head": plan.untied_head,
        "centered_at_lookup": plan.centered_at_lookup,
        "stored_dtype": str(plan.source_dtype).removeprefix("torch."),
        "output_dtype": str(plan.out_dtype).removeprefix("torch."),
        "target": target,
        "fold_affine": plan.fold_affine,
        "tensors_in": len(source.tensors),
        "tensors_out": len(plan.ops),
        "dropped": plan.dropped,
        "params_original": plan.params_original,
        "params_converted": plan.params_converted,
        "input_bytes": source.weight_bytes,
        "output_bytes": plan.output_bytes,
        "norms_replaced": len(plan.norms),
        "biases_added": plan.biased,
        "modules_removed": plan.removed,
        "tensors_resized": len(plan.resized),
        "stream_width": plan.stream_width,
        "changes": dict(changes),
        "requires_remote_code": plan.requires_remote_code,
        "lands_in": plan.landing.architecture if plan.landing is not None else None,
        "notes": _notes(plan),
    }


def _notes(plan) -> list[str]:
    notes = []
    if plan.residual_width != plan.hidden_size:
        notes.append(
            f"the residual stream shrinks from {plan.hidden_size} to {plan.residual_width} features "
            f"(docs/math.md \"Pre-CRMSNorm\"; {len(plan.resized)} tensors change shape); hidden states are "
            f"{plan.stream_width} wide, and the dropped feature is minus the sum of the others"
        )
    if plan.stream_width is not None and plan.stream_width != plan.residual_width:
        notes.append(
            f"the {plan.residual_width} features are stored zero-padded to {plan.stream_width} (--pad-to {plan.pad_to}) "
            "for aligned matrix kernels; the padding stays zero and is never read"
        )
    if plan.untied_head and plan.residual_width != plan.hidden_size:
        notes.append(
            f"the tied head is untied: {plan.spec.head} gets its own table (the embedding with γ folded in and "
            "its last column merged into the others)"
        )
    elif plan.untied_head:
        notes.append(
            f"the tied head is untied: {plan.spec.head} keeps the original embedding "
            f"(+{plan.params_converted - plan.params_original:,} parameters)"
        )
    if plan.centered_at_lookup:
        kept = " (the final norm keeps its γ, β, which the head reads)" if plan.fold_affine else ""
        notes.append(
            f"the head stays tied to {', '.join(plan.centered_at_lookup)}: the table is stored once, as it is, and the "
            f"converted model centres its rows at lookup{kept}; --untie-head stores the centred table and the head apart "
            "instead"
        )
    if plan.head_stored_apart:
        notes.append(
            f"the config ties {plan.spec.head} to the embedding, but the checkpoint stores it with other values, "
            "which transformers keeps apart when loading (it warns); converted that way, and written untied"
        )
    if plan.centered_stems:
        notes.append(
            f"{', '.join(plan.centered_stems)} (a LayerNorm on the residual stream itself) is kept, with its table, γ "
            "and β as they are: the converted model centres its output, so fine-tuning trains them as the original "
            "does; the stock class needs no such step (its LayerNorms ignore the mean)"
        )
    if plan.removed:
        notes.append(
            f"{', '.join(plan.removed)} (a LayerNorm on the residual stream itself) is baked into the embedding table "
            "and removed from the converted architecture"
        )
    if plan.not_stored:
        notes.append(
            f"the checkpoint does not store {', '.join(plan.not_stored)} (a backbone saved without it): transformers "
            "initialises it afresh when loading the original and the converted model alike; nothing is written for it"
        )
    if plan.landing is not None:
        notes.append(
            f"the output is a stock {plan.landing.architecture} (model_type {plan.landing.model_type}): with the stream "
            "centred every norm is an RMSNorm, so it loads without remote code wherever that architecture runs"
        )
    elif plan.requires_remote_code:
        notes.append("the output needs trust_remote_code=True to load (modeling_prenorm.py is written beside the weights)")
    else:
        notes.append("the output also loads without remote code, as the stock class with LayerNorms, with identical outputs")
    return notes


def families() -> list[dict]:
    rows = []
    for spec in load_specs():
        rows.append(
            {
                "family": spec.family,
                "description": spec.description,
                "model_types": list(spec.model_types),
                "architectures": list(spec.architectures),
                "refuses": [f"{rule.describe()}: {rule.why}" for rule in spec.refuse],
                "stem_norms": [stem.norm for stem in spec.stem_norms],
            }
        )
    return rows


def not_convertible() -> dict[str, str]:
    return load_not_convertible()
