"""What the command line promises besides the conversion: it never deletes what it did not create,
cleans up after killed runs, keeps exit 1 for "does not match" only, prints user strings verbatim,
and speaks the caller's language (flags on the command line, arguments in Python)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_cli, snapshot


# -- demo --workdir: never delete what the tool did not create -----------------------------------


def test_demo_refuses_a_folder_holding_user_files_and_touches_nothing(tmp_path):
    workdir = tmp_path / "mine"
    (workdir / "original").mkdir(parents=True)
    (workdir / "original" / "thesis.tex").write_text("years of work")
    (workdir / "converted").mkdir()
    before = snapshot(workdir)
    result = run_cli("demo", "--workdir", workdir, "--quiet")
    assert result.exit_code == 2
    assert "did not create" in result.stderr and "choose a new or empty folder" in " ".join(result.stderr.split())
    assert snapshot(workdir) == before
    assert (workdir / "original" / "thesis.tex").read_text() == "years of work"


def test_demo_claims_a_new_folder_git_ignores_it_and_replaces_only_its_own_outputs(tmp_path):
    workdir = tmp_path / "demo"
    first = run_cli("demo", "--workdir", workdir, "--quiet")
    assert first.exit_code == 0, first.stderr
    assert (workdir / ".gitignore").read_text().splitlines()[-1] == "*"
    (workdir / "notes.txt").write_text("kept")  # added by the user next to the demo's outputs
    again = run_cli("demo", "--workdir", workdir, "--quiet", "--fold-affine")
    assert again.exit_code == 0, again.stderr
    assert (workdir / "notes.txt").read_text() == "kept"
    assert json.loads((workdir / "converted" / "config.json").read_text())["prenorm"]["fold_affine"] is True


# -- exit codes ----------------------------------------------------------------------------------


def test_an_internal_error_has_its_own_exit_code_and_saves_the_traceback(gpt2_dir, tmp_path, monkeypatch):
    from prenorm_convert import conversion

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(conversion, "write_weights", broken)
    parent = tmp_path / "parent"
    parent.mkdir()
    result = run_cli("convert", gpt2_dir, parent / "out", "--quiet")
    assert result.exit_code == 3
    line = " ".join(result.stderr.split())
    assert line.startswith("error: internal error (ZeroDivisionError: a bug)") and "bug in prenorm-convert" in line
    saved = Path(line.rsplit("saved to ", 1)[1].strip())
    assert "ZeroDivisionError" in saved.read_text() and "Traceback" in saved.read_text()
    saved.unlink()
    assert snapshot(parent) == {}


def _verify_with_an_error_in_the_audit(gpt2_dir, tmp_path, monkeypatch, error):
    """verify, with ``error`` raised by the per-layer audit's hooks, inside the original's forward."""
    from prenorm_convert import layer_audit

    def broken(output):
        raise error

    out = tmp_path / "out"
    assert run_cli("convert", gpt2_dir, out, "--quiet", "--no-verify").exit_code == 0
    monkeypatch.setattr(layer_audit, "_output", broken)
    return run_cli("verify", gpt2_dir, out, "--quiet")


def test_an_error_of_ours_inside_the_originals_forward_is_not_blamed_on_the_checkpoint(gpt2_dir, tmp_path, monkeypatch):
    """The per-layer audit's hooks run inside the original's forward pass: an error raised there is
    an internal error (exit 3), not "the original model does not run" (2)."""
    result = _verify_with_an_error_in_the_audit(gpt2_dir, tmp_path, monkeypatch, IndexError("tuple index out of range"))
    assert result.exit_code == 3, result.stderr
    assert "does not run in the installed transformers" not in result.stderr and "IndexError" in result.stderr
    Path(" ".join(result.stderr.split()).rsplit("saved to ", 1)[1].strip()).unlink()


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate 8589934592 bytes"),
        MemoryError(),
    ],
    ids=["accelerator", "cpu-allocator", "python"],
)
def test_running_out_of_memory_is_the_machines_limit_not_a_bug(gpt2_dir, tmp_path, monkeypatch, error):
    """Out of memory anywhere (here inside the original's forward) is an environment error, as a
    full disk is: exit 2, one line that says so and how to verify within less memory, no traceback
    file, not blamed on the checkpoint."""
    result = _verify_with_an_error_in_the_audit(gpt2_dir, tmp_path, monkeypatch, error)
    assert result.exit_code == 2, result.stderr
    line = " ".join(result.stderr.split())
    assert line.startswith("error: ran out of memory") and "--max-memory SIZE" in line and "nothing was written" in line
    assert "bug in prenorm-convert" not in line and "does not run in the installed transformers" not in line


def test_running_out_of_memory_inside_transformers_code_is_not_blamed_on_the_checkpoint(gpt2_dir, tmp_path, monkeypatch):
    """torch's CPU allocator raises a RuntimeError from the op transformers' code called: the
    original's forward ran out of memory, it is not a model the installed transformers cannot run."""
    from transformers.models.gpt2 import modeling_gpt2

    def allocation_fails(self, hidden_states):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate 8589934592 bytes")

    out = tmp_path / "out"
    assert run_cli("convert", gpt2_dir, out, "--quiet", "--no-verify").exit_code == 0
    monkeypatch.setattr(modeling_gpt2.GPT2MLP, "forward", allocation_fails)
    result = run_cli("verify", gpt2_dir, out, "--quiet")
    assert result.exit_code == 2, result.stderr
    line = " ".join(result.stderr.split())
    assert line.startswith("error: ran out of memory") and "does not run in the installed transformers" not in line


@pytest.mark.parametrize(
    "arguments, words",
    [
        (("convert", "{src}", "{out}", "--max-shard-size", "infGB"), "--max-shard-size must look like"),
        (("convert", "{src}", "{out}", "--target", "crmsnorm", "--pad-to", "100000"), "--pad-to 100000 is larger than the hidden size"),
        (("bench", "{src}", "{src}", "--device", "mps"), "--device 'mps' is not usable on this machine"),
        (("convert", "{bad_utf8}", "{out}"), "not a valid UTF-8 path"),
        (("convert", "{src}", "{bad_utf8_out}"), "not a valid UTF-8 path"),
    ],
)
def test_odd_arguments_are_bad_input_not_crashes(gpt2_dir, tmp_path, arguments, words):
    parent = tmp_path / "parent"
    parent.mkdir()
    bad = Path(os.fsdecode(bytes(tmp_path) + b"/\xff\xfe"))
    names = {"src": gpt2_dir, "out": parent / "out", "bad_utf8": bad, "bad_utf8_out": Path(os.fsdecode(bytes(parent) + b"/o\xff"))}
    if "{bad_utf8}" in arguments:
        bad.mkdir()
        for entry in gpt2_dir.iterdir():
            (bad / entry.name).write_bytes(entry.read_bytes())
    result = run_cli(*[str(word).format(**names) for word in arguments], "--quiet")
    assert result.exit_code == 2, result.stderr
    assert result.stderr.startswith("error:") and len(result.stderr.strip().splitlines()) == 1
    if words:
        assert words in result.stderr
    assert snapshot(parent) == {}


# -- stale partial folders -----------------------------------------------------------------------


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_killed_runs_partial_folder_is_removed_and_mentioned_a_live_ones_kept(gpt2_dir, tmp_path):
    import socket

    from prenorm_convert.checkpoint import OWNER_FILE, _process_start

    out = tmp_path / "out"
    stale = tmp_path / ".out.partial-killed"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)
    (stale / OWNER_FILE).write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname(), "started": "1"}))
    live = tmp_path / ".out.partial-running"
    live.mkdir()
    (live / OWNER_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": _process_start(os.getpid())}))
    elsewhere = tmp_path / ".out.partial-other-host"
    elsewhere.mkdir()
    (elsewhere / OWNER_FILE).write_text(json.dumps({"pid": 1, "host": "another-machine", "started": None}))
    unrelated = tmp_path / ".other.partial-x"
    unrelated.mkdir()
    result = run_cli("convert", gpt2_dir, out, "--quiet", "--no-verify")
    assert result.exit_code == 0, result.stderr
    assert not stale.exists() and live.exists() and elsewhere.exists() and unrelated.exists()
    assert f"removed {stale}" in " ".join(result.stderr.split()).replace(" ", " ")
    assert not list(out.glob(".prenorm-owner*")), "the owner file is not part of the output"


# -- plain transformers ----------------------------------------------------------------------------


def test_pipeline_accepts_the_stock_class_output_and_save_pretrained_round_trips(gpt2_dir, tmp_path, caplog):
    import torch
    import transformers

    out = tmp_path / "out"
    assert run_cli("convert", gpt2_dir, out, "--quiet", "--no-verify").exit_code == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True)
    assert type(model).__name__ == "GPT2LMHeadModel" and "PrenormRMSNorm" in {type(m).__name__ for m in model.modules()}
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    transformers.utils.logging.enable_propagation()
    try:
        with caplog.at_level("ERROR"):
            generator = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)
            generator("The quick", max_new_tokens=2, do_sample=False)
    finally:
        transformers.utils.logging.disable_propagation()
    assert "is not supported for text-generation" not in caplog.text
    model.save_pretrained(str(tmp_path / "resaved"))
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "resaved"), trust_remote_code=True)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


# -- text ----------------------------------------------------------------------------------------


def test_user_strings_are_printed_verbatim_and_quiet_keeps_the_results(gpt2_dir, tmp_path):
    out = tmp_path / "o[v2]"
    result = run_cli("convert", gpt2_dir, out, "--quiet", "--greedy-tokens", "2")
    assert result.exit_code == 0, result.stderr
    text = " ".join(result.stderr.split())
    assert f"wrote {out}" in text
    assert "top-1 agreement" in text, "--quiet hides progress, not the result table"
    assert "✓" not in text


def test_flags_show_no_value_placeholder_in_help():
    result = run_cli("convert", "--help")
    assert result.exit_code == 0
    assert "<bool>" not in result.stdout and "--fold-affine" in result.stdout


def test_python_api_errors_name_python_arguments(gpt2_dir, tmp_path):
    import prenorm_convert

    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(prenorm_convert.BadInputError, match="overwrite=True"):
        prenorm_convert.convert(gpt2_dir, out)
    result = run_cli("convert", gpt2_dir, out, "--quiet")
    assert result.exit_code == 2 and "--overwrite" in result.stderr
