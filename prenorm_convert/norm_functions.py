"""The norm functions of checkpoints written by prenorm-convert: RMSNorm and CRMSNorm on the
fastest exact path torch offers, eager or (opt-in, PRENORM_COMPILE=1) compiled on the CPU.

Copied into every converted folder that needs remote code as ``norm_functions.py``, beside
``modeling_prenorm.py`` (this package's modeling.py), which imports it; transformers copies it with
the modeling code. It imports only torch and the standard library.
"""

from __future__ import annotations

import hashlib
import logging
import os
import types
import warnings

import torch
from torch import nn


def rms_norm(hidden_states: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """γ ⊙ x / sqrt(mean(x²) + ε) + β over the last axis, on the fastest exact path torch offers.

    Never LayerNorm's kernel, although LN(x) = RMSNorm(x) on the zero-mean stream a conversion
    writes (docs/math.md "Why it is exact"): in bf16/fp16 the stream is zero-mean only to the dtype's
    rounding (docs/math.md "Numerics"), and a fine-tuned, rotated or steered model has no zero-mean
    stream at all, where the LN kernel would silently compute another function than RMSNorm.

    On CUDA (and other accelerators) torch's ``rms_norm`` is one fused kernel. On CPU it is a
    composite that makes several full-size temporaries (docs/performance.md); here instead: one
    float32 copy of a bf16/fp16 input (none for float32), one reduction, two calls on one value per
    row (``row_scale``), then the scale and γ, β applied in place on that copy, and one rounding
    back to the input's dtype, as LayerNorm's kernel rounds once. Out of place when autograd
    records, which cannot differentiate in-place writes of this kind. Every call costs a few
    microseconds inside a model, so the per-row work is kept to the fewest calls. With
    PRENORM_COMPILE=1, large bf16/fp16 inputs, and float32 ones while autograd records, take the
    same function compiled (``_rms_kernel``; ``_compiled_mode`` says when): one generated kernel
    that reads each row twice (its sum of squares, then the result) and makes no float32 copy.
    """
    if hidden_states.device.type != "cpu":
        out = nn.functional.rms_norm(hidden_states, (hidden_states.shape[-1],), weight, eps)
        return out if bias is None else out + bias
    mode = _compiled_mode(hidden_states, weight, bias)
    if mode is not None:
        out = _run_compiled(mode, _rms_kernel, hidden_states, weight, bias, _epsilon(eps, hidden_states))
        if out is not None:
            return out
    work, owned = compute_copy(hidden_states)
    in_place = not _recording(hidden_states, weight, bias)
    out = scale_rows(work, row_scale(work, eps, work.shape[-1]), in_place and owned)
    if weight is not None or bias is not None:
        out = affine(out, weight, bias, in_place)  # out is a fresh tensor here
    return out if out.dtype == hidden_states.dtype else out.to(hidden_states.dtype)


def crms_norm(hidden_states: torch.Tensor, full_width: int, eps: float) -> torch.Tensor:
    """x̃ / sqrt((Σ x̃² + (Σ x̃)²) / d + ε) over the last axis, d = ``full_width`` (docs/math.md
    "Pre-CRMSNorm"). As rms_norm: float32 work for bf16/fp16, two reductions (the row's sum and
    norm), one rounding at the end. Zero-padded features (--pad-to) add nothing to either sum and
    stay zero: d is given, never the tensor's width."""
    mode = _compiled_mode(hidden_states)
    if mode is not None:
        inverse_width = _epsilon(1 / full_width, hidden_states)
        out = _run_compiled(mode, _crms_kernel, hidden_states, _epsilon(eps, hidden_states), inverse_width)
        if out is not None:
            return out
    work, owned = compute_copy(hidden_states)
    scale = row_scale(work, eps, full_width, work.sum(-1, keepdim=True))
    out = scale_rows(work, scale, owned and not _recording(hidden_states))
    return out if out.dtype == hidden_states.dtype else out.to(hidden_states.dtype)


def compute_copy(hidden_states: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """x in float32 (float64 stays float64), and whether that is a fresh copy that may be
    overwritten. Statistics of a bf16/fp16 row must be float32: rounding the row norm or the scale
    to bf16 scales the whole row by the same error, and measured, it raised the converted bf16
    models' mean logit error by 20-70% (docs/performance.md)."""
    dtype = torch.promote_types(hidden_states.dtype, torch.float32)
    return (hidden_states, False) if hidden_states.dtype == dtype else (hidden_states.to(dtype), True)


def row_scale(work: torch.Tensor, eps: float, width: int, row_sum: torch.Tensor | None = None) -> torch.Tensor:
    """1 / sqrt((‖x‖² + row_sum²) / width + ε) per row (keepdim), from one reduction and two calls
    on one value per row. A CRMSNorm passes the sum of its row (docs/math.md "Pre-CRMSNorm")."""
    norm = torch.linalg.vector_norm(work, dim=-1, keepdim=True)
    scale = torch.addcmul(_epsilon(eps, norm), norm, norm, value=1 / width)
    if row_sum is not None:
        scale = scale.addcmul_(row_sum, row_sum, value=1 / width)
    return scale.rsqrt_()


def scale_rows(work: torch.Tensor, scale: torch.Tensor, in_place: bool) -> torch.Tensor:
    return work.mul_(scale) if in_place else work * scale


def affine(out: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, in_place: bool) -> torch.Tensor:
    """γ ⊙ out + β by one fused op (γ, β in the model's dtype, promoted to out's)."""
    if weight is None:
        return out.add_(bias) if in_place else out + bias
    if bias is None:
        return out.mul_(weight) if in_place else out * weight
    return torch.addcmul(bias, out, weight, out=out) if in_place else torch.addcmul(bias, out, weight)


def _recording(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


_EPSILONS: dict = {}


def _epsilon(eps: float, like: torch.Tensor) -> torch.Tensor:
    """ε (or another constant, CRMSNorm's 1/d) as a one-element tensor of float32 or wider (a 0-d
    tensor would not lift bf16 statistics to float32), made once per value, dtype and device; fake
    or traced tensors get a fresh one."""
    dtype = torch.promote_types(like.dtype, torch.float32)
    if type(like) is not torch.Tensor:
        return torch.full((1,), eps, dtype=dtype, device=like.device)
    key = (eps, dtype, like.device)
    cached = _EPSILONS.get(key)
    if cached is None:
        with torch.inference_mode(False), torch.no_grad():
            cached = _EPSILONS[key] = torch.full((1,), eps, dtype=dtype, device=like.device)
    return cached


# -- compiled CPU norms (docs/performance.md "Compiled CPU norms") --------------------------------

# Which calls take a compiled kernel (``_compiled_mode``), once PRENORM_COMPILE=1 turns the
# compiled norms on (off by default: docs/performance.md "Compiled CPU norms" says why):
# bf16/fp16 CPU inputs of at least INFERENCE_MIN_ELEMENTS run an AOTInductor package (inductor's
# code compiled ahead of time: its call costs a fraction of torch.compile's); while autograd
# records, inputs of at least COMPILE_MIN_ELEMENTS in these dtypes and float32 run torch.compile
# (differentiable). Everything else, and every call when the switch is off, runs eager.
COMPILED_DTYPES = (torch.bfloat16, torch.float16)
COMPILED_TRAINING_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
INFERENCE_MIN_ELEMENTS = 1 << 16
COMPILE_MIN_ELEMENTS = 1 << 17
_COMPILE = {"on": os.environ.get("PRENORM_COMPILE", "0").strip().lower() in ("1", "true", "yes", "on")}
_COMPILED: dict = {}
_LOG = logging.getLogger("prenorm_convert.modeling")


def _rms_kernel(x, weight, bias, eps):
    """rms_norm's function for the compilers: float32 (or wider) statistics and γ, β, one rounding."""
    work = x.to(torch.promote_types(x.dtype, torch.float32))
    out = work * torch.rsqrt(work.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out.to(x.dtype)


def _crms_kernel(x, eps, inverse_width):
    """PrenormCRMSNorm's function for the compilers (docs/math.md "Pre-CRMSNorm"), 1/d given."""
    work = x.to(torch.promote_types(x.dtype, torch.float32))
    total = work.sum(-1, keepdim=True)
    scale = torch.rsqrt((work.square().sum(-1, keepdim=True) + total * total) * inverse_width + eps)
    return (work * scale).to(x.dtype)


def _compiled_mode(hidden_states: torch.Tensor, *params: torch.Tensor | None) -> str | None:
    """"train" (torch.compile), "infer" (AOTInductor) or None (eager) for one norm call; never
    under fake tensors, tracing or an outer torch.compile (which traces the eager path itself)."""
    if not _COMPILE["on"] or type(hidden_states) is not torch.Tensor or hidden_states.device.type != "cpu":
        return None
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._functorch.is_functorch_wrapped_tensor(hidden_states):
        return None
    if hidden_states.dim() < 2 or hidden_states.shape[-1] < 2 or hidden_states.numel() < 2 * hidden_states.shape[-1]:
        return None  # the compiled code is made for two rows or more, of two features or more
    size, dtype = hidden_states.numel(), hidden_states.dtype
    if _recording(hidden_states, *params):
        return "train" if dtype in COMPILED_TRAINING_DTYPES and size >= COMPILE_MIN_ELEMENTS else None
    return "infer" if dtype in COMPILED_DTYPES and size >= INFERENCE_MIN_ELEMENTS else None


def _run_compiled(mode: str, kernel, hidden_states: torch.Tensor, *args) -> torch.Tensor | None:
    """kernel over the rows of hidden_states, compiled once per process for each mode, dtype and
    pattern of absent arguments, with dynamic rows and width (no recompiles across batch and
    sequence lengths). None where the eager path must run: arguments the compiled code was not
    made for, or compiling or running failed (then one log line, and the eager path from then on)."""
    key = (mode, kernel.__name__, hidden_states.dtype) + tuple(arg if arg is None else arg.dtype for arg in args)
    # the rows as a tensor of their own, not a view: torch.compile would guard on the sizes of a
    # view's base, and recompile for a batch or a sequence of one
    rows = torch.ops.aten._unsafe_view(hidden_states.contiguous(), (-1, hidden_states.shape[-1]))
    width = rows.shape[1]
    if not all(arg is None or (arg.device.type == "cpu" and arg.shape in ((width,), (1,))) for arg in args):
        return None  # the eager path reports the caller's mistake; compiling stays on
    try:
        compiled = _COMPILED.get(key) or _COMPILED.setdefault(key, _compile(mode, kernel, rows, args))
        out = compiled(rows, *args)
        return None if out is None else out.view(hidden_states.shape)
    except Exception as error:  # no C++ compiler, an inductor failure, an unsupported torch
        _COMPILE["on"] = False
        reason = (str(error).strip().splitlines() or [""])[0]
        _LOG.warning("compiled CPU norms unavailable, using the eager ones (%s: %s)", type(error).__name__, reason)
        return None


def _compile(mode: str, kernel, rows: torch.Tensor, args: tuple):
    if mode == "infer":
        return _aot_compiled(kernel, (rows,) + args)
    # torch caches compiled graphs per code object, and recompiles each only a few times: each
    # dtype and pattern of absent arguments gets a fresh copy of the kernel
    code = kernel.__code__.replace(co_name=f"{kernel.__name__}_{len(_COMPILED)}")
    return torch.compile(types.FunctionType(code, kernel.__globals__, code.co_name), dynamic=True, fullgraph=True)


class _Kernel(nn.Module):
    """A kernel as torch.export takes it: the tensors given, None where ``present`` says so."""

    def __init__(self, kernel, present: tuple[bool, ...]):
        super().__init__()
        self.kernel, self.present = kernel, present

    def forward(self, *tensors):
        given = iter(tensors)
        return self.kernel(*(next(given) if here else None for here in self.present))


def _aot_compiled(kernel, example: tuple):
    """kernel exported with dynamic rows and width and compiled by AOTInductor into a package in
    inductor's cache directory, named by everything the generated code depends on: compiled once
    per machine, loaded in milliseconds by every later process."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    present = tuple(arg is not None for arg in example)
    tensors = tuple(arg.clone() for arg in example if arg is not None)  # distinct: export merges aliases
    code = kernel.__code__
    identity = (code.co_code, code.co_consts, code.co_names, present, [str(t.dtype) for t in tensors])
    identity += (torch.__version__, torch.backends.cpu.get_cpu_capability())
    path = os.path.join(cache_dir(), "prenorm", f"{kernel.__name__}-{hashlib.sha256(repr(identity).encode()).hexdigest()[:24]}.pt2")
    if not os.path.exists(path):
        rows, width = torch.export.Dim("rows", min=2), torch.export.Dim("width", min=2)
        shapes = [{0: rows, 1: width}] + [{0: width} if t.dim() == 1 and t.shape[0] > 1 else None for t in tensors[1:]]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        partial = f"{path[:-4]}.{os.getpid()}.pt2"
        with warnings.catch_warnings():  # torch's own deprecation notices, not the user's concern
            warnings.simplefilter("ignore", FutureWarning)
            exported = torch.export.export(_Kernel(kernel, present), tensors, dynamic_shapes=(tuple(shapes),))
            torch._inductor.aoti_compile_and_package(exported, package_path=partial)
        os.replace(partial, path)
    run = torch._inductor.aoti_load_package(path).loader.run
    wide = tuple(tensor.shape[0] > 1 for tensor in tensors[1:])
    return lambda *args: _run_checked(run, wide, [arg.contiguous() for arg in args if arg is not None])


def _run_checked(run, wide: tuple[bool, ...], tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """AOTInductor's code checks none of its inputs (the package is made for contiguous CPU tensors
    of its dtypes, which the key of _COMPILED holds): None (the eager path) unless every further
    argument is a CPU vector as wide as a row (``wide``) or of one element."""
    width = tensors[0].shape[1]
    if width < 2 or tensors[0].shape[0] < 2:
        return None
    for tensor, is_wide in zip(tensors[1:], wide):
        if tensor.device.type != "cpu" or tensor.shape != ((width,) if is_wide else (1,)):
            return None
    return run(tensors)[0]
