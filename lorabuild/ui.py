"""Terminal output: short plain-language lines, coloured only when a person is watching."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

import click


@dataclass
class Console:
    """Where lorabuild talks to people (stdout by default, stderr for problems)."""

    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)
    quiet: bool = False

    @property
    def colour(self) -> bool:
        return bool(getattr(self.out, "isatty", lambda: False)())

    def _echo(self, text: str, *, err: bool = False, fg: str | None = None, bold: bool = False) -> None:
        stream = self.err if err else self.out
        if self.colour and (fg or bold):
            text = click.style(text, fg=fg, bold=bold)
        click.echo(text, file=stream)

    def say(self, text: str = "") -> None:
        if not self.quiet:
            self._echo(text)

    def step(self, text: str) -> None:
        if not self.quiet:
            self._echo(f"▶ {text}", bold=True)

    def ok(self, text: str) -> None:
        if not self.quiet:
            self._echo(f"✓ {text}", fg="green")

    def skip(self, text: str) -> None:
        if not self.quiet:
            self._echo(f"· {text}", fg="bright_black")

    def up_to_date(self, title: str) -> None:
        """A gate that has nothing to do."""
        self.skip(f"{title} — up to date")

    def nothing_to_do(self) -> None:
        """The end of a run in which every gate was up to date."""
        self.ok("everything is up to date — nothing to do")

    def warn(self, text: str) -> None:
        self._echo(f"! {text}", err=True, fg="yellow")

    def fail(self, text: str) -> None:
        self._echo(f"✗ {text}", err=True, fg="red")

    def problem(self, text: str) -> None:
        self._echo(text, err=True)


class TrainingView:
    """What a person sees while training runs: a progress bar on a terminal, epoch lines always."""

    def __init__(self, console: Console, total_steps: int, epochs: int, bar: bool | None = None):
        self.console = console
        self.epochs = epochs
        self.total = total_steps
        self._progress: Any = None
        self._task: Any = None
        if bar if bar is not None else (console.colour and not console.quiet):
            from rich.console import Console as RichConsole
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("  training"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[loss]}"),
                TimeRemainingColumn(),
                console=RichConsole(file=console.out),
                transient=True,
            )
            self._task = self._progress.add_task("train", total=total_steps, loss="")
            self._progress.start()

    def say(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(text, highlight=False)
        else:
            self.console.say(text)

    def step(self, step: int, total: int, loss: float | None, smoothed: float | None) -> None:
        if self._progress is None:
            return
        shown = f"loss {smoothed:.4f}" if smoothed is not None else (f"loss {loss:.4f}" if loss is not None else "")
        self._progress.update(self._task, completed=step, total=total or self.total, loss=shown)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
