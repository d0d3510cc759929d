"""`verify` as a CI gate: thresholds decide the exit code, bad thresholds are usage errors,
and the documented report schema and example workflow stay in step with the code."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from conftest import run_cli, snapshot

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.fixture(scope="module")
def unverified(gpt2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gate") / "out"
    result = run_cli("convert", gpt2_dir, out, "--quiet", "--no-verify")
    assert result.exit_code == 0, result.stderr
    return out


def documented_fields(report: dict) -> set[str]:
    fields = set()
    for key, value in report.items():
        fields.add(key)
        # these rows list their fields (or, for files_sha256, hold file names)
        if isinstance(value, dict) and key not in ("original_in_dtype", "original_float32_error", "files_sha256"):
            fields.update(f"{key}.{inner}" for inner in value)
    return fields


def test_threshold_over_the_measured_error_fails_with_exit_1_and_a_documented_report(gpt2_dir, unverified, tmp_path):
    report_path = tmp_path / "report.json"
    result = run_cli("verify", gpt2_dir, unverified, "--quiet", "--max-abs-logit-diff", "0", "--greedy-tokens", "0", "--json", report_path)
    assert result.exit_code == 1, result.stderr
    report = json.loads(report_path.read_text())
    assert report["passed"] is False and report["tolerances"]["max_abs_logit_diff"] == 0
    assert [failure for failure in report["failures"] if failure.startswith("max |Δlogit|")]
    assert report["greedy_match"]["tokens_compared"] == 0 and report["greedy_match"]["prompts"] == 0
    # the float32 defaults still apply to the thresholds not given
    assert report["tolerances"]["max_kl"] == 1e-6 and report["tolerances"]["min_top1"] == 1.0
    schema = (DOCS / "report.md").read_text()
    undocumented = [field for field in documented_fields(report) if f"`{field}`" not in schema]
    assert not undocumented, f"docs/report.md does not describe {undocumented}"


@pytest.mark.parametrize(
    "option, value",
    [("--max-abs-logit-diff", "-1e-3"), ("--max-kl", "-1"), ("--min-top1", "1.5"), ("--min-top1", "-0.1"), ("--greedy-tokens", "-1")],
)
def test_bad_thresholds_are_usage_errors_before_any_work(gpt2_dir, unverified, tmp_path, option, value):
    result = run_cli("verify", gpt2_dir, unverified, "--quiet", option, value)
    assert result.exit_code == 2 and option in result.stderr, result.stderr
    parent = tmp_path / "parent"
    parent.mkdir()
    result = run_cli("convert", gpt2_dir, parent / "out", "--quiet", option, value)
    assert result.exit_code == 2 and option in result.stderr, result.stderr
    assert snapshot(parent) == {}


def test_example_ci_workflow_is_valid_and_gates_on_the_exit_code():
    text = (DOCS / "ci.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1
    workflow = yaml.safe_load(blocks[0])
    steps = workflow["jobs"]["convert"]["steps"]
    commands = "\n".join(step.get("run", "") for step in steps)
    assert "prenorm-convert convert" in commands and "prenorm-convert verify" in commands
    assert "--max-abs-logit-diff" in commands and "--min-top1" in commands and "prenorm-convert push" in commands
    assert not [step for step in steps if step.get("continue-on-error")], "a failing report must fail the job"
    assert any(step.get("if") == "always()" for step in steps), "reports are kept when the gate fails"
