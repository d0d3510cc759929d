"""The model card (README.md) written into every converted folder."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

# the loading snippet's name for where the folder lives; `push` puts the repository id in its place
LOCATION_PLACEHOLDER = "PATH_OR_REPO"
REPORT_ROWS = (
    ("max abs Δlogit", "max_abs_logit_diff", "{:.3e}"),
    ("max abs Δlogit / logit scale", "relative_max_abs_logit_diff", "{:.3e}"),
    ("mean abs Δlogit", "mean_abs_logit_diff", "{:.3e}"),
    ("max KL divergence", "max_kl_divergence", "{:.3e}"),
    ("top-1 agreement", "top1_agreement", "{:.4f}"),
    ("residual mean / RMS (max)", "residual_mean_max", "{:.3e}"),
    ("parameters (original)", "params_original", "{:,}"),
    ("parameters (converted)", "params_converted", "{:,}"),
    ("dtype", "dtype", "{}"),
)


def report_rows(report: dict) -> list[tuple[str, str]]:
    # a non-finite measurement is written as null (docs/report.md, "Strict JSON") and fails the gate
    rows = [(label, "non-finite" if report[key] is None else fmt.format(report[key])) for label, key, fmt in REPORT_ROWS]
    rows += _layer_rows(report)
    greedy = report["greedy_match"]
    if greedy["identical"] is None:
        rows.append(("greedy generation", "not compared (the model does not generate)"))
    else:
        rows.append(("greedy generation", f"{'identical' if greedy['identical'] else 'DIFFERENT'} ({greedy['tokens_compared']} tokens)"))
    if report.get("streamed"):
        rows.append(("models", "streamed from disk, one module at a time"))
    rows.append(("passed", "yes" if report["passed"] else "NO: " + "; ".join(report["failures"])))
    return rows


def _layer_rows(report: dict) -> list[tuple[str, str]]:
    """The per-layer audit in two rows: the worst layer, and the first one over tolerance."""
    layers = report.get("per_layer")
    if not layers:
        return []
    worst = max(layers, key=lambda entry: float("inf") if entry["max_abs_diff"] is None else entry["max_abs_diff"])
    shown = "non-finite" if worst["max_abs_diff"] is None else f"{worst['max_abs_diff']:.3e}"
    first = report.get("first_bad_layer")
    writer = f" ({report['first_bad_writer']})" if report.get("first_bad_writer") else ""
    return [
        (f"worst layer Δ / scale (of {len(layers)})", f"layer {worst['layer']}: {shown}"),
        ("first layer off", "none" if first is None else f"{first}{writer}"),
    ]


def loading_instructions(config: dict) -> str:
    block = config["prenorm"]
    if block.get("lands_in"):
        return "\n".join([
            "```python",
            "from transformers import AutoModelForCausalLM",
            f'model = AutoModelForCausalLM.from_pretrained("{LOCATION_PLACEHOLDER}")',
            "```",
            f"\nThis is a stock `{block['lands_in']}` checkpoint (model_type `{config['model_type']}`): with the residual "
            "stream centred, every norm of the original is an RMSNorm, so no remote code is needed, here or in any "
            "engine that runs this architecture.",
        ])
    auto = next((name for name in config.get("auto_map", {}) if name != "AutoConfig"), "AutoModelForCausalLM")
    lines = [
        "```python",
        f"from transformers import {auto}",
        f'model = {auto}.from_pretrained("{LOCATION_PLACEHOLDER}", trust_remote_code=True)',
        "```",
    ]
    if block["requires_remote_code"]:
        reasons = []
        if block["fold_affine"]:
            norm = "CRMSNorm" if block["target"] == "crmsnorm" else "RMSNorm"
            reasons.append(f"the norms' affine parameters are folded into the linears (weightless {norm})")
        if block["removed"]:
            reasons.append(f"{', '.join(block['removed'])} was baked into the embedding table")
        if block["target"] == "crmsnorm":
            reasons.append(f"the residual stream is {block['residual_width']} wide instead of {block['hidden_size']}")
        lines.append(
            "\n`trust_remote_code=True` is required: " + "; ".join(reasons or ["the architecture changed"]) + "."
        )
    else:
        lines.append(
            "\nWithout `trust_remote_code` the same folder loads as the stock class with LayerNorm modules and "
            "computes the same function (LayerNorm of a zero-mean input is RMSNorm)."
        )
    return "\n".join(lines)


REPORT_HEADING = "## Equivalence report"


def report_section(report: dict | None) -> str:
    if report is None:
        return f"{REPORT_HEADING}\nNot verified (`--no-verify`). Run `prenorm-convert verify ORIGINAL THIS_FOLDER`."
    table = "\n".join(f"| {label} | {value} |" for label, value in report_rows(report))
    return f"{REPORT_HEADING}\n| metric | value |\n|---|---|\n" + table


def card_for_repo(card: str, repo_id: str, report: dict | None = None) -> str:
    """The card as uploaded to repo_id: its loading snippet names the repository, and its report section
    shows ``report`` (the folder's conversion_report.json, which `verify --json` may have written since)."""
    card = card.replace(f'from_pretrained("{LOCATION_PLACEHOLDER}"', f'from_pretrained("{repo_id}"')
    if report is None or REPORT_HEADING not in card:
        return card
    before, _, rest = card.partition(REPORT_HEADING)
    _, heading, after = rest.partition("\n## ")
    return before + report_section(report) + ("\n\n## " + after if heading else "\n")


def front_matter(config: dict) -> dict:
    """The card's YAML metadata, in the keys the hub reads (base_model links the model tree)."""
    block = config["prenorm"]
    front = {"library_name": "transformers", "pipeline_tag": "text-generation"}
    if block.get("source_revision"):  # the source was a hub id; a local path is no hub model to link to
        front["base_model"] = block["source"]
    tags = ["prenorm-convert", block["target"], block["family"]]
    if block["fold_affine"]:
        tags.append("fold-affine")
    if block["requires_remote_code"]:
        tags.append("custom_code")
    front["tags"] = tags
    return front


def source_line(block: dict) -> str:
    if not block.get("source_revision"):
        return f"`{block['source']}`"
    return (
        f"[`{block['source']}`](https://huggingface.co/{block['source']}) at commit `{block['source_revision']}`"
    )


def equivalent_command(config: dict) -> str:
    """A command that reproduces this conversion, when it was not run from the command line."""
    block = config["prenorm"]
    words = ["prenorm-convert", "convert", block["source"], "OUT", "--target", block["target"]]
    if block["fold_affine"]:
        words.append("--fold-affine")
    words += ["--dtype", str(config.get("dtype", "auto"))]
    if block.get("source_revision"):
        words += ["--revision", block["source_revision"]]
    return shlex.join(words)


def write_model_card(folder: Path, config: dict, plan, report: dict | None, command: str | None) -> None:
    block = config["prenorm"]
    front = front_matter(config)
    parts = [
        "---\n" + yaml.safe_dump(front, sort_keys=False) + "---",
        f"# {block['family']} converted to Pre-{'RMSNorm' if block['target'] == 'rmsnorm' else 'CRMSNorm'}",
        f"Converted from {source_line(block)} by prenorm-convert {block['converter_version']} "
        f"(target `{block['target']}`, fold affine: {block['fold_affine']}). The residual stream is zero-mean and "
        "every LayerNorm is replaced by an equivalent norm (Jiang et al., NeurIPS 2023).",
        "## Loading\n" + loading_instructions(config),
    ]
    if block["untied_head"]:
        parts.append(
            f"The LM head was untied from the embedding (it keeps the original table, the embedding is centered): "
            f"{plan.params_converted - plan.params_original:+,} parameters."
        )
    if plan.head_stored_apart:
        parts.append(
            "The source config ties the LM head to the embedding, but its checkpoint stores a head with other values, "
            "which transformers keeps apart when loading; it was converted that way and is written untied."
        )
    parts.append(report_section(report))
    if command:
        parts.append(f"## Conversion command\n```\n{command}\n```")
    else:
        parts.append(f"## Conversion command\nAn equivalent command:\n```\n{equivalent_command(config)}\n```")
    (folder / "README.md").write_text("\n\n".join(parts) + "\n")
