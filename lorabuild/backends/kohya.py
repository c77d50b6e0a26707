"""The kohya backend: kohya-ss sd-scripts (`train_network.py`, `sdxl_train_network.py`, `flux_train_network.py`).

Owns everything lorabuild knows about sd-scripts: `config.toml` (the script's argparse options,
read with `--config_file`) and `dataset.toml` (the strict general/datasets/subsets schema)
rendered from a Plan; the cross-field rules sd-scripts checks late, or never; the `accelerate
launch` command line with its dry-run, resume and out-of-memory variants; reading its console
output (tqdm bars, epoch lines, save lines and its exact failure messages) into events; and its
checkpoint and state-folder naming for resume and retention. Every key it may write, with its
type, is listed in `data/kohya_args.json`. The facts come from reference/kohya.md (sd-scripts
v0.10.1); the README tells artists where lorabuild expects the checkout.
"""

from __future__ import annotations

import ast
import json
import math
import re
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorabuild.backends import Checkpoint, ConfigLine, Event, Installation, Launch
from lorabuild.glossary import explain
from lorabuild.probe import PROBE_SOURCE

if TYPE_CHECKING:
    from lorabuild.plan import Issue, Plan

FAMILIES = ("sd15", "sdxl", "pony", "flux")
SCRIPTS: dict[str, str] = {
    "sd15": "train_network.py",
    "sdxl": "sdxl_train_network.py",
    "pony": "sdxl_train_network.py",
    "flux": "flux_train_network.py",
}
# Which model families each backend trains, for the advice when a family is not supported here.
FAMILY_SUPPORT: dict[str, tuple[str, ...]] = {
    "builtin": ("sd15",),
    "kohya": FAMILIES,
    "simpletuner": ("sd15", "sdxl", "pony", "flux"),
    "ai-toolkit": ("sd15", "sdxl", "pony", "flux"),
}
OPTIMIZER_TYPES: dict[str, str] = {
    "adamw": "AdamW",
    "adamw8bit": "AdamW8bit",
    "lion": "Lion",
    "prodigy": "Prodigy",
    "adafactor": "Adafactor",
}
# reference/kohya.md §6: Adafactor defaults to relative_step=True, which ignores the learning rate
# and forces its own schedule; Prodigy wants these settings for diffusion models.
OPTIMIZER_DEFAULT_ARGS: dict[str, dict[str, str | int | float | bool]] = {
    "adafactor": {"scale_parameter": False, "relative_step": False, "warmup_init": False},
    "prodigy": {
        "decouple": True,
        "weight_decay": 0.01,
        "d_coef": 1.0,
        "use_bias_correction": True,
        "safeguard_warmup": True,
        "betas": "0.9,0.99",
    },
}
# Python modules an optimizer needs in sd-scripts' environment (checked by Gate 3's probe).
OPTIMIZER_MODULES: dict[str, str] = {"adamw8bit": "bitsandbytes", "lion": "lion_pytorch", "prodigy": "prodigyopt"}
# bucket_reso_steps must divide by 64 for SD 1.x and by 32 for SDXL and Flux (reference §5).
BUCKET_STEPS: dict[str, int] = {"sd15": 64, "sdxl": 32, "pony": 32, "flux": 32}
# Flux needs its text encoders and autoencoder as separate files; the spec has no fields for them
# yet, so they are expected next to the model under the names the sd-scripts docs use.
FLUX_FILES: dict[str, str] = {"clip_l": "clip_l.safetensors", "t5xxl": "t5xxl_fp16.safetensors", "ae": "ae.safetensors"}

CONFIG_FILE = "config.toml"
DATASET_FILE = "dataset.toml"
PROMPTS_FILE = "prompts.txt"
SAMPLER = "euler_a"
LOADER_WORKERS = 2  # reference §3: fewer workers, less host memory; pictures are cached anyway

# Training settings (TrainingPlan fields) this backend honours for every family.
COMMON_SETTINGS = (
    "learning_rate",
    "text_encoder_lr",
    "train_text_encoder",
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
    "save_precision",
    "gradient_checkpointing",
    "cache_latents",
    "seed",
    "flip_aug",
    "shuffle_caption",
    "keep_tokens",
    "network_dropout",
    "bucketing",
)

INSTALL_FIX = (
    "install it: git clone https://github.com/kohya-ss/sd-scripts ~/sd-scripts && cd ~/sd-scripts && "
    "python3 -m venv venv && venv/bin/pip install torch torchvision --index-url "
    "https://download.pytorch.org/whl/cu128 && venv/bin/pip install -r requirements.txt — then set "
    "`backend: {name: kohya, path: ~/sd-scripts}` in the spec"
)

_OOM = re.compile(
    r"OutOfMemoryError|CUDA out of memory|CUDA error: out of memory|DefaultCPUAllocator: can't allocate memory"
)


@lru_cache(maxsize=1)
def key_list() -> dict[str, Any]:
    """data/kohya_args.json: every key sd-scripts accepts in its two TOML files, with types."""
    with open(Path(__file__).parent / "data" / "kohya_args.json", encoding="utf-8") as handle:
        data: dict[str, Any] = json.load(handle)
    return data


# --- planning ---------------------------------------------------------------------------------


def adjust_settings(training: dict[str, Any], *, on_cpu: bool) -> list[tuple[str, Any, str]]:
    # on_cpu is ignored: sd-scripts trains on an NVIDIA GPU only, so the settings are planned for
    # the GPU it will run on (Gate 3 stops a run on a machine without one).
    changes: list[tuple[str, Any, str]] = []
    mixed = training["mixed_precision"]
    base = training["base_precision"]
    if base not in ("fp8", "nf4"):
        follows = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}[mixed]
        if base != follows:
            changes.append(
                (
                    "base_precision",
                    follows,
                    f"kohya keeps the base model in the mixed-precision format ({follows}); "
                    "only an 8-bit base (`base_precision: fp8`) is a separate choice",
                )
            )
    if training["cache_text_encoder_outputs"]:
        if training["train_text_encoder"]:
            changes.append(
                (
                    "cache_text_encoder_outputs",
                    False,
                    "the caption reader is being trained, so kohya cannot read each caption once and keep "
                    "the result: that caching is off",
                )
            )
        elif training["shuffle_caption"]:
            changes.append(
                (
                    "cache_text_encoder_outputs",
                    False,
                    "caption tags are shuffled, so every caption must be read afresh each step: caching the "
                    "caption reader's output is off",
                )
            )
    if training["lr_scheduler"] == "constant" and training["lr_warmup_steps"]:
        changes.append(
            (
                "lr_warmup_steps",
                0,
                "kohya's constant learning-rate schedule has no warm-up (it refuses one), so the warm-up is 0; "
                "use `lr_scheduler: constant_with_warmup` to keep a warm-up",
            )
        )
    return changes


def check_plan(plan: Plan) -> list[Issue]:
    from lorabuild.plan import Issue

    issues: list[Issue] = []
    family, t, model = plan.model.family, plan.training, plan.model
    if family not in FAMILIES:
        others = [name for name, fams in FAMILY_SUPPORT.items() if family in fams and name != "kohya"]
        issues.append(
            Issue(
                kind="backend",
                field=("base_model", "family"),
                message=f"kohya-ss sd-scripts cannot train {family} models",
                fix=f"use {' or '.join(f'`backend: {o}`' for o in others)}" if others else "choose another model",
            )
        )
    if t.optimizer not in OPTIMIZER_TYPES:
        issues.append(
            Issue(
                kind="backend",
                field=("training", "optimizer"),
                message=f"lorabuild does not know kohya's name for the {t.optimizer} optimizer",
                fix=f"use one of {', '.join(OPTIMIZER_TYPES)}",
            )
        )
    if model.kind == "demo":
        issues.append(
            Issue(
                kind="backend",
                field=("base_model", "demo"),
                message="the demo model is lorabuild's own tiny model; kohya-ss sd-scripts cannot load it",
                fix="use `backend: builtin` for the demo model, or point `base_model.path` at a real model file",
            )
        )
    elif model.kind == "folder" or (family == "flux" and model.kind == "diffusers"):
        what = "the Flux model file (flux1-dev.safetensors)" if family == "flux" else "the .safetensors model file"
        issues.append(
            Issue(
                kind="backend",
                field=("base_model", "path"),
                message=f"kohya-ss sd-scripts cannot load {model.path} as a {family} model: it reads single "
                "model files" + ("" if family == "flux" else " or diffusers folders (with a model_index.json)"),
                fix=f"point `base_model.path` at {what}",
            )
        )
    elif Path(model.path).suffix.lower() == ".gguf":
        issues.append(
            Issue(
                kind="backend",
                field=("base_model", "path"),
                message="kohya-ss sd-scripts cannot read .gguf model files",
                fix="download the .safetensors version of the model",
            )
        )
    if t.base_precision == "nf4":
        issues.append(
            Issue(
                kind="backend",
                field=("training", "base_precision"),
                message="kohya-ss sd-scripts has no 4-bit (nf4) base model for LoRA training",
                fix="use `base_precision: fp8` (8-bit) to save memory, or remove it",
            )
        )
    if t.base_precision == "fp8" and t.mixed_precision == "no":
        issues.append(
            Issue(
                kind="backend",
                field=("training", "mixed_precision"),
                message="an 8-bit base model (fp8) needs mixed precision fp16 or bf16 in kohya",
                fix="set `mixed_precision: bf16` (or fp16 on graphics cards older than RTX 30xx)",
            )
        )
    if t.train_text_encoder and t.text_encoder_lr <= 0 and t.optimizer != "prodigy":
        issues.append(
            Issue(
                kind="backend",
                field=("training", "text_encoder_lr"),
                message="`train_text_encoder` is on but `text_encoder_lr` is 0, so the caption reader would not learn",
                fix="set `text_encoder_lr` to about a tenth of the learning rate (e.g. 1.0e-5), "
                "or set `train_text_encoder: false`",
            )
        )
    for key, value in t.optimizer_args.items():
        text = _literal(value)
        if not key.isidentifier() or "=" in text:
            issues.append(
                Issue(
                    kind="backend",
                    field=("training", "optimizer_args", key),
                    message=f"kohya cannot pass the optimizer setting `{key}: {value}`: it splits each setting "
                    "at `=`, so names must be plain words and values may not contain `=`",
                    fix="remove that setting or write its value without `=`",
                )
            )
    return issues


def settings(plan: Plan) -> tuple[str, ...]:
    family = plan.model.family
    extra: tuple[str, ...] = ()
    if family == "sd15":
        # train_network.py has no text-encoder caching; clip_skip only works for SD 1.x
        extra = ("noise_offset", "min_snr_gamma", "clip_skip")
    elif family in ("sdxl", "pony"):
        extra = ("noise_offset", "min_snr_gamma", "cache_text_encoder_outputs")
    elif family == "flux":
        # flux_train_network.py adds plain noise and returns the loss unweighted: no noise offset, no min-SNR
        extra = ("cache_text_encoder_outputs",)
    return COMMON_SETTINGS + extra


# --- rendering --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Where:
    """Where one set of config files lives and points to, and the overrides of a variant."""

    config_dir: Path
    output_dir: Path
    dataset_file: Path
    max_steps: int | None = None
    batch_size: int | None = None
    accumulation: int | None = None


def _rendered_where(plan: Plan) -> _Where:
    """The files render_config writes: in the run folder's backend/, training into checkpoints/."""
    run = Path(plan.run_dir)
    return _Where(run / "backend", run / "checkpoints", run / "backend" / DATASET_FILE)


def _literal(value: str | int | float | bool) -> str:
    """An optimizer argument as the Python literal kohya parses with ast.literal_eval (§6)."""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, int | float):
        return repr(value)
    if value.strip().lower() in ("true", "false"):
        return "True" if value.strip().lower() == "true" else "False"
    try:
        ast.literal_eval(value)  # numbers and tuples such as "0.9,0.99" pass through as written
        return value
    except (ValueError, SyntaxError):
        return repr(value)  # anything else is a string, which must be quoted


def optimizer_args(plan: Plan) -> dict[str, str | int | float | bool]:
    """kohya's defaults for the optimizer, overridden by the spec's own `optimizer_args`."""
    return {**OPTIMIZER_DEFAULT_ARGS.get(plan.training.optimizer, {}), **plan.training.optimizer_args}


def _learning_rates(plan: Plan) -> tuple[float, float]:
    """(image model, caption reader) learning rates: Prodigy adapts one step size for all groups."""
    t = plan.training
    if t.optimizer == "prodigy":
        return float(t.learning_rate), float(t.learning_rate)
    return float(t.learning_rate), float(t.text_encoder_lr)


def _model_files(plan: Plan) -> dict[str, str]:
    model = Path(plan.model.path)
    files = {"pretrained_model_name_or_path": str(model)}
    if plan.model.family == "flux":
        for key, name in FLUX_FILES.items():
            files[key] = str(model.parent / name)
        if plan.model.vae:
            files["ae"] = plan.model.vae
    elif plan.model.vae:
        files["vae"] = plan.model.vae
    return files


def _config(plan: Plan, where: _Where) -> dict[str, dict[str, Any]]:
    """config.toml as sections (names only group keys for people: sd-scripts flattens them)."""
    t, family = plan.training, plan.model.family
    dry = where.max_steps is not None
    unet_lr, te_lr = _learning_rates(plan)
    model: dict[str, Any] = _model_files(plan)
    if family in ("sdxl", "pony"):
        model["no_half_vae"] = t.mixed_precision == "fp16"  # the SDXL VAE turns NaN in fp16
    model["fp8_base"] = t.base_precision == "fp8"

    network: dict[str, Any] = {
        "network_module": "networks.lora_flux" if family == "flux" else "networks.lora",
        "network_dim": int(t.rank),
        "network_alpha": float(t.alpha),
        "network_train_unet_only": not t.train_text_encoder,
    }
    if t.network_dropout > 0:
        network["network_dropout"] = float(t.network_dropout)

    optimizer: dict[str, Any] = {"optimizer_type": OPTIMIZER_TYPES.get(t.optimizer, t.optimizer)}
    args = optimizer_args(plan)
    if args:
        optimizer["optimizer_args"] = [f"{k}={_literal(v)}" for k, v in args.items()]
    optimizer["learning_rate"] = float(t.learning_rate)
    optimizer["unet_lr"] = unet_lr
    if t.train_text_encoder:
        optimizer["text_encoder_lr"] = [te_lr]  # with networks.lora only the first value is used
    optimizer["lr_scheduler"] = t.lr_scheduler
    # an int is a number of steps (a float would be a ratio of the run); constant allows no warm-up
    optimizer["lr_warmup_steps"] = 0 if t.lr_scheduler == "constant" else int(t.lr_warmup_steps)

    training: dict[str, Any] = {}
    if dry:
        training["max_train_steps"] = int(where.max_steps or 0)  # max_train_epochs would override it
    elif t.max_train_steps is not None:
        training["max_train_steps"] = int(t.max_train_steps)
    else:
        training["max_train_epochs"] = int(plan.steps.epochs)
    training["gradient_accumulation_steps"] = int(where.accumulation or t.gradient_accumulation)
    training["mixed_precision"] = t.mixed_precision
    training["save_precision"] = "float" if t.save_precision == "fp32" else t.save_precision
    training["gradient_checkpointing"] = bool(t.gradient_checkpointing)
    training["cache_latents"] = bool(t.cache_latents)
    if family != "sd15":
        training["cache_text_encoder_outputs"] = bool(t.cache_text_encoder_outputs)
    if family != "flux":
        training["sdpa"] = True
        if t.noise_offset > 0:
            training["noise_offset"] = float(t.noise_offset)
        if t.min_snr_gamma > 0:
            training["min_snr_gamma"] = float(t.min_snr_gamma)
    if family == "sd15":
        training["clip_skip"] = int(t.clip_skip)
    if family == "flux":
        # the sd-scripts docs' Flux LoRA recipe (reference §3)
        training["guidance_scale"] = 1.0
        training["timestep_sampling"] = "flux_shift"
        training["model_prediction_type"] = "raw"
    training["seed"] = int(t.seed)
    training["max_data_loader_n_workers"] = LOADER_WORKERS
    training["persistent_data_loader_workers"] = True

    dataset = {"dataset_config": str(where.dataset_file), "resolution": f"{t.resolution},{t.resolution}"}

    saving: dict[str, Any] = {
        "output_dir": str(where.output_dir),
        "output_name": plan.name,
        "save_model_as": "safetensors",
    }
    if not dry:
        keep = int(plan.checkpoints.keep_last)
        saving["save_every_n_epochs"] = int(plan.checkpoints.every_n_epochs)
        saving["save_last_n_epochs"] = keep
        saving["save_state"] = True  # resume needs the optimizer state (reference §7)
        saving["save_last_n_epochs_state"] = keep

    logging = {
        "logging_dir": str(where.output_dir / "logs"),
        "log_with": "tensorboard",
        "console_log_simple": True,  # one plain line per message, instead of Rich's wrapped columns
    }
    sections = {
        "model": model,
        "network": network,
        "optimizer": optimizer,
        "training": training,
        "dataset": dataset,
        "saving": saving,
        "logging": logging,
    }
    if plan.samples.prompts and not dry:
        sections["sampling"] = {
            "sample_prompts": str(where.config_dir / PROMPTS_FILE),
            "sample_every_n_epochs": int(plan.samples.every_n_epochs or plan.checkpoints.every_n_epochs),
            "sample_sampler": SAMPLER,
        }
    return sections


def bucket_range(plan: Plan) -> tuple[int, int]:
    """Smallest and largest bucket side: half to twice the resolution, in bucket steps."""
    step = BUCKET_STEPS.get(plan.model.family, 64)
    res = plan.training.resolution
    low = max(step, (res // 2) // step * step)
    high = max(res, 2 * res // step * step)
    return min(low, res), high


def _dataset(plan: Plan, where: _Where) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """dataset.toml's [general], its one [[datasets]] and that dataset's one [[datasets.subsets]]."""
    t = plan.training
    general: dict[str, Any] = {
        "caption_extension": plan.dataset.caption_extension,
        "shuffle_caption": bool(t.shuffle_caption),
        "keep_tokens": int(t.keep_tokens),
        "flip_aug": bool(t.flip_aug),
    }
    low, high = bucket_range(plan)
    dataset: dict[str, Any] = {
        "resolution": [int(t.resolution), int(t.resolution)],
        "batch_size": int(where.batch_size or t.batch_size),
        "enable_bucket": bool(t.bucketing),
        "min_bucket_reso": low,
        "max_bucket_reso": high,
        "bucket_reso_steps": BUCKET_STEPS.get(plan.model.family, 64),
    }
    subset: dict[str, Any] = {"image_dir": plan.dataset.path, "num_repeats": int(plan.dataset.repeats)}
    return general, dataset, subset


def _header(plan: Plan, what: str) -> str:
    return (
        f"# {what} for the kohya-ss sd-scripts training `{plan.name}`, written by lorabuild from\n"
        f"# {plan.spec_path}. Change the spec, not this file: lorabuild rewrites it.\n\n"
    )


def _config_text(plan: Plan, where: _Where) -> str:
    import tomli_w

    return _header(plan, "Training config") + tomli_w.dumps(_config(plan, where))


def _dataset_text(plan: Plan, where: _Where) -> str:
    import tomli_w

    general, dataset, subset = _dataset(plan, where)

    def body(table: dict[str, Any], indent: str = "") -> str:
        return "".join(indent + line + "\n" for line in tomli_w.dumps(table).splitlines() if line)

    # written as [[datasets.subsets]] tables, the form sd-scripts documents (tomli_w would inline them)
    return (
        _header(plan, "Dataset")
        + "[general]\n"
        + body(general)
        + "\n[[datasets]]\n"
        + body(dataset)
        + "\n  [[datasets.subsets]]\n"
        + body(subset, "  ")
    )


def _prompts_text(plan: Plan) -> str:
    size = plan.training.resolution
    s = plan.samples
    # sd-scripts' prompt-file options: --w/--h size, --s steps, --d seed
    return "".join(f"{p.strip()} --w {size} --h {size} --s {s.steps} --d {s.seed}\n" for p in s.prompts)


def render_config(plan: Plan) -> dict[str, str]:
    where = _rendered_where(plan)
    files = {CONFIG_FILE: _config_text(plan, where), DATASET_FILE: _dataset_text(plan, where)}
    if plan.samples.prompts:
        files[PROMPTS_FILE] = _prompts_text(plan)
    return files


def config_values(plan: Plan) -> tuple[dict[str, Any], dict[str, Any]]:
    """The rendered files' keys and values: config.toml flattened (as sd-scripts reads it), and
    dataset.toml by `section.key` (general., datasets., datasets.subsets.)."""
    where = _rendered_where(plan)
    flat = {k: v for section in _config(plan, where).values() for k, v in section.items()}
    general, dataset, subset = _dataset(plan, where)
    tables = {
        **{f"general.{k}": v for k, v in general.items()},
        **{f"datasets.{k}": v for k, v in dataset.items()},
        **{f"datasets.subsets.{k}": v for k, v in subset.items()},
    }
    return flat, tables


# --- describing -------------------------------------------------------------------------------

# Keys that are concepts the glossary explains.
GLOSSARY_KEYS: dict[str, str] = {
    "pretrained_model_name_or_path": "base_model",
    "network_dim": "rank",
    "network_alpha": "alpha",
    "network_dropout": "network_dropout",
    "learning_rate": "learning_rate",
    "text_encoder_lr": "text_encoder_lr",
    "optimizer_type": "optimizer",
    "optimizer_args": "optimizer_args",
    "lr_scheduler": "lr_scheduler",
    "lr_warmup_steps": "lr_warmup_steps",
    "max_train_epochs": "epochs",
    "max_train_steps": "max_train_steps",
    "gradient_accumulation_steps": "gradient_accumulation",
    "mixed_precision": "mixed_precision",
    "save_precision": "save_precision",
    "gradient_checkpointing": "gradient_checkpointing",
    "cache_latents": "cache_latents",
    "cache_text_encoder_outputs": "cache_text_encoder_outputs",
    "seed": "seed",
    "noise_offset": "noise_offset",
    "min_snr_gamma": "min_snr_gamma",
    "clip_skip": "clip_skip",
    "resolution": "resolution",
    "save_every_n_epochs": "every_n_epochs",
    "save_last_n_epochs": "keep_last",
    "general.caption_extension": "caption",
    "general.shuffle_caption": "shuffle_caption",
    "general.keep_tokens": "keep_tokens",
    "general.flip_aug": "flip_aug",
    "datasets.resolution": "resolution",
    "datasets.batch_size": "batch_size",
    "datasets.enable_bucket": "bucketing",
    "datasets.subsets.image_dir": "dataset",
    "datasets.subsets.num_repeats": "repeats",
}
# Keys only kohya has: their meaning is part of knowing its format.
MEANINGS: dict[str, str] = {
    "vae": "a separate image encoder/decoder (VAE) file, used instead of the one inside the base model",
    "clip_l": f"Flux's first caption reader (CLIP-L), expected as {FLUX_FILES['clip_l']} next to the model",
    "t5xxl": f"Flux's large caption reader (T5-XXL), expected as {FLUX_FILES['t5xxl']} next to the model",
    "ae": f"Flux's image encoder/decoder, `base_model.vae` or {FLUX_FILES['ae']} next to the model",
    "no_half_vae": "keep SDXL's image decoder in full precision: in fp16 it produces NaN (broken) results",
    "fp8_base": "keep the frozen base model in 8-bit numbers to save memory; the LoRA still trains in 16/32-bit",
    "network_module": "the kind of add-on kohya trains: a LoRA (networks.lora, or networks.lora_flux for Flux)",
    "network_train_unet_only": "train only the image model, not the caption reader (on unless train_text_encoder)",
    "unet_lr": "learning rate of the image model itself: the learning rate above",
    "sdpa": "use PyTorch's built-in memory-efficient attention: faster, less memory",
    "guidance_scale": "guidance value shown to Flux dev while training; 1.0 is the sd-scripts docs' LoRA recipe",
    "timestep_sampling": "how noise levels are picked each step; flux_shift adapts them to the picture size",
    "model_prediction_type": "how Flux's prediction is compared with the target; raw is the docs' LoRA recipe",
    "max_data_loader_n_workers": "helper processes that load pictures in the background",
    "persistent_data_loader_workers": "keep those helpers between epochs instead of restarting them",
    "dataset_config": "the dataset file (dataset.toml): pictures, captions, batch size and buckets",
    "output_dir": "the folder kohya writes its checkpoints and the finished LoRA into",
    "output_name": "file name of the finished LoRA; checkpoints add the epoch, e.g. -000005 for epoch 5",
    "save_model_as": "file format of the LoRA: safetensors, the safe standard",
    "save_state": "save the optimizer's state with each checkpoint, so a stopped run resumes exactly where it was",
    "save_last_n_epochs_state": "how many of those resume states kohya keeps",
    "logging_dir": "where kohya writes TensorBoard logs: loss and learning-rate curves",
    "log_with": "the program that reads those logs: TensorBoard",
    "console_log_simple": "plain one-line messages, so lorabuild can follow kohya's progress",
    "sample_prompts": "the file of prompts for sample pictures made during training",
    "sample_every_n_epochs": "make sample pictures after every this many epochs",
    "sample_sampler": "the sampling method used for sample pictures",
    "datasets.min_bucket_reso": "the shortest picture side a bucket may have, in pixels",
    "datasets.max_bucket_reso": "the longest picture side a bucket may have, in pixels",
    "datasets.bucket_reso_steps": "bucket sides grow in steps of this many pixels (64 for SD 1.5, 32 for SDXL, Flux)",
}


def meaning(key: str) -> str:
    """The plain-language line for a rendered key (config dest, or `section.key` of dataset.toml)."""
    if key in MEANINGS:
        return MEANINGS[key]
    return explain(GLOSSARY_KEYS[key])


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "[" + ", ".join(json.dumps(v) if isinstance(v, str) else _shown(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def describe_config(plan: Plan) -> list[ConfigLine]:
    flat, tables = config_values(plan)
    lines = [ConfigLine(CONFIG_FILE, key, _shown(value), meaning(key)) for key, value in flat.items()]
    lines += [ConfigLine(DATASET_FILE, key, _shown(value), meaning(key)) for key, value in tables.items()]
    if plan.samples.prompts:
        lines.append(
            ConfigLine(
                PROMPTS_FILE,
                "prompts",
                f"{len(plan.samples.prompts)} prompt(s)",
                "the sample-picture prompts, one a line, with size, steps and seed",
            )
        )
    return lines


# --- launching --------------------------------------------------------------------------------


def backend_python(plan: Plan) -> str:
    """The Python of sd-scripts' environment. A venv's bin/python is a symlink to the system
    Python; when the plan holds that symlink's target (a spec path resolved through it), the venv's
    own path is put back, since only that path runs with the venv's packages and `accelerate`."""
    python = plan.backend.python
    if plan.backend.path and Path(python).is_absolute():
        for venv in ("venv", ".venv"):
            candidate = Path(plan.backend.path) / venv / "bin" / "python"
            try:
                if str(candidate) != python and candidate.resolve() == Path(python).resolve():
                    return str(candidate)
            except OSError:
                continue
    return python


def _accelerate_launch(plan: Plan) -> list[str]:
    """`accelerate launch` from the backend's own environment: the script next to its Python."""
    python = Path(backend_python(plan))
    if python.parent != Path("."):
        return [str(python.parent / "accelerate"), "launch"]
    found = shutil.which(str(python))
    if found and (Path(found).parent / "accelerate").is_file():
        return [str(Path(found).parent / "accelerate"), "launch"]
    # a bare `python3` with no accelerate beside it: the same launcher, run as a module
    return [str(python), "-m", "accelerate.commands.launch"]


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
    config_dir, output_dir = config_dir.absolute(), output_dir.absolute()
    rendered = _rendered_where(plan)
    where = _Where(config_dir, output_dir, config_dir / DATASET_FILE, max_steps)
    if batch_size is not None and batch_size != plan.training.batch_size:
        where = replace(where, batch_size=batch_size)
    if gradient_accumulation is not None and gradient_accumulation != plan.training.gradient_accumulation:
        where = replace(where, accumulation=gradient_accumulation)
    files: dict[Path, str] = {}
    if where == rendered:
        config_path = config_dir / CONFIG_FILE
    else:
        # a variant: its own files beside the rendered ones, pointing wherever this run must go
        stem = "dryrun" if max_steps is not None else "train"
        if where.batch_size is not None:
            where = replace(where, dataset_file=config_dir / f"{stem}-{DATASET_FILE}")
            files[where.dataset_file] = _dataset_text(plan, where)
        config_path = config_dir / f"{stem}-{CONFIG_FILE}"
        files[config_path] = _config_text(plan, where)

    backend = Path(plan.backend.path).absolute() if plan.backend.path else Path(plan.run_dir)
    script = backend / SCRIPTS.get(plan.model.family, SCRIPTS["sd15"])
    gpus = max(1, plan.compute.gpu_count)
    argv = [
        *_accelerate_launch(plan),
        "--num_cpu_threads_per_process",
        "1",
        "--num_processes",
        str(gpus),
        # explicit, so a leftover `accelerate config` file cannot change how the run is launched
        "--num_machines",
        "1",
        "--mixed_precision",
        plan.training.mixed_precision,
        "--dynamo_backend",
        "no",
    ]
    if gpus > 1:
        argv.append("--multi_gpu")
    argv += [str(script), "--config_file", str(config_path)]
    if resume and max_steps is None:
        state = resume_state(plan, output_dir)
        if state is not None:
            # --initial_epoch makes the epoch count come from the state folder's name: the step
            # sd-scripts records restarts at 0 on every resume, so it is wrong after a second one
            argv += ["--resume", str(state[0]), "--initial_epoch", str(state[1] + 1)]
    reset_log_reader()  # the lines read next belong to this run
    env = {
        "PYTHONUNBUFFERED": "1",  # print() is block-buffered in a pipe otherwise (reference §1)
        "PYTHONIOENCODING": "utf-8",  # sd-scripts prints Japanese; a C locale would crash on it
        "TF_ENABLE_ONEDNN_OPTS": "0",  # as the kohya_ss GUI: quiet TensorFlow if it is installed
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    return Launch(argv=argv, cwd=backend, env=env, files=files)


# --- reading the output -----------------------------------------------------------------------

# the training bar, not the "validation steps" ones; prints may be glued after its closing bracket
_BAR = re.compile(r"(?<!validation )\bsteps:\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)\s*\[([^\]]*)\]")
_RATE = re.compile(r"([0-9.]+)\s*(it/s|s/it)")
_LOSS = re.compile(r"\b(?:avr_loss|loss)=([-+]?(?:[0-9.]+(?:e[-+]?\d+)?|nan|inf))", re.IGNORECASE)
_EPOCH = re.compile(r"^epoch (\d+)/(\d+)$")
_EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit)):\s?(.*)$")
_WARNINGS = (
    "ignore directory without repeats",
    "ignore subset with image_dir=",
    "ignore duplicated subset",
    "not directory: ",
    "No caption file found for",
    "neither caption file nor class tokens are found",
    "No prompt file",
    "learning rate is too low. If using D-Adaptation or Prodigy",
    "clip_skip will be unexpected",
    "NaN found in latents, replacing with zeros",
    "wandb is enabled, but option",
)
_ERRORS: tuple[tuple[re.Pattern[str], str], ...] = (
    (_OOM, "oom"),
    (re.compile(r"No data found\."), "dataset"),
    (re.compile(r"illegal char in file \(not UTF-8\)|UnicodeDecodeError|caption file is empty"), "caption"),
    (re.compile(r"NaN detected in latents"), "nan"),
    (
        re.compile(
            r"model is not found as a file or in Hugging Face|HeaderTooLarge|Error while deserializing header|"
            r"HFValidationError|Repo id must be in the form|SafetensorError"
        ),
        "model_load",
    ),
    (
        re.compile(
            r"Invalid user config|MultipleInvalid|Invalid cmdline parsed arguments|: error: (?:unrecognized arguments|"
            r"argument )|\.toml not found\.$|does not require `num_warmup_steps`|requires mixed precision=|"
            r"bucket_reso_steps is \d+\. it must be divisible|(?:min|max)_bucket_reso must be|"
            r"resolution must be 'size' or 'width,height'|logging_dir is required|"
            r"Error on parsing TOML config file|ValueError: (?:file not found|not supported config file format)"
        ),
        "config",
    ),
    (
        re.compile(
            r"ImportError: No (?:bitsandbytes|dadaptation|Prodigy|lion_pytorch|schedulefree|wandb)\b|"
            r"ModuleNotFoundError: No module named|The version of bitsandbytes installed seems to be old"
        ),
        "not_installed",
    ),
    (
        re.compile(
            r"no kernel image is available|CUDA driver version is insufficient|CUDA error|"
            r"Torch not compiled with CUDA enabled|Found no NVIDIA driver"
        ),
        "cuda",
    ),
)
_MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft")


def _error_kind(line: str) -> str | None:
    for pattern, kind in _ERRORS:
        if pattern.search(line):
            return kind
    return None


def _number(text: str) -> float:
    return float(text.lower().replace("+", "")) if text else math.nan


class _LogReader:
    """kohya's console needs context a single line lacks: which epoch a progress bar belongs to,
    how many steps came before a resumed run (its bar starts again at 0), whether the first NaN
    was already reported, and whether a line ends a traceback. One run's lines arrive in order;
    the state is reset by `launch` (a run starts), at sd-scripts' first line ("Loading settings
    from …") and, for the per-training part, at "running training / 学習開始"."""

    def __init__(self) -> None:
        self.start_run()

    def start_run(self) -> None:
        self.images: int | None = None
        self.resume_step: int | None = None
        self.in_traceback = False
        self.start_training()

    def start_training(self) -> None:
        self.epoch = 0
        self.epochs: int | None = None
        self.first_epoch: int | None = None
        self.offset = 0
        self.batches: int | None = None
        self.accumulation = 1
        self.samples: int | None = None
        self.nan_reported = False
        self.last_loss: float | None = None
        self.step = 0

    @property
    def steps_per_epoch(self) -> int | None:
        return math.ceil(self.batches / self.accumulation) if self.batches else None

    def read(self, line: str) -> list[Event]:
        bar = _BAR.search(line)
        if bar is not None:
            events = self._bar(bar)
            rest = line[bar.end() :].strip()
            return events + (self.read(rest) if rest else [])
        return self._line(line)

    def _bar(self, match: re.Match[str]) -> list[Event]:
        done, total, inside = match.groups()
        step, total_steps = int(done), int(total)
        loss_match = _LOSS.search(inside)
        if step == 0 or loss_match is None:
            return []
        loss = _number(loss_match.group(1))
        self.step = self.offset + step
        self.last_loss = loss
        data: dict[str, Any] = {"step": self.step, "total_steps": total_steps, "loss": loss}
        if self.epoch:
            data["epoch"] = self.epoch
        if self.epochs:
            data["epochs"] = self.epochs
        rate = _RATE.search(inside)
        if rate and float(rate.group(1)) > 0:
            value = float(rate.group(1))
            data["step_seconds"] = round(value if rate.group(2) == "s/it" else 1 / value, 4)
        events = [Event("step", data)]
        if not math.isfinite(loss) and not self.nan_reported:
            self.nan_reported = True
            events.append(
                Event(
                    "error",
                    {
                        "kind": "nan",
                        "message": f"the loss became {loss_match.group(1)} (not a number) at step {self.step}: "
                        "the LoRA is broken from here on, though kohya keeps training",
                    },
                )
            )
        return events

    def _line(self, line: str) -> list[Event]:
        if "Loading settings from" in line:
            self.start_run()
            return []
        if line.startswith("running training"):
            self.start_training()
            return []
        epoch = _EPOCH.match(line)
        if epoch:
            return self._epoch(int(epoch.group(1)), int(epoch.group(2)))
        events = self._header(line)
        if events is not None:
            return events
        return self._message(line)

    def _epoch(self, number: int, total: int) -> list[Event]:
        events: list[Event] = []
        if self.first_epoch is None:
            self.first_epoch = number
            if number > 1:
                spe = self.steps_per_epoch
                self.offset = (number - 1) * spe if spe else (self.resume_step or 0)
                events.append(Event("resumed", {"step": self.offset, "epoch": number - 1}))
        elif number != self.epoch:
            events.append(self._epoch_done())
        self.epoch, self.epochs = number, total
        return events

    def _epoch_done(self) -> Event:
        data: dict[str, Any] = {"epoch": self.epoch, "epochs": self.epochs, "step": self.step}
        if self.last_loss is not None and math.isfinite(self.last_loss):
            # avr_loss at an epoch's last step is the mean loss of that epoch (reference §9)
            data["mean_loss"] = self.last_loss
        return Event("epoch", data)

    def _header(self, line: str) -> list[Event] | None:
        """The run summary sd-scripts prints before training, and the dataset scan's counts."""
        if m := re.search(r"found directory .* contains (\d+) image files", line):
            self.images = int(m.group(1))
            return []
        if m := re.match(r"num train images \* repeats / .*?: (\d+)", line):
            self.samples = int(m.group(1))
            return []
        if m := re.match(r"num batches per epoch / .*?: (\d+)", line):
            self.batches = int(m.group(1))
            return []
        if m := re.match(r"num epochs / .*?: (\d+)", line):
            self.epochs = int(m.group(1))
            return []
        if m := re.match(r"gradient accumulation steps / .*?= (\d+)", line):
            self.accumulation = max(1, int(m.group(1)))
            return []
        if m := re.match(r"total optimization steps / .*?: (\d+)", line):
            data: dict[str, Any] = {"total_steps": int(m.group(1))}
            if self.epochs:
                data["epochs"] = self.epochs
            if self.images is not None:
                data["images"] = self.images
            if self.samples is not None:
                data["samples_per_epoch"] = self.samples
            if self.steps_per_epoch:
                data["steps_per_epoch"] = self.steps_per_epoch
            return [Event("dataset", data)]
        if m := re.search(r"load train state from .*?: (\{.*\})", line):
            try:
                state = ast.literal_eval(m.group(1))
                self.resume_step = int(state.get("current_step", 0))
            except (ValueError, SyntaxError, AttributeError, TypeError):
                pass
            return []
        return None

    def _message(self, line: str) -> list[Event]:
        if line.startswith("import network module"):
            return [Event("model_loaded", {"message": line})]
        if m := re.match(r"saving checkpoint: (.+)$", line):
            return [self._saved(m.group(1).strip())]
        if m := re.match(r"removing old checkpoint: (.+)$", line):
            return [Event("checkpoint_removed", {"path": m.group(1).strip()})]
        if re.search(r"(?:^|\s)model saved\.(?:\s|$)", line):
            return ([self._epoch_done()] if self.epoch else []) + [Event("done", {"steps": self.step})]
        if line.startswith("Traceback (most recent call last)"):
            self.in_traceback = True
            return []
        if m := re.search(r"CalledProcessError: Command .* returned non-zero exit status (-?\d+)", line):
            self.in_traceback = False
            return [
                Event(
                    "error",
                    {"kind": "internal", "message": f"the training script stopped with exit status {m.group(1)}"},
                )
            ]
        kind = _error_kind(line)
        exception = _EXCEPTION.match(line) if self.in_traceback else None
        if exception is not None:
            self.in_traceback = False
            if exception.group(1).endswith("KeyboardInterrupt"):
                return []
            if kind is None and exception.group(1).endswith("FileNotFoundError"):
                kind = "model_load" if exception.group(2).rstrip("'\"").endswith(_MODEL_SUFFIXES) else None
            if kind is None and exception.group(1).endswith("AssertionError"):
                kind = "config"  # sd-scripts checks its arguments with assertions
            return [Event("error", {"kind": kind or "internal", "message": line})]
        if kind is not None:
            return [Event("error", {"kind": kind, "message": line})]
        if any(text in line for text in _WARNINGS):
            return [Event("warning", {"message": line})]
        return []

    def _saved(self, path: str) -> Event:
        name = Path(path).name
        if m := re.search(r"-(\d{6})\.\w+$", name):
            epoch = int(m.group(1))
            spe = self.steps_per_epoch
            return Event("checkpoint", {"path": path, "epoch": epoch, "step": epoch * spe if spe else self.step})
        if m := re.search(r"-step(\d{8})\.\w+$", name):
            return Event("checkpoint", {"path": path, "epoch": self.epoch, "step": self.offset + int(m.group(1))})
        return Event("saved", {"path": path})


_reader = _LogReader()


def parse_log_line(line: str) -> list[Event]:
    return _reader.read(line)


def reset_log_reader() -> None:
    """Forget what earlier lines said (a new run starts)."""
    global _reader
    _reader = _LogReader()


def metrics_files(plan: Plan, output_dir: Path) -> list[Path]:
    return []  # sd-scripts' metrics are TensorBoard event files (binary), not lines; the console has all


def parse_metrics_line(path: Path, line: str) -> list[Event]:
    return []


def is_out_of_memory(text: str) -> bool:
    return bool(_OOM.search(text))


# --- outputs and resume -----------------------------------------------------------------------


def _epoch_file(plan: Plan) -> re.Pattern[str]:
    return re.compile(rf"^{re.escape(plan.name)}-(\d{{6}})\.safetensors$")


def _epoch_state(plan: Plan) -> re.Pattern[str]:
    return re.compile(rf"^{re.escape(plan.name)}-(\d{{6}})-state$")


def _final_state(plan: Plan) -> str:
    return f"{plan.name}-state"


def complete_safetensors(path: Path) -> bool:
    """Whether a .safetensors file was written to the end (its header fits and parses)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                return False
            (length,) = struct.unpack("<Q", head)
            if length < 2 or 8 + length > size:
                return False
            return isinstance(json.loads(handle.read(length)), dict)
    except (OSError, ValueError):
        return False


def complete_state(folder: Path) -> bool:
    """Whether an accelerate state folder was written to the end: sd-scripts' train_state.json is
    written first, accelerate's random_states_*.pkl last."""
    return (folder / "train_state.json").is_file() and any(folder.glob("random_states_*.pkl"))


# train_util.sample_images: {output_name}_{e%06d (epoch) | %06d (step)}_{idx:02d}_{YYYYmmddHHMMSS}[_{seed}].png
_SAMPLE = re.compile(r"_(e?)(\d{6})_(\d{2})_\d{14}(?:_\d+)?\.png")


def sample_pictures(plan: Plan, output_dir: Path) -> list[tuple[Path, str]]:
    folder = output_dir / "sample"
    if not folder.is_dir():
        return []
    found = []
    for entry in sorted(folder.iterdir()):  # a later picture of the same epoch and prompt wins
        m = _SAMPLE.search(entry.name)
        if m and entry.name.startswith(plan.name) and entry.is_file():
            when = f"epoch-{int(m.group(2)):04d}" if m.group(1) else f"step-{int(m.group(2)):09d}"
            found.append((entry, f"{when}-{int(m.group(3)) + 1}.png"))
    return found


def checkpoints(plan: Plan, output_dir: Path) -> list[Checkpoint]:
    """Epoch checkpoints whose LoRA file is complete, oldest first. A checkpoint's path is its LoRA
    file (what kohya names in its save and remove lines); the resume state beside it is found by
    `resume_state`. Steps are counted as lorabuild plans them (epoch × steps per epoch)."""
    if not output_dir.is_dir():
        return []
    pattern = _epoch_file(plan)
    found: list[Checkpoint] = []
    for entry in output_dir.iterdir():
        m = pattern.match(entry.name)
        if m and entry.is_file() and complete_safetensors(entry):
            epoch = int(m.group(1))
            found.append(Checkpoint(entry, epoch * plan.steps.steps_per_epoch, epoch, entry))
    return sorted(found, key=lambda c: c.epoch)


def resume_state(plan: Plan, output_dir: Path) -> tuple[Path, int] | None:
    """The newest complete epoch state folder to resume from, and its epoch."""
    if not output_dir.is_dir():
        return None
    pattern = _epoch_state(plan)
    best: tuple[Path, int] | None = None
    for entry in output_dir.iterdir():
        m = pattern.match(entry.name)
        if not m or not entry.is_dir() or not complete_state(entry):
            continue
        epoch = int(m.group(1))
        # a state at or past the last epoch cannot be resumed (sd-scripts asserts on it)
        if epoch < plan.steps.epochs and (best is None or epoch > best[1]):
            best = (entry, epoch)
    return best


def final_lora(plan: Plan, output_dir: Path) -> Path:
    return output_dir / f"{plan.name}.safetensors"


def prune_checkpoints(plan: Plan, output_dir: Path) -> list[Path]:
    """Keep the newest `keep_last` complete epoch checkpoints (LoRA file and resume state); remove
    older ones, broken leftovers, and the final state folder (the run is complete, so nothing
    resumes from it). sd-scripts prunes as it saves, but not what a stopped run left behind."""
    if not output_dir.is_dir():
        return []
    complete = [c.epoch for c in checkpoints(plan, output_dir)]
    keep = set(complete[-plan.checkpoints.keep_last :]) if plan.checkpoints.keep_last > 0 else set()
    files, states = _epoch_file(plan), _epoch_state(plan)
    removed: list[Path] = []
    for entry in sorted(output_dir.iterdir()):
        m = files.match(entry.name) or states.match(entry.name)
        if (m and int(m.group(1)) not in keep) or entry.name == _final_state(plan):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
    return removed


# --- the installation -------------------------------------------------------------------------


def probe_command(plan: Plan) -> list[str]:
    modules = ["accelerate", "transformers", "diffusers", "safetensors", "toml", "voluptuous", "tensorboard"]
    if plan.training.optimizer in OPTIMIZER_MODULES:
        modules.append(OPTIMIZER_MODULES[plan.training.optimizer])
    if plan.model.family == "flux":
        modules.append("sentencepiece")  # the T5 tokenizer
    return [backend_python(plan), "-c", PROBE_SOURCE, *modules]


def install_commands(plan: Plan) -> list[list[str]]:
    """Clone, make a venv, install torch (CUDA 12.8 build) and the requirements: on a remote
    machine where sd-scripts is missing. Spec values reach the script only as arguments."""
    where = plan.backend.path or "~/sd-scripts"
    script = (
        'set -e; [ -d "$1/.git" ] || git clone --depth 1 "$2" "$1"; '
        '[ -x "$1/venv/bin/python" ] || python3 -m venv "$1/venv"; '
        '"$1/venv/bin/pip" install --quiet torch torchvision --index-url https://download.pytorch.org/whl/cu128; '
        'cd "$1" && "$1/venv/bin/pip" install --quiet -r requirements.txt'
    )
    return [["sh", "-c", script, "install-kohya", where, "https://github.com/kohya-ss/sd-scripts"]]


def remote_entry_point(plan: Plan) -> str | None:
    return f"{plan.backend.path or '~/sd-scripts'}/{SCRIPTS.get(plan.model.family, SCRIPTS['sd15'])}"


def installation(plan: Plan) -> Installation:
    if not plan.backend.path:
        return Installation(
            False,
            "the spec does not say where kohya-ss sd-scripts is installed",
            "add its folder to the spec, e.g. `backend: {name: kohya, path: ~/sd-scripts}`; if it is not "
            "installed yet, " + INSTALL_FIX,
        )
    root = Path(plan.backend.path)
    script = SCRIPTS.get(plan.model.family, SCRIPTS["sd15"])
    entry = root / script
    if not entry.is_file():
        if (root / "sd-scripts" / script).is_file():
            return Installation(
                False,
                f"{root} is the kohya_ss GUI folder; its training scripts are in the sd-scripts folder inside it",
                f"set `backend.path` to {root / 'sd-scripts'}",
            )
        if not root.is_dir():
            return Installation(False, f"kohya-ss sd-scripts was not found: {root} does not exist", INSTALL_FIX)
        return Installation(
            False,
            f"{root} does not hold kohya-ss sd-scripts' {script}"
            + (" (Flux needs sd-scripts v0.9.0 or newer)" if plan.model.family == "flux" else ""),
            f"point `backend.path` at your sd-scripts checkout, update it with `git -C {root} pull`, or " + INSTALL_FIX,
        )
    python = Path(backend_python(plan))
    if python.parent != Path(".") and python.exists() and not (python.parent / "accelerate").exists():
        return Installation(
            False,
            f"accelerate is not installed in sd-scripts' environment ({python.parent.parent})",
            f"{python.parent / 'pip'} install -r {root / 'requirements.txt'}",
        )
    version = git_version(root)
    shown = f"kohya-ss sd-scripts {version}" if version else "kohya-ss sd-scripts"
    return Installation(True, f"{shown} at {root}", version=version, entry_point=str(entry))


def git_version(root: Path) -> str | None:
    """The checkout's tag (e.g. v0.10.1), else its branch and commit, read from .git's files."""
    try:
        git = root / ".git"
        if git.is_file():  # a submodule (the kohya_ss GUI's sd-scripts) or a worktree
            text = git.read_text(encoding="utf-8").strip()
            if not text.startswith("gitdir:"):
                return None
            git = (root / text.removeprefix("gitdir:").strip()).resolve()
        head = (git / "HEAD").read_text(encoding="utf-8").strip()
        branch = None
        if head.startswith("ref:"):
            ref = head.removeprefix("ref:").strip()
            branch = ref.removeprefix("refs/heads/")
            sha = _read_ref(git, ref)
        else:
            sha = head
        if not sha:
            return branch
        tag = _tag_for(git, sha)
        return tag or f"{branch or 'commit'} {sha[:8]}"
    except OSError:
        return None


def _packed_refs(git: Path) -> list[str]:
    packed = git / "packed-refs"
    return packed.read_text(encoding="utf-8").splitlines() if packed.is_file() else []


def _read_ref(git: Path, ref: str) -> str | None:
    loose = git / ref
    if loose.is_file():
        return loose.read_text(encoding="utf-8").strip()
    for line in _packed_refs(git):
        parts = line.split()
        if len(parts) == 2 and parts[1] == ref:
            return parts[0]
    return None


def _tag_for(git: Path, sha: str) -> str | None:
    tag = None
    for line in _packed_refs(git):
        if line.startswith("^"):  # the commit an annotated tag above points to
            if line[1:].strip() == sha and tag is not None:
                return tag
            continue
        parts = line.split()
        tag = parts[1].removeprefix("refs/tags/") if len(parts) == 2 and parts[1].startswith("refs/tags/") else None
        if tag and parts[0] == sha:
            return tag
    tags = git / "refs" / "tags"
    if tags.is_dir():
        for path in sorted(tags.rglob("*")):
            if path.is_file() and path.read_text(encoding="utf-8").strip() == sha:
                return str(path.relative_to(tags))
    return None


def new_log_reader() -> Callable[[str], list[Event]]:
    """A reader with its own state, for a log of a run lorabuild did not launch."""
    return _LogReader().read
