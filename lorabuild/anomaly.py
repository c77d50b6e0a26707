"""Loss anomalies: plateau, divergence and explosion, read through diffusion loss's heavy noise.

A diffusion model's per-step loss depends mostly on the random noise level of that step (from
about 0.002 to 1 on SD 1.5, reference/vram.md §5.2), so single steps say nothing and even epoch
means wobble by tens of percent. The detector therefore only speaks when the evidence is there,
with the thresholds of the spec's `monitor` section (defaults: presets.MONITOR_DEFAULTS, from
reference/vram.md §5.3):

- explosion: a non-finite loss (NaN or infinity), or the smoothed loss — an exponential moving
  average of losses clipped at `CLIP` times the recent median, so one wild step cannot move it —
  rising to `spike_factor` times its lowest value after warm-up. The run must be stopped.
- plateau: the mean loss of the last `plateau_epochs` epochs is not at least `plateau_min_delta`
  (relative) below the mean of the `plateau_epochs` epochs before them, at three epoch ends in a
  row. A warning, not given once the loss is diverging (that says more).
- divergence: the mean loss of the last `divergence_epochs` epochs is above the best earlier
  block of as many epochs by more than `divergence_tolerance`, that rise is three standard errors
  clear of the noise, and the epochs are still rising. A warning.

Blocks hold at least `MIN_BLOCK_STEPS` steps (more epochs when epochs are short), so a small
dataset's few-step epochs are not judged on noise; the message names the epochs it compared.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from statistics import median
from typing import Any

MIN_BLOCK_STEPS = 400  # steps behind each compared block: fewer cannot tell a plateau from noise
WARMUP_STEPS = 50  # the smoothed loss settles before its minimum counts
CLIP = 10.0  # a step's loss counts at most this many times the recent median in the smoothed loss
PLATEAU_CONFIRMATIONS = 3  # epoch ends in a row that must find the loss flat (one or two can be noise)


@dataclass(frozen=True)
class Anomaly:
    kind: str  # "plateau", "divergence" or "explosion"
    message: str
    epoch: int
    step: int
    stop: bool = False  # the run must be stopped

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, "epoch": self.epoch, "step": self.step}


@dataclass
class _Epoch:
    n: int = 0
    total: float = 0.0
    squares: float = 0.0

    def add(self, loss: float) -> None:
        self.n += 1
        self.total += loss
        self.squares += loss * loss


@dataclass
class AnomalyDetector:
    plateau_epochs: int = 5
    plateau_min_delta: float = 0.01
    divergence_epochs: int = 3
    divergence_tolerance: float = 0.15
    spike_factor: float = 3.0
    ema_beta: float = 0.99
    stop_on_nan: bool = True
    found: list[Anomaly] = field(default_factory=list)
    _recent: deque[float] = field(default_factory=lambda: deque(maxlen=100))
    _ema: float = 0.0
    _ema_steps: int = 0
    _ema_min: float | None = None
    _epochs: list[_Epoch] = field(default_factory=list)
    _current: _Epoch = field(default_factory=_Epoch)
    _last_epoch: int = 0
    _flat_checks: int = 0
    _reported: set[str] = field(default_factory=set)

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> AnomalyDetector:
        names = (
            "plateau_epochs",
            "plateau_min_delta",
            "divergence_epochs",
            "divergence_tolerance",
            "spike_factor",
            "ema_beta",
            "stop_on_nan",
        )
        return cls(**{k: settings[k] for k in names if settings.get(k) is not None})

    @property
    def smoothed(self) -> float | None:
        return self._ema / (1 - self.ema_beta**self._ema_steps) if self._ema_steps else None

    def step(self, step: int, epoch: int, loss: float) -> list[Anomaly]:
        """Feed one step's loss; the anomalies it reveals (each kind is reported once)."""
        new: list[Anomaly] = []
        if epoch > self._last_epoch > 0:
            new += self.epoch_end(self._last_epoch, step - 1)
        self._last_epoch = max(self._last_epoch, epoch)
        if not math.isfinite(loss):
            shown = "NaN" if math.isnan(loss) else "infinity"
            new += self._report(
                Anomaly(
                    "explosion", f"Loss jumped to {shown} — training has failed", epoch, step, stop=self.stop_on_nan
                )
            )
            return new
        self._current.add(loss)
        clipped = min(loss, CLIP * median(self._recent)) if len(self._recent) >= 10 else loss
        self._recent.append(loss)
        self._ema = self.ema_beta * self._ema + (1 - self.ema_beta) * clipped
        self._ema_steps += 1
        smoothed = self.smoothed
        assert smoothed is not None
        if self._ema_steps >= WARMUP_STEPS:
            if self._ema_min is None or smoothed < self._ema_min:
                self._ema_min = smoothed
            elif smoothed > self.spike_factor * self._ema_min:
                new += self._report(
                    Anomaly(
                        "explosion",
                        f"Loss jumped to {smoothed:.3g} (from about {self._ema_min:.3g}) — training has failed",
                        epoch,
                        step,
                        stop=True,
                    )
                )
        return new

    def epoch_end(self, epoch: int, step: int) -> list[Anomaly]:
        """Judge the trend at the end of `epoch` (also called when the next epoch's first step arrives)."""
        if self._current.n:
            self._epochs.append(self._current)
        self._current = _Epoch()
        new: list[Anomaly] = []
        per_epoch = max(1, sum(e.n for e in self._epochs) // max(1, len(self._epochs)))
        block = max(self.divergence_epochs, math.ceil(MIN_BLOCK_STEPS / per_epoch))
        if len(self._epochs) >= 2 * block:
            last = _pool(self._epochs[-block:])
            best = min(
                (_pool(self._epochs[i : i + block]) for i in range(len(self._epochs) - 2 * block + 1)),
                key=lambda b: b.mean,
            )
            noise = math.hypot(last.se, best.se)
            means = [e.total / e.n for e in self._epochs[-block:]]
            if (
                last.mean > best.mean * (1 + self.divergence_tolerance)
                and last.mean - best.mean > 3 * noise
                and _slope(means) > 0
            ):
                new += self._report(Anomaly("divergence", "Loss is increasing — something may be wrong", epoch, step))
        plateau = max(self.plateau_epochs, math.ceil(MIN_BLOCK_STEPS / per_epoch))
        if len(self._epochs) >= 2 * plateau and "divergence" not in self._reported:
            before, last = _pool(self._epochs[-2 * plateau : -plateau]), _pool(self._epochs[-plateau:])
            flat = (before.mean - last.mean) / before.mean < self.plateau_min_delta
            self._flat_checks = self._flat_checks + 1 if flat else 0
            if self._flat_checks >= PLATEAU_CONFIRMATIONS:
                new += self._report(
                    Anomaly(
                        "plateau",
                        f"Loss hasn't changed in {plateau} epochs — model may have stopped learning",
                        epoch,
                        step,
                    )
                )
        return new

    def _report(self, anomaly: Anomaly) -> list[Anomaly]:
        if anomaly.kind in self._reported:
            return []
        self._reported.add(anomaly.kind)
        self.found.append(anomaly)
        return [anomaly]


@dataclass(frozen=True)
class _Block:
    mean: float
    se: float  # standard error of the mean


def _pool(epochs: list[_Epoch]) -> _Block:
    n = sum(e.n for e in epochs)
    total = sum(e.total for e in epochs)
    squares = sum(e.squares for e in epochs)
    mean = total / n
    variance = max(0.0, squares / n - mean * mean) * n / max(1, n - 1)
    return _Block(mean, math.sqrt(variance / n))


def _slope(values: list[float]) -> float:
    """Least-squares slope of `values` against 0, 1, 2, …"""
    n = len(values)
    mean_x = (n - 1) / 2
    mean_y = sum(values) / n
    denominator = sum((x - mean_x) ** 2 for x in range(n))
    return sum((x - mean_x) * (y - mean_y) for x, y in enumerate(values)) / denominator if denominator else 0.0
