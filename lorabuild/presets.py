"""Presets, per-family defaults and safe ranges: the one home of every default number.

The plan fills each setting a spec leaves out from, in order: the preset, the optimizer, the
model (the demo model has its own profile), the model family, and the general defaults below,
and records which one it used. Safe ranges say what is sensible for artists' LoRAs; a value
outside them fails Gate 2 with the range and a one-line reason. Starting values come from
reference/kohya.md §14 and reference/vram.md; they are starting points, not optima.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# --- presets (workflow.md, Phase 7 step 3) -----------------------------------------------------

PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"epochs": 5, "every_n_epochs": 1},
    "standard": {"epochs": 15, "every_n_epochs": 5},
    "thorough": {"epochs": 25, "every_n_epochs": 5},
}

PRESET_BLURBS: dict[str, str] = {
    "quick": "Fast test to see if your dataset works",
    "standard": "Good balance of quality and speed",
    "thorough": "Best results, takes longest",
}

OPTIMIZER_BLURBS: dict[str, str] = {
    "prodigy": "Set it and forget it — finds its own learning rate",
    "adamw": "Industry standard — reliable but needs manual tuning",
    "adamw8bit": "AdamW in 8-bit — the same results with less memory (needs an NVIDIA GPU)",
    "lion": "Memory-efficient — good when VRAM is tight",
    "adafactor": "Very light on memory — steady with a fixed learning rate",
}

# --- defaults ----------------------------------------------------------------------------------

GENERAL_DEFAULTS: dict[str, Any] = {
    "optimizer": "adamw",
    "batch_size": 2,
    "gradient_accumulation": 1,
    "lr_scheduler": "constant",
    "lr_warmup_steps": 0,
    "seed": 42,
    "noise_offset": 0.0,
    "min_snr_gamma": 0.0,
    "flip_aug": False,
    "shuffle_caption": False,
    "keep_tokens": 0,
    "network_dropout": 0.0,
    "cache_latents": True,
    "train_text_encoder": False,
    "text_encoder_lr": 0.0,
    "save_precision": "fp16",
    "bucketing": True,
    "repeats": 10,
    "keep_last": 3,
}

FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "sd15": {
        "resolution": 512,
        "rank": 16,
        "alpha": 8.0,
        "mixed_precision": "bf16",
        "base_precision": "fp16",
        "gradient_checkpointing": False,
        "cache_text_encoder_outputs": False,
        "clip_skip": 1,
    },
    "sdxl": {
        "resolution": 1024,
        "rank": 16,
        "alpha": 8.0,
        "mixed_precision": "bf16",
        "base_precision": "bf16",
        "gradient_checkpointing": True,
        "cache_text_encoder_outputs": True,
        "clip_skip": 1,
    },
    "flux": {
        "resolution": 1024,
        "rank": 16,
        "alpha": 16.0,
        "mixed_precision": "bf16",
        "base_precision": "fp8",
        "gradient_checkpointing": True,
        "cache_text_encoder_outputs": True,
        "clip_skip": 1,
    },
}
FAMILY_DEFAULTS["pony"] = {**FAMILY_DEFAULTS["sdxl"], "clip_skip": 2}

# Learning rate that suits each optimizer (Prodigy and other adaptive ones want about 1.0).
OPTIMIZER_DEFAULTS: dict[str, dict[str, Any]] = {
    "adamw": {"learning_rate": 1e-4},
    "adamw8bit": {"learning_rate": 1e-4},
    "lion": {"learning_rate": 3e-5},
    "prodigy": {"learning_rate": 1.0},
    "adafactor": {"learning_rate": 1e-4},
}

CHECKPOINT_DEFAULTS: dict[str, Any] = {"every_n_epochs": 5, "keep_last": 3}

# reference/vram.md §5.3: EMA β 0.99, plateau patience in epochs, divergence +15% over 3 epochs.
MONITOR_DEFAULTS: dict[str, Any] = {
    "plateau_epochs": 5,
    "plateau_min_delta": 0.01,
    "divergence_epochs": 3,
    "divergence_tolerance": 0.15,
    "spike_factor": 3.0,
    "ema_beta": 0.99,
    "stop_on_nan": True,
}

SAMPLE_DEFAULTS: dict[str, Any] = {"steps": 20, "seed": 42}

DRY_RUN_STEPS = 5
DRY_RUN_MIN_STEPS = 2  # workflow.md Gate 4: at least two steps must complete
VRAM_SAFETY_MARGIN = 1.2  # workflow.md Gate 2: always keep 20% free

# --- safe ranges -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Range:
    """An inclusive sensible range with the one-line reason shown when a value leaves it."""

    low: float
    high: float
    why: str

    def holds(self, value: float) -> bool:
        return self.low <= value <= self.high


LEARNING_RATE_RANGES: dict[str, Range] = {
    "adamw": Range(1e-6, 1e-3, "above 0.001 AdamW usually burns the LoRA; below 0.000001 it learns nothing"),
    "adamw8bit": Range(1e-6, 1e-3, "above 0.001 AdamW usually burns the LoRA; below 0.000001 it learns nothing"),
    "lion": Range(1e-7, 3e-4, "Lion takes 3–10× smaller steps than AdamW; above 0.0003 it diverges"),
    "prodigy": Range(0.1, 2.0, "Prodigy finds its own step size: its learning rate is a multiplier, about 1.0"),
    "adafactor": Range(1e-6, 1e-3, "with a fixed learning rate Adafactor behaves like AdamW"),
}

FAMILY_RANGES: dict[str, dict[str, Range]] = {
    "sd15": {
        "resolution": Range(256, 1024, "SD 1.5 was made for 512 px; far from it the pictures fall apart"),
        "rank": Range(1, 128, "above 128 a character LoRA only gets bigger, not better"),
    },
    "sdxl": {
        "resolution": Range(512, 2048, "SDXL was made for 1024 px; far from it the pictures fall apart"),
        "rank": Range(1, 128, "above 128 a character LoRA only gets bigger, not better"),
    },
    "flux": {
        "resolution": Range(256, 2048, "Flux trains well from 512 to 1024 px"),
        "rank": Range(1, 128, "above 128 a character LoRA only gets bigger, not better"),
    },
}
FAMILY_RANGES["pony"] = FAMILY_RANGES["sdxl"]

# Resolution must be a multiple of this (the model works on 8× smaller latents, split in blocks).
RESOLUTION_STEP: dict[str, int] = {"sd15": 64, "sdxl": 32, "pony": 32, "flux": 32}

GENERAL_RANGES: dict[str, Range] = {
    "batch_size": Range(1, 16, "larger batches need a lot of memory and rarely help a small dataset"),
    "gradient_accumulation": Range(1, 32, "beyond 32 each step waits so long the run crawls"),
    "total_steps": Range(
        50, 20_000, "under 50 steps a LoRA learns almost nothing; over 20,000 it overfits and wastes time"
    ),
    "repeats": Range(1, 100, "more than 100 repeats per epoch means the dataset is far too small"),
    "noise_offset": Range(0.0, 0.2, "above 0.2 pictures turn washed-out or too dark"),
    "min_snr_gamma": Range(0.0, 20.0, "common values are 1–5; 0 switches it off"),
}


def alpha_range(rank: int) -> Range:
    """Alpha scales the LoRA by alpha / rank; beyond 2× rank it amplifies every step."""
    return Range(
        rank / 128, rank * 2, "alpha is usually half the rank or equal to it; above 2× rank training gets unstable"
    )


# --- the demo model ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoProfile:
    """What lorabuild knows about a demo model without loading it (keeps planning torch-free)."""

    name: str
    version: int
    family: str
    defaults: dict[str, Any]
    ranges: dict[str, Range]
    parameters: dict[str, int]  # per component, for memory estimates
    lora_per_rank: int  # LoRA parameters per unit of rank (the UNet's attention projections)
    files_bytes: int


DEMO_MODELS: dict[str, DemoProfile] = {
    "tiny-sd": DemoProfile(
        name="tiny-sd",
        version=1,
        family="sd15",
        defaults={
            "resolution": 64,
            "rank": 4,
            "alpha": 2.0,
            "mixed_precision": "no",
            "base_precision": "fp32",
            "save_precision": "fp32",
            "gradient_checkpointing": False,
            "repeats": 2,
            "bucketing": False,
        },
        ranges={
            "resolution": Range(64, 512, "the demo model was made for 64 px pictures; above 512 px it only gets slow"),
            "rank": Range(1, 32, "the demo model's layers are tiny: rank 32 already covers them"),
            "total_steps": Range(2, 5_000, "the demo model needs a few steps and gains nothing beyond 5,000"),
        },
        parameters={"unet": 792_964, "text_encoder": 32_554, "vae": 81_215},
        lora_per_rank=2_496,
        files_bytes=3_712_497,
    )
}
