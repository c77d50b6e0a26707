"""Gate 4 — dry run: a few real training steps before the long run (workflow.md Phase 9).

First a dataset pre-flight (every picture opened, every caption read as UTF-8), then the
backend's short N-step variant with the Gate 2 config, logged to dryrun.log. dryrun.ok is
written only when the model loaded, the dataset was read and at least two steps completed.
Out of memory on the first steps retries at half the batch size (doubling gradient accumulation,
Gate 2's rule) and remembers what fits for this machine. Every other failure is explained from
the backend's own words (lorabuild.diagnose): what happened, why, the fix.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from lorabuild import backends, presets
from lorabuild.backends import Event
from lorabuild.diagnose import diagnose
from lorabuild.fsutil import atomic_write_text
from lorabuild.gates import GateContext, GateFailed
from lorabuild.limits import record_limit
from lorabuild.machine import machine_for
from lorabuild.preflight import check_dataset
from lorabuild.procs import LaunchFailed

TITLE = "Gate 4 — dry run"

# What a short run depends on (DESIGN.md): not epochs, checkpoint policy or monitor thresholds.
READS = (
    "backend",
    "model",
    "dataset.path",
    "dataset.caption_extension",
    "dataset.images",
    "dataset.captions",
    "training.learning_rate",
    "training.batch_size",
    "training.gradient_accumulation",
    "training.resolution",
    "training.rank",
    "training.alpha",
    "training.optimizer",
    "training.optimizer_args",
    "training.mixed_precision",
    "training.base_precision",
    "training.gradient_checkpointing",
    "training.cache_latents",
    "training.cache_text_encoder_outputs",
    "training.train_text_encoder",
    "training.noise_offset",
    "training.seed",
    "compute.target",
)


def targets(ctx: GateContext) -> list[Path]:
    return [ctx.run.dryrun_log, ctx.run.dryrun_ok]


def inputs(ctx: GateContext) -> dict[str, Any]:
    # a dry run proves the pipeline works on *this* machine and environment, so they count too
    return {**ctx.plan.pick(READS), "machine": ctx.environment_stamp}


def file_deps(ctx: GateContext) -> list[Path]:
    return [*ctx.dataset.files, *ctx.model_files]


def run(ctx: GateContext) -> None:
    from lorabuild.remote import RemoteError  # here: an up-to-date run never needs SSH

    plan = ctx.plan
    with open(ctx.run.dryrun_log, "w", encoding="utf-8") as log:
        preflight(ctx, log)
        machine = None
        try:
            machine = machine_for(ctx)
            seen, batch, accumulation = _attempts(ctx, machine, log)
        except RemoteError as exc:
            raise GateFailed(
                f"Dry run failed — the connection to the machine that trains was lost: {exc}",
                "check that it is on and reachable (`lorabuild cloud ls` for a cloud one), then run again",
            ) from None
        finally:
            if machine is not None:
                machine.close()
    if batch != plan.training.batch_size:
        record_limit(
            ctx.run.limits, ctx.machine_key, batch_size=batch, failed_at=plan.training.batch_size, where="the dry run"
        )
    times = seen["step_seconds"][1:] or seen["step_seconds"]  # the first step includes warm-up
    record = {
        "passed": True,
        "steps": seen["steps"],
        "images": (seen["dataset"] or {}).get("images", len(plan.dataset.images)),
        "batch_size": batch,
        "gradient_accumulation": accumulation,
        "step_seconds": round(sum(times) / len(times), 4) if times else None,
    }
    atomic_write_text(ctx.run.dryrun_ok, json.dumps(record, indent=2, sort_keys=True) + "\n")
    extra = f" at batch size {batch}" if batch != plan.training.batch_size else ""
    ctx.console.say(f"  Dry run passed — model loaded, {seen['steps']} steps completed{extra}, no errors")


def _attempts(ctx: GateContext, machine: Any, log: Any) -> tuple[dict[str, Any], int, int]:
    """Dry-run until it passes, halving the batch on out of memory (Gate 2's rule)."""
    plan = ctx.plan
    batch, accumulation = plan.training.batch_size, plan.training.gradient_accumulation
    while True:
        seen, finished_code, tail = _attempt(ctx, machine, log, batch, accumulation)
        if _passed(seen, finished_code):
            return seen, batch, accumulation
        failure = _diagnose(ctx, seen, finished_code, tail)
        if failure.kind != "oom" or batch == 1:
            raise failure.gate
        old = batch
        batch, accumulation = max(1, batch // 2), accumulation * 2
        message = f"Hit memory limit — reducing batch size from {old} to {batch} and retrying"
        ctx.console.say(f"  {message}")
        log.write(f"\n# lorabuild: {message}\n")


def preflight(ctx: GateContext, log: Any) -> None:
    """The dataset pre-flight; blocking problems fail the gate before the backend starts."""
    plan = ctx.plan
    report = check_dataset(
        Path(plan.dataset.path), plan.dataset.images, plan.dataset.caption_extension, plan.training.resolution
    )
    log.write("# lorabuild dataset pre-flight\n" + "".join(f"#   {line}\n" for line in report.lines()))
    for warning in report.warnings:
        ctx.console.say(f"  Note: {warning}")
    if not report.ok:
        raise GateFailed(
            "Dataset check failed — the dry run would fail on these files",
            "fix or remove the files named above, then run again",
            report.blocking,
        )
    ctx.console.say(f"  Dataset checked: {report.images} pictures, {report.captions} captions")


def _attempt(
    ctx: GateContext, machine: Any, log: Any, batch: int, accumulation: int
) -> tuple[dict[str, Any], int, list[str]]:
    plan = machine.plan
    steps = presets.DRY_RUN_STEPS
    seen: dict[str, Any] = {"model_loaded": False, "dataset": None, "steps": 0, "errors": [], "step_seconds": []}

    def on_line(line: str) -> None:
        for event in backends.parse_log_line(plan, line):
            _note(seen, event)

    override = batch != plan.training.batch_size
    with machine.scratch("dryrun") as scratch:
        launch = backends.launch(
            plan,
            machine.backend_dir,
            scratch,
            max_steps=steps,
            resume=False,
            batch_size=batch if override else None,
            gradient_accumulation=accumulation if override else None,
        )
        log.write(f"# lorabuild dry run ({steps} steps, batch size {batch}): {shlex.join(launch.argv)}\n")
        log.flush()
        try:
            finished = machine.run(launch, log=log, on_line=on_line, kind="dryrun")
        except LaunchFailed as exc:
            raise GateFailed(
                f"Dry run failed — the backend could not be started: {exc.program}: {exc.reason}",
                "check `backend.python` / `backend.path` in the spec, or run `lorabuild env`",
            ) from None
    return seen, finished.returncode, finished.tail


def _passed(seen: dict[str, Any], returncode: int) -> bool:
    # a backend that took steps has loaded its model and read its data, whether or not it said so
    stepped = seen["steps"] > 0
    return (
        returncode == 0
        and not seen["errors"]
        and (seen["model_loaded"] or stepped)
        and (seen["dataset"] is not None or stepped)
        and seen["steps"] >= presets.DRY_RUN_MIN_STEPS
    )


def _note(seen: dict[str, Any], event: Event) -> None:
    if event.kind == "model_loaded":
        seen["model_loaded"] = True
    elif event.kind == "dataset":
        seen["dataset"] = event.data
    elif event.kind == "step":
        seen["steps"] = max(seen["steps"], int(event.data.get("step", 0)))
        if event.data.get("step_seconds") is not None:
            seen["step_seconds"].append(float(event.data["step_seconds"]))
    elif event.kind == "error":
        seen["errors"].append(event.data)
    elif event.kind == "warning" and event.data.get("kind") == "oom":
        # a backend that skips a batch for lack of memory (ai-toolkit) still counts the step:
        # in a dry run that is a failure to fit, not a pass
        seen["errors"].append({"kind": "oom", "message": event.data.get("message", "a batch did not fit")})


class _Failure:
    def __init__(self, kind: str, gate: GateFailed):
        self.kind = kind
        self.gate = gate


def _diagnose(ctx: GateContext, seen: dict[str, Any], returncode: int, tail: list[str]) -> _Failure:
    text = "\n".join(tail)
    kinds = [str(e.get("kind")) for e in seen["errors"]]
    if not kinds and backends.is_out_of_memory(ctx.plan, text):
        kinds = ["oom"]
    found = diagnose(kinds, text)
    details = [str(e.get("message")) for e in seen["errors"] if e.get("message")]
    if found.kind == "internal" and returncode == 0 and seen["steps"] < presets.DRY_RUN_MIN_STEPS:
        message = f"only {seen['steps']} of the {presets.DRY_RUN_MIN_STEPS} required steps completed"
        fix = f"read {ctx.run.dryrun_log} for the backend's own message"
    else:
        message, fix = found.what, found.fix
    if found.kind == "oom":
        fix = f"lower `training.batch_size` (now {ctx.plan.training.batch_size}) or the resolution, then run again"
    if not details:
        details = [line for line in tail[-5:] if line.strip()]
    gate = GateFailed(f"Dry run failed — {message} (backend exit code {returncode})", fix, details)
    return _Failure(found.kind, gate)
