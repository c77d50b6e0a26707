"""The loss curve as a PNG next to progress.md: every step faintly, the smoothed loss boldly.

Drawn with Pillow alone (no plotting library), on a log scale when the loss spans more than a
factor of 20 (diffusion loss usually does), with the epochs marked. Written atomically, so a
viewer refreshing it never sees half a picture.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

from lorabuild.fsutil import atomic_write_bytes

WIDTH, HEIGHT = 800, 400
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 30, 50


def render_loss_png(
    steps: list[int], losses: list[float], smoothed: list[float], epoch_starts: list[int], title: str
) -> bytes:
    """PNG bytes of the loss curve (raw points, smoothed line, epoch marks)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (WIDTH, HEIGHT), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.text((LEFT, 8), title, fill=(20, 20, 20))
    finite = [v for v in losses + smoothed if math.isfinite(v) and v > 0]
    if not steps or not finite:
        draw.text((LEFT, HEIGHT // 2), "no steps yet", fill=(120, 120, 120))
        return _png(image)
    low, high = min(finite), max(finite)
    log = high / low > 20
    if log:
        low, high = math.log10(low), math.log10(high)
    if high - low < 1e-12:
        low, high = low - 0.5, high + 0.5
    first, last = steps[0], max(steps[-1], steps[0] + 1)

    def x(step: int) -> float:
        return LEFT + (step - first) / (last - first) * (WIDTH - LEFT - RIGHT)

    def y(value: float) -> float:
        v = math.log10(value) if log else value
        return TOP + (1 - (v - low) / (high - low)) * (HEIGHT - TOP - BOTTOM)

    draw.rectangle((LEFT, TOP, WIDTH - RIGHT, HEIGHT - BOTTOM), outline=(180, 180, 180))
    for start in epoch_starts:
        if first <= start <= last:
            draw.line((x(start), TOP, x(start), HEIGHT - BOTTOM), fill=(235, 235, 235))
    for step, value in zip(steps, losses, strict=False):
        if math.isfinite(value) and value > 0:
            px, py = x(step), y(value)
            draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=(150, 180, 230))
    line = [(x(s), y(v)) for s, v in zip(steps, smoothed, strict=False) if math.isfinite(v) and v > 0]
    if len(line) > 1:
        draw.line(line, fill=(200, 60, 40), width=2)
    for frac in (0.0, 0.5, 1.0):
        value = low + frac * (high - low)
        shown = 10**value if log else value
        draw.text((5, y(shown) - 6), f"{shown:.3g}", fill=(90, 90, 90))
    draw.text((LEFT, HEIGHT - BOTTOM + 8), f"step {first}", fill=(90, 90, 90))
    draw.text((WIDTH - RIGHT - 70, HEIGHT - BOTTOM + 8), f"step {steps[-1]}", fill=(90, 90, 90))
    legend = "loss per step (blue dots), smoothed loss (red line)" + (", log scale" if log else "")
    draw.text((LEFT, HEIGHT - 20), legend, fill=(90, 90, 90))
    return _png(image)


def _png(image: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")  # type: ignore[attr-defined]
    return buffer.getvalue()


def write_loss_png(path: Path, *args: object, **kwargs: object) -> None:
    atomic_write_bytes(path, render_loss_png(*args, **kwargs))  # type: ignore[arg-type]
