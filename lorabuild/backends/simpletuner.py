"""The SimpleTuner backend: `accelerate launch …/simpletuner/train.py` with a JSON config.

Owns everything lorabuild knows about SimpleTuner (reference/simpletuner.md): its two config
files (`config.json`, the training settings, and `multidatabackend.json`, the dataset list),
which keys it accepts (the machine-readable list is `data/simpletuner_keys.json`; SimpleTuner
rejects unknown keys), the cross-field rules it enforces or trips over, the command that runs
it, its console output (log lines and tqdm bars) and metrics file, its checkpoint folders and
how it resumes from them.

Where things go. Gate 2 writes the two files for the real training into `backend/`:
`output_dir` is the run folder's `checkpoints/`, so a person can also run them by hand.
`launch` writes the exact variant of each run (dry run, resume point, out-of-memory retry)
into `<output_dir>/simpletuner-workspace/` and starts SimpleTuner there, because SimpleTuner
writes `debug.log` and reads `config/config.env` in its working folder. Every path is absolute:
SimpleTuner resolves relative ones against that working folder.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorabuild.backends import Checkpoint, ConfigLine, Event, Installation, Launch
from lorabuild.glossary import explain
from lorabuild.probe import PROBE_SOURCE

if TYPE_CHECKING:
    from lorabuild.plan import Issue, Plan

FAMILIES = ("sd15", "sdxl", "pony", "flux")
CONFIG_FILE = "config.json"
DATASETS_FILE = "multidatabackend.json"
KEYS_FILE = Path(__file__).parent / "data" / "simpletuner_keys.json"
WORKSPACE = "simpletuner-workspace"  # inside output_dir: SimpleTuner's working folder for one run
LORA_FILE = "pytorch_lora_weights.safetensors"  # the final LoRA, and the LoRA inside each checkpoint
METRICS_FILE = "training_metrics.jsonl"
GUARD_FILE = ".guard"  # written last into a checkpoint folder: the checkpoint is complete
DATASET_ID = "pictures"
TEXT_EMBEDS_ID = "text-embeds"
INSTALL_URL = "https://github.com/bghira/SimpleTuner"

# lorabuild's family → SimpleTuner's model_family (Pony is an SDXL model).
MODEL_FAMILY = {"sd15": "sd1x", "sdxl": "sdxl", "pony": "sdxl", "flux": "flux"}
DEFAULT_FLAVOUR = {"sd1x": "1.5", "sdxl": "base-1.0", "flux": "dev"}

# lorabuild's optimizer → (SimpleTuner's name, the module that provides it, or None when built in).
# SimpleTuner removed plain `adafactor` and `adamw8bit` and has no plain `lion` (§5).
OPTIMIZERS: dict[str, tuple[str, str | None]] = {
    "adamw": ("adamw_bf16", None),
    "adamw8bit": ("bnb-adamw8bit", "bitsandbytes"),
    "lion": ("optimi-lion", "optimi"),
    "prodigy": ("prodigy", "prodigyplus"),
    "adafactor": ("torch-adafactor", None),
}
# lorabuild's base precision → SimpleTuner's base_model_precision, and the module it needs.
# fp8 becomes int8 through quanto: the same 1 byte per weight, and the format SimpleTuner's own
# Flux guide and example use on 24 GB cards (§7, §9).
QUANTISED: dict[str, tuple[str, str]] = {"fp8": ("int8-quanto", "optimum.quanto"), "nf4": ("nf4-bnb", "bitsandbytes")}
# Above this much GPU memory the base model is quantised on the GPU (fast); below, on the processor,
# which avoids a memory spike at start-up but needs a lot of RAM (§7).
QUANTISE_ON_GPU_ABOVE_GB = 24.0

# Training settings this backend honours; a spec that sets any other one is told so.
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
    "base_precision",
    "gradient_checkpointing",
    "seed",
    "network_dropout",
    "bucketing",
)
TEXT_ENCODER_FAMILIES = ("sd15", "sdxl", "pony")  # Flux's text encoders are not trained (§4)


@cache
def accepted_keys() -> dict[str, Any]:
    """The keys SimpleTuner accepts, with types and allowed values (data/simpletuner_keys.json)."""
    data: dict[str, Any] = json.loads(KEYS_FILE.read_text(encoding="utf-8"))
    return data


def accepted_optimizers() -> list[str]:
    groups: dict[str, list[str]] = accepted_keys()["optimizers"]
    return [name for names in groups.values() for name in names]


# --- planning ------------------------------------------------------------------------------------


def adjust_settings(training: dict[str, Any], *, on_cpu: bool) -> list[tuple[str, Any, str]]:
    changes: list[tuple[str, Any, str]] = []
    # SimpleTuner always encodes every picture and caption once, before the first step (§6).
    for setting, what in (("cache_latents", "pictures"), ("cache_text_encoder_outputs", "captions")):
        if not training[setting]:
            changes.append((setting, True, f"SimpleTuner always prepares the {what} once and keeps the result"))
    # An unquantised base model is loaded in the mixed-precision format (base_model_precision
    # no_change), so the memory estimate must use that format, whatever the spec said.
    if training["base_precision"] not in QUANTISED:
        base = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}[training["mixed_precision"]]
        if training["base_precision"] != base:
            changes.append(
                (
                    "base_precision",
                    base,
                    f"SimpleTuner keeps an unquantised base model in {base} (it follows mixed precision "
                    f"{training['mixed_precision']})",
                )
            )
    return changes


def settings(plan: Plan) -> tuple[str, ...]:
    if plan.model.family in TEXT_ENCODER_FAMILIES:
        return (*SETTINGS, "train_text_encoder")
    return SETTINGS


def check_plan(plan: Plan) -> list[Issue]:
    from lorabuild.plan import Issue

    issues: list[Issue] = []
    t = plan.training

    def issue(field: tuple[str, ...], message: str, fix: str, kind: str = "backend") -> None:
        issues.append(Issue(kind=kind, field=field, message=message, fix=fix))

    if plan.model.family not in FAMILIES:
        issue(
            ("base_model", "family"),
            f"SimpleTuner cannot train {plan.model.family} models",
            "use `backend: kohya` or `ai-toolkit` (both train SD 1.5, SDXL, Pony and Flux) for this model",
        )
    if plan.model.kind == "demo":
        issue(
            ("base_model", "demo"),
            "the demo model is made for lorabuild's own trainer; SimpleTuner needs a real model",
            "use `backend: builtin` to try the demo model, or point `base_model.path` at a real model",
        )
    elif plan.model.kind in ("file", "folder"):
        issue(
            ("base_model", "path"),
            "SimpleTuner reads models in the diffusers layout (a folder with model_index.json), not single model files",
            "download the diffusers version of the model (e.g. huggingface-cli download "
            "black-forest-labs/FLUX.1-dev --local-dir models/flux1-dev), "
            "or use `backend: kohya` for .safetensors files",
        )
    if plan.model.vae and Path(plan.model.vae).suffix.lower() in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
        issue(
            ("base_model", "vae"),
            "SimpleTuner reads a separate VAE only in the diffusers layout (a folder with config.json)",
            "remove `base_model.vae` to use the model's own VAE, or point it at a diffusers VAE folder",
        )
    if t.mixed_precision != "bf16":
        issue(
            ("training", "mixed_precision"),
            f"lorabuild runs SimpleTuner in bf16 mixed precision only: with {t.mixed_precision} its optimizers "
            "stop with 'Model is not using bf16 precision'",
            "use `mixed_precision: bf16` (RTX 30-series, A100 or newer); for an older card use `backend: kohya`",
        )
    if t.seed == 0:
        issue(
            ("training", "seed"),
            "SimpleTuner reads seed 0 as 'a new random seed every time', so the run could not be repeated",
            "use any other seed, e.g. 42",
        )
    bad_args = [k for k, v in t.optimizer_args.items() if any(c in f"{k}{v}" for c in ",= ")]
    if bad_args:
        issue(
            ("training", "optimizer_args"),
            f"SimpleTuner takes optimizer settings as one 'name=value,name=value' line, so "
            f"{', '.join(bad_args)} cannot contain commas, '=' or spaces",
            "remove those characters from the names and values",
        )
    if plan.dataset.caption_extension != ".txt":
        issue(
            ("dataset", "caption_extension"),
            f"SimpleTuner reads captions only from .txt files, not {plan.dataset.caption_extension}",
            "rename the caption files to .txt and set `caption_extension: .txt`",
        )
    needed = t.batch_size * t.gradient_accumulation * plan.compute.gpu_count
    if plan.dataset.images and plan.steps.samples_per_epoch < needed:
        issue(
            ("dataset", "repeats"),
            f"each epoch shows {plan.steps.samples_per_epoch} pictures, fewer than one learning step needs "
            f"({needed}); SimpleTuner stops with 'zero usable batches'",
            f"raise `dataset.repeats` to at least {math.ceil(needed / len(plan.dataset.images))}, "
            "or lower the batch size",
            kind="dataset",
        )
    if len(plan.samples.prompts) > 1:
        issue(
            ("samples", "prompts"),
            "lorabuild passes one sample prompt to SimpleTuner",
            "keep one prompt in `samples.prompts`",
        )
    return issues


# --- config files --------------------------------------------------------------------------------


def _json(data: Any) -> str:
    return json.dumps(data, indent=2) + "\n"


def _model_flavour(plan: Plan) -> str:
    family = MODEL_FAMILY[plan.model.family]
    if family == "flux":
        # With a local path the flavour still selects schedule details; the folder name is the best hint.
        name = Path(plan.model.path).name.lower()
        for flavour in ("schnell", "krea", "kontext"):
            if flavour in name:
                return flavour
    return DEFAULT_FLAVOUR[family]


def _optimizer_config(args: dict[str, str | int | float | bool]) -> str:
    """optimizer_args as SimpleTuner's 'k=v,k=v' line, written so each value reads back as its type."""

    def text(value: str | int | float | bool) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, float):
            shown = repr(value)
            # SimpleTuner reads a value as a float only when it holds '.' or 'e-'
            return shown if ("." in shown or "e-" in shown) else f"{value:.1f}"
        return str(value)

    return ",".join(f"{key}={text(value)}" for key, value in sorted(args.items()))


def _steps_every(plan: Plan, epochs: int) -> int:
    return max(1, epochs * plan.steps.steps_per_epoch)


def _documents(plan: Plan, output_dir: Path, datasets_path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """config.json and multidatabackend.json for a training that writes into `output_dir`."""
    t = plan.training
    family = MODEL_FAMILY.get(plan.model.family, plan.model.family)
    optimizer = OPTIMIZERS.get(t.optimizer, (t.optimizer, None))[0]
    config: dict[str, Any] = {
        "model_type": "lora",
        "model_family": family,
        "model_flavour": _model_flavour(plan) if family in DEFAULT_FLAVOUR else None,
        "pretrained_model_name_or_path": plan.model.path,
        "pretrained_vae_model_name_or_path": plan.model.vae,
        "output_dir": str(output_dir),
        "data_backend_config": str(datasets_path),
        "lora_type": "standard",
        "lora_rank": t.rank,
        "lora_alpha": float(t.alpha),
        "lora_dropout": float(t.network_dropout),
        "learning_rate": float(t.learning_rate),
        "optimizer": optimizer,
        "optimizer_config": _optimizer_config(t.optimizer_args) if t.optimizer_args else None,
        "lr_scheduler": t.lr_scheduler,
        # lorabuild's constant schedule has no warm-up; SimpleTuner would quietly turn a constant
        # schedule with warm-up steps into constant_with_warmup (§2)
        "lr_warmup_steps": 0 if t.lr_scheduler == "constant" else t.lr_warmup_steps,
        "train_batch_size": t.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation,
        "resolution": t.resolution,
        "resolution_type": "pixel_area" if t.bucketing else "pixel",
        "caption_strategy": "textfile",
        # SimpleTuner refuses max_train_steps together with a non-zero epoch count (§3)
        "num_train_epochs": 0 if t.max_train_steps else plan.steps.epochs,
        "max_train_steps": t.max_train_steps,
        "checkpoint_step_interval": _steps_every(plan, plan.checkpoints.every_n_epochs),
        "checkpoints_total_limit": plan.checkpoints.keep_last,
        "resume_from_checkpoint": "latest",
        "mixed_precision": t.mixed_precision,
        "base_model_precision": QUANTISED[t.base_precision][0] if t.base_precision in QUANTISED else "no_change",
        "quantize_via": None,
        "gradient_checkpointing": t.gradient_checkpointing,
        "seed": t.seed,
        "train_text_encoder": t.train_text_encoder if plan.model.family in TEXT_ENCODER_FAMILIES else None,
        "report_to": "simpletuner",
        "disable_benchmark": True,
        "validation_disable": not plan.samples.prompts,
    }
    if t.base_precision in QUANTISED:
        on_gpu = plan.device.kind == "gpu" and plan.device.memory_gb > QUANTISE_ON_GPU_ABOVE_GB
        config["quantize_via"] = "accelerator" if on_gpu else "cpu"
    if plan.samples.prompts:
        config.update(
            {
                "validation_prompt": plan.samples.prompts[0],
                "validation_step_interval": _steps_every(
                    plan, plan.samples.every_n_epochs or plan.checkpoints.every_n_epochs
                ),
                "validation_resolution": f"{t.resolution}x{t.resolution}",
                "validation_num_inference_steps": plan.samples.steps,
                "validation_seed": plan.samples.seed,
            }
        )
    # null means "SimpleTuner's default"; leaving the key out says the same and keeps the file short
    config = {k: v for k, v in config.items() if v is not None}

    cache_dir = output_dir / "cache"
    pictures: dict[str, Any] = {
        "id": DATASET_ID,
        "type": "local",
        "dataset_type": "image",
        "instance_data_dir": plan.dataset.path,
        "caption_strategy": "textfile",
        "resolution": t.resolution,
        "resolution_type": "pixel_area" if t.bucketing else "pixel",
        "crop": not t.bucketing,
        # SimpleTuner's repeats count the extra showings: lorabuild's N is its N-1 (§6)
        "repeats": max(0, plan.dataset.repeats - 1),
        "cache_dir_vae": str(cache_dir / "vae" / family / DATASET_ID),
        "text_embeds": TEXT_EMBEDS_ID,
    }
    if not t.bucketing:
        pictures.update({"crop_style": "center", "crop_aspect": "square"})
    text_embeds = {
        "id": TEXT_EMBEDS_ID,
        "type": "local",
        "dataset_type": "text_embeds",
        "default": True,
        "cache_dir": str(cache_dir / "text" / family),
    }
    return config, [pictures, text_embeds]


def _training_output(plan: Plan) -> Path:
    return Path(plan.run_dir) / "checkpoints"


def render_config(plan: Plan) -> dict[str, str]:
    # Written for the real training, so a person can run these two files by hand as they are.
    config, datasets = _documents(plan, _training_output(plan), Path(plan.run_dir) / "backend" / DATASETS_FILE)
    return {CONFIG_FILE: _json(config), DATASETS_FILE: _json(datasets)}


# Plain-language lines for SimpleTuner's own keys; keys that are glossary terms use the glossary.
_TERM_OF: dict[str, str] = {
    "model_family": "family",
    "pretrained_model_name_or_path": "base_model",
    "lora_rank": "rank",
    "lora_alpha": "alpha",
    "lora_dropout": "network_dropout",
    "learning_rate": "learning_rate",
    "optimizer": "optimizer",
    "lr_scheduler": "lr_scheduler",
    "lr_warmup_steps": "lr_warmup_steps",
    "train_batch_size": "batch_size",
    "gradient_accumulation_steps": "gradient_accumulation",
    "resolution": "resolution",
    "num_train_epochs": "epochs",
    "max_train_steps": "max_train_steps",
    "checkpoints_total_limit": "keep_last",
    "mixed_precision": "mixed_precision",
    "base_model_precision": "base_precision",
    "gradient_checkpointing": "gradient_checkpointing",
    "seed": "seed",
    "train_text_encoder": "train_text_encoder",
    "instance_data_dir": "dataset",
}
_MEANINGS: dict[str, str] = {
    "model_type": "train a LoRA (a small add-on), not the whole model",
    "model_flavour": "which variant of the model family this is; SimpleTuner adjusts a few details to it",
    "pretrained_vae_model_name_or_path": "a separate image encoder (VAE) used instead of the model's own",
    "output_dir": "where SimpleTuner writes checkpoints and the finished LoRA",
    "data_backend_config": "the file that lists the training pictures for SimpleTuner",
    "lora_type": "the usual kind of LoRA (PEFT), saved in the diffusers format",
    "optimizer_config": "extra settings for the optimizer, as name=value pairs",
    "resolution_type": "pixel_area: pictures keep their shape, scaled to about resolution × resolution pixels; "
    "pixel: the shorter side is scaled to the resolution",
    "caption_strategy": "read each picture's caption from the .txt file beside it",
    "checkpoint_step_interval": "save a checkpoint every this many steps (lorabuild's every_n_epochs in steps)",
    "resume_from_checkpoint": "latest: continue from the newest checkpoint when started again; empty: start fresh",
    "quantize_via": "where the base model is shrunk to 8 or 4 bits at start-up: on the processor (less GPU "
    "memory, much more RAM) or on the GPU",
    "report_to": "also write each step's loss to training_metrics.jsonl, which lorabuild follows",
    "disable_benchmark": "skip the sample pictures of the untouched base model at start-up",
    "validation_disable": "true: no sample pictures during training; false: they are drawn as set below",
    "validation_prompt": "the prompt of the sample pictures drawn during training",
    "validation_step_interval": "draw sample pictures every this many steps",
    "validation_resolution": "size of the sample pictures",
    "validation_num_inference_steps": "denoising steps per sample picture",
    "validation_seed": "seed of the sample pictures, so they are comparable over time",
    "id": "the name of this entry in the dataset list",
    "type": "local: the files are on this machine",
    "dataset_type": "image: training pictures; text_embeds: where the prepared captions are kept",
    "crop": "cut pictures to a square instead of keeping their shape",
    "crop_style": "which part of a picture is kept when it is cut to a square",
    "crop_aspect": "the shape pictures are cut to",
    "repeats": "extra showings of each picture per epoch: SimpleTuner counts beyond the first, so "
    "lorabuild's repeats minus one",
    "cache_dir_vae": "where the prepared pictures are kept between runs",
    "cache_dir": "where the prepared captions are kept between runs",
    "default": "the caption store every picture set uses unless told otherwise",
    "text_embeds": "which caption store these pictures use",
}


def _meaning(key: str) -> str:
    return explain(_TERM_OF[key]) if key in _TERM_OF else _MEANINGS[key]


def _shown(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def describe_config(plan: Plan) -> list[ConfigLine]:
    files = render_config(plan)
    lines = [ConfigLine(CONFIG_FILE, k, _shown(v), _meaning(k)) for k, v in json.loads(files[CONFIG_FILE]).items()]
    for entry in json.loads(files[DATASETS_FILE]):
        for key, value in entry.items():
            lines.append(ConfigLine(DATASETS_FILE, f"{entry['id']}.{key}", _shown(value), _meaning(key)))
    return lines


# --- running -------------------------------------------------------------------------------------


def _site_packages_entries(python: str) -> list[Path]:
    exe = shutil.which(python)
    if exe is None:
        return []
    # not resolved: a venv's python is a link to the base interpreter, but its packages are in the venv
    prefix = Path(exe).absolute().parent.parent
    return sorted(prefix.glob("lib/python3*/site-packages/simpletuner/train.py"))


def _entry_candidates(plan: Plan) -> list[Path]:
    if plan.backend.path:
        root = Path(plan.backend.path)
        # the repository checkout, or its inner package folder
        return [root / "simpletuner" / "train.py", root / "train.py"]
    return _site_packages_entries(plan.backend.python)


def entry_point(plan: Plan) -> Path | None:
    """SimpleTuner's train.py: in the checkout at backend.path, else in its Python's packages."""
    candidates = _entry_candidates(plan)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return candidates[0] if candidates else None


def _accelerate(plan: Plan) -> list[str]:
    python = Path(plan.backend.python)
    beside = python.parent / "accelerate"
    if python.parent != Path() and beside.is_file():
        return [str(beside), "launch"]
    # a Python without the console script next to it (a system or conda Python) still has the module
    return [plan.backend.python, "-m", "accelerate.commands.launch"]


def newest_checkpoint(plan: Plan, output_dir: Path) -> Checkpoint | None:
    found = checkpoints(plan, output_dir)
    return found[-1] if found else None


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
    # config_dir holds Gate 2's copy; each run gets its own variant, rendered from the same plan.
    output_dir = output_dir.absolute()
    workspace = output_dir / WORKSPACE
    config, datasets = _documents(plan, output_dir, workspace / DATASETS_FILE)
    if max_steps is not None:
        config.update(
            {
                "max_train_steps": max_steps,
                "num_train_epochs": 0,
                "checkpoint_step_interval": max_steps + 1,  # no checkpoints in a dry run
                "resume_from_checkpoint": "",
                "validation_disable": True,
            }
        )
        for key in [k for k in config if k.startswith("validation_") and k != "validation_disable"]:
            del config[key]
    else:
        # "latest" would also pick a half-written checkpoint; name the newest complete one instead
        newest = newest_checkpoint(plan, output_dir) if resume else None
        config["resume_from_checkpoint"] = str(newest.path) if newest else ""
    if batch_size is not None:
        config["train_batch_size"] = batch_size
    if gradient_accumulation is not None:
        config["gradient_accumulation_steps"] = gradient_accumulation

    argv = [
        *_accelerate(plan),
        f"--mixed_precision={plan.training.mixed_precision}",
        f"--num_processes={plan.compute.gpu_count}",
        "--num_machines=1",
        "--dynamo_backend=no",
    ]
    if plan.compute.gpu_count > 1:
        argv.append("--multi_gpu")
    script = entry_point(plan)
    # not found among the files lorabuild looks at: let the backend's Python find the installed package
    argv += [str(script)] if script else ["--module", "simpletuner.train"]

    config_path = workspace / CONFIG_FILE
    env = {
        "PYTHONUNBUFFERED": "1",
        # the first of these that is set wins (§2): set both, so a stray setting cannot pick TOML
        "SIMPLETUNER_CONFIG_BACKEND": "json",
        "CONFIG_BACKEND": "json",
        "CONFIG_PATH": str(config_path),
        "SIMPLETUNER_DISABLE_COLORS": "1",  # colour codes would hide the log lines lorabuild reads
        "SIMPLETUNER_LOG_LEVEL": "INFO",  # the resume and step-count lines are INFO
    }
    if plan.backend.path and script is not None and script.parent.name == "simpletuner":
        # the checkout at backend.path is the SimpleTuner that runs, even if another is installed
        existing = os.environ.get("PYTHONPATH")
        env["PYTHONPATH"] = str(script.parent.parent.absolute()) + (os.pathsep + existing if existing else "")
    files = {config_path: _json(config), workspace / DATASETS_FILE: _json(datasets)}
    return Launch(argv=argv, cwd=workspace, env=env, files=files)


# --- reading its output ----------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# console: "[RANK 0] 2026-08-22 10:00:00,123 [INFO] message"; debug.log adds "(logger-name) "
_LOG_PREFIX = re.compile(
    r"^\[RANK \d+\]\s+\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(?:[,.]\d+)?\s+\[(?P<level>[A-Z]+)\]\s+(?:\([\w.\-]+\)\s+)?"
)
_RANK_START = re.compile(r"(?=\[RANK \d+\] )")
_BAR = re.compile(
    r"Epoch (?P<epoch>\d+)/(?P<epochs>\d+),? Steps:\s*\d+%\|[^|]*\|\s*(?P<step>\d+)/(?P<total>\d+)\s*"
    r"\[[^<\]]*<[^,\]]*,\s*(?P<rate>[\d.]+|\?)\s*(?P<unit>it/s|s/it)(?:,\s*(?P<postfix>[^\]]*))?\]"
)
_POSTFIX = re.compile(r"(\w+)=([^,\s]+)")
_NUM_EPOCHS = re.compile(r"Num Epochs = (\d+)")
_TOTAL_STEPS = re.compile(r"Total optimization steps = (\d+)")
_CALCULATED = re.compile(
    r"Calculated our maximum training steps at (\d+) because we have (\d+) epochs and (\d+) steps per epoch"
)
_RESUMING = re.compile(r"Resuming from checkpoint (?P<path>\S*?checkpoint-(?P<step>\d+))\b")
# Neither the reference nor the source quotes SimpleTuner's save line; any save line naming a
# complete checkpoint folder counts ("Saving current state to …/checkpoint-120", accelerate's wording).
_SAVED = re.compile(r"\b[Ss]av(?:ing|ed)\b.*?(?P<path>/\S*?checkpoint-(?P<step>\d+))(?![\w-])")
_UNWIND = re.compile(r"Exiting training loop\. Beginning model unwind at epoch (\d+)")

# (pattern, error kind, what it means) — reference §13; first match wins, so OOM comes before CUDA.
_ERRORS: tuple[tuple[re.Pattern[str], str, str], ...] = (
    (
        re.compile(r"CUDA out of memory|OutOfMemoryError|GPU ran out of memory"),
        "oom",
        "the graphics card ran out of memory",
    ),
    (
        re.compile(r"Signals\.SIGKILL|Signal 9 \(SIGKILL\)"),
        # not "oom": a smaller batch (the out-of-memory retry) does not help when RAM runs out
        "internal",
        "SimpleTuner was killed by the system, usually because the computer's main memory (RAM) ran out "
        "(shrinking Flux to 8 bits on the processor needs about 50 GB of RAM)",
    ),
    (
        re.compile(r"Non-finite training loss detected"),
        "nan",
        "the loss became NaN (not a number), so SimpleTuner stopped",
    ),
    (
        re.compile(
            r"Could not parse command line arguments|unrecognized arguments|the following arguments are required"
            r"|invalid choice:|invalid (?:int|float) value|When using --max_train_steps"
            r"|You must specify either --max_train_steps or --num_train_epochs|Optimizer \S+ not found"
            r"|is not using bf16 precision|JSON configuration file not found|Failed to parse JSON file"
            r"|Only one text embed backend can be marked as default|Model flavour \S+ not found"
            r"|requires model_flavour|Data backend config file .* not found|Must provide at least one data backend"
            r"|but no instance_prompt was provided"
        ),
        "config",
        "SimpleTuner rejected its settings",
    ),
    (
        re.compile(
            r"zero usable batches|produced no usable samples|No datasets are active"
            r"|No images were discovered by the bucket manager|Aspect buckets must be a list"
        ),
        "dataset",
        "SimpleTuner found no usable pictures",
    ),
    (re.compile(r"UnicodeDecodeError"), "caption", "a caption file is not UTF-8 text"),
    (
        re.compile(r"PytorchStreamReader failed reading zip archive|An error occurred while writing embeddings"),
        "internal",
        "a prepared-caption cache file is damaged: delete the cache folder in the output folder and run again",
    ),
    (
        re.compile(
            r"no file named model_index\.json|does not appear to have a file named|is not a valid model identifier"
            r"|Repository Not Found|RepositoryNotFoundError|HFValidationError|Error while deserializing header"
            r"|SafetensorError"
        ),
        "model_load",
        "the base model could not be loaded",
    ),
    (
        re.compile(
            r"CUDA error|no kernel image is available|CUDA driver version is insufficient|NCCL error"
            r"|Torch not compiled with CUDA enabled|Found no NVIDIA driver"
        ),
        "cuda",
        "CUDA (the graphics card's software) failed",
    ),
    (
        re.compile(
            r"^ModuleNotFoundError: No module named|can't open file .*train\.py|No such file or directory: .*train\.py"
        ),
        "not_installed",
        "SimpleTuner is not (fully) installed in its Python environment",
    ),
)
_OOM = re.compile(r"CUDA out of memory|OutOfMemoryError|GPU ran out of memory|CUDA error: out of memory")


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


@dataclass
class LogReader:
    """Turns SimpleTuner's console lines into events.

    The tqdm bar says which epoch each step belongs to, but no line says an epoch ended, so the
    reader remembers the epoch and its losses and reports an epoch when the next one starts (or
    training ends). The state starts over at each run's "Running training" banner.
    """

    epoch: int = 0
    epochs: int = 0
    step: int = 0
    losses: list[float] = field(default_factory=list)
    nan_reported: bool = False

    def reset(self) -> None:
        self.epoch, self.epochs, self.step, self.losses, self.nan_reported = 0, 0, 0, [], False

    def _close_epoch(self) -> list[Event]:
        if not self.epoch or not self.losses:
            return []
        finite = [x for x in self.losses if math.isfinite(x)]
        data: dict[str, Any] = {"epoch": self.epoch, "epochs": self.epochs, "step": self.step}
        if finite:
            data["mean_loss"] = round(sum(finite) / len(finite), 6)
        self.losses = []
        return [Event("epoch", data)]

    def feed(self, raw: str) -> list[Event]:
        # a log line written while the progress bar is drawn lands on the bar's line
        parts = _RANK_START.split(_ANSI.sub("", raw).strip())
        return [event for part in parts if part.strip() for event in self._line(part.strip())]

    def _line(self, line: str) -> list[Event]:
        prefix = _LOG_PREFIX.match(line)
        level = prefix.group("level") if prefix else None
        message = line[prefix.end() :] if prefix else line
        events: list[Event] = []

        bar = _BAR.search(message)
        if bar:
            return self._bar(bar)
        for pattern, kind, meaning in _ERRORS:
            if pattern.search(message):
                if kind == "nan":
                    self.nan_reported = True
                events.append(Event("error", {"kind": kind, "message": f"{meaning}: {message[:300]}"}))
                return events
        if "***** Running training *****" in message:
            self.reset()
            return [Event("model_loaded", {})]
        if match := _CALCULATED.search(message):
            total, epochs, per_epoch = (int(g) for g in match.groups())
            self.epochs = epochs
            return [Event("dataset", {"total_steps": total, "epochs": epochs, "steps_per_epoch": per_epoch})]
        if match := _NUM_EPOCHS.search(message):
            self.epochs = int(match.group(1))
            return []
        if match := _TOTAL_STEPS.search(message):
            data: dict[str, Any] = {"total_steps": int(match.group(1))}
            if self.epochs:
                data["epochs"] = self.epochs
            return [Event("dataset", data)]
        if match := _RESUMING.search(message):
            self.step = int(match.group("step"))
            return [Event("resumed", {"step": self.step, "checkpoint": match.group("path")})]
        if match := _SAVED.search(message):
            data = {"path": match.group("path"), "step": int(match.group("step"))}
            if self.epoch:
                data["epoch"] = self.epoch
            return [Event("checkpoint", data)]
        if "Training has completed." in message:
            return [*self._close_epoch(), Event("done", {"steps": self.step})]
        if _UNWIND.search(message):
            return self._close_epoch()
        if level == "WARNING":
            return [Event("warning", {"message": message})]
        return events

    def _bar(self, bar: re.Match[str]) -> list[Event]:
        postfix = dict(_POSTFIX.findall(bar.group("postfix") or ""))
        loss = _number(postfix.get("step_loss", ""))
        step = int(bar.group("step"))
        # the bar is drawn before the first step and again whenever its text changes: a step
        # counts once, and only with its loss
        if loss is None or step == 0 or step == self.step:
            return []
        events: list[Event] = []
        epoch, epochs = int(bar.group("epoch")), int(bar.group("epochs"))
        if epoch > self.epoch:
            events += self._close_epoch()
        self.epoch, self.epochs, self.step = epoch, epochs, step
        self.losses.append(loss)
        data: dict[str, Any] = {
            "step": step,
            "total_steps": int(bar.group("total")),
            "epoch": epoch,
            "epochs": epochs,
            "loss": loss,
        }
        lr = _number(postfix.get("lr", ""))
        if lr is not None:
            data["lr"] = lr
        rate = _number(bar.group("rate"))
        if rate:
            data["step_seconds"] = round(rate if bar.group("unit") == "s/it" else 1 / rate, 4)
        events.append(Event("step", data))
        if not math.isfinite(loss) and not self.nan_reported:
            # SimpleTuner stops on a non-finite loss itself; say so at the first one it shows
            self.nan_reported = True
            events.append(
                Event("error", {"kind": "nan", "message": f"the loss became {loss} (not a number) at step {step}"})
            )
        return events


_reader = LogReader()


def parse_log_line(line: str) -> list[Event]:
    return _reader.feed(line)


def metrics_files(plan: Plan, output_dir: Path) -> list[Path]:
    return [output_dir / METRICS_FILE]


def parse_metrics_line(path: Path, line: str) -> list[Event]:
    # {"metrics": {"train_loss": …, "learning_rate": …, "epoch": …}, "schema_version": 1, "step": N, …} (§11)
    try:
        record = json.loads(line)
    except ValueError:
        return []
    if not isinstance(record, dict) or not isinstance(record.get("metrics"), dict):
        return []
    metrics, step = record["metrics"], record.get("step")
    loss = metrics.get("train_loss", metrics.get("optimization_loss"))
    if not isinstance(step, int) or not isinstance(loss, (int, float)):
        return []
    data: dict[str, Any] = {"step": step, "loss": float(loss)}
    if isinstance(metrics.get("learning_rate"), (int, float)):
        data["lr"] = float(metrics["learning_rate"])
    if isinstance(metrics.get("epoch"), (int, float)):
        data["epoch"] = int(metrics["epoch"])
    events = [Event("step", data)]
    if not math.isfinite(float(loss)):
        events.append(
            Event("error", {"kind": "nan", "message": f"the loss became {loss} (not a number) at step {step}"})
        )
    return events


def is_out_of_memory(text: str) -> bool:
    return bool(_OOM.search(text))


# --- checkpoints and the result ----------------------------------------------------------------------

_CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
_CHECKPOINT_TMP = re.compile(r"checkpoint-\d+-tmp")  # written there first, renamed when complete (§8)


def _checkpoint_dirs(output_dir: Path) -> list[tuple[int, Path]]:
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = _CHECKPOINT_NAME.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def _complete(path: Path, guarded: bool) -> bool:
    has_state = any(path.glob("training_state*.json"))
    if not ((path / LORA_FILE).is_file() and has_state):
        return False
    # SimpleTuner versions that write the guard write it last; older ones never write it
    return (path / GUARD_FILE).is_file() or not guarded


def checkpoints(plan: Plan, output_dir: Path) -> list[Checkpoint]:
    entries = _checkpoint_dirs(output_dir)
    guarded = any((path / GUARD_FILE).is_file() for _, path in entries)
    per_epoch = plan.steps.steps_per_epoch
    found = []
    for step, path in entries:
        if _complete(path, guarded):
            epoch = math.ceil(step / per_epoch) if per_epoch else 0
            found.append(Checkpoint(path=path, step=step, epoch=epoch, lora=path / LORA_FILE))
    return found


def final_lora(plan: Plan, output_dir: Path) -> Path:
    return output_dir / LORA_FILE


def prune_checkpoints(plan: Plan, output_dir: Path) -> list[Path]:
    # SimpleTuner keeps checkpoints_total_limit itself; this also clears what a crash left half-written
    complete = {c.path for c in checkpoints(plan, output_dir)}
    keep = set(sorted(complete, key=lambda p: int(p.name.split("-")[1]))[-plan.checkpoints.keep_last :])
    removed: list[Path] = []
    if output_dir.is_dir():
        for path in sorted(output_dir.iterdir()):
            ours = _CHECKPOINT_NAME.fullmatch(path.name) or _CHECKPOINT_TMP.fullmatch(path.name)
            if ours and path.is_dir() and path not in keep:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


# --- installation ------------------------------------------------------------------------------------

_VERSION = re.compile(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", re.M)


def _version(script: Path) -> str | None:
    try:
        text = (script.parent / "__init__.py").read_text(encoding="utf-8")
    except OSError:
        return None
    match = _VERSION.search(text)
    return match.group(1) if match else None


def install_commands(plan: Plan) -> list[list[str]]:
    """Clone, make a Python 3.12 venv, install SimpleTuner: on a remote machine where it is missing."""
    where = plan.backend.path or "~/SimpleTuner"
    script = (
        'set -e; [ -d "$1/.git" ] || git clone --depth 1 "$2" "$1"; '
        '[ -x "$1/.venv/bin/python" ] || python3.12 -m venv "$1/.venv"; '
        'cd "$1" && "$1/.venv/bin/pip" install --quiet -e .'
    )
    return [["sh", "-c", script, "install-simpletuner", where, INSTALL_URL]]


def remote_entry_point(plan: Plan) -> str | None:
    return f"{plan.backend.path or '~/SimpleTuner'}/simpletuner/train.py"


def _install_fix(plan: Plan) -> str:
    where = plan.backend.path or "~/SimpleTuner"
    return (
        f"git clone {INSTALL_URL} {where} && cd {where} && python3.12 -m venv .venv && "
        ".venv/bin/pip install -e . — then set `backend.path` to that folder "
        "(SimpleTuner needs Python 3.12 or 3.13)"
    )


def installation(plan: Plan) -> Installation:
    python = plan.backend.python
    if "/" in python and not Path(python).exists():
        return Installation(
            False,
            f"SimpleTuner's Python was not found at {python}",
            "set `backend.python` to the python of SimpleTuner's environment, or create it: " + _install_fix(plan),
        )
    script = entry_point(plan)
    if script is None or not script.is_file():
        where = f"at {plan.backend.path}" if plan.backend.path else f"in the packages of {python}"
        return Installation(
            False,
            f"SimpleTuner was not found {where} (lorabuild looks for simpletuner/train.py)",
            _install_fix(plan),
        )
    version = _version(script)
    shown = f"SimpleTuner {version}" if version else "SimpleTuner (version unknown)"
    return Installation(True, f"{shown} at {script.parent}", version=version, entry_point=str(script))


def probe_command(plan: Plan) -> list[str]:
    modules = ["simpletuner", "accelerate", "diffusers", "peft"]
    # the optional packages this plan's optimizer and base precision need
    optional = [OPTIMIZERS.get(plan.training.optimizer, ("", None))[1]]
    if plan.training.base_precision in QUANTISED:
        optional.append(QUANTISED[plan.training.base_precision][1])
    modules += [m for m in dict.fromkeys(optional) if m and m not in modules]
    return [plan.backend.python, "-c", PROBE_SOURCE, *modules]


def new_log_reader() -> Callable[[str], list[Event]]:
    """A reader with its own state, for a log of a run lorabuild did not launch."""
    return LogReader().feed
