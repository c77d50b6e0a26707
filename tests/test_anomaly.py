"""The loss-anomaly detector on recorded and diffusion-like loss series (reference/vram.md §5).

Diffusion-like series: each picture's loss is log-uniform between 0.002 and 1 (the spread the
noise level gives, reference/vram.md §5.2), a step's loss is the mean over its batch of 2, and
the level follows the trend under test. The recorded series is a real builtin run's train.log.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from lorabuild.anomaly import AnomalyDetector
from lorabuild.presets import MONITOR_DEFAULTS

DATA = Path(__file__).parent / "data"
Series = list[tuple[int, int, float]]


def diffusion_series(epochs: int, steps_per_epoch: int, level: Callable[[int], float], *, seed: int) -> Series:
    rng = random.Random(seed)
    out = []
    for step in range(1, epochs * steps_per_epoch + 1):
        epoch = (step - 1) // steps_per_epoch + 1
        picture_losses = [math.exp(rng.uniform(math.log(0.002), 0.0)) for _ in range(2)]
        out.append((step, epoch, sum(picture_losses) / 2 * level(epoch)))
    return out


def healthy(epoch: int) -> float:
    return 0.975**epoch  # a steady 2.5% better every epoch


def feed(series: Series, **settings: object) -> AnomalyDetector:
    detector = AnomalyDetector.from_settings({**MONITOR_DEFAULTS, **settings})
    for step, epoch, loss in series:
        detector.step(step, epoch, loss)
    detector.epoch_end(series[-1][1], series[-1][0])
    return detector


def kinds(detector: AnomalyDetector) -> list[str]:
    return [a.kind for a in detector.found]


@pytest.mark.parametrize(("epochs", "steps_per_epoch"), [(15, 40), (15, 100), (10, 150), (20, 50), (8, 12)])
def test_healthy_noisy_diffusion_runs_raise_no_alarm(epochs: int, steps_per_epoch: int) -> None:
    for seed in range(20):  # twenty noisy runs: a false alarm in any of them fails the test
        detector = feed(diffusion_series(epochs, steps_per_epoch, healthy, seed=seed))
        assert kinds(detector) == [], (seed, detector.found)


def test_a_recorded_builtin_run_raises_no_alarm() -> None:
    recorded = json.loads((DATA / "builtin_example_losses.json").read_text())["steps"]
    assert len(recorded) == 40
    assert kinds(feed([(int(s), int(e), float(loss)) for s, e, loss in recorded])) == []


def test_plateau() -> None:
    # learning stops after epoch 6: the noise goes on, the level does not move any more
    series = diffusion_series(30, 100, lambda epoch: 0.95 ** min(epoch, 6), seed=1)
    detector = feed(series)
    assert kinds(detector) == ["plateau"]
    (plateau,) = detector.found
    assert plateau.message == "Loss hasn't changed in 5 epochs — model may have stopped learning"
    assert not plateau.stop and 12 <= plateau.epoch <= 30


def test_plateau_on_short_epochs_names_the_epochs_it_compared() -> None:
    series = diffusion_series(60, 20, lambda epoch: 0.95 ** min(epoch, 10), seed=3)
    (plateau,) = feed(series).found
    assert plateau.message == "Loss hasn't changed in 20 epochs — model may have stopped learning"


def test_divergence() -> None:
    series = diffusion_series(15, 100, lambda epoch: 1.0 if epoch < 6 else 1.05 ** (epoch - 6), seed=2)
    detector = feed(series)
    (divergence,) = [a for a in detector.found if a.kind == "divergence"]
    assert divergence.message == "Loss is increasing — something may be wrong" and not divergence.stop
    assert "explosion" not in kinds(detector)


def test_nan_is_an_explosion_that_stops_the_run() -> None:
    series = diffusion_series(5, 40, healthy, seed=4)
    series[150] = (series[150][0], series[150][1], float("nan"))
    detector = feed(series)
    (explosion,) = detector.found
    assert explosion.kind == "explosion" and explosion.stop and explosion.step == 151
    assert explosion.message == "Loss jumped to NaN — training has failed"
    inf = feed([(1, 1, 0.1), (2, 1, float("inf"))])
    assert inf.found[0].message == "Loss jumped to infinity — training has failed"
    assert not feed([(1, 1, float("nan"))], stop_on_nan=False).found[0].stop


def test_a_sudden_jump_of_the_loss_level_is_an_explosion() -> None:
    series = diffusion_series(4, 100, healthy, seed=5)
    broken = [(s, e, loss * (8.0 if s > 250 else 1.0)) for s, e, loss in series]
    detector = feed(broken)
    (explosion,) = [a for a in detector.found if a.kind == "explosion"]
    assert explosion.stop and 250 < explosion.step < 400 and explosion.message.startswith("Loss jumped to")


def test_one_wild_step_is_not_an_explosion() -> None:
    series = diffusion_series(4, 100, healthy, seed=6)
    series[200] = (series[200][0], series[200][1], 25.0)
    assert kinds(feed(series)) == []


def test_thresholds_come_from_the_spec() -> None:
    series = diffusion_series(30, 100, lambda epoch: 0.95 ** min(epoch, 6), seed=1)
    assert "plateau" not in kinds(feed(series, plateau_epochs=20))
    assert "plateau" in kinds(feed(series, plateau_epochs=5))
    jump = [(s, e, loss * (2.5 if s > 250 else 1.0)) for s, e, loss in diffusion_series(4, 100, healthy, seed=5)]
    assert "explosion" not in kinds(feed(jump))  # 2.5× is under the default factor of 3
    assert "explosion" in kinds(feed(jump, spike_factor=1.8))
