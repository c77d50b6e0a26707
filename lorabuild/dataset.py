"""Reading a dataset folder's listing: which pictures there are and which have captions.

This is the only I/O the plan does. It lists names and sizes; it never opens a picture
(the dry run does that), so it stays fast on large datasets.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class DatasetListing:
    """The pictures of a dataset folder and their caption files."""

    folder: Path
    images: tuple[str, ...]  # file names, sorted
    captions: tuple[str, ...]  # caption file names that exist, sorted
    missing_captions: tuple[str, ...]  # images without a caption file
    bytes: int  # pictures and captions together

    @property
    def files(self) -> tuple[Path, ...]:
        """Every file training reads, as absolute paths (pictures, then captions)."""
        return tuple(self.folder / n for n in self.images) + tuple(self.folder / n for n in self.captions)


def list_dataset(folder: Path, caption_extension: str) -> DatasetListing:
    """List pictures directly inside `folder` (hidden files skipped) and their captions."""
    images: list[str] = []
    others: dict[str, int] = {}
    sizes: dict[str, int] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_file():
                continue
            size = entry.stat().st_size
            if entry.name.lower().endswith(IMAGE_EXTENSIONS):
                images.append(entry.name)
                sizes[entry.name] = size
            else:
                others[entry.name] = size
    images.sort()
    captions: list[str] = []
    missing: list[str] = []
    total = sum(sizes.values())
    for image in images:
        caption = Path(image).stem + caption_extension
        if caption in others:
            captions.append(caption)
            total += others[caption]
        else:
            missing.append(image)
    return DatasetListing(folder, tuple(images), tuple(sorted(set(captions))), tuple(missing), total)
