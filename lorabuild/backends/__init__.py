"""The backend interface: one module per trainer, the same small set of functions, dispatched by name.

Each backend module (`lorabuild/backends/<name>.py`, `-` in a name becomes `_`) provides exactly
the functions below, with the same signatures minus the dispatching `plan`/`name` argument where
noted, and the constant `FAMILIES` (the model families it can train). Nothing outside
`backends/` knows a backend's file formats, command lines or log lines. Modules import nothing
heavy at import time, so every backend can be planned, validated and checked without its own
dependencies installed.

Where things go. `output_dir` is the folder a backend writes everything into — its checkpoints
and its final LoRA: `grimoire/training/{name}/checkpoints/` for training, a scratch folder for
the dry run. The train gate moves the final LoRA to `{name}.safetensors` in the run folder.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lorabuild.plan import Issue, Plan

MODULES: dict[str, str] = {
    "builtin": "lorabuild.backends.builtin",
    "kohya": "lorabuild.backends.kohya",
    "simpletuner": "lorabuild.backends.simpletuner",
    "ai-toolkit": "lorabuild.backends.ai_toolkit",
}
# compute targets lorabuild can train on so far
REMOTE_READY: tuple[str, ...] = ("local", "ssh", "runpod", "vastai")
# the backends this installation has (a module per name)
IMPLEMENTED: dict[str, str] = {n: m for n, m in MODULES.items() if importlib.util.find_spec(m) is not None}


@dataclass(frozen=True)
class Launch:
    """How to start a backend: the exact argv (never a shell string), folder and environment."""

    argv: list[str]
    cwd: Path
    env: dict[str, str] = field(default_factory=dict)  # added to lorabuild's own environment
    files: dict[Path, str] = field(default_factory=dict)  # written (atomically) before starting


@dataclass(frozen=True)
class Event:
    """One thing a backend's output said, in lorabuild's words.

    Kinds and fields (docs/trainer.md has the full list): `step` (step, total_steps, epoch,
    epochs, loss, lr), `epoch` (epoch, epochs, mean_loss), `checkpoint` (path, step, epoch),
    `resumed` (step, epoch), `model_loaded`, `dataset` (images, total_steps), `saved` (path),
    `done`, `warning` (message; `kind: oom` for a batch a backend skipped for lack of memory),
    `error` (kind: config | model_load | dataset | caption | oom | nan | cuda | not_installed |
    interrupted | internal, message).
    """

    kind: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint a run can resume from, or that an artist can try."""

    path: Path
    step: int
    epoch: int
    lora: Path | None
    resume_key: str | None = None  # the settings it was made with, when the backend records them


@dataclass(frozen=True)
class ConfigLine:
    """One setting of a generated config file, explained for config.md."""

    file: str
    key: str
    value: str
    meaning: str


@dataclass(frozen=True)
class Installation:
    """Whether the backend is installed where the spec says, and which version."""

    ok: bool
    message: str  # plain language, e.g. "kohya-ss sd-scripts v0.10.1 at ~/sd-scripts"
    fix: str = ""
    version: str | None = None
    entry_point: str | None = None


def module_name(name: str) -> str:
    return IMPLEMENTED[name]


def _module(name: str) -> ModuleType:
    try:
        return importlib.import_module(IMPLEMENTED[name])
    except KeyError:
        raise NotImplementedError(f"lorabuild cannot run the {name} backend yet") from None


def families(name: str) -> tuple[str, ...]:
    """The model families a backend can train."""
    found: tuple[str, ...] = _module(name).FAMILIES
    return found


def supporting(family: str) -> list[str]:
    """Names of the implemented backends that can train `family` (for Gate 2's advice)."""
    return [name for name in IMPLEMENTED if family in families(name)]


def adjust_settings(name: str, training: dict[str, Any], *, on_cpu: bool) -> list[tuple[str, Any, str]]:
    """Settings the backend decides for itself on this device: (setting, value, plain reason).

    Called by the plan before estimates, so memory and time are estimated for what will run.
    """
    if name not in IMPLEMENTED:
        return []
    changes: list[tuple[str, Any, str]] = _module(name).adjust_settings(training, on_cpu=on_cpu)
    return changes


def check_plan(plan: Plan) -> list[Issue]:
    """Problems that make this plan impossible for its backend (family, optimizer, model format,
    cross-field rules that cannot be fixed silently). Every backend name answers, including the
    ones not built yet (with one issue saying so)."""
    if plan.backend.name not in IMPLEMENTED:
        from lorabuild.plan import Issue

        return [
            Issue(
                kind="unavailable",
                field=("backend",),
                message=f"this version of lorabuild cannot run the {plan.backend.name} backend yet "
                f"(ready: {', '.join(IMPLEMENTED)})",
                fix="use `backend: builtin` for now",
            )
        ]
    issues: list[Issue] = _module(plan.backend.name).check_plan(plan)
    issues.extend(_unused_settings(plan))
    issues.extend(_compute_target(plan))
    return issues


def _compute_target(plan: Plan) -> list[Issue]:
    """Where training runs is not a backend's business; every backend runs where lorabuild can."""
    from lorabuild.plan import Issue

    if plan.compute.target in REMOTE_READY:
        return []
    return [
        Issue(
            kind="unavailable",
            field=("compute", "target"),
            message=f"training on {plan.compute.target} machines is not built yet",
            fix="use `compute: {target: local}` for now",
        )
    ]


def _unused_settings(plan: Plan) -> list[Issue]:
    """A setting the spec gives that the backend would silently ignore is a mistake to report."""
    from lorabuild.plan import Issue

    used = settings(plan)
    ignored = sorted(
        key.removeprefix("training.")
        for key, source in plan.sources.items()
        if source == "spec" and key.startswith("training.") and key.removeprefix("training.") not in used
    )
    if not ignored:
        return []
    others = [n for n in IMPLEMENTED if n != plan.backend.name and all(k in settings_of(n, plan) for k in ignored)]
    return [
        Issue(
            kind="backend",
            field=("training", ignored[0]),
            message=f"the {plan.backend.name} backend does not use {', '.join(f'`{k}`' for k in ignored)}",
            fix="remove them from the spec" + (f", or use a backend that does ({', '.join(others)})" if others else ""),
        )
    ]


def settings_of(name: str, plan: Plan) -> tuple[str, ...]:
    used: tuple[str, ...] = _module(name).settings(plan)
    return used


def settings(plan: Plan) -> tuple[str, ...]:
    """The training settings (TrainingPlan field names) this backend honours."""
    used: tuple[str, ...] = _module(plan.backend.name).settings(plan)
    return used


def render_config(plan: Plan) -> dict[str, str]:
    """The backend's own config files, as {file name inside backend/: text}. Pure."""
    files: dict[str, str] = _module(plan.backend.name).render_config(plan)
    return files


def describe_config(plan: Plan) -> list[ConfigLine]:
    """Every setting of the rendered files with a plain-language line (for config.md)."""
    lines: list[ConfigLine] = _module(plan.backend.name).describe_config(plan)
    return lines


def launch(
    plan: Plan,
    config_dir: Path,
    output_dir: Path,
    *,
    max_steps: int | None = None,
    resume: bool = True,
    batch_size: int | None = None,
    gradient_accumulation: int | None = None,
) -> Launch:
    """The command that trains into `output_dir`: resuming from its newest checkpoint when
    `resume`; with `max_steps`, the short dry-run variant (no checkpoints, no resume); with
    `batch_size`/`gradient_accumulation`, the out-of-memory retry (same effective batch)."""
    result: Launch = _module(plan.backend.name).launch(
        plan,
        config_dir,
        output_dir,
        max_steps=max_steps,
        resume=resume,
        batch_size=batch_size,
        gradient_accumulation=gradient_accumulation,
    )
    return result


def parse_log_line(plan: Plan, line: str) -> list[Event]:
    """The events one line of the backend's console output stands for (lines are split on \\n
    and \\r, stripped, never empty)."""
    events: list[Event] = _module(plan.backend.name).parse_log_line(line)
    return events


def log_reader_for(name: str) -> Callable[[str], list[Event]]:
    """A reader for one run's console output of backend `name`, for logs of runs lorabuild did not
    launch (`lorabuild monitor`). Backends whose lines need context (kohya's epochs) start a fresh
    reading state here."""
    module = _module(name)
    fresh = getattr(module, "new_log_reader", None)
    reader: Callable[[str], list[Event]] = fresh() if fresh is not None else module.parse_log_line
    return reader


def metrics_files(plan: Plan, output_dir: Path) -> list[Path]:
    """Structured metrics files the backend appends to while training (followed by the monitor)."""
    paths: list[Path] = _module(plan.backend.name).metrics_files(plan, output_dir)
    return paths


def parse_metrics_line(plan: Plan, path: Path, line: str) -> list[Event]:
    """The events one line of a metrics file stands for."""
    events: list[Event] = _module(plan.backend.name).parse_metrics_line(path, line)
    return events


def is_out_of_memory(plan: Plan, text: str) -> bool:
    """Whether the backend's output (or an error event's text) says it ran out of memory."""
    found: bool = _module(plan.backend.name).is_out_of_memory(text)
    return found


def checkpoints(plan: Plan, output_dir: Path) -> list[Checkpoint]:
    """Complete checkpoints in `output_dir`, oldest first."""
    found: list[Checkpoint] = _module(plan.backend.name).checkpoints(plan, output_dir)
    return found


def final_lora(plan: Plan, output_dir: Path) -> Path:
    """Where the backend leaves the finished LoRA in `output_dir` (it may not exist)."""
    path: Path = _module(plan.backend.name).final_lora(plan, output_dir)
    return path


def prune_checkpoints(plan: Plan, output_dir: Path) -> list[Path]:
    """Remove all but the newest `plan.checkpoints.keep_last` checkpoints; what was removed."""
    removed: list[Path] = _module(plan.backend.name).prune_checkpoints(plan, output_dir)
    return removed


def sample_pictures(plan: Plan, output_dir: Path) -> list[tuple[Path, str]]:
    """The sample pictures the backend rendered under `output_dir`, each with its name in the run
    folder's samples/ (`epoch-NNNN-K` or `step-NNNNNNNNN-K`, K the prompt's place from 1, the
    backend's own file type). Empty for a backend that writes into samples/ itself (builtin)."""
    module = _module(plan.backend.name)
    if not hasattr(module, "sample_pictures"):
        return []
    found: list[tuple[Path, str]] = module.sample_pictures(plan, output_dir)
    return found


def collect_samples(plan: Plan, output_dir: Path, samples: Path) -> int:
    """Copy the backend's new sample pictures into the run folder's samples/; how many."""
    from lorabuild.fsutil import atomic_write_bytes

    copied = 0
    for source, name in sample_pictures(plan, output_dir):
        target = samples / name
        if target.exists() and target.stat().st_size == source.stat().st_size:
            continue
        atomic_write_bytes(target, source.read_bytes())  # pictures: small
        copied += 1
    return copied


def install_commands(plan: Plan) -> list[list[str]]:
    """argv lists that install the backend in its environment on a machine where it is missing
    (run there by lorabuild before a remote dry run). Empty when lorabuild cannot install it."""
    module = _module(plan.backend.name)
    commands: list[list[str]] = module.install_commands(plan) if hasattr(module, "install_commands") else []
    return commands


def remote_entry_point(plan: Plan) -> str | None:
    """The file that must exist on a remote machine where the backend is installed, as a path there
    (`~` allowed); None when lorabuild sends the backend itself."""
    module = _module(plan.backend.name)
    found: str | None = module.remote_entry_point(plan) if hasattr(module, "remote_entry_point") else None
    return found


def probe_command(plan: Plan) -> list[str]:
    """argv that prints, as JSON, the backend environment's torch/CUDA facts (lorabuild.probe)."""
    argv: list[str] = _module(plan.backend.name).probe_command(plan)
    return argv


def installation(plan: Plan) -> Installation:
    """Whether the backend's entry point is where the spec says, and its version. Cheap: no
    process is started, only files are looked at."""
    found: Installation = _module(plan.backend.name).installation(plan)
    return found
