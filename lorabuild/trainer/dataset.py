"""The training images and captions, from files on disk to cached latents and text features.

This module owns finding the planned image files, reading their captions (strictly UTF-8),
the image preprocessing of docs/trainer.md (RGB, shorter side to `resolution`, centre crop),
and computing the frozen VAE latents and text-encoder outputs once, before training. The
file checks need no torch, so a missing image or a bad caption fails before the slow imports.
Failures are `TrainerError`s of kind `dataset` or `caption`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorabuild.trainer.config import IMAGE_EXTENSIONS, DatasetConfig
from lorabuild.trainer.events import TrainerError, is_out_of_memory

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from lorabuild.trainer.model import BaseModel


@dataclass(frozen=True)
class DatasetFiles:
    images: tuple[Path, ...]
    captions: tuple[str, ...]  # "" where an image has no caption file
    caption_files: int  # how many images have a non-empty caption


def _dataset_error(message: str, detail: str) -> TrainerError:
    return TrainerError("dataset", message, detail)


def list_images(dataset: DatasetConfig) -> tuple[Path, ...]:
    root = dataset.path
    if not root.is_dir():
        raise _dataset_error(
            f"The dataset folder {root} does not exist or is not a folder. Fix: set dataset.path in the "
            "spec to the folder that holds the training images.",
            str(root),
        )
    if dataset.images is not None:
        if not dataset.images:
            raise _dataset_error(
                "The config lists no training images (dataset.images is empty). Fix: add images to "
                f"{root} and run lorabuild again so it re-plans.",
                str(root),
            )
        paths = []
        for name in dataset.images:
            path = (root / name).resolve()
            if not path.is_file():
                raise _dataset_error(
                    f"The image {name} that lorabuild planned with is no longer in {root}. Fix: restore "
                    "it, or run lorabuild again so it re-plans with the current files.",
                    str(path),
                )
            paths.append(path)
        return tuple(paths)
    # No list in the config: every image file in the folder, in a stable order.
    found = tuple(sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS))
    if not found:
        raise _dataset_error(
            f"The dataset folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)}). Fix: add "
            "training images or point dataset.path at the right folder.",
            str(root),
        )
    return found


def read_caption(path: Path) -> str:
    """A caption file's text, whitespace collapsed. Raises TrainerError(kind='caption')."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise TrainerError(
            "caption",
            f"The caption file {path} could not be read ({exc.strerror}). Fix: check that it exists and is readable.",
            f"{path}: {exc}",
        ) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise TrainerError(
            "caption",
            f"The caption file {path} is not valid UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
            f"{exc.start}, line {line}). Captions must be UTF-8. Fix: re-save the file as UTF-8 in "
            "your editor (or convert it, e.g. `iconv -f latin1 -t utf-8`).",
            f"{path}: {exc}",
        ) from None
    return re.sub(r"\s+", " ", text).strip()


def dataset_files(dataset: DatasetConfig) -> DatasetFiles:
    images = list_images(dataset)
    captions: list[str] = []
    with_file = 0
    for image in images:
        caption_path = image.with_suffix(dataset.caption_extension)
        caption = read_caption(caption_path) if caption_path.is_file() else ""
        captions.append(caption)
        with_file += bool(caption)
    return DatasetFiles(images, tuple(captions), with_file)


def load_image(path: Path, resolution: int) -> Image.Image:
    """RGB, shorter side resized to `resolution`, centre-cropped to a square."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened) or opened
            image = image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
        if is_out_of_memory(exc):
            raise
        raise _dataset_error(
            f"The image {path} could not be read ({type(exc).__name__}: {exc}). It is damaged or not an "
            "image. Fix: replace it with a valid PNG/JPEG/WebP, or remove it (and its caption) from the "
            "dataset and run lorabuild again.",
            f"{path}: {type(exc).__name__}: {exc}",
        ) from None
    width, height = image.size
    scale = resolution / min(width, height)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


@dataclass
class EncodedDataset:
    latents: torch.Tensor  # [N, C, h, w], float32, already × scaling_factor
    flipped_latents: torch.Tensor | None  # same for the mirrored images (flip_aug)
    text: torch.Tensor  # [N, tokens, dim], the text encoder's last hidden state
    truncated: tuple[str, ...]  # image names whose captions were longer than the encoder reads


def _to_tensor(image: Image.Image) -> torch.Tensor:
    import numpy as np
    import torch

    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def encode_dataset(
    files: DatasetFiles,
    model: BaseModel,
    resolution: int,
    flip: bool,
    device: torch.device,
    batch: int = 4,
) -> EncodedDataset:
    import torch
    from PIL import Image

    vae: Any = model.vae
    scaling = float(getattr(vae.config, "scaling_factor", 0.18215))
    latents: list[torch.Tensor] = []
    flipped: list[torch.Tensor] = []
    with torch.no_grad():
        for start in range(0, len(files.images), batch):
            images = [load_image(p, resolution) for p in files.images[start : start + batch]]
            pixels = torch.stack([_to_tensor(im) for im in images]).to(device)
            # The mean, not a sample: the cache is computed once, and a fixed sample would bake
            # one draw of VAE noise into every epoch anyway.
            latents.append(vae.encode(pixels).latent_dist.mean.float().cpu() * scaling)
            if flip:
                mirrored = torch.stack([_to_tensor(im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)) for im in images]).to(
                    device
                )
                flipped.append(vae.encode(mirrored).latent_dist.mean.float().cpu() * scaling)

        tokenizer = model.tokenizer
        max_length = int(tokenizer.model_max_length)
        truncated = tuple(
            p.name
            for p, caption in zip(files.images, files.captions, strict=True)
            if len(tokenizer(caption, truncation=False)["input_ids"]) > max_length
        )
    return EncodedDataset(
        latents=torch.cat(latents),
        flipped_latents=torch.cat(flipped) if flip else None,
        text=encode_texts(model, list(files.captions), device),
        truncated=truncated,
    )


def encode_texts(model: Any, texts: list[str], device: Any) -> Any:
    """The frozen text encoder's features of `texts` (padded, truncated to its length), float32
    on the CPU: the captions to train on, and the prompts of sample pictures."""
    import torch

    tokenizer = model.tokenizer
    features: list[torch.Tensor] = []
    with torch.no_grad():
        for start in range(0, len(texts), 8):
            ids = tokenizer(
                texts[start : start + 8],
                padding="max_length",
                max_length=int(tokenizer.model_max_length),
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(device)
            features.append(model.text_encoder(ids)[0].float().cpu())
    return torch.cat(features)
