"""Command line: parse, call the API, render. The only place that exits."""

from __future__ import annotations

import json
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from . import jsonout
from .errors import SPELL_FOR_CLI, PrenormError, is_out_of_memory

def _flags_show_no_type() -> None:
    """typer's rich help prints a `<bool>` type beside every flag (--fold-affine, --help, ...), which reads
    as if the flag took a value; flags take none, so their type column stays empty."""
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich
    if getattr(shown, "flags_show_no_type", False):
        return

    def display_type_rich(self, ctx):
        return None if self.is_flag else shown(self, ctx)

    display_type_rich.flags_show_no_type = True
    TyperOption.display_type_rich = display_type_rich


_flags_show_no_type()
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

EXIT_OK, EXIT_VERIFY_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL_ERROR = 0, 1, 2, 3


class Terminated(BaseException):
    """SIGTERM (a CI job cancelled, a container stopped): unwinds like Ctrl-C, so nothing is left half-written."""


def _terminate(signum, frame):
    raise Terminated()


def _error_line(message: str) -> None:
    stderr.print(f"[red]error:[/red] {escape(message)}", markup=True, highlight=False, soft_wrap=True)


def _run(action: Callable[[], int | None]) -> None:
    """Run a command body; typed errors become one-line messages and exit codes."""
    from .errors import VerificationFailed

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    spelling = SPELL_FOR_CLI.set(True)
    try:
        code = action() or EXIT_OK
    except VerificationFailed as exc:
        _error_line(str(exc))
        raise typer.Exit(EXIT_VERIFY_FAILED)
    except PrenormError as exc:
        _error_line(str(exc))
        raise typer.Exit(exc.exit_code)
    except OSError as exc:  # disk full, read-only or missing folder, permissions: the environment, not a bug
        where = f" ('{exc.filename}')" if exc.filename else ""
        _error_line(f"{exc.strerror or exc}{where}; nothing was written (check free space and permissions)")
        raise typer.Exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        stderr.print("[red]interrupted[/red]: nothing was written")
        raise typer.Exit(130)
    except Terminated:
        stderr.print("[red]terminated[/red]: nothing was written")
        raise typer.Exit(143)
    except (typer.Exit, typer.Abort):
        raise
    except Exception as exc:  # a bug, not the input: its own exit code, never 1 ("does not match")
        if is_out_of_memory(exc):  # the machine, not a bug: an environment error, as a full disk is
            _error_line(
                f"ran out of memory ({_first_line(exc)}); nothing was written. Free memory or use a larger machine; "
                "a checkpoint larger than memory is verified with --max-memory SIZE (the weights streamed from "
                "disk), or on a GPU with --device cuda / --device-map auto"
            )
            raise typer.Exit(EXIT_BAD_INPUT)
        _error_line(
            f"internal error ({type(exc).__name__}: {_first_line(exc)}); nothing was written. This is a bug in "
            f"prenorm-convert: please report it with the full traceback, saved to {_save_traceback()}"
        )
        raise typer.Exit(EXIT_INTERNAL_ERROR)
    finally:
        SPELL_FOR_CLI.reset(spelling)
        if main_thread:  # None: a handler installed outside Python, which SIG_DFL stands for
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    raise typer.Exit(code)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:200] if lines else "no message"


def _save_traceback() -> str:
    """Write the current exception's traceback to a file of its own; its path, for the message."""
    import tempfile
    import traceback

    text = "prenorm-convert " + shlex.join(_masked_arguments()) + "\n\n" + traceback.format_exc()
    try:
        with tempfile.NamedTemporaryFile(
            "w", prefix="prenorm-convert-traceback-", suffix=".txt", delete=False, encoding="utf-8", errors="backslashreplace"
        ) as handle:
            handle.write(text)
        return handle.name
    except OSError:  # no writable temporary folder: the traceback goes to stderr instead
        sys.stderr.write(text.encode("utf-8", "backslashreplace").decode("utf-8"))
        return "stderr (above)"


def _check_json_path(json_path: Path | None) -> None:
    """--json PATH is checked before any work: its folder must exist, and PATH must not be a folder."""
    from .errors import BadInputError

    if json_path is None or str(json_path) == "-":
        return
    if json_path.is_dir():
        raise BadInputError(f"--json '{json_path}' is a folder; give a file path (or '-' for stdout)")
    if not json_path.absolute().parent.is_dir():
        raise BadInputError(f"--json '{json_path}': its folder does not exist; create it first (or use '-' for stdout)")


def _reporter(quiet: bool):
    from .progress import Reporter

    return Reporter(quiet=quiet)


def _tolerances(max_abs_logit_diff, max_kl, min_top1, greedy_tokens):
    from .tolerances import Tolerances

    return Tolerances(max_abs_logit_diff=max_abs_logit_diff, max_kl=max_kl, min_top1=min_top1, greedy_tokens=greedy_tokens)


def print_report(report: dict, title: str) -> None:
    from .card import report_rows

    table = Table(title=Text(title), show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for label, value in report_rows(report):
        style = None
        if label == "passed":
            style = "green" if report["passed"] else "red"
        table.add_row(Text(label), Text(value), style=style)
    stderr.print(table)


def _write_json(path: Optional[Path], data: dict, written: Optional[Path] = None) -> None:
    """--json PATH; ``written``: the folder already written by then, named if the report cannot be."""
    from .errors import BadInputError

    if path is None:
        return
    text = jsonout.dumps(data)
    if str(path) == "-":
        sys.stdout.write(text)
        return
    try:
        path.write_text(text)
    except OSError as exc:
        done = f"; {written} was written (its conversion_report.json holds the report)" if written else ""
        raise BadInputError(f"could not write the report to --json '{path}' ({exc.strerror or exc}){done}") from None


# -- commands ---------------------------------------------------------------------------------

QuietOption = typer.Option(False, "--quiet", "-q", help="No progress display (results and errors are still printed).")
ToleranceHelp = "Defaults depend on the dtype (see docs/report.md)."
RevisionOption = typer.Option(None, "--revision", help="Hub source only: branch, tag or commit hash (default: main).")
PadToOption = typer.Option(
    None,
    "--pad-to",
    metavar="N",
    help="crmsnorm only: store the d-1 wide stream zero-padded to a multiple of N (e.g. 64) for aligned GPU "
    "matrix kernels; same function, see README 'Pre-CRMSNorm'.",
)
TokenOption = typer.Option(None, "--token", help="Hub token (default: HF_TOKEN, then the saved login).", show_default=False)
UntieHeadOption = typer.Option(
    False,
    "--untie-head",
    help="Store the centred embedding and the head apart (+V·d parameters) instead of keeping a tied table tied.",
)
AllowPickleOption = typer.Option(False, "--allow-pickle", help="Accept pickled *.bin weights (loaded with torch.load(weights_only=True)).")
SECRET_OPTIONS = ("--token",)
MaxMemoryOption = typer.Option(
    None,
    "--max-memory",
    metavar="SIZE",
    help="Verify within this much memory, e.g. 3GiB: models that do not fit are streamed from disk one module at a time "
    "(default: the memory available).",
)


def _command_line() -> str | None:
    """The exact command, for the model card, with secrets masked (None when not run as prenorm-convert)."""
    if not (sys.argv and sys.argv[0].endswith("prenorm-convert")):
        return None
    return "prenorm-convert " + shlex.join(_masked_arguments())


def _masked_arguments() -> list[str]:
    """sys.argv[1:] with the values of SECRET_OPTIONS replaced by ***."""
    words, hide_next = [], False
    for word in sys.argv[1:]:
        if hide_next:
            words.append("***")
            hide_next = False
        elif word in SECRET_OPTIONS:
            words.append(word)
            hide_next = True
        elif word.startswith(tuple(option + "=" for option in SECRET_OPTIONS)):
            words.append(word.split("=", 1)[0] + "=***")
        else:
            words.append(word)
    return words


def _push(folder: Path, repo_id: str, private: bool, token: Optional[str], force: bool, quiet: bool) -> None:
    from .hub import push as run_push

    result = run_push(folder, repo_id, private=private, token=token, force=force, reporter=_reporter(quiet))
    stderr.print(f"[green]pushed[/green] {escape(str(folder))} to {escape(result.url)} (commit {result.commit})", highlight=False)


@app.command()
def convert(
    src: str = typer.Argument(..., help="Pre-LN checkpoint: a folder (config.json + safetensors) or a hub id (org/name)."),
    out: Path = typer.Argument(..., help="Output folder (written atomically)."),
    target: str = typer.Option("rmsnorm", help="rmsnorm (same width) or crmsnorm (d-1 wide stream)."),
    fold_affine: bool = typer.Option(False, "--fold-affine", help="Fold γ, β into the readers: weightless RMSNorm."),
    pad_to: Optional[int] = PadToOption,
    untie_head: bool = UntieHeadOption,
    dtype: str = typer.Option("auto", help="auto (keep the stored dtype), float32, float16 or bfloat16."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists (only once everything succeeded, verification included)."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the equivalence check."),
    allow_pickle: bool = AllowPickleOption,
    max_shard_size: str = typer.Option("5GB", help="Largest output shard, e.g. 5GB, 500MB."),
    prompts: Optional[Path] = typer.Option(None, help="Text file, one prompt per line, for verification."),
    max_abs_logit_diff: Optional[float] = typer.Option(None, help="Fail above this max |Δlogit|. " + ToleranceHelp),
    max_kl: Optional[float] = typer.Option(None, help="Fail above this max KL divergence. " + ToleranceHelp),
    min_top1: Optional[float] = typer.Option(None, help="Fail below this top-1 agreement. " + ToleranceHelp),
    greedy_tokens: int = typer.Option(32, help="New tokens compared in greedy generation (0: none)."),
    max_memory: Optional[str] = MaxMemoryOption,
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the report here ('-' for stdout)."),
    revision: Optional[str] = RevisionOption,
    token: Optional[str] = TokenOption,
    push_to_hub: Optional[str] = typer.Option(
        None, "--push-to-hub", metavar="REPO_ID", help="After a passing conversion, upload OUT to this hub repository (created if needed)."
    ),
    private: bool = typer.Option(False, "--private", help="With --push-to-hub: create the repository as private."),
    quiet: bool = QuietOption,
):
    """Convert SRC into an equivalent Pre-RMSNorm (or Pre-CRMSNorm) checkpoint in OUT, then verify it.

    Example:  [bold]prenorm-convert convert ./gpt2 ./gpt2-rms --fold-affine[/bold]
    From the hub:  [bold]prenorm-convert convert openai-community/gpt2 ./gpt2-rms --push-to-hub me/gpt2-rms[/bold]

    Exit codes: 0 converted and verified (and pushed), 1 written but verification failed (not pushed),
    2 bad input (nothing written; or written but the push failed).
    """

    def body():
        from .conversion import convert as run_convert
        from .errors import BadInputError, VerificationFailed
        from .hub import HUB_ID

        _check_json_path(json_path)
        if push_to_hub is not None:
            if no_verify:
                raise BadInputError("--push-to-hub pushes verified conversions only; drop --no-verify (or push later with `prenorm-convert push OUT REPO_ID --force`)")
            if HUB_ID.fullmatch(push_to_hub) is None:
                raise BadInputError(f"--push-to-hub '{push_to_hub}' is not a hub repository id; use org/name or user/name")
        command = _command_line()
        try:
            result = run_convert(
                src,
                out,
                target=target,
                fold_affine=fold_affine,
                untie_head=untie_head,
                dtype=dtype,
                overwrite=overwrite,
                verify_output=not no_verify,
                allow_pickle=allow_pickle,
                max_shard_size=max_shard_size,
                tolerances=_tolerances(max_abs_logit_diff, max_kl, min_top1, greedy_tokens),
                prompts_file=prompts,
                max_memory=max_memory,
                command=command,
                revision=revision,
                token=token,
                pad_to=pad_to,
                reporter=_reporter(quiet),
            )
        except VerificationFailed as failure:
            if failure.report is not None:
                print_report(failure.report, f"{src} -> {out}")
                _write_json(json_path, failure.report, written=failure.written)
            raise
        if result.report is not None:
            print_report(result.report, f"{src} -> {out}")
            _write_json(json_path, result.report, written=out)
        stderr.print(f"[green]wrote[/green] {escape(str(out))}", highlight=False)
        if push_to_hub is not None:
            try:
                _push(out, push_to_hub, private, token, force=False, quiet=quiet)
            except BadInputError as exc:
                raise type(exc)(f"wrote {out}, but did not push it: {exc} (retry with `prenorm-convert push {out} {push_to_hub}`)") from exc

    _run(body)


@app.command()
def verify(
    original: str = typer.Argument(..., help="The original Pre-LN checkpoint: a folder or a hub id (org/name)."),
    converted: Path = typer.Argument(..., help="A folder written by prenorm-convert."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the report here ('-' for stdout)."),
    max_abs_logit_diff: Optional[float] = typer.Option(None, help="Fail above this max |Δlogit|. " + ToleranceHelp),
    max_kl: Optional[float] = typer.Option(None, help="Fail above this max KL divergence. " + ToleranceHelp),
    min_top1: Optional[float] = typer.Option(None, help="Fail below this top-1 agreement. " + ToleranceHelp),
    greedy_tokens: int = typer.Option(32, help="New tokens compared in greedy generation (0: none)."),
    prompts: Optional[Path] = typer.Option(None, help="Text file, one prompt per line."),
    allow_pickle: bool = AllowPickleOption,
    revision: Optional[str] = typer.Option(
        None, "--revision", help="Hub original only: branch, tag or commit (default: the commit CONVERTED records, else main)."
    ),
    token: Optional[str] = TokenOption,
    device: str = typer.Option("cpu", help="Run both models on this torch device (cpu, cuda, cuda:1, ...)."),
    device_map: Optional[str] = typer.Option(
        None, "--device-map", help="Spread the models with accelerate instead: auto, balanced, balanced_low_0 or sequential."
    ),
    max_memory: Optional[str] = MaxMemoryOption,
    quiet: bool = QuietOption,
):
    """Compare CONVERTED with ORIGINAL: logits, KL, top-1, greedy generation, residual mean, every layer.

    Example:  [bold]prenorm-convert verify ./gpt2 ./gpt2-rms --json report.json[/bold]
    On GPUs:  [bold]prenorm-convert verify ./gpt2 ./gpt2-rms --device-map auto[/bold]
    Larger than memory:  [bold]prenorm-convert verify ./pythia-6.9b ./pythia-rms --max-memory 3GiB[/bold]

    Exit codes: 0 within tolerance, 1 over tolerance, 2 bad input.
    """

    def body():
        from .tolerances import failure_message
        from .verification import verify as run_verify

        _check_json_path(json_path)
        report = run_verify(
            original,
            converted,
            tolerances=_tolerances(max_abs_logit_diff, max_kl, min_top1, greedy_tokens),
            prompts_file=prompts,
            revision=revision,
            token=token,
            allow_pickle=allow_pickle,
            device=device,
            device_map=device_map,
            max_memory=max_memory,
            reporter=_reporter(quiet),
        )
        print_report(report, f"{original} vs {converted}")
        _write_json(json_path, report)
        if not report["passed"]:
            _error_line(failure_message(report))
            return EXIT_VERIFY_FAILED
        return EXIT_OK

    _run(body)


@app.command("inspect")
def inspect_command(
    src: str = typer.Argument(..., help="Checkpoint folder, or a hub id (org/name)."),
    target: str = typer.Option("rmsnorm", help="rmsnorm or crmsnorm."),
    fold_affine: bool = typer.Option(False, "--fold-affine", help="Plan the weightless variant (γ, β folded into the readers)."),
    pad_to: Optional[int] = PadToOption,
    untie_head: bool = UntieHeadOption,
    dtype: str = typer.Option("auto", help="auto (keep the stored dtype), float32, float16 or bfloat16."),
    allow_pickle: bool = AllowPickleOption,
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON on stdout."),
    revision: Optional[str] = RevisionOption,
    token: Optional[str] = TokenOption,
):
    """Show the family, sizes and every change a conversion would make. Writes nothing.

    On a hub id only config.json, the index and the safetensors headers are fetched (and the few
    tensors planning reads, by range requests), never whole weight files.

    Example:  [bold]prenorm-convert inspect ./gpt2 --target crmsnorm[/bold]
    """

    def body():
        from .inspection import describe

        info = describe(
            src,
            target=target,
            fold_affine=fold_affine,
            dtype=dtype,
            allow_pickle=allow_pickle,
            revision=revision,
            token=token,
            pad_to=pad_to,
            untie_head=untie_head,
        )
        if as_json:
            sys.stdout.write(jsonout.dumps(info))
            return
        table = Table(title=Text(f"{src}: {info['family']} ({info['model_type']})"), show_header=False)
        for key in ("hidden_size", "residual_width", "num_layers", "stored_dtype", "output_dtype", "target", "fold_affine", "untie_head"):
            table.add_row(key.replace("_", " "), Text(str(info[key])))
        table.add_row("tensors in / out", f"{info['tensors_in']} / {info['tensors_out']}")
        table.add_row("parameters", f"{info['params_original']:,} -> {info['params_converted']:,}")
        table.add_row("size", f"{info['input_bytes'] / 1e6:,.1f} MB -> {info['output_bytes'] / 1e6:,.1f} MB")
        table.add_row("norms replaced", str(info["norms_replaced"]))
        for change, count in info["changes"].items():
            table.add_row("change", Text(f"{count} × {change}"))
        if info["biases_added"]:
            table.add_row("biases added", Text(", ".join(info["biases_added"])))
        if info["modules_removed"]:
            table.add_row("modules removed", Text(", ".join(info["modules_removed"])))
        if info["dropped"]:
            table.add_row("dropped (not weights)", Text(f"{len(info['dropped'])} tensors, e.g. {info['dropped'][0]}"))
        for note in info["notes"]:
            table.add_row("note", Text(note))
        stdout.print(table)

    _run(body)


@app.command()
def families(as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON on stdout.")):
    """List the supported families, what each refuses, and the model types that cannot be converted.

    Example:  [bold]prenorm-convert families --json[/bold]
    """

    def body():
        from .inspection import families as list_families
        from .inspection import not_convertible

        rows = list_families()
        refused = not_convertible()
        if as_json:
            sys.stdout.write(jsonout.dumps({"families": rows, "not_convertible": refused}))
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
    workdir: Path = typer.Option(
        Path("prenorm-demo"), help="Folder for the example checkpoints: new, empty, or made by an earlier demo (nothing else in it is touched)."
    ),
    target: str = typer.Option("rmsnorm", help="rmsnorm or crmsnorm."),
    fold_affine: bool = typer.Option(False, "--fold-affine", help="Fold γ, β into the readers: weightless RMSNorm."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the report here ('-' for stdout)."),
    quiet: bool = QuietOption,
):
    """Build a small GPT-2-shaped checkpoint locally (no download), convert it, verify it, print the report.

    Writes WORKDIR/original and WORKDIR/converted; WORKDIR is git-ignored, and an earlier demo's output in it is replaced.

    Example:  [bold]prenorm-convert demo --fold-affine --workdir /tmp/prenorm-demo[/bold]
    """

    def body():
        from .conversion import convert as run_convert
        from .examples import build_checkpoint, prepare_demo_folder

        _check_json_path(json_path)
        reporter = _reporter(quiet)
        original, converted = prepare_demo_folder(workdir)
        with reporter.step(f"building an example GPT-2 checkpoint in {original}"):
            build_checkpoint(original, "gpt2", overrides={"n_layer": 4, "n_embd": 128})
        result = run_convert(original, converted, target=target, fold_affine=fold_affine, reporter=reporter)
        print_report(result.report, f"{original} -> {converted}")
        _write_json(json_path, result.report, written=converted)
        stderr.print(
            f"[green]wrote[/green] {escape(str(converted))}, converted from {escape(str(original))}; load it with "
            f"prenorm_convert.load_converted('{escape(str(converted))}')",
            highlight=False,
        )

    _run(body)


@app.command()
def push(
    out: Path = typer.Argument(..., help="A folder written by prenorm-convert."),
    repo_id: str = typer.Argument(..., help="Hub repository (org/name or user/name); created if it does not exist."),
    private: bool = typer.Option(False, "--private", help="Create the repository as private."),
    token: Optional[str] = typer.Option(None, "--token", help="Hub token with write access (default: HF_TOKEN, then the saved login).", show_default=False),
    force: bool = typer.Option(False, "--force", help="Push even without a passing conversion_report.json that matches the files."),
    quiet: bool = QuietOption,
):
    """Upload a converted folder to the hub (model card, weights, remote code, report).

    Refuses a folder whose conversion_report.json is missing or did not pass, or whose files changed
    since it was written (checked by SHA-256), unless --force.

    Example:  [bold]prenorm-convert push ./gpt2-rms me/gpt2-rms[/bold]

    Exit codes: 0 pushed, 2 refused or the hub failed.
    """

    def body():
        _push(out, repo_id, private, token, force=force, quiet=quiet)

    _run(body)


def _int_list(text: str, option: str) -> tuple[int, ...]:
    from .errors import BadInputError

    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise BadInputError(f"{option} must be comma-separated integers such as 1,8, got '{text}'") from None
    if not values:
        raise BadInputError(f"{option} needs at least one value")
    return values


def print_bench(result: dict) -> None:
    names = [name for name in ("original", "converted", "converted_compiled", "norm_free") if name in result["variants"]]
    compared = names[1:]
    table = Table(title=Text(f"{result['converted']} vs {result['original']} ({result['device']}, {result['dtype']}, {result['threads']} threads)"))
    table.add_column("measurement", justify="right")
    for name in names:
        table.add_column(name.replace("_", " "), justify="right")
    for name in compared:
        table.add_column(f"{name.replace('_', ' ')} / original", justify="right")

    def row(label: str, block: dict, scale: float = 1e3, unit: str = "ms") -> None:
        seconds, ratios = block["seconds"], block["ratio_to_original"]
        cells = [f"{seconds[name]['min'] * scale:.2f} / {seconds[name]['median'] * scale:.2f} {unit}" for name in names]
        cells += [f"{ratios[name]['of_min']:.3f} / {ratios[name]['median_of_rounds']:.3f}" for name in compared]
        table.add_row(label, *cells)

    for point in result["prefill"]:
        row(f"prefill {point['batch']}×{point['seq']}", point)
    if result["decode"]:
        decode = result["decode"]
        row(f"decode {decode['new_tokens']} tokens (batch {decode['batch']})", decode)
    if result["train"]:
        row(f"train step {result['train']['batch']}×{result['train']['seq']}", result["train"])
    stderr.print(table)
    _print_norm_share(result["norms"])
    stderr.print("times: min / median over rounds; ratios: of the minimums / median of per-round ratios (below 1 is faster)")


def _print_norm_share(norms: dict) -> None:
    parts = [
        f"{name} {norms['norm_seconds'][name]['median'] * 1e3:.2f} ms ({norms[f'share_of_prefill_{name}']:.2%} of prefill)"
        for name in norms["norm_seconds"]
    ]
    estimates = [f"{key.removeprefix('estimated_')} {value:.4f}" for key, value in norms.items() if key.startswith("estimated_")]
    stderr.print(f"norms alone at {norms['batch']}×{norms['seq']}: {', '.join(parts)}; estimated {', '.join(estimates)}")


@app.command()
def bench(
    original: Path = typer.Argument(..., help="The original Pre-LN checkpoint folder."),
    converted: Path = typer.Argument(..., help="A folder written by prenorm-convert."),
    device: str = typer.Option("cpu", help="torch device: cpu, cuda, cuda:1, ..."),
    device_map: Optional[str] = typer.Option(
        None, "--device-map", help="Spread the models with accelerate instead: auto, balanced, balanced_low_0 or sequential."
    ),
    dtype: str = typer.Option("float32", help="float32, bfloat16, float16, or auto (the converted folder's dtype)."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for torch (default: torch's choice)."),
    batch_sizes: str = typer.Option("1,8", help="Prefill batch sizes, comma-separated."),
    seq_lens: str = typer.Option("32,128", help="Prefill sequence lengths, comma-separated."),
    rounds: int = typer.Option(5, help="Timed rounds; each times every variant once, order rotating."),
    decode_tokens: int = typer.Option(32, help="Tokens decoded one at a time with a KV cache (0: skip)."),
    train: bool = typer.Option(False, "--train", help="Also time a training step (forward + backward) at the largest prefill shape."),
    compiled_norms: bool = typer.Option(
        False, "--compiled-norms", help="Also time the converted model with its compiled CPU norms on (PRENORM_COMPILE=1; variant converted_compiled)."
    ),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the measurements here ('-' for stdout)."),
    quiet: bool = QuietOption,
):
    """Time the converted model against the original and the norm-free lower bound, in one process.

    Example:  [bold]prenorm-convert bench ./gpt2 ./gpt2-rms --dtype bfloat16 --json bench.json[/bold]

    Prefill latency over the batch × sequence grid, decode tokens/s and optionally a training step; min and
    median over interleaved rounds, and ratios to the original (below 1 is faster).
    """

    def body():
        from .bench import BenchSettings, benchmark

        _check_json_path(json_path)
        settings = BenchSettings(
            batch_sizes=_int_list(batch_sizes, "--batch-sizes"),
            seq_lens=_int_list(seq_lens, "--seq-lens"),
            rounds=rounds,
            decode_tokens=decode_tokens,
            train=train,
            compiled_norms=compiled_norms,
        )
        result = benchmark(
            original, converted, device=device, device_map=device_map, dtype=dtype, threads=threads, settings=settings, reporter=_reporter(quiet)
        )
        print_bench(result)
        _write_json(json_path, result)

    _run(body)


def main() -> None:  # pragma: no cover
    app()
