"""The trainer's config file (`backend/train.json`) and the step arithmetic.

This module owns reading and checking the JSON that lorabuild writes for the trainer, turning
it into typed dataclasses with the defaults of docs/trainer.md, and the one formula for
steps per epoch and total steps (`plan_steps`) that lorabuild's plan mirrors. Every problem
becomes a `TrainerError` of kind `config` that names the field and the fix. No torch here.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from lorabuild.trainer.events import TrainerError

CONFIG_FORMAT: Final = 1
OPTIMIZERS: Final = ("adamw", "lion", "prodigy", "adafactor")
LR_SCHEDULERS: Final = ("constant", "constant_with_warmup", "linear", "cosine")
MIXED_PRECISION: Final = ("no", "fp16", "bf16")
SAVE_PRECISION: Final = ("fp16", "bf16", "float")
DEVICES: Final = ("auto", "cpu", "cuda")
IMAGE_EXTENSIONS: Final = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

_NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class ModelConfig:
    path: Path
    demo: str | None
    family: str | None


@dataclass(frozen=True)
class DatasetConfig:
    path: Path
    caption_extension: str
    repeats: int
    images: tuple[str, ...] | None  # None: every image in the folder


@dataclass(frozen=True)
class TrainingConfig:
    learning_rate: float
    epochs: int
    max_train_steps: int | None
    batch_size: int
    gradient_accumulation: int
    resolution: int
    rank: int
    alpha: float
    optimizer: str
    optimizer_args: dict[str, Any]
    lr_scheduler: str
    lr_warmup_steps: int
    mixed_precision: str
    gradient_checkpointing: bool
    seed: int
    noise_offset: float
    flip_aug: bool
    save_precision: str


@dataclass(frozen=True)
class CheckpointConfig:
    every_n_epochs: int | None
    keep_last: int | None


@dataclass(frozen=True)
class OutputConfig:
    dir: Path
    lora: Path
    checkpoints: Path
    samples: Path


@dataclass(frozen=True)
class SamplesConfig:
    """Sample pictures: none without prompts; every N epochs (None: at the checkpoints' cadence)
    and at the end."""

    prompts: tuple[str, ...] = ()
    every_n_epochs: int | None = None
    steps: int = 20
    seed: int = 42


@dataclass(frozen=True)
class TrainerConfig:
    name: str
    model: ModelConfig
    dataset: DatasetConfig
    training: TrainingConfig
    checkpoints: CheckpointConfig
    output: OutputConfig
    resume_key: str | None
    device: str
    threads: int | None
    samples: SamplesConfig = field(default_factory=SamplesConfig)
    metadata: dict[str, str] = field(default_factory=dict)
    source: Path | None = None


@dataclass(frozen=True)
class StepPlan:
    """How many optimizer steps a run takes; the contract's formula, in one place."""

    samples_per_epoch: int
    micro_batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    epochs: int


def plan_steps(
    images: int,
    repeats: int,
    batch_size: int,
    gradient_accumulation: int,
    epochs: int,
    max_train_steps: int | None = None,
) -> StepPlan:
    """samples = images × repeats; steps/epoch = ceil(ceil(samples / batch) / accumulation).

    With `max_train_steps` the total is that number and epochs becomes the number of epochs
    needed to reach it (the last one possibly partial).
    """
    if min(images, repeats, batch_size, gradient_accumulation) < 1:
        raise ValueError("images, repeats, batch_size and gradient_accumulation must be >= 1")
    samples = images * repeats
    micro = math.ceil(samples / batch_size)
    per_epoch = math.ceil(micro / gradient_accumulation)
    if max_train_steps is not None:
        if max_train_steps < 1:
            raise ValueError("max_train_steps must be >= 1")
        return StepPlan(samples, micro, per_epoch, max_train_steps, math.ceil(max_train_steps / per_epoch))
    if epochs < 1:
        raise ValueError("epochs must be >= 1")
    return StepPlan(samples, micro, per_epoch, per_epoch * epochs, epochs)


def _bad(where: str, problem: str, fix: str) -> TrainerError:
    return TrainerError(
        "config",
        f"The trainer config has a bad value at {where}: {problem}. Fix: {fix}",
        where,
    )


class _Reader:
    """Typed field access that names the offending path in every error."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise _bad(where or "the top level", "expected a JSON object", "regenerate the config with lorabuild")
        self.data: dict[str, Any] = data
        self.where = where

    def _path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def section(self, key: str, required: bool = True) -> _Reader:
        if key not in self.data or self.data[key] is None:
            if required:
                raise _bad(self._path(key), "the section is missing", "regenerate the config with lorabuild")
            return _Reader({}, self._path(key))
        return _Reader(self.data[key], self._path(key))

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ..., nullable: bool = False) -> Any:
        if key not in self.data:
            if default is ...:
                raise _bad(self._path(key), "the field is missing", "regenerate the config with lorabuild")
            return default
        value = self.data[key]
        if value is None:
            if nullable:
                return None
            if default is not ... and default is not None:
                return default
            raise _bad(self._path(key), "it is null", "give it a value")
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # JSON has one number type: accept 2 where a float is expected, but never true/false.
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and bool not in kinds:
            raise _bad(self._path(key), f"expected {_names(kinds)}, got {value!r}", "fix the value")
        if not isinstance(value, kinds):
            raise _bad(self._path(key), f"expected {_names(kinds)}, got {value!r}", "fix the value")
        return value

    def positive_int(self, key: str, default: Any = ..., nullable: bool = False, minimum: int = 1) -> Any:
        value = self.get(key, int, default, nullable)
        if value is not None and value < minimum:
            raise _bad(self._path(key), f"{value} is below the minimum {minimum}", f"use {minimum} or more")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: Any = ...) -> str:
        value = self.get(key, str, default)
        if value not in choices:
            raise _bad(self._path(key), f"{value!r} is not supported", f"use one of {', '.join(choices)}")
        return str(value)


def _names(kinds: tuple[type, ...]) -> str:
    return " or ".join(
        {
            int: "an integer",
            float: "a number",
            str: "a string",
            bool: "true/false",
            list: "a list",
            dict: "an object",
        }.get(k, k.__name__)
        for k in kinds
    )


def _absolute(value: str, base: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def parse_config(data: Any, base_dir: Path | None = None) -> TrainerConfig:
    """Check a decoded config and fill in defaults. Relative paths resolve against base_dir."""
    base = base_dir or Path.cwd()
    top = _Reader(data, "")
    fmt = top.get("format", int, CONFIG_FORMAT)
    if fmt != CONFIG_FORMAT:
        raise _bad(
            "format",
            f"format {fmt} is not understood by this trainer (it reads {CONFIG_FORMAT})",
            "regenerate the config with this version of lorabuild",
        )
    name = top.get("name", str)
    if not _NAME_RE.match(name) or len(name) > 120:
        raise _bad(
            "name",
            f"{name!r} cannot be used in file names",
            "use letters, digits, '.', '_' and '-' only, starting with a letter or digit",
        )

    m = top.section("model")
    model = ModelConfig(
        path=_absolute(m.get("path", str), base),
        demo=m.get("demo", str, None, nullable=True),
        family=m.get("family", str, None, nullable=True),
    )

    d = top.section("dataset")
    ext = d.get("caption_extension", str, ".txt")
    if not ext.startswith("."):
        ext = "." + ext
    images_raw = d.get("images", list, None, nullable=True)
    dataset_path = _absolute(d.get("path", str), base)
    images: tuple[str, ...] | None = None
    if images_raw is not None:
        for i, item in enumerate(images_raw):
            if not isinstance(item, str) or not item:
                raise _bad(f"dataset.images[{i}]", f"expected a file name, got {item!r}", "fix the list")
        images = tuple(images_raw)
    dataset = DatasetConfig(
        path=dataset_path,
        caption_extension=ext,
        repeats=d.positive_int("repeats", 1),
        images=images,
    )

    t = top.section("training")
    optimizer_args = t.get("optimizer_args", dict, {}, nullable=True) or {}
    lr = t.get("learning_rate", float)
    if not (math.isfinite(lr) and lr > 0):
        raise _bad("training.learning_rate", f"{lr} is not a positive number", "use e.g. 0.0001")
    alpha = t.get("alpha", float, None, nullable=True)
    rank = t.positive_int("rank", 4)
    noise_offset = t.get("noise_offset", float, 0.0)
    if not math.isfinite(noise_offset) or noise_offset < 0:
        raise _bad("training.noise_offset", f"{noise_offset} is negative or not finite", "use 0 to 0.1")
    resolution = t.positive_int("resolution", 512, minimum=8)
    if resolution % 8:
        raise _bad(
            "training.resolution",
            f"{resolution} is not a multiple of 8",
            "use a multiple of 8 (the VAE shrinks images by 8)",
        )
    training = TrainingConfig(
        learning_rate=lr,
        epochs=t.positive_int("epochs", 1),
        max_train_steps=t.positive_int("max_train_steps", None, nullable=True),
        batch_size=t.positive_int("batch_size", 1),
        gradient_accumulation=t.positive_int("gradient_accumulation", 1),
        resolution=resolution,
        rank=rank,
        alpha=float(rank) if alpha is None else alpha,
        optimizer=t.choice("optimizer", OPTIMIZERS, "adamw"),
        optimizer_args=dict(optimizer_args),
        lr_scheduler=t.choice("lr_scheduler", LR_SCHEDULERS, "constant"),
        lr_warmup_steps=t.positive_int("lr_warmup_steps", 0, minimum=0),
        mixed_precision=t.choice("mixed_precision", MIXED_PRECISION, "no"),
        gradient_checkpointing=t.get("gradient_checkpointing", bool, False),
        seed=t.positive_int("seed", 0, minimum=0),
        noise_offset=noise_offset,
        flip_aug=t.get("flip_aug", bool, False),
        save_precision=t.choice("save_precision", SAVE_PRECISION, "fp16"),
    )

    c = top.section("checkpoints", required=False)
    checkpoints = CheckpointConfig(
        every_n_epochs=c.positive_int("every_n_epochs", 1, nullable=True, minimum=0) or None,
        keep_last=c.positive_int("keep_last", None, nullable=True, minimum=0) or None,
    )

    o = top.section("output")
    out_dir = _absolute(o.get("dir", str), base)
    lora = _absolute(o.get("lora", str, str(out_dir / f"{name}.safetensors")), base)
    ckpt = o.get("checkpoints", str, None, nullable=True)
    sample_dir = o.get("samples", str, None, nullable=True)
    output = OutputConfig(
        dir=out_dir,
        lora=lora,
        checkpoints=_absolute(ckpt, base) if ckpt else out_dir / "checkpoints",
        samples=_absolute(sample_dir, base) if sample_dir else out_dir / "samples",
    )

    s = top.section("samples", required=False)
    prompts = s.get("prompts", list, [])
    if not all(isinstance(p, str) and p.strip() for p in prompts):
        raise _bad("samples.prompts", "must be a list of non-empty texts", 'e.g. ["a red circle"]')
    samples = SamplesConfig(
        prompts=tuple(prompts),
        every_n_epochs=s.positive_int("every_n_epochs", None, nullable=True),
        steps=s.positive_int("steps", 20),
        seed=s.positive_int("seed", 42, minimum=0),
    )

    metadata_raw = top.get("metadata", dict, {}, nullable=True) or {}
    metadata = {str(k): v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in metadata_raw.items()}
    threads = top.positive_int("threads", None, nullable=True)
    return TrainerConfig(
        name=name,
        model=model,
        dataset=dataset,
        training=training,
        checkpoints=checkpoints,
        output=output,
        samples=samples,
        resume_key=top.get("resume_key", str, None, nullable=True),
        device=top.choice("device", DEVICES, "auto"),
        threads=threads,
        metadata=metadata,
    )


def load_config(path: Path) -> TrainerConfig:
    """Read and check CONFIG.json; relative paths in it are relative to its folder."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TrainerError(
            "config",
            f"The trainer config {path} does not exist. Fix: pass the path of backend/train.json that lorabuild wrote.",
            str(path),
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TrainerError(
            "config", f"The trainer config {path} could not be read ({exc}). Fix: check the file.", str(exc)
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TrainerError(
            "config",
            f"The trainer config {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: "
            f"{exc.msg}). Fix: regenerate it with lorabuild.",
            str(exc),
        ) from None
    cfg = parse_config(data, path.parent.resolve())
    return TrainerConfig(**{**cfg.__dict__, "source": path.resolve()})


def with_overrides(cfg: TrainerConfig, batch_size: int | None, gradient_accumulation: int | None) -> TrainerConfig:
    """Apply --batch-size / --gradient-accumulation."""
    t = cfg.training
    training = TrainingConfig(
        **{
            **t.__dict__,
            "batch_size": batch_size or t.batch_size,
            "gradient_accumulation": gradient_accumulation or t.gradient_accumulation,
        }
    )
    return TrainerConfig(**{**cfg.__dict__, "training": training})
