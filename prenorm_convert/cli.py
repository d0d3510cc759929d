"""Command line: parse, call the API, render. The only place that exits."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import PrenormError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
    help="Convert Pre-LayerNorm transformer checkpoints into exactly equivalent Pre-RMSNorm / Pre-CRMSNorm "
    "checkpoints, and prove it.\n\nTry it offline: [bold]prenorm-convert demo[/bold]",
)
stdout = Console()
stderr = Console(stderr=True)

EXIT_OK, EXIT_VERIFY_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def _run(action: Callable[[], int | None]) -> None:
    """Run a command body; typed errors become one-line messages and exit codes."""
    from .errors import VerificationFailed

    try:
        code = action() or EXIT_OK
    except VerificationFailed as exc:
        stderr.print(f"[red]error:[/red] {escape(str(exc))}", markup=True, highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_VERIFY_FAILED)
    except PrenormError as exc:
        stderr.print(f"[red]error:[/red] {escape(str(exc))}", markup=True, highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code)
    except KeyboardInterrupt:
        stderr.print("[red]interrupted[/red]: nothing was written")
        raise typer.Exit(130)
    raise typer.Exit(code)


def _reporter(quiet: bool):
    from .progress import Reporter

    return Reporter(quiet=quiet)


def _tolerances(max_abs_logit_diff, max_kl, min_top1, greedy_tokens):
    from .verification import Tolerances

    return Tolerances(max_abs_logit_diff=max_abs_logit_diff, max_kl=max_kl, min_top1=min_top1, greedy_tokens=greedy_tokens)


def print_report(report: dict, title: str) -> None:
    from .card import report_rows

    table = Table(title=title, show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for label, value in report_rows(report):
        style = None
        if label == "passed":
            style = "green" if report["passed"] else "red"
        table.add_row(label, value, style=style)
    stderr.print(table)


def _write_json(path: Optional[Path], data: dict) -> None:
    if path is None:
        return
    text = json.dumps(data, indent=2) + "\n"
    if str(path) == "-":
        sys.stdout.write(text)
    else:
        path.write_text(text)


# -- commands ---------------------------------------------------------------------------------

QuietOption = typer.Option(False, "--quiet", "-q", help="No progress display.")
ToleranceHelp = "Defaults depend on the dtype (see docs/report.md)."


@app.command()
def convert(
    src: str = typer.Argument(..., help="Pre-LN checkpoint folder (config.json + safetensors)."),
    out: Path = typer.Argument(..., help="Output folder (written atomically)."),
    target: str = typer.Option("rmsnorm", help="rmsnorm (same width) or crmsnorm (d-1 wide stream)."),
    fold_affine: bool = typer.Option(False, "--fold-affine", help="Fold γ, β into the readers: weightless RMSNorm."),
    dtype: str = typer.Option("auto", help="auto (keep the stored dtype), float32, float16 or bfloat16."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists (only once everything succeeded)."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the equivalence check."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Accept *.bin weights (loaded with weights_only=True)."),
    max_shard_size: str = typer.Option("5GB", help="Largest output shard, e.g. 5GB, 500MB."),
    prompts: Optional[Path] = typer.Option(None, help="Text file, one prompt per line, for verification."),
    max_abs_logit_diff: Optional[float] = typer.Option(None, help="Fail above this max |Δlogit|. " + ToleranceHelp),
    max_kl: Optional[float] = typer.Option(None, help="Fail above this max KL divergence. " + ToleranceHelp),
    min_top1: Optional[float] = typer.Option(None, help="Fail below this top-1 agreement. " + ToleranceHelp),
    greedy_tokens: int = typer.Option(32, help="New tokens compared in greedy generation."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the report here ('-' for stdout)."),
    quiet: bool = QuietOption,
):
    """Convert SRC into an equivalent Pre-RMSNorm (or Pre-CRMSNorm) checkpoint in OUT, then verify it.

    Example:  [bold]prenorm-convert convert ./gpt2 ./gpt2-rms --fold-affine[/bold]

    Exit codes: 0 converted and verified, 1 written but verification failed, 2 bad input (nothing written).
    """

    def body():
        from .conversion import convert as run_convert
        from .errors import VerificationFailed

        command = "prenorm-convert " + shlex.join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("prenorm-convert") else None
        try:
            result = run_convert(
                src,
                out,
                target=target,
                fold_affine=fold_affine,
                dtype=dtype,
                overwrite=overwrite,
                verify_output=not no_verify,
                allow_pickle=allow_pickle,
                max_shard_size=max_shard_size,
                tolerances=_tolerances(max_abs_logit_diff, max_kl, min_top1, greedy_tokens),
                prompts_file=prompts,
                command=command,
                reporter=_reporter(quiet),
            )
        except VerificationFailed as failure:
            if failure.report is not None:
                if not quiet:
                    print_report(failure.report, f"{src} -> {out}")
                _write_json(json_path, failure.report)
            raise
        if result.report is not None:
            if not quiet:
                print_report(result.report, f"{src} -> {out}")
            _write_json(json_path, result.report)
        if not quiet:
            stderr.print(f"[green]wrote[/green] {out}")

    _run(body)


@app.command()
def verify(
    original: Path = typer.Argument(..., help="The original Pre-LN checkpoint folder."),
    converted: Path = typer.Argument(..., help="A folder written by prenorm-convert."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the report here ('-' for stdout)."),
    max_abs_logit_diff: Optional[float] = typer.Option(None, help="Fail above this max |Δlogit|. " + ToleranceHelp),
    max_kl: Optional[float] = typer.Option(None, help="Fail above this max KL divergence. " + ToleranceHelp),
    min_top1: Optional[float] = typer.Option(None, help="Fail below this top-1 agreement. " + ToleranceHelp),
    greedy_tokens: int = typer.Option(32, help="New tokens compared in greedy generation."),
    prompts: Optional[Path] = typer.Option(None, help="Text file, one prompt per line."),
    quiet: bool = QuietOption,
):
    """Compare CONVERTED with ORIGINAL: logits, KL, top-1, greedy generation, residual mean.

    Example:  [bold]prenorm-convert verify ./gpt2 ./gpt2-rms --json report.json[/bold]

    Exit codes: 0 within tolerance, 1 over tolerance, 2 bad input.
    """

    def body():
        from .verification import verify as run_verify

        report = run_verify(
            original,
            converted,
            tolerances=_tolerances(max_abs_logit_diff, max_kl, min_top1, greedy_tokens),
            prompts_file=prompts,
            reporter=_reporter(quiet),
        )
        if not quiet:
            print_report(report, f"{original} vs {converted}")
        _write_json(json_path, report)
        return EXIT_OK if report["passed"] else EXIT_VERIFY_FAILED

    _run(body)


@app.command("inspect")
def inspect_command(
    src: str = typer.Argument(..., help="Checkpoint folder."),
    target: str = typer.Option("rmsnorm", help="rmsnorm or crmsnorm."),
    fold_affine: bool = typer.Option(False, "--fold-affine"),
    dtype: str = typer.Option("auto"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle"),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON on stdout."),
):
    """Show the family, sizes and every change a conversion would make. Writes nothing.

    Example:  [bold]prenorm-convert inspect ./gpt2 --target crmsnorm[/bold]
    """

    def body():
        from .inspection import describe

        info = describe(src, target=target, fold_affine=fold_affine, dtype=dtype, allow_pickle=allow_pickle)
        if as_json:
            sys.stdout.write(json.dumps(info, indent=2) + "\n")
            return
        table = Table(title=f"{src}: {info['family']} ({info['model_type']})", show_header=False)
        for key in ("hidden_size", "residual_width", "num_layers", "stored_dtype", "output_dtype", "target", "fold_affine", "tied_head"):
            table.add_row(key.replace("_", " "), str(info[key]))
        table.add_row("tensors in / out", f"{info['tensors_in']} / {info['tensors_out']}")
        table.add_row("parameters", f"{info['params_original']:,} -> {info['params_converted']:,}")
        table.add_row("size", f"{info['input_bytes'] / 1e6:,.1f} MB -> {info['output_bytes'] / 1e6:,.1f} MB")
        table.add_row("norms replaced", str(info["norms_replaced"]))
        for change, count in info["changes"].items():
            table.add_row("change", f"{count} × {change}")
        if info["biases_added"]:
            table.add_row("biases added", ", ".join(info["biases_added"]))
        if info["modules_removed"]:
            table.add_row("modules removed", ", ".join(info["modules_removed"]))
        if info["dropped"]:
            table.add_row("dropped (not weights)", f"{len(info['dropped'])} tensors, e.g. {info['dropped'][0]}")
        for note in info["notes"]:
            table.add_row("note", note)
        stdout.print(table)

    _run(body)


@app.command()
def families(as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON on stdout.")):
    """List the supported families, what each refuses, and the model types that cannot be converted."""

    def body():
        from .inspection import families as list_families
        from .inspection import not_convertible

        rows = list_families()
        refused = not_convertible()
        if as_json:
            sys.stdout.write(json.dumps({"families": rows, "not_convertible": refused}, indent=2) + "\n")
            return
        table = Table(title="supported families")
        for column in ("family", "model types", "architectures", "refuses"):
            table.add_column(column)
        for row in rows:
            table.add_row(row["family"], ", ".join(row["model_types"]), ", ".join(row["architectures"]), "\n".join(row["refuses"]) or "-")
        stdout.print(table)
        reasons: dict[str, list[str]] = {}
        for model_type, why in refused.items():
            reasons.setdefault(why, []).append(model_type)
        for why, model_types in reasons.items():
            stdout.print(f"[bold]not converted[/bold] ({', '.join(model_types)}): {why}")

    _run(body)


@app.command()
def demo(
    workdir: Path = typer.Option(Path("prenorm-demo"), help="Where the example checkpoints are written."),
    target: str = typer.Option("rmsnorm", help="rmsnorm or crmsnorm."),
    fold_affine: bool = typer.Option(False, "--fold-affine"),
    quiet: bool = QuietOption,
):
    """Build a small GPT-2-shaped checkpoint locally (no download), convert it, verify it, print the report.

    Example:  [bold]prenorm-convert demo --fold-affine[/bold]
    """

    def body():
        from .conversion import convert as run_convert
        from .examples import build_checkpoint

        reporter = _reporter(quiet)
        original = workdir / "original"
        converted = workdir / "converted"
        with reporter.step(f"building an example GPT-2 checkpoint in {original}"):
            if original.exists():
                import shutil

                shutil.rmtree(original)
            build_checkpoint(original, "gpt2", overrides={"n_layer": 4, "n_embd": 128})
        result = run_convert(original, converted, target=target, fold_affine=fold_affine, overwrite=True, reporter=reporter)
        if not quiet:
            print_report(result.report, f"{original} -> {converted}")
        stdout.print(json.dumps(result.report, indent=2))

    _run(body)


def main() -> None:  # pragma: no cover
    app()
