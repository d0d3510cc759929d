"""Prove equivalence: run the original and the converted checkpoint on the same prompts.

Metrics (the report contract, docs/report.md) compare the converted model's logits with a reference: the
original in float32. In float32 the bar is float32 noise. In float16/bfloat16 the bar is that the
conversion adds no error beyond what the dtype itself costs (docs/math.md "Numerics"): running in it
(the original, run in that dtype) and storing the rewritten tensors in it (rounded_weights_error).
"""

from __future__ import annotations

import gc
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import torch

from .checkpoint import converted_folder_config
from .sizes import parse_size
from .devices import placement
from .digests import folder_digests
from .errors import BadInputError, UnsupportedModelError, is_out_of_memory
from .jsonout import finite_or_none
from .layer_audit import LayerAudit
from .metrics import (
    batch_logits,
    compare_logits,
    greedy,
    largest_kl_within,
    logit_scale,
    non_finite_failures,
    non_finite_parameters,
    pad_id,
    param_count,
    per_prompt,
    residual_mean_max,
    top_two_margins,
)
from .progress import SILENT, Reporter
from .prompts import batched, build_prompts, fit_positions, read_prompt_lines
from .rounded_weights import rounded_weights_error
from .memory_plan import STREAMED_GREEDY_PROMPTS, STREAMED_GREEDY_TOKENS, MemoryPlan, batch_sizes, plan_memory
from .model_io import audio_feature_inputs, audio_inputs, folder_loader, image_inputs
from .streaming import Offload, SpilledOutputs
from .tolerances import Tolerances, dtype_name, reduced_layer_tolerance


# -- loading ---------------------------------------------------------------------------------


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    # "Some parameters are on the meta device because they were offloaded to the disk": what a
    # streamed verification asks for (docs/report.md "Streamed verification"), not news
    logging.getLogger("accelerate.big_modeling").setLevel(logging.ERROR)


def load_original(path: str | Path, dtype: torch.dtype, **placed):
    """The original as transformers loads it (the class its family's spec builds); ``placed``:
    devices.placement's keywords."""
    _quiet_transformers()
    model = folder_loader(path).from_pretrained(str(path), dtype=dtype, **placed)
    return model.eval()


def check_pair(original: Path, converted: Path):
    """CONVERTED is a folder written by prenorm-convert from a checkpoint of ORIGINAL's family and
    shape (its prenorm block records both); anything else is a usage error, not a failed comparison.
    Returns ORIGINAL's family spec."""
    from .checkpoint import read_config
    from .spec_loader import match_spec

    original_config = read_config(Path(original))
    if "prenorm" in original_config:
        raise BadInputError(f"ORIGINAL '{original}' was written by prenorm-convert; pass the Pre-LN checkpoint it was converted from")
    converted_config = converted_folder_config(converted)
    block = converted_config["prenorm"]
    spec = match_spec(original_config)
    if block.get("family") != spec.family:
        raise BadInputError(
            f"'{converted}' was converted from a checkpoint of family {block.get('family')}, but ORIGINAL "
            f"'{original}' is of family {spec.family}; pass the pair that belongs together"
        )
    # the converted config.json is the source's, with the prenorm changes: its sizes are the source's
    for key in (spec.config_keys["hidden_size"], spec.config_keys["num_layers"], "vocab_size"):
        if key in original_config and key in converted_config and original_config[key] != converted_config[key]:
            raise BadInputError(
                f"'{converted}' was converted from a checkpoint with {key} {converted_config[key]}, but ORIGINAL "
                f"'{original}' has {key} {original_config[key]}; pass the pair that belongs together"
            )
    return spec


def load_converted(path: str | Path, dtype: torch.dtype | str | None = None, **kwargs):
    """Load a folder written by prenorm-convert as its converted architecture (RMSNorm modules), with
    the Auto class its auto_map names."""
    _quiet_transformers()
    path = Path(path)
    converted_folder_config(path)
    model = folder_loader(path).from_pretrained(
        str(path), trust_remote_code=True, dtype=dtype if dtype is not None else "auto", **kwargs
    )
    return model.eval()


def stored_dtype(original: Path, allow_pickle: bool) -> torch.dtype:
    """The dtype most of ORIGINAL's floating-point weights are stored in."""
    from .checkpoint import SourceCheckpoint

    source = SourceCheckpoint.open(original, allow_pickle=allow_pickle)
    try:
        return source.stored_dtype()
    finally:
        source.close()


def converted_dtype(path: str | Path) -> torch.dtype:
    config = json.loads((Path(path) / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, name)


# -- one verification ------------------------------------------------------------------------

COLLECT_PARAMETERS = 50_000_000  # ~200 MB in float32: below this, a model left to a later collection costs little

@dataclass
class _Session:
    """Where and how this verification runs its models."""

    original: Path
    converted: Path
    placed: dict
    memory: MemoryPlan
    reporter: Reporter
    allow_pickle: bool
    offload: Offload | None = None
    batches: list = None
    layers: list[str] = field(default_factory=list)  # decoder layer paths (streamed progress)

    def original_model(self, dtype: torch.dtype):
        if self.offload is None:
            return load_original(self.original, dtype, **self.placed)
        return self.offload.load(load_original, self.original, dtype, stored_dtype(self.original, self.allow_pickle))

    def converted_model(self, dtype: torch.dtype):
        if self.offload is None:
            return load_converted(self.converted, dtype, **self.placed)
        return self.offload.load(load_converted, self.converted, dtype, converted_dtype(self.converted))

    def release(self, parameters: int) -> None:
        """Collect the models just dropped, where their memory matters: streamed, or models of at
        least COLLECT_PARAMETERS parameters (a model held in a reference cycle, by accelerate's
        offload hooks or by the remote code of an older prenorm-convert, is freed only by a
        collection). A full collection takes 0.2-0.5 s in a process with transformers loaded, most
        of a small model's verification; the stock classes and this version's remote code (its
        hooks hold the model weakly) are freed by reference counting when dropped."""
        if self.memory.streamed or parameters >= COLLECT_PARAMETERS:
            gc.collect()

    def batch(self, prompts: list[torch.Tensor]) -> None:
        """One prompt at a time in memory (each as a user would run it); streamed, a batch reads every
        weight once, so as many as the memory plan allows (prompts.batched: why padding is exact)."""
        self.batches = batched(prompts, batch_sizes([_positions(prompt) for prompt in prompts], self.memory))

    @contextmanager
    def passes(self, description: str, models: list) -> Iterator[Callable[[], None]]:
        """While each of ``models`` runs every batch once: a step in memory; streamed (minutes per
        pass for a large model), a progress bar advanced by every decoder layer that finishes, or
        by every batch (calling what this yields) when the family has no per-layer norms."""
        if not self.memory.streamed:
            with self.reporter.step(description):
                yield lambda: None
            return
        with self.reporter.counter(description, len(models) * len(self.batches) * max(1, len(self.layers))) as advance:
            handles = [model.get_submodule(path).register_forward_hook(lambda *_: advance()) for model in models for path in self.layers]
            try:
                yield (lambda: None) if self.layers else advance
            finally:
                for handle in handles:
                    handle.remove()

    def logits(self, model, description: str) -> list[torch.Tensor]:
        with self.passes(description, [model]) as advance:
            return batch_logits(model, self.batches, advance)


def _positions(prompt) -> int:
    if isinstance(prompt, dict):  # audio: the decoder's prompt, or the features alone
        prompt = prompt.get("decoder_input_ids", prompt["input_features"])
    return prompt.numel()


@contextmanager
def _original_runs(model) -> Iterator[None]:
    """An error raised by the original's own forward pass is the checkpoint's, not this tool's: its
    config describes a model the installed transformers cannot run (e.g. DINOv2 position embeddings
    for a non-square patch grid, which it interpolates as a square). Bad input, not an internal error."""
    try:
        yield
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        import transformers

        if is_out_of_memory(exc) or not _raised_by(exc, transformers.__file__):
            raise  # out of memory, or raised by this tool's own code (its hooks, its inputs): not the checkpoint's
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UnsupportedModelError(
            f"the original model does not run in the installed transformers {transformers.__version__} "
            f"on the inputs verification gives it ({type(model).__name__} raised {type(exc).__name__}: {first_line}), so "
            "there is nothing a converted model could be equivalent to; check that its config.json (and "
            "preprocessor_config.json) describe the model its weights were trained as"
        ) from exc


def _raised_by(exc: BaseException, package_init: str) -> bool:
    """Whether the innermost frame of exc's traceback that belongs either to this package or to the
    package of ``package_init`` (transformers) belongs to the latter: frames of torch, accelerate or
    the standard library in between are skipped (transformers' code raising through a torch op is
    transformers'; a hook of ours that transformers' forward called is ours)."""
    theirs, ours = os.path.dirname(package_init), os.path.dirname(__file__)
    owner = None
    tb = exc.__traceback__
    while tb is not None:
        filename = os.path.abspath(tb.tb_frame.f_code.co_filename)
        if filename.startswith(theirs + os.sep):
            owner = "theirs"
        elif filename.startswith(ours + os.sep):
            owner = "ours"
        tb = tb.tb_next
    return owner == "theirs"


def paired_logits(session: _Session, reference_model, runs: list[tuple[object, str, LayerAudit | None]]) -> list[list[torch.Tensor]]:
    """The logits of the reference and of every model of ``runs`` ((model, what it is, its audit))
    on every batch, each batch run by each model in turn, each audit comparing its model's audited
    outputs with the reference's as they are produced (the reference's are held for one batch: in
    memory, or on disk when streamed). Without audits, each model runs every batch in turn."""
    if any(audit is None for _, _, audit in runs):
        with _original_runs(reference_model):
            reference = session.logits(reference_model, "running the original")
        return [reference] + [session.logits(model, f"running {what}") for model, what, _ in runs]
    outputs: list[list[torch.Tensor]] = [[] for _ in range(1 + len(runs))]
    prompts = sum(len(lengths) for _, lengths in session.batches)
    models = [reference_model] + [model for model, _, _ in runs]
    with session.passes(f"comparing logits and every layer's output on {prompts} prompts", models) as advance:
        for ids, lengths in session.batches:
            held = SpilledOutputs() if session.memory.streamed else {}
            try:
                with _original_runs(reference_model):
                    outputs[0] += per_prompt(runs[0][2].record(reference_model, ids, held.__setitem__), lengths)
                advance()
                for index, (model, _, audit) in enumerate(runs, start=1):
                    compare = lambda path, output, audit=audit: audit.compare(path, held[path], output)  # noqa: E731
                    outputs[index] += per_prompt(audit.record(model, ids, compare), lengths)
                    advance()
            finally:
                if isinstance(held, SpilledOutputs):
                    held.close()
    return outputs


def verify(
    original: str | Path,
    converted: str | Path,
    *,
    tolerances: Tolerances | None = None,
    prompts_file: str | Path | None = None,
    dtype: torch.dtype | None = None,
    revision: str | None = None,
    token: str | None = None,
    allow_pickle: bool = False,
    device: str | None = None,
    device_map: str | None = None,
    max_memory: str | int | None = None,
    reporter: Reporter = SILENT,
) -> dict:
    """Compare a converted folder with its original; returns the report dict (see docs/report.md).

    The models run on ``device`` (default: the CPU), or spread by an accelerate ``device_map``
    ('auto': several GPUs, or GPU and CPU); every comparison is made on the CPU in float64.
    On the CPU, when both models do not fit in ``max_memory`` ('3GiB'; default: the memory
    available), they are streamed from disk one module at a time (docs/report.md "Streamed
    verification").

    ORIGINAL may be a hub id; without `revision` it is read at the commit CONVERTED records, if any.
    An original stored only as pickled *.bin files is refused unless ``allow_pickle`` (transformers
    then loads it with torch.load(weights_only=True))."""
    tolerances = tolerances or Tolerances()
    placed = placement(device, device_map)  # a missing device is bad input before any work
    budget = parse_size(max_memory, "--max-memory") if max_memory is not None else None
    if budget is not None and placed:
        raise BadInputError("--max-memory streams the models through the CPU's memory; drop it, or drop --device/--device-map")
    prompt_lines = read_prompt_lines(prompts_file) if prompts_file is not None else None
    source, spec = _checked_pair(original, converted, revision, token, allow_pickle, reporter)
    dtype = dtype or converted_dtype(converted)
    memory = MemoryPlan(False) if placed else _plan_memory(Path(source.path), spec, budget, allow_pickle)
    offload = Offload() if memory.streamed else None
    if offload is not None:
        reporter.warn(f"verifying with the weights streamed from disk, one module at a time: {memory.reason}")
    session = _Session(Path(source.path), Path(converted), placed, memory, reporter, allow_pickle, offload)
    try:
        measured = _measure(session, spec, tolerances, dtype, prompt_lines)
    finally:
        if offload is not None:
            offload.close()
    return _report(measured, tolerances, dtype, source, converted, memory)


def _plan_memory(original: Path, spec, budget: int | None, allow_pickle: bool) -> MemoryPlan:
    from .checkpoint import read_config

    config = read_config(original)
    vocab_size = int(config.get("vocab_size") or config.get("padded_vocab_size") or config.get("num_labels") or 0)
    memory = plan_memory(original, vocab_size, int(config.get(spec.config_keys["hidden_size"]) or 0), budget, allow_pickle)
    if memory.streamed and not spec.causal:
        raise BadInputError(
            f"verifying this {spec.family} checkpoint needs both models in memory ({memory.reason}), and streamed "
            "verification runs causal language models only; verify on a machine with more memory, or with --device cuda"
        )
    return memory


def _checked_pair(original, converted, revision, token, allow_pickle: bool, reporter: Reporter):
    """ORIGINAL resolved (a hub id is downloaded) and checked against CONVERTED: (source, its spec)."""
    from .checkpoint import check_path_encoding, weights_format
    from .hub import recorded_revision, resolve_source

    source = resolve_source(
        original, revision=revision or recorded_revision(original, converted), token=token, allow_pickle=allow_pickle, reporter=reporter
    )
    for path, what in ((source.path, "ORIGINAL"), (converted, "CONVERTED")):
        if not Path(path).is_dir():
            raise BadInputError(f"'{path}' is not a checkpoint folder")
        check_path_encoding(path, what)
    weights_format(Path(source.path), allow_pickle)
    return source, check_pair(Path(source.path), Path(converted))


def _measure(session: _Session, spec, tolerances: Tolerances, dtype: torch.dtype, prompt_lines) -> dict:
    """Every measurement of the report, the models loaded and dropped in turn: at most the float32
    original, the converted model and, in a reduced dtype, the original in that dtype at a time (8
    bytes per parameter for bf16/fp16, as the float64 original of a float32 run)."""
    with session.reporter.step("loading the original and the converted model"):
        reference_model = session.original_model(torch.float32)
        candidate_model = session.converted_model(dtype)
    # counted before any forward pass: running an offloaded model leaves tied weights as separate meta tensors
    params = {"params_original": param_count(reference_model), "params_converted": param_count(candidate_model)}
    prompts, greedy_prompts = _inputs(session.original, spec, reference_model, tolerances, prompt_lines)
    session.batch(prompts)
    audit = LayerAudit.for_spec(spec, reference_model.config, candidate_model.config.prenorm)
    session.layers = audit.layers if audit is not None else []
    runs = [(candidate_model, "the converted model", audit)]
    reduced_original = original_audit = None
    if dtype not in (torch.float32, torch.float64):  # its own error in the dtype: the reduced-dtype bars' basis
        reduced_original, original_audit = session.original_model(dtype), audit and audit.companion()
        runs.append((reduced_original, f"the original in {dtype_name(dtype)}", original_audit))
    with residual_mean_max(candidate_model) as residual_means:
        reference, candidate, *companion = paired_logits(session, reference_model, runs)
    measured = {
        "reference": reference,
        "metrics": compare_logits(reference, candidate),
        "residual": float(torch.tensor(residual_means, dtype=torch.float64).max()),  # NaN stays NaN
        "audit": audit,
        "prompts": len(prompts),
        "target": candidate_model.config.prenorm["target"],
        "params": params,
        "non_finite": {"original": non_finite_parameters(reference_model), "converted": non_finite_parameters(candidate_model)},
    }
    if reduced_original is not None:
        measured["original_error"] = compare_logits(reference, companion[0])
        measured["original_audit"] = original_audit
    measured["greedy"] = _greedy_matches(session, reduced_original or reference_model, candidate_model, greedy_prompts, tolerances.greedy_tokens)
    del candidate_model, reduced_original
    session.release(params["params_original"])
    if dtype in (torch.float32, torch.float64):
        measured["float32_error"] = _own_float32_error(session, reference_model, reference, params["params_original"])
    else:
        del reference_model  # one float32 model at a time from here
        session.release(params["params_original"])
        with session.reporter.step("measuring what rounding the rewritten tensors costs"):
            measured["weights_error"] = rounded_weights_error(
                session.original, session.converted, session.batches, session.converted_model, converted_dtype(session.converted), session.allow_pickle
            )
    return measured


def _inputs(original: Path, spec, model, tolerances: Tolerances, prompt_lines) -> tuple[list, list]:
    """(what the models run on, the prompts greedy generation starts from): token-id prompts for a
    language model (greedy ones for a causal one only), seeded random pixel values for a vision model,
    seeded random audio features for an audio classifier."""
    if spec.inputs in ("image", "audio_features"):
        if prompt_lines is not None:
            taken = "images" if spec.inputs == "image" else "audio features alone"
            raise BadInputError(f"--prompts gives text, and these {spec.family} models take {taken}; drop --prompts")
        return (image_inputs(original, model.config) if spec.inputs == "image" else audio_feature_inputs(model.config)), []
    embeddings = model.get_input_embeddings()
    greedy_tokens = tolerances.greedy_tokens if spec.causal else 0
    prompts, greedy_prompts = fit_positions(build_prompts(original, embeddings.num_embeddings, prompt_lines), model.config, greedy_tokens)
    if spec.inputs == "audio":  # the prompts are what the decoder reads, beside random audio features
        return audio_inputs(model.config, prompts), []
    return prompts, greedy_prompts if spec.causal else []


def _own_float32_error(session: _Session, reference_model, reference: list[torch.Tensor], parameters: int) -> dict:
    """The original's own float32 logits against its float64 self (the float32 tolerance's basis)."""
    if session.memory.streamed:
        del reference_model
        session.release(parameters)
        reference_model = session.original_model(torch.float64)
    else:
        reference_model = reference_model.to(torch.float64)
    return compare_logits(session.logits(reference_model, "measuring the original's own float32 error (a float64 run)"), reference)


def _greedy_matches(session: _Session, expected_model, candidate_model, greedy_prompts, tokens: int) -> dict:
    """Greedy generations of both models, token for token (streamed: a few tokens on one prompt,
    each token being a pass over every weight)."""
    if not greedy_prompts:  # an encoder or a vision model: nothing generates
        return {"prompts": 0, "tokens": 0, "identical": None}
    if session.memory.streamed:
        greedy_prompts, tokens = greedy_prompts[:STREAMED_GREEDY_PROMPTS], min(tokens, STREAMED_GREEDY_TOKENS)
    pad = pad_id(expected_model)
    matches = []
    with session.reporter.step(f"greedy generation of {tokens} tokens on {len(greedy_prompts)} prompt(s)"):
        for ids in greedy_prompts:
            matches.append(bool(torch.equal(greedy(expected_model, ids, tokens, pad), greedy(candidate_model, ids, tokens, pad))))
    return {"prompts": len(greedy_prompts), "tokens": tokens, "identical": all(matches)}


def _failures(measured: dict, limits: dict, logit_scale_value: float) -> list[str]:
    metrics, weights_error = measured["metrics"], measured.get("weights_error")
    failures = non_finite_failures(measured["non_finite"], {**metrics, "logit_scale": logit_scale_value, "residual_mean_max": measured["residual"]})
    if weights_error is not None and weights_error["tensors_not_matching"]:
        failures.append(
            f"{len(weights_error['tensors_not_matching'])} rewritten tensor(s) are not the rewrite of ORIGINAL rounded to "
            f"{weights_error['stored_dtype']} (e.g. {weights_error['tensors_not_matching'][0]}): was CONVERTED made from "
            "ORIGINAL, with this version?"
        )
    if metrics["max_abs_logit_diff"] > limits["max_abs_logit_diff"]:
        failures.append(f"max |Δlogit| {metrics['max_abs_logit_diff']:.3g} > {limits['max_abs_logit_diff']:.3g}")
    if metrics["max_kl_divergence"] > limits["max_kl"]:
        failures.append(f"max KL {metrics['max_kl_divergence']:.3g} > {limits['max_kl']:.3g}")
    if metrics["top1_agreement"] < limits["min_top1"]:
        failures.append(f"top-1 agreement {metrics['top1_agreement']:.4f} < {limits['min_top1']:.4f}")
    if limits["require_greedy_match"] and measured["greedy"]["identical"] is False:
        failures.append("greedy generations differ")
    return failures


def _report(measured: dict, tolerances: Tolerances, dtype: torch.dtype, source, converted, memory: MemoryPlan) -> dict:
    reference, metrics = measured["reference"], measured["metrics"]
    scale = logit_scale(reference)
    original_error, float32_error = measured.get("original_error"), measured.get("float32_error")
    margins = top_two_margins(reference) if float32_error is not None else None
    near_ties = (lambda gap: float((margins <= gap).double().mean())) if margins is not None else None
    largest_kl = (lambda delta: largest_kl_within(reference, delta)) if original_error is not None else None
    limits = tolerances.resolve(dtype, scale, original_error, measured.get("weights_error"), float32_error, near_ties, largest_kl)
    failures = _failures(measured, limits, scale)
    audit, greedy_run = measured["audit"], measured["greedy"]
    reduced_bound = partial(reduced_layer_tolerance, dtype) if original_error is not None else None
    layers = audit.result(limits["max_abs_logit_diff"] / max(scale, 1e-30), measured.get("original_audit"), reduced_bound) if audit is not None else {}
    report = {
        **metrics,
        "relative_max_abs_logit_diff": metrics["max_abs_logit_diff"] / max(scale, 1e-30),
        "logit_scale": scale,
        "greedy_match": {
            "prompts": greedy_run["prompts"],
            "tokens_compared": greedy_run["tokens"] * greedy_run["prompts"],
            "identical": greedy_run["identical"],
            "reference": dtype_name(dtype) + " original" if original_error is not None else "float32 original",
        },
        "residual_mean_max": measured["residual"],
        **layers,
        **measured["params"],
        "non_finite_tensors": measured["non_finite"],
        "dtype": dtype_name(dtype),
        "reference_dtype": "float32",
        "original_float32_error": float32_error,
        "original_in_dtype": original_error,
        "rounded_weights": measured.get("weights_error"),
        "prompts": measured["prompts"],
        "streamed": memory.report(),
        "target": measured["target"],
        "source": source.name,
        "source_revision": source.revision,
        "files_sha256": folder_digests(converted),
        "tolerances": limits,
        "failures": failures,
        "passed": not failures,
    }
    return finite_or_none(report)
