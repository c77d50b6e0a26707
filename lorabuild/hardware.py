"""What lorabuild knows about GPUs without touching one: memory, generation, relative speed.

Used to plan for machines that are not this one (an SSH host or a cloud GPU named in the spec)
and to turn step-time measurements on one card into estimates for another. Figures from
reference/vram.md §3.2 (compute capabilities) and §4 (speed factors vs an RTX 4090, which are
estimates: memory-bound parts scale less).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class GpuModel:
    """A GPU model: its memory, CUDA compute capability and speed relative to an RTX 4090."""

    name: str
    vram_gb: float
    capability: tuple[int, int]
    speed: float  # 1.0 = RTX 4090


GPUS: tuple[GpuModel, ...] = (
    GpuModel("RTX 3060", 12, (8, 6), 0.3),
    GpuModel("RTX 3080", 10, (8, 6), 0.45),
    GpuModel("RTX 3090", 24, (8, 6), 0.55),
    GpuModel("RTX 3090 Ti", 24, (8, 6), 0.6),
    GpuModel("RTX 4060 Ti", 16, (8, 9), 0.35),
    GpuModel("RTX 4070", 12, (8, 9), 0.45),
    GpuModel("RTX 4080", 16, (8, 9), 0.75),
    GpuModel("RTX 4090", 24, (8, 9), 1.0),
    GpuModel("RTX 5090", 32, (12, 0), 1.4),
    GpuModel("RTX A4000", 16, (8, 6), 0.35),
    GpuModel("RTX A5000", 24, (8, 6), 0.5),
    GpuModel("RTX A6000", 48, (8, 6), 0.6),
    GpuModel("RTX 6000 Ada", 48, (8, 9), 0.95),
    GpuModel("L4", 24, (8, 9), 0.3),
    GpuModel("L40S", 48, (8, 9), 1.0),
    GpuModel("A40", 48, (8, 6), 0.6),
    GpuModel("A100 40GB", 40, (8, 0), 1.1),
    GpuModel("A100 80GB", 80, (8, 0), 1.15),
    GpuModel("H100", 80, (9, 0), 2.0),
    GpuModel("H200", 141, (9, 0), 2.1),
    GpuModel("B200", 180, (10, 0), 3.0),
    GpuModel("T4", 16, (7, 5), 0.15),
    GpuModel("V100", 16, (7, 0), 0.35),
)


def _key(name: str) -> str:
    text = name.lower().replace("nvidia", "").replace("geforce", "")
    return re.sub(r"[^a-z0-9]+", "", text)


_KEYS: tuple[tuple[str, GpuModel], ...] = tuple(
    # longest names first, so "RTX 3090 Ti" is found before "RTX 3090"
    sorted(((_key(g.name), g) for g in GPUS), key=lambda item: -len(item[0]))
)


@functools.lru_cache(maxsize=256)
def find_gpu(name: str | None) -> GpuModel | None:
    """The catalogue entry for a GPU name as NVML, a provider or a person writes it."""
    if not name:
        return None
    wanted = _key(name)
    return next((gpu for key, gpu in _KEYS if key in wanted), None)


def smallest_gpu_with(vram_gb: float) -> GpuModel | None:
    """The cheapest-class GPU (least memory) with at least `vram_gb` of memory."""
    fitting = [g for g in GPUS if g.vram_gb >= vram_gb]
    return min(fitting, key=lambda g: (g.vram_gb, -g.speed)) if fitting else None


# reference/vram.md §4 planning table: seconds per step at batch 1, native resolution, gradient
# checkpointing on, latents and text encoders cached. [M] rows are measured, the rest estimates.
STEP_SECONDS: dict[str, dict[str, tuple[float, float]]] = {
    "sd15": {
        "RTX 3090": (0.3, 0.5),
        "RTX 4090": (0.2, 0.3),
        "RTX 5090": (0.15, 0.25),
        "A100 80GB": (0.2, 0.3),
        "A100 40GB": (0.2, 0.3),
        "L40S": (0.2, 0.3),
        "H100": (0.12, 0.2),
    },
    "sdxl": {
        "RTX 3090": (1.1, 1.4),
        "RTX 4090": (0.7, 1.4),
        "RTX 5090": (0.5, 0.9),
        "A100 80GB": (0.7, 1.1),
        "A100 40GB": (0.7, 1.1),
        "L40S": (0.8, 1.2),
        "H100": (0.4, 0.7),
    },
    "flux": {
        "RTX 3090": (3.0, 6.0),
        "RTX 4090": (1.9, 4.3),
        "RTX 5090": (1.5, 3.0),
        "A100 80GB": (2.0, 3.5),
        "A100 40GB": (2.0, 3.5),
        "L40S": (2.0, 4.0),
        "H100": (1.5, 3.0),
    },
}
STEP_SECONDS["pony"] = STEP_SECONDS["sdxl"]


def step_seconds(family: str, gpu: GpuModel) -> tuple[float, str]:
    """Seconds per step (batch 1, native resolution) on `gpu`, and how the figure was found."""
    table = STEP_SECONDS[family]
    if gpu.name in table:
        low, high = table[gpu.name]
        return (low + high) / 2, f"planning table for the {gpu.name}"
    low, high = table["RTX 4090"]
    if find_gpu(gpu.name) is None:
        return (low + high) / 2, f"no figures for a {gpu.name}: assumed as fast as an RTX 4090"
    return (low + high) / 2 / gpu.speed, f"RTX 4090 figure scaled by the {gpu.name}'s relative speed"
