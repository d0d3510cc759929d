"""Every bad input: a one-line message naming the problem and the fix, exit 2, nothing written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from conftest import run_cli, snapshot


@pytest.fixture
def workspace(tmp_path):
    (tmp_path / "out-parent").mkdir()
    return tmp_path


def copy_of(src, workspace, name="src"):
    target = workspace / name
    shutil.copytree(src, target)
    return target


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def assert_refused(workspace, src, *message_parts, extra=()):
    parent = workspace / "out-parent"
    before = snapshot(parent)
    source_before = snapshot(src) if src.exists() else None
    result = run_cli("convert", src, parent / "out", "--quiet", *extra)
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    message = " ".join(result.stderr.split())
    for part in message_parts:
        assert part in message, f"{part!r} not in {message!r}"
    assert message.startswith("error:")
    assert snapshot(parent) == before, "something was written"
    if source_before is not None:
        assert snapshot(src) == source_before, "the source was modified"
    return message


def test_missing_path(workspace):
    assert_refused(workspace, workspace / "nope", "does not exist", "config.json")


def test_folder_without_config_is_not_a_checkpoint(workspace):
    (workspace / "empty").mkdir()
    assert_refused(workspace, workspace / "empty", "not a transformers checkpoint", "no config.json")


def test_unsupported_family_lists_supported(gpt2_dir, workspace):
    src = copy_of(gpt2_dir, workspace)
    edit_config(src, model_type="mamba", architectures=["MambaForCausalLM"])
    assert_refused(workspace, src, "'mamba' is not supported", "supported families:", "gpt2")


def test_post_layernorm_bert_says_why(gpt2_dir, workspace):
    src = copy_of(gpt2_dir, workspace)
    edit_config(src, model_type="bert", architectures=["BertForMaskedLM"])
    assert_refused(workspace, src, "'bert'", "Post-LN")


def test_already_rmsnorm_says_nothing_to_convert(gpt2_dir, workspace):
    src = copy_of(gpt2_dir, workspace)
    edit_config(src, model_type="llama", architectures=["LlamaForCausalLM"])
    assert_refused(workspace, src, "already uses RMSNorm")


def test_gpt2_with_cross_attention_is_refused(gpt2_dir, workspace):
    src = copy_of(gpt2_dir, workspace)
    edit_config(src, add_cross_attention=True)
    assert_refused(workspace, src, "add_cross_attention")


def test_already_converted_checkpoint(gpt2_dir, workspace):
    first = workspace / "first"
    assert run_cli("convert", gpt2_dir, first, "--quiet", "--no-verify").exit_code == 0
    assert_refused(workspace, first, "already converted", "original checkpoint")


def test_existing_out_without_overwrite_is_untouched(gpt2_dir, workspace):
    out = workspace / "out-parent" / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = snapshot(workspace / "out-parent")
    result = run_cli("convert", gpt2_dir, out, "--quiet")
    assert result.exit_code == 2 and "already exists" in result.stderr and "--overwrite" in result.stderr
    assert snapshot(workspace / "out-parent") == before


def test_overwrite_replaces_existing_out(gpt2_dir, workspace):
    out = workspace / "out-parent" / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    result = run_cli("convert", gpt2_dir, out, "--quiet", "--no-verify", "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in (workspace / "out-parent").iterdir()) == ["out"]


def _make_pickled(gpt2_dir, workspace):
    src = copy_of(gpt2_dir, workspace)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    state = {}
    for file_name in sorted(set(index["weight_map"].values())):
        with safe_open(str(src / file_name), "pt") as handle:
            state.update({key: handle.get_tensor(key) for key in handle.keys()})
        (src / file_name).unlink()
    (src / "model.safetensors.index.json").unlink()
    torch.save(state, src / "pytorch_model.bin")
    return src


def test_pickled_weights_need_allow_pickle(gpt2_dir, workspace):
    src = _make_pickled(gpt2_dir, workspace)
    assert_refused(workspace, src, "pickled", "--allow-pickle")
    out = workspace / "out-parent" / "out"
    result = run_cli("convert", src, out, "--quiet", "--allow-pickle")
    assert result.exit_code == 0, result.stderr
    assert json.loads((out / "conversion_report.json").read_text())["passed"]
    assert not list(out.glob("*.bin"))
    # verify asks the same consent for the original, and names the flag it has
    refused = run_cli("verify", src, out, "--quiet", "--json", "-")
    assert refused.exit_code == 2 and "pickled" in refused.stderr and "--allow-pickle" in refused.stderr
    assert refused.stdout == ""
    allowed = run_cli("verify", src, out, "--quiet", "--json", "-", "--allow-pickle")
    assert allowed.exit_code == 0, allowed.stderr
    assert json.loads(allowed.stdout)["passed"]


def test_truncated_shard(gpt2_dir, workspace):
    src = copy_of(gpt2_dir, workspace)
    shard = sorted(src.glob("model-*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    assert_refused(workspace, src, shard.name, "truncated", "re-download")


def test_garbage_shard(gpt2_dir, workspace):
    src = copy_of(gpt2_dir, workspace)
    shard = sorted(src.glob("model-*.safetensors"))[0]
    shard.write_bytes(b"\x00" * 64)
    assert_refused(workspace, src, shard.name, "re-download")


def test_index_names_a_tensor_no_shard_holds(gpt2_dir, workspace):
    src = copy_of(gpt2_dir, workspace)
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first_shard = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"]["transformer.h.0.ln_1.weight"] = first_shard if index["weight_map"]["transformer.h.0.ln_1.weight"] != first_shard else sorted(set(index["weight_map"].values()))[1]
    index_path.write_text(json.dumps(index))
    assert_refused(workspace, src, "transformer.h.0.ln_1.weight", "does not hold it", "re-download")


def test_index_names_a_missing_shard(gpt2_dir, workspace):
    src = copy_of(gpt2_dir, workspace)
    shard = sorted(src.glob("model-*.safetensors"))[0]
    shard.unlink()
    assert_refused(workspace, src, shard.name, "missing")


def test_bad_options(gpt2_dir, workspace):
    assert_refused(workspace, gpt2_dir, "--dtype", extra=("--dtype", "float8"))
    assert_refused(workspace, gpt2_dir, "--target", extra=("--target", "batchnorm"))
    assert_refused(workspace, gpt2_dir, "--max-shard-size", extra=("--max-shard-size", "lots"))


def test_failure_during_write_leaves_nothing(gpt2_dir, workspace, monkeypatch):
    from prenorm_convert import conversion

    def explode(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(conversion, "copy_side_files", explode)
    parent = workspace / "out-parent"
    before = snapshot(parent)
    result = run_cli("convert", gpt2_dir, parent / "out", "--quiet")
    assert result.exit_code == 130 and "nothing was written" in result.stderr
    assert snapshot(parent) == before


def test_verify_bad_input(workspace, gpt2_dir):
    result = run_cli("verify", gpt2_dir, gpt2_dir, "--quiet")
    assert result.exit_code == 2 and "not a folder written by prenorm-convert" in result.stderr
    result = run_cli("verify", workspace / "nope", gpt2_dir, "--quiet")
    assert result.exit_code == 2 and "not a checkpoint folder" in result.stderr


def test_config_that_disagrees_with_the_weights(gpt2_dir, workspace):
    for name, changes, parts in (
        ("vocab", {"vocab_size": 500}, ("config.json and the weights disagree", "transformer.wte.weight", "[384, 64]", "[500, 64]")),
        ("width", {"n_embd": 128}, ("config.json and the weights disagree",)),
        ("heads", {"n_embd": 999}, ("transformers cannot build a model from this config.json", "divisible")),
    ):
        src = copy_of(gpt2_dir, workspace, name)
        edit_config(src, **changes)
        assert_refused(workspace, src, *parts)


def test_bad_json_path_is_refused_before_any_work(gpt2_dir, workspace):
    assert_refused(workspace, gpt2_dir, "--json", "its folder does not exist", extra=("--json", workspace / "nodir" / "r.json"))
    assert_refused(workspace, gpt2_dir, "--json", "is a folder", extra=("--json", workspace))


def test_bad_prompts_file_is_refused_before_any_work(gpt2_dir, workspace):
    binary = workspace / "prompts.bin"
    binary.write_bytes(b"\xff\xfe\x00bad")
    assert_refused(workspace, gpt2_dir, "--prompts", "not UTF-8", extra=("--prompts", binary))
    assert_refused(workspace, gpt2_dir, "--prompts", "is not a file", extra=("--prompts", gpt2_dir))
    assert_refused(workspace, gpt2_dir, "--prompts", "does not exist", extra=("--prompts", workspace / "none.txt"))


def test_prompts_longer_than_the_model_are_cut_to_its_positions(gpt2_dir, workspace):
    prompts = workspace / "long.txt"
    prompts.write_text("A long domain text that goes on and on about norms and residual streams. " * 30 + "\nshort\n")
    result = run_cli("convert", gpt2_dir, workspace / "out-parent" / "out", "--quiet", "--prompts", prompts, "--json", "-")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] and report["prompts"] == 2 and report["greedy_match"]["identical"]
    assert report["positions"] > 128, "the long prompt counts up to the model's 128 positions"


def test_verify_reports_a_failure_in_one_line_and_its_table_even_when_quiet(gpt2_dir, workspace):
    """--quiet hides progress only: the result table and the one failure line are still printed."""
    out = workspace / "out-parent" / "out"
    assert run_cli("convert", gpt2_dir, out, "--quiet", "--no-verify").exit_code == 0
    result = run_cli("verify", gpt2_dir, out, "--quiet", "--max-abs-logit-diff", "0")
    assert result.exit_code == 1 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: verification failed: max |Δlogit|")
    assert [line for line in lines if "top-1 agreement" in line], "the result table is shown"
    assert not [line for line in lines if "✓" in line or "comparing logits" in line], "no progress when quiet"
    result = run_cli("verify", out, out, "--quiet")
    assert result.exit_code == 2 and "was written by prenorm-convert" in result.stderr


def test_demo_prints_plain_json_on_request_and_paths_verbatim(tmp_path):
    workdir = tmp_path / ("a-long-folder-name-that-would-wrap-a-rich-console-line-" * 2 + "[bold]x")
    result = run_cli("demo", "--workdir", workdir, "--quiet", "--json", "-")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] and report["source"] == str(workdir / "original")
    assert "[bold]x/converted" in " ".join(result.stderr.split()).replace(" ", ""), result.stderr
    quiet = run_cli("demo", "--workdir", workdir, "--quiet")
    assert quiet.exit_code == 0 and quiet.stdout == "", "no JSON dump unless asked for"


def test_verify_and_bench_refuse_a_pair_that_does_not_belong_together(gpt2_dir, workspace):
    from prenorm_convert.examples import build_checkpoint

    out = workspace / "out-parent" / "out"
    assert run_cli("convert", gpt2_dir, out, "--quiet", "--no-verify").exit_code == 0
    opt = workspace / "opt"
    build_checkpoint(opt, "opt", seed=0)
    deeper = workspace / "gpt2-deeper"
    build_checkpoint(deeper, "gpt2", seed=1, overrides={"n_layer": 3})
    for command in (("verify",), ("bench", "--rounds", "1")):
        result = run_cli(*command, opt, out, "--quiet")
        assert result.exit_code == 2, (command, result.stderr)
        message = " ".join(result.stderr.split())
        assert "converted from a checkpoint of family gpt2" in message and "is of family opt" in message, message
        result = run_cli(*command, deeper, out, "--quiet")
        assert result.exit_code == 2, (command, result.stderr)
        assert "with n_layer 2" in result.stderr and "has n_layer 3" in " ".join(result.stderr.split())


def test_greedy_tokens_that_do_not_fit_the_model_are_refused_before_any_work(gpt2_dir, workspace):
    assert_refused(workspace, gpt2_dir, "--greedy-tokens 128", "128 positions", extra=("--greedy-tokens", "128"))
