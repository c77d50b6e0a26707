"""Memory and time estimates for a planned training (Gate 2), without loading any model.

Memory follows reference/vram.md §2.1:
    peak ≈ context + frozen weights + LoRA (weights + gradients + optimizer state)
           + activations(batch × pixels, gradient checkpointing) + resident text encoders / VAE
           + workspace
with parameter counts from §2.2. Step times come from the planning table of §4, scaled by
batch, pixels and the GPU's speed factor. Every figure is an estimate and is shown as one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lorabuild.hardware import GpuModel, step_seconds
from lorabuild.presets import DemoProfile

GB = 1e9

BYTES_PER_PARAM: dict[str, float] = {
    "fp32": 4.0,
    "fp16": 2.0,
    "bf16": 2.0,
    "fp8": 1.0,
    "nf4": 0.5625,  # 4-bit blocks of 64 with an fp32 absmax each
}

OPTIMIZER_STATE_BYTES: dict[str, float] = {
    "adamw": 8.0,
    "adamw8bit": 2.0,
    "lion": 4.0,
    "prodigy": 16.0,
    "adafactor": 0.5,  # factored second moment: negligible for matrices
}


@dataclass(frozen=True)
class FamilyFacts:
    """Parameter counts (reference/vram.md §2.2) and fitted per-family constants."""

    denoiser: int  # UNet or transformer
    text_encoders: int
    vae: int
    lora_per_rank: int  # trainable parameters per unit of rank, every usual target layer
    lora_per_rank_attention: int  # ... attention projections only
    act_gb_per_mpix: float  # activations per sample per megapixel, without checkpointing
    act_gb_per_mpix_gc: float  # ... with gradient checkpointing
    native_mpix: float
    step_s_4090: float  # s/step at batch 1, native resolution, checkpointing on (§4 table)
    setup_s: float  # loading and caching before the first step on a GPU


# LoRA sizes: Flux attention-only 4,669,440 at rank 4 (HF QLoRA blog) → 1.17 M per rank; every
# linear of the transformer (attention, MLP, modulation) ≈ 4.7 M per rank [D]. SD 1.5 and SDXL
# from kohya file sizes (dim 32: ~38 MB and ~218 MB in fp16, text encoders included) [D].
# Activations: fitted to the measured Flux points (#13, #14, #21, #22) and kept under the SDXL
# and SD 1.5 feasibility claims (#5, #6) — tests/test_vram_calibration.py prints the table.
FAMILY_FACTS: dict[str, FamilyFacts] = {
    "sd15": FamilyFacts(859_520_964, 123_060_480, 83_653_863, 600_000, 200_000, 10.0, 3.0, 0.262, 0.25, 60),
    "sdxl": FamilyFacts(2_567_463_684, 817_720_320, 83_653_863, 2_900_000, 1_200_000, 8.0, 2.5, 1.049, 1.0, 120),
    "flux": FamilyFacts(11_901_408_320, 4_885_370_880, 83_819_683, 4_700_000, 1_167_360, 14.0, 4.5, 1.049, 3.0, 240),
}
FAMILY_FACTS["pony"] = FAMILY_FACTS["sdxl"]

CUDA_CONTEXT_GB = 0.5  # §2.1: 300–400 MB with lazy loading, plus cuBLAS workspaces
CPU_RUNTIME_GB = 0.8  # a Python process with torch + diffusers loaded, before any model
WORKSPACE_FRACTION = 0.05  # allocator fragmentation on top of the sum
CPU_SPEED = 0.004  # a CPU against an RTX 4090 on real models: a few hundred times slower
DEMO_CPU_STEP_S = 0.03  # measured on 2 cores: one step of the demo model, batch 1, 64 px


def lora_parameters(family: str, rank: int, demo: DemoProfile | None = None, targets: str = "all") -> int:
    """Trainable parameters of a LoRA of this rank on every usual layer, or on attention only."""
    if demo is not None:
        return rank * demo.lora_per_rank
    facts = FAMILY_FACTS[family]
    return rank * (facts.lora_per_rank_attention if targets == "attention" else facts.lora_per_rank)


@dataclass(frozen=True)
class MemoryInputs:
    """Everything the memory estimate depends on (`lorabuild vram` has a flag for each)."""

    family: str
    resolution: int  # width in pixels (and height, unless `height` is given)
    batch_size: int
    rank: int
    optimizer: str
    base_precision: str
    mixed_precision: str
    gradient_checkpointing: bool
    cache_latents: bool
    cache_text_encoder_outputs: bool
    train_text_encoder: bool = False
    on_cpu: bool = False
    demo: DemoProfile | None = None
    height: int | None = None
    lora_targets: str = "all"  # "all" usual layers, or "attention" projections only


@dataclass(frozen=True)
class MemoryEstimate:
    total_gb: float
    breakdown: dict[str, float] = field(default_factory=dict)  # plain-language part → GB


def estimate_vram(inputs: MemoryInputs) -> MemoryEstimate:
    """Peak memory of one training process (GPU memory, or RAM on a CPU), with its parts."""
    facts = FAMILY_FACTS[inputs.family]
    denoiser, text_encoders, vae = facts.denoiser, facts.text_encoders, facts.vae
    lora_per_rank = facts.lora_per_rank
    act, act_gc = facts.act_gb_per_mpix, facts.act_gb_per_mpix_gc
    if inputs.demo is not None:
        denoiser = inputs.demo.parameters["unet"]
        text_encoders = inputs.demo.parameters["text_encoder"]
        vae = inputs.demo.parameters["vae"]
        lora_per_rank = inputs.demo.lora_per_rank
        act, act_gc = 0.5, 0.2

    weight_bytes = BYTES_PER_PARAM[inputs.base_precision]
    half = 4.0 if inputs.mixed_precision == "no" else 2.0
    parts: dict[str, float] = {}
    parts["program and GPU context"] = CPU_RUNTIME_GB if inputs.on_cpu else CUDA_CONTEXT_GB
    parts["base model weights (frozen)"] = denoiser * weight_bytes / GB
    te_resident = not inputs.cache_text_encoder_outputs or inputs.train_text_encoder
    parts["text encoders"] = text_encoders * half / GB if te_resident else 0.0
    # SDXL's VAE overflows in fp16, so trainers keep it in fp32
    vae_bytes = 4.0 if inputs.family in ("sdxl", "pony") else half
    parts["image encoder (VAE)"] = 0.0 if inputs.cache_latents else vae * vae_bytes / GB
    lora_params = (
        inputs.rank * lora_per_rank
        if inputs.demo is not None
        else lora_parameters(inputs.family, inputs.rank, targets=inputs.lora_targets)
    )
    per_param = 4 + 4 + OPTIMIZER_STATE_BYTES[inputs.optimizer]
    parts["LoRA weights, gradients and optimizer"] = lora_params * per_param / GB
    if inputs.train_text_encoder:
        parts["LoRA weights, gradients and optimizer"] += text_encoders * 0.01 * per_param / GB
    mpix = inputs.resolution * (inputs.height or inputs.resolution) / 1e6
    per_sample = act_gc if inputs.gradient_checkpointing else act
    scale = 1.0 if inputs.mixed_precision != "no" else 1.6  # fp32 activations are bigger
    parts["activations (batch × picture size)"] = inputs.batch_size * mpix * per_sample * scale
    subtotal = sum(parts.values())
    parts["workspace and fragmentation"] = subtotal * WORKSPACE_FRACTION
    total = sum(parts.values())
    return MemoryEstimate(round(total, 2), {k: round(v, 3) for k, v in parts.items()})


@dataclass(frozen=True)
class TimeEstimate:
    seconds: float
    step_seconds: float
    setup_seconds: float
    device: str  # what the estimate assumed, e.g. "RTX 4090" or "this computer's processor"
    source: str = "measured on the demo model"  # where the seconds per step came from


def estimate_time(
    *,
    family: str,
    resolution: int,
    batch_size: int,
    gradient_accumulation: int,
    gradient_checkpointing: bool,
    total_steps: int,
    gpu: GpuModel | None,
    demo: DemoProfile | None = None,
) -> TimeEstimate:
    """Wall time of the training: setup plus steps × seconds per step (an estimate)."""
    micro = batch_size * gradient_accumulation
    if demo is not None:
        pixels = (resolution / 64) ** 2
        step = DEMO_CPU_STEP_S * micro * pixels
        if gpu is not None:
            step = step / 4  # small kernels: a GPU helps little
        return TimeEstimate(8 + total_steps * step, step, 8, gpu.name if gpu else "this computer's processor")
    facts = FAMILY_FACTS[family]
    pixels = (resolution * resolution / 1e6) / facts.native_mpix
    checkpointing = 1.0 if gradient_checkpointing else 0.75  # the table assumes it on; it costs ~1/3
    if gpu is not None:
        base, source = step_seconds(family, gpu)
        speed = gpu.speed
    else:
        base, source = facts.step_s_4090 / CPU_SPEED, "a processor is a few hundred times slower than a GPU"
        speed = CPU_SPEED
    step = base * micro * pixels * checkpointing
    setup = facts.setup_s / min(speed, 1.0) ** 0.5
    device = gpu.name if gpu else "this computer's processor"
    return TimeEstimate(setup + total_steps * step, step, setup, device, source)


def describe_duration(seconds: float) -> str:
    """'about 45 minutes', in words an artist reads at a glance."""
    if seconds < 90:
        return f"about {max(1, round(seconds))} seconds"
    minutes = seconds / 60
    if minutes < 90:
        return f"about {round(minutes)} minutes"
    hours = minutes / 60
    return f"about {hours:.1f} hours"


def memory_report(inputs: MemoryInputs) -> dict[str, object]:
    """The estimate for `lorabuild vram`: total, parts, and which GPUs fit it with the 20% margin."""
    from lorabuild.hardware import GPUS
    from lorabuild.presets import VRAM_SAFETY_MARGIN

    est = estimate_vram(inputs)
    needed = round(est.total_gb * VRAM_SAFETY_MARGIN, 2)
    fits = sorted((g for g in GPUS if g.vram_gb >= needed), key=lambda g: (g.vram_gb, -g.speed))
    return {
        "total_gb": est.total_gb,
        "with_margin_gb": needed,
        "breakdown": est.breakdown,
        "fits_on": [f"{g.name} ({g.vram_gb:g} GB)" for g in fits],
        "too_small": [f"{g.name} ({g.vram_gb:g} GB)" for g in GPUS if g.vram_gb < needed],
    }


def render_memory_report(inputs: MemoryInputs, report: dict[str, object]) -> str:
    """`lorabuild vram` in plain language, each term explained once."""
    from lorabuild.glossary import Explainer

    ex = Explainer()
    size = f"{inputs.resolution}×{inputs.height or inputs.resolution}"
    lines = [
        f"Training a {inputs.family} LoRA at {size} px, batch {inputs.batch_size}, rank {inputs.rank}, "
        f"{inputs.optimizer}, base model in {inputs.base_precision}:",
        "",
        f"Estimated VRAM ({ex.first('vram')}): {report['total_gb']} GB",
        f"With the 20% safety margin ({ex.first('safety_margin')}): {report['with_margin_gb']} GB",
        "",
        "Where it goes:",
    ]
    breakdown = report["breakdown"]
    assert isinstance(breakdown, dict)
    for part, gb in breakdown.items():
        if gb:
            lines.append(f"  {part:<42} {gb:7.2f} GB")
    fits, small = report["fits_on"], report["too_small"]
    assert isinstance(fits, list) and isinstance(small, list)
    lines.append("")
    lines.append(
        "Fits on: " + (", ".join(fits[:6]) + (" and bigger" if len(fits) > 6 else "") if fits else "no single GPU")
    )
    if small:
        lines.append("Too small: " + ", ".join(small[-4:]))
    lines.append("")
    lines.append("This is an estimate from reference measurements; real use varies by trainer and settings.")
    return "\n".join(lines)
