"""The conversion: open, match a spec, plan, stream every tensor through its rewrite, verify."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from . import jsonout
from ._version import __version__
from .card import write_model_card
from .checkpoint import SourceCheckpoint, atomic_output_dir, check_output_location, check_path_encoding
from .errors import BadInputError, VerificationFailed, option
from .hub import resolve_source
from .dtype_checks import parse_dtype
from .plan import ConversionPlan, make_plan
from .progress import SILENT, Reporter
from .row_blocks import (
    DEFAULT_BLOCK_BYTES,
    RecentTensors,
    Workspace,
    by_columns,
    run_op,
    run_op_by_columns,
    run_op_in_blocks,
    sliced_inputs,
    stored_copy,
)
from .safetensors_io import OutputTensor, StreamingShardWriter
from .sizes import parse_size
from .spec_loader import match_spec
from .prompts import check_greedy_fits, read_prompt_lines
from .tolerances import Tolerances, failure_message
from .verification import verify

REMOTE_CODE_FILE = "modeling_prenorm.py"
# the package modules written beside the weights when the output needs remote code, and their names
# there (modeling.py imports norm_functions.py relatively; transformers copies both)
REMOTE_CODE_FILES = {"modeling.py": REMOTE_CODE_FILE, "norm_functions.py": "norm_functions.py"}
DEFAULT_MAX_SHARD_SIZE = "5GB"
BLOCK_BYTES = DEFAULT_BLOCK_BYTES  # float64 bytes per block of a row-wise op (tests make it tiny)


@dataclass
class ConversionResult:
    out: Path
    plan: ConversionPlan
    report: dict | None


def converted_config(source: SourceCheckpoint, plan: ConversionPlan, source_name: str, revision: str | None) -> dict:
    config = dict(source.config)
    spec = plan.spec
    model_type = config["model_type"]
    if plan.untied_head or plan.head_stored_apart:
        config[spec.config_keys["tie_word_embeddings"]] = False
    config.pop("torch_dtype", None)
    config["dtype"] = str(plan.out_dtype).removeprefix("torch.")
    if plan.landing is not None:
        _land(config, plan.landing)
    elif plan.requires_remote_code:
        auto_map = {
            "AutoConfig": f"modeling_prenorm.Prenorm{plan.base_config_class}",
            spec.auto_class: f"modeling_prenorm.Prenorm{plan.base_model_class}",
        }
        config["model_type"] = "prenorm_" + model_type
    else:
        auto_map = {spec.auto_class: f"modeling_prenorm.PrenormStock{plan.base_model_class}"}
    if plan.landing is None:
        config["auto_map"] = auto_map
    config["prenorm"] = {
        "target": plan.target,
        "fold_affine": plan.fold_affine,
        "family": spec.family,
        "source": source_name,
        "source_revision": revision,
        "source_model_type": model_type,
        "converter": "prenorm-convert",
        "converter_version": __version__,
        "hidden_size": plan.hidden_size,
        "residual_width": plan.residual_width,
        "untied_head": plan.untied_head,
        # embeddings whose rows the converted model centres at lookup (a table kept tied to the head)
        "centered_at_lookup": plan.centered_at_lookup,
        # modules whose input stream the converted model centres (a stream no weight can centre)
        "stream_entries": plan.stream_entries,
        # stem norms (a LayerNorm on the stream itself) kept, their output centred by the converted model
        "centered_stems": plan.centered_stems,
        # embeddings and writers whose outputs are centred while the model trains (docs/training.md)
        "train_centered": plan.train_centered,
        "train_centered_parameters": plan.train_centered_parameters,
        "folded_layer_scales": plan.folded_layer_scales,
        "requires_remote_code": plan.requires_remote_code,
        "norms": plan.norms,
        "biased": plan.biased,
        "removed": plan.removed,
        # parameter -> shape written, where it differs from the stock class (crmsnorm: d-1 wide stream)
        "resized": plan.resized,
        # crmsnorm --pad-to: tensors hold the residual_width features, zero-padded to stream_width
        "pad_to": plan.pad_to,
        "stream_width": plan.stream_width,
        "lands_in": plan.landing.architecture if plan.landing is not None else None,
    }
    return config


def _land(config: dict, landing) -> None:
    """config.json of the stock architecture the converted model is (spec lands_in)."""
    for key in landing.drop_config_keys:
        config.pop(key, None)
    config.update(landing.config)
    config["model_type"] = landing.model_type
    config["architectures"] = [landing.architecture]
    config.pop("auto_map", None)


def write_weights(source: SourceCheckpoint, plan: ConversionPlan, folder: Path, max_shard_bytes: int, reporter: Reporter) -> list[str]:
    outputs = [OutputTensor(op.name, op.dtype, op.shape) for op in plan.ops]
    writer = StreamingShardWriter(folder, outputs, max_shard_bytes)
    tensors = RecentTensors(source)
    workspace = Workspace()
    # the float64 work runs in small blocks and is bound by memory bandwidth; leave the other half
    # of the cores to the writer thread and the kernel's copies (measured: docs/performance.md)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 2) // 2)))
    try:
        for op in reporter.track(plan.ops, "rewriting tensors", total=len(plan.ops)):
            # unchanged tensors are copied file to file; row-wise ops stream in blocks, so memory
            # does not grow with the largest tensor (row_blocks.py)
            stored = stored_copy(op, source)
            sliced = sliced_inputs(op, {arg: source.tensors[key].shape for arg, key in op.inputs.items()})
            if stored is not None:
                writer.copy_stored(op.name, stored)
            elif sliced is None and by_columns(op):
                writer.write(op.name, run_op_by_columns(op, source))
            elif sliced is None:
                writer.write(op.name, run_op(op, tensors))
            else:
                writer.write_blocks(op.name, run_op_in_blocks(op, source, sliced, BLOCK_BYTES, workspace))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        torch.set_num_threads(threads)
    return writer.file_names


def copy_side_files(source: SourceCheckpoint, folder: Path) -> list[str]:
    copied = []
    for path in source.side_files():
        shutil.copy2(path, folder / path.name)
        copied.append(path.name)
    return copied


def write_remote_code(folder: Path) -> None:
    for module, name in REMOTE_CODE_FILES.items():
        (folder / name).write_text(resources.files("prenorm_convert").joinpath(module).read_text())


def convert(
    src: str | Path,
    out: str | Path,
    *,
    target: str = "rmsnorm",
    fold_affine: bool = False,
    dtype: str = "auto",
    overwrite: bool = False,
    verify_output: bool = True,
    allow_pickle: bool = False,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    tolerances: Tolerances | None = None,
    prompts_file: str | Path | None = None,
    max_memory: str | int | None = None,
    command: str | None = None,
    revision: str | None = None,
    token: str | None = None,
    pad_to: int | None = None,
    untie_head: bool = False,
    reporter: Reporter = SILENT,
) -> ConversionResult:
    """Convert the Pre-LN checkpoint in SRC into OUT. Raises VerificationFailed (after writing OUT,
    unless that would replace an existing OUT) when the converted model does not match; any other
    error leaves nothing behind."""
    out = Path(out)
    check_path_encoding(out, "OUT")
    out_dtype = parse_dtype(dtype)
    max_shard_bytes = parse_size(max_shard_size)
    if max_memory is not None:
        parse_size(max_memory, "--max-memory")  # a bad size fails now, not after the rewrite
    if out.exists() and not overwrite:
        raise BadInputError(f"'{out}' already exists; pass {option('--overwrite')} to replace it, or choose another output folder")
    if verify_output and prompts_file is not None:
        read_prompt_lines(prompts_file)  # a bad --prompts file fails now, not after the rewrite
    # SRC may be a hub id: download what the conversion reads (nothing is written to OUT before this succeeds)
    resolved = resolve_source(src, revision=revision, token=token, allow_pickle=allow_pickle, reporter=reporter)
    check_path_encoding(resolved.path, "SRC")
    check_output_location(resolved.path, out)
    source = SourceCheckpoint.open(resolved.path, allow_pickle=allow_pickle)
    if verify_output:
        check_greedy_fits(source.config, (tolerances or Tolerances()).greedy_tokens)
    spec = match_spec(source.config)
    with reporter.step(f"planning the {target} conversion of a {spec.family} checkpoint"):
        plan = make_plan(source, spec, target=target, fold_affine=fold_affine, dtype=out_dtype, pad_to=pad_to, untie_head=untie_head)
    report = None
    def mention_stale(folder: Path) -> None:
        reporter.warn(f"removed {folder}, left behind by an interrupted conversion into '{out}' that no running process owns")

    with atomic_output_dir(out, overwrite, on_stale=mention_stale) as staging:
        write_weights(source, plan, staging, max_shard_bytes, reporter)
        source.close()
        config = converted_config(source, plan, resolved.name, resolved.revision)
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copy_side_files(source, staging)
        if plan.landing is None:  # a stock architecture needs no code of ours
            write_remote_code(staging)
        if verify_output:
            report = verify(
                resolved, staging, tolerances=tolerances, prompts_file=prompts_file, allow_pickle=allow_pickle, max_memory=max_memory, reporter=reporter
            )
            if out.exists() and not report["passed"]:  # --overwrite replaces OUT only with a conversion that passed
                raise VerificationFailed(
                    failure_message(report) + f"; '{out}' was kept as it was and this conversion discarded "
                    "(convert into a new folder to keep a failing result)",
                    report,
                )
            (staging / "conversion_report.json").write_text(jsonout.dumps(report))
        write_model_card(staging, config, plan, report, command)
    result = ConversionResult(out, plan, report)
    if report is not None and not report["passed"]:
        raise VerificationFailed(failure_message(report), report, written=out)
    return result
