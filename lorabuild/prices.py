"""Cloud GPU prices for cost estimates before anything is rented — a dated fallback table.

Prices move weekly; the cloud step queries live prices when it picks an offer. This table is
what Gate 2 uses to say "this will cost about $0.35" and is always shown with its date.
Source: reference/cloud.md §3 (RunPod Secure Cloud on-demand, SkyPilot catalog; Vast.ai median
of offers), in USD per GPU-hour.
"""

from __future__ import annotations

from dataclasses import dataclass

PRICES_AS_OF = "2026-11"
PROVISIONING_MINUTES = 10  # boot, image pull, model download before the first step

PRICES: dict[str, dict[str, float]] = {
    "runpod": {
        "RTX 3090": 0.43,
        "RTX 4090": 0.69,
        "RTX 5090": 1.22,
        "L40S": 0.86,
        "A100 80GB": 1.64,
        "H100": 2.39,
    },
    "vastai": {
        "RTX 3090": 0.25,
        "RTX 4090": 0.40,
        "RTX 5090": 0.53,
        "L40S": 0.67,
        "A100 40GB": 1.20,
        "A100 80GB": 1.20,
        "H100": 1.80,
    },
}


@dataclass(frozen=True)
class CostEstimate:
    usd: float
    per_hour: float
    hours: float
    source: str  # e.g. "RunPod price table of 2026-11"


def estimate_cost(provider: str, gpu_name: str, seconds: float, gpu_count: int = 1) -> CostEstimate | None:
    """Cost of `seconds` of training (plus provisioning) on `provider`, or None if no price is known."""
    per_gpu = PRICES.get(provider, {}).get(gpu_name)
    if per_gpu is None:
        return None
    hours = seconds / 3600 + PROVISIONING_MINUTES / 60
    per_hour = per_gpu * gpu_count
    label = {"runpod": "RunPod", "vastai": "Vast.ai"}.get(provider, provider)
    return CostEstimate(round(hours * per_hour, 2), per_hour, round(hours, 2), f"{label} price table of {PRICES_AS_OF}")
