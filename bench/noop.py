"""How long an up-to-date `lorabuild run specs/example.yaml` takes (issue #2: under 0.3 s).

Trains the example once, then runs it again RUNS times as fresh processes (interpreter start-up
included) and prints the median wall time. Also checks that no task ran. The first rerun takes
the full path (spec, plan, doit) and leaves the up-to-date record that the later ones answer
from (lorabuild/uptodate.py); the full path is also timed on its own, the record removed before
each run, as after any change.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from _common import lorabuild, median, scratch_project

RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 7


def rerun(root: Path) -> float:
    seconds, done = lorabuild(root, "run", "specs/example.yaml")
    if done.returncode != 0 or "nothing to do" not in done.stdout or "▶" in done.stdout:
        raise SystemExit(f"the up-to-date run did work:\n{done.stdout}\n{done.stderr}")
    return seconds


def main() -> None:
    root = scratch_project()
    records = root / "grimoire" / ".lorabuild" / "uptodate"
    try:
        _, first = lorabuild(root, "run", "specs/example.yaml")
        if first.returncode != 0:
            raise SystemExit(f"first run failed:\n{first.stdout}\n{first.stderr}")
        full = []
        for _ in range(RUNS):
            shutil.rmtree(records, ignore_errors=True)
            full.append(rerun(root))
        times = [rerun(root) for _ in range(RUNS)]
        if not any(records.glob("*.json")):
            raise SystemExit("the up-to-date runs left no record")
        print(
            f"up-to-date run: median {median(times) * 1000:.0f} ms wall over {RUNS} runs "
            f"(min {min(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms); "
            f"the full check without a record: median {median(full) * 1000:.0f} ms"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
