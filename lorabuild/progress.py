"""Training progress: progress.json, and progress.md rendered from it (workflow.md Phase 10, step 5).

`ProgressTracker` turns backend events into the progress record and writes both files
atomically, at most a few times a second, and at once on events that matter (start, checkpoint,
resume, end). Markdown is for people; nothing reads it back.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorabuild.backends import Event
from lorabuild.fsutil import atomic_write_json, atomic_write_text
from lorabuild.glossary import Explainer

WRITE_INTERVAL_S = 0.25  # at most four writes a second; a held-back write is flushed within a tick


@dataclass
class ProgressTracker:
    """The progress of one training, kept current in `json_path` and `md_path`."""

    name: str
    json_path: Path
    md_path: Path
    epochs: int
    total_steps: int
    device: str
    ema_beta: float = 0.99
    oom_recoveries: int = 0
    notes: list[str] = field(default_factory=list)
    status: str = "RUNNING"
    epoch: int = 0
    step: int = 0
    loss: float | None = None
    loss_start: float | None = None
    loss_smoothed: float | None = None
    resumed_from_step: int | None = None
    checkpoints: list[str] = field(default_factory=list)
    step_seconds: float | None = None
    message: str | None = None
    anomalies: list[dict[str, Any]] = field(default_factory=list)
    memory_used_gb: float | None = None
    memory_total_gb: float | None = None
    loss_plot: str | None = None  # file name of the loss curve beside progress.md
    samples: list[str] = field(default_factory=list)  # the newest sample pictures, relative to progress.md
    samples_epoch: int | None = None
    _started: float = field(default_factory=time.monotonic)
    _dirty: bool = False
    _started_step: int = 0
    _last_write: float = 0.0
    _ema: float = 0.0
    _ema_steps: int = 0
    _checkpoint_paths: dict[str, str] = field(default_factory=dict)

    def know_checkpoints(self, paths: list[Path]) -> None:
        """Checkpoints already on disk when training (re)starts."""
        for path in paths:
            self._checkpoint_paths[str(path)] = path.name
        self.checkpoints = list(self._checkpoint_paths.values())

    def handle(self, event: Event) -> None:
        """Fold one backend event into the record; write the files when it is time."""
        d = event.data
        urgent = False
        if event.kind == "dataset":
            self.total_steps = int(d.get("total_steps", self.total_steps))
            self.epochs = int(d.get("epochs", self.epochs))
            urgent = True
        elif event.kind == "resumed":
            self.resumed_from_step = int(d.get("step", 0))
            self.step = self._started_step = self.resumed_from_step
            self.epoch = int(d.get("epoch", 0))
            self._started = time.monotonic()
            urgent = True
        elif event.kind == "step":
            self.step = int(d["step"])
            self.epoch = int(d.get("epoch", self.epoch))
            self.total_steps = int(d.get("total_steps", self.total_steps))
            loss = float(d["loss"])
            self.loss = loss
            if self.loss_start is None:
                self.loss_start = loss
            if math.isfinite(loss):
                # bias-corrected EMA (as Adam does), so early values are not pulled towards zero
                self._ema = self.ema_beta * self._ema + (1 - self.ema_beta) * loss
                self._ema_steps += 1
                self.loss_smoothed = self._ema / (1 - self.ema_beta**self._ema_steps)
            if d.get("step_seconds") is not None:
                self.step_seconds = float(d["step_seconds"])
        elif event.kind == "checkpoint":
            self._checkpoint_paths[str(d.get("path"))] = Path(str(d.get("path"))).name
            self.checkpoints = list(self._checkpoint_paths.values())
            urgent = True
        elif event.kind == "checkpoint_removed":
            self._checkpoint_paths.pop(str(d.get("path")), None)
            self.checkpoints = list(self._checkpoint_paths.values())
            urgent = True
        elif event.kind == "sample":
            epoch = d.get("epoch")
            if epoch != self.samples_epoch:
                self.samples, self.samples_epoch = [], epoch if isinstance(epoch, int) else None
            # the trainer may write elsewhere (a remote machine): progress.md links the run folder's copy
            self.samples.append(f"samples/{Path(str(d.get('path'))).name}")
        elif event.kind in ("done", "saved", "samples_done"):
            urgent = True
        self.write(force=urgent)

    def flush(self) -> None:
        """Write what a throttled `write` held back, once its interval has passed."""
        if self._dirty and time.monotonic() - self._last_write >= WRITE_INTERVAL_S:
            self.write(force=True)

    def elapsed(self) -> float:
        return time.monotonic() - self._started

    def remaining(self) -> float | None:
        done = self.step - self._started_step
        if done <= 0 or not self.total_steps:
            return None
        return self.elapsed() / done * max(0, self.total_steps - self.step)

    def finish(self, status: str, message: str | None = None) -> None:
        self.status = status
        self.message = message
        self.write(force=True)

    def record(self) -> dict[str, Any]:
        remaining = self.remaining()
        return {
            "name": self.name,
            "status": self.status,
            "epoch": self.epoch,
            "epochs": self.epochs,
            "step": self.step,
            "total_steps": self.total_steps,
            "loss": _finite_or_text(self.loss),
            "loss_start": _finite_or_text(self.loss_start),
            "loss_smoothed": _finite_or_text(self.loss_smoothed),
            "elapsed_seconds": round(self.elapsed(), 1),
            "remaining_seconds": None if remaining is None else round(remaining, 1),
            "step_seconds": self.step_seconds,
            "device": self.device,
            "memory_used_gb": self.memory_used_gb,
            "memory_total_gb": self.memory_total_gb,
            "checkpoints": list(self.checkpoints),
            "resumed_from_step": self.resumed_from_step,
            "oom_recoveries": self.oom_recoveries,
            "anomalies": list(self.anomalies),
            "notes": list(self.notes),
            "message": self.message,
            "loss_plot": self.loss_plot,
            "samples": list(self.samples),
            "samples_epoch": self.samples_epoch,
            "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def write(self, force: bool = False) -> None:
        """Write both files now if forced or due; otherwise leave it to the next `flush`."""
        now = time.monotonic()
        if not force and now - self._last_write < WRITE_INTERVAL_S:
            self._dirty = True
            return
        self._last_write = now
        self._dirty = False
        record = self.record()
        atomic_write_json(self.json_path, record)
        atomic_write_text(self.md_path, render_progress_md(record))


def _finite_or_text(value: float | None) -> float | str | None:
    if value is None:
        return None
    return round(value, 6) if math.isfinite(value) else str(value)


def _minutes(seconds: float | None) -> str:
    if seconds is None:
        return "not known yet"
    if seconds < 90:
        return f"{round(seconds)} s"
    return f"{round(seconds / 60)} min"


def render_progress_md(p: dict[str, Any]) -> str:
    """progress.md in the shape of workflow.md, each term explained the first time."""
    ex = Explainer()
    lines = [f"# Training Progress: {p['name']}", ""]
    lines.append(f"- **Status**: {p['status']}" + (f" — {p['message']}" if p.get("message") else ""))
    lines.append(f"- **Current epoch**: {p['epoch']}/{p['epochs']} ({ex.first('epochs')})")
    lines.append(f"- **Step**: {p['step']}/{p['total_steps']} ({ex.first('steps')})")
    if p.get("loss") is not None:
        smoothed = f", smoothed {p['loss_smoothed']:.4f}" if isinstance(p.get("loss_smoothed"), float) else ""
        loss = f"{p['loss']:.4f}" if isinstance(p["loss"], float) else str(p["loss"])
        start = f"{p['loss_start']:.4f}" if isinstance(p.get("loss_start"), float) else str(p.get("loss_start"))
        lines.append(f"- **Loss**: {loss} (started: {start}{smoothed}) — {ex.first('loss')}")
    else:
        lines.append("- **Loss**: no steps yet")
    if p.get("memory_used_gb") is not None:
        lines.append(
            f"- **VRAM usage**: {p['memory_used_gb']:.1f} / {p['memory_total_gb']:.1f} GB ({ex.first('vram')})"
        )
    else:
        lines.append(f"- **Device**: {p['device']}")
    lines.append(f"- **Elapsed**: {_minutes(p['elapsed_seconds'])}")
    lines.append(f"- **Estimated remaining**: {_minutes(p['remaining_seconds'])}")
    cps = ", ".join(p["checkpoints"]) if p["checkpoints"] else "none yet"
    lines.append(f"- **Checkpoints**: {cps} ({ex.first('checkpoint')})")
    lines.append(f"- **OOM recoveries**: {p['oom_recoveries']} ({ex.first('oom')})")
    if p.get("resumed_from_step"):
        lines.append(f"- **Resumed from step**: {p['resumed_from_step']} ({ex.first('resume')})")
    for anomaly in p.get("anomalies") or []:
        word = {"explosion": "Stopped" if p["status"] != "RUNNING" else "Problem"}.get(anomaly["kind"], "Warning")
        lines.append(f"- **{word}** (epoch {anomaly.get('epoch')}): {anomaly['message']}")
    for note in p.get("notes") or []:
        lines.append(f"- **Note**: {note}")
    if p.get("loss_plot"):
        lines += ["", f"![Loss curve: each step faintly, the smoothed loss boldly]({p['loss_plot']})"]
    if p.get("samples"):
        lines += ["", f"Sample pictures after epoch {p.get('samples_epoch')} ({ex.first('sample_prompts')}):", ""]
        lines += [" ".join(f"![sample {k + 1}]({path})" for k, path in enumerate(p["samples"]))]
    lines.append("")
    lines.append(f"_Updated {p['updated_at']}._")
    lines.append("")
    return "\n".join(lines)
