"""The `tiny-sd` demo model: an SD-1.x-architecture diffusers model small enough for a CPU.

This module owns building the demo model from a fixed seed without network (a byte-level
CLIP tokenizer, a 2-layer CLIP text encoder, a 2-level cross-attention UNet, a 4-level VAE,
a DDPM scheduler), saving it as a diffusers folder with the `lorabuild-demo.json` marker, and
doing so atomically: the folder is built under a temporary name and renamed into place, so a
folder at the final path is always complete. Checking for the marker needs no torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any, Final

from lorabuild.trainer.files import normal_permissions

DEMO_MODEL_NAME: Final = "tiny-sd"
DEMO_MODEL_VERSION: Final = 1
DEMO_MARKER: Final = "lorabuild-demo.json"
DEMO_MODELS: Final = (DEMO_MODEL_NAME,)
DEMO_RESOLUTION: Final = 64


def demo_marker(path: Path) -> dict[str, Any] | None:
    """The parsed marker file of a demo model folder, or None when there is none."""
    try:
        data = json.loads((Path(path) / DEMO_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_demo_model(path: Path, name: str = DEMO_MODEL_NAME) -> bool:
    """True when `path` holds the current version of the demo model `name`."""
    marker = demo_marker(path)
    return marker is not None and marker.get("demo") == name and marker.get("version") == DEMO_MODEL_VERSION


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte -> printable-character table, which CLIP's tokenizer also uses.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def _write_tokenizer_files(folder: Path) -> tuple[Path, Path, dict[str, int]]:
    # Byte-level vocabulary with no merges: every caption tokenizes without any download.
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    vocab_file = folder / "vocab.json"
    merges_file = folder / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n", encoding="utf-8")
    return vocab_file, merges_file, vocab


def _build_into(folder: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="lorabuild-tok-") as tok_dir:
        vocab_file, merges_file, vocab = _write_tokenizer_files(Path(tok_dir))
        tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=77)

    # Every weight comes from this seed; the fork keeps the caller's global RNG untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(vocab),
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                bos_token_id=vocab["<|startoftext|>"],
                eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"],
                projection_dim=32,
            )
        )
        unet = UNet2DConditionModel(
            sample_size=DEMO_RESOLUTION // 8,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=DEMO_RESOLUTION,
        )
    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        steps_offset=1,
    )
    pipe: Any = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    (folder / DEMO_MARKER).write_text(
        json.dumps({"demo": DEMO_MODEL_NAME, "version": DEMO_MODEL_VERSION}) + "\n", encoding="utf-8"
    )


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def make_demo_model(path: Path | str, name: str = DEMO_MODEL_NAME) -> bool:
    """Create the demo model `name` at `path` unless it is already there.

    Returns True when it was created, False when `path` already held it. An empty folder or
    an older version of the demo is replaced; any other existing folder is left alone and
    FileExistsError is raised, since it may be someone's real model.
    """
    if name not in DEMO_MODELS:
        raise ValueError(f"unknown demo model {name!r}; known: {', '.join(DEMO_MODELS)}")
    path = Path(path).absolute()
    if is_demo_model(path, name):
        return False
    if path.exists() and not _is_empty_dir(path) and demo_marker(path) is None:
        raise FileExistsError(f"{path} exists and is not a lorabuild demo model")
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkdir (not mkdtemp) so the final folder gets the usual umask permissions, not 0700.
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        _build_into(tmp)
        normal_permissions(tmp)
        _move_into_place(tmp, path, name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


def _move_into_place(tmp: Path, path: Path, name: str) -> None:
    old: Path | None = None
    if path.exists() and not _is_empty_dir(path):
        # An outdated demo: move it aside first, so `path` is never half old, half new.
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        os.replace(path, old / "model")
    try:
        os.replace(tmp, path)  # atomic; also replaces an empty folder
    except OSError:
        # Another process won the race; its complete copy is as good as ours.
        if not is_demo_model(path, name):
            raise
    finally:
        if old is not None:
            with contextlib.suppress(OSError):
                shutil.rmtree(old)
