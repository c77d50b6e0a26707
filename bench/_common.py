"""Helpers shared by the benchmarks: a scratch project and timed lorabuild runs."""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def scratch_project() -> Path:
    """A temporary copy of specs/ and examples/, so a benchmark never touches ./grimoire."""
    root = Path(tempfile.mkdtemp(prefix="lorabuild-bench-"))
    shutil.copytree(REPO / "specs", root / "specs")
    shutil.copytree(REPO / "examples", root / "examples")
    return root


def lorabuild(root: Path, *args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Run `lorabuild ARGS` as a fresh process in `root`; (wall seconds, result)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "lorabuild", *args], cwd=root, env=env, capture_output=True, text=True)
    return time.perf_counter() - start, done


def median(values: list[float]) -> float:
    return statistics.median(values)
