"""Optimizers and learning-rate schedules.

This module owns mapping the config's optimizer name and `optimizer_args` to an optimizer
(`adamw` and `adafactor` from torch, `lion` from lion-pytorch, `prodigy` from prodigyopt) and
the four schedules, each a pure function of the step so a resumed run gets exactly the
learning rate an uninterrupted one would. Bad optimizer arguments are `config` errors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from lorabuild.trainer.events import TrainerError


def optimizer_class(name: str) -> Callable[..., torch.optim.Optimizer]:
    if name == "adamw":
        return torch.optim.AdamW
    if name == "adafactor":
        return torch.optim.Adafactor
    try:
        if name == "lion":
            from lion_pytorch import Lion

            return Lion
        if name == "prodigy":
            from prodigyopt import Prodigy

            return Prodigy
    except ImportError as exc:
        package = {"lion": "lion-pytorch", "prodigy": "prodigyopt"}[name]
        raise TrainerError(
            "config",
            f"The optimizer {name!r} needs the Python package {package}, which is not installed. Fix: "
            f"`pip install {package}` (or install lorabuild[train]), or choose adamw.",
            str(exc),
        ) from None
    raise TrainerError("config", f"Unknown optimizer {name!r}. Fix: use adamw, lion, prodigy or adafactor.", name)


def optimizer_label(name: str, args: dict[str, Any]) -> str:
    """The `ss_optimizer` metadata string, in kohya's style: class path plus arguments."""
    cls = optimizer_class(name)
    label = _class_path(cls)
    if args:
        label += "(" + ",".join(f"{k}={v}" for k, v in sorted(args.items())) + ")"
    return label


def build_optimizer(
    name: str, params: Iterable[torch.nn.Parameter], lr: float, args: dict[str, Any]
) -> torch.optim.Optimizer:
    cls = optimizer_class(name)
    kwargs = dict(args)
    kwargs.pop("lr", None)  # the config's learning_rate wins; a second lr would be ambiguous
    try:
        return cls(list(params), lr=lr, **kwargs)
    except (TypeError, ValueError) as exc:
        raise TrainerError(
            "config",
            f"The optimizer {name!r} rejected training.optimizer_args {args!r} ({exc}). Fix: remove or "
            f"correct the argument; see the documentation of {_class_path(cls)}.",
            str(exc),
        ) from None


def _class_path(cls: object) -> str:
    return f"{getattr(cls, '__module__', '')}.{getattr(cls, '__qualname__', cls)}"


def lr_factor(scheduler: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate for the optimizer step with 0-based index i."""
    warmup = max(0, min(warmup, total))

    def warm(i: int) -> float | None:
        # Warm up to the full rate on step `warmup` itself, so no step runs at lr 0.
        return (i + 1) / warmup if i < warmup else None

    def constant(i: int) -> float:
        return 1.0

    def constant_with_warmup(i: int) -> float:
        w = warm(i)
        return 1.0 if w is None else w

    def linear(i: int) -> float:
        w = warm(i)
        if w is not None:
            return w
        return max(0.0, (total - i) / max(1, total - warmup))

    def cosine(i: int) -> float:
        w = warm(i)
        if w is not None:
            return w
        progress = (i - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return {
        "constant": constant,
        "constant_with_warmup": constant_with_warmup,
        "linear": linear,
        "cosine": cosine,
    }[scheduler]


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate the last step used; Prodigy's is its estimate d × lr."""
    group = optimizer.param_groups[0]
    lr = float(group["lr"])
    if "d" in group and type(optimizer).__name__ == "Prodigy":
        lr *= float(group["d"])
    return lr
