"""Per-layer audit: where a converted model departs from its original (docs/report.md "Per-layer audit").

Both models run each batch of prompts in turn with forward hooks on every decoder layer and every writer
of the residual stream (paths from the family spec, so nothing here knows a family). Layer k's output
in the converted model must be the original's output minus its mean over features (docs/math.md "Why
it is exact"); for crmsnorm, its first d−1 features. Each writer's output must likewise be the
original's centred. The original's outputs for one batch are held (in memory, or spilled to disk when streamed) until
the converted model's pass compares with them; beyond that only running maxima are kept.

In a reduced dtype the original also runs in that dtype (its ``companion`` audit, on the same held
outputs): its own error at each layer sets that layer's tolerance, as its own error on the logits
sets the logit bar (docs/report.md "Per-layer audit").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .model_io import model_output
from .spec import LAYER, FamilySpec, expand


def layer_template(spec: FamilySpec) -> str | None:
    """The decoder layer's module path with '{L}' (e.g. 'transformer.h.{L}'), read off the spec's
    per-layer norms; None for a spec without per-layer norms."""
    for group in spec.norms:
        if LAYER in group.norm:
            return group.norm[: group.norm.index(LAYER) + len(LAYER)]
    return None


def _output(value) -> torch.Tensor:
    """A layer's hidden-state output: the tensor itself, or the first element of the tuple it returns."""
    return value[0] if isinstance(value, (tuple, list)) else value


@dataclass
class _Maxima:
    """Running maxima of one module's comparison over all prompts."""

    diff: float = 0.0  # max |converted - centred original| over the compared features
    scale: float = 0.0  # max |centred original|
    mean_over_rms: float = 0.0  # max |mean| / rms of the converted full-width output (layers only)

    def relative(self) -> float:
        return self.diff / self.scale if self.scale > 0 else (0.0 if self.diff == 0 else float("inf"))


@dataclass
class LayerAudit:
    layers: list[str]
    writers: list[list[str]]  # per layer, the writer module paths
    width: int | None  # residual width compared (d, or d-1 for crmsnorm); None: every feature
    crmsnorm: bool
    # the compared model's outputs are not centred by construction (the original, run in a reduced dtype)
    centre_compared: bool = False
    maxima: dict[str, _Maxima] = field(default_factory=dict)

    @classmethod
    def for_spec(cls, spec: FamilySpec, config, block: dict) -> "LayerAudit | None":
        """The audit of every stream's layers (an encoder's, then the decoder's: one numbering), from
        the spec resolved on the model's config."""
        layers, writers = [], []
        for view in spec.views():
            view = view.resolve(config)
            template = layer_template(view)
            if template is None:
                continue
            num_layers = view.num_layers(config.to_dict())
            layers += expand(template, num_layers)
            writers += [[w.replace(LAYER, str(i)) for w in view.writers if LAYER in w] for i in range(num_layers)]
        if not layers:
            return None
        return cls(layers, writers, block["residual_width"], block["target"] == "crmsnorm")

    def companion(self) -> "LayerAudit":
        """The same audit of the original itself, run in a reduced dtype: its outputs, centred,
        against the float32 original's, over every feature."""
        return LayerAudit(self.layers, self.writers, None, False, centre_compared=True)

    def paths(self) -> list[str]:
        return self.layers + [w for group in self.writers for w in group]

    @torch.no_grad()
    def record(self, model, ids: torch.Tensor, sink: Callable[[str, torch.Tensor], None]) -> torch.Tensor:
        """Run ``model`` on a batch of prompts (batch × positions); every audited module's output,
        in float64 on the CPU, goes to ``sink(path, output)`` as it is computed. Returns the logits."""
        handles = []
        for path in self.paths():
            def hook(_module, _args, output, path=path):
                # a copy: some layers add into a writer's output in place (Falcon: mlp_output += ...)
                sink(path, _output(output).detach().to("cpu", torch.float64, copy=True))

            handles.append(model.get_submodule(path).register_forward_hook(hook))
        try:
            return model_output(model, ids)
        finally:
            for handle in handles:
                handle.remove()

    def compare(self, path: str, original: torch.Tensor, converted: torch.Tensor) -> None:
        """Fold one module's outputs on one batch into the running maxima."""
        centred = original - original.mean(-1, keepdim=True)
        maxima = self.maxima.setdefault(path, _Maxima())
        if self.centre_compared:
            converted = converted - converted.mean(-1, keepdim=True)
        compared = converted[..., : self.width]
        maxima.diff = _max(maxima.diff, (compared - centred[..., : self.width]).abs().max())
        maxima.scale = _max(maxima.scale, centred.abs().max())
        if path in self.layers:
            # crmsnorm: the implied last feature is minus the sum (zero mean by construction, in float64)
            full = torch.cat([compared, -compared.sum(-1, keepdim=True)], dim=-1) if self.crmsnorm else compared
            rms = full.pow(2).mean(-1).sqrt().clamp_min(1e-30)
            maxima.mean_over_rms = _max(maxima.mean_over_rms, (full.mean(-1).abs() / rms).max())

    def result(self, tolerance: float, original: "LayerAudit | None" = None, reduced_bound: Callable[[float], float] | None = None) -> dict:
        """``per_layer`` entries, ``first_bad_layer`` (relative Δ over the layer's tolerance) and,
        for that layer, its worst writer. A layer's tolerance is ``tolerance``, or in a reduced dtype
        ``reduced_bound`` of the ``original``'s own error at that layer (not the logit bar there: it
        includes the measured cost of rounding the stored tensors, which a tampered tensor inflates)."""
        per_layer = []
        for index, path in enumerate(self.layers):
            if path not in self.maxima:
                continue
            own = original.maxima[path].relative() if original is not None and path in original.maxima else None
            per_layer.append({
                "layer": index,
                "mean_over_rms": self.maxima[path].mean_over_rms,
                "max_abs_diff": self.maxima[path].relative(),
                "original_in_dtype": own,
                "tolerance": reduced_bound(own) if reduced_bound is not None and own is not None and math.isfinite(own) else tolerance,
            })
        bad = next((entry["layer"] for entry in per_layer if not entry["max_abs_diff"] <= entry["tolerance"]), None)
        writer = None
        if bad is not None and self.writers[bad]:
            writer = max(self.writers[bad], key=lambda path: _sortable(self.maxima[path].relative()))
        return {"per_layer": per_layer, "first_bad_layer": bad, "first_bad_writer": writer, "layer_tolerance": tolerance}


def _max(current: float, value: torch.Tensor) -> float:
    """max() that keeps NaN (a NaN output must show, not vanish)."""
    value = float(value)
    return value if value != value or value > current else current


def _sortable(value: float) -> float:
    return float("inf") if value != value else value
