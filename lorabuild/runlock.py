"""One lock per run folder, so two lorabuild processes never work on the same training.

The lock is an exclusive `flock` on grimoire/.lorabuild/runs/{name}/lock, held for the whole
run and released by the kernel when the process ends, however it ends (no stale locks after
kill -9). The file holds who has it, so the second process can name the holder. Within one
process the lock is re-entrant (the pipeline and each gate may both ask for it).
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_HELD: dict[Path, int] = {}


@dataclass(frozen=True)
class Holder:
    pid: int | None
    started: str | None
    command: str | None

    def describe(self) -> str:
        who = f"process {self.pid}" if self.pid else "another process"
        bits = [who]
        if self.started:
            bits.append(f"started {self.started}")
        if self.command:
            bits.append(f"running `{self.command}`")
        return ", ".join(bits)


class LockBusy(Exception):
    """Another process holds the run folder."""

    def __init__(self, path: Path, holder: Holder):
        self.path = path
        self.holder = holder
        super().__init__(f"{path} is held by {holder.describe()}")


def acquire(path: Path) -> None:
    """Take the lock at `path` (creating its folder) or raise `LockBusy` naming the holder."""
    path = path.resolve()
    if path in _HELD:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LockBusy(path, read_holder(path)) from None
    info = {
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(["lorabuild", *sys.argv[1:]]) if sys.argv else None,
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    _HELD[path] = fd


def release(path: Path) -> None:
    fd = _HELD.pop(path.resolve(), None)
    if fd is not None:
        os.close(fd)


def read_holder(path: Path) -> Holder:
    try:
        info: dict[str, Any] = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, json.JSONDecodeError):
        info = {}
    return Holder(info.get("pid"), info.get("started"), info.get("command"))


def is_held(path: Path) -> bool:
    """Whether some process (this one included) holds the lock, without taking it."""
    path = path.resolve()
    if path in _HELD:
        return True
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
