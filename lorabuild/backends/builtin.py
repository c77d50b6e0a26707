"""The builtin backend: lorabuild's own PyTorch trainer (`python -m lorabuild.trainer`).

Trains diffusers-format SD-1.x-architecture models (and the tiny demo model) on a CPU or a GPU.
Its config is `backend/train.json`; its output is one JSON object per line. The contract is
docs/trainer.md.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorabuild.backends import Checkpoint, ConfigLine, Event, Installation, Launch, supporting
from lorabuild.glossary import TERMS, explain
from lorabuild.probe import PROBE_SOURCE

if TYPE_CHECKING:
    from lorabuild.plan import Issue, Plan

FAMILIES = ("sd15",)
OPTIMIZERS = ("adamw", "lion", "prodigy", "adafactor")
# Training settings this trainer honours; a spec that sets any other one is told so.
SETTINGS = (
    "learning_rate",
    "epochs",
    "max_train_steps",
    "batch_size",
    "gradient_accumulation",
    "resolution",
    "rank",
    "alpha",
    "optimizer",
    "optimizer_args",
    "lr_scheduler",
    "lr_warmup_steps",
    "mixed_precision",
    "gradient_checkpointing",
    "seed",
    "noise_offset",
    "flip_aug",
    "save_precision",
)
CONFIG_FILE = "train.json"
CONFIG_FORMAT = 1

_OOM = re.compile(
    r"OutOfMemoryError|CUDA out of memory|MemoryError|Cannot allocate memory|"
    r"DefaultCPUAllocator: can't allocate memory|\"kind\": \"oom\"",
)


def adjust_settings(training: dict[str, Any], *, on_cpu: bool) -> list[tuple[str, Any, str]]:
    changes: list[tuple[str, Any, str]] = []
    mixed = training["mixed_precision"]
    if on_cpu and mixed != "no":
        changes.append(
            (
                "mixed_precision",
                "no",
                f"mixed precision {mixed} is for graphics cards; on this computer's "
                "processor the builtin trainer uses full 32-bit precision",
            )
        )
        mixed = "no"
    # the trainer keeps the frozen base in the mixed-precision format (fp32 without it)
    base = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}[mixed]
    if training["base_precision"] != base:
        changes.append(
            (
                "base_precision",
                base,
                f"the builtin trainer keeps the base model in {base} (it follows mixed precision {mixed})",
            )
        )
    return changes


def check_plan(plan: Plan) -> list[Issue]:
    from lorabuild.plan import Issue

    issues: list[Issue] = []
    if plan.model.family not in FAMILIES:
        issues.append(
            Issue(
                kind="backend",
                field=("base_model", "family"),
                message=f"the builtin trainer cannot train {plan.model.family} models",
                fix="use a backend that can: "
                + ", ".join(f"`backend: {name}`" for name in supporting(plan.model.family) if name != "builtin"),
            )
        )
    if plan.training.optimizer not in OPTIMIZERS:
        issues.append(
            Issue(
                kind="backend",
                field=("training", "optimizer"),
                message=f"the builtin trainer has no {plan.training.optimizer} optimizer",
                fix=f"use one of {', '.join(OPTIMIZERS)} (adamw8bit needs an NVIDIA GPU and a CUDA backend)",
            )
        )
    if plan.model.kind in ("file", "folder"):
        issues.append(
            Issue(
                kind="backend",
                field=("base_model", "path"),
                message="the builtin trainer reads diffusers model folders (with a model_index.json), "
                "not single model files",
                fix="point `base_model.path` at a diffusers folder, or use `backend: kohya` for .safetensors files",
            )
        )
    return issues


def settings(plan: Plan) -> tuple[str, ...]:
    return SETTINGS


def render_config(plan: Plan) -> dict[str, str]:
    run = Path(plan.run_dir)
    t = plan.training
    config = {
        "format": CONFIG_FORMAT,
        "name": plan.name,
        "model": {"path": plan.model.path, "demo": plan.model.demo, "family": plan.model.family},
        "dataset": {
            "path": plan.dataset.path,
            "caption_extension": plan.dataset.caption_extension,
            "repeats": plan.dataset.repeats,
            "images": plan.dataset.images,
        },
        "training": {
            "learning_rate": t.learning_rate,
            "epochs": plan.steps.epochs,
            "max_train_steps": t.max_train_steps,
            "batch_size": t.batch_size,
            "gradient_accumulation": t.gradient_accumulation,
            "resolution": t.resolution,
            "rank": t.rank,
            "alpha": t.alpha,
            "optimizer": t.optimizer,
            "optimizer_args": t.optimizer_args,
            "lr_scheduler": t.lr_scheduler,
            "lr_warmup_steps": t.lr_warmup_steps,
            "mixed_precision": t.mixed_precision,
            "gradient_checkpointing": t.gradient_checkpointing,
            "seed": t.seed,
            "noise_offset": t.noise_offset,
            "flip_aug": t.flip_aug,
            # the trainer names full precision as kohya does
            "save_precision": "float" if t.save_precision == "fp32" else t.save_precision,
        },
        "checkpoints": {
            "every_n_epochs": plan.checkpoints.every_n_epochs,
            "keep_last": plan.checkpoints.keep_last,
        },
        "output": {
            "dir": str(run),
            "lora": str(run / f"{plan.name}.safetensors"),
            "checkpoints": str(run / "checkpoints"),
            "samples": str(run / "samples"),
        },
        "resume_key": plan.resume_key,
        "device": "auto",
        "threads": None,
        "metadata": {
            "ss_sd_model_name": plan.model.demo or Path(plan.model.path).name,
            "lorabuild_preset": plan.preset,
        },
    }
    if plan.samples.prompts:
        config["samples"] = {
            "prompts": list(plan.samples.prompts),
            "every_n_epochs": plan.samples.every_n_epochs,
            "steps": plan.samples.steps,
            "seed": plan.samples.seed,
        }
    return {CONFIG_FILE: json.dumps(config, indent=2, sort_keys=True) + "\n"}


def describe_config(plan: Plan) -> list[ConfigLine]:
    data = json.loads(render_config(plan)[CONFIG_FILE])
    lines = [
        ConfigLine(CONFIG_FILE, "model.path", str(data["model"]["path"]), explain("base_model")),
        ConfigLine(CONFIG_FILE, "dataset.path", str(data["dataset"]["path"]), explain("dataset")),
        ConfigLine(CONFIG_FILE, "dataset.repeats", str(data["dataset"]["repeats"]), explain("repeats")),
        ConfigLine(CONFIG_FILE, "dataset.images", f"{len(data['dataset']['images'])} pictures", explain("dataset")),
    ]
    for key, value in data["training"].items():
        term = key if key in TERMS else None
        if term:
            lines.append(ConfigLine(CONFIG_FILE, f"training.{key}", json.dumps(value), explain(term)))
    lines.append(
        ConfigLine(
            CONFIG_FILE,
            "checkpoints.every_n_epochs",
            str(data["checkpoints"]["every_n_epochs"]),
            explain("every_n_epochs"),
        )
    )
    lines.append(
        ConfigLine(CONFIG_FILE, "checkpoints.keep_last", str(data["checkpoints"]["keep_last"]), explain("keep_last"))
    )
    if "samples" in data:
        s = data["samples"]
        every = s["every_n_epochs"] or data["checkpoints"]["every_n_epochs"]
        when = f"every {every} epoch(s) and at the end" if every else "at the end"
        lines.append(
            ConfigLine(
                CONFIG_FILE, "samples.prompts", f"{len(s['prompts'])} prompt(s), {when}", explain("sample_prompts")
            )
        )
    lines.append(
        ConfigLine(
            CONFIG_FILE,
            "resume_key",
            data["resume_key"],
            "fingerprint of the settings: only checkpoints with the same one are resumed",
        )
    )
    return lines


def launch(
    plan: Plan,
    config_dir: Path,
    output_dir: Path,
    *,
    max_steps: int | None = None,
    resume: bool = True,
    batch_size: int | None = None,
    gradient_accumulation: int | None = None,
) -> Launch:
    argv = [plan.backend.python, "-m", "lorabuild.trainer", str(config_dir / CONFIG_FILE)]
    argv += ["--lora-out", str(final_lora(plan, output_dir))]
    if max_steps is not None:
        argv += ["--max-steps", str(max_steps), "--no-checkpoints", "--no-resume"]
    elif not resume:
        argv.append("--no-resume")
    if batch_size is not None:
        argv += ["--batch-size", str(batch_size)]
    if gradient_accumulation is not None:
        argv += ["--gradient-accumulation", str(gradient_accumulation)]
    # the trainer must import this very lorabuild (or the copy sent to a remote machine)
    package_root = plan.backend.path or str(Path(__file__).resolve().parents[2])
    # this machine's PYTHONPATH means nothing on another one
    existing = os.environ.get("PYTHONPATH") if plan.compute.target == "local" else None
    env = {
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": package_root + (os.pathsep + existing if existing else ""),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "DIFFUSERS_VERBOSITY": "error",
    }
    return Launch(argv=argv, cwd=Path(plan.run_dir), env=env)


def parse_log_line(line: str) -> list[Event]:
    if not line.startswith("{"):
        return []
    try:
        data = json.loads(line)
    except json.JSONDecodeError:
        return []
    if not isinstance(data, dict) or not isinstance(data.get("event"), str):
        return []
    kind = data.pop("event")
    return [Event(kind, data)]


def metrics_files(plan: Plan, output_dir: Path) -> list[Path]:
    return []  # the trainer's own output lines are its metrics


def parse_metrics_line(path: Path, line: str) -> list[Event]:
    return []


def is_out_of_memory(text: str) -> bool:
    return bool(_OOM.search(text))


def checkpoints(plan: Plan, output_dir: Path) -> list[Checkpoint]:
    from lorabuild.trainer.checkpoints import list_checkpoints  # light: no torch

    return [Checkpoint(c.path, c.step, c.epoch, c.lora, c.resume_key) for c in list_checkpoints(output_dir)]


def final_lora(plan: Plan, output_dir: Path) -> Path:
    return output_dir / f"{plan.name}.safetensors"


def prune_checkpoints(plan: Plan, output_dir: Path) -> list[Path]:
    return []  # the trainer keeps only keep_last itself


# The trainer's packages (the `train` extra of pyproject.toml), for a machine that lacks them.
TRAIN_PACKAGES = (
    "diffusers>=0.30",
    "transformers>=4.44",
    "safetensors>=0.4",
    "prodigyopt>=1.0",
    "lion-pytorch>=0.2",
    "pillow>=10",
    "numpy>=1.26",
)


def install_commands(plan: Plan) -> list[list[str]]:
    # torch comes with GPU images; installing it blind could pull the wrong CUDA build
    return [[plan.backend.python, "-m", "pip", "install", "--quiet", *TRAIN_PACKAGES]]


def remote_entry_point(plan: Plan) -> str | None:
    return None  # lorabuild sends its own trainer with every run


def installation(plan: Plan) -> Installation:
    from lorabuild import __version__

    entry = Path(__file__).resolve().parents[1] / "trainer" / "__main__.py"
    if not entry.is_file():
        return Installation(
            False,
            "lorabuild's trainer is missing from this installation",
            "reinstall lorabuild with its training extra: pip install -e '.[train]'",
        )
    return Installation(True, f"lorabuild's own trainer {__version__}", version=__version__, entry_point=str(entry))


def probe_command(plan: Plan) -> list[str]:
    return [plan.backend.python, "-c", PROBE_SOURCE, "diffusers", "transformers", "safetensors"]
