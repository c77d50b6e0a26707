"""The plan: every value a training needs, derived from a spec and the facts of a machine.

`make_plan` is a pure function of (spec, machine, dataset listing, model listing): it applies
presets and defaults (recording where each value came from), computes steps, estimates memory
and time, reduces the batch when memory is tight, and lists every problem that must stop Gate 2.
Everything downstream — backends, gates, the pipeline's up-to-date keys — reads the Plan, never
the YAML. `Plan.pick` gives the values a gate reads by their dotted paths.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from lorabuild import __version__, backends, hardware, presets
from lorabuild.dataset import DatasetListing
from lorabuild.estimate import MemoryInputs, describe_duration, estimate_time, estimate_vram
from lorabuild.fsutil import digest
from lorabuild.modelfile import ModelListing
from lorabuild.prices import estimate_cost
from lorabuild.runfolder import grimoire_path
from lorabuild.spec import LoadedSpec
from lorabuild.studio import Machine

PLAN_FORMAT = 1


class _Part(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelPlan(_Part):
    path: str  # absolute; for a demo model, where it is (or will be) created
    demo: str | None
    demo_version: int | None
    family: str
    kind: str  # "demo", "diffusers", "file", "folder" or "missing"
    vae: str | None
    bytes: int


class DatasetPlan(_Part):
    path: str
    caption_extension: str
    repeats: int
    images: list[str]
    captions: list[str]
    missing_captions: list[str]


class BackendPlan(_Part):
    name: str
    path: str | None
    python: str


class TrainingPlan(_Part):
    learning_rate: float
    text_encoder_lr: float
    train_text_encoder: bool
    epochs: int
    max_train_steps: int | None
    batch_size: int
    gradient_accumulation: int
    resolution: int
    rank: int
    alpha: float
    optimizer: str
    optimizer_args: dict[str, str | int | float | bool]
    lr_scheduler: str
    lr_warmup_steps: int
    mixed_precision: str
    base_precision: str
    save_precision: str
    gradient_checkpointing: bool
    cache_latents: bool
    cache_text_encoder_outputs: bool
    seed: int
    noise_offset: float
    min_snr_gamma: float
    flip_aug: bool
    shuffle_caption: bool
    keep_tokens: int
    clip_skip: int
    network_dropout: float
    bucketing: bool


class StepsPlan(_Part):
    samples_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    epochs: int
    effective_batch: int


class CheckpointPlan(_Part):
    every_n_epochs: int
    keep_last: int


class MonitorPlan(_Part):
    plateau_epochs: int
    plateau_min_delta: float
    divergence_epochs: int
    divergence_tolerance: float
    spike_factor: float
    ema_beta: float
    stop_on_nan: bool


class SamplesPlan(_Part):
    prompts: list[str]
    every_n_epochs: int | None
    steps: int
    seed: int


class ComputePlan(_Part):
    target: str
    gpu: str | None
    vram_gb: float | None
    gpu_count: int
    host: str | None
    user: str | None
    port: int | None
    identity_file: str | None
    remote_dir: str | None
    max_price_per_hour: float | None
    min_reliability: float | None
    region: str | None
    disk_gb: int | None
    image: str | None
    max_hours: float | None


class DevicePlan(_Part):
    kind: str  # "gpu" or "cpu"
    name: str
    memory_gb: float  # what training may use: the GPU's VRAM, or RAM on a CPU
    source: str  # where that figure came from, in words


class EstimatePlan(_Part):
    memory_gb: float
    memory_breakdown: dict[str, float]
    memory_needed_gb: float  # with the 20% safety margin
    fits: bool
    step_seconds: float
    setup_seconds: float
    time_seconds: float
    time_text: str
    time_device: str
    time_source: str  # where the seconds per step come from (all time figures are estimates)
    cost_usd: float | None  # cloud targets only
    cost_per_hour: float | None
    cost_source: str | None  # the dated price table


class Issue(_Part):
    """A reason Gate 2 cannot pass, tied to the spec field it is about."""

    field: tuple[str, ...]
    message: str
    fix: str
    kind: str = "range"  # "range", "backend", "memory", "dataset", or "unavailable" (not built yet)


class Plan(_Part):
    format: int
    lorabuild: str
    name: str
    spec_path: str
    grimoire: str
    run_dir: str
    preset: str
    model: ModelPlan
    dataset: DatasetPlan
    backend: BackendPlan
    training: TrainingPlan
    steps: StepsPlan
    checkpoints: CheckpointPlan
    monitor: MonitorPlan
    samples: SamplesPlan
    compute: ComputePlan
    device: DevicePlan
    estimates: EstimatePlan
    resume_key: str
    sources: dict[str, str]
    adjustments: list[str]
    problems: list[Issue]

    def pick(self, paths: tuple[str, ...]) -> dict[str, Any]:
        """The values at dotted `paths` (e.g. "training.epochs", "model"), JSON-ready."""
        data = self.model_dump(mode="json")
        picked: dict[str, Any] = {}
        for path in paths:
            node: Any = data
            for part in path.split("."):
                node = node[part]
            picked[path] = node
        return picked


def _resolve(
    name: str, spec_value: Any, *, preset: str, optimizer: str | None, demo: presets.DemoProfile | None, family: str
) -> tuple[Any, str]:
    """The value for a setting and where it came from."""
    if spec_value is not None:
        return spec_value, "spec"
    tables: list[tuple[str, dict[str, Any]]] = [
        (f"preset {preset}", presets.PRESETS[preset]),
        (f"optimizer {optimizer}", presets.OPTIMIZER_DEFAULTS.get(optimizer or "", {})),
        (f"demo model {demo.name}" if demo else "", demo.defaults if demo else {}),
        (f"{family} default", presets.FAMILY_DEFAULTS[family]),
        ("lorabuild default", presets.GENERAL_DEFAULTS),
    ]
    for label, table in tables:
        if name in table:
            return table[name], label
    raise KeyError(f"no default for {name}")


def steps_for(
    images: int, repeats: int, batch_size: int, accumulation: int, epochs: int, max_steps: int | None
) -> StepsPlan:
    """Optimizer steps, as every backend counts them (docs/trainer.md, reference/vram.md §4)."""
    samples = images * repeats
    micro = math.ceil(samples / batch_size) if samples else 0
    per_epoch = math.ceil(micro / accumulation) if micro else 0
    if max_steps is not None and per_epoch:
        total = max_steps
        epochs = math.ceil(max_steps / per_epoch)
    else:
        total = per_epoch * epochs
    return StepsPlan(
        samples_per_epoch=samples,
        steps_per_epoch=per_epoch,
        total_steps=total,
        epochs=epochs,
        effective_batch=batch_size * accumulation,
    )


def default_grimoire(loaded: LoadedSpec, root: Path | None) -> Path:
    return grimoire_path(loaded.folder, loaded.spec.grimoire, root)


def backend_python(loaded: LoadedSpec) -> str:
    """The Python that runs the backend: the spec's, the backend checkout's venv, or ours."""
    ref = loaded.spec.backend
    if ref.python:
        return str(loaded.absolute(ref.python))
    if ref.name == "builtin":
        return sys.executable
    for candidate in venv_pythons(loaded):
        if candidate.exists():
            return str(candidate)
    return "python3"


def venv_pythons(loaded: LoadedSpec) -> list[Path]:
    """Where `backend_python` looks for the backend checkout's own venv, in order (a venv made
    there later changes the plan, so the up-to-date shortcut watches these too)."""
    ref = loaded.spec.backend
    if ref.python or ref.name == "builtin" or not ref.path:
        return []
    base = loaded.resolve(ref.path)
    return [base / "venv" / "bin" / "python", base / ".venv" / "bin" / "python"]


def make_plan(
    loaded: LoadedSpec,
    machine: Machine,
    dataset: DatasetListing,
    model: ModelListing | None,
    *,
    grimoire: Path,
    memory_limit: dict[str, Any] | None = None,
) -> Plan:
    """Everything a training needs, derived from the spec and this machine's facts.

    `memory_limit`: the batch size this spec last ran out of memory with on this machine
    (lorabuild.limits), so planning starts below it."""
    spec = loaded.spec
    demo = presets.DEMO_MODELS.get(spec.base_model.demo or "")
    family = demo.family if demo else (spec.base_model.family or "sd15")
    sources: dict[str, str] = {}
    adjustments: list[str] = []
    issues: list[Issue] = []

    optimizer, src = _resolve(
        "optimizer", spec.training.optimizer, preset=spec.preset, optimizer=None, demo=demo, family=family
    )
    sources["training.optimizer"] = src
    values: dict[str, Any] = {"optimizer": optimizer}
    for field in TrainingPlan.model_fields:
        if field in values or field in ("optimizer_args", "max_train_steps"):
            continue
        value, src = _resolve(
            field, getattr(spec.training, field), preset=spec.preset, optimizer=optimizer, demo=demo, family=family
        )
        values[field] = value
        sources[f"training.{field}"] = src
    values["optimizer_args"] = dict(spec.training.optimizer_args)
    values["max_train_steps"] = spec.training.max_train_steps
    values["alpha"] = float(values["alpha"])

    repeats, sources["dataset.repeats"] = _resolve(
        "repeats", spec.dataset.repeats, preset=spec.preset, optimizer=optimizer, demo=demo, family=family
    )
    checkpoints = {}
    for field in CheckpointPlan.model_fields:
        spec_value = getattr(spec.checkpoints, field)
        if spec_value is not None:
            checkpoints[field], sources[f"checkpoints.{field}"] = spec_value, "spec"
        elif field in presets.PRESETS[spec.preset]:
            checkpoints[field] = presets.PRESETS[spec.preset][field]
            sources[f"checkpoints.{field}"] = f"preset {spec.preset}"
        else:
            checkpoints[field] = presets.CHECKPOINT_DEFAULTS[field]
            sources[f"checkpoints.{field}"] = "lorabuild default"

    backend_name = spec.backend.name
    device = _device(loaded, machine)
    on_cpu = device.kind == "cpu"
    for setting, value, why in backends.adjust_settings(backend_name, values, on_cpu=on_cpu):
        if values[setting] != value:
            adjustments.append(why)
            values[setting] = value
            sources[f"training.{setting}"] = f"set by the {backend_name} backend"

    training = TrainingPlan(**values)
    gpu_model = None
    if device.kind == "gpu":
        # an unknown GPU is timed as a mid-range one; the time source says so
        gpu_model = hardware.find_gpu(device.name) or hardware.GpuModel(device.name, device.memory_gb, (8, 0), 1.0)

    def memory_for(batch: int) -> tuple[float, dict[str, float]]:
        est = estimate_vram(
            MemoryInputs(
                family=family,
                resolution=training.resolution,
                batch_size=batch,
                rank=training.rank,
                optimizer=training.optimizer,
                base_precision=training.base_precision,
                mixed_precision=training.mixed_precision,
                gradient_checkpointing=training.gradient_checkpointing,
                cache_latents=training.cache_latents,
                cache_text_encoder_outputs=training.cache_text_encoder_outputs,
                train_text_encoder=training.train_text_encoder,
                on_cpu=on_cpu,
                demo=demo,
            )
        )
        return est.total_gb, est.breakdown

    # workflow.md Gate 2: halve the batch (keeping the effective batch) until it fits with 20% spare
    memory, breakdown = memory_for(training.batch_size)
    batch, accumulation = training.batch_size, training.gradient_accumulation
    while memory * presets.VRAM_SAFETY_MARGIN > device.memory_gb and batch > 1:
        old = batch
        batch, accumulation = max(1, batch // 2), accumulation * 2
        memory, breakdown = memory_for(batch)
        adjustments.append(
            f"memory is tight, so the batch size goes from {old} to {batch} and gradient accumulation "
            f"to {accumulation}: each learning step still sees {batch * accumulation} pictures"
        )
    reason = "reduced to fit memory"
    if memory_limit and batch > memory_limit["batch_size"]:
        old = batch
        while batch > memory_limit["batch_size"]:
            batch, accumulation = max(1, batch // 2), accumulation * 2
        memory, breakdown = memory_for(batch)
        adjustments.append(
            f"this machine ran out of memory at batch size {memory_limit.get('failed_at', old)} "
            f"({memory_limit.get('where', 'an earlier run')}, {memory_limit.get('when', 'before')}), so training "
            f"starts at batch size {batch} with gradient accumulation {accumulation}: each learning step still "
            f"sees {batch * accumulation} pictures"
        )
        reason = "reduced after running out of memory"
    if (batch, accumulation) != (training.batch_size, training.gradient_accumulation):
        training = training.model_copy(update={"batch_size": batch, "gradient_accumulation": accumulation})
        sources["training.batch_size"] = sources["training.gradient_accumulation"] = reason
    needed = round(memory * presets.VRAM_SAFETY_MARGIN, 2)
    fits = needed <= device.memory_gb

    steps = steps_for(
        len(dataset.images),
        repeats,
        training.batch_size,
        training.gradient_accumulation,
        training.epochs,
        training.max_train_steps,
    )
    timing = estimate_time(
        family=family,
        resolution=training.resolution,
        batch_size=training.batch_size,
        gradient_accumulation=training.gradient_accumulation,
        gradient_checkpointing=training.gradient_checkpointing,
        total_steps=steps.total_steps,
        gpu=gpu_model,
        demo=demo,
    )
    cost = (
        estimate_cost(spec.compute.target, gpu_model.name, timing.seconds, spec.compute.gpu_count)
        if gpu_model is not None and spec.compute.target in ("runpod", "vastai")
        else None
    )
    estimates = EstimatePlan(
        memory_gb=memory,
        memory_breakdown=breakdown,
        memory_needed_gb=needed,
        fits=fits,
        step_seconds=round(timing.step_seconds, 4),
        setup_seconds=round(timing.setup_seconds, 1),
        time_seconds=round(timing.seconds, 1),
        time_text=describe_duration(timing.seconds),
        time_device=timing.device,
        time_source=timing.source,
        cost_usd=cost.usd if cost else None,
        cost_per_hour=cost.per_hour if cost else None,
        cost_source=cost.source if cost else None,
    )

    grimoire_dir = str(grimoire)
    model_plan = _model_plan(loaded, model, demo, family, grimoire)
    compute = ComputePlan(**spec.compute.model_dump())
    monitor = MonitorPlan(
        **{
            f: (getattr(spec.monitor, f) if getattr(spec.monitor, f) is not None else presets.MONITOR_DEFAULTS[f])
            for f in MonitorPlan.model_fields
        }
    )
    samples = SamplesPlan(
        prompts=list(spec.samples.prompts),
        every_n_epochs=spec.samples.every_n_epochs,
        steps=spec.samples.steps or presets.SAMPLE_DEFAULTS["steps"],
        seed=spec.samples.seed if spec.samples.seed is not None else presets.SAMPLE_DEFAULTS["seed"],
    )
    dataset_plan = DatasetPlan(
        path=str(dataset.folder),
        caption_extension=spec.dataset.caption_extension,
        repeats=repeats,
        images=list(dataset.images),
        captions=list(dataset.captions),
        missing_captions=list(dataset.missing_captions),
    )
    backend = BackendPlan(
        name=backend_name,
        path=str(loaded.resolve(spec.backend.path)) if spec.backend.path else None,
        python=backend_python(loaded),
    )
    # Resuming must not mix runs: everything that changes the result, except how the effective
    # batch is split (out-of-memory recovery changes that split and keeps the checkpoints valid).
    resume_key = digest(
        {
            "model": model_plan.model_dump(exclude={"path", "bytes"}),
            "dataset": dataset_plan.model_dump(exclude={"path"}),
            "training": training.model_dump(exclude={"batch_size", "gradient_accumulation"}),
            "effective_batch": steps.effective_batch,
            "total_steps": steps.total_steps,
        }
    )
    plan = Plan(
        format=PLAN_FORMAT,
        lorabuild=__version__,
        name=spec.name,
        spec_path=str(loaded.path),
        grimoire=grimoire_dir,
        run_dir=str(grimoire / "training" / spec.name),
        preset=spec.preset,
        model=model_plan,
        dataset=dataset_plan,
        backend=backend,
        training=training,
        steps=steps,
        checkpoints=CheckpointPlan(**checkpoints),
        monitor=monitor,
        samples=samples,
        compute=compute,
        device=device,
        estimates=estimates,
        resume_key=resume_key,
        sources=sources,
        adjustments=adjustments,
        problems=[],
    )
    issues.extend(check_ranges(plan, demo))
    issues.extend(backends.check_plan(plan))
    if not fits:
        issues.append(_memory_issue(plan, family))
    return plan.model_copy(update={"problems": issues})


def _device(loaded: LoadedSpec, machine: Machine) -> DevicePlan:
    """What training will run on: this machine's GPU; else the GPU the spec declares (a remote
    target, or a GPU backend planned on a machine without one, so Gate 2 can check memory
    anywhere — Gate 3 then checks the real machine); else this machine's processor."""
    compute = loaded.spec.compute
    best = machine.best_gpu
    declared = compute.gpu is not None or compute.vram_gb is not None
    gpu_backend = loaded.spec.backend.name != "builtin"
    if compute.target != "local" or (best is None and declared and gpu_backend):
        gpu = hardware.find_gpu(compute.gpu)
        if compute.vram_gb:
            return DevicePlan(
                kind="gpu",
                name=compute.gpu or "remote GPU",
                memory_gb=compute.vram_gb,
                source="`compute.vram_gb` in the spec",
            )
        if gpu:
            return DevicePlan(
                kind="gpu", name=gpu.name, memory_gb=gpu.vram_gb, source=f"the usual memory of a {gpu.name}"
            )
        return DevicePlan(
            kind="gpu",
            name=compute.gpu or "remote GPU",
            memory_gb=24.0,
            source="assumed 24 GB: set `compute.gpu` or `compute.vram_gb` in the spec",
        )
    if best is not None:
        return DevicePlan(
            kind="gpu",
            name=best.name,
            memory_gb=round(best.total_gb, 1),
            source="this machine's GPU (read through the NVIDIA driver)",
        )
    return DevicePlan(
        kind="cpu",
        name="this computer's processor",
        memory_gb=machine.ram_gb,
        source="this machine's RAM (no NVIDIA GPU found)",
    )


def _model_plan(
    loaded: LoadedSpec, model: ModelListing | None, demo: presets.DemoProfile | None, family: str, grimoire: Path
) -> ModelPlan:
    ref = loaded.spec.base_model
    if demo is not None:
        return ModelPlan(
            path=str(grimoire / "models" / demo.name),
            demo=demo.name,
            demo_version=demo.version,
            family=family,
            kind="demo",
            vae=None,
            bytes=demo.files_bytes,
        )
    assert ref.path is not None
    return ModelPlan(
        path=str(loaded.resolve(ref.path)),
        demo=None,
        demo_version=None,
        family=family,
        kind=model.kind if model else "missing",
        vae=str(loaded.resolve(ref.vae)) if ref.vae else None,
        bytes=model.bytes if model else 0,
    )


def check_ranges(plan: Plan, demo: presets.DemoProfile | None) -> list[Issue]:
    """Safe-range problems, each with the range and a one-line reason (presets.py)."""
    t = plan.training
    issues: list[Issue] = []
    family_ranges = dict(presets.FAMILY_RANGES[plan.model.family])
    general = dict(presets.GENERAL_RANGES)
    if demo is not None:
        family_ranges.update({k: v for k, v in demo.ranges.items() if k in family_ranges})
        general.update({k: v for k, v in demo.ranges.items() if k in general})

    def check(field: tuple[str, ...], label: str, value: float, rng: presets.Range) -> None:
        if not rng.holds(value):
            issues.append(
                Issue(
                    field=field,
                    message=f"{label} {value:g} is outside the safe range {rng.low:g} to {rng.high:g}",
                    fix=f"{rng.why}; use a value from {rng.low:g} to {rng.high:g}",
                )
            )

    check(
        ("training", "learning_rate"),
        f"learning rate for {t.optimizer}",
        t.learning_rate,
        presets.LEARNING_RATE_RANGES[t.optimizer],
    )
    check(("training", "resolution"), "resolution", t.resolution, family_ranges["resolution"])
    step = presets.RESOLUTION_STEP[plan.model.family]
    if t.resolution % step:
        lower = max(step, t.resolution - t.resolution % step)
        issues.append(
            Issue(
                field=("training", "resolution"),
                message=f"resolution {t.resolution} is not a multiple of {step}",
                fix=f"the model works in blocks of {step} pixels; use {lower} or {lower + step}",
            )
        )
    check(("training", "rank"), "rank", t.rank, family_ranges["rank"])
    check(("training", "alpha"), "alpha", t.alpha, presets.alpha_range(t.rank))
    check(("training", "batch_size"), "batch size", t.batch_size, general["batch_size"])
    check(
        ("training", "gradient_accumulation"),
        "gradient accumulation",
        t.gradient_accumulation,
        general["gradient_accumulation"],
    )
    check(("dataset", "repeats"), "repeats", plan.dataset.repeats, general["repeats"])
    check(("training", "noise_offset"), "noise offset", t.noise_offset, general["noise_offset"])
    check(("training", "min_snr_gamma"), "min SNR gamma", t.min_snr_gamma, general["min_snr_gamma"])
    if not plan.dataset.images:
        issues.append(
            Issue(
                kind="dataset",
                field=("dataset", "path"),
                message=f"the dataset folder {plan.dataset.path} has no pictures",
                fix="put your .png, .jpg or .webp pictures (with .txt captions) in that folder",
            )
        )
    else:
        check(
            ("training", "epochs"),
            "total steps (epochs × repeats × pictures ÷ batch)",
            plan.steps.total_steps,
            general["total_steps"],
        )
    if t.lr_warmup_steps > plan.steps.total_steps:
        issues.append(
            Issue(
                field=("training", "lr_warmup_steps"),
                message=f"warm-up of {t.lr_warmup_steps} steps is longer than the whole run "
                f"({plan.steps.total_steps} steps)",
                fix="use a warm-up of about 5% of the steps, or 0",
            )
        )
    return issues


def _memory_issue(plan: Plan, family: str) -> Issue:
    e, t, d = plan.estimates, plan.training, plan.device
    ideas = []
    if t.resolution > presets.FAMILY_DEFAULTS[family]["resolution"] // 2:
        ideas.append("a lower resolution")
    if t.rank > 8:
        ideas.append("a lower rank (8)")
    if t.optimizer not in ("adamw8bit", "adafactor") and d.kind == "gpu":
        ideas.append("an 8-bit optimizer (`optimizer: adamw8bit`)")
    if t.base_precision not in ("fp8", "nf4") and d.kind == "gpu":
        ideas.append("an 8-bit base model (`base_precision: fp8`)")
    if not t.gradient_checkpointing:
        ideas.append("`gradient_checkpointing: true`")
    bigger = hardware.smallest_gpu_with(e.memory_needed_gb)
    if bigger is not None:
        article = "an" if bigger.name[0] in "AEFHILMNORSX" else "a"  # as the letter is spoken: "an H100"
        ideas.append(f"a GPU with more memory ({article} {bigger.name} with {bigger.vram_gb:g} GB fits as it is)")
    where = "VRAM" if d.kind == "gpu" else "RAM"
    return Issue(
        kind="memory",
        field=("training", "batch_size"),
        message=f"training needs about {e.memory_gb:g} GB, {e.memory_needed_gb:g} GB with the 20% safety margin, "
        f"but {d.name} has {d.memory_gb:g} GB {where} — even at batch size 1",
        fix="try " + ", ".join(ideas) if ideas else "use a machine with more memory",
    )


def locate_issue(loaded: LoadedSpec, issue: Issue) -> tuple[int, int]:
    """Where to point for an issue: the field if the spec sets it, else the preset line or section."""
    spec_has = loaded.source.node_at(issue.field)[1] == len(issue.field)
    if not spec_has and issue.field[0] == "training" and loaded.source.node_at(("preset",))[1] == 1:
        return loaded.locate(("preset",))
    return loaded.locate(issue.field)


def model_listing_path(loaded: LoadedSpec) -> Path | None:
    ref = loaded.spec.base_model
    return loaded.resolve(ref.path) if ref.path else None
