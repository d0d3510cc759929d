"""The data a plan is: one TensorOp per output tensor, and the ConversionPlan that holds them with
everything the writer, the remote code and the report need (plan.py makes them)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .spec import FamilySpec, Landing


@dataclass(frozen=True)
class TensorOp:
    """Write ``name``: read ``inputs`` (arg -> stored key), apply ``steps`` in float64, cast to ``dtype``."""

    name: str
    role: str
    inputs: dict[str, str]
    steps: tuple[tuple[str, dict], ...]
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def changed(self) -> bool:
        return any(step != "identity" for step, _ in self.steps)


@dataclass
class ConversionPlan:
    spec: FamilySpec
    target: str
    fold_affine: bool
    hidden_size: int
    num_layers: int
    ops: list[TensorOp]
    dropped: list[str]
    untied_head: bool
    norms: dict[str, dict]
    biased: list[str]
    removed: list[str]
    base_config_class: str
    base_model_class: str
    params_original: int
    source_dtype: torch.dtype
    out_dtype: torch.dtype
    notes: list[str] = field(default_factory=list)
    # parameter name -> written shape, for every tensor whose shape differs from the stock model's
    # (crmsnorm: the d-1 wide residual stream); the remote code resizes exactly these
    resized: dict[str, list[int]] = field(default_factory=dict)
    # crmsnorm --pad-to: the d-1 features are stored zero-padded to stream_width (a multiple of pad_to)
    pad_to: int | None = None
    stream_width: int | None = None
    # the config ties the head to the embedding, but the file stores a head with other values, which
    # transformers keeps apart at load: converted as such, written with the tie switched off
    head_stored_apart: bool = False
    # the output is this stock RMSNorm architecture exactly (spec lands_in), written under its names
    landing: Landing | None = None
    # embeddings stored as they are (a table tied to the head), whose rows the converted model
    # centres at lookup (modeling.py); the stock class's LayerNorms need no centring
    centered_at_lookup: list[str] = field(default_factory=list)
    # modules whose input stream the converted model centres (docs/math.md "Streams centred at
    # entry"); the stock class's LayerNorms need no centring
    stream_entries: list[str] = field(default_factory=list)
    # stem norms the converted model computes and then centres (rmsnorm), and the tables they read
    centered_stems: list[str] = field(default_factory=list)
    stem_tables: list[str] = field(default_factory=list)
    # modules the checkpoint does not store (spec may_be_absent): transformers initialises them at load
    not_stored: list[str] = field(default_factory=list)

    @property
    def residual_width(self) -> int:
        """Width of the residual stream in the converted model (docs/math.md "Pre-CRMSNorm": d-1)."""
        return self.hidden_size - 1 if self.target == "crmsnorm" else self.hidden_size

    @property
    def params_converted(self) -> int:
        total = 0
        for op in self.ops:
            numel = 1
            for dim in op.shape:
                numel *= dim
            total += numel
        return total

    @property
    def output_bytes(self) -> int:
        return sum(numel(op.shape) * torch.empty((), dtype=op.dtype).element_size() for op in self.ops)

    @property
    def requires_remote_code(self) -> bool:
        """Only rmsnorm with the affine kept loads as the stock class (LN of a zero-mean x is RMSNorm)."""
        if self.landing is not None:
            return False
        return self.target != "rmsnorm" or self.fold_affine or bool(self.removed) or bool(self.biased) or self.norm_weights_rewritten

    @property
    def train_centered(self) -> list[str]:
        """Modules whose outputs the converted model centres while it trains (docs/training.md):
        every embedding and writer of the stream, on the rmsnorm target (a table centred at lookup
        is centred always). Their stored weights are centred already, so eval costs nothing."""
        if self.target != "rmsnorm" or self.landing is not None:
            return []
        modules = [op.name.rsplit(".", 1)[0] for op in self.ops if op.role in ("embedding", "writer") and op.name.endswith(".weight")]
        # a table read by a stem norm stays as it is: the norm's centred output is the stream
        return [module for module in modules if module not in self.centered_at_lookup and module not in self.stem_tables]

    @property
    def train_centered_parameters(self) -> list[str]:
        """Stream parameters (cls_token, position_embeddings) the converted model re-centres when it
        leaves training (docs/training.md)."""
        if self.target != "rmsnorm" or self.landing is not None:
            return []
        return [op.name for op in self.ops if op.role == "embedding" and not op.name.endswith(".weight")]

    @property
    def folded_layer_scales(self) -> list[str]:
        """LayerScale parameters folded into their writers and written as ones."""
        return [op.name for op in self.ops if op.role == "writer" and op.steps and op.steps[0][0] == "ones"]

    @property
    def norm_weights_rewritten(self) -> bool:
        """The stored γ is not what the stock norm class reads (its weight offset was applied)."""
        return self.spec.norm_module.weight_offset != 0 and any(norm["affine"] for norm in self.norms.values())


def numel(shape) -> int:
    numel = 1
    for dim in shape:
        numel *= dim
    return numel


# -- planning --------------------------------------------------------------------------------
