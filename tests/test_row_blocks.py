"""Row-block execution (row_blocks.py) gives bit-for-bit the result of running each op whole."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prenorm_convert import conversion, row_blocks, transform
from prenorm_convert.checkpoint import SourceCheckpoint
from prenorm_convert.examples import build_checkpoint
from prenorm_convert.plan import make_plan
from prenorm_convert.row_blocks import RecentTensors, by_columns, run_op, run_op_by_columns, run_op_in_blocks, sliced_inputs
from prenorm_convert.spec_loader import match_spec

# small enough that every row-wise tensor of the tiny models is split into several uneven blocks,
# and each block into several uneven compute blocks
TINY_BLOCK_BYTES = 3000
TINY_COMPUTE_BYTES = 1100


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("row-blocks")
    folders = {}
    for seed, family in enumerate(("gpt2", "opt", "bloom")):
        folders[family] = root / family
        build_checkpoint(folders[family], family, seed=seed, tokenizer=False, max_shard_size="10MB")
    return folders


@pytest.mark.parametrize("family", ["gpt2", "opt", "bloom"])
@pytest.mark.parametrize("target,fold", [("rmsnorm", False), ("rmsnorm", True), ("crmsnorm", True)])
def test_blocks_equal_whole_op_bit_for_bit(family_dirs, family, target, fold):
    source = SourceCheckpoint.open(family_dirs[family])
    plan = make_plan(source, match_spec(source.config), target=target, fold_affine=fold, dtype=torch.float64)  # compare the float64 results themselves
    cache = RecentTensors(source)
    streamed_roles = set()
    for op in plan.ops:
        sliced = sliced_inputs(op, {arg: source.tensors[key].shape for arg, key in op.inputs.items()})
        if sliced is None:
            continue
        # each block is a view of a reused buffer: keep a copy
        blocks = [block.clone() for block in run_op_in_blocks(op, source, sliced, TINY_BLOCK_BYTES, compute_bytes=TINY_COMPUTE_BYTES)]
        whole = run_op(op, cache)
        assert torch.equal(bits(torch.cat(blocks)), bits(whole)), op.name
        if torch.Size(op.shape).numel() * 8 > 2 * TINY_BLOCK_BYTES:
            assert len(blocks) > 1, f"{op.name} was not split"
        streamed_roles.add(op.role)
    source.close()
    # the big tensors of every family stream: embeddings, and the head / readers
    assert {"embedding", "reader"} <= streamed_roles
    if family == "gpt2":  # Conv1D writers average over columns, so their rows are independent
        assert "writer" in streamed_roles


@pytest.mark.parametrize("family", ["opt", "bloom"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_linear_writers_by_column_chunks_equal_the_whole_op_bit_for_bit(family_dirs, family, dtype, monkeypatch):
    monkeypatch.setattr(transform, "LINEAR_COLUMN_CHUNK", 24)  # several uneven chunks per writer
    source = SourceCheckpoint.open(family_dirs[family])
    plan = make_plan(source, match_spec(source.config), target="rmsnorm", fold_affine=False, dtype=dtype)
    ops = [op for op in plan.ops if by_columns(op)]
    assert ops and {op.role for op in ops} == {"writer"}
    for op in ops:
        lean = run_op_by_columns(op, source)
        assert torch.equal(bits(lean), bits(run_op(op, RecentTensors(source)))), op.name
        if dtype == torch.float64:  # every output column (fixed input) zero-mean over the outputs
            assert lean.mean(dim=0).abs().max() < 1e-15 * max(1.0, float(lean.abs().max()))
    source.close()


def test_row_rules_refuse_reductions_over_rows():
    from prenorm_convert.plan import TensorOp

    def op(steps, shapes, out_shape):
        return TensorOp("t", "x", {arg: arg for arg in shapes}, tuple(steps), out_shape, torch.float32), shapes

    # Linear writer: the mean runs over rows (outputs), so rows are not independent
    assert sliced_inputs(*op([("center_writer_weight", {"layout": "linear"})], {"weight": (8, 4)}, (8, 4))) is None
    # Conv1D fold_beta sums over rows (inputs)
    assert sliced_inputs(*op([("fold_beta", {"layout": "conv1d"})], {"weight": (4, 8), "beta": (4,)}, (8,))) is None
    # a bias is averaged as a whole
    assert sliced_inputs(*op([("center_vector", {})], {"x": (8,)}, (8,))) is None
    # a step this module does not know runs whole
    assert sliced_inputs(*op([("some_future_step", {})], {"x": (8, 4)}, (8, 4))) is None
    # a row-wise chain: Conv1D writer centred, then its last output dropped (crmsnorm)
    chain = [("center_writer_weight", {"layout": "conv1d"}), ("drop_last_output", {"layout": "conv1d"})]
    assert sliced_inputs(*op(chain, {"weight": (8, 4)}, (8, 3))) == ("weight",)
    # Linear fold_beta: weight and bias rows go together, beta stays whole
    shapes = {"weight": (8, 4), "beta": (4,), "bias": (8,)}
    assert sliced_inputs(*op([("fold_beta", {"layout": "linear"})], shapes, (8,))) == ("weight", "bias")


def test_converted_files_identical_with_tiny_blocks(gpt2_dir, tmp_path, monkeypatch):
    conversion.convert(gpt2_dir, tmp_path / "default", fold_affine=True, verify_output=False)
    monkeypatch.setattr(conversion, "BLOCK_BYTES", TINY_BLOCK_BYTES)
    monkeypatch.setattr(row_blocks, "DEFAULT_COMPUTE_BYTES", TINY_COMPUTE_BYTES)
    conversion.convert(gpt2_dir, tmp_path / "tiny", fold_affine=True, verify_output=False)
    files = sorted(path.name for path in (tmp_path / "default").glob("*.safetensors"))
    assert files and files == sorted(path.name for path in (tmp_path / "tiny").glob("*.safetensors"))
    for name in files:
        assert (tmp_path / "default" / name).read_bytes() == (tmp_path / "tiny" / name).read_bytes(), name


def test_unchanged_tensors_copied_exactly_without_copy_file_range(gpt2_dir, tmp_path, monkeypatch):
    """Unchanged tensors are copied file to file (os.copy_file_range); where the kernel or file
    system cannot, the fallback through memory writes the same bytes."""
    import os

    from safetensors import safe_open

    conversion.convert(gpt2_dir, tmp_path / "kernel", verify_output=False)

    def unsupported(*args, **kwargs):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(os, "copy_file_range", unsupported, raising=False)
    conversion.convert(gpt2_dir, tmp_path / "fallback", verify_output=False)
    files = sorted(path.name for path in (tmp_path / "kernel").glob("*.safetensors"))
    for name in files:
        assert (tmp_path / "kernel" / name).read_bytes() == (tmp_path / "fallback" / name).read_bytes(), name
    # the unchanged tensors are the stored ones, bit for bit (read back with the safetensors library)
    source = SourceCheckpoint.open(gpt2_dir)
    index = {}
    for name in files:
        with safe_open(str(tmp_path / "kernel" / name), framework="pt") as handle:
            index.update({key: handle.get_tensor(key) for key in handle.keys()})
    copied = 0
    for key, info in source.tensors.items():
        if key.endswith(("c_attn.weight", "c_fc.weight", "ln_1.weight", "ln_2.bias")):
            assert torch.equal(bits(index[key]), bits(source.read(key))), key
            copied += 1
    source.close()
    assert copied > 0
