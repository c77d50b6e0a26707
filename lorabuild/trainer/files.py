"""Small file-system helpers shared by the modules that write model files.

This module owns one detail: files written by safetensors (and folders made by mkdtemp) can
end up private (0600/0700) whatever the user's umask. Results the user will copy, share or
load from another account should get the ordinary permissions their umask gives.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

_lock = threading.Lock()


def _umask() -> int:
    # os.umask can only be read by setting it; the lock keeps that change from racing.
    with _lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def normal_permissions(path: Path) -> None:
    """Give `path` (and, for a folder, everything in it) the umask's default permissions."""
    mask = _umask()
    targets = [path, *path.rglob("*")] if path.is_dir() else [path]
    for target in targets:
        mode = 0o777 if target.is_dir() else 0o666
        os.chmod(target, mode & ~mask)
