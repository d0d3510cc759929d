"""The spec format the parallel-block families need: norm groups switched by the config (conditions
combined with AND), switched-off entries that must be absent for every role, inner norms that are
declared and left alone (an undeclared LayerNorm is still refused), and refusals that read the
config object transformers builds."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file

from conftest import run_cli, snapshot
from prenorm_convert.checkpoint import SourceCheckpoint
from prenorm_convert.errors import CorruptCheckpointError, SpecError, UnsupportedModelError
from prenorm_convert.examples import build_checkpoint
from prenorm_convert.plan import make_plan
from prenorm_convert.spec_loader import config_object, load_specs, parse_spec, resolve_extends


def spec_data(family: str) -> dict:
    return yaml.safe_load(resources.files("prenorm_convert").joinpath("configs", f"{family}.yaml").read_text())


def plan_with(data: dict, folder: Path):
    checkpoint = SourceCheckpoint.open(folder)
    try:
        return make_plan(checkpoint, parse_spec(data, "configs/test.yaml"))
    finally:
        checkpoint.close()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache: dict = {}

    def get(family: str, **overrides) -> Path:
        key = (family, json.dumps(overrides, sort_keys=True))
        if key not in cache:
            cache[key] = tmp_path_factory.mktemp("spec") / family
            build_checkpoint(cache[key], family, seed=3, overrides=overrides, tokenizer=False)
        return cache[key]

    return get


@pytest.mark.parametrize(
    "overrides, norms",
    [
        ({"new_decoder_architecture": False, "parallel_attn": False}, {"input_layernorm": 1, "post_attention_layernorm": 1}),
        ({"new_decoder_architecture": False, "parallel_attn": True}, {"input_layernorm": 2}),
        ({"new_decoder_architecture": True, "num_ln_in_parallel_attn": 1}, {"input_layernorm": 2}),
        ({"new_decoder_architecture": True}, {"ln_attn": 1, "ln_mlp": 1}),  # num_ln_in_parallel_attn unset: 2
    ],
)
def test_falcon_layouts_pick_their_norm_groups_from_the_config(built, overrides, norms):
    plan = plan_with(spec_data("falcon"), built("falcon", **overrides))
    layer0 = {name.rsplit(".", 1)[1] for name in plan.norms if ".h.0." in name}
    assert layer0 == set(norms)
    readers = {op.name.split(".h.0.")[1].rsplit(".", 1)[0] for op in plan.ops if ".h.0." in op.name and op.role == "reader"}
    assert readers == {"self_attention.query_key_value", "mlp.dense_h_to_4h"}


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"new_decoder_architecture": True, "parallel_attn": False}, "new_decoder_architecture=true with parallel_attn=false"),
        ({"new_decoder_architecture": False, "parallel_attn": True, "num_ln_in_parallel_attn": 2}, "builds ln_attn and ln_mlp"),
        ({"new_decoder_architecture": True, "num_ln_in_parallel_attn": 3}, "must be 1 or 2"),
    ],
)
def test_falcon_configs_transformers_cannot_run_are_refused(built, tmp_path, overrides, words):
    src = tmp_path / "src"
    src.mkdir()
    base = built("falcon")
    for entry in base.iterdir():
        (src / entry.name).write_bytes(entry.read_bytes())
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, **overrides}))
    before = snapshot(tmp_path)
    result = run_cli("convert", src, tmp_path / "out")
    assert result.exit_code == 2 and "cannot convert this falcon checkpoint" in result.stderr and words in result.stderr
    assert snapshot(tmp_path) == before


def test_inner_norms_are_left_as_they_are_and_an_undeclared_layer_norm_is_refused(built):
    folder = built("phi", qk_layernorm=True)
    plan = plan_with(spec_data("phi"), folder)
    assert not any("q_layernorm" in name or "k_layernorm" in name for name in plan.norms)
    copied = {op.name for op in plan.ops if "layernorm" in op.name and op.role == "other"}
    assert {"model.layers.0.self_attn.q_layernorm.weight", "model.layers.0.self_attn.k_layernorm.bias"} <= copied
    data = spec_data("phi")
    del data["inner_norms"]
    with pytest.raises(UnsupportedModelError, match="q_layernorm"):
        plan_with(data, folder)


def test_an_inner_norm_switched_off_by_its_condition_must_not_exist(built):
    data = spec_data("phi")
    for entry in data["inner_norms"]:
        entry["when"] = {"config_key": "qk_layernorm", "equals": False}
    with pytest.raises(UnsupportedModelError, match="q_layernorm.*only under another config"):
        plan_with(data, built("phi", qk_layernorm=True))


def test_a_norm_group_switched_off_must_not_exist(built):
    data = spec_data("falcon")
    two_norms = [group for group in data["norms"] if group["norm"].endswith("ln_attn")]
    data["norms"] = [group for group in data["norms"] if not group["norm"].endswith(("ln_attn", "ln_mlp"))]
    data["norms"].append({**two_norms[0], "norm": "transformer.h.{L}.ln_attn", "when": {"config_key": "parallel_attn", "equals": False}})
    with pytest.raises(UnsupportedModelError, match="ln_attn"):
        plan_with(data, built("falcon", new_decoder_architecture=True))


def test_a_norm_active_in_two_groups_is_a_spec_error(built):
    data = spec_data("falcon")
    for group in data["norms"]:
        group.pop("when", None)
    with pytest.raises(SpecError, match="declared by two norm groups"):
        plan_with(data, built("falcon", new_decoder_architecture=False, parallel_attn=False))


@pytest.mark.parametrize(
    "when, error",
    [
        ([], "at least one condition"),
        ([{"config_key": "parallel_attn"}], "exactly one of"),
        ("parallel_attn", "must be a dict or list"),
    ],
)
def test_malformed_norm_conditions_are_spec_errors(when, error):
    data = spec_data("falcon")
    data["norms"][0]["when"] = when
    with pytest.raises(SpecError, match=error):
        parse_spec(data, "configs/test.yaml")


def test_refusals_read_the_config_object_not_the_raw_file():
    data = spec_data("gpt2")
    # GPT-2's config.json says n_embd; hidden_size exists only on the config object (an alias)
    data["refuse"] = [{"when": [{"config_key": "hidden_size", "equals": 64}, {"config_key": "n_layer", "differs_from": 1}], "why": "test"}]
    spec = parse_spec(data, "configs/test.yaml")
    assert spec.refusal_for(config_object({"model_type": "gpt2", "n_embd": 64, "n_layer": 2})).why == "test"
    assert spec.refusal_for(config_object({"model_type": "gpt2", "n_embd": 64, "n_layer": 1})) is None
    assert spec.refusal_for(config_object({"model_type": "gpt2", "n_embd": 32, "n_layer": 2})) is None
    assert spec.refuse[0].describe() == "hidden_size=64 and n_layer!=1"


def test_an_untied_default_is_read_from_the_config_object(tmp_path):
    """GPT-NeoX unties its head by default: a config.json without tie_word_embeddings is untied."""
    from equivalence import assert_equivalent

    src = tmp_path / "src"
    build_checkpoint(src, "gpt_neox", seed=4, tie_word_embeddings=False)
    config = json.loads((src / "config.json").read_text())
    config.pop("tie_word_embeddings", None)
    (src / "config.json").write_text(json.dumps(config))
    plan = plan_with(spec_data("gpt_neox"), src)
    assert not plan.head_stored_apart and not plan.untied_head, "an untied head is not a tie stored apart"
    result = run_cli("convert", src, tmp_path / "out", "--quiet", "--fold-affine")
    assert result.exit_code == 0, result.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["prenorm"]["untied_head"] is False
    assert_equivalent(src, tmp_path / "out", padded=False)


@pytest.mark.parametrize("model_type", ["RefinedWebModel", "phi-msft"])
def test_legacy_remote_code_uploads_are_refused_with_what_to_convert_instead(built, tmp_path, model_type):
    src = tmp_path / "src"
    src.mkdir()
    for entry in built("falcon").iterdir():
        (src / entry.name).write_bytes(entry.read_bytes())
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
    before = snapshot(tmp_path)
    result = run_cli("convert", src, tmp_path / "out")
    assert result.exit_code == 2 and f"cannot convert model_type '{model_type}'" in result.stderr
    assert "transformers-native revision" in result.stderr and snapshot(tmp_path) == before


def test_olmo_lands_in_llama_unless_clip_qkv_and_inspect_says_so(built, tmp_path):
    folder = built("olmo")
    shown = run_cli("inspect", folder, "--json")
    assert shown.exit_code == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert report["lands_in"] == "LlamaForCausalLM" and not report["requires_remote_code"]
    assert any("stock LlamaForCausalLM" in note for note in report["notes"])
    out = tmp_path / "out"
    assert run_cli("convert", folder, out, "--quiet", "--no-verify").exit_code == 0
    assert "AutoModelForCausalLM.from_pretrained(\"PATH_OR_REPO\")" in (out / "README.md").read_text()
    clipped = tmp_path / "clipped"
    clipped.mkdir()
    for entry in folder.iterdir():
        (clipped / entry.name).write_bytes(entry.read_bytes())
    config = json.loads((clipped / "config.json").read_text())
    (clipped / "config.json").write_text(json.dumps({**config, "clip_qkv": 0.5}))
    report = json.loads(run_cli("inspect", clipped, "--json").stdout)
    assert report["lands_in"] is None and report["requires_remote_code"] is False  # OLMo's own class, LayerNorms


def test_a_pooler_the_checkpoint_does_not_store_may_be_absent_and_nothing_else(tmp_path):
    """A backbone saved without its pooler (add_pooling_layer=False) converts: transformers initialises
    the pooler at load, for the original and the converted model alike. A pooler stored in part is a
    broken checkpoint, and a module with a role in the conversion can never be absent."""
    src = tmp_path / "src"
    build_checkpoint(src, "vit", seed=3, auto_class="ViTModel", tokenizer=False, max_shard_size="10MB")
    tensors = load_file(src / "model.safetensors")
    assert {"pooler.dense.weight", "pooler.dense.bias"} <= set(tensors)
    save_file({k: v for k, v in tensors.items() if k != "pooler.dense.bias"}, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CorruptCheckpointError, match="pooler.dense.bias"):
        plan_with(spec_data("vit_model"), src)
    save_file({k: v for k, v in tensors.items() if not k.startswith("pooler.")}, src / "model.safetensors", metadata={"format": "pt"})
    plan = plan_with(spec_data("vit_model"), src)
    assert plan.not_stored == ["pooler.dense"] and not any(op.name.startswith("pooler.") for op in plan.ops)
    data = spec_data("vit_model")
    data["may_be_absent"] = ["layernorm"]
    with pytest.raises(SpecError, match="'layernorm' has a role in the conversion"):
        parse_spec(data, "configs/test.yaml")
    # {L} stands for every layer here too (a module of each layer that the checkpoint stores)
    data["may_be_absent"] = ["pooler.dense", "layers.{L}.mlp"]
    plan = plan_with(data, src)
    assert plan.not_stored == ["pooler.dense"] and any(op.name == "layers.1.mlp.fc2.weight" for op in plan.ops)


def test_a_spec_extending_another_inherits_every_key_it_does_not_give():
    raw = {"base.yaml": {"family": "f", "refuse": [{"why": "x"}], "norms": ["a", "b"]}, "head.yaml": {"extends": "base.yaml", "norms": ["c"]}}
    raw["more.yaml"] = {"extends": "head.yaml", "family": "g"}
    assert resolve_extends("head.yaml", raw) == {"family": "f", "refuse": [{"why": "x"}], "norms": ["c"]}, "a list given replaces, whole"
    assert resolve_extends("more.yaml", raw) == {"family": "g", "refuse": [{"why": "x"}], "norms": ["c"]}, "extends chains"
    # the shipped heads share their family's refusals
    specs = {spec.source_file: spec for spec in load_specs()}
    for head in ("esm_sequence_classifier", "esm_token_classifier"):
        assert specs[f"configs/{head}.yaml"].refuse == specs["configs/esm.yaml"].refuse
        assert specs[f"configs/{head}.yaml"].writers == specs["configs/esm.yaml"].writers


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"a.yaml": {"extends": "missing.yaml"}}, "'missing.yaml' is not a spec file"),
        ({"a.yaml": {"extends": "b.yaml"}, "b.yaml": {"extends": "a.yaml"}}, "a cycle"),
        ({"a.yaml": {"extends": "a.yaml"}}, "a cycle"),
        ({"a.yaml": {"extends": "b.yaml"}, "b.yaml": None}, "holds no spec"),
    ],
)
def test_extends_names_an_existing_spec_without_cycles(raw, message):
    with pytest.raises(SpecError, match=message):
        resolve_extends("a.yaml", raw)
