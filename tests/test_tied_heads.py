"""Tied heads as transformers loads them (its tie_weights at load), whatever the file stores.

A tied config with only the embedding stored is the common case (tests/test_convert_*). Here the
file stores the head alone (safetensors' save_model keeps the name that sorts first), or both with
equal values (as a pickle of shared storage holds them), or both with different values (which
transformers keeps apart, with a warning). Every conversion is verified against the original as
transformers loads it, logits and greedy generation.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_cli
from prenorm_convert.examples import build_checkpoint

TABLES = {"gpt2": "transformer.wte.weight", "opt": "model.decoder.embed_tokens.weight", "bloom": "transformer.word_embeddings.weight"}
HEAD = "lm_head.weight"


def tied_source(folder, family: str, stored: str):
    build_checkpoint(folder, family, seed=7, max_shard_size="100MB")
    weights_file = folder / "model.safetensors"
    tensors = load_file(weights_file)
    table = tensors[TABLES[family]]
    if stored == "head only":
        tensors[HEAD] = tensors.pop(TABLES[family])
    elif stored == "both, equal":
        tensors[HEAD] = table.clone()
    else:  # both, different
        tensors[HEAD] = table + 0.5 * torch.randn(table.shape, generator=torch.Generator().manual_seed(0))
    save_file(tensors, weights_file, metadata={"format": "pt"})
    assert json.loads((folder / "config.json").read_text()).get("tie_word_embeddings", True)
    return folder


CASES = [(family, stored) for family in TABLES for stored in ("head only", "both, different")] + [("gpt2", "both, equal")]


@pytest.mark.parametrize("family, stored", CASES, ids=[f"{f}-{s.replace(', ', '-').replace(' ', '-')}" for f, s in CASES])
def test_tied_config_converts_what_transformers_loads(tmp_path, family, stored):
    src = tied_source(tmp_path / "src", family, stored)
    out = tmp_path / "out"
    result = run_cli("convert", src, out, "--quiet", "--json", "-")
    assert result.exit_code == 0, result.stderr + result.stdout
    report = json.loads(result.stdout)
    assert report["passed"] and report["greedy_match"]["identical"] and report["top1_agreement"] == 1.0
    config = json.loads((out / "config.json").read_text())
    # a tied table stays tied (centred at lookup; BLOOM's is read by its kept stem norm, which centres
    # its output); a head stored with other values is kept apart, as transformers loads it
    kept = stored != "both, different"
    assert config["tie_word_embeddings"] is kept and config["prenorm"]["untied_head"] is False
    lookup = [TABLES[family].removesuffix(".weight")] if kept and family != "bloom" else []
    assert config["prenorm"]["centered_at_lookup"] == lookup
    info = json.loads(run_cli("inspect", src, "--json").stdout)
    apart = [note for note in info["notes"] if "stores it with other values" in note]
    assert bool(apart) == (stored == "both, different")
    card = (out / "README.md").read_text()
    assert ("keeps apart when loading" in card) == (stored == "both, different")
