"""Finding, checking and loading the base model (a diffusers SD-1.x/2.x folder).

This module owns the model side of a run: the cheap layout check that runs before torch is
imported (so a wrong path fails in a fraction of a second), creating the demo model when the
config asks for it, and loading the five components with network access off. Every failure
that is the model's fault becomes a `TrainerError` of kind `model_load`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from lorabuild.trainer.demo import DEMO_MODELS, demo_marker, is_demo_model, make_demo_model
from lorabuild.trainer.events import TrainerError, is_out_of_memory

if TYPE_CHECKING:
    import torch

COMPONENTS: Final = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")


def _fail(path: Path, problem: str, fix: str, detail: str = "") -> TrainerError:
    return TrainerError("model_load", f"The base model at {path} {problem}. Fix: {fix}", detail or str(path))


def check_model_folder(path: Path) -> None:
    """Fail early, without torch, when `path` cannot be a diffusers SD model folder."""
    fix_path = (
        "set model.path in the spec to a diffusers-format Stable Diffusion folder (one holding "
        "model_index.json), or use the demo model"
    )
    if not path.exists():
        raise _fail(path, "does not exist", fix_path)
    if not path.is_dir():
        if path.suffix in (".safetensors", ".ckpt"):
            raise _fail(
                path,
                "is a single-file checkpoint, which this trainer cannot read",
                "convert it to a diffusers folder first (diffusers' "
                "StableDiffusionPipeline.from_single_file(...).save_pretrained(DIR))",
            )
        raise _fail(path, "is a file, not a folder", fix_path)
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise _fail(path, "is not a diffusers-format model (it has no model_index.json)", fix_path)
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise _fail(
            path, "has a model_index.json that cannot be read", "re-download or re-create the model", str(exc)
        ) from None
    if not isinstance(index, dict):
        raise _fail(path, "has a malformed model_index.json", "re-download or re-create the model")
    if index.get("text_encoder_2") or index.get("transformer"):
        raise _fail(
            path,
            f"is a {index.get('_class_name', 'non-SD-1.x/2.x')} model, which the builtin "
            "trainer does not support (it trains SD 1.x/2.x: one text encoder and a UNet)",
            "use an SD 1.x/2.x model, or another backend for this model family",
        )
    missing = [name for name in COMPONENTS if not (path / name).is_dir()]
    if missing:
        raise _fail(
            path,
            f"is incomplete: the folder(s) {', '.join(missing)} are missing",
            "re-download or re-create the model",
        )


def ensure_model(path: Path, demo: str | None) -> bool:
    """Make sure `path` holds a usable model, creating the demo there if asked. True if created."""
    if demo is None:
        check_model_folder(path)
        return False
    if demo not in DEMO_MODELS:
        raise TrainerError(
            "config",
            f"The config names the demo model {demo!r}, which this trainer does not know. Fix: use "
            f"one of {', '.join(DEMO_MODELS)}, or set model.demo to null for a real model.",
            "model.demo",
        )
    if is_demo_model(path, demo):
        return False
    if path.exists() and demo_marker(path) is None and not (path.is_dir() and not any(path.iterdir())):
        raise _fail(
            path,
            f"exists but does not hold the demo model {demo!r}, so the trainer will not overwrite it",
            "point model.path at an empty or new folder, or set model.demo to null if this is a real model",
        )
    try:
        make_demo_model(path, demo)
    except OSError as exc:
        if is_out_of_memory(exc):
            raise
        raise _fail(
            path,
            f"could not be created as the demo model ({exc})",
            "check that the folder's parent exists and is writable",
            str(exc),
        ) from None
    return True


@dataclass
class BaseModel:
    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    noise_scheduler: Any
    prediction_type: str


def load_model(path: Path, device: torch.device, weight_dtype: torch.dtype) -> BaseModel:
    """Load the frozen components. The VAE stays float32: it only encodes, once, and SD VAEs
    are known to overflow in fp16."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    check_model_folder(path)
    part = ""
    try:
        part = "tokenizer"
        tokenizer = CLIPTokenizer.from_pretrained(str(path / "tokenizer"), local_files_only=True)
        part = "text_encoder"
        text_encoder: Any = CLIPTextModel.from_pretrained(
            str(path / "text_encoder"), local_files_only=True, dtype=torch.float32
        )
        part = "vae"
        vae = AutoencoderKL.from_pretrained(str(path / "vae"), local_files_only=True, torch_dtype=torch.float32)
        part = "unet"
        unet = UNet2DConditionModel.from_pretrained(
            str(path / "unet"), local_files_only=True, torch_dtype=torch.float32
        )
        part = "scheduler"
        # Training always uses DDPM noising; the folder's own (sampling) scheduler only
        # supplies the beta schedule and prediction type.
        noise_scheduler = DDPMScheduler.from_pretrained(str(path / "scheduler"), local_files_only=True)
    except Exception as exc:
        if is_out_of_memory(exc):
            raise
        raise _fail(
            path,
            f"could not be loaded: its {part} is missing files or corrupt ({type(exc).__name__}: {str(exc)[:300]})",
            "re-download or re-create the model (for the demo model, delete the folder and run again)",
            f"{part}: {type(exc).__name__}: {exc}",
        ) from None

    ucfg = unet.config
    if getattr(ucfg, "addition_embed_type", None) or getattr(ucfg, "class_embed_type", None):
        raise _fail(
            path,
            "has a UNet with extra conditioning (SDXL-style or class-conditioned), which the "
            "builtin trainer does not support",
            "use an SD 1.x/2.x model",
        )
    if ucfg.cross_attention_dim != text_encoder.config.hidden_size:
        raise _fail(
            path,
            f"does not fit together: the UNet expects {ucfg.cross_attention_dim}-dimensional "
            f"text features but the text encoder gives {text_encoder.config.hidden_size}",
            "re-download the model",
        )
    if ucfg.in_channels != vae.config.latent_channels:
        raise _fail(
            path,
            f"does not fit together: the UNet takes {ucfg.in_channels} channels but the VAE "
            f"makes {vae.config.latent_channels}",
            "use a text-to-image SD model (not inpainting)",
        )
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise _fail(
            path,
            f"predicts {prediction_type!r}, which the trainer does not support",
            "use a model that predicts epsilon or v_prediction",
        )

    for module in (text_encoder, vae, unet):
        module.requires_grad_(False)
        module.eval()
    vae.to(device)
    for module in (text_encoder, unet):
        # Only cast when needed: diffusers warns about any dtype `.to()`, even a no-op one.
        module.to(device) if weight_dtype == torch.float32 else module.to(device, dtype=weight_dtype)
    return BaseModel(tokenizer, text_encoder, vae, unet, noise_scheduler, prediction_type)
