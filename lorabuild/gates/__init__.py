"""The gates: one module per phase, each owning its targets, its inputs and its check.

Every gate module provides:
- `TITLE`: how the gate is named to people;
- `targets(ctx) -> list[Path]`: the files it writes (the run-folder table of DESIGN.md);
- `inputs(ctx) -> dict`: exactly the values it reads — the pipeline reruns the gate when, and
  only when, one of them (or one of its `file_deps`) changed;
- `file_deps(ctx) -> list[Path]`: files whose content it reads;
- `run(ctx) -> None`: do the work and write the targets atomically, or raise `GateFailed`
  with what happened, why, and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from types import ModuleType
from typing import Any

from lorabuild.dataset import DatasetListing
from lorabuild.modelfile import ModelListing
from lorabuild.plan import Plan
from lorabuild.runfolder import GATES, REMOTE_GATES, RunFolder
from lorabuild.spec import LoadedSpec
from lorabuild.studio import Machine
from lorabuild.ui import Console


class GateFailed(Exception):
    """A gate that did not pass: `message` says what and why, `fix` what to do."""

    def __init__(self, message: str, fix: str = "", details: list[str] | None = None):
        self.message = message
        self.fix = fix
        self.details = details or []
        super().__init__(message)

    def render(self) -> str:
        lines = [self.message, *[f"  - {d}" for d in self.details]]
        if self.fix:
            lines.append(f"Fix: {self.fix}")
        return "\n".join(lines)


@dataclass
class RunOptions:
    yes: bool = False  # answer confirmations
    interactive: bool = False  # a person at a terminal can answer prompts


@dataclass
class GateContext:
    """Everything a gate may read, built once per lorabuild invocation."""

    loaded: LoadedSpec
    plan: Plan
    run: RunFolder
    machine: Machine
    dataset: DatasetListing
    model: ModelListing | None
    options: RunOptions = field(default_factory=RunOptions)
    console: Console = field(default_factory=Console)

    @cached_property
    def environment_stamp(self) -> dict[str, Any]:
        """What identifies the machine and the backend's environment, cheaply (no imports)."""
        from lorabuild.gates.environment import environment_stamp

        return environment_stamp(self)

    @property
    def machine_key(self) -> str:
        """This machine's identity for remembered memory limits (lorabuild.limits)."""
        from lorabuild.limits import machine_key

        if self.plan.compute.target != "local":
            return machine_key(self.environment_stamp)
        return machine_key({"hostname": self.machine.hostname, **self.machine.gpus.fingerprint()})

    @property
    def model_files(self) -> list[Path]:
        return list(self.model.files) if self.model else []


def module(gate: str) -> ModuleType:
    from lorabuild.gates import config, dryrun, environment, pull, train

    return {"config": config, "environment": environment, "dryrun": dryrun, "train": train, "pull": pull}[gate]


def gates_for(ctx: GateContext) -> tuple[str, ...]:
    """The gates of this run, in order: a remote training adds the step that fetches its results."""
    from lorabuild.machine import is_remote

    return REMOTE_GATES if is_remote(ctx.plan) else GATES


__all__ = ["GATES", "GateContext", "GateFailed", "RunOptions", "module"]
