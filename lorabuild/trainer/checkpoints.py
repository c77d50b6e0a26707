"""Checkpoint folders: naming, atomic writing, finding the one to resume from, pruning.

This module owns the `checkpoints/` folder of docs/trainer.md. A checkpoint is a folder
`epoch-NNNN/` (end of an epoch) or `step-NNNNNNNN/` (saved on SIGTERM/SIGINT) holding the
epoch's LoRA file, `state.pt` and `checkpoint.json`. Folders are built under a `.tmp-` name
and renamed into place, and removed by renaming them away first, so a folder with a
checkpoint name is always complete. Torch is needed only to write `state.pt`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from lorabuild.trainer.files import normal_permissions

CHECKPOINT_JSON: Final = "checkpoint.json"
STATE_FILE: Final = "state.pt"
TMP_PREFIX: Final = ".tmp-"
_NAME_RE: Final = re.compile(r"^(epoch)-(\d{4,})$|^(step)-(\d{8,})$")


def epoch_dir_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}"


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    kind: str  # "epoch" or "step"
    step: int
    epoch: int
    resume_key: str | None
    lora: Path | None

    @property
    def state_file(self) -> Path:
        return self.path / STATE_FILE


def read_checkpoint(path: Path) -> Checkpoint | None:
    """The checkpoint in `path`, or None if the folder is not a complete checkpoint."""
    match = _NAME_RE.match(path.name)
    if match is None or not path.is_dir():
        return None
    try:
        info = json.loads((path / CHECKPOINT_JSON).read_text(encoding="utf-8"))
        step, epoch = int(info["step"]), int(info["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not (path / STATE_FILE).is_file():
        return None
    lora_name = info.get("lora")
    return Checkpoint(
        path=path,
        kind="epoch" if match.group(1) else "step",
        step=step,
        epoch=epoch,
        resume_key=info.get("resume_key"),
        lora=path / lora_name if isinstance(lora_name, str) else None,
    )


def list_checkpoints(root: Path) -> list[Checkpoint]:
    """Complete checkpoints under `root`, oldest first (an epoch save sorts after a step save
    of the same step, since it is the more deliberate of the two)."""
    if not root.is_dir():
        return []
    found = [c for c in (read_checkpoint(p) for p in root.iterdir()) if c is not None]
    return sorted(found, key=lambda c: (c.step, c.kind == "epoch", c.path.name))


def resumable(root: Path, resume_key: str | None) -> list[Checkpoint]:
    """Checkpoints made by a run with this resume key, newest first."""
    return [c for c in reversed(list_checkpoints(root)) if c.resume_key == resume_key]


def _remove_tree(path: Path) -> None:
    # Rename first: a half-deleted folder must never keep a checkpoint's name.
    doomed = path.with_name(f"{TMP_PREFIX}del-{path.name}-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.replace(path, doomed)
    except FileNotFoundError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def write_checkpoint(
    root: Path,
    name: str,
    info: dict[str, Any],
    writers: dict[str, Callable[[Path], None]],
) -> Path:
    """Build `root/name` atomically: each writer fills one file in a temporary folder,
    `checkpoint.json` is written last, and the folder is renamed into place."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{TMP_PREFIX}{name}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        for filename, write in writers.items():
            write(tmp / filename)
        (tmp / CHECKPOINT_JSON).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        normal_permissions(tmp)
        final = root / name
        if final.exists():
            # A leftover from an earlier run (e.g. after --no-resume): replace it whole.
            _remove_tree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def prune(root: Path, resume_key: str | None, keep_last: int | None, keep: Path | None) -> list[Path]:
    """Remove this run's interrupt saves older than its newest checkpoint, then all but its
    newest `keep_last` epoch checkpoints (None: keep all). Interrupt saves do not count
    against `keep_last`: they are temporary, and must not push out the epochs the user asked
    for. `keep` is never removed; other resume keys' checkpoints are left alone. Returns the
    removed folders."""
    ours = [c for c in list_checkpoints(root) if c.resume_key == resume_key]
    if not ours:
        return []
    newest = ours[-1]
    removed = [c.path for c in ours if c.kind == "step" and c.path not in (newest.path, keep)]
    epochs = [c for c in ours if c.kind == "epoch"]
    if keep_last is not None and len(epochs) > keep_last:
        removed += [c.path for c in epochs[: len(epochs) - keep_last] if c.path != keep]
    for path in removed:
        _remove_tree(path)
    return removed


def remove_interrupt_saves(root: Path, resume_key: str | None) -> list[Path]:
    """Drop every `step-` save of this run (used once the final LoRA exists)."""
    removed = [c.path for c in list_checkpoints(root) if c.kind == "step" and c.resume_key == resume_key]
    for path in removed:
        _remove_tree(path)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temporaries(root: Path) -> None:
    """Remove `.tmp-` folders left by trainers that died mid-write (their pid is gone)."""
    if not root.is_dir():
        return
    for path in root.iterdir():
        if not path.name.startswith(TMP_PREFIX):
            continue
        match = re.search(r"-(\d+)-[0-9a-f]{8}$", path.name)
        if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            with contextlib.suppress(OSError):
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
