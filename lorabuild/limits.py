"""Memory limits learned the hard way: the batch size a spec ran out of memory with, per machine.

When a dry run or a training runs out of memory and succeeds at a smaller batch, that batch is
remembered in grimoire/.lorabuild/runs/{name}/limits.json under the machine's identity (its
GPUs and driver), so the next plan starts there instead of hitting the same wall, and config.md
and progress.md say so. This module owns that file.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from lorabuild.fsutil import atomic_write_json, digest


def machine_key(stamp: dict[str, Any]) -> str:
    """A short identity for a machine from its hardware stamp (host, GPUs, driver)."""
    return digest({k: stamp.get(k) for k in ("hostname", "gpus", "driver")}, 12)


def read_limit(path: Path, machine: str) -> dict[str, Any] | None:
    """The remembered limit for `machine`: {"batch_size", "failed_at", "when", "where"} or None."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    entry = data.get(machine) if isinstance(data, dict) else None
    return entry if isinstance(entry, dict) and isinstance(entry.get("batch_size"), int) else None


def record_limit(path: Path, machine: str, *, batch_size: int, failed_at: int, where: str) -> None:
    """Remember that `failed_at` ran out of memory on `machine` and `batch_size` is what fits."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            data = {}
    except (OSError, ValueError):
        data = {}
    previous = data.get(machine)
    if isinstance(previous, dict) and isinstance(previous.get("batch_size"), int):
        batch_size = min(batch_size, previous["batch_size"])
    data[machine] = {
        "batch_size": batch_size,
        "failed_at": failed_at,
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "where": where,
    }
    atomic_write_json(path, data)
