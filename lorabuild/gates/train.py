"""Gate 10 — training: the planned epochs, checkpoints, progress, and the final LoRA.

Asks for a final confirmation before GPU time or money is spent (never for the builtin trainer
on a processor), starts the backend (resuming from the newest complete checkpoint made with the
same settings), keeps progress.json / progress.md current from its output, and checks that the
final `{name}.safetensors` was written. Checkpoints are not targets: a rerun must find them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from lorabuild import backends
from lorabuild.anomaly import Anomaly, AnomalyDetector
from lorabuild.backends import Event
from lorabuild.diagnose import diagnose
from lorabuild.fsutil import atomic_write_json, remove_path
from lorabuild.gates import GateContext, GateFailed
from lorabuild.limits import read_limit, record_limit
from lorabuild.machine import LocalMachine, RemoteMachine, is_remote, machine_for
from lorabuild.monitor import Monitor
from lorabuild.plan import TrainingPlan
from lorabuild.procs import LaunchFailed
from lorabuild.progress import ProgressTracker
from lorabuild.ui import TrainingView

TITLE = "Training"

# Everything that changes the trained result; not checkpoint policy, monitor thresholds or estimates.
# The batch split is left out: out-of-memory recovery changes batch size × accumulation without
# changing the result, and must not make a finished training run again.
READS = (
    "name",
    "backend",
    "model",
    "dataset.path",
    "dataset.caption_extension",
    "dataset.repeats",
    "dataset.images",
    "dataset.captions",
    *(f"training.{f}" for f in TrainingPlan.model_fields if f not in ("batch_size", "gradient_accumulation")),
    "steps.total_steps",
    "steps.epochs",
    "steps.effective_batch",
    "samples",
    "compute.target",
)

ERRORS: dict[str, str] = {
    "interrupted": "the backend was stopped before it finished",
    "oom": "training ran out of memory",
    "nan": "the loss became NaN (not a number): training has failed",
    "model_load": "the base model could not be loaded",
    "dataset": "the dataset could not be read",
    "caption": "a caption could not be read",
    "config": "the backend rejected its config",
}


def targets(ctx: GateContext) -> list[Path]:
    run = ctx.run
    if is_remote(ctx.plan):
        # the LoRA is the pull step's target: a failed fetch must not train again
        return [run.remote_result, run.train_log, run.progress_json, run.progress_md]
    return [run.lora, run.train_log, run.progress_json, run.progress_md]


def kept_targets() -> tuple[str, ...]:
    """Targets not deleted when the gate starts: the log continues across a resume."""
    return ("train.log",)


def inputs(ctx: GateContext) -> dict[str, Any]:
    return ctx.plan.pick(READS)


def file_deps(ctx: GateContext) -> list[Path]:
    return [*ctx.dataset.files, *ctx.model_files]


def confirm(ctx: GateContext) -> None:
    """workflow.md Phase 10 step 1: a summary and a yes/no before GPU time is spent."""
    plan = ctx.plan
    if plan.device.kind == "cpu" and plan.compute.target == "local":
        return  # nothing is spent on a processor
    summary = (
        f"Ready to train {plan.name}: {len(plan.dataset.images)} pictures × {plan.dataset.repeats} repeats, "
        f"{plan.steps.epochs} epochs ({plan.steps.total_steps} steps) on {plan.backend.name} with "
        f"{plan.model.demo or Path(plan.model.path).name}. "
        f"This will take approximately {plan.estimates.time_text.removeprefix('about ')} on your {plan.device.name}."
    )
    ctx.console.say(summary)
    if ctx.options.yes:
        return
    if not ctx.options.interactive:
        raise GateFailed(
            "training needs your confirmation, and nobody is at the terminal to give it",
            "run again with --yes to start training without asking",
        )
    if not click.confirm("Start training?", default=True):
        raise GateFailed("you chose not to start training", "run again when you are ready")


MAX_OOM_RETRIES = 3  # workflow.md: up to 3 attempts, each at half the batch size
RUN_STAMP = ".lorabuild-run.json"  # in checkpoints/: the settings its checkpoints were made with


def earlier_folder(ctx: GateContext) -> Path:
    return ctx.run.dir / "checkpoints.earlier"


def set_aside_other_runs(ctx: GateContext) -> int:
    """Move checkpoints made with other settings to checkpoints.earlier/ (replacing older ones).

    They cannot be resumed, and new checkpoints would mix with them under the same names; an
    artist may still want to try them, so the most recent set is kept, out of the backend's way.
    Returns how many entries were moved.
    """
    folder = ctx.run.checkpoints
    stamp = folder / RUN_STAMP
    try:
        previous = json.loads(stamp.read_text(encoding="utf-8")).get("resume_key")
    except (OSError, ValueError, AttributeError):
        previous = None
    entries = [p for p in folder.iterdir() if p.name != RUN_STAMP] if folder.is_dir() else []
    moved = 0
    if entries and previous != ctx.plan.resume_key:
        earlier = earlier_folder(ctx)
        remove_path(earlier)
        os.replace(folder, earlier)
        moved = len(entries)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(stamp, {"resume_key": ctx.plan.resume_key, "backend": ctx.plan.backend.name})
    return moved


def run(ctx: GateContext) -> None:
    from lorabuild.remote import RemoteError  # here: an up-to-date run never needs SSH

    confirm(ctx)
    machine: LocalMachine | RemoteMachine | None = None
    try:
        machine = machine_for(ctx)
        _train(ctx, machine)
    except RemoteError as exc:
        raise GateFailed(
            f"Training stopped watching — the connection to the machine that trains was lost: {exc}",
            "run the same command again: lorabuild re-attaches to the training if it is still running there, "
            "or resumes it from the newest checkpoint",
        ) from None
    finally:
        if machine is not None:
            machine.close()


def _train(ctx: GateContext, machine: LocalMachine | RemoteMachine) -> None:
    plan = machine.plan
    output_dir = machine.output_dir
    if isinstance(machine, RemoteMachine):
        moved = machine.set_aside()
        existing = [Path(n) for n in machine.checkpoint_names()]
        metrics: list[Path] = []
    else:
        moved = set_aside_other_runs(ctx)
        existing = [c.path for c in backends.checkpoints(plan, Path(output_dir))]
        metrics = backends.metrics_files(plan, Path(output_dir))
    if moved:
        ctx.console.say(
            f"  {moved} checkpoint file(s) from a run with other settings moved to checkpoints.earlier/"
            + ("" if machine.remote else f" ({earlier_folder(ctx)})")
        )
    tracker = ProgressTracker(
        name=plan.name,
        json_path=ctx.run.progress_json,
        md_path=ctx.run.progress_md,
        epochs=plan.steps.epochs,
        total_steps=plan.steps.total_steps,
        device=plan.device.name,
        ema_beta=plan.monitor.ema_beta,
        notes=list(plan.adjustments),
    )
    tracker.know_checkpoints(existing)
    tracker.write(force=True)
    final = backends.final_lora(plan, Path(output_dir))
    if not ctx.run.remote_job.exists():
        machine.remove(final)  # only a file this run writes counts as its result (unless re-attaching)
    batch, accumulation = plan.training.batch_size, plan.training.gradient_accumulation
    limit = read_limit(ctx.run.limits, ctx.machine_key)
    if limit and limit["batch_size"] < batch:
        # learned in this very run (the dry run ran out of memory): start where it fits
        while batch > limit["batch_size"]:
            batch, accumulation = max(1, batch // 2), accumulation * 2
        tracker.notes.append(
            f"starting at batch size {batch}: the dry run ran out of memory at {plan.training.batch_size}"
        )
    view = TrainingView(ctx.console, plan.steps.total_steps, plan.steps.epochs)
    stop = _Stopper(machine)
    monitor = Monitor(
        tracker=tracker,
        read_line=lambda line: backends.parse_log_line(plan, line),
        detector=AnomalyDetector.from_settings(plan.monitor.model_dump()),
        plot_path=ctx.run.loss_png,
        read_metrics=lambda path, line: backends.parse_metrics_line(plan, path, line),
        on_anomaly=lambda anomaly: _on_anomaly(view, stop, anomaly),
        on_event=lambda event: _report(view, event, tracker),
        steps_per_epoch=plan.steps.steps_per_epoch,
    )
    resuming = bool(existing) or ctx.run.remote_job.exists()
    with open(ctx.run.train_log, "a" if resuming else "w", encoding="utf-8") as log:
        if existing:
            log.write(f"\n# lorabuild: starting again; {len(existing)} checkpoint(s) on {machine.where()}\n")
            log.flush()
        # the monitor reads the log as it grows, from here on (older lines belong to older runs)
        monitor.follow(ctx.run.train_log, metrics, from_end=True)
        try:
            while True:
                result = _attempt(ctx, machine, log, monitor, batch, accumulation, stop)
                if result.ok:
                    break
                if result.kind == "oom" and batch > 1 and tracker.oom_recoveries < MAX_OOM_RETRIES:
                    old = batch
                    batch, accumulation = max(1, batch // 2), accumulation * 2
                    tracker.oom_recoveries += 1
                    message = f"Hit memory limit — reducing batch size from {old} to {batch} and retrying"
                    tracker.notes.append(message)
                    tracker.write(force=True)
                    view.say(f"  {message}")
                    log.write(f"\n# lorabuild: {message}\n")
                    log.flush()
                    record_limit(ctx.run.limits, ctx.machine_key, batch_size=batch, failed_at=old, where="training")
                    continue
                monitor.close("FAILED", result.what)
                raise GateFailed(
                    f"Training {'stopped' if stop.anomaly else 'failed'} — {result.what}",
                    result.fix or f"read {ctx.run.train_log}; run again to resume from the newest checkpoint",
                    result.details,
                )
        except KeyboardInterrupt:
            monitor.close("STOPPED", "stopped before the end; run again to resume from the newest checkpoint")
            raise
        finally:
            view.close()
    if isinstance(machine, RemoteMachine):
        # the LoRA stays there until the pull step fetches it (a failed fetch never trains again)
        atomic_write_json(
            ctx.run.remote_result,
            {
                "machine": machine.where(),
                "final": str(final),
                "output_dir": str(output_dir),
                "resume_key": plan.resume_key,
                "instance": machine.instance_id,
            },
        )
        monitor.close("COMPLETE", f"training finished on {machine.where()}; the LoRA is fetched next")
        ctx.console.say(f"  Training finished on {machine.where()}")
    else:
        os.replace(final, ctx.run.lora)
        for removed in backends.prune_checkpoints(plan, Path(output_dir)):
            tracker.handle(Event("checkpoint_removed", {"path": str(removed)}))
        if backends.collect_samples(plan, Path(output_dir), ctx.run.samples):
            ctx.console.say(f"  Sample pictures: {ctx.run.samples}")
        monitor.close("COMPLETE", f"the LoRA is at {ctx.run.lora}")
        ctx.console.say(f"  Your LoRA is ready: {ctx.run.lora}")
    if tracker.anomalies:
        ctx.console.say("  Watch out: " + "; ".join(a["message"] for a in tracker.anomalies))


class _Stopper:
    """Stops the backend (its process group, here or there) when the monitor finds the loss exploded."""

    def __init__(self, machine: LocalMachine | RemoteMachine):
        self.machine = machine
        self.anomaly: Anomaly | None = None

    def stop(self, anomaly: Anomaly) -> None:
        if self.anomaly is not None:
            return
        self.anomaly = anomaly
        self.machine.stop()  # the backend saves what it can and stops


def _on_anomaly(view: TrainingView, stop: _Stopper, anomaly: Anomaly) -> None:
    if anomaly.stop:
        view.say(f"  ✗ {anomaly.message}: stopping the training")
        stop.stop(anomaly)
    else:
        view.say(f"  ! {anomaly.message}")


class _Outcome:
    def __init__(
        self, ok: bool, kind: str | None = None, what: str = "", details: list[str] | None = None, fix: str = ""
    ):
        self.ok = ok
        self.kind = kind
        self.what = what
        self.details = details or []
        self.fix = fix


def _attempt(
    ctx: GateContext,
    machine: LocalMachine | RemoteMachine,
    log: Any,
    monitor: Monitor,
    batch: int,
    accumulation: int,
    stop: _Stopper,
) -> _Outcome:
    """One launch of the backend (resuming from the newest checkpoint); what came of it."""
    plan = machine.plan
    monitor.errors.clear()
    override = batch != plan.training.batch_size
    output_dir = Path(machine.output_dir)
    launch = backends.launch(
        plan,
        Path(machine.backend_dir),
        output_dir,
        batch_size=batch if override else None,
        gradient_accumulation=accumulation if override else None,
    )
    try:
        finished = machine.run(launch, log=log, on_line=_ignore, kind="train")
    except LaunchFailed as exc:
        return _Outcome(False, "not_installed", f"the backend could not be started: {exc.program}: {exc.reason}")
    monitor.catch_up()  # every line the backend wrote is read before judging
    if stop.anomaly is not None:
        last = [] if machine.remote else backends.checkpoints(plan, output_dir)
        where = f"; the last checkpoint before it is {last[-1].path.name}" if last else ""
        return _Outcome(
            False,
            "nan",
            stop.anomaly.message,
            fix=f"lower `training.learning_rate` (now {plan.training.learning_rate:g}){where}",
        )
    errors = list(monitor.errors)
    final = backends.final_lora(plan, output_dir)
    written = machine.exists(final)
    # exit codes lie (accelerate, train.sh, Ctrl-C in ai-toolkit): the LoRA file and the errors decide
    if finished.returncode == 0 and not errors and written:
        return _Outcome(True)
    text = "\n".join(finished.tail)
    kinds = [str(e.get("kind")) for e in errors]
    if not kinds and backends.is_out_of_memory(plan, text):
        kinds = ["oom"]
    if not kinds and finished.returncode == 0 and not written:
        what, kind = "the backend finished without writing the LoRA file", "internal"
    else:
        found = diagnose(kinds, text)
        kind = found.kind
        what = ERRORS.get(
            kind,
            found.what if found.kind != "internal" else f"the backend stopped with exit code {finished.returncode}",
        )
    details = [str(e.get("message")) for e in errors if e.get("message")] or [
        t for t in finished.tail[-5:] if t.strip()
    ]
    return _Outcome(False, kind, what, details)


def _ignore(line: str) -> None:
    """The monitor reads train.log itself (the same way `lorabuild monitor` does)."""


def _report(view: TrainingView, event: Event, tracker: ProgressTracker) -> None:
    """What a person sees as training moves: the bar on a terminal, a line per epoch always."""
    if event.kind == "resumed":
        view.say(f"  Resuming from step {event.data.get('step')} (checkpoint found)")
    elif event.kind == "checkpoint":
        at = f"epoch {event.data['epoch']}" if event.data.get("epoch") else f"step {event.data.get('step')}"
        view.say(f"  Checkpoint saved: {at}")
    elif event.kind == "epoch":
        loss = tracker.loss_smoothed
        shown = f", smoothed loss {loss:.4f}" if loss is not None else ""
        view.say(f"  Epoch {event.data.get('epoch')}/{tracker.epochs} done{shown}")
    elif event.kind == "step":
        view.step(tracker.step, tracker.total_steps, tracker.loss, tracker.loss_smoothed)
