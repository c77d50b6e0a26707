"""The ai-toolkit backend: ostris/ai-toolkit, run as `<its python> <checkout>/run.py <absolute job.yaml>`.

Owns everything lorabuild knows about ai-toolkit (reference/ai-toolkit.md, ostris/ai-toolkit
27a03a91): the job file `backend/job.yaml` in its job/config/process shape, written from the Plan
with every setting whose default surprises set explicitly; the list of keys it accepts
(data/ai_toolkit_keys.json — ai-toolkit silently ignores a key it does not know, so that list and
its test are what stop a typo from training with a default); the command line and its dry-run and
out-of-memory variants; its console output (tqdm bar, save, resume, OOM and error lines) read into
events; its checkpoint files and its automatic resume from the newest save.

ai-toolkit counts steps, not epochs: lorabuild's epochs, checkpoint interval and sample interval
become steps through `plan.steps.steps_per_epoch`.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorabuild.backends import Checkpoint, ConfigLine, Event, Installation, Launch, supporting
from lorabuild.glossary import explain
from lorabuild.probe import PROBE_SOURCE

if TYPE_CHECKING:
    from lorabuild.plan import Issue, Plan

NAME = "ai-toolkit"
# SD 1.5 is ai-toolkit's default architecture (`arch: sd1`); Pony is an SDXL model.
FAMILIES = ("sd15", "sdxl", "pony", "flux")
CONFIG_FILE = "job.yaml"
KEYS_FILE = Path(__file__).resolve().parent / "data" / "ai_toolkit_keys.json"
REPOSITORY = "https://github.com/ostris/ai-toolkit"

# Which backend trains which family, for advice when a family is not supported here.
SUPPORT: dict[str, tuple[str, ...]] = {
    "builtin": ("sd15",),
    "kohya": ("sd15", "sdxl", "pony", "flux"),
    "simpletuner": ("sd15", "sdxl", "pony", "flux"),
    "ai-toolkit": FAMILIES,
}
FAMILY_NAMES = {"sd15": "SD 1.5", "sdxl": "SDXL", "pony": "Pony", "flux": "Flux"}

ARCH = {"sd15": "sd1", "sdxl": "sdxl", "pony": "sdxl", "flux": "flux"}
# older ai-toolkit versions read these flags instead of `arch`; setting both is safe
LEGACY_ARCH_FLAG = {"sdxl": "is_xl", "pony": "is_xl", "flux": "is_flux"}
NOISE_SCHEDULER = {"sd15": "ddpm", "sdxl": "ddpm", "pony": "ddpm", "flux": "flowmatch"}
SAMPLE_GUIDANCE = {"sd15": 7.0, "sdxl": 7.0, "pony": 7.0, "flux": 4.0}
OPTIMIZERS = {
    "adamw": "adamw",
    "adamw8bit": "adamw8bit",
    "lion": "lion",
    "prodigy": "prodigy",
    "adafactor": "adafactor",
}
# the package each optimizer imports when it is created (checked by Gate 3's probe)
OPTIMIZER_MODULES = {"adamw8bit": "bitsandbytes", "prodigy": "prodigyopt", "lion": "lion_pytorch"}
SCHEDULERS = {
    "constant": "constant",
    "constant_with_warmup": "constant_with_warmup",
    "linear": "linear",
    "cosine": "cosine",
}
TRAIN_DTYPE = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}
SAVE_DTYPE = {"fp32": "float32", "fp16": "float16", "bf16": "bf16"}
QUANTISED_BASE = "fp8"  # ai-toolkit's `quantize: true` with qtype qfloat8
INCOMPLETE_FOLDER = "incomplete-saves"

# Training settings this backend honours; a spec that sets any other one is told so.
SETTINGS = (
    "learning_rate",
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
    "cache_text_encoder_outputs",
    "seed",
    "noise_offset",
    "min_snr_gamma",
    "flip_aug",
    "shuffle_caption",
    "keep_tokens",
    "network_dropout",
    "bucketing",
)
BASE_MODULES = ("diffusers", "transformers", "accelerate", "safetensors", "yaml", "dotenv")


@cache
def keys() -> dict[str, Any]:
    """The key list (data/ai_toolkit_keys.json): the one home of ai-toolkit's key names and values."""
    data: dict[str, Any] = json.loads(KEYS_FILE.read_text(encoding="utf-8"))
    return data


# --- settings and checks ---------------------------------------------------------------------------


def adjust_settings(training: dict[str, Any], *, on_cpu: bool) -> list[tuple[str, Any, str]]:
    changes: list[tuple[str, Any, str]] = []
    if training["lr_scheduler"] == "constant" and training["lr_warmup_steps"]:
        changes.append(
            (
                "lr_warmup_steps",
                0,
                "a constant learning rate has no warm-up in ai-toolkit, so training starts at the full learning rate",
            )
        )
    # ai-toolkit puts the base model in train.dtype (it copies it onto model.dtype); only fp8 differs
    dtype = TRAIN_DTYPE[training["mixed_precision"]]
    base = training["base_precision"]
    if base in ("fp32", "fp16", "bf16") and base != dtype:
        changes.append(
            (
                "base_precision",
                dtype,
                f"ai-toolkit keeps the base model in its training number format ({dtype}, from mixed precision "
                f"{training['mixed_precision']})",
            )
        )
    if training["cache_text_encoder_outputs"] and (training["train_text_encoder"] or training["shuffle_caption"]):
        why = "the caption reader is trained" if training["train_text_encoder"] else "captions are shuffled"
        changes.append(
            (
                "cache_text_encoder_outputs",
                False,
                f"ai-toolkit cannot store the caption reader's output once when {why} (it changes every step)",
            )
        )
    return changes


def settings(plan: Plan) -> tuple[str, ...]:
    return SETTINGS


def check_plan(plan: Plan) -> list[Issue]:
    from lorabuild.plan import Issue

    issues: list[Issue] = []
    t = plan.training
    family = plan.model.family
    if family not in FAMILIES:
        ready = [n for n in supporting(family) if n != NAME]
        others = ready or [n for n, fams in SUPPORT.items() if family in fams and n != NAME]
        issues.append(
            Issue(
                kind="backend",
                field=("base_model", "family"),
                message=f"ai-toolkit cannot train {FAMILY_NAMES.get(family, family)} models here",
                fix=f"use `backend: {others[0]}` for this model" if others else "use another base model",
            )
        )
    optimizer = OPTIMIZERS.get(t.optimizer)
    if optimizer is None or not _known_optimizer(optimizer):
        issues.append(
            Issue(
                kind="backend",
                field=("training", "optimizer"),
                message=f"ai-toolkit has no {t.optimizer} optimizer",
                fix=f"use one of {', '.join(OPTIMIZERS)}",
            )
        )
    if SCHEDULERS.get(t.lr_scheduler) not in keys()["lr_schedulers"]:
        issues.append(
            Issue(
                kind="backend",
                field=("training", "lr_scheduler"),
                message=f"ai-toolkit has no {t.lr_scheduler} learning-rate schedule",
                fix=f"use one of {', '.join(SCHEDULERS)}",
            )
        )
    elif t.lr_warmup_steps and t.lr_scheduler in ("linear", "cosine"):
        issues.append(
            Issue(
                kind="backend",
                field=("training", "lr_warmup_steps"),
                message=f"ai-toolkit cannot warm up before a {t.lr_scheduler} schedule "
                f"(a warm-up of {t.lr_warmup_steps} steps was asked for)",
                fix="set `lr_warmup_steps: 0`, or use `lr_scheduler: constant_with_warmup` to keep the warm-up",
            )
        )
    if t.base_precision == "nf4":
        issues.append(
            Issue(
                kind="backend",
                field=("training", "base_precision"),
                message="ai-toolkit cannot keep the base model in 4-bit (nf4); it quantises to 8-bit only",
                fix="use `base_precision: fp8` (Flux) or leave base_precision out",
            )
        )
    elif t.base_precision == QUANTISED_BASE and family != "flux":
        issues.append(
            Issue(
                kind="backend",
                field=("training", "base_precision"),
                message=f"ai-toolkit quantises only Flux-type models to 8-bit, not {FAMILY_NAMES[family]} models",
                fix="leave `base_precision` out: the base model then follows the mixed precision (bf16)",
            )
        )
    if t.min_snr_gamma and family == "flux":
        issues.append(
            Issue(
                kind="backend",
                field=("training", "min_snr_gamma"),
                message="min SNR gamma is for noise-predicting models (SD 1.5, SDXL); Flux trains with flow "
                "matching, where ai-toolkit cannot apply it",
                fix="set `min_snr_gamma: 0` or leave it out",
            )
        )
    if plan.model.vae is not None:
        issues.append(
            Issue(
                kind="backend",
                field=("base_model", "vae"),
                message="lorabuild cannot give ai-toolkit a separate VAE; it uses the one inside the base model",
                fix="remove `base_model.vae`, or use `backend: kohya` to train with a separate VAE",
            )
        )
    if plan.model.kind == "folder":
        issues.append(
            Issue(
                kind="backend",
                field=("base_model", "path"),
                message="ai-toolkit reads a single model file (.safetensors) or a diffusers folder with a "
                "model_index.json; this folder is neither",
                fix="point `base_model.path` at the model's .safetensors file or at its diffusers folder",
            )
        )
    supported = tuple(keys()["image_extensions"])
    skipped = [name for name in plan.dataset.images if not name.lower().endswith(supported)]
    if skipped:
        shown = ", ".join(skipped[:3]) + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else "")
        issues.append(
            Issue(
                kind="backend",
                field=("dataset", "path"),
                message=f"ai-toolkit reads only .jpg, .jpeg, .png and .webp pictures, so it would skip {shown}",
                fix="convert those pictures to .png (or remove them)",
            )
        )
    for field, text in _texts_in_job(plan):
        if "${" in text:
            issues.append(
                Issue(
                    kind="backend",
                    field=field,
                    message=f"ai-toolkit reads `${{...}}` in its job file as an environment variable: {text!r}",
                    fix="rename the folder, or reword the prompt, without `${`",
                )
            )
    if plan.compute.gpu_count > 1:
        issues.append(
            Issue(
                kind="backend",
                field=("compute", "gpu_count"),
                message="lorabuild runs ai-toolkit on one GPU (its multi-GPU training is not documented)",
                fix="set `gpu_count: 1`, or use `backend: kohya` for several GPUs",
            )
        )
    return issues


def _known_optimizer(name: str) -> bool:
    known = keys()
    return name in known["optimizers"] or any(name.startswith(p) for p in known["optimizer_prefixes"])


def _texts_in_job(plan: Plan) -> list[tuple[tuple[str, ...], str]]:
    """The spec's own text that ends up in the job file, with the spec field it comes from."""
    texts: list[tuple[tuple[str, ...], str]] = [
        (("base_model", "path"), plan.model.path),
        (("dataset", "path"), plan.dataset.path),
    ]
    texts += [(("samples", "prompts"), p) for p in plan.samples.prompts]
    return texts


# --- the job file ----------------------------------------------------------------------------------


def training_folder(plan: Plan) -> Path:
    """Where the long run writes: the run folder's checkpoints/ (ai-toolkit adds <name>/)."""
    return Path(plan.run_dir) / "checkpoints"


def save_every(plan: Plan) -> int:
    """Steps between checkpoints: ai-toolkit only counts steps."""
    per_epoch = plan.steps.steps_per_epoch
    return max(1, plan.checkpoints.every_n_epochs * per_epoch) if per_epoch else max(1, plan.steps.total_steps)


def build_job(
    plan: Plan,
    *,
    folder: Path,
    max_steps: int | None = None,
    batch_size: int | None = None,
    gradient_accumulation: int | None = None,
) -> dict[str, Any]:
    """The job as ai-toolkit reads it. Pure: `folder` is the training_folder to write into."""
    t = plan.training
    family = plan.model.family
    dry = max_steps is not None
    steps = max_steps if dry else plan.steps.total_steps
    scheduler = SCHEDULERS.get(t.lr_scheduler, t.lr_scheduler)
    caching_text = t.cache_text_encoder_outputs and not t.train_text_encoder
    sampling = bool(plan.samples.prompts) and not dry

    network: dict[str, Any] = {
        "type": "lora",
        "linear": t.rank,
        "linear_alpha": float(t.alpha),
        "dropout": float(t.network_dropout),
    }
    save: dict[str, Any] = {
        "dtype": SAVE_DTYPE[t.save_precision],
        # a dry run saves only the final file: it proves saving works without checkpoints
        "save_every": steps if dry else save_every(plan),
        "max_step_saves_to_keep": 1 if dry else plan.checkpoints.keep_last,
        # ai-toolkit switches Flux to diffusers naming whatever is written; say what happens
        "save_format": "diffusers" if family == "flux" else "safetensors",
        "push_to_hub": False,
    }
    dataset: dict[str, Any] = {
        "folder_path": plan.dataset.path,
        "caption_ext": plan.dataset.caption_extension.lstrip("."),
        "caption_dropout_rate": 0.0,
        "shuffle_tokens": t.shuffle_caption,
        "keep_tokens": t.keep_tokens,
        "cache_latents_to_disk": t.cache_latents,
        "cache_text_embeddings": caching_text,
        "resolution": t.resolution,
        "num_repeats": plan.dataset.repeats,
        "flip_x": t.flip_aug,
        "buckets": t.bucketing,
    }
    train: dict[str, Any] = {
        "batch_size": batch_size or t.batch_size,
        "steps": steps,
        "gradient_accumulation": gradient_accumulation or t.gradient_accumulation,
        "train_unet": True,
        "train_text_encoder": t.train_text_encoder,
        "gradient_checkpointing": t.gradient_checkpointing,
        "noise_scheduler": NOISE_SCHEDULER[family],
        "optimizer": OPTIMIZERS.get(t.optimizer, t.optimizer),
        "lr": float(t.learning_rate),
        "optimizer_params": dict(t.optimizer_args),
        "lr_scheduler": scheduler,
    }
    if scheduler == "constant_with_warmup":
        # left out, ai-toolkit warms up for 1000 steps
        train["lr_scheduler_params"] = {"num_warmup_steps": t.lr_warmup_steps}
    elif scheduler == "linear":
        # torch's LinearLR defaults ramp *up* from a third; other trainers' "linear" decays to zero
        train["lr_scheduler_params"] = {"start_factor": 1.0, "end_factor": 0.0}
    train["dtype"] = TRAIN_DTYPE[t.mixed_precision]
    train["noise_offset"] = float(t.noise_offset)
    if family != "flux":
        train["min_snr_gamma"] = float(t.min_snr_gamma)
    train["cache_text_embeddings"] = caching_text
    # no baseline pictures before step one: they would be made again at every resume
    train["skip_first_sample"] = True
    train["disable_sampling"] = not sampling

    model: dict[str, Any] = {"name_or_path": plan.model.path, "arch": ARCH[family]}
    if family in LEGACY_ARCH_FLAG:
        model[LEGACY_ARCH_FLAG[family]] = True
    quantise = t.base_precision == QUANTISED_BASE
    model["quantize"] = quantise
    if quantise:
        model["qtype"] = "qfloat8"
        model["quantize_te"] = True
        model["qtype_te"] = "qfloat8"

    process: dict[str, Any] = {
        "type": "sd_trainer",
        "training_folder": str(folder),
        "network": network,
        "save": save,
        "datasets": [dataset],
        "train": train,
        "model": model,
    }
    if sampling:
        process["sample"] = {
            "sampler": NOISE_SCHEDULER[family],
            "sample_every": _sample_every(plan),
            "width": t.resolution,
            "height": t.resolution,
            "prompts": list(plan.samples.prompts),
            "neg": "",
            "seed": plan.samples.seed,
            "guidance_scale": SAMPLE_GUIDANCE[family],
            "sample_steps": plan.samples.steps,
        }
    return {
        "job": "extension",
        "config": {"name": plan.name, "process": [process]},
        "meta": {
            "name": "[name]",
            "version": "1.0",
            # in every saved file, so a checkpoint says which settings made it
            "lorabuild_resume_key": plan.resume_key,
            "lorabuild_preset": plan.preset,
        },
    }


def _sample_every(plan: Plan) -> int:
    every = plan.samples.every_n_epochs
    if every and plan.steps.steps_per_epoch:
        return every * plan.steps.steps_per_epoch
    return max(1, plan.steps.total_steps)  # never during training: only the final pictures


def dump_job(job: dict[str, Any]) -> str:
    import yaml

    header = (
        "# ai-toolkit job written by lorabuild from the training spec; edit the spec, not this file.\n"
        "# ai-toolkit ignores keys it does not know, so every key here is checked against\n"
        "# lorabuild/backends/data/ai_toolkit_keys.json. Run by hand: <ai-toolkit>/venv/bin/python run.py <this file>\n"
    )
    body: str = yaml.safe_dump(job, sort_keys=False, allow_unicode=True, default_flow_style=False, width=1000)
    return header + body


def render_config(plan: Plan) -> dict[str, str]:
    return {CONFIG_FILE: dump_job(build_job(plan, folder=training_folder(plan)))}


# --- explaining the job file -----------------------------------------------------------------------

CONTAINERS = {"config", "process", "network", "save", "datasets", "train", "model", "sample", "logging"}


def leaves(job: dict[str, Any]) -> list[tuple[str, Any]]:
    """Every setting of a job as (`section.key`, value); mappings and lists of settings are opened."""
    found: list[tuple[str, Any]] = [(key, value) for key, value in job.items() if key not in ("config",)]
    config = job.get("config", {})
    found += [(f"config.{k}", v) for k, v in config.items() if k != "process"]
    for process in config.get("process", []):
        for key, value in process.items():
            if key == "datasets":
                found += [(f"datasets.{k}", v) for dataset in value for k, v in dataset.items()]
            elif key in CONTAINERS:
                found += [(f"{key}.{k}", v) for k, v in value.items()]
            else:
                found.append((f"process.{key}", value))
    return found


def _meanings(plan: Plan) -> dict[str, str]:
    per_epoch = plan.steps.steps_per_epoch
    steps = f"{plan.steps.epochs} epochs × {per_epoch} steps per epoch" if per_epoch else "from max_train_steps"
    return {
        "job": "what ai-toolkit should do: `extension` runs one of its trainers",
        "meta": "notes written into every saved LoRA file, with the settings fingerprint lorabuild resumes by",
        "config.name": "the LoRA's name: ai-toolkit names its output folder and every saved file after it",
        "process.type": "which ai-toolkit trainer runs: sd_trainer trains LoRAs for image models",
        "process.training_folder": "where ai-toolkit writes checkpoints and the finished LoRA, in a folder named "
        "after the LoRA",
        "network.type": "what is trained: a LoRA",
        "network.linear": explain("rank"),
        "network.linear_alpha": explain("alpha"),
        "network.dropout": explain("network_dropout"),
        "save.dtype": explain("save_precision"),
        "save.save_every": f"{explain('every_n_epochs')} — counted in steps here "
        f"({plan.checkpoints.every_n_epochs} × {per_epoch} steps per epoch)",
        "save.max_step_saves_to_keep": explain("keep_last"),
        "save.save_format": "how the LoRA's layers are named in the file (ai-toolkit always uses diffusers names "
        "for Flux)",
        "save.push_to_hub": "upload to Hugging Face when done: off, your LoRA stays on this computer",
        "datasets.folder_path": f"{explain('dataset')} (ai-toolkit also writes its caches, _latent_cache/ and "
        ".aitk_size.json, into this folder)",
        "datasets.caption_ext": f"the extension of the caption files ({explain('caption')})",
        "datasets.caption_dropout_rate": "how often a caption is left out during training: never",
        "datasets.shuffle_tokens": explain("shuffle_caption"),
        "datasets.keep_tokens": explain("keep_tokens"),
        "datasets.cache_latents_to_disk": explain("cache_latents"),
        "datasets.cache_text_embeddings": explain("cache_text_encoder_outputs"),
        "datasets.resolution": explain("resolution"),
        "datasets.num_repeats": explain("repeats"),
        "datasets.flip_x": explain("flip_aug"),
        "datasets.buckets": explain("bucketing"),
        "train.batch_size": explain("batch_size"),
        "train.steps": f"{explain('steps')} — ai-toolkit counts steps, not epochs: {steps}",
        "train.gradient_accumulation": explain("gradient_accumulation"),
        "train.train_unet": "teach the image model itself (always on for a LoRA)",
        "train.train_text_encoder": explain("train_text_encoder"),
        "train.gradient_checkpointing": explain("gradient_checkpointing"),
        "train.noise_scheduler": "the noise schedule the base model was made with: ddpm for SD 1.5 and SDXL, "
        "flowmatch for Flux",
        "train.optimizer": explain("optimizer"),
        "train.lr": explain("learning_rate"),
        "train.optimizer_params": explain("optimizer_args"),
        "train.lr_scheduler": explain("lr_scheduler"),
        "train.lr_scheduler_params": "details of the learning-rate schedule: how long the warm-up is, or that a "
        "linear schedule goes down from the full rate to zero",
        "train.dtype": f"{explain('mixed_precision')} (ai-toolkit keeps the base model in this format too)",
        "train.noise_offset": explain("noise_offset"),
        "train.min_snr_gamma": explain("min_snr_gamma"),
        "train.cache_text_embeddings": explain("cache_text_encoder_outputs"),
        "train.skip_first_sample": "no sample pictures before the first step (they would be made again at every "
        "resume)",
        "train.disable_sampling": "whether sample pictures are left out: on when the spec has no sample prompts",
        "model.name_or_path": explain("base_model"),
        "model.arch": explain("family"),
        "model.is_xl": "marks an SDXL model for ai-toolkit versions that do not read `arch`",
        "model.is_flux": "marks a Flux model for ai-toolkit versions that do not read `arch`",
        "model.quantize": "keep the base model in 8 bits to save memory: on only for `base_precision: fp8`",
        "model.qtype": "the 8-bit number format of the base model",
        "model.quantize_te": "also keep the caption reader in 8-bit",
        "model.qtype_te": "the 8-bit number format of the caption reader",
        "sample.sampler": "how sample pictures are drawn; it must match the noise schedule",
        "sample.sample_every": "draw sample pictures every this many steps (and once at the end)",
        "sample.width": "width of the sample pictures, in pixels",
        "sample.height": "height of the sample pictures, in pixels",
        "sample.prompts": "the captions the sample pictures are drawn from",
        "sample.neg": "what sample pictures should avoid: nothing",
        "sample.seed": "the randomness of the sample pictures, fixed so they can be compared over time",
        "sample.guidance_scale": "how closely sample pictures follow their caption",
        "sample.sample_steps": "how many steps each sample picture takes to draw",
    }


def describe_config(plan: Plan) -> list[ConfigLine]:
    meanings = _meanings(plan)
    lines = []
    for key, value in leaves(build_job(plan, folder=training_folder(plan))):
        shown = value if isinstance(value, str) else json.dumps(value)
        lines.append(ConfigLine(CONFIG_FILE, key, shown, meanings[key]))
    lines.append(
        ConfigLine(
            "environment",
            "SEED",
            str(plan.training.seed),
            f"{explain('seed')} (ai-toolkit takes it from the SEED environment variable lorabuild sets)",
        )
    )
    return lines


# --- launching -------------------------------------------------------------------------------------


def checkout(plan: Plan) -> Path:
    if not plan.backend.path:
        raise ValueError(
            "lorabuild does not know where ai-toolkit is installed: set `backend: {name: ai-toolkit, path: ...}`"
        )
    return Path(plan.backend.path).expanduser().resolve()


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
    """`python run.py <job>` in the checkout. ai-toolkit resumes by itself from the newest
    `<name>*.safetensors` in `<output_dir>/<name>/` (by creation time), so resuming needs no
    argument; the one thing done here is moving a half-written save out of its way."""
    root = checkout(plan)
    output_dir = output_dir.resolve()
    dry = max_steps is not None
    if not dry:
        if resume:
            set_aside_incomplete(plan, output_dir)
        elif any(_saves(plan, output_dir)):
            raise ValueError(
                f"ai-toolkit always continues from the saves in {output_dir / plan.name}; to start over, "
                "move that folder away first"
            )
    files: dict[Path, str] = {}
    variant = dry or batch_size is not None or gradient_accumulation is not None
    if variant or output_dir != training_folder(plan).resolve():
        # the job that trains exactly into output_dir, written beside what it writes
        job_path = output_dir / CONFIG_FILE
        job = build_job(
            plan,
            folder=output_dir,
            max_steps=max_steps,
            batch_size=batch_size,
            gradient_accumulation=gradient_accumulation,
        )
        files[job_path] = dump_job(job)
    else:
        job_path = config_dir.resolve() / CONFIG_FILE  # Gate 2's file is the real training
    env = {
        "PYTHONUNBUFFERED": "1",
        "PYTHONIOENCODING": "utf-8",
        "SEED": str(plan.training.seed),  # ai-toolkit seeds everything from it
    }
    # never a relative config path: ai-toolkit looks in its own config/ folder first
    argv = [plan.backend.python, str(root / "run.py"), str(job_path)]
    return Launch(argv=argv, cwd=root, env=env, files=files)


# --- reading its output ----------------------------------------------------------------------------

_NUMBER = r"[-+]?(?:nan|inf|\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)"
# tqdm: "<name>:  17%|#7   | 340/2000 [11:20<55:20,  2.00s/it, lr: 1.0e-04 loss: 3.943e-01]";
# the name has no spaces (sample bars such as "Generating Images:" are not steps)
_BAR = re.compile(
    r"^(?P<name>[^\s:]+):\s+\d+%\|[^|]*\|\s*(?P<step>\d+)/(?P<total>\d+)\s*"
    r"\[[\d:]+<[\d:?]+,\s*(?P<rate>[\d.]+|\?)\s*(?P<unit>s/it|it/s)(?P<postfix>[^\]]*)\]"
)
_LR = re.compile(rf"\blr:\s*(?P<v>{_NUMBER})", re.I)
_LOSS = re.compile(rf"\bloss:\s*(?P<v>{_NUMBER})", re.I)
_START = re.compile(r"^Running \d+ jobs?$|^#?\s*Running job:")
_FOUND = re.compile(r"^-?\s*Found (\d+) (?:images|videos)\b")
# older versions say "Saved to <path>"
_SAVED = re.compile(r"^Saved (?:checkpoint )?to (?P<path>.+\.safetensors)$")
_STEP_FILE = re.compile(r"_(\d{9})\.safetensors$")
_REMOVED = re.compile(r"^Removing old save: (?P<path>.+)$")
_RESUMED = re.compile(r"^Found step (\d+) in metadata, starting from there")
_OOM_SKIP = re.compile(r"OOM during training step, skipping batch (\d+)/(\d+)")
_ERROR = re.compile(r"^Error running job: (?P<message>.*)$")
_DONE = re.compile(r"^- (\d+) completed jobs?$")
_EXCEPTION = re.compile(r"^(?:ModuleNotFoundError|ImportError): (?P<message>.+)$")
_WARNING = re.compile(r"^WARNING\b:?\s*(?P<message>.+)$")
_MODEL_READY = ("Skipping first sample due to config setting", "Generating baseline samples before training")

_OOM = re.compile(
    r"OutOfMemoryError|CUDA out of memory|CUDA error: out of memory|OOM during training step \d+ times in a row|"
    r"DefaultCPUAllocator: can't allocate memory",
)
_NO_DATA = re.compile(r"no (?:images|videos) found in")
_CONFIG = re.compile(
    r"config file must have|Could not find config file|Environment variable .* not set|config file is invalid|"
    r"Unknown job type|Unknown process type|Unknown optimizer type|mutually exclusive|"
    r"must have cache_text_embeddings|Scheduler must be|Sampler .* not supported|save_format must be|"
    r"only supported with flux|Cannot bypass guidance embedding|Cannot use differential output preservation"
)
_MODEL = re.compile(
    r"name_or_path must be specified|Cannot access gated repo|401 Client Error|403 Client Error|"
    r"does not appear to have a file named|Repository Not Found|is not a valid model identifier"
)
_DIAGNOSIS_KINDS = {"model_missing": "model_load", "model_corrupt": "model_load", "model_family": "model_load"}


def error_kind(message: str) -> str:
    """What kind of failure ai-toolkit's own words describe (its messages first, then the shared table)."""
    if _NO_DATA.search(message):
        return "dataset"
    if _OOM.search(message):
        return "oom"
    if _CONFIG.search(message):
        return "config"
    if _MODEL.search(message):
        return "model_load"
    from lorabuild.diagnose import diagnose_text

    found = diagnose_text(message)
    return _DIAGNOSIS_KINDS.get(found.kind, found.kind) if found else "internal"


@dataclass
class LogReader:
    """Turns ai-toolkit's console lines into events.

    It remembers per run (starting over at run.py's "Running 1 job"): that a NaN loss was already
    reported — ai-toolkit prints "loss is nan" at every such step and trains on with the loss set
    to 0, so the first one is the error —, the last job error, whose traceback ends by repeating
    it, and whether the final LoRA was saved, which ai-toolkit always does before it says a job
    completed.
    """

    nan_reported: bool = False
    last_error: str = ""
    final_saved: bool = False

    def reset(self) -> None:
        self.nan_reported, self.last_error, self.final_saved = False, "", False

    def feed(self, line: str) -> list[Event]:
        bar = _BAR.search(line)
        if bar:
            # the bar is drawn without a newline, so a line printed next (an error, "loss is nan")
            # lands at its end
            rest = line[bar.end() :].strip()
            return self._bar(bar) + (self.feed(rest) if rest else [])
        if _START.search(line):
            self.reset()
            return []
        if line == "loss is nan":
            return self._nan("ai-toolkit reported `loss is nan` and continues with the loss set to 0")
        if match := _SAVED.match(line):
            path = match.group("path").strip()
            step = _STEP_FILE.search(path)
            if step:
                data: dict[str, Any] = {"path": path, "step": int(step.group(1))}
                epoch = saved_epoch(Path(path))
                if epoch is not None:
                    data["epoch"] = epoch
                return [Event("checkpoint", data)]
            self.final_saved = True
            return [Event("saved", {"path": path})]
        if match := _REMOVED.match(line):
            return [Event("checkpoint_removed", {"path": match.group("path").strip()})]
        if match := _RESUMED.match(line):
            return [Event("resumed", {"step": int(match.group(1))})]
        if match := _FOUND.match(line):
            return [Event("dataset", {"images": int(match.group(1))})]
        if line in _MODEL_READY:
            return [Event("model_loaded", {})]
        if match := _OOM_SKIP.search(line):
            return [
                Event(
                    "warning",
                    {
                        # the step still counts: a dry run that skips batches has not proven they fit
                        "kind": "oom",
                        "message": f"ran out of memory on a batch and skipped it ({match.group(1)} of "
                        f"{match.group(2)} in a row allowed); the step still counts",
                    },
                )
            ]
        if match := _ERROR.match(line):
            message = match.group("message").strip()
            self.last_error = message
            return [Event("error", {"kind": error_kind(message), "message": message})]
        if line == "Job stopped" or line.startswith("KeyboardInterrupt"):
            # Ctrl-C makes ai-toolkit exit 0 ("Job stopped"): a clean exit that is not a finished run
            return [Event("error", {"kind": "interrupted", "message": "ai-toolkit was stopped before it finished"})]
        if match := _EXCEPTION.match(line):
            message = match.group("message").strip()
            if message == self.last_error:
                return []  # the traceback repeating the job error already reported
            return [Event("error", {"kind": "not_installed", "message": line})]
        if match := _DONE.match(line):
            if not int(match.group(1)):
                return []  # "0 completed jobs": the failure line follows the error already read
            if not self.final_saved:
                message = "ai-toolkit said the job completed, but it never saved the finished LoRA"
                return [Event("error", {"kind": "internal", "message": message})]
            return [Event("done", {})]
        if match := _WARNING.match(line):
            return [Event("warning", {"message": match.group("message")})]
        return []

    def _bar(self, bar: re.Match[str]) -> list[Event]:
        postfix = bar.group("postfix")
        loss_match, lr_match = _LOSS.search(postfix), _LR.search(postfix)
        if loss_match is None:
            return []  # drawn before the first step finished: nothing learnt yet
        loss = float(loss_match.group("v"))
        total = int(bar.group("total"))
        # the bar shows the index of the step just done (ai-toolkit moves it to `step`, counted
        # from 0, after each step): one more steps are complete
        done = min(int(bar.group("step")) + 1, total)
        data: dict[str, Any] = {"step": done, "total_steps": total, "loss": loss}
        if lr_match:
            data["lr"] = float(lr_match.group("v"))
        rate = bar.group("rate")
        if rate != "?" and float(rate) > 0:
            data["step_seconds"] = float(rate) if bar.group("unit") == "s/it" else round(1 / float(rate), 6)
        events = [Event("step", data)]
        if not math.isfinite(loss):
            events += self._nan(f"the loss became {loss} at step {data['step']}")
        return events

    def _nan(self, message: str) -> list[Event]:
        if self.nan_reported:
            return []
        self.nan_reported = True
        return [Event("error", {"kind": "nan", "message": message})]


_reader = LogReader()


def parse_log_line(line: str) -> list[Event]:
    return _reader.feed(line)


def metrics_files(plan: Plan, output_dir: Path) -> list[Path]:
    # ai-toolkit's metrics file is SQLite (loss_log.db, only with use_ui_logger), not lines to
    # follow; the progress bar already carries the loss and learning rate of every step
    return []


def parse_metrics_line(path: Path, line: str) -> list[Event]:
    return []


def is_out_of_memory(text: str) -> bool:
    return bool(_OOM.search(text))


# --- outputs and resume ----------------------------------------------------------------------------


def save_root(plan: Plan, output_dir: Path) -> Path:
    return output_dir / plan.name


def final_lora(plan: Plan, output_dir: Path) -> Path:
    return save_root(plan, output_dir) / f"{plan.name}.safetensors"


# BaseSDTrainProcess.sample: <save_root>/samples/<epoch ms>__<step:09d>_<idx>.<jpg|png|webp>
_SAMPLE = re.compile(r"^\d+__(\d+)_(\d+)\.(jpg|jpeg|png|webp)$")


def sample_pictures(plan: Plan, output_dir: Path) -> list[tuple[Path, str]]:
    folder = save_root(plan, output_dir) / "samples"
    if not folder.is_dir():
        return []
    found = []
    for entry in sorted(folder.iterdir()):
        m = _SAMPLE.match(entry.name)
        if m and entry.is_file():
            found.append((entry, f"step-{int(m.group(1)):09d}-{int(m.group(2)) + 1}.{m.group(3)}"))
    return found


def _saves(plan: Plan, output_dir: Path) -> list[tuple[Path, int]]:
    """Numbered saves `<name>_<step:09d>.safetensors`, whatever their state."""
    folder = save_root(plan, output_dir)
    if not folder.is_dir():
        return []
    pattern = re.compile(rf"^{re.escape(plan.name)}_(\d{{9}})\.safetensors$")
    found = []
    for path in folder.iterdir():
        match = pattern.match(path.name)
        if match and path.is_file():
            found.append((path, int(match.group(1))))
    return found


def read_header(path: Path) -> dict[str, Any] | None:
    """The JSON header of a complete safetensors file; None when the file is cut short or damaged."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                return None
            (length,) = struct.unpack("<Q", head)
            if length < 2 or 8 + length > size:
                return None
            header = json.loads(handle.read(length))
    except (OSError, ValueError):
        return None
    if not isinstance(header, dict):
        return None
    ends = [
        int(info["data_offsets"][1])
        for name, info in header.items()
        if name != "__metadata__" and isinstance(info, dict) and "data_offsets" in info
    ]
    # a file killed while being written is shorter than its header says
    return header if 8 + length + max(ends, default=0) <= size else None


def saved_epoch(path: Path) -> int | None:
    """The epoch ai-toolkit wrote into a save's metadata (`training_info`), when it can be read.

    ai-toolkit counts an epoch when its data runs out, so a save made every N epochs' worth of
    steps carries N, 2N, ... as lorabuild counts them."""
    header = read_header(path)
    metadata = header.get("__metadata__") if header else None
    if not isinstance(metadata, dict):
        return None
    try:
        epoch = json.loads(metadata["training_info"])["epoch"]
    except (KeyError, TypeError, ValueError):
        return None
    return epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None


def checkpoints(plan: Plan, output_dir: Path) -> list[Checkpoint]:
    per_epoch = plan.steps.steps_per_epoch
    found = []
    for path, step in _saves(plan, output_dir):
        header = read_header(path)
        if header is None:
            continue
        metadata = header.get("__metadata__")
        key = metadata.get("lorabuild_resume_key") if isinstance(metadata, dict) else None
        epoch = step // per_epoch if per_epoch else 0
        found.append(Checkpoint(path, step, epoch, path, key if isinstance(key, str) else None))
    return sorted(found, key=lambda c: (c.step, c.path.stat().st_mtime))


def incomplete_folder(output_dir: Path) -> Path:
    """Where saves that were cut short are moved: outside the save folder, where ai-toolkit never looks."""
    return output_dir / INCOMPLETE_FOLDER


def set_aside_incomplete(plan: Plan, output_dir: Path) -> list[Path]:
    """Move saves that were cut short (killed mid-write) out of the save folder.

    ai-toolkit resumes from the newest file starting with the LoRA's name, whatever its state,
    and would fail on a half-written one at every start; without it, the newest complete save
    is the newest file."""
    moved = []
    for path, _ in _saves(plan, output_dir):
        if read_header(path) is None:
            target = incomplete_folder(output_dir) / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
            moved.append(target)
    return moved


def prune_checkpoints(plan: Plan, output_dir: Path) -> list[Path]:
    """ai-toolkit keeps `max_step_saves_to_keep` itself; this removes what it leaves: older saves
    (after keep_last was lowered, say) and saves that were cut short."""
    complete = checkpoints(plan, output_dir)
    keep = max(1, plan.checkpoints.keep_last)
    doomed = [c.path for c in complete[:-keep]]
    kept = {c.path for c in complete}
    doomed += [path for path, _ in _saves(plan, output_dir) if path not in kept]
    aside = incomplete_folder(output_dir)
    doomed += sorted(aside.glob(f"{plan.name}_*.safetensors")) if aside.is_dir() else []
    removed = []
    for path in doomed:
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        removed.append(path)
    if aside.is_dir() and not any(aside.iterdir()):
        aside.rmdir()
    return removed


# --- installation ----------------------------------------------------------------------------------


def install_commands(plan: Plan) -> list[list[str]]:
    """Clone, make a venv, install its requirements: on a remote machine where it is missing."""
    where = plan.backend.path or "~/ai-toolkit"
    script = (
        'set -e; [ -d "$1/.git" ] || git clone --depth 1 "$2" "$1"; '
        '[ -x "$1/venv/bin/python" ] || python3 -m venv "$1/venv"; '
        '"$1/venv/bin/pip" install --quiet torch torchvision; '
        '"$1/venv/bin/pip" install --quiet -r "$1/requirements.txt"'
    )
    return [["sh", "-c", script, "install-ai-toolkit", where, REPOSITORY]]


def remote_entry_point(plan: Plan) -> str | None:
    return f"{plan.backend.path or '~/ai-toolkit'}/run.py"


def install_text(where: str = "~/ai-toolkit") -> str:
    return (
        f"git clone {REPOSITORY} {where} && cd {where} && python3 -m venv venv && "
        "venv/bin/pip install torch torchvision && venv/bin/pip install -r requirements.txt"
    )


def installation(plan: Plan) -> Installation:
    if not plan.backend.path:
        return Installation(
            False,
            "lorabuild does not know where ai-toolkit is installed (`backend.path` is not set)",
            f"install it ({install_text()}), then set `backend: {{name: ai-toolkit, path: ~/ai-toolkit}}`",
        )
    root = Path(plan.backend.path)
    entry = root / "run.py"
    if not root.is_dir():
        return Installation(
            False,
            f"ai-toolkit was not found at {root}",
            f"install it there ({install_text(str(root))}), or point `backend.path` at your checkout",
        )
    if not entry.is_file() or not (root / "toolkit").is_dir():
        return Installation(
            False,
            f"{root} is not an ai-toolkit checkout (it has no run.py and toolkit/ folder)",
            f"point `backend.path` at the folder `git clone {REPOSITORY}` made",
        )
    version = git_version(root)
    shown = f"commit {version}" if version else "version unknown"
    return Installation(True, f"ai-toolkit ({shown}) at {root}", version=version, entry_point=str(entry))


def git_version(root: Path) -> str | None:
    """The checkout's commit, read from .git (ai-toolkit has no version number)."""
    git = root / ".git"
    try:
        head = (git / "HEAD").read_text(encoding="utf-8").strip()
        if not head.startswith("ref:"):
            return head[:8] or None
        ref = head.split(":", 1)[1].strip()
        loose = git / ref
        if loose.is_file():
            return loose.read_text(encoding="utf-8").strip()[:8] or None
        for line in (git / "packed-refs").read_text(encoding="utf-8").splitlines():
            if line.endswith(" " + ref):
                return line.split()[0][:8]
    except OSError:
        return None
    return None


def probe_command(plan: Plan) -> list[str]:
    modules = list(BASE_MODULES)
    if plan.training.optimizer in OPTIMIZER_MODULES:
        modules.append(OPTIMIZER_MODULES[plan.training.optimizer])
    if plan.training.base_precision == QUANTISED_BASE:
        modules.append("optimum.quanto")
    return [plan.backend.python, "-c", PROBE_SOURCE, *modules]


def new_log_reader() -> Callable[[str], list[Event]]:
    """A reader with its own state, for a log of a run lorabuild did not launch."""
    return LogReader().feed
