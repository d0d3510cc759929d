"""Prove equivalence: run the original and the converted checkpoint on the same prompts.

Metrics (the report contract, docs/report.md) compare the converted model's logits with a reference: the
original in float32. In float32 the bar is float32 noise. In float16/bfloat16 the bar is that the
conversion adds no error beyond what the dtype itself costs (docs/math.md "Numerics"): running in it
(the original, run in that dtype) and storing the rewritten tensors in it (rounded_weights_error).
"""

from __future__ import annotations

import gc
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .errors import BadInputError
from .digests import folder_digests
from .jsonout import finite_or_none
from .checkpoint import converted_folder_config
from .devices import placement
from .layer_audit import LayerAudit
from .progress import SILENT, Reporter

DEFAULT_PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "In 1905, Albert Einstein published four papers that changed physics:",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Pre-LayerNorm transformers normalise the input of every branch, so",
    "Les modèles de langage apprennent à prédire le mot suivant.",
    "Q: What is 17 times 23?\nA:",
    "Once upon a time, in a village by the sea, there lived",
    "SELECT name, count(*) FROM users GROUP BY name ORDER BY 2 DESC;",
)
RANDOM_PROMPTS = 4
RANDOM_PROMPT_LENGTH = 24
# how much worse than the original's own reduced-precision error the converted model may be
REDUCED_DTYPE_ERROR_RATIO = 1.5
REDUCED_DTYPE_TOP1_SLACK = 0.05
# float32: the bar never drops below this fraction of the logit scale, nor a KL of FLOAT32_KL_FLOOR
FLOAT32_RELATIVE_FLOOR = 1e-5
FLOAT32_KL_FLOOR = 1e-6


@dataclass
class Tolerances:
    """Pass criteria. None means 'derive from the dtype' (see resolve)."""

    max_abs_logit_diff: float | None = None
    max_kl: float | None = None
    min_top1: float | None = None
    greedy_tokens: int = 32
    require_greedy_match: bool | None = None

    def __post_init__(self):
        # checked when built (before any conversion work), so a bad threshold is a usage error: exit 2
        for name in ("max_abs_logit_diff", "max_kl"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise BadInputError(f"--{name.replace('_', '-')} must be 0 or more, got {value}")
        if self.min_top1 is not None and not 0 <= self.min_top1 <= 1:
            raise BadInputError(f"--min-top1 is a fraction of positions, between 0 and 1, got {self.min_top1}")
        if self.greedy_tokens < 0:
            raise BadInputError(f"--greedy-tokens must be 0 (no generation compared) or more, got {self.greedy_tokens}")

    def resolve(
        self,
        dtype: torch.dtype,
        logit_scale: float,
        original_error: dict | None,
        weights_error: dict | None = None,
        float32_error: dict | None = None,
        near_tie_fraction=None,
    ) -> dict:
        """The limits applied (docs/report.md, "Default tolerances"). float32: ``float32_error`` is the
        original's own float32 run against its float64 self, and ``near_tie_fraction(gap)`` the share
        of positions whose reference top two logits are within ``gap``."""
        if dtype == torch.float32 or dtype == torch.float64:
            return self._resolve_float32(logit_scale, float32_error, near_tie_fraction)
        assert original_error is not None
        dtype_cost = dtype_cost_of(original_error, weights_error)
        return {
            "max_abs_logit_diff": self.max_abs_logit_diff
            if self.max_abs_logit_diff is not None
            else REDUCED_DTYPE_ERROR_RATIO * dtype_cost["max_abs_logit_diff"],
            "max_kl": self.max_kl if self.max_kl is not None else REDUCED_DTYPE_ERROR_RATIO * dtype_cost["max_kl_divergence"],
            "min_top1": self.min_top1 if self.min_top1 is not None else dtype_cost["top1_agreement"] - REDUCED_DTYPE_TOP1_SLACK,
            "require_greedy_match": False if self.require_greedy_match is None else self.require_greedy_match,
            "basis": f"{_dtype_name(dtype)}: no more than {REDUCED_DTYPE_ERROR_RATIO}x what the dtype costs: the original "
            f"model's own {_dtype_name(dtype)} error against its float32 self, plus what rounding the rewritten tensors "
            f"to {_dtype_name(dtype)} costs (rounded_weights)",
        }

    def _resolve_float32(self, logit_scale: float, float32_error: dict | None, near_tie_fraction) -> dict:
        # two float32 models each carry about the original's own float32 rounding error, which grows
        # with the prompts compared: the bar is their sum with the reduced-dtype margin, and never
        # below FLOAT32_RELATIVE_FLOOR x the logit scale (docs/report.md, "Default tolerances")
        own_abs = _finite_or_zero(float32_error["max_abs_logit_diff"]) if float32_error else 0.0
        own_kl = _finite_or_zero(float32_error["max_kl_divergence"]) if float32_error else 0.0
        max_abs = self.max_abs_logit_diff
        if max_abs is None:
            max_abs = max(FLOAT32_RELATIVE_FLOOR * logit_scale, REDUCED_DTYPE_ERROR_RATIO * 2 * own_abs)
        min_top1 = self.min_top1
        if min_top1 is None:
            # logits that all move by at most max_abs can swap the top token only where the top two
            # were within 2 x max_abs: those positions may disagree, no other
            min_top1 = 1.0 - (near_tie_fraction(2 * max_abs) if near_tie_fraction is not None else 0.0)
        return {
            "max_abs_logit_diff": max_abs,
            "max_kl": self.max_kl if self.max_kl is not None else max(FLOAT32_KL_FLOOR, REDUCED_DTYPE_ERROR_RATIO * 4 * own_kl),
            "min_top1": min_top1,
            "require_greedy_match": True if self.require_greedy_match is None else self.require_greedy_match,
            "basis": f"float32: max |Δlogit| within the larger of {FLOAT32_RELATIVE_FLOOR:g} of the logit scale and "
            f"{REDUCED_DTYPE_ERROR_RATIO}x the float32 error of two models, each the original's own against its "
            "float64 self (original_float32_error); the top token may differ only where the reference's top two "
            "logits are closer than twice that",
        }


def dtype_cost_of(original_error: dict, weights_error: dict | None) -> dict:
    """The error a reduced dtype costs a converted model: the original's own error in that dtype, plus
    the cost of rounding the rewritten tensors (which the original never had to round), combined
    as independent errors add at worst: logit differences add, the square roots of KL divergences
    add (KL is quadratic in small logit differences), and so do the disagreeing positions."""
    if weights_error is None:
        return original_error
    return {
        "max_abs_logit_diff": original_error["max_abs_logit_diff"] + weights_error["max_abs_logit_diff"],
        "max_kl_divergence": (original_error["max_kl_divergence"] ** 0.5 + weights_error["max_kl_divergence"] ** 0.5) ** 2,
        "top1_agreement": original_error["top1_agreement"] + weights_error["top1_agreement"] - 1,
    }


def _finite_or_zero(value: float) -> float:
    return value if math.isfinite(value) else 0.0


def failure_message(report: dict) -> str:
    """The one line a failed report is summed up in (CLI and VerificationFailed), naming the first
    layer whose output departs from the original's (and its worst writer) when the audit found one."""
    where = ""
    if report.get("first_bad_layer") is not None:
        writer = f", worst writer {report['first_bad_writer']}" if report.get("first_bad_writer") else ""
        where = f" (first layer off: {report['first_bad_layer']}{writer})"
    return "verification failed: " + "; ".join(report["failures"]) + where


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -- loading ---------------------------------------------------------------------------------


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def load_original(path: str | Path, dtype: torch.dtype, **placed):
    """The original as transformers loads it; ``placed``: devices.placement's keywords."""
    import transformers

    _quiet_transformers()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **placed)
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
    """Load a folder written by prenorm-convert as its converted architecture (RMSNorm modules)."""
    import transformers

    _quiet_transformers()
    path = Path(path)
    converted_folder_config(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path), trust_remote_code=True, dtype=dtype if dtype is not None else "auto", **kwargs
    )
    return model.eval()


def converted_dtype(path: str | Path) -> torch.dtype:
    config = json.loads((Path(path) / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, name)


# -- prompts ---------------------------------------------------------------------------------


def build_prompts(original: str | Path, vocab_size: int, prompt_lines: list[str] | None = None) -> list[torch.Tensor]:
    """Token-id prompts: the model's own tokenizer on varied texts (``prompt_lines``, from a --prompts
    file, or the built-in ones), or seeded random ids."""
    texts = list(DEFAULT_PROMPTS) if prompt_lines is None else prompt_lines
    tokenizer = _tokenizer(original)
    if tokenizer is not None:
        encoded = [torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long) for text in texts]
        return [ids for ids in encoded if ids.numel() > 0]
    if prompt_lines is not None:
        raise BadInputError(f"--prompts needs a tokenizer, and '{original}' has none")
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab_size, (RANDOM_PROMPT_LENGTH,), generator=generator) for _ in range(RANDOM_PROMPTS)]


def read_prompt_lines(prompts_file: str | Path) -> list[str]:
    """The non-empty lines of a --prompts file (UTF-8 text); checked before any work starts."""
    path = Path(prompts_file)
    if not path.exists():
        raise BadInputError(f"--prompts file '{path}' does not exist")
    if not path.is_file():
        raise BadInputError(f"--prompts '{path}' is not a file; give a text file with one prompt per line")
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise BadInputError(f"--prompts file '{path}' is not UTF-8 text") from None
    if not lines:
        raise BadInputError(f"--prompts file '{path}' holds no non-empty line")
    return lines


def check_greedy_fits(config: dict, greedy_tokens: int) -> int | None:
    """The model's number of positions (None: unlimited); --greedy-tokens must leave room for a prompt."""
    limit = config.get("n_positions") or config.get("max_position_embeddings")
    if limit and greedy_tokens >= limit:
        raise BadInputError(f"--greedy-tokens {greedy_tokens} does not fit the model's {limit} positions; ask for fewer")
    return limit


def fit_positions(prompts: list[torch.Tensor], config, greedy_tokens: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(prompts cut to the model's positions, the first two cut to leave room for greedy_tokens)."""
    limit = check_greedy_fits(config.to_dict(), greedy_tokens)
    if not limit:  # no learned positions (BLOOM's ALiBi): any length
        return prompts, prompts[:2] if greedy_tokens > 0 else []
    greedy_prompts = [ids[: limit - greedy_tokens] for ids in prompts[:2]] if greedy_tokens > 0 else []
    return [ids[:limit] for ids in prompts], greedy_prompts


def _tokenizer(path: str | Path):
    import transformers

    folder = Path(path)
    if not any((folder / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder))
    except Exception:
        return None


# -- metrics ---------------------------------------------------------------------------------


@torch.no_grad()
def _logits(model, prompts: list[torch.Tensor]) -> list[torch.Tensor]:
    return [model(ids[None, :].to(model.device)).logits[0].to("cpu", torch.float64) for ids in prompts]


def paired_logits(reference_model, candidate_model, prompts: list[torch.Tensor], audit: LayerAudit | None):
    """Both models' logits on every prompt, each prompt run by both in turn so that the per-layer
    audit compares their layer outputs as it goes (nothing per layer is kept but running maxima)."""
    if audit is None:
        return _logits(reference_model, prompts), _logits(candidate_model, prompts)
    reference, candidate = [], []
    for ids in prompts:
        reference_logits, reference_outputs = audit.record(reference_model, ids)
        candidate_logits, candidate_outputs = audit.record(candidate_model, ids)
        audit.compare(reference_outputs, candidate_outputs)
        reference.append(reference_logits)
        candidate.append(candidate_logits)
    return reference, candidate


def compare_logits(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> dict:
    ref = torch.cat(reference)
    cand = torch.cat(candidate)
    diff = (ref - cand).abs()
    log_p = torch.log_softmax(ref, dim=-1)
    log_q = torch.log_softmax(cand, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return {
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "max_kl_divergence": float(kl.max().clamp_min(0)),
        "top1_agreement": float((ref.argmax(-1) == cand.argmax(-1)).double().mean()),
        "positions": int(ref.shape[0]),
    }


@torch.no_grad()
def rounded_weights_error(
    original: Path, converted: Path, prompts: list[torch.Tensor], allow_pickle: bool = False, placed: dict | None = None
) -> dict:
    """What storing the rewritten tensors in the converted dtype costs by itself (docs/math.md "Numerics").

    The conversion recomputes every rewritten tensor in float64 and rounds it once; the original
    never had those values to round. Measured here on the converted architecture, run in float32:
    its weights as stored against the same model holding the rewritten tensors at their exact
    values, recomputed from ORIGINAL. Every stored rewritten tensor must be exactly that rewrite
    rounded to the stored dtype (``tensors_not_matching`` lists any that is not), so this is the
    cost of rounding and nothing else: a wrong rewrite is the same in both and shows up only in
    the comparison with the original."""
    from .checkpoint import SourceCheckpoint
    from .plan import make_plan
    from .row_blocks import op_rows
    from .spec_loader import match_spec

    block = converted_folder_config(converted)["prenorm"]
    stored_dtype = converted_dtype(converted)
    source = SourceCheckpoint.open(original, allow_pickle=allow_pickle)
    try:
        spec = match_spec(source.config)
        # an untied head (asked for, or needed) is planned untied again: the same tensors
        plan = make_plan(
            source, spec, block["target"], block["fold_affine"], torch.float64, block.get("pad_to"), untie_head=block.get("untied_head", False)
        )
        model = load_converted(converted, dtype=torch.float32, **(placed or {}))
        stored = _logits(model, prompts)
        rewritten = [op for op in plan.ops if op.changed]
        not_matching = []
        for op in rewritten:
            try:
                param = model.get_parameter(op.name)
            except AttributeError:
                param = None
            if param is None or tuple(param.shape) != tuple(op.shape):  # not the model this rewrite makes
                not_matching.append(op.name)
                continue
            for start, rows in op_rows(op, source):
                target = param[start : start + rows.shape[0]]
                if op.name not in not_matching and not torch.equal(rows.to(stored_dtype).to(torch.float32), target):
                    not_matching.append(op.name)
                target.copy_(rows)
        exact = _logits(model, prompts)
    finally:
        source.close()
    return {
        **compare_logits(exact, stored),
        "stored_dtype": _dtype_name(stored_dtype),
        "tensors_rewritten": len(rewritten),
        "tensors_not_matching": not_matching,
    }


@torch.no_grad()
def greedy(model, prompt: torch.Tensor, new_tokens: int, pad_token_id: int) -> torch.Tensor:
    prompt = prompt.to(model.device)
    output = model.generate(
        prompt[None, :],
        attention_mask=torch.ones_like(prompt)[None, :],
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=pad_token_id,
    )
    return output[0, prompt.numel():].cpu()


@torch.no_grad()
@contextmanager
def residual_mean_max(model) -> Iterator[list[float]]:
    """While the block runs, every forward pass of ``model`` appends the largest |mean(x)| / rms(x)
    over the tokens entering a converted norm (the residual stream); the caller takes the max of
    the list it is given. Measured during the comparison's own forward passes, so it costs none."""
    block = model.config.prenorm
    worst = [0.0]  # one entry per norm call

    def hook(_module, args):
        stream = args[0]
        padding = None
        if block["target"] == "crmsnorm":
            # compressed stream, docs/math.md "Pre-CRMSNorm": its implied last component is x_d = -Σ x̃.
            # Rebuild it in the stream's own dtype, as a full-width stream would hold it, and measure
            # the full vector like any other: what remains is that dtype's rounding. Zero padding
            # (--pad-to) must stay exactly zero; whatever it holds counts against the stream too.
            width = block["residual_width"]
            stream, padding = stream[..., :width], stream[..., width:]
            stream = torch.cat([stream, -stream.sum(-1, keepdim=True)], dim=-1)
        x = stream.to(torch.float64)
        mean = x.mean(-1).abs()
        rms = x.pow(2).mean(-1).sqrt().clamp_min(1e-30)
        if padding is not None and padding.shape[-1]:
            mean = torch.maximum(mean, padding.to(torch.float64).abs().amax(-1))
        worst.append(float((mean / rms).max()))  # NaN stays NaN: builtin max() would drop it

    handles = [model.get_submodule(path).register_forward_pre_hook(hook) for path in block["norms"]]
    try:
        yield worst
    finally:
        for handle in handles:
            handle.remove()


def _param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


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
    reporter: Reporter = SILENT,
) -> dict:
    """Compare a converted folder with its original; returns the report dict (see docs/report.md).

    The models run on ``device`` (default: the CPU), or spread by an accelerate ``device_map``
    ('auto': several GPUs, or GPU and CPU); every comparison is made on the CPU in float64.

    ORIGINAL may be a hub id; without `revision` it is read at the commit CONVERTED records, if any.
    An original stored only as pickled *.bin files is refused unless ``allow_pickle`` (transformers
    then loads it with torch.load(weights_only=True))."""
    from .checkpoint import check_path_encoding, weights_format
    from .hub import recorded_revision, resolve_source

    tolerances = tolerances or Tolerances()
    placed = placement(device, device_map)  # a missing device is bad input before any work
    prompt_lines = read_prompt_lines(prompts_file) if prompts_file is not None else None
    source = resolve_source(
        original, revision=revision or recorded_revision(original, converted), token=token, allow_pickle=allow_pickle, reporter=reporter
    )
    original = source.path
    for path, what in ((original, "ORIGINAL"), (converted, "CONVERTED")):
        if not Path(path).is_dir():
            raise BadInputError(f"'{path}' is not a checkpoint folder")
        check_path_encoding(path, what)
    weights_format(Path(original), allow_pickle)
    spec = check_pair(Path(original), Path(converted))
    dtype = dtype or converted_dtype(converted)
    with reporter.step("loading the original and the converted model"):
        reference_model = load_original(original, torch.float32, **placed)
        candidate_model = load_converted(converted, dtype=dtype, **placed)
    vocab_size = reference_model.get_output_embeddings().weight.shape[0]
    prompts, greedy_prompts = fit_positions(build_prompts(original, vocab_size, prompt_lines), reference_model.config, tolerances.greedy_tokens)
    resolved = spec.resolve(reference_model.config)  # the roles of this config's modules
    audit = LayerAudit.for_spec(resolved, resolved.num_layers(reference_model.config.to_dict()), candidate_model.config.prenorm)
    with reporter.step(f"comparing logits and every layer's output on {len(prompts)} prompts"):
        with residual_mean_max(candidate_model) as residual_means:
            reference, candidate = paired_logits(reference_model, candidate_model, prompts, audit)
        residual = float(torch.tensor(residual_means, dtype=torch.float64).max())  # NaN stays NaN
        metrics = compare_logits(reference, candidate)
        logit_scale = float(torch.cat(reference).abs().max())
        original_error = weights_error = None
        if dtype not in (torch.float32, torch.float64):
            reduced_original = load_original(original, dtype, **placed)
            original_error = compare_logits(reference, _logits(reduced_original, prompts))
    pad = _pad_id(reference_model)
    with reporter.step(f"greedy generation of {tolerances.greedy_tokens} tokens"):
        matches = []
        for ids in greedy_prompts:
            expected = greedy(reduced_original if original_error is not None else reference_model, ids, tolerances.greedy_tokens, pad)
            actual = greedy(candidate_model, ids, tolerances.greedy_tokens, pad)
            matches.append(bool(torch.equal(expected, actual)))
    params = {"params_original": _param_count(reference_model), "params_converted": _param_count(candidate_model)}
    non_finite = {"original": non_finite_parameters(reference_model), "converted": non_finite_parameters(candidate_model)}
    target = candidate_model.config.prenorm["target"]
    float32_error = margins = None
    if original_error is None:
        del candidate_model
        with reporter.step("measuring the original's own float32 error (a float64 run)"):
            float32_error = compare_logits(_logits(reference_model.to(torch.float64), prompts), reference)
            margins = top_two_margins(reference)
        del reference_model
    else:
        del reference_model, reduced_original, candidate_model  # one float32 model at a time from here
        gc.collect()
        with reporter.step("measuring what rounding the rewritten tensors costs"):
            weights_error = rounded_weights_error(original, converted, prompts, allow_pickle, placed)
    near_ties = (lambda gap: float((margins <= gap).double().mean())) if margins is not None else None
    limits = tolerances.resolve(dtype, logit_scale, original_error, weights_error, float32_error, near_ties)
    failures = non_finite_failures(non_finite, {**metrics, "logit_scale": logit_scale, "residual_mean_max": residual})
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
    if limits["require_greedy_match"] and not all(matches):
        failures.append("greedy generations differ")
    layers = audit.result(limits["max_abs_logit_diff"] / max(logit_scale, 1e-30)) if audit is not None else {}
    report = {
        **{key: value for key, value in metrics.items()},
        "relative_max_abs_logit_diff": metrics["max_abs_logit_diff"] / max(logit_scale, 1e-30),
        "logit_scale": logit_scale,
        "greedy_match": {
            "prompts": len(greedy_prompts),
            "tokens_compared": tolerances.greedy_tokens * len(greedy_prompts),
            "identical": all(matches),
            "reference": _dtype_name(dtype) + " original" if original_error is not None else "float32 original",
        },
        "residual_mean_max": residual,
        **layers,
        **params,
        "non_finite_tensors": non_finite,
        "dtype": _dtype_name(dtype),
        "reference_dtype": "float32",
        "original_float32_error": float32_error,
        "original_in_dtype": original_error,
        "rounded_weights": weights_error,
        "prompts": len(prompts),
        "target": target,
        "source": source.name,
        "source_revision": source.revision,
        "files_sha256": folder_digests(converted),
        "tolerances": limits,
        "failures": failures,
        "passed": not failures,
    }
    return finite_or_none(report)


def non_finite_parameters(model) -> list[str]:
    """Names of the parameters holding a NaN or an infinity."""
    return [name for name, param in model.named_parameters() if not bool(torch.isfinite(param).all())]


def non_finite_failures(non_finite: dict[str, list[str]], measured: dict) -> list[str]:
    """Failure lines for non-finite weights or measurements: any of them fails the gate, whatever the
    thresholds (a NaN compares false against every limit)."""
    failures = []
    advice = {
        "original": "the original itself is broken: fix or re-download it",
        "converted": "with a finite original this is an overflow of the output dtype: convert with --dtype float32",
    }
    for side in ("original", "converted"):
        names = non_finite[side]
        if names:
            failures.append(f"{side.upper()} holds NaN or infinite values in {len(names)} tensor(s), e.g. {names[0]} ({advice[side]})")
    bad = [key for key, value in measured.items() if isinstance(value, float) and not math.isfinite(value)]
    if bad:
        failures.append(f"non-finite measurements ({', '.join(bad)}): the models' outputs hold NaN or infinite values")
    return failures


def top_two_margins(logits: list[torch.Tensor]) -> torch.Tensor:
    """Per position, how far the top logit is above the second (near ties may legitimately swap)."""
    top = torch.cat(logits).topk(2, dim=-1).values
    return top[:, 0] - top[:, 1]


def _pad_id(model) -> int:
    generation = getattr(model, "generation_config", None)
    for candidate in (getattr(generation, "pad_token_id", None), getattr(generation, "eos_token_id", None)):
        if isinstance(candidate, list):
            candidate = candidate[0] if candidate else None
        if candidate is not None:
            return int(candidate)
    return 0
