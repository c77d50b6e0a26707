"""How long after a training line is written progress.json shows it (issue #5: under 1 s).

Writes builtin-trainer step lines to a log one at a time, the monitor following it on watchdog
as during `lorabuild run`, and measures for each line the delay until progress.json holds its
step. Prints the median and the worst of N lines (default 40) at 4 and at 20 lines a second
(progress files are written at most four times a second; a held-back write waits for the next tick).
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from lorabuild.anomaly import AnomalyDetector
from lorabuild.backends import Event
from lorabuild.monitor import Monitor
from lorabuild.progress import ProgressTracker

LINES = int(sys.argv[1]) if len(sys.argv) > 1 else 40


def read(line: str) -> list[Event]:
    data = json.loads(line)
    return [Event(data.pop("event"), data)]


def shown_step(path: Path) -> int | None:
    try:
        return int(json.loads(path.read_text())["step"])
    except (OSError, ValueError, KeyError):
        return None


def main() -> None:
    for per_second in (4, 20):
        measure(per_second)


def measure(per_second: int) -> None:
    folder = Path(tempfile.mkdtemp(prefix="lorabuild-monitor-bench-"))
    try:
        log = folder / "train.log"
        log.write_text("")
        tracker = ProgressTracker("bench", folder / "progress.json", folder / "progress.md", 1, LINES, "cpu")
        monitor = Monitor(tracker=tracker, read_line=read, detector=AnomalyDetector(), plot_path=None)
        monitor.follow(log)
        delays = []
        with open(log, "a") as handle:
            for step in range(1, LINES + 1):
                handle.write(json.dumps({"event": "step", "step": step, "epoch": 1, "loss": 0.1}) + "\n")
                handle.flush()
                written = time.monotonic()
                while shown_step(folder / "progress.json") != step:
                    if time.monotonic() - written > 5:
                        raise SystemExit(f"step {step} never reached progress.json")
                    time.sleep(0.002)
                delays.append(time.monotonic() - written)
                time.sleep(max(0.0, 1 / per_second - (time.monotonic() - written)))
        monitor.close("COMPLETE")
        print(
            f"monitor latency at {per_second} lines/s, line written → progress.json updated: "
            f"median {statistics.median(delays) * 1000:.0f} ms, worst {max(delays) * 1000:.0f} ms over {LINES} lines"
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
