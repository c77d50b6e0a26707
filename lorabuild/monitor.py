"""The training monitor: follows a backend's log (and metrics file) as it grows, on watchdog.

Owns reading a run from the outside, the same way for a run lorabuild launched (the train gate
starts it beside training) and for one it did not (`lorabuild monitor --log …`, workflow.md's
monitor-training.sh). New lines — through truncation and rotation of the file — become backend
events; events keep progress.json and progress.md current within a second, feed the loss-anomaly
detector (plateau and divergence warn; an explosion stops the run), refresh the loss-curve PNG,
and sample GPU memory through NVML when there is a GPU.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorabuild.anomaly import Anomaly, AnomalyDetector
from lorabuild.backends import Event
from lorabuild.lossplot import write_loss_png
from lorabuild.procs import LineSplitter, pid_alive
from lorabuild.progress import ProgressTracker

TICK_S = 0.1  # how often pending progress is flushed and missed file events are caught
PLOT_INTERVAL_S = 10.0
GPU_SAMPLE_INTERVAL_S = 5.0


class LogFollower:
    """Calls `on_lines` with each batch of new lines of `path`, as the file grows.

    Survives the file being created late, truncated (read again from the start) and rotated
    (the old file read to its end, then the new one from its start). Lines are split on \\n and
    \\r, so progress-bar redraws arrive one by one.
    """

    def __init__(self, path: Path, on_lines: Callable[[list[str]], None], *, from_end: bool = False):
        self.path = path
        self.on_lines = on_lines
        self._lock = threading.Lock()
        self._handle: Any = None
        self._inode: int | None = None
        self._offset = 0
        self._splitter = LineSplitter()
        self._skip_to: int | None = None
        if from_end:
            try:
                self._skip_to = os.stat(path).st_size
            except FileNotFoundError:
                self._skip_to = None

    def poll(self) -> None:
        """Read whatever is new (called on every file event and on a timer)."""
        with self._lock:
            try:
                stat = os.stat(self.path)
            except FileNotFoundError:
                return
            if self._handle is not None and stat.st_ino != self._inode:
                self._drain()  # rotated: finish the old file first
                self._close()
            if self._handle is None:
                try:
                    self._handle = open(self.path, "rb")  # noqa: SIM115 - kept open between polls
                except FileNotFoundError:
                    return
                self._inode = os.fstat(self._handle.fileno()).st_ino
                self._offset = self._skip_to or 0
                self._skip_to = None
                self._splitter = LineSplitter()
            elif stat.st_size < self._offset:
                self._offset = 0  # truncated: the writer started again
                self._splitter = LineSplitter()
            self._drain()

    def _drain(self) -> None:
        self._handle.seek(self._offset)
        while chunk := self._handle.read(1 << 16):
            self._offset += len(chunk)
            lines = self._splitter.feed(chunk)
            if lines:
                self.on_lines(lines)

    def _close(self) -> None:
        if self._handle is not None:
            self._handle.close()
        self._handle = None

    def finish(self) -> None:
        """Read to the end, including a last line without a newline."""
        self.poll()
        with self._lock:
            rest = self._splitter.feed(b"", end=True)
            if rest:
                self.on_lines(rest)
            self._close()


@dataclass
class Monitor:
    """Everything that watches one training: progress, anomalies, the loss plot, GPU memory."""

    tracker: ProgressTracker
    read_line: Callable[[str], list[Event]]
    detector: AnomalyDetector
    plot_path: Path | None = None
    read_metrics: Callable[[Path, str], list[Event]] | None = None
    on_anomaly: Callable[[Anomaly], None] | None = None
    on_event: Callable[[Event], None] | None = None
    steps_per_epoch: int | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    ended: threading.Event = field(default_factory=threading.Event)
    _steps: list[int] = field(default_factory=list)
    _losses: list[float] = field(default_factory=list)
    _smoothed: list[float] = field(default_factory=list)
    _epoch_starts: list[int] = field(default_factory=list)
    _last_plot: float = 0.0
    _followers: list[LogFollower] = field(default_factory=list)
    _observer: Any = None
    _ticker: threading.Thread | None = None
    _stop_ticking: threading.Event = field(default_factory=threading.Event)
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _seen_steps: set[int] = field(default_factory=set)
    _derived_epoch: int = 0

    # --- events ---

    def handle(self, event: Event) -> None:
        if event.kind == "step" and event.data.get("epoch") is None and self.steps_per_epoch:
            # backends that count only steps (ai-toolkit): epochs from the plan's steps per epoch
            epoch = (int(event.data.get("step", 1)) - 1) // self.steps_per_epoch + 1
            if epoch > self._derived_epoch > 0:
                self.handle(
                    Event("epoch", {"epoch": self._derived_epoch, "step": int(event.data["step"]) - 1, "derived": True})
                )
            self._derived_epoch = max(self._derived_epoch, epoch)
            event = Event("step", {**event.data, "epoch": epoch})
        with self._lock:
            if event.kind == "step":
                self._on_step(event)
            if event.kind == "error":
                self.errors.append(event.data)
                self.ended.set()
                if event.data.get("kind") == "nan" and self.detector.stop_on_nan:
                    # the backend said so itself (ai-toolkit trains on with the loss set to 0)
                    self._anomaly(
                        Anomaly(
                            "explosion",
                            "Loss jumped to NaN — training has failed",
                            self.tracker.epoch,
                            self.tracker.step,
                            stop=True,
                        )
                    )
            if event.kind == "done":
                self.ended.set()
            if event.kind == "epoch":
                self._epoch_starts.append(int(event.data.get("step", 0)) + 1)
            self.tracker.handle(event)
            if event.kind in ("epoch", "checkpoint", "done") or time.monotonic() - self._last_plot > PLOT_INTERVAL_S:
                self.plot()
        if self.on_event is not None:
            self.on_event(event)

    def _on_step(self, event: Event) -> None:
        step = int(event.data.get("step", 0))
        loss = event.data.get("loss")
        if loss is None or step in self._seen_steps:
            return  # a redraw of the same step (tqdm) or a step without a loss
        self._seen_steps.add(step)
        loss = float(loss)
        epoch = event.data.get("epoch")
        if epoch is None and self.steps_per_epoch:
            epoch = (step - 1) // self.steps_per_epoch + 1
        for anomaly in self.detector.step(step, int(epoch or 1), loss):
            self._anomaly(anomaly)
        self._steps.append(step)
        self._losses.append(loss)
        smoothed = self.detector.smoothed
        self._smoothed.append(smoothed if smoothed is not None else float("nan"))

    def _anomaly(self, anomaly: Anomaly) -> None:
        if any(a["kind"] == anomaly.kind for a in self.tracker.anomalies):
            return  # each kind once: a NaN seen both in the numbers and in the backend's words
        self.tracker.anomalies.append(anomaly.as_dict())
        self.tracker.write(force=True)
        if self.on_anomaly is not None:
            self.on_anomaly(anomaly)

    def feed_lines(self, lines: list[str]) -> None:
        for line in lines:
            for event in self.read_line(line):
                self.handle(event)

    def feed_metrics(self, path: Path, lines: list[str]) -> None:
        if self.read_metrics is None:
            return
        for line in lines:
            for event in self.read_metrics(path, line):
                self.handle(event)

    def plot(self) -> None:
        if self.plot_path is None:
            return
        self._last_plot = time.monotonic()
        write_loss_png(
            self.plot_path,
            list(self._steps),
            list(self._losses),
            list(self._smoothed),
            list(self._epoch_starts),
            f"{self.tracker.name}: loss",
        )
        self.tracker.loss_plot = self.plot_path.name

    # --- following files ---

    def follow(self, log: Path, metrics: list[Path] | None = None, *, from_end: bool = False) -> None:
        """Start following `log` (and metrics files) in the background: from their beginning, or,
        with `from_end`, from what they hold now (older lines belong to an earlier run)."""
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        self._followers = [LogFollower(log, self.feed_lines, from_end=from_end)]
        for path in metrics or []:
            self._followers.append(LogFollower(path, self._metrics_reader(path), from_end=from_end))
        by_path = {str(f.path.absolute()): f for f in self._followers}

        monitor = self

        class Changed(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                for name in (event.src_path, getattr(event, "dest_path", "")):
                    follower = by_path.get(os.fsdecode(name)) if name else None
                    if follower is not None:
                        with monitor._lock:
                            follower.poll()

        self._observer = Observer()
        for folder in {str(f.path.absolute().parent) for f in self._followers}:
            os.makedirs(folder, exist_ok=True)
            self._observer.schedule(Changed(), folder, recursive=False)
        self._observer.start()
        self._ticker = threading.Thread(target=self._tick, name="lorabuild-monitor", daemon=True)
        self._ticker.start()

    def _metrics_reader(self, path: Path) -> Callable[[list[str]], None]:
        def read(lines: list[str]) -> None:
            self.feed_metrics(path, lines)

        return read

    def _tick(self) -> None:
        next_gpu = 0.0
        while not self._stop_ticking.wait(TICK_S):
            with self._lock:
                for follower in self._followers:
                    follower.poll()  # events can be missed (network file systems); polling is cheap
                self.tracker.flush()
            if time.monotonic() >= next_gpu:
                next_gpu = time.monotonic() + GPU_SAMPLE_INTERVAL_S
                sample_gpu_memory(self.tracker)

    def catch_up(self) -> None:
        """Read everything written so far, now (before judging how an attempt ended)."""
        with self._lock:
            for follower in self._followers:
                follower.poll()

    def close(self, status: str | None = None, message: str | None = None) -> None:
        """Read what is left, stop following, draw the final plot, write the final progress."""
        self._stop_ticking.set()
        if self._ticker is not None:
            self._ticker.join()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join()
        with self._lock:
            for follower in self._followers:
                follower.finish()
            self.plot()
            if status is not None:
                self.tracker.finish(status, message)
            else:
                self.tracker.write(force=True)


def sample_gpu_memory(tracker: ProgressTracker, nvml: Any = None) -> None:
    """Put the GPU's used/total memory into the progress record (NVML; nothing without a GPU)."""
    from lorabuild.studio import NVML_LIBRARY

    try:
        if nvml is None:
            import ctypes

            ctypes.CDLL(NVML_LIBRARY)
            import pynvml

            nvml = pynvml
        nvml.nvmlInit()
        try:
            used = total = 0.0
            for index in range(nvml.nvmlDeviceGetCount()):
                info = nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(index))
                used, total = max(used, info.used / 1e9), max(total, info.total / 1e9)
        finally:
            nvml.nvmlShutdown()
    except Exception:
        return  # no driver, or it failed: the record just has no memory figures
    tracker.memory_used_gb, tracker.memory_total_gb = round(used, 1), round(total, 1)


def monitor_log(
    log: Path,
    *,
    backend: str,
    epochs: int,
    out: Path,
    total_steps: int | None = None,
    steps_per_epoch: int | None = None,
    pid: int | None = None,
    settings: dict[str, Any] | None = None,
    idle_timeout: float | None = None,
    on_event: Callable[[Event], None] | None = None,
) -> str:
    """`lorabuild monitor`: follow any backend's log until the run ends; the final status.

    Works on runs lorabuild did not launch. The run has ended when the backend says so (done or
    an error), when process `pid` exits, or after `idle_timeout` seconds without a new line.
    """
    from lorabuild import backends
    from lorabuild.presets import MONITOR_DEFAULTS

    reader = backends.log_reader_for(backend)
    name = log.stem
    tracker = ProgressTracker(
        name=name,
        json_path=out / "progress.json",
        md_path=out / "progress.md",
        epochs=epochs,
        total_steps=total_steps or 0,
        device="as the log says",
        ema_beta=float((settings or MONITOR_DEFAULTS).get("ema_beta") or MONITOR_DEFAULTS["ema_beta"]),
    )
    if total_steps and epochs and not steps_per_epoch:
        steps_per_epoch = max(1, total_steps // epochs)
    monitor = Monitor(
        tracker=tracker,
        read_line=reader,
        detector=AnomalyDetector.from_settings({**MONITOR_DEFAULTS, **(settings or {})}),
        plot_path=out / "loss.png",
        on_event=on_event,
        steps_per_epoch=steps_per_epoch,
    )
    tracker.write(force=True)
    monitor.follow(log)
    last_size, last_change = -1, time.monotonic()
    try:
        while not monitor.ended.wait(0.2):
            if pid is not None and not pid_alive(pid):
                break
            size = log.stat().st_size if log.exists() else 0
            if size != last_size:
                last_size, last_change = size, time.monotonic()
            elif idle_timeout is not None and time.monotonic() - last_change > idle_timeout:
                break
    except KeyboardInterrupt:
        monitor.close("STOPPED", "the monitor was stopped; the training itself was not touched")
        return "STOPPED"
    monitor.catch_up()
    if monitor.errors or any(a["kind"] == "explosion" for a in tracker.anomalies):
        reason = "; ".join(str(e.get("message")) for e in monitor.errors) or tracker.anomalies[-1]["message"]
        status = "FAILED"
    elif (tracker.total_steps and tracker.step >= tracker.total_steps) or monitor.ended.is_set():
        status, reason = "COMPLETE", "the run finished"
    else:
        status, reason = "FAILED", "the log stopped before the run finished"
    monitor.close(status, reason)
    return status
