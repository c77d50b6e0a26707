"""Gate 4 — dry run: a few real training steps before the long run (workflow.md Phase 9).

Runs the backend's short N-step variant with the Gate 2 config, logs it to dryrun.log, and
writes dryrun.ok only when the model loaded, the dataset was read and at least two steps
completed. Otherwise it explains the failure in plain language (wrong model path, caption
encoding, out of memory, CUDA mismatch, NaN loss) with the fix.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

from lorabuild import backends, presets
from lorabuild.backends import Event
from lorabuild.fsutil import atomic_write_text
from lorabuild.gates import GateContext, GateFailed
from lorabuild.procs import run_streaming

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

DIAGNOSES: dict[str, tuple[str, str]] = {
    "model_load": (
        "the base model could not be loaded — usually a wrong model path or a corrupted download",
        "check `base_model.path`; if it is right, download the model again",
    ),
    "dataset": (
        "the dataset could not be read — usually a missing or unreadable picture",
        "open the pictures named above in an image viewer; remove or re-save broken ones",
    ),
    "caption": (
        "a caption could not be read — usually a text-encoding problem or a missing file",
        "save the caption files as UTF-8 text in your editor",
    ),
    "oom": (
        "out of memory on the first steps — the batch size is too high for this machine",
        "lower `training.batch_size` (or resolution), then run again",
    ),
    "nan": (
        "the loss became NaN (not a number) within the first steps — the learning rate is far too high",
        "lower `training.learning_rate`",
    ),
    "config": ("the backend rejected its config", "see the message above; this is likely a lorabuild bug — report it"),
}
CUDA_PATTERN = re.compile(
    r"CUDA error|no kernel image is available|CUDA driver version is insufficient|"
    r"cudaErrorUnsupportedPtxVersion"
)


def targets(ctx: GateContext) -> list[Path]:
    return [ctx.run.dryrun_log, ctx.run.dryrun_ok]


def inputs(ctx: GateContext) -> dict[str, Any]:
    # a dry run proves the pipeline works on *this* machine and environment, so they count too
    return {**ctx.plan.pick(READS), "machine": ctx.environment_stamp}


def file_deps(ctx: GateContext) -> list[Path]:
    return [*ctx.dataset.files, *ctx.model_files]


def run(ctx: GateContext) -> None:
    plan = ctx.plan
    steps = presets.DRY_RUN_STEPS
    seen: dict[str, Any] = {"model_loaded": False, "dataset": None, "steps": 0, "errors": [], "step_seconds": []}

    def on_line(line: str) -> None:
        for event in backends.parse_log_line(plan, line):
            _note(seen, event)

    with tempfile.TemporaryDirectory(prefix=".dryrun-", dir=ctx.run.dir) as scratch:
        launch = backends.launch(plan, ctx.run.backend_dir, Path(scratch), max_steps=steps, resume=False)
        with open(ctx.run.dryrun_log, "w", encoding="utf-8") as log:
            log.write(f"# lorabuild dry run: {' '.join(launch.argv[:4])} … ({steps} steps)\n")
            finished = run_streaming(launch, log=log, on_line=on_line, pid_file=ctx.run.backend_pid)

    # a backend that took steps has loaded its model and read its data, whether or not it said so
    stepped = seen["steps"] > 0
    ok = (
        finished.returncode == 0
        and not seen["errors"]
        and (seen["model_loaded"] or stepped)
        and (seen["dataset"] is not None or stepped)
        and seen["steps"] >= presets.DRY_RUN_MIN_STEPS
    )
    if not ok:
        raise _diagnose(ctx, seen, finished.returncode, finished.tail)
    times = seen["step_seconds"][1:] or seen["step_seconds"]  # the first step includes warm-up
    record = {
        "passed": True,
        "steps": seen["steps"],
        "images": (seen["dataset"] or {}).get("images", len(plan.dataset.images)),
        "step_seconds": round(sum(times) / len(times), 4) if times else None,
        "seconds": round(finished.seconds, 1),
    }
    atomic_write_text(ctx.run.dryrun_ok, json.dumps(record, indent=2, sort_keys=True) + "\n")
    ctx.console.say(f"  Dry run passed — model loaded, {seen['steps']} steps completed, no errors")


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


def _diagnose(ctx: GateContext, seen: dict[str, Any], returncode: int, tail: list[str]) -> GateFailed:
    text = "\n".join(tail)
    details: list[str] = []
    for error in seen["errors"]:
        details.append(str(error.get("message", "")))
    kind = next((str(e.get("kind")) for e in seen["errors"] if e.get("kind") in DIAGNOSES), None)
    if kind is None and backends.is_out_of_memory(ctx.plan, text):
        kind = "oom"
    if kind is None and CUDA_PATTERN.search(text):
        message, fix = (
            "a CUDA error — the PyTorch build does not match the driver or GPU (Gate 3 should have caught this)",
            "run `lorabuild env` and follow its fix",
        )
    elif kind is not None:
        message, fix = DIAGNOSES[kind]
        if kind == "oom":
            fix = f"lower `training.batch_size` (now {ctx.plan.training.batch_size}) or the resolution, then run again"
    elif not seen["model_loaded"]:
        message, fix = DIAGNOSES["model_load"]
    elif not seen["dataset"]:
        message, fix = DIAGNOSES["dataset"]
    else:
        message = f"only {seen['steps']} of the {presets.DRY_RUN_MIN_STEPS} required steps completed"
        fix = f"read {ctx.run.dryrun_log} for the backend's own message"
    if not details:
        details = [line for line in tail[-5:] if line.strip()]
    return GateFailed(f"Dry run failed — {message} (backend exit code {returncode})", fix, details)
