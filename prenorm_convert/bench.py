"""Speed of a converted model next to its original: prefill latency, decode throughput, a training step.

Three variants run in one process on the same inputs:

- ``original``: the Pre-LN checkpoint as transformers loads it;
- ``converted``: the folder written by prenorm-convert, loaded with its own remote code
  (``verification.load_converted``), so the norms are the shipped ``PrenormRMSNorm``/``CRMSNorm``;
- ``norm_free``: the original with every LayerNorm replaced by identity — a lower bound that no
  normalization can beat (it computes a different function; it is only a clock);
- ``converted_compiled`` (only when asked, ``compiled_norms``): the converted model again, with its
  remote code's compiled CPU norms switched on while it runs (PRENORM_COMPILE=1; docs/performance.md
  "Compiled CPU norms"), so compiled and eager norms are compared in the same interleaved rounds.

Machines drift (frequency, other processes), so the variants are interleaved: every round times
each variant once, in an order that rotates from round to round. The report gives, per variant,
the minimum and the median, and per comparison the ratio of the minimums and the median of the
per-round ratios (each round's times are taken moments apart, so drift cancels in them).

On a busy machine the end-to-end ratios scatter by a few percent, more than the norms cost. So
the time spent inside the norms is also measured on its own (hooks around each norm module, at
the largest prefill shape), and converted/original is estimated from it: the two models run the
same operations but for the norms.
"""

from __future__ import annotations

import inspect
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from .checkpoint import check_path_encoding
from .errors import BadInputError
from .devices import placement, resolve_device
from .model_io import compared_output, fixed_positions, forward_feed
from .streaming import input_device
from .progress import SILENT, Reporter
from .verification import check_pair

VARIANTS = ("original", "converted", "norm_free")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BenchSettings:
    """What to measure. Prefill runs over every (batch, sequence) pair; the training step (forward +
    backward of the language-modelling loss) uses the largest pair."""

    batch_sizes: tuple[int, ...] = (1, 8)
    seq_lens: tuple[int, ...] = (32, 128)
    rounds: int = 5
    decode_tokens: int = 32
    decode_prompt: int = 32
    decode_batch: int = 1
    train: bool = False
    compiled_norms: bool = False
    seed: int = 0


# -- models -------------------------------------------------------------------------------------


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


class NormFree:
    """Swaps every LayerNorm of a model for identity while active, and back afterwards.

    The norm-free variant shares the original's weights (no second copy in memory)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.norms = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.LayerNorm)]

    @contextmanager
    def active(self) -> Iterator[nn.Module]:
        for name, _ in self.norms:
            _set_submodule(self.model, name, nn.Identity())
        try:
            yield self.model
        finally:
            for name, module in self.norms:
                _set_submodule(self.model, name, module)


@dataclass
class Variant:
    name: str
    model: nn.Module
    context: Callable[[], object]  # entered around each timed call (untimed)


class CompiledNorms:
    """Switches the compiled CPU norms of a converted model's remote code on while active.

    The switch is the ``_COMPILE`` dict of the module that defines the norm functions of the
    model's remote code (the folder's norm_functions.py, as transformers loaded it beside
    modeling_prenorm.py; the modeling file itself in folders written before that split)."""

    def __init__(self, model: nn.Module):
        block = model.config.prenorm
        norms = [model.get_submodule(path) for path in block["norms"]]
        remote = sys.modules[type(norms[0]).__module__] if norms else None
        functions = getattr(remote, "rms_norm", None)
        self.switch = getattr(sys.modules.get(getattr(functions, "__module__", "")), "_COMPILE", None)
        if self.switch is None:
            raise BadInputError("the converted folder's remote code has no compiled norms (written by an older prenorm-convert?)")

    @contextmanager
    def active(self) -> Iterator[None]:
        before = self.switch["on"]
        self.switch["on"] = True
        try:
            yield
        finally:
            self.switch["on"] = before


def load_variants(
    original: str | Path, converted: str | Path, dtype: torch.dtype, device: torch.device, placed: dict, compiled_norms: bool = False
) -> list[Variant]:
    """The three variants (four with ``compiled_norms``), on ``device``, or spread by accelerate
    (``placed``: devices.placement's keywords, when a device map was asked for)."""
    from .verification import load_converted, load_original

    def put(model):
        return model if placed else model.to(device)

    original_model = put(load_original(original, dtype, **placed))
    norm_free = NormFree(original_model)
    if not norm_free.norms:
        raise BadInputError(f"'{original}' has no LayerNorm modules; is it the original Pre-LN checkpoint?")
    converted_model = put(load_converted(converted, dtype=dtype, **placed))
    variants = [
        Variant("original", original_model, nullcontext),
        Variant("converted", converted_model, nullcontext),
        Variant("norm_free", original_model, norm_free.active),
    ]
    if compiled_norms:
        variants.append(Variant("converted_compiled", converted_model, CompiledNorms(converted_model).active))
    return variants


# -- timing -------------------------------------------------------------------------------------


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":  # every GPU: a device map may spread the model over several
        for index in range(torch.cuda.device_count()):
            torch.cuda.synchronize(index)


def _cache_keyword(model: nn.Module) -> str:
    """transformers renamed ``past_key_values`` to ``cache``; accept both."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _returned_cache(output):
    return output["cache"] if "cache" in output else output["past_key_values"]


def _logits_to_keep(model: nn.Module) -> dict:
    """Prefill as generation does it: logits for the last position only (when the model allows)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _interleaved(variants: list[Variant], rounds: int, prepare: Callable[[Variant], Callable[[], None]], device) -> dict[str, list[float]]:
    """Time ``prepare(variant)()`` for every variant, once per round, rotating the order each round.
    One untimed warm-up call per variant comes first."""
    times: dict[str, list[float]] = {variant.name: [] for variant in variants}
    for round_index in range(-1, rounds):
        shift = max(round_index, 0) % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            with variant.context():
                call = prepare(variant)
                _synchronize(device)
                start = time.perf_counter()
                call()
                _synchronize(device)
                elapsed = time.perf_counter() - start
            if round_index >= 0:
                times[variant.name].append(elapsed)
    return times


def summarize(times: dict[str, list[float]], baseline: str = "original") -> dict:
    """Per variant min/median seconds; per variant, its ratio to the baseline (ratio of minimums
    and median of the per-round ratios)."""
    seconds = {
        name: {"min": min(values), "median": statistics.median(values), "all": values} for name, values in times.items()
    }
    ratios = {}
    if baseline in times:
        base = times[baseline]
        for name, values in times.items():
            if name == baseline:
                continue
            ratios[name] = {
                "of_min": min(values) / min(base),
                "median_of_rounds": statistics.median(value / reference for value, reference in zip(values, base)),
            }
    return {"seconds": seconds, "ratio_to_original": ratios}


# -- measurements -------------------------------------------------------------------------------


def _random_ids(vocab_size: int, shape: tuple[int, ...], seed: int, device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, shape, generator=generator).to(device)


Feed = Callable[[int, int], dict]  # (batch, sequence length) -> the keyword inputs of one forward pass


def measure_prefill(variants: list[Variant], batch: int, seq: int, settings: BenchSettings, feed: Feed, device) -> dict:
    inputs = feed(batch, seq)

    def prepare(variant: Variant):
        keep = _logits_to_keep(variant.model)

        def call():
            with torch.inference_mode():
                variant.model(**inputs, **keep)

        return call

    result = summarize(_interleaved(variants, settings.rounds, prepare, device))
    return {"batch": batch, "seq": seq, "tokens": batch * seq, **result}


def measure_decode(variants: list[Variant], settings: BenchSettings, vocab_size: int, device) -> dict:
    """Time ``decode_tokens`` single-token steps with a KV cache after an untimed prefill of
    ``decode_prompt`` tokens. The fed tokens are fixed (not sampled), so every variant does the same work."""
    batch, steps = settings.decode_batch, settings.decode_tokens
    prompt = _random_ids(vocab_size, (batch, settings.decode_prompt), settings.seed, device)
    fed = _random_ids(vocab_size, (batch, steps), settings.seed + 1, device)

    def prepare(variant: Variant):
        model = variant.model
        keyword = _cache_keyword(model)
        keep = _logits_to_keep(model)
        with torch.inference_mode():
            cache = _returned_cache(model(input_ids=prompt, use_cache=True, **keep))

        def call():
            with torch.inference_mode():
                for position in range(steps):
                    model(input_ids=fed[:, position : position + 1], use_cache=True, **{keyword: cache}, **keep)

        return call

    result = summarize(_interleaved(variants, settings.rounds, prepare, device))
    tokens = batch * steps
    result["tokens_per_second"] = {
        name: {"max": tokens / values["min"], "median": tokens / values["median"]} for name, values in result["seconds"].items()
    }
    return {"batch": batch, "prompt": settings.decode_prompt, "new_tokens": steps, **result}


def norm_modules(variant: Variant) -> list[nn.Module]:
    """The normalization modules of a variant: the converted ones its config names, or the LayerNorms."""
    block = getattr(variant.model.config, "prenorm", None)
    if block:
        return [variant.model.get_submodule(path) for path in block["norms"]]
    return [module for module in variant.model.modules() if isinstance(module, nn.LayerNorm)]


class NormTimer:
    """Sums the time spent inside given modules during a forward pass (hooks around each call)."""

    def __init__(self, modules: list[nn.Module], device: torch.device):
        self.modules, self.device, self.total, self._start = modules, device, 0.0, 0.0

    @contextmanager
    def active(self) -> Iterator[None]:
        handles = []
        for module in self.modules:
            handles.append(module.register_forward_pre_hook(self._enter))
            handles.append(module.register_forward_hook(self._leave))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _enter(self, module, args) -> None:
        _synchronize(self.device)
        self._start = time.perf_counter()

    def _leave(self, module, args, output) -> None:
        _synchronize(self.device)
        self.total += time.perf_counter() - self._start


def measure_norm_share(variants: list[Variant], batch: int, seq: int, settings: BenchSettings, feed: Feed, device) -> dict:
    """Time spent inside the norms during prefill, original and converted, in separate timed passes.

    The two models run the same operations except the norms, so the converted/original ratio is
    also estimated as 1 + (norms_converted - norms_original) / prefill_original: a far steadier
    number than the end-to-end ratio on a busy machine, because the norms are timed alone."""
    inputs = feed(batch, seq)
    measured = [variant for variant in variants if variant.name in ("original", "converted", "converted_compiled")]
    norm_times: dict[str, list[float]] = {variant.name: [] for variant in measured}
    for round_index in range(settings.rounds):
        shift = round_index % len(measured)
        for variant in measured[shift:] + measured[:shift]:
            timer = NormTimer(norm_modules(variant), device)
            with variant.context(), timer.active(), torch.inference_mode():
                variant.model(**inputs, **_logits_to_keep(variant.model))
            norm_times[variant.name].append(timer.total)
    seconds = {name: {"min": min(values), "median": statistics.median(values), "all": values} for name, values in norm_times.items()}
    return {"batch": batch, "seq": seq, "norm_seconds": seconds}


def measure_train_step(variants: list[Variant], batch: int, seq: int, settings: BenchSettings, feed: Feed, device, causal: bool) -> dict:
    """Forward + backward of the language-modelling loss, or for a model without one (an encoder, a
    vision model) of the mean square of its output (dropout off: the models stay in eval mode, so
    every variant computes the same kind of step). Gradients are dropped after each step."""
    inputs = feed(batch, seq)
    labels = {"labels": inputs["input_ids"]} if causal else {}

    def prepare(variant: Variant):
        model = variant.model
        model.zero_grad(set_to_none=True)

        def call():
            output = model(**inputs, **labels)
            loss = output.loss if labels else compared_output(output).float().square().mean()
            loss.backward()

        return call

    result = summarize(_interleaved(variants, settings.rounds, prepare, device))
    for variant in variants:
        variant.model.zero_grad(set_to_none=True)
    return {"batch": batch, "seq": seq, "tokens": batch * seq, **result}


# -- the whole benchmark ------------------------------------------------------------------------


def _machine(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _load_average() -> list[float] | None:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):  # pragma: no cover
        return None


def _resolve_dtype(name: str, converted: Path) -> torch.dtype:
    if name == "auto":
        from .verification import converted_dtype

        return converted_dtype(converted)
    if name not in DTYPES:
        raise BadInputError(f"--dtype must be auto or one of {', '.join(DTYPES)}, got '{name}'")
    return DTYPES[name]


def benchmark(
    original: str | Path,
    converted: str | Path,
    *,
    device: str = "cpu",
    device_map: str | None = None,
    dtype: str = "float32",
    threads: int | None = None,
    settings: BenchSettings | None = None,
    reporter: Reporter = SILENT,
) -> dict:
    """Measure ORIGINAL, CONVERTED and the norm-free bound; returns the report dict (see module doc)."""
    settings = settings or BenchSettings()
    original, converted = Path(original), Path(converted)
    for path, what in ((original, "ORIGINAL"), (converted, "CONVERTED")):
        if not path.is_dir():
            raise BadInputError(f"'{path}' is not a checkpoint folder")
        check_path_encoding(path, what)
    placed = placement(device if device != "cpu" else None, device_map) if device_map is not None else {}
    torch_device = resolve_device(device)
    spec = check_pair(original, converted)
    if settings.rounds < 1 or min(settings.batch_sizes + settings.seq_lens) < 1:
        raise BadInputError("rounds, batch sizes and sequence lengths must be positive")
    if threads is not None:
        if threads < 1:
            raise BadInputError(f"--threads must be positive, got {threads}")
        torch.set_num_threads(threads)
    torch_dtype = _resolve_dtype(dtype, converted)
    load_before = _load_average()
    with reporter.step("loading the original and the converted model"):
        variants = load_variants(original, converted, torch_dtype, torch_device, placed, settings.compiled_norms)
    torch_device = input_device(variants[0].model)  # with a device map: where the first module is
    config = variants[0].model.config
    feed = forward_feed(spec, config, torch_dtype, torch_device, settings.seed)
    fixed = fixed_positions(spec, config)
    if fixed is not None:  # the sequence is the image's patches or the audio's frames: its length is the model's
        settings = replace(settings, seq_lens=(fixed,), decode_tokens=0)
    elif not spec.causal:  # nothing decodes token by token
        settings = replace(settings, decode_tokens=0)
    vocab_size = getattr(config, "vocab_size", None)
    max_positions = getattr(config, "max_position_embeddings", None) if fixed is None else None
    longest = max(max(settings.seq_lens), settings.decode_prompt + settings.decode_tokens)
    if max_positions is not None and longest > max_positions:
        raise BadInputError(f"sequences of {longest} tokens exceed the model's {max_positions} positions")

    grid = [(batch, seq) for batch in settings.batch_sizes for seq in settings.seq_lens]
    prefill = []
    for batch, seq in reporter.track(grid, "prefill", total=len(grid)):
        prefill.append(measure_prefill(variants, batch, seq, settings, feed, torch_device))
    decode = None
    if settings.decode_tokens > 0:
        with reporter.step(f"decoding {settings.decode_tokens} tokens"):
            decode = measure_decode(variants, settings, vocab_size, torch_device)
    largest = next(point for point in prefill if (point["batch"], point["seq"]) == (max(settings.batch_sizes), max(settings.seq_lens)))
    with reporter.step("timing the norms alone"):
        norms = measure_norm_share(variants, largest["batch"], largest["seq"], settings, feed, torch_device)
    prefill_original = largest["seconds"]["original"]["median"]
    for name in norms["norm_seconds"]:
        norms[f"share_of_prefill_{name}"] = norms["norm_seconds"][name]["median"] / largest["seconds"][name]["median"]
        if name != "original":
            estimate = 1 + (norms["norm_seconds"][name]["median"] - norms["norm_seconds"]["original"]["median"]) / prefill_original
            norms["estimated_converted_over_original" + name.removeprefix("converted")] = estimate
    train = None
    if settings.train:
        batch, seq = max(settings.batch_sizes), max(settings.seq_lens)
        with reporter.step(f"training step at {batch}×{seq}"):
            train = measure_train_step(variants, batch, seq, settings, feed, torch_device, spec.causal)
    converted_block = variants[1].model.config.prenorm
    return {
        "original": str(original),
        "converted": str(converted),
        "target": converted_block.get("target"),
        "fold_affine": converted_block.get("fold_affine"),
        "device": str(torch_device),
        "dtype": str(torch_dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "machine": _machine(torch_device),
        "load_average_before": load_before,
        "load_average_after": _load_average(),
        "settings": asdict(settings),
        "variants": [variant.name for variant in variants],
        "prefill": prefill,
        "decode": decode,
        "norms": norms,
        "train": train,
    }
