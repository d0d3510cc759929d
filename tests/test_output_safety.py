"""OUT is replaced atomically, never at the original's expense: SRC/OUT overlap, failed
verification under --overwrite, SIGTERM, an OUT that appears mid-run, environment errors, and
the permissions OUT gets."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal

import pytest

from conftest import run_cli, snapshot


@pytest.fixture
def src(gpt2_dir, tmp_path):
    target = tmp_path / "work" / "src"
    shutil.copytree(gpt2_dir, target)
    return target


def assert_src_kept(src, before, result, *message_parts):
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    assert result.stderr.startswith("error:") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    for part in message_parts:
        assert part in " ".join(result.stderr.split()), result.stderr
    assert snapshot(src) == before, "the original was modified"


def test_out_can_never_be_src_by_another_name(src, tmp_path):
    work = src.parent
    before = snapshot(src)
    (work / "link").symlink_to(src)
    dotted = work / ".." / work.name / "src"
    for out, why in ((dotted, "is SRC or a folder that holds it"), (work / "link", "is SRC or a folder that holds it"),
                     (work, "is SRC or a folder that holds it"), (src / "sub", "is inside SRC")):
        result = run_cli("convert", src, out, "--quiet", "--overwrite", "--no-verify")
        assert_src_kept(src, before, result, why)
    result = run_cli("convert", work / "link", src, "--quiet", "--overwrite", "--no-verify")
    assert_src_kept(src, before, result, "is SRC or a folder that holds it")
    assert sorted(p.name for p in work.iterdir()) == ["link", "src"], "nothing may be left beside SRC"


def test_overwrite_keeps_a_good_out_when_the_new_conversion_fails_verification(src, tmp_path):
    out = tmp_path / "out"
    assert run_cli("convert", src, out, "--quiet").exit_code == 0
    before = snapshot(out)
    report_path = tmp_path / "report.json"
    result = run_cli("convert", src, out, "--quiet", "--overwrite", "--target", "crmsnorm", "--max-abs-logit-diff", "0",
                     "--json", report_path)
    assert result.exit_code == 1, result.stderr
    assert "verification failed" in result.stderr and "was kept as it was" in result.stderr
    assert snapshot(out) == before
    assert json.loads(report_path.read_text())["passed"] is False, "the report of the failed run is still written"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "report.json", "work"]


def test_a_failed_verification_into_a_new_out_still_writes_it(src, tmp_path):
    result = run_cli("convert", src, tmp_path / "out", "--quiet", "--max-abs-logit-diff", "0", "--target", "crmsnorm")
    assert result.exit_code == 1 and "verification failed" in result.stderr
    assert json.loads((tmp_path / "out" / "conversion_report.json").read_text())["passed"] is False


def interrupt_while_writing(monkeypatch, action):
    from prenorm_convert import conversion

    monkeypatch.setattr(conversion, "write_remote_code", lambda folder: action())


def test_sigterm_leaves_nothing(src, tmp_path, monkeypatch):
    interrupt_while_writing(monkeypatch, lambda: os.kill(os.getpid(), signal.SIGTERM))
    before = snapshot(tmp_path)
    result = run_cli("convert", src, tmp_path / "out", "--quiet", "--no-verify")
    assert result.exit_code == 143 and "terminated" in result.stderr and "nothing was written" in result.stderr
    assert snapshot(tmp_path) == before
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "the handler is the CLI's only while it runs"


def test_an_out_that_appears_mid_run_is_not_replaced_without_overwrite(src, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def someone_else_writes_out():
        out.mkdir()
        (out / "theirs.txt").write_text("mine")

    interrupt_while_writing(monkeypatch, someone_else_writes_out)
    result = run_cli("convert", src, out, "--quiet", "--no-verify")
    assert result.exit_code == 2 and "appeared while converting" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "work"]


def test_disk_full_is_one_line_exit_2_and_nothing_written(src, tmp_path, monkeypatch):
    def disk_full():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "out" / "modeling_prenorm.py"))

    interrupt_while_writing(monkeypatch, disk_full)
    before = snapshot(tmp_path)
    result = run_cli("convert", src, tmp_path / "out", "--quiet", "--no-verify")
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: No space left on device") and "nothing was written" in lines[0]
    assert snapshot(tmp_path) == before


def test_out_gets_the_umask_permissions_of_an_ordinary_folder(src, tmp_path):
    previous = os.umask(0o027)
    try:
        result = run_cli("convert", src, tmp_path / "out", "--quiet", "--no-verify")
    finally:
        os.umask(previous)
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750


def test_sigterm_is_not_swallowed_by_code_that_catches_exceptions(src, tmp_path, monkeypatch):
    import transformers

    def terminate(*args, **kwargs):  # inside verification's `except Exception` around the tokenizer
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", terminate)
    before = snapshot(tmp_path)
    result = run_cli("convert", src, tmp_path / "out", "--quiet")
    assert result.exit_code == 143, result.stderr
    assert snapshot(tmp_path) == before


def test_a_report_that_cannot_be_written_says_out_was(src, tmp_path):
    out = tmp_path / "out"
    result = run_cli("convert", src, out, "--quiet", "--json", "/proc/version")
    assert result.exit_code == 2
    message = " ".join(result.stderr.split())
    assert "could not write the report to --json '/proc/version'" in message and f"{out} was written" in message
    assert json.loads((out / "conversion_report.json").read_text())["passed"]


def test_out_that_is_src_under_another_spelling_is_refused(src, tmp_path, monkeypatch):
    """Case-insensitive disks and bind mounts name one folder two ways; resolve() does not see it,
    os.path.samefile does (simulated here: this machine's disk is case-sensitive)."""
    other = tmp_path / "SRC-elsewhere"
    other.mkdir()
    real_samefile = os.path.samefile
    monkeypatch.setattr(os.path, "samefile", lambda a, b: {str(a), str(b)} == {str(other.resolve()), str(src.resolve())} or real_samefile(a, b))
    before = snapshot(src)
    result = run_cli("convert", src, other, "--quiet", "--overwrite", "--no-verify")
    assert_src_kept(src, before, result, "is SRC or a folder that holds it")
