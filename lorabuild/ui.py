"""Terminal output: short plain-language lines, coloured only when a person is watching."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TextIO

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

    def warn(self, text: str) -> None:
        self._echo(f"! {text}", err=True, fg="yellow")

    def fail(self, text: str) -> None:
        self._echo(f"✗ {text}", err=True, fg="red")

    def problem(self, text: str) -> None:
        self._echo(text, err=True)
