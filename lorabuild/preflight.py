"""Dataset pre-flight: look at every picture and caption before a dry run spends any time.

Opens each picture with Pillow (fully decoding it, so a truncated download is caught), reads
each caption as UTF-8, and reports what would break training (blocking) apart from what an
artist should know (warnings): missing or empty captions, duplicate pictures, pictures smaller
than the training resolution, files in formats the trainers skip, captions without a picture.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

# Picture formats an artist may drop in a dataset folder that the trainers do not read.
SKIPPED_EXTENSIONS = (".gif", ".tif", ".tiff", ".heic", ".heif", ".avif", ".psd", ".jxl", ".svg", ".raw", ".cr2")


@dataclass
class PreflightReport:
    images: int = 0
    captions: int = 0
    blocking: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.blocking

    def lines(self) -> list[str]:
        out = [f"{self.images} pictures, {self.captions} captions"]
        out += [f"Problem: {b}" for b in self.blocking]
        out += [f"Note: {w}" for w in self.warnings]
        return out


def check_dataset(folder: Path, images: list[str], caption_extension: str, resolution: int) -> PreflightReport:
    """Open every picture and caption the plan will train on; say what is wrong and how to fix it."""
    from PIL import Image, UnidentifiedImageError

    report = PreflightReport(images=len(images))
    if not images:
        report.blocking.append(f"no pictures in {folder} — add .png, .jpg or .webp pictures")
        return report
    digests: dict[str, str] = {}
    small: list[str] = []
    missing: list[str] = []
    empty: list[str] = []
    for name in images:
        path = folder / name
        try:
            data = path.read_bytes()
            with Image.open(path) as picture:
                picture.load()  # decodes fully: a truncated file fails here, not in training
                width, height = picture.size
        except FileNotFoundError:
            report.blocking.append(f"{name} disappeared from the dataset folder — run again to re-plan")
            continue
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            report.blocking.append(
                f"{name} cannot be read as a picture ({_why(exc)}) — open it in an image editor and save it again as "
                "PNG or JPEG, or remove it"
            )
            continue
        digest = hashlib.sha1(data).hexdigest()
        if digest in digests:
            report.warnings.append(f"{name} is the same picture as {digests[digest]} — it is trained on twice as often")
        else:
            digests[digest] = name
        if min(width, height) < resolution:
            small.append(f"{name} ({width}×{height})")
        caption = path.with_suffix(caption_extension)
        try:
            text = caption.read_bytes()
        except FileNotFoundError:
            missing.append(name)
            continue
        report.captions += 1
        try:
            decoded = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            report.blocking.append(
                f"{caption.name} is not UTF-8 text (byte 0x{text[exc.start]:02x} at position {exc.start}) — open it "
                "in your editor and save it as UTF-8"
            )
            continue
        if not decoded.strip():
            empty.append(caption.name)
    if missing:
        report.warnings.append(
            f"{len(missing)} pictures have no caption ({_some(missing)}): they train with an empty prompt — add a "
            f"{caption_extension} file next to each"
        )
    if empty:
        report.warnings.append(f"{len(empty)} captions are empty ({_some(empty)}) — describe each picture in a line")
    if small:
        report.warnings.append(
            f"{len(small)} pictures are smaller than the training resolution of {resolution} px ({_some(small)}): they "
            "are scaled up and come out blurry — use larger pictures or a lower resolution"
        )
    _look_around(folder, images, caption_extension, report)
    return report


def _look_around(folder: Path, images: list[str], caption_extension: str, report: PreflightReport) -> None:
    """Files next to the pictures that suggest a mistake: skipped formats and orphan captions."""
    stems = {Path(n).stem for n in images}
    skipped, orphans = [], []
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return
    for name in names:
        lower = name.lower()
        if lower.endswith(SKIPPED_EXTENSIONS):
            skipped.append(name)
        elif lower.endswith(caption_extension.lower()) and Path(name).stem not in stems:
            orphans.append(name)
    if skipped:
        kinds = ", ".join(sorted({Path(n).suffix.lower() for n in skipped}))
        report.warnings.append(
            f"{len(skipped)} files are in formats the trainers skip ({kinds}: {_some(skipped)}) — convert them to PNG "
            "or JPEG to train on them"
        )
    if orphans:
        report.warnings.append(f"{len(orphans)} captions have no picture ({_some(orphans)}) — a renamed picture?")


def _some(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _why(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if "truncated" in text.lower():
        return "the file is cut short — an incomplete download or copy"
    if "cannot identify image file" in text:
        return "it is not a picture Pillow knows"
    return text[:120]
