"""Which stored dtypes a conversion accepts, and the --dtype option.

The rewrite runs in float64 and rounds once into a float dtype (docs/math.md "Numerics"); integer and
float8 weights are quantized, and a checkpoint whose config declares quantization is refused
before anything is read.
"""

from __future__ import annotations

from collections import Counter

import torch

from .errors import BadInputError, UnsupportedModelError, option
from .safetensors_io import DTYPES

# stored dtypes of parameters a conversion accepts (safetensors names): the rewrite runs in float64
# and rounds once into one of these; integer and float8 weights are quantized and refused
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
QUANT_CONFIG_KEYS = ("quantization_config", "compression_config")
DEQUANTIZE = (
    "dequantize it to float16/bfloat16/float32 first (e.g. load it with transformers, call model.dequantize() "
    "where its quantization method has one, and save_pretrained the result), or convert the unquantized original"
)


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


def quantized_hint(dtypes) -> str:
    """For tensors the model does not have: a hint when some are stored in a non-float dtype."""
    quantized = sorted(set(dtypes) - set(FLOAT_DTYPES))
    return f" (some are stored as {', '.join(quantized)}: a quantized checkpoint? {DEQUANTIZE})" if quantized else ""


def check_float_dtypes(params: list, dtype: torch.dtype | None) -> None:
    """Every tensor planned as a parameter (read, rewritten or copied; ``params`` are their stored
    infos) is floating point of a dtype the float64 rewrite can round back into; buffers the plan
    drops (GPT-2's bool attn.bias masks) are not parameters and are not looked at. With --dtype
    auto (``dtype`` None: keep the stored dtype), the parameters must share one dtype: a converted
    checkpoint has one."""
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
    if dtype is None and len(counts) > 1:
        listed = ", ".join(f"{_dtype_word(name)}: {count}" for name, count in counts.most_common())
        raise BadInputError(
            f"the checkpoint stores its parameters in more than one dtype ({listed} tensors), and --dtype auto keeps "
            f"the stored dtype, which must then be one; pass {_dtype_option('float32')} (exact: every tensor widened), "
            f"or {_dtype_option('bfloat16')} / {_dtype_option('float16')} to store every tensor in that dtype"
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
