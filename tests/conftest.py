"""Shared fixtures: tiny on-disk checkpoints built once per session, and helpers to run the CLI."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from prenorm_convert.cli import app
from prenorm_convert.examples import build_checkpoint, strip_prefix

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)
# torch, transformers and this package are imported for the whole session: leave their objects out
# of every later garbage collection, whose cost grows with what it scans (measured: a fifth of a
# conformance run was spent in collections)
gc.freeze()


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str


def run_cli(*args: str) -> CliResult:
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    return CliResult(result.exit_code, result.stdout, result.stderr)


def conversion_cache(tmp_path_factory, resolve_source: Callable[[str], Path], common: tuple[str, ...] = ()):
    """Convert each (source name, options) once through the CLI, sharded small, with the options in
    ``common`` added to every conversion: -> (source folder, output folder). resolve_source turns a
    name into the source folder."""
    cache: dict = {}

    def get(name: str, options: tuple[str, ...] = ()):
        key = (name, tuple(options))
        if key not in cache:
            src = resolve_source(name)
            out = tmp_path_factory.mktemp("out") / "converted"
            result = run_cli("convert", src, out, "--quiet", "--max-shard-size", "200KB", *common, *options)
            assert result.exit_code == 0, result.stderr
            cache[key] = (src, out)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def gpt2_dir(checkpoints) -> Path:
    """GPT-2 as save_pretrained writes it: `transformer.` keys, sharded, tied head, tokenizer."""
    folder = checkpoints / "gpt2"
    build_checkpoint(folder, "gpt2", seed=1)
    return folder


@pytest.fixture(scope="session")
def gpt2_bare_dir(checkpoints) -> Path:
    """GPT-2 in the original hub upload style: keys without `transformer.`, plus attn.bias mask buffers."""
    folder = checkpoints / "gpt2-bare"
    model = build_checkpoint(folder, "gpt2", seed=2, overrides={"n_head": 2, "n_inner": 96}, max_shard_size="10MB")
    positions = model.config.n_positions
    mask = torch.tril(torch.ones(positions, positions, dtype=torch.bool)).view(1, 1, positions, positions)
    buffers = {f"h.{i}.attn.bias": mask.clone() for i in range(model.config.n_layer)}
    strip_prefix(folder, "transformer.", extra=buffers)
    return folder


def snapshot(folder: Path) -> dict[str, float]:
    """Every path below folder with its mtime: 'nothing was written' means this is unchanged."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


def tamper(folder: Path, name: str, scale: float = 0.05) -> None:
    """Add noise to one tensor of a converted folder (e.g. the writer of one layer)."""
    for shard in sorted(folder.glob("*.safetensors")):
        tensors = load_file(shard)
        if name in tensors:
            generator = torch.Generator().manual_seed(0)
            tensors[name] = tensors[name] + scale * torch.randn(tensors[name].shape, generator=generator).to(tensors[name].dtype)
            save_file(tensors, shard, metadata={"format": "pt"})
            return
    raise AssertionError(f"no tensor {name} in {folder}")


def child_peak_rss(code: str, *args) -> int:
    """Run ``code`` in a fresh interpreter (``sys.argv[1:]`` = args) and return its own peak resident
    memory in bytes: VmHWM from /proc/self/status, which restarts at exec (unlike ru_maxrss, which
    would include the test process the child was forked from)."""
    report = "; print([line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM:')][0])"
    result = subprocess.run([sys.executable, "-c", code + report, *map(str, args)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split()[-1]) * 1024  # the kernel reports KiB
