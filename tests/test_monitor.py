"""The monitor: following a growing log for real (watchdog events, truncation, rotation), keeping
progress.json/.md current, the loss plot, and `lorabuild monitor` on a log lorabuild did not launch."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

from lorabuild.anomaly import AnomalyDetector
from lorabuild.backends import Event
from lorabuild.monitor import LogFollower, Monitor, sample_gpu_memory
from lorabuild.progress import ProgressTracker
from tests.conftest import lorabuild_env


def wait_for(predicate, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_follower_reads_growth_truncation_and_rotation(tmp_path: Path) -> None:
    log = tmp_path / "train.log"
    got: list[str] = []
    follower = LogFollower(log, got.extend)
    follower.poll()  # not there yet: nothing, no error
    log.write_text("one\ntwo\n")
    follower.poll()
    with open(log, "a") as handle:
        handle.write("thr")
    follower.poll()
    assert got == ["one", "two"]  # a line without its end waits for it
    with open(log, "a") as handle:
        handle.write("ee\rfour\r")  # progress-bar redraws
    follower.poll()
    assert got == ["one", "two", "three", "four"]
    log.write_text("five\n")  # truncated and rewritten
    follower.poll()
    assert got[-1] == "five"
    with open(log, "a") as handle:
        handle.write("six\n")
    rotated = tmp_path / "train.log.1"
    os.replace(log, rotated)
    with open(rotated, "a") as handle:
        handle.write("seven\n")  # the old file's last words, written after the rename
    log.write_text("eight\n")
    follower.poll()
    follower.finish()
    assert got == ["one", "two", "three", "four", "five", "six", "seven", "eight"]


def builtin_line(event: str, **data: object) -> str:
    return json.dumps({"event": event, **data}) + "\n"


def read_builtin(line: str) -> list[Event]:
    data = json.loads(line)
    return [Event(data.pop("event"), data)]


def make_monitor(tmp_path: Path, **kwargs: object) -> tuple[Monitor, ProgressTracker]:
    tracker = ProgressTracker(
        name="t",
        json_path=tmp_path / "progress.json",
        md_path=tmp_path / "progress.md",
        epochs=2,
        total_steps=4,
        device="cpu",
    )
    monitor = Monitor(
        tracker=tracker,
        read_line=read_builtin,
        detector=AnomalyDetector(),
        plot_path=tmp_path / "loss.png",
        steps_per_epoch=2,
        **kwargs,
    )  # type: ignore[arg-type]
    return monitor, tracker


def test_progress_follows_the_log_within_a_second(tmp_path: Path) -> None:
    log = tmp_path / "train.log"
    log.write_text("")
    monitor, _ = make_monitor(tmp_path)
    monitor.follow(log)
    try:
        delays = []
        with open(log, "a") as handle:
            for step in range(1, 5):
                handle.write(
                    builtin_line("step", step=step, total_steps=4, epoch=(step + 1) // 2, epochs=2, loss=0.5 / step)
                )
                handle.flush()
                written = time.monotonic()
                assert wait_for(lambda s=step: _progress_step(tmp_path) == s, timeout=5)
                delays.append(time.monotonic() - written)
                time.sleep(0.1)
        assert max(delays) < 1.0, delays
    finally:
        monitor.close("COMPLETE", "done")
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["status"] == "COMPLETE" and progress["step"] == 4 and progress["epoch"] == 2
    assert progress["loss_start"] == 0.5 and progress["loss_plot"] == "loss.png"
    assert "![Loss curve" in (tmp_path / "progress.md").read_text()
    png = (tmp_path / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and _png_size(png) == (800, 400)


def _progress_step(folder: Path) -> int | None:
    try:
        return int(json.loads((folder / "progress.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return None


def _png_size(png: bytes) -> tuple[int, int]:
    width, height = struct.unpack(">II", png[16:24])
    assert zlib.crc32(png[12:29]) == struct.unpack(">I", png[29:33])[0]
    return width, height


def test_a_nan_loss_is_reported_and_asks_to_stop(tmp_path: Path) -> None:
    stopped = []
    monitor, _ = make_monitor(tmp_path, on_anomaly=stopped.append)
    for line in [
        builtin_line("step", step=1, epoch=1, loss=0.2),
        builtin_line("step", step=2, epoch=1, loss=float("nan")),
    ]:
        monitor.feed_lines([line.strip()])
    monitor.close("FAILED", "stopped")
    (anomaly,) = stopped
    assert anomaly.kind == "explosion" and anomaly.stop
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["anomalies"] == [
        {"kind": "explosion", "message": "Loss jumped to NaN — training has failed", "epoch": 1, "step": 2}
    ]
    assert "Loss jumped to NaN — training has failed" in (tmp_path / "progress.md").read_text()
    assert progress["loss"] == "nan"


def test_epochs_are_derived_when_the_backend_gives_none(tmp_path: Path) -> None:
    monitor, tracker = make_monitor(tmp_path)
    for step in range(1, 5):
        monitor.handle(Event("step", {"step": step, "loss": 0.1}))
    assert tracker.epoch == 2


def test_gpu_memory_is_sampled_through_nvml_when_there_is_a_gpu(tmp_path: Path) -> None:
    class Nvml:
        def nvmlInit(self) -> None: ...
        def nvmlShutdown(self) -> None: ...
        def nvmlDeviceGetCount(self) -> int:
            return 1

        def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
            return i

        def nvmlDeviceGetMemoryInfo(self, h: int) -> SimpleNamespace:
            return SimpleNamespace(used=18_200_000_000, total=25_757_220_864)

    _, tracker = make_monitor(tmp_path)
    sample_gpu_memory(tracker, Nvml())
    assert (tracker.memory_used_gb, tracker.memory_total_gb) == (18.2, 25.8)
    tracker.write(force=True)
    assert "**VRAM usage**: 18.2 / 25.8 GB" in (tmp_path / "progress.md").read_text()
    _, no_gpu = make_monitor(tmp_path / "x")
    sample_gpu_memory(no_gpu)  # no driver here: nothing happens
    assert no_gpu.memory_used_gb is None or no_gpu.memory_used_gb >= 0


def kohya_lines(epoch: int, steps: range, total: int, loss: float) -> str:
    out = f"\nepoch {epoch}/3\n"
    for step in steps:
        bar = f"{100 * step // total:3d}%|███       | {step}/{total}"
        out += f"\rsteps: {bar} [00:01<00:10, 4.20it/s, avr_loss={loss:.3g}]"
    return out


def test_lorabuild_monitor_follows_a_log_it_did_not_launch(tmp_path: Path) -> None:
    log = tmp_path / "runs" / "training.log"
    log.parent.mkdir()
    out = tmp_path / "watch"

    def trainer() -> None:
        time.sleep(1.0)  # the monitor starts before the log exists
        with open(log, "w") as handle:
            for epoch, loss in ((1, 0.12), (2, 0.11), (3, 0.10)):
                handle.write(kohya_lines(epoch, range((epoch - 1) * 4 + 1, epoch * 4 + 1), 12, loss))
                handle.flush()
                time.sleep(0.3)
            handle.write("\nmodel saved.\n")

    writer = threading.Thread(target=trainer)
    writer.start()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "lorabuild",
            "monitor",
            "--log",
            str(log),
            "--epochs",
            "3",
            "--backend",
            "kohya",
            "--out",
            str(out),
            "--idle",
            "5",
        ],
        env=lorabuild_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    writer.join()
    assert done.returncode == 0, done.stdout + done.stderr
    progress = json.loads((out / "progress.json").read_text())
    assert progress["status"] == "COMPLETE" and progress["step"] == 12 and progress["epoch"] == 3
    assert progress["loss"] == 0.1 and progress["loss_start"] == 0.12
    assert (out / "progress.md").is_file() and (out / "loss.png").is_file()


def test_lorabuild_monitor_reports_a_failed_run(tmp_path: Path) -> None:
    log = tmp_path / "training.log"
    log.write_text(
        kohya_lines(1, range(1, 3), 12, 0.1) + "\ntorch.OutOfMemoryError: CUDA out of memory. Tried to "
        "allocate 20.00 MiB\n"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "lorabuild",
            "monitor",
            "--log",
            str(log),
            "--epochs",
            "3",
            "--backend",
            "kohya",
            "--idle",
            "2",
        ],
        env=lorabuild_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["status"] == "FAILED" and "out of memory" in progress["message"].lower()


def test_the_terminal_view_draws_a_bar_and_prints_lines(tmp_path: Path) -> None:
    import io

    from lorabuild.ui import Console, TrainingView

    out = io.StringIO()
    view = TrainingView(Console(out=out, err=out), total_steps=10, epochs=2, bar=True)
    for step in range(1, 11):
        view.step(step, 10, 0.1, 0.09)
    view.say("  Epoch 1/2 done")
    view.close()
    assert "Epoch 1/2 done" in out.getvalue()
    plain = io.StringIO()
    quiet = TrainingView(Console(out=plain, err=plain), total_steps=10, epochs=2)  # not a terminal: no bar
    quiet.step(1, 10, 0.1, None)
    quiet.say("  Epoch 1/2 done")
    quiet.close()
    assert plain.getvalue() == "  Epoch 1/2 done\n"
