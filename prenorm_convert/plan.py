"""Spec + checkpoint -> the list of tensor operations a conversion performs.

The plan is pure data: ``inspect`` prints it, ``convert`` executes it. Names are those of the
instantiated transformers model (built on the meta device, so nothing is allocated), and the
model tree is checked against the spec before anything is planned.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from .checkpoint import SourceCheckpoint
from .errors import BadInputError, CorruptCheckpointError, SpecError, UnsupportedModelError, option
from .row_blocks import DEFAULT_BLOCK_BYTES
from .safetensors_io import DTYPES, element_size
from .spec import FamilySpec, expand, expand_group
from .transform import STEPS

TARGETS = ("rmsnorm", "crmsnorm")
# stored dtypes of parameters a conversion accepts (safetensors names): the rewrite runs in float64
# and rounds once into one of these; integer and float8 weights are quantized and refused
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
QUANT_CONFIG_KEYS = ("quantization_config", "compression_config")
DEQUANTIZE = (
    "dequantize it to float16/bfloat16/float32 first (e.g. load it with transformers, call model.dequantize() "
    "where its quantization method has one, and save_pretrained the result), or convert the unquantized original"
)
# stem-norm hooks a spec may name (MATH.md "norm on the main branch itself")
STEM_HOOKS = {"bake_layernorm"}


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

    @property
    def residual_width(self) -> int:
        """Width of the residual stream in the converted model (MATH.md "Pre-CRMSNorm": d-1)."""
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
        return sum(_numel(op.shape) * torch.empty((), dtype=op.dtype).element_size() for op in self.ops)

    @property
    def requires_remote_code(self) -> bool:
        """Only rmsnorm with the affine kept loads as the stock class (LN of a zero-mean x is RMSNorm)."""
        return self.target != "rmsnorm" or self.fold_affine or bool(self.removed) or bool(self.biased)


def _numel(shape) -> int:
    numel = 1
    for dim in shape:
        numel *= dim
    return numel


def check_not_quantized(config: dict) -> None:
    """A config.json that declares quantized weights (GPTQ, AWQ, bitsandbytes, fp8, compressed-tensors,
    ...) is refused before anything is read: those weights are not the float matrices the rewrite
    is exact for."""
    for key in QUANT_CONFIG_KEYS:
        block = config.get(key)
        if block is None:
            continue
        method = block.get("quant_method") or block.get("format") if isinstance(block, dict) else None
        if method is None and isinstance(block, dict) and (block.get("load_in_8bit") or block.get("load_in_4bit")):
            method = "bitsandbytes"
        method = " ".join(str(method or "unknown").split())[:40]
        raise UnsupportedModelError(
            f"config.json has a {key} block (quant_method {method}): the checkpoint is quantized, and "
            f"prenorm-convert rewrites float16/bfloat16/float32/float64 weights only; {DEQUANTIZE}"
        )


def _dtype_option(value: str) -> str:
    """--dtype VALUE as the caller spells it (the CLI's flag, or the Python keyword)."""
    return f"--dtype {value}" if option("--dtype").startswith("--") else f"dtype='{value}'"


def _dtype_word(name: str) -> str:
    """'I8' -> 'int8 (I8)': the torch name a user knows, and the safetensors one the file has."""
    return f"{str(DTYPES[name]).removeprefix('torch.')} ({name})" if name in DTYPES else name


def parse_dtype(name: str) -> torch.dtype | None:
    names = {"auto": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in names:
        raise BadInputError(f"--dtype must be one of {', '.join(names)}, got '{name}'")
    return names[name]


def build_meta_model(config: dict):
    """The stock transformers model for this config, on the meta device (no memory)."""
    import transformers

    try:
        config_object = transformers.AutoConfig.for_model(**config)
        with torch.device("meta"):
            return transformers.AutoModelForCausalLM.from_config(config_object)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInputError(f"transformers cannot build a model from this config.json ({reason}); fix or re-download it") from None


# -- structural checks ("Structural checks beat name lists", FAMILIES.md) ------------------------


def _module(model: nn.Module, path: str, spec: FamilySpec) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise UnsupportedModelError(
            f"{spec.source_file} names module '{path}', which the installed transformers' "
            f"{type(model).__name__} does not have; this transformers version is not supported for {spec.family}"
        ) from None


def _in_out(module: nn.Module) -> tuple[int, int] | None:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":
        return module.nx, module.nf
    return None


def _has_module(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:  # absent, or an attribute set to None (e.g. OPT's project_in)
        return False
    return True


def _check_linear(model, path, spec, d, reads: bool) -> nn.Module:
    module = _module(model, path, spec)
    dims = _in_out(module)
    layout = spec.layout_of(path)
    expected_type = "Linear" if layout == "linear" else "Conv1D"
    if dims is None or type(module).__name__ != expected_type or (dims[0] if reads else dims[1]) != d:
        raise UnsupportedModelError(
            f"{spec.source_file} declares '{path}' as a {expected_type} {'reading' if reads else 'writing'} the "
            f"{d}-wide residual stream, but the model has {module}; refusing to convert silently wrong"
        )
    return module


def check_structure(model: nn.Module, spec: FamilySpec, d: int, num_layers: int) -> None:
    for template in spec.embeddings:
        for path in expand(template, num_layers):
            module = _module(model, path, spec)
            if not isinstance(module, nn.Embedding) or module.embedding_dim != d:
                raise UnsupportedModelError(f"{spec.source_file}: '{path}' is not a {d}-wide embedding ({module})")
    norm_templates = [group.norm for group in spec.norms] + [stem.norm for stem in spec.stem_norms]
    for template in norm_templates:
        for path in expand(template, num_layers):
            module = _module(model, path, spec)
            if not isinstance(module, nn.LayerNorm) or tuple(module.normalized_shape) != (d,):
                raise UnsupportedModelError(
                    f"{spec.source_file}: '{path}' should be a LayerNorm over {d} features, found {module}"
                )
    for group in spec.norms:
        for template in group.readers:
            for path in expand(template, num_layers):
                _check_linear(model, path, spec, d, reads=True)
    for template in spec.writers:
        for path in expand(template, num_layers):
            _check_linear(model, path, spec, d, reads=False)
    for template in spec.switched_off_writers:
        for path in expand(template, num_layers):
            if _has_module(model, path):
                raise UnsupportedModelError(
                    f"the model has '{path}', which {spec.source_file} expects only under another config; "
                    "refusing to leave a writer of the residual stream unconverted"
                )
    # anything d-wide that embeds token ids writes the main branch: it must be declared (and centered)
    embeddings = {path for template in spec.embeddings for path in expand(template, num_layers)}
    stray = [name for name, module in model.named_modules() if isinstance(module, nn.Embedding) and module.embedding_dim == d and name not in embeddings]
    if stray:
        raise UnsupportedModelError(
            f"the model has {d}-wide embedding(s) {stray[:3]} that {spec.source_file} does not declare; "
            "refusing to leave a writer of the residual stream unconverted"
        )
    declared = {path for template in norm_templates for path in expand(template, num_layers)}
    stray = [name for name, module in model.named_modules() if isinstance(module, nn.LayerNorm) and name not in declared]
    if stray:
        raise UnsupportedModelError(
            f"the model has LayerNorm module(s) {stray[:3]} that {spec.source_file} does not describe; "
            "refusing to convert a structure the spec does not cover"
        )


# -- planning --------------------------------------------------------------------------------


class _Planner:
    def __init__(
        self, source: SourceCheckpoint, spec: FamilySpec, target: str, fold_affine: bool, dtype: torch.dtype | None, pad_to: int | None = None
    ):
        if target not in TARGETS:
            raise BadInputError(f"--target must be one of {', '.join(TARGETS)}, got '{target}'")
        if pad_to is not None and (target != "crmsnorm" or pad_to < 1):
            raise BadInputError(f"--pad-to needs --target crmsnorm and a positive multiple, got --target {target} --pad-to {pad_to}")
        self.pad_to = pad_to
        self.source, self.spec, self.target = source, spec, target
        self.fold = fold_affine or target == "crmsnorm"
        self.dtype = dtype
        check_not_quantized(source.config)
        model = build_meta_model(source.config)
        self.model = model
        # sizes and spec conditions read the parsed config: defaults filled in, legacy names
        # (e.g. BLOOM's n_embed) mapped by transformers
        self.spec = spec = spec.resolve(model.config)
        settings = model.config.to_dict()
        self.d = spec.hidden_size(settings)
        self.L = spec.num_layers(settings)
        # crmsnorm: d-1 features, stored zero-padded to a multiple of --pad-to if asked
        self.stream_width = -(-(self.d - 1) // (pad_to or 1)) * (pad_to or 1)
        if pad_to is not None and pad_to > self.d:
            raise BadInputError(
                f"--pad-to {pad_to} is larger than the hidden size {self.d}: the {self.d - 1} features would be stored "
                f"{self.stream_width} wide, wider than the original stream; pick a multiple of at most {self.d}, such as 8 or 64"
            )
        check_structure(model, spec, self.d, self.L)
        self.params = dict(model.named_parameters(remove_duplicate=False))
        self.stored = self._map_stored_keys()
        self._check_dtypes()
        self._check_shapes()
        self._read_table_from_a_head_stored_alone()
        self.ops: list[TensorOp] = []
        self.done: set[str] = set()
        self.norms: dict[str, dict] = {}
        self.biased: list[str] = []
        self.removed: list[str] = []

    # names -------------------------------------------------------------------------------
    def _map_stored_keys(self) -> dict[str, str]:
        """canonical parameter name -> stored key; reject anything the spec cannot place."""
        known = set(self.params)
        ignored = {name for pattern in self.spec.ignore for name in expand(pattern, self.L)}
        mapping, unknown = {}, []
        for stored in self.source.tensors:
            canonical = self.spec.canonical_key(stored, known | ignored)
            if canonical in known:
                mapping[canonical] = stored
            elif canonical not in ignored:
                unknown.append(stored)
        if unknown:
            quantized = sorted({self.source.tensors[key].dtype for key in unknown} - set(FLOAT_DTYPES))
            hint = (
                f" (some are stored as {', '.join(quantized)}: a quantized checkpoint? {DEQUANTIZE})" if quantized else ""
            )
            raise UnsupportedModelError(
                f"the checkpoint holds tensor(s) {unknown[:3]}{' …' if len(unknown) > 3 else ''} that a "
                f"{self.spec.family} model built from its config.json does not have; config and weights disagree{hint}"
            )
        return mapping

    def _check_dtypes(self) -> None:
        """Every tensor planned as a parameter (read, rewritten or copied) is floating point of a
        dtype the float64 rewrite can round back into; buffers the plan drops (GPT-2's bool attn.bias
        masks) are not parameters and are not looked at. With --dtype auto (keep the stored dtype),
        the parameters must share one dtype: a converted checkpoint has one."""
        params = [self.source.tensors[key] for key in self.stored.values()]
        odd = [info for info in params if info.dtype not in FLOAT_DTYPES]
        if odd:
            first = odd[0]
            more = f" (and {len(odd) - 1} more)" if len(odd) > 1 else ""
            raise UnsupportedModelError(
                f"tensor '{first.name}'{more} is stored as {_dtype_word(first.dtype)}, and prenorm-convert rewrites "
                f"float16/bfloat16/float32/float64 weights only (integer and float8 weights are quantized: rewriting them "
                f"would round the result to garbage); {DEQUANTIZE}"
            )
        counts = Counter(info.dtype for info in params)
        if self.dtype is None and len(counts) > 1:
            listed = ", ".join(f"{_dtype_word(name)}: {count}" for name, count in counts.most_common())
            raise BadInputError(
                f"the checkpoint stores its parameters in more than one dtype ({listed} tensors), and --dtype auto keeps "
                f"the stored dtype, which must then be one; pass {_dtype_option('float32')} (exact: every tensor widened), "
                f"or {_dtype_option('bfloat16')} / {_dtype_option('float16')} to store every tensor in that dtype"
            )

    def _check_shapes(self) -> None:
        """Every stored tensor has the shape the model built from config.json gives its parameter."""
        for canonical, stored in self.stored.items():
            expected, found = tuple(self.params[canonical].shape), tuple(self.source.tensors[stored].shape)
            if expected != found:
                raise CorruptCheckpointError(
                    f"config.json and the weights disagree: '{stored}' is {list(found)} in the file, but a "
                    f"{self.spec.family} model built from config.json has {list(expected)}; "
                    "the config belongs to another checkpoint (fix or re-download it)"
                )

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
        shape = _infer_shape(shapes, steps)
        stored = self.stored_dtype(dtype_from or name)
        out_dtype = self.dtype if (self.dtype is not None and stored.is_floating_point) else stored
        if name in self.done:
            raise SpecError(f"{self.spec.source_file} gives '{name}' more than one role")
        self.ops.append(TensorOp(name, role, dict(inputs), tuple(steps), shape, out_dtype))
        self.done.add(name)

    def norm_params(self, norm: str) -> tuple[str | None, str | None]:
        weight, bias = f"{norm}.weight", f"{norm}.bias"
        return (weight if self.has(weight) else None), (bias if self.has(bias) else None)

    def plan(self) -> ConversionPlan:
        spec, L = self.spec, self.L
        # A tied head is computed from the embedding (when transformers ties them: _head_is_table):
        # the head reads the embedding's key and is written untied. It is untied only if the
        # conversion rewrites the shared table or the head (MATH.md "Tied embeddings"); OPT with
        # project_in keeps both embed_tokens and the head, and their tie.
        rewritten = {m for t in spec.embeddings for m in expand(t, L)} | {
            reader for group in spec.norms for _, readers in expand_group(group, L) for reader in readers
        }
        config_tied = spec.is_tied(self.source.config)
        head_is_table = config_tied and self._head_is_table()
        tied = head_is_table and bool({spec.head, spec.head_tied_to} & rewritten)
        head_stored_apart = config_tied and not head_is_table
        stem_embeddings = {stem.embedding: stem for stem in spec.stem_norms}
        compress = self.target == "crmsnorm"

        for template in spec.embeddings:
            for module in expand(template, L):
                name = f"{module}.weight"
                steps: list[tuple[str, dict]] = []
                inputs = {"x": self.key(name)}
                if module in stem_embeddings:
                    stem = stem_embeddings[module]
                    gamma, beta = self.norm_params(stem.norm)
                    inputs = {"table": self.key(name), "gamma": self.key(gamma), "beta": self.key(beta)}
                    steps.append((stem.hook, {"eps": float(_module(self.model, stem.norm, spec).eps)}))
                    self.removed.append(stem.norm)
                    self.done.update({gamma, beta})
                steps.append(("center_rows", {}))
                if compress:
                    steps += self._compressed("feature")
                self.add(name, "embedding", inputs, steps)

        for template in spec.writers:
            for module in expand(template, L):
                layout = spec.layout_of(module)
                weight, bias = f"{module}.weight", f"{module}.bias"
                steps = [("center_writer_weight", {"layout": layout})] + (self._compressed("output", layout) if compress else [])
                self.add(weight, "writer", {"weight": self.key(weight)}, steps)
                if self.has(bias):
                    steps = [("center_vector", {})] + (self._compressed("feature") if compress else [])
                    self.add(bias, "writer", {"x": self.key(bias)}, steps)

        for group in spec.norms:
            for norm, readers in expand_group(group, L):
                gamma, beta = self.norm_params(norm)
                width = self.d - 1 if compress else self.d
                self.norms[norm] = {"kind": self.target, "affine": not self.fold and gamma is not None, "bias": beta is not None, "width": width}
                if not self.fold:
                    for param in (gamma, beta):
                        if param:
                            self.add(param, "norm", {"x": self.key(param)}, [("identity", {})])
                else:
                    self.done.update(p for p in (gamma, beta) if p)
                for reader in readers:
                    self._plan_reader(reader, gamma, beta, tied)

        for name in self.params:
            if name not in self.done and self.has(name):
                self.add(name, "other", {"x": self.key(name)}, [("identity", {})])
        missing = [name for name in self.params if name not in self.done and name not in _tied_names(self.model)]
        if missing:
            raise CorruptCheckpointError(f"the checkpoint is missing tensor(s) {missing[:3]}; re-download it")

        dropped = [key for key in self.source.tensors if key not in {k for op in self.ops for k in op.inputs.values()}]
        stored_dtype = self.source.stored_dtype()
        resized = {
            op.name: list(op.shape)
            for op in self.ops
            if op.name in self.params and tuple(op.shape) != tuple(self.params[op.name].shape)
        }
        plan = ConversionPlan(
            spec=spec,
            target=self.target,
            fold_affine=self.fold,
            hidden_size=self.d,
            num_layers=L,
            ops=self._ordered(),
            dropped=dropped,
            untied_head=tied,
            head_stored_apart=head_stored_apart,
            norms=self.norms,
            biased=self.biased,
            removed=self.removed,
            base_config_class=type(self.model.config).__name__,
            base_model_class=type(self.model).__name__,
            params_original=sum(_numel(t.shape) for t in self.source.tensors.values() if t.name in set(self.stored.values())),
            source_dtype=stored_dtype,
            out_dtype=self.dtype or stored_dtype,
            resized=resized,
            pad_to=self.pad_to,
            stream_width=self.stream_width if self.target == "crmsnorm" else self.d,
        )
        if resized:
            check_resized_forward(self.model, plan)
        return plan

    def _read_table_from_a_head_stored_alone(self) -> None:
        """A tied config whose file stores the head but not the embedding table (safetensors'
        save_model keeps the name that sorts first): transformers fills the table from the head, so
        the table is read from the head's key, and the file is planned as if it stored the table."""
        head, table = f"{self.spec.head}.weight", f"{self.spec.head_tied_to}.weight"
        if self.spec.is_tied(self.source.config) and self.has(head) and not self.has(table):
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
        rows = max(1, DEFAULT_BLOCK_BYTES // max(1, _numel(a.shape[1:]) * element_size(a.dtype)))
        blocks = [(start, min(start + rows, a.shape[0])) for start in range(0, a.shape[0], rows)]
        return all(torch.equal(self.source.read_rows(first, *block), self.source.read_rows(second, *block)) for block in blocks)

    def _plan_reader(self, reader: str, gamma: str | None, beta: str | None, tied: bool) -> None:
        spec = self.spec
        layout = spec.layout_of(reader)
        weight, bias = f"{reader}.weight", f"{reader}.bias"
        weight_key = self.key(spec.head_tied_to + ".weight") if (reader == spec.head and tied) else self.key(weight)
        dtype_from = spec.head_tied_to + ".weight" if (reader == spec.head and tied) else weight
        compress = self._compressed("input", layout) if self.target == "crmsnorm" else []
        if self.fold and gamma:
            self.add(weight, "reader", {"weight": weight_key, "gamma": self.key(gamma)}, [("fold_gamma", {"layout": layout})] + compress, dtype_from)
        else:
            self.add(weight, "reader", {"x": weight_key}, [("identity", {})] + compress, dtype_from)
        if self.fold and beta and _nonzero(self.source.read(self.key(beta))):
            inputs = {"weight": weight_key, "beta": self.key(beta)}
            if self.has(bias):
                inputs["bias"] = self.key(bias)
            else:
                self.biased.append(reader)
            self.add(bias, "reader", inputs, [("fold_beta", {"layout": layout})], dtype_from)
        elif self.has(bias):
            self.add(bias, "reader", {"x": self.key(bias)}, [("identity", {})])

    def _compressed(self, axis: str, layout: str | None = None) -> list[tuple[str, dict]]:
        """Steps that take a tensor's stream axis from d to d-1 (MATH.md "Pre-CRMSNorm"), then zero-pad it
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

    def _ordered(self) -> list[TensorOp]:
        """Model parameter order (as save_pretrained writes), new tensors after their weight."""
        order = {name: i for i, name in enumerate(self.params)}

        def rank(op: TensorOp) -> tuple[int, int]:
            if op.name in order:
                return order[op.name], 0
            return order[op.name.rsplit(".", 1)[0] + ".weight"], 1

        return sorted(self.ops, key=rank)


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


def _infer_shape(shapes: dict[str, tuple[int, ...]], steps) -> tuple[int, ...]:
    """Run the steps on meta tensors to learn the output shape without touching data."""
    value = None
    for index, (name, params) in enumerate(steps):
        if index == 0:
            value = STEPS[name](**{arg: torch.empty(shape, device="meta", dtype=torch.float64) for arg, shape in shapes.items()}, **params)
        else:
            value = STEPS[name](value, **params)
    return tuple(value.shape)


def make_plan(
    source: SourceCheckpoint,
    spec: FamilySpec,
    target: str = "rmsnorm",
    fold_affine: bool = False,
    dtype: torch.dtype | None = None,
    pad_to: int | None = None,
) -> ConversionPlan:
    return _Planner(source, spec, target, fold_affine, dtype, pad_to).plan()


def swaps_block(plan: ConversionPlan) -> dict:
    """The part of config.prenorm that the remote code (modeling.apply_prenorm_swaps) rebuilds from."""
    return {
        "target": plan.target,
        "hidden_size": plan.hidden_size,
        "residual_width": plan.residual_width,
        "stream_width": plan.stream_width,
        "norms": plan.norms,
        "biased": plan.biased,
        "removed": plan.removed,
        "resized": plan.resized,
    }


def check_resized_forward(model: nn.Module, plan: ConversionPlan) -> None:
    """Run one forward pass of the resized architecture with fake tensors (no memory, no data).

    The family's transformers code may assume somewhere that the residual width equals hidden_size
    (e.g. an accumulator made with ``zeros_like`` of a hidden_size-wide tensor); a shape error here
    refuses the conversion up front instead of writing a checkpoint that cannot run. The stock model
    runs first: if even it cannot run with fake tensors, nothing can be learned and the check is skipped.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .modeling import apply_prenorm_swaps

    def forward() -> None:
        fake_tensor_log = logging.getLogger("torch._subclasses.fake_tensor")  # logs every failed op at ERROR
        level = fake_tensor_log.level
        fake_tensor_log.setLevel(logging.CRITICAL)
        try:
            with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
                model(input_ids=torch.zeros((1, 3), dtype=torch.long, device="meta"), use_cache=False)
        finally:
            fake_tensor_log.setLevel(level)

    try:
        forward()
    except Exception:  # noqa: BLE001 - the stock model is not traceable this way; nothing to compare
        return
    with torch.device("meta"):
        apply_prenorm_swaps(model, swaps_block(plan))
    try:
        forward()
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModelError(
            f"the {plan.target} target cannot run this {plan.spec.family} checkpoint: the installed transformers' "
            f"{plan.base_model_class} assumes a {plan.hidden_size}-wide residual stream somewhere ({first_line}); "
            "use --target rmsnorm, which keeps the width"
        ) from None
