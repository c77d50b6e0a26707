"""The backend interface: one module per trainer, the same small set of functions, dispatched by name.

Each backend module (`lorabuild/backends/<name>.py`) provides exactly the functions below, with
the same signatures (after the leading `plan`). Nothing outside `backends/` knows a backend's
file formats, command lines or log lines. Modules import nothing heavy at import time, so every
backend can be planned, validated and checked without its dependencies installed.

Available in this version: `builtin`. kohya, SimpleTuner and ai-toolkit are valid names in a
spec, and Gate 2 says plainly that lorabuild cannot run them yet.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lorabuild.plan import Issue, Plan

IMPLEMENTED: dict[str, str] = {"builtin": "lorabuild.backends.builtin"}


@dataclass(frozen=True)
class Launch:
    """How to start a backend: the exact argv (never a shell string), folder and environment."""

    argv: list[str]
    cwd: Path
    env: dict[str, str] = field(default_factory=dict)  # added to lorabuild's own environment


@dataclass(frozen=True)
class Event:
    """One thing a backend's output said, in lorabuild's words (see docs/trainer.md for kinds)."""

    kind: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint a run can resume from, or that an artist can try."""

    path: Path
    step: int
    epoch: int
    lora: Path | None
    resume_key: str | None  # the settings it was made with (plan.resume_key)


def _module(name: str) -> ModuleType:
    try:
        return importlib.import_module(IMPLEMENTED[name])
    except KeyError:
        raise NotImplementedError(f"lorabuild cannot run the {name} backend yet") from None


def adjust_settings(name: str, training: dict[str, Any], *, on_cpu: bool) -> list[tuple[str, Any, str]]:
    """Settings the backend decides for itself on this device: (setting, value, plain reason).

    Called by the plan before estimates, so memory and time are estimated for what will run.
    """
    if name not in IMPLEMENTED:
        return []
    changes: list[tuple[str, Any, str]] = _module(name).adjust_settings(training, on_cpu=on_cpu)
    return changes


def check_plan(plan: Plan) -> list[Issue]:
    """Problems that make this plan impossible for its backend (family, optimizer, model format).

    Every backend answers, including the ones not built yet (with one issue saying so).
    """
    if plan.backend.name not in IMPLEMENTED:
        from lorabuild.plan import Issue

        return [
            Issue(
                kind="unavailable",
                field=("backend",),
                message=f"this version of lorabuild cannot run the {plan.backend.name} backend yet "
                "(only the builtin trainer is ready)",
                fix="use `backend: builtin` for now; kohya, SimpleTuner and ai-toolkit support is being built",
            )
        ]
    issues: list[Issue] = _module(plan.backend.name).check_plan(plan)
    return issues


def settings(plan: Plan) -> tuple[str, ...]:
    """The training settings (TrainingPlan field names) this backend honours."""
    used: tuple[str, ...] = _module(plan.backend.name).settings(plan)
    return used


def render_config(plan: Plan) -> dict[str, str]:
    """The backend's own config files, as {file name inside backend/: text}."""
    files: dict[str, str] = _module(plan.backend.name).render_config(plan)
    return files


def launch(
    plan: Plan,
    config_dir: Path,
    *,
    max_steps: int | None = None,
    resume: bool = True,
    lora_out: Path | None = None,
    batch_size: int | None = None,
    gradient_accumulation: int | None = None,
) -> Launch:
    """The command that trains (or, with `max_steps`, runs the short dry-run variant)."""
    result: Launch = _module(plan.backend.name).launch(
        plan,
        config_dir,
        max_steps=max_steps,
        resume=resume,
        lora_out=lora_out,
        batch_size=batch_size,
        gradient_accumulation=gradient_accumulation,
    )
    return result


def parse_log_line(plan: Plan, line: str) -> Event | None:
    """The event one line of the backend's output stands for, if any."""
    event: Event | None = _module(plan.backend.name).parse_log_line(line)
    return event


def is_out_of_memory(plan: Plan, text: str) -> bool:
    """Whether the backend's output (or an error event's text) says it ran out of memory."""
    found: bool = _module(plan.backend.name).is_out_of_memory(text)
    return found


def checkpoints(plan: Plan, run_dir: Path) -> list[Checkpoint]:
    """Complete checkpoints in the run folder, oldest first."""
    found: list[Checkpoint] = _module(plan.backend.name).checkpoints(plan, run_dir)
    return found


def probe_command(plan: Plan) -> list[str]:
    """argv that prints, as JSON, the backend environment's torch/CUDA facts and its own version."""
    argv: list[str] = _module(plan.backend.name).probe_command(plan)
    return argv
