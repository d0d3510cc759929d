"""Progress display on stderr (rich); silent when quiet. stdout stays free for --json output."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, TypeVar

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")


class Reporter:
    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.console = Console(stderr=True, quiet=quiet)

    def track(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        if self.quiet:
            yield from items
            return
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=self.console, transient=False) as progress:
            yield from progress.track(items, total=total, description=escape(description))

    @contextmanager
    def counter(self, description: str, total: int) -> Iterator[Callable[[], None]]:
        """A progress bar advanced by calling what it yields (for work driven from hooks)."""
        if self.quiet:
            yield lambda: None
            return
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=self.console, transient=False) as progress:
            task = progress.add_task(escape(description), total=total)
            yield lambda: progress.advance(task)

    @contextmanager
    def step(self, message: str) -> Iterator[None]:
        if self.quiet:
            yield
            return
        with self.console.status(escape(message)):
            yield
        self.console.print(f"[green]✓[/green] {escape(message)}", highlight=False)

    def log(self, message: str) -> None:
        self.console.print(message, markup=False, highlight=False)

    def warn(self, message: str) -> None:
        """Printed even when quiet: something the user must know about (quiet hides progress only)."""
        Console(stderr=True).print(f"[yellow]warning:[/yellow] {escape(message)}", highlight=False, soft_wrap=True)


SILENT = Reporter(quiet=True)
