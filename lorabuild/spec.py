"""The training spec format: its pydantic models, the checked-in JSON Schema, and loading.

This module is the single source of truth for what a `training.yaml` may contain. Everything
else reads a validated `Spec` (through the Plan), never raw YAML. Loading reports every problem
as `file:line:col: field.path: problem — fix` (see `lorabuild.yamlsource`) and never writes a
file. Values left out of a spec stay `None` here: presets and family defaults are applied by the
plan, which also records where each value came from.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from lorabuild.runfolder import NAME_PATTERN
from lorabuild.yamlsource import Problem, SourceMap, SpecError, read_yaml

SPEC_VERSION = 1
SCHEMA_ID = "https://lorabuild.dev/schemas/training.schema.json"
SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "training.schema.json"

Family = Literal["sd15", "sdxl", "pony", "flux"]
BackendName = Literal["builtin", "kohya", "simpletuner", "ai-toolkit"]
PresetName = Literal["quick", "standard", "thorough"]
OptimizerName = Literal["adamw", "adamw8bit", "lion", "prodigy", "adafactor"]
SchedulerName = Literal["constant", "constant_with_warmup", "linear", "cosine"]
MixedPrecision = Literal["no", "fp16", "bf16"]
BasePrecision = Literal["fp32", "fp16", "bf16", "fp8", "nf4"]
SavePrecision = Literal["fp32", "fp16", "bf16"]
ComputeTarget = Literal["local", "ssh", "runpod", "vastai"]
DemoModel = Literal["tiny-sd"]

FAMILIES: tuple[str, ...] = ("sd15", "sdxl", "pony", "flux")
BACKENDS: tuple[str, ...] = ("builtin", "kohya", "simpletuner", "ai-toolkit")
OPTIMIZERS: tuple[str, ...] = ("adamw", "adamw8bit", "lion", "prodigy", "adafactor")


class _Section(BaseModel):
    """Unknown keys are errors, so a typo never silently falls back to a default."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _usable_path(value: object) -> object:
    # the operating system cannot open such a name; say so instead of failing deep inside a gate
    if isinstance(value, str) and "\x00" in value:
        raise ValueError("the path holds a NUL character (\\0), which no file name can — remove it from the path")
    return value


PathText = Annotated[str, BeforeValidator(_usable_path)]


def _no_means_no(value: object) -> object:
    # YAML 1.1 reads a bare `no` as false; kohya users write `mixed_precision: no`.
    return "no" if value is False else value


class BaseModelRef(_Section):
    """The base model the LoRA is trained on."""

    path: PathText | None = Field(
        None,
        description="Model file (.safetensors) or diffusers folder; relative to the spec's folder.",
    )
    demo: DemoModel | None = Field(
        None,
        description="Use lorabuild's tiny demo model instead of a real one (created locally, offline).",
    )
    family: Family | None = Field(
        None, description="Model family: sd15, sdxl, pony (an SDXL model) or flux. Required with `path`."
    )
    vae: PathText | None = Field(None, description="Optional separate VAE file, relative to the spec's folder.")

    @model_validator(mode="after")
    def _one_source(self) -> BaseModelRef:
        if self.path is None and self.demo is None:
            raise ValueError("no base model given — set `path:` to your model, or `demo: tiny-sd` to try lorabuild")
        if self.path is not None and self.demo is not None:
            raise ValueError("both `path` and `demo` are set — keep only one of them")
        if self.path is not None and self.family is None:
            raise ValueError("the model's `family` is missing — add `family:` with one of sd15, sdxl, pony, flux")
        if self.demo is not None and self.family not in (None, "sd15"):
            raise ValueError("the demo model is an SD 1.5-style model — use `family: sd15` or leave it out")
        return self


class DatasetRef(_Section):
    """Where the training pictures and their captions are."""

    path: PathText = Field(description="Folder of images with caption files beside them; relative to the spec.")
    caption_extension: str = Field(
        ".txt", pattern=r"^\.[A-Za-z0-9_-]{1,16}$", description="Extension of the caption files."
    )
    repeats: int | None = Field(None, ge=1, le=1000, description="Times each image is shown per epoch.")


class BackendRef(_Section):
    """Which trainer runs the training, and where it is installed."""

    name: BackendName = Field(description="builtin, kohya, simpletuner or ai-toolkit.")
    path: PathText | None = Field(None, description="Where the backend is installed (its repository checkout).")
    python: PathText | None = Field(
        None, description="The Python of the backend's own environment (default: its venv, else python3)."
    )


def _backend_short_form(value: object) -> object:
    return {"name": value} if isinstance(value, str) else value


class Training(_Section):
    """Training settings. Anything left out comes from the preset or the model family."""

    learning_rate: float | None = Field(None, gt=0, le=10)
    text_encoder_lr: float | None = Field(None, ge=0, le=1)
    train_text_encoder: bool | None = None
    epochs: int | None = Field(None, ge=1, le=1000)
    max_train_steps: int | None = Field(None, ge=1, le=1_000_000)
    batch_size: int | None = Field(None, ge=1, le=256)
    gradient_accumulation: int | None = Field(None, ge=1, le=256)
    resolution: int | None = Field(None, ge=32, le=4096)
    rank: int | None = Field(None, ge=1, le=1024)
    alpha: float | None = Field(None, gt=0, le=4096)
    optimizer: OptimizerName | None = None
    optimizer_args: dict[str, str | int | float | bool] = Field(default_factory=dict)
    lr_scheduler: SchedulerName | None = None
    lr_warmup_steps: int | None = Field(None, ge=0)
    mixed_precision: Annotated[
        MixedPrecision | None, BeforeValidator(_no_means_no, json_schema_input_type=MixedPrecision | None)
    ] = None
    base_precision: BasePrecision | None = None
    save_precision: SavePrecision | None = None
    gradient_checkpointing: bool | None = None
    cache_latents: bool | None = None
    cache_text_encoder_outputs: bool | None = None
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    noise_offset: float | None = Field(None, ge=0, le=1)
    min_snr_gamma: float | None = Field(None, ge=0, le=100)
    flip_aug: bool | None = None
    shuffle_caption: bool | None = None
    keep_tokens: int | None = Field(None, ge=0, le=255)
    clip_skip: int | None = Field(None, ge=1, le=12)
    network_dropout: float | None = Field(None, ge=0, lt=1)
    bucketing: bool | None = None


class Checkpoints(_Section):
    """When checkpoints are saved, and how many are kept."""

    every_n_epochs: int | None = Field(None, ge=1, le=1000)
    keep_last: int | None = Field(None, ge=1, le=1000)


class Compute(_Section):
    """Where training runs, with hints about the GPU."""

    target: ComputeTarget = Field("local", description="local, ssh, runpod or vastai.")
    gpu: str | None = Field(None, description="GPU name, e.g. 'RTX 4090' (a hint for remote targets).")
    vram_gb: float | None = Field(None, gt=0, le=2048, description="GPU memory in GB on the target.")
    gpu_count: int = Field(1, ge=1, le=16)
    host: str | None = Field(None, description="SSH host (compute: ssh).")
    user: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    identity_file: PathText | None = None
    remote_dir: str | None = Field(None, description="Working folder on the remote machine.")
    max_price_per_hour: float | None = Field(None, gt=0, description="Highest price in USD per hour.")
    min_reliability: float | None = Field(None, ge=0, le=1)
    region: str | None = None
    disk_gb: int | None = Field(None, ge=10, le=10_000)
    image: str | None = Field(None, description="Container image for cloud instances.")
    max_hours: float | None = Field(
        None, gt=0, le=720, description="Deadline: a cloud instance deletes itself after this many hours."
    )

    @model_validator(mode="after")
    def _ssh_needs_host(self) -> Compute:
        if self.target == "ssh" and not self.host:
            raise ValueError("`target: ssh` needs a machine to connect to — add `host:` to `compute`")
        return self


class Monitor(_Section):
    """Thresholds for the loss watchdog (defaults: reference/vram.md §5.3)."""

    plateau_epochs: int | None = Field(None, ge=1, le=1000)
    plateau_min_delta: float | None = Field(None, ge=0, le=1)
    divergence_epochs: int | None = Field(None, ge=1, le=1000)
    divergence_tolerance: float | None = Field(None, ge=0, le=10)
    spike_factor: float | None = Field(None, gt=1, le=1000)
    ema_beta: float | None = Field(None, gt=0, lt=1)
    stop_on_nan: bool | None = None


class Samples(_Section):
    """Sample pictures rendered during training, to watch the LoRA learn."""

    prompts: list[str] = Field(default_factory=list, max_length=32)
    every_n_epochs: int | None = Field(None, ge=1, le=1000)
    steps: int | None = Field(None, ge=1, le=200)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)


class Spec(_Section):
    """A training spec: one LoRA, its data, its settings and where it trains."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="lorabuild training spec")

    version: Literal[1] = Field(description="Spec format version; always 1 for now.")
    name: str = Field(
        pattern=NAME_PATTERN,
        description="Short name of the LoRA: lowercase letters, digits, - and _. It names the run folder.",
    )
    base_model: BaseModelRef
    dataset: DatasetRef
    backend: Annotated[
        BackendRef, BeforeValidator(_backend_short_form, json_schema_input_type=BackendName | BackendRef)
    ] = Field(default_factory=lambda: BackendRef(name="builtin"))
    preset: PresetName = "standard"
    training: Training = Field(default_factory=Training)
    checkpoints: Checkpoints = Field(default_factory=Checkpoints)
    compute: Compute = Field(default_factory=Compute)
    monitor: Monitor = Field(default_factory=Monitor)
    samples: Samples = Field(default_factory=Samples)
    grimoire: PathText | None = Field(
        None, description="Folder holding run folders and state (default: ./grimoire in the working directory)."
    )

    @field_validator("version", mode="before")
    @classmethod
    def _known_version(cls, value: object) -> object:
        if isinstance(value, int) and not isinstance(value, bool) and value > SPEC_VERSION:
            raise ValueError(f"this spec is for a newer lorabuild (format {value}) — upgrade lorabuild")
        return value


@dataclass(frozen=True)
class LoadedSpec:
    """A validated spec together with where it came from."""

    spec: Spec
    path: Path  # absolute path of the YAML file
    source: SourceMap

    @property
    def folder(self) -> Path:
        return self.path.parent

    def resolve(self, value: str) -> Path:
        """A path from the spec: `~` expanded, relative ones read from the spec's folder."""
        return (self.folder / os.path.expanduser(value)).resolve()

    def absolute(self, value: str) -> Path:
        """Like `resolve`, without following symlinks: a venv's `bin/python` is a symlink to the
        base interpreter, and following it would leave the venv."""
        return Path(os.path.abspath(self.folder / os.path.expanduser(value)))

    def locate(self, field_path: tuple[str | int, ...]) -> tuple[int, int]:
        return self.source.locate(field_path)

    def problem(self, field_path: tuple[str | int, ...], message: str, fix: str) -> Problem:
        line, col = self.locate(field_path)
        return Problem(self.source.file, line, col, field_path, message, fix)


def load_spec(path: str | os.PathLike[str], *, check_files: bool = True) -> LoadedSpec:
    """Read, parse and validate a spec; raise `SpecError` listing every problem found.

    With `check_files`, the dataset folder must exist (a spec that points at nothing cannot be
    planned). Nothing is written, whatever happens.
    """
    file = Path(path).expanduser()
    data, source = read_yaml(file)
    try:
        spec = Spec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(source.problems_from_pydantic(exc.errors(), Spec)) from None
    loaded = LoadedSpec(spec, file.resolve(), source)
    if check_files:
        problems = file_problems(loaded)
        if problems:
            raise SpecError(problems)
    return loaded


def file_problems(loaded: LoadedSpec) -> list[Problem]:
    """Problems with files the spec points at that make it impossible to plan."""
    spec = loaded.spec
    problems: list[Problem] = []
    dataset = loaded.resolve(spec.dataset.path)
    if not dataset.is_dir():
        what = "is a file, not a folder" if dataset.exists() else "does not exist"
        problems.append(
            loaded.problem(
                ("dataset", "path"),
                f"the dataset folder {dataset} {what}",
                "point `dataset.path` at the folder of your pictures; relative paths start at the spec's folder",
            )
        )
    return problems


def schema_document() -> dict[str, Any]:
    """The JSON Schema (Draft 2020-12) of the spec format, generated from the models."""
    schema = Spec.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID, **schema}


def schema_text() -> str:
    """The schema as the exact text that is checked in (sorted keys, trailing newline)."""
    return json.dumps(schema_document(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
