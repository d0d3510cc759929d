"""Spec + checkpoint -> the list of tensor operations a conversion performs.

The plan is pure data: ``inspect`` prints it, ``convert`` executes it. Names are those of the
instantiated transformers model (built on the meta device, so nothing is allocated), and the
model tree is checked against the spec before anything is planned.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .checkpoint import SourceCheckpoint
from .dtype_checks import check_float_dtypes, check_not_quantized
from .errors import BadInputError, CorruptCheckpointError, SpecError
from .meta_model import build_meta_model, check_resized_forward
from .row_blocks import DEFAULT_BLOCK_BYTES
from .safetensors_io import DTYPES, element_size
from .plan_data import ConversionPlan, TensorOp, numel
from .spec import FamilySpec, Landing, all_hold, expand, expand_group
from .stored_keys import check_shapes, map_stored_keys
from .structure import check_streams, module_at
from .transform import output_shape

TARGETS = ("rmsnorm", "crmsnorm")


class _Planner:
    def __init__(
        self,
        source: SourceCheckpoint,
        spec: FamilySpec,
        target: str,
        fold_affine: bool,
        dtype: torch.dtype | None,
        pad_to: int | None = None,
        untie_head: bool = False,
    ):
        if target not in TARGETS:
            raise BadInputError(f"--target must be one of {', '.join(TARGETS)}, got '{target}'")
        if pad_to is not None and (target != "crmsnorm" or pad_to < 1):
            raise BadInputError(f"--pad-to needs --target crmsnorm and a positive multiple, got --target {target} --pad-to {pad_to}")
        self.pad_to = pad_to
        self.untie_head = untie_head
        self.source, self.spec, self.target = source, spec, target
        self.fold = fold_affine or target == "crmsnorm"
        self.dtype = dtype
        check_not_quantized(source.config)
        model = build_meta_model(source.config, spec)
        self.model = model
        # sizes and spec conditions read the parsed config: defaults filled in, legacy names
        # (e.g. BLOOM's n_embed) mapped by transformers
        self.views = [view.resolve(model.config) for view in spec.views()]  # one per residual stream
        self.spec = spec = self.views[0]
        self.settings = settings = model.config.to_dict()
        self.d = spec.hidden_size(settings)
        self.L = spec.num_layers(settings)
        self.most_layers = max(view.num_layers(settings) for view in self.views)
        # crmsnorm: d-1 features, stored zero-padded to a multiple of --pad-to if asked
        self.stream_width = -(-(self.d - 1) // (pad_to or 1)) * (pad_to or 1)
        if pad_to is not None and pad_to > self.d:
            raise BadInputError(
                f"--pad-to {pad_to} is larger than the hidden size {self.d}: the {self.d - 1} features would be stored "
                f"{self.stream_width} wide, wider than the original stream; pick a multiple of at most {self.d}, such as 8 or 64"
            )
        check_streams(model, [(view, self.d, view.num_layers(settings)) for view in self.views])
        self.params = dict(model.named_parameters(remove_duplicate=False))
        # persistent buffers a checkpoint may store (ESM's rotary inv_freq): copied when stored, never required
        persistent = set(model.state_dict())
        self.buffers = {name: b for name, b in model.named_buffers() if name in persistent and name not in self.params}
        tensors = {**self.buffers, **self.params}
        self.stored = map_stored_keys(source, self.spec, model, tensors, self.most_layers)
        check_float_dtypes([self.source.tensors[key] for key in self.stored.values()], self.dtype)
        check_shapes(source, self.spec, self.stored, tensors)
        self._read_table_from_a_head_stored_alone()
        self.ops: list[TensorOp] = []
        self.done: set[str] = set()
        self.norms: dict[str, dict] = {}
        self.biased: list[str] = []
        self.removed: list[str] = []
        # rmsnorm: a stem norm stays, computed and then centred by the converted model (docs/math.md
        # "Stem norms: a norm on the main branch itself"); its table, γ and β are the original's
        self.keep_stems = target == "rmsnorm"
        self.centered_stems: list[str] = []
        self.not_stored: list[str] = []
        self.stem_tables: list[str] = []

    # names -------------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self.stored

    def key(self, name: str) -> str:
        if name not in self.stored:
            raise CorruptCheckpointError(f"the checkpoint has no tensor for '{name}' (looked for it under every known key style)")
        return self.stored[name]

    def shape_of(self, name: str) -> tuple[int, ...]:
        return tuple(self.source.tensors[self.key(name)].shape)

    def stored_dtype(self, name: str) -> torch.dtype:
        return DTYPES[self.source.tensors[self.key(name)].dtype]

    # ops -----------------------------------------------------------------------------------
    def add(self, name: str, role: str, inputs: dict[str, str], steps: list[tuple[str, dict]], dtype_from: str | None = None):
        shapes = {arg: tuple(self.source.tensors[key].shape) for arg, key in inputs.items()}
        shape = output_shape(steps, shapes)
        stored = self.stored_dtype(dtype_from or name)
        # a buffer (rotary frequencies) keeps its stored dtype, as transformers keeps it at load
        cast = self.dtype is not None and stored.is_floating_point and name not in self.buffers
        out_dtype = self.dtype if cast else stored
        if name in self.done:
            raise SpecError(f"{self.spec.source_file} gives '{name}' more than one role")
        self.ops.append(TensorOp(name, role, dict(inputs), tuple(steps), shape, out_dtype))
        self.done.add(name)

    def norm_params(self, norm: str) -> tuple[str | None, str | None]:
        """(γ, β) parameter names of a norm, each None when the family's norm class has none."""
        kind = self.spec.norm_module
        weight = f"{norm}.{kind.weight}" if kind.weight else None
        bias = f"{norm}.{kind.bias}" if kind.bias else None
        return (weight if weight and self.has(weight) else None), (bias if bias and self.has(bias) else None)

    def plan(self) -> ConversionPlan:
        tied, head_stored_apart, self.tie_kept = self._head_tie()
        for view in self.views:  # each residual stream with its own roles and layer count
            self.spec, self.L = view, view.num_layers(self.settings)
            self._plan_embeddings()
            self._plan_stream_parameters()
            self._plan_writers()
            self._plan_norms(tied)
        self.spec, self.L = self.views[0], self.views[0].num_layers(self.settings)
        self._plan_head_outside_the_stream(tied)
        landing = self._plan_landing()
        self._plan_the_rest()
        return self._assemble(tied, head_stored_apart, landing)

    def _head_tie(self) -> tuple[bool, bool, bool]:
        """(the head is untied from the embedding, the config ties a head the file stores apart,
        the tie is kept with the table centred at lookup).

        A tied head is computed from the embedding (when transformers ties them: _head_is_table).
        When the conversion would rewrite the shared table or the head (docs/math.md "Tied
        embeddings"), the rmsnorm target keeps the tie: the table is stored as it is, once, and the
        converted model centres its rows at lookup; the final norm keeps its γ, β even under
        --fold-affine, so that the head stays the table. crmsnorm, a stem norm on the table, or
        --untie-head write the head untied, from the original table. OPT with project_in keeps both
        embed_tokens and the head, and their tie, unchanged."""
        spec, L = self.spec, self.L
        rewritten = {m for t in spec.embeddings for m in expand(t, L)} | {
            reader for group in spec.norms for _, readers in expand_group(group, L) for reader in readers
        }
        config_tied = spec.is_tied(self.settings)
        head_is_table = config_tied and self._head_is_table()
        shared = head_is_table and bool({spec.head, spec.head_tied_to} & rewritten)
        stem_tables = {stem.embedding for stem in spec.stem_norms}
        # a stock architecture the output lands in cannot centre at lookup: there the table is stored centred
        stem_baked = spec.head_tied_to in stem_tables and not self.keep_stems
        keep = shared and not self.untie_head and self.target == "rmsnorm" and not stem_baked and spec.lands_in is None
        return shared and not keep, config_tied and not head_is_table, keep

    def _plan_embeddings(self) -> None:
        spec, L = self.spec, self.L
        stem_embeddings = {stem.embedding: stem for stem in spec.stem_norms}
        compress = self.target == "crmsnorm"
        for template in spec.embeddings:
            for module in expand(template, L):
                name = f"{module}.weight"
                steps: list[tuple[str, dict]] = []
                inputs = {"x": self.key(name)}
                if module in stem_embeddings and self.keep_stems:
                    self._plan_kept_stem(stem_embeddings[module], inputs)
                    continue
                if self.tie_kept and module == spec.head_tied_to:
                    # stored once, as it is: the converted model centres its rows at lookup
                    self.add(name, "embedding", inputs, [("identity", {})])
                    continue
                if module in stem_embeddings:
                    stem = stem_embeddings[module]
                    gamma, beta = self.norm_params(stem.norm)
                    inputs = {"table": self.key(name), "gamma": self.key(gamma), "beta": self.key(beta)}
                    steps.append((stem.hook, {"eps": float(module_at(self.model, stem.norm, spec).eps)}))
                    self.removed.append(stem.norm)
                    self.done.update({gamma, beta})
                steps.append(("center_rows", {}))
                if compress:
                    steps += self._compressed("feature")
                self.add(name, "embedding", inputs, steps)

    def _plan_kept_stem(self, stem, inputs: dict[str, str]) -> None:
        """The table, γ and β of a stem norm the converted model computes, stored as they are."""
        gamma, beta = self.norm_params(stem.norm)
        self.add(f"{stem.embedding}.weight", "embedding", inputs, [("identity", {})])
        for name in (gamma, beta):
            if name:
                self.add(name, "norm", {"x": self.key(name)}, [("identity", {})])
        self.centered_stems.append(stem.norm)
        self.stem_tables.append(stem.embedding)

    def _plan_stream_parameters(self) -> None:
        """Parameters whose last axis is the stream (ViT's cls_token, position_embeddings): centred
        like embedding rows."""
        compress = self._compressed("feature") if self.target == "crmsnorm" else []
        for template in self.spec.stream_parameters:
            for name in expand(template, self.L):
                self.add(name, "embedding", {"x": self.key(name)}, [("center_rows", {})] + compress)

    def _plan_writers(self) -> None:
        spec, L = self.spec, self.L
        compress = self.target == "crmsnorm"
        scales = {writer: scale for scale, writer in spec.layer_scale_pairs(L)}
        for template in spec.writers:
            for module in expand(template, L):
                layout = spec.layout_of(module)
                weight, bias = f"{module}.weight", f"{module}.bias"
                scale = scales.get(module)
                inputs, steps = {"weight": self.key(weight)}, []
                if scale is not None:  # docs/math.md "LayerScale": λ folded in, then written as ones
                    inputs["scale"] = self.key(scale)
                    steps.append(("scale_outputs", {"layout": layout}))
                steps += [("center_writer_weight", {"layout": layout})] + (self._compressed("output", layout) if compress else [])
                self.add(weight, "writer", inputs, steps)
                if self.has(bias):
                    inputs = {"x": self.key(bias)} if scale is None else {"x": self.key(bias), "scale": self.key(scale)}
                    steps = ([("scale_features", {})] if scale is not None else []) + [("center_vector", {})]
                    self.add(bias, "writer", inputs, steps + (self._compressed("feature") if compress else []))
                if scale is not None:
                    ones = [("ones", {"width": self.d})] + (self._compressed("feature") if compress else [])
                    self.add(scale, "writer", {}, ones, dtype_from=scale)

    def _plan_norms(self, tied: bool) -> None:
        compress = self.target == "crmsnorm"
        for group in self.spec.norms:
            for norm, readers in expand_group(group, self.L):
                gamma, beta = self.norm_params(norm)
                width = self.d - 1 if compress else self.d
                eps = self.spec.norm_module.epsilon(module_at(self.model, norm, self.spec))
                keeps_head = self.tie_kept and self.spec.head in readers
                # a head kept tied reads γ, β from its norm; a norm whose output is a model output keeps them
                fold = self.fold and not keeps_head and not group.output
                self.norms[norm] = {
                    "kind": self.target, "affine": not fold and gamma is not None, "bias": beta is not None, "width": width, "eps": eps,
                }
                if group.output:  # docs/math.md "Norms whose output leaves the model"
                    self.norms[norm]["output"] = True
                    readers = []  # they read the full-width, affine output, as in the original: copied as they are
                if not fold:
                    offset = self.spec.norm_module.weight_offset
                    if gamma:  # the norm computes with γ + weight_offset (docs/math.md "Norms")
                        self.add(gamma, "norm", {"x": self.key(gamma)}, [("add_offset", {"value": offset}) if offset else ("identity", {})])
                    if beta:
                        self.add(beta, "norm", {"x": self.key(beta)}, [("identity", {})])
                else:
                    self.done.update(p for p in (gamma, beta) if p)
                for reader in readers:
                    if keeps_head and reader == self.spec.head:
                        self._plan_kept_head()
                    else:
                        self._plan_reader(reader, gamma, beta, tied, fold)

    def _plan_head_outside_the_stream(self, untied: bool) -> None:
        """A head written untied that reads no stream norm (ESM's decoder reads its own head's norm):
        the original table, as it is."""
        spec = self.spec
        head = f"{spec.head}.weight"
        if untied and head not in self.done and spec.head_tied_to is not None:
            table = f"{spec.head_tied_to}.weight"
            self.add(head, "reader", {"x": self.key(table)}, [("identity", {})], dtype_from=table)

    def _plan_the_rest(self) -> None:
        """Every other stored parameter is copied; a parameter neither planned nor tied is missing,
        unless its module may be absent (spec may_be_absent) and the checkpoint stores none of it."""
        for name in list(self.params) + list(self.buffers):
            if name not in self.done and self.has(name):
                self.add(name, "other", {"x": self.key(name)}, [("identity", {})])
        for module in (path for template in self.spec.may_be_absent for path in expand(template, self.L)):
            own = [name for name in self.params if name.startswith(module + ".")]
            if own and not any(self.has(name) for name in own):
                self.not_stored.append(module)
                self.done.update(own)
        missing = [name for name in self.params if name not in self.done and name not in _tied_names(self.model)]
        if missing:
            raise CorruptCheckpointError(f"the checkpoint is missing tensor(s) {missing[:3]}; re-download it")

    def _plan_landing(self) -> Landing | None:
        """The spec's stock RMSNorm architecture, when this conversion lands in it exactly: target
        rmsnorm, its conditions hold on the config, and every converted norm ends without β with no
        reader gaining a bias (the stock RMSNorm has γ only). A norm without γ then gets γ = 1."""
        landing = self.spec.lands_in
        if landing is None or self.target != "rmsnorm" or not all_hold(landing.when, self.model.config):
            return None
        if self.biased or self.removed or any(norm["bias"] and not self.fold for norm in self.norms.values()):
            return None
        table = next(f"{module}.weight" for module in self.spec.embeddings)
        for norm, entry in self.norms.items():
            if not entry["affine"]:
                self.add(f"{norm}.weight", "norm", {}, [("ones", {"width": self.d})], dtype_from=table)
                entry.update(affine=True, bias=False)
        return landing

    def _assemble(self, tied: bool, head_stored_apart: bool, landing: Landing | None) -> ConversionPlan:
        dropped = [key for key in self.source.tensors if key not in {k for op in self.ops for k in op.inputs.values()}]
        stored_dtype = self.source.stored_dtype()
        resized = {
            op.name: list(op.shape)
            for op in self.ops
            if op.name in self.params and tuple(op.shape) != tuple(self.params[op.name].shape)
        }
        plan = ConversionPlan(
            spec=self.spec,
            target=self.target,
            fold_affine=self.fold,
            hidden_size=self.d,
            num_layers=self.L,
            ops=self._ordered(landing),
            dropped=dropped,
            untied_head=tied,
            centered_at_lookup=[self.spec.head_tied_to] if self.tie_kept and self.spec.head_tied_to not in self.stem_tables else [],
            centered_stems=self.centered_stems,
            not_stored=self.not_stored,
            stem_tables=self.stem_tables,
            head_stored_apart=head_stored_apart,
            norms=self.norms if landing is None else {landing.renamed(norm): entry for norm, entry in self.norms.items()},
            biased=self.biased,
            removed=self.removed,
            base_config_class=type(self.model.config).__name__,
            base_model_class=type(self.model).__name__,
            params_original=sum(numel(t.shape) for t in self.source.tensors.values() if t.name in set(self.stored.values())),
            source_dtype=stored_dtype,
            out_dtype=self.dtype or stored_dtype,
            resized=resized,
            pad_to=self.pad_to,
            stream_width=self.stream_width if self.target == "crmsnorm" else self.d,
            landing=landing,
            stream_entries=[view.entry.module for view in self.views if view.entry is not None],
        )
        if resized:
            check_resized_forward(self.model, plan)
        return plan

    def _read_table_from_a_head_stored_alone(self) -> None:
        """A tied config whose file stores the head but not the embedding table (safetensors'
        save_model keeps the name that sorts first): transformers fills the table from the head, so
        the table is read from the head's key, and the file is planned as if it stored the table."""
        head, table = f"{self.spec.head}.weight", f"{self.spec.head_tied_to}.weight"
        if self.spec.is_tied(self.settings) and self.has(head) and not self.has(table):
            self.stored[table] = self.stored.pop(head)

    def _head_is_table(self) -> bool:
        """Whether the original, as transformers loads it, computes its head from the embedding table
        (its config ties them): yes when the file stores the table alone, or both with equal values;
        a head stored with different values is kept apart, untied (transformers' tie_weights at
        load, with a warning)."""
        head, table = f"{self.spec.head}.weight", f"{self.spec.head_tied_to}.weight"
        return not (self.has(head) and self.has(table)) or self._stored_equal(self.key(head), self.key(table))

    def _stored_equal(self, first: str, second: str) -> bool:
        """Two stored matrices hold the same values (compared in row blocks: memory stays bounded)."""
        a, b = self.source.tensors[first], self.source.tensors[second]
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        rows = max(1, DEFAULT_BLOCK_BYTES // max(1, numel(a.shape[1:]) * element_size(a.dtype)))
        blocks = [(start, min(start + rows, a.shape[0])) for start in range(0, a.shape[0], rows)]
        return all(torch.equal(self.source.read_rows(first, *block), self.source.read_rows(second, *block)) for block in blocks)

    def _plan_kept_head(self) -> None:
        """A head kept tied is the stored table (transformers ties it at load); only a bias of its own is copied."""
        bias = f"{self.spec.head}.bias"
        if self.has(bias):
            self.add(bias, "reader", {"x": self.key(bias)}, [("identity", {})])

    def _plan_reader(self, reader: str, gamma: str | None, beta: str | None, tied: bool, fold: bool) -> None:
        spec = self.spec
        layout = spec.layout_of(reader)
        weight, bias = f"{reader}.weight", f"{reader}.bias"
        weight_key = self.key(spec.head_tied_to + ".weight") if (reader == spec.head and tied) else self.key(weight)
        dtype_from = spec.head_tied_to + ".weight" if (reader == spec.head and tied) else weight
        compress = self._compressed("input", layout) if self.target == "crmsnorm" else []
        if fold and gamma:
            offset = {"gamma_offset": self.spec.norm_module.weight_offset} if self.spec.norm_module.weight_offset else {}
            self.add(weight, "reader", {"weight": weight_key, "gamma": self.key(gamma)}, [("fold_gamma", {"layout": layout, **offset})] + compress, dtype_from)
        else:
            self.add(weight, "reader", {"x": weight_key}, [("identity", {})] + compress, dtype_from)
        if fold and beta and _nonzero(self.source.read(self.key(beta))):
            inputs = {"weight": weight_key, "beta": self.key(beta)}
            if self.has(bias):
                inputs["bias"] = self.key(bias)
            else:
                self.biased.append(reader)
            self.add(bias, "reader", inputs, [("fold_beta", {"layout": layout})], dtype_from)
        elif self.has(bias):
            self.add(bias, "reader", {"x": self.key(bias)}, [("identity", {})])

    def _compressed(self, axis: str, layout: str | None = None) -> list[tuple[str, dict]]:
        """Steps that take a tensor's stream axis from d to d-1 (docs/math.md "Pre-CRMSNorm"), then zero-pad it
        to the stored stream width when --pad-to asks for an aligned one."""
        compress, pad = {
            "feature": ("drop_last_feature", "zero_pad_feature"),
            "output": ("drop_last_output", "zero_pad_output"),
            "input": ("merge_last_input", "zero_pad_input"),
        }[axis]
        params = {} if layout is None else {"layout": layout}
        steps = [(compress, params)]
        if self.stream_width != self.d - 1:
            steps.append((pad, {**params, "width": self.stream_width}))
        return steps

    def _ordered(self, landing: Landing | None = None) -> list[TensorOp]:
        """Model parameter order (as save_pretrained writes), new tensors after their weight (a new
        weight before the first parameter named after it); under the landing's names, if any."""
        order = {name: i for i, name in enumerate(self.params)}

        def rank(op: TensorOp) -> tuple[int, int]:
            if op.name in order:
                return order[op.name], 0
            sibling = op.name.rsplit(".", 1)[0] + ".weight"
            if sibling in order:
                return order[sibling], 1
            return next((i for name, i in order.items() if name > op.name), len(order)), -1

        ops = sorted(self.ops, key=rank)
        return ops if landing is None else [replace(op, name=landing.renamed(op.name)) for op in ops]


def _tied_names(model) -> set[str]:
    """Parameters that share storage with an earlier one (the tied head)."""
    seen, tied = {}, set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        seen[id(param)] = name
    return tied


def _nonzero(tensor: torch.Tensor) -> bool:
    return bool(torch.any(tensor != 0))


def make_plan(
    source: SourceCheckpoint,
    spec: FamilySpec,
    target: str = "rmsnorm",
    fold_affine: bool = False,
    dtype: torch.dtype | None = None,
    pad_to: int | None = None,
    untie_head: bool = False,
) -> ConversionPlan:
    return _Planner(source, spec, target, fold_affine, dtype, pad_to, untie_head).plan()
