"""OPT and BLOOM end to end: convert on-disk checkpoints with the CLI, load with transformers, compare;
and refuse their Post-LN variants."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from safetensors import safe_open

from conftest import conversion_cache, run_cli
from equivalence import assert_equivalent, load, norm_types
from prenorm_convert.checkpoint import SourceCheckpoint
from prenorm_convert.errors import SpecError, UnsupportedModelError
from prenorm_convert.examples import build_checkpoint, strip_prefix
from prenorm_convert.plan import make_plan
from prenorm_convert.spec_loader import parse_spec
from test_bad_input import assert_refused


def _legacy_bloom_config(folder: Path) -> None:
    """The original BLOOM uploads' config names: n_embed and num_attention_heads."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["n_embed"] = config.pop("hidden_size")
    config["num_attention_heads"] = config.pop("n_head")
    path.write_text(json.dumps(config, indent=2))


def _build(name: str, folder: Path) -> None:
    if name == "opt":  # opt-125m structure scaled down: 4 heads, relu MLP 4x wide, save_pretrained keys
        build_checkpoint(folder, "opt", seed=11)
    elif name == "opt-legacy":  # other head count and FFN width; the older `decoder.…` keys
        build_checkpoint(folder, "opt", seed=12, overrides={"hidden_size": 48, "num_attention_heads": 2, "ffn_dim": 96})
        strip_prefix(folder, "model.")
    elif name == "opt-projected":  # Pre-LN with word_embed_proj_dim != hidden_size: project_in / project_out
        build_checkpoint(folder, "opt", seed=13, overrides={"word_embed_proj_dim": 32})
    elif name == "opt-no-bias":  # enable_bias=false: no linear has a bias (fold-affine adds some)
        build_checkpoint(folder, "opt", seed=14, overrides={"enable_bias": False})
    elif name == "opt-no-affine":  # layer_norm_elementwise_affine=false: norms without γ and β
        build_checkpoint(folder, "opt", seed=15, overrides={"layer_norm_elementwise_affine": False})
    elif name == "bloom":  # bloom-560m structure scaled down, save_pretrained keys
        build_checkpoint(folder, "bloom", seed=21)
    elif name == "bloom-legacy":  # 3 heads, FFN 192 (BLOOM's FFN is 4x hidden); prefixless keys, legacy config names
        build_checkpoint(folder, "bloom", seed=22, overrides={"hidden_size": 48, "n_head": 3})
        strip_prefix(folder, "transformer.")
        _legacy_bloom_config(folder)
    elif name == "bloom-tp":  # pretraining_tp=2 with slow_but_exact: writers applied in input-column slices
        build_checkpoint(folder, "bloom", seed=23, overrides={"pretraining_tp": 2, "slow_but_exact": True})
    else:
        raise KeyError(name)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """Build each example checkpoint once per module: name -> folder."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            folder = tmp_path_factory.mktemp("src") / name
            _build(name, folder)
            cache[name] = folder
        return cache[name]

    return get


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
    """Memoised conversions: (source name, options) -> (source folder, output folder)."""
    return conversion_cache(tmp_path_factory, source)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    found = {}
    for name in files:
        with safe_open(str(folder / name), "pt") as handle:
            found.update({key: handle.get_tensor(key) for key in handle.keys()})
    return found


def row_mean_ratio(table: torch.Tensor) -> float:
    """max |row mean| / row RMS: 0 for a centered table (float32 rounding aside)."""
    table = table.detach().double()
    return float((table.mean(-1).abs() / table.pow(2).mean(-1).sqrt()).max())


OPTIONS = [pytest.param((), id="rmsnorm"), pytest.param(("--fold-affine",), id="fold-affine")]
SOURCES = ["opt", "opt-legacy", "opt-projected", "opt-no-bias", "opt-no-affine", "bloom", "bloom-legacy", "bloom-tp"]


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("name", SOURCES)
def test_converted_checkpoint_matches_original(converted, name, options):
    src, out = converted(name, options)
    compared = assert_equivalent(src, out, remote=True)
    print(f"{name} {' '.join(options) or 'rmsnorm'}: relative max |Δlogit| {compared['relative_error']:.3e}")
    stem = {"PrenormCenteredLayerNorm"} if name.startswith("bloom") else set()  # BLOOM's stem norm, kept and centred
    assert norm_types(compared["converted"]) == {"PrenormRMSNorm"} | stem, "no LayerNorm may remain on the stream"
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["passed"] and report["greedy_match"]["identical"]
    assert report["greedy_match"]["tokens_compared"] >= 32
    assert report["relative_max_abs_logit_diff"] <= 1e-5
    assert report["residual_mean_max"] < 1e-5
    assert report["top1_agreement"] == 1.0


@pytest.mark.parametrize("name", ["opt", "opt-legacy", "opt-projected"])
def test_opt_rmsnorm_output_loads_as_stock_opt_without_remote_code(converted, name):
    src, out = converted(name)
    compared = assert_equivalent(src, out, remote=False, padded=False)
    assert type(compared["converted"]) is transformers.OPTForCausalLM
    assert norm_types(compared["converted"]) == {"LayerNorm"}


def test_opt_embeddings_centered_every_position_row_and_head_kept_tied(converted):
    src, out = converted("opt")
    original = load(src, remote=False)
    written = tensors(out)
    positions = written["model.decoder.embed_positions.weight"]
    config = original.config
    # the learned-position table holds max_position_embeddings + 2 offset rows: all are centered
    assert positions.shape == (config.max_position_embeddings + 2, config.hidden_size)
    assert row_mean_ratio(positions) < 1e-6
    assert row_mean_ratio(original.model.decoder.embed_positions.weight) > 0.1
    expected = original.model.decoder.embed_positions.weight.double()
    torch.testing.assert_close(positions.double(), expected - expected.mean(-1, keepdim=True), rtol=0, atol=1e-6)
    # the token table stays tied to the head, stored as it is: centred at lookup (docs/math.md "Tied embeddings")
    assert torch.equal(written["model.decoder.embed_tokens.weight"], original.model.decoder.embed_tokens.weight)
    assert "lm_head.weight" not in written
    out_config = json.loads((out / "config.json").read_text())
    assert out_config["tie_word_embeddings"] is True and out_config["prenorm"]["untied_head"] is False
    assert out_config["prenorm"]["centered_at_lookup"] == ["model.decoder.embed_tokens"]
    for layer in range(config.num_hidden_layers):
        for writer in ("self_attn.out_proj", "fc2"):
            weight = written[f"model.decoder.layers.{layer}.{writer}.weight"].double()
            assert weight.mean(0).abs().max() < 1e-6 * weight.abs().max()
            assert abs(float(written[f"model.decoder.layers.{layer}.{writer}.bias"].double().mean())) < 1e-7


def test_opt_projected_embeds_outside_the_residual_stream(converted, source):
    """word_embed_proj_dim != hidden_size: project_in is the writer, project_out the final norm's reader,
    and embed_tokens (and the head tied to it) stay as they are."""
    src, out = converted("opt-projected")
    original = load(src, remote=False)
    written = tensors(out)
    assert torch.equal(written["model.decoder.embed_tokens.weight"], original.model.decoder.embed_tokens.weight)
    assert "lm_head.weight" not in written
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["prenorm"]["untied_head"] is False
    project_in = written["model.decoder.project_in.weight"].double()  # [hidden, word_embed_proj_dim]
    assert project_in.shape == (64, 32)
    assert project_in.mean(0).abs().max() < 1e-6 * project_in.abs().max()
    assert row_mean_ratio(written["model.decoder.embed_positions.weight"]) < 1e-6
    _, folded = converted("opt-projected", ("--fold-affine",))
    folded_config = json.loads((folded / "config.json").read_text())
    assert folded_config["prenorm"]["biased"] == ["model.decoder.project_out"]
    assert folded_config["tie_word_embeddings"] is True
    assert "model.decoder.project_out.bias" in tensors(folded)
    info = json.loads(run_cli("inspect", source("opt-projected"), "--json").stdout)
    assert info["untie_head"] is False and info["requires_remote_code"] is False


def test_bloom_embedding_layernorm_is_kept_centred_on_rmsnorm_and_baked_for_crmsnorm(converted):
    src, out = converted("bloom")
    original = load(src, remote=False)
    written = tensors(out)
    # rmsnorm: the table, γ and β stored as they are, the head still tied; the converted model centres
    # the stem's output; the stock class computes the same function (its LayerNorms ignore the mean)
    table, norm = original.transformer.word_embeddings.weight, original.transformer.word_embeddings_layernorm
    assert torch.equal(written["transformer.word_embeddings.weight"], table) and "lm_head.weight" not in written
    assert torch.equal(written["transformer.word_embeddings_layernorm.weight"], norm.weight)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "bloom" and config["tie_word_embeddings"] is True
    assert config["prenorm"]["removed"] == [] and config["prenorm"]["requires_remote_code"] is False
    assert config["prenorm"]["centered_stems"] == ["transformer.word_embeddings_layernorm"]
    assert type(load(out, remote=True).transformer.word_embeddings_layernorm).__name__ == "PrenormCenteredLayerNorm"
    assert_equivalent(src, out, remote=False)
    # crmsnorm: baked into the table (centred, d-1 wide) and removed; the head untied, from the original table
    _, compressed = converted("bloom", ("--target", "crmsnorm"))
    written = tensors(compressed)
    assert not [key for key in written if "word_embeddings_layernorm" in key]
    table = table.double()
    baked = torch.nn.functional.layer_norm(table, (table.shape[-1],), norm.weight.double(), norm.bias.double(), norm.eps)
    expected = (baked - baked.mean(-1, keepdim=True))[:, :-1]
    torch.testing.assert_close(written["transformer.word_embeddings.weight"].double(), expected, rtol=0, atol=1e-6)
    assert written["lm_head.weight"].shape == (table.shape[0], table.shape[1] - 1), "the head written untied, reading d-1 features"
    config = json.loads((compressed / "config.json").read_text())
    assert config["model_type"] == "prenorm_bloom" and config["tie_word_embeddings"] is False
    assert config["prenorm"]["removed"] == ["transformer.word_embeddings_layernorm"]
    assert isinstance(load(compressed, remote=True).transformer.word_embeddings_layernorm, torch.nn.Identity)
    with pytest.raises(ValueError, match="trust_remote_code"):
        transformers.AutoModelForCausalLM.from_pretrained(str(compressed), trust_remote_code=False)
    card = " ".join((compressed / "README.md").read_text().split())
    assert "`trust_remote_code=True` is required" in card
    assert "transformer.word_embeddings_layernorm was baked into the embedding table" in card


@pytest.mark.parametrize("name, prefixes", [("opt-legacy", ("model.decoder.", "lm_head.")), ("bloom-legacy", ("transformer.", "lm_head."))])
def test_legacy_keys_are_written_in_the_current_style(converted, name, prefixes):
    _, out = converted(name)
    names = set(tensors(out))
    assert names and all(key.startswith(prefixes) for key in names), sorted(names)[:5]
    # the tied head stays tied (one table): OPT's centred at lookup, BLOOM's read by its kept stem norm
    assert "lm_head.weight" not in names


# -- refusals -------------------------------------------------------------------------------


@pytest.fixture
def workspace(tmp_path):
    (tmp_path / "out-parent").mkdir()
    return tmp_path


REFUSED = {
    # like facebook/opt-350m: Post-LN, with project_in/out
    "opt-post-ln": ("opt", {"do_layer_norm_before": False, "word_embed_proj_dim": 32}, ("do_layer_norm_before=false", "Post-LN", "opt-350m")),
    "opt-no-final-norm": ("opt", {"_remove_final_layer_norm": True}, ("_remove_final_layer_norm=true", "final LayerNorm was removed")),
    "bloom-post-ln-residual": (
        "bloom",
        {"apply_residual_connection_post_layernorm": True},
        ("apply_residual_connection_post_layernorm=true", "no exact Pre-RMSNorm rewrite"),
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_post_ln_variants_are_refused_with_the_reason(case, workspace):
    family, overrides, message = REFUSED[case]
    src = workspace / case
    build_checkpoint(src, family, seed=3, overrides=overrides, tokenizer=False)
    refused = assert_refused(workspace, src, f"cannot convert this {family} checkpoint", *message)
    inspected = run_cli("inspect", src)
    assert inspected.exit_code == 2 and " ".join(inspected.stderr.split()) == refused


# -- the spec conditions are checked against the model, not trusted ---------------------------


def _opt_spec_data() -> dict:
    return yaml.safe_load((Path(__file__).parents[1] / "prenorm_convert" / "configs" / "opt.yaml").read_text())


def plan_with(spec, folder: Path):
    checkpoint = SourceCheckpoint.open(folder)
    try:
        return make_plan(checkpoint, spec)
    finally:
        checkpoint.close()


def test_an_undeclared_embedding_of_width_d_is_refused(source):
    data = _opt_spec_data()
    data["embeddings"] = [entry for entry in data["embeddings"] if entry != "model.decoder.embed_positions"]
    with pytest.raises(UnsupportedModelError, match="embed_positions"):
        plan_with(parse_spec(data, "configs/test-opt.yaml"), source("opt"))


def test_a_writer_switched_off_by_its_condition_must_not_exist(source):
    data = _opt_spec_data()
    project_in = next(entry for entry in data["writers"] if isinstance(entry, dict))
    project_in["when"] = {"config_key": "word_embed_proj_dim", "equals_config_key": "hidden_size"}
    with pytest.raises(UnsupportedModelError, match="project_in"):
        plan_with(parse_spec(data, "configs/test-opt.yaml"), source("opt-projected"))


@pytest.mark.parametrize(
    "when, error",
    [
        ({"config_key": "word_embed_proj_dim"}, "exactly one of"),
        ({"config_key": "word_embed_proj_dim", "equals": 1, "differs_from": 2}, "exactly one of"),
        ({"config_key": "word_embed_proj_dim", "equals_config_key": 3}, "must name a config key"),
        ({"config_key": "word_embed_proj_dim", "is": 3}, "unknown key"),
    ],
)
def test_malformed_spec_conditions_are_spec_errors(when, error):
    data = _opt_spec_data()
    data["writers"][-1]["when"] = when
    with pytest.raises(SpecError, match=error):
        parse_spec(data, "configs/test-opt.yaml")


# -- inspect and families -------------------------------------------------------------------


def test_families_lists_opt_and_bloom_with_their_refusals():
    result = run_cli("families", "--json")
    assert result.exit_code == 0, result.stderr
    rows = {row["family"]: row for row in json.loads(result.stdout)["families"]}
    assert {"gpt2", "opt", "bloom"} <= set(rows)
    assert rows["opt"]["architectures"] == ["OPTForCausalLM"]
    assert any(rule.startswith("do_layer_norm_before=false") for rule in rows["opt"]["refuses"])
    assert any(rule.startswith("_remove_final_layer_norm=true") for rule in rows["opt"]["refuses"])
    assert any(rule.startswith("apply_residual_connection_post_layernorm=true") for rule in rows["bloom"]["refuses"])
    assert rows["bloom"]["stem_norms"] == ["transformer.word_embeddings_layernorm"]
    text = run_cli("families")
    assert text.exit_code == 0 and "opt" in text.stdout and "bloom" in text.stdout


def test_inspect_says_what_bloom_needs_and_opt_does_not(source):
    bloom = json.loads(run_cli("inspect", source("bloom"), "--json").stdout)
    assert bloom["family"] == "bloom" and bloom["requires_remote_code"] is False and bloom["modules_removed"] == []
    assert any("is kept, with its table" in note for note in bloom["notes"])
    compressed = json.loads(run_cli("inspect", source("bloom"), "--target", "crmsnorm", "--json").stdout)
    assert compressed["requires_remote_code"] is True
    assert compressed["modules_removed"] == ["transformer.word_embeddings_layernorm"]
    assert any("baked into the embedding table" in note for note in compressed["notes"])
    assert any("trust_remote_code=True" in note for note in compressed["notes"])
    assert any(change.startswith("embedding: bake the stem LayerNorm, center rows") for change in compressed["changes"])
    opt = json.loads(run_cli("inspect", source("opt"), "--json").stdout)
    assert opt["family"] == "opt" and opt["requires_remote_code"] is False and opt["untie_head"] is False
    assert opt["changes"]["embedding: center rows"] == 1, "positions centred; the tied token table is centred at lookup"
    legacy = json.loads(run_cli("inspect", source("bloom-legacy"), "--json").stdout)
    assert legacy["hidden_size"] == 48 and legacy["num_layers"] == 2
    text = run_cli("inspect", source("bloom"), "--target", "crmsnorm")
    assert text.exit_code == 0 and "modules removed" in text.stdout and "trust_remote_code" in text.stdout
