"""The VRAM estimator against reference/vram.md §1: measured peaks within ±25%, claims as bounds.

Run with `-s` to see the table. A point is "covered" when the reference states every input the
model uses and the setup is one the model describes (no block swapping, CPU offload, DeepSpeed
or FP8 *training*); "works on N GB" claims are feasibility bounds: the estimate must not exceed N.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from lorabuild.estimate import MemoryInputs, estimate_vram


@dataclass(frozen=True)
class Point:
    ref: str  # row number in reference/vram.md §1
    what: str
    inputs: MemoryInputs
    gb: float
    kind: str  # "measured" (±25%) or "fits" (estimate ≤ gb)


def flux(**kw: object) -> MemoryInputs:
    base: dict[str, object] = dict(
        family="flux",
        resolution=1024,
        batch_size=1,
        rank=16,
        optimizer="adamw8bit",
        base_precision="bf16",
        mixed_precision="bf16",
        gradient_checkpointing=True,
        cache_latents=True,
        cache_text_encoder_outputs=True,
    )
    base.update(kw)
    return MemoryInputs(**base)  # type: ignore[arg-type]


def sdxl(**kw: object) -> MemoryInputs:
    base: dict[str, object] = dict(
        family="sdxl",
        resolution=1024,
        batch_size=1,
        rank=8,
        optimizer="adamw8bit",
        base_precision="fp16",
        mixed_precision="fp16",
        gradient_checkpointing=True,
        cache_latents=True,
        cache_text_encoder_outputs=True,
    )
    base.update(kw)
    return MemoryInputs(**base)  # type: ignore[arg-type]


POINTS = [
    Point(
        "#13",
        "Flux QLoRA NF4, 512×768, rank 4 attention, 4090",
        flux(resolution=512, height=768, rank=4, lora_targets="attention", base_precision="nf4"),
        9.0,
        "measured",
    ),
    Point(
        "#14",
        "Flux QLoRA setup with a BF16 base",
        flux(resolution=512, height=768, rank=4, lora_targets="attention"),
        26.0,
        "measured",
    ),
    Point(
        "#21",
        "SimpleTuner Flux NF4, 512, Lion 8-bit",
        flux(resolution=512, base_precision="nf4", optimizer="lion"),
        9090 / 1024,
        "measured",
    ),
    Point("#22", "SimpleTuner Flux BF16, rank 1 (at 1024², per its note)", flux(rank=1), 32.0, "measured"),
    Point("#5", "kohya SDXL 1024, rank 8, 8-bit optimizer, caches", sdxl(), 10.0, "fits"),
    Point(
        "#6",
        "diffusers SDXL 1024, rank 4, AdamW 8-bit, latents not cached",
        sdxl(rank=4, cache_latents=False),
        16.0,
        "fits",
    ),
    Point(
        "#24",
        "kohya Flux fp8 base, 1024, batch 2, rank 4",
        flux(base_precision="fp8", batch_size=2, rank=4),
        24.0,
        "fits",
    ),
    Point("#33", "ai-toolkit Flux 8-bit transformer, rank 16, up to 1024", flux(base_precision="fp8"), 24.0, "fits"),
    Point(
        "#1",
        "diffusers SD 1.5 512, batch 1, rank 4, fp16, no checkpointing",
        MemoryInputs(
            family="sd15",
            resolution=512,
            batch_size=1,
            rank=4,
            optimizer="adamw",
            base_precision="fp16",
            mixed_precision="fp16",
            gradient_checkpointing=False,
            cache_latents=False,
            cache_text_encoder_outputs=False,
        ),
        11.0,
        "fits",
    ),
]

# Rows not covered, and why (kept here so the table says what the model does not describe):
NOT_COVERED = {
    "#2-#4, #9, #11, #12": "resolution, batch, precision or checkpointing not stated",
    "#7, #8": "the same OneTrainer settings measured 4.9 and 12.2 GB (a regression): not a stable peak",
    "#10": "spilled into shared memory (thrashing): the peak is unknown",
    "#15": "FP8 training with torchao keeps extra master weights, not modelled",
    "#16-#20": "claims without resolution or batch",
    "#23": "int2 base, not a precision the model knows",
    "#25-#28, #30, #36": "block swapping / CPU offload move weights out of VRAM",
    "#29, #32, #35, #37": "batch, checkpointing or resolution not stated; #35 uses DeepSpeed",
}


def test_calibration_table() -> None:
    rows = []
    failures = []
    for point in POINTS:
        est = estimate_vram(point.inputs).total_gb
        error = (est - point.gb) / point.gb
        if point.kind == "measured":
            ok = abs(error) <= 0.25
            verdict = f"{error:+.0%}"
        else:
            ok = est <= point.gb
            verdict = "fits" if ok else "EXCEEDS CLAIM"
        figures = f"ref {point.gb:5.1f} GB  est {est:5.1f} GB"
        rows.append(f"{point.ref:>4}  {point.kind:<8}  {figures}  {verdict:<13} {point.what}")
        if not ok:
            failures.append(rows[-1])
    print("\nVRAM estimator vs reference/vram.md §1")
    print("\n".join(rows))
    for refs, why in NOT_COVERED.items():
        print(f"  not covered {refs}: {why}")
    assert not failures, failures


@pytest.mark.parametrize("point", [p for p in POINTS if p.kind == "measured"], ids=lambda p: p.ref)
def test_each_measured_point_within_25_percent(point: Point) -> None:
    est = estimate_vram(point.inputs).total_gb
    assert abs(est - point.gb) / point.gb <= 0.25


def test_the_model_moves_the_right_way() -> None:
    base = sdxl()
    total = estimate_vram(base).total_gb
    assert estimate_vram(sdxl(batch_size=4)).total_gb > total
    assert estimate_vram(sdxl(gradient_checkpointing=False)).total_gb > total
    assert estimate_vram(sdxl(cache_text_encoder_outputs=False)).total_gb > total
    assert estimate_vram(sdxl(optimizer="prodigy", rank=64)).total_gb > estimate_vram(sdxl(rank=64)).total_gb
    assert estimate_vram(sdxl(base_precision="fp8")).total_gb < total
    nf4 = estimate_vram(flux(base_precision="nf4")).total_gb
    assert nf4 < estimate_vram(flux(base_precision="fp8")).total_gb < estimate_vram(flux()).total_gb
    parts = estimate_vram(base).breakdown
    assert set(parts) >= {"base model weights (frozen)", "activations (batch × picture size)"}
    assert abs(sum(parts.values()) - total) < 0.01
