"""Looking at a base model on disk without loading it: its files, size and format.

A model is either a single file (.safetensors, .ckpt, .pt), or a diffusers folder (with a
model_index.json). Reading a safetensors header takes a few kilobytes, never the weights.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf")
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class ModelListing:
    """The files of a base model as found on disk."""

    path: Path
    kind: str  # "diffusers", "file" or "missing"
    files: tuple[Path, ...]
    bytes: int
    folders: tuple[Path, ...] = ()  # every folder listed to find `files` (a diffusers folder's)


def list_model(path: Path) -> ModelListing:
    """List a model's files (a diffusers folder's files, or the single file)."""
    if path.is_file():
        return ModelListing(path, "file", (path,), path.stat().st_size)
    if path.is_dir():
        files: list[Path] = []
        folders: list[Path] = []
        total = 0
        for root, dirs, names in os.walk(path):
            folders.append(Path(root))
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(names):
                if name.startswith("."):
                    continue
                file = Path(root) / name
                files.append(file)
                total += file.stat().st_size
        kind = "diffusers" if (path / "model_index.json").is_file() else "folder"
        return ModelListing(path, kind, tuple(files), total, tuple(folders))
    return ModelListing(path, "missing", (), 0)


def safetensors_header(path: Path) -> dict[str, object]:
    """The JSON header of a .safetensors file; ValueError when it is not one."""
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ValueError("the file is too short to be a safetensors model")
        (length,) = struct.unpack("<Q", head)
        if length <= 1 or length > MAX_HEADER_BYTES:
            raise ValueError("the file does not start like a safetensors model")
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("the safetensors header is damaged (the download may be incomplete)") from None
    if not isinstance(header, dict):
        raise ValueError("the safetensors header is damaged")
    return header
