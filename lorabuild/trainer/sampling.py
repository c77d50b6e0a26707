"""Sample pictures during training: each prompt rendered with the LoRA as it is at the end of an
epoch, so an artist can watch it learn (and stop a run that goes wrong early).

Rendering never touches the training's random state: every picture has its own generator,
seeded from the sample seed and the prompt's index, so the same prompt gives comparable
pictures from epoch to epoch, and a run with samples trains exactly like one without.
Classifier-free guidance with DDIM, as the usual SD pipelines sample.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GUIDANCE_SCALE = 7.0  # the usual SD 1.x default: follows the prompt without burning the colours


def sample_name(epoch: int, index: int) -> str:
    return f"epoch-{epoch:04d}-{index + 1}.png"


@dataclass
class Sampler:
    """What rendering needs, prepared before training frees the text encoder: the prompts'
    text features (and the empty prompt's, for guidance), the VAE to decode, a DDIM schedule."""

    prompts: tuple[str, ...]
    cond: Any  # (n, tokens, dim) text features of the prompts
    uncond: Any  # (1, tokens, dim) of the empty prompt
    vae: Any
    scheduler_config: Any
    steps: int
    seed: int
    resolution: int
    folder: Path

    @classmethod
    def prepare(
        cls, model: Any, prompts: tuple[str, ...], steps: int, seed: int, resolution: int, folder: Path
    ) -> Sampler:
        from lorabuild.trainer.dataset import encode_texts

        features = encode_texts(model, ["", *prompts], model.text_encoder.device)
        config = model.noise_scheduler.config
        return cls(prompts, features[1:], features[:1], model.vae, config, steps, seed, resolution, folder)

    def render(self, unet: Any, epoch: int, seed_for: Any) -> list[Path]:
        """Render every prompt with `unet` (the LoRA attached) into the samples folder; the
        written paths. `seed_for(index)` gives the generator seed of a prompt."""
        import numpy as np
        import torch
        from diffusers import DDIMScheduler
        from PIL import Image

        scheduler = DDIMScheduler.from_config(self.scheduler_config)
        scheduler.set_timesteps(self.steps)
        device = next(unet.parameters()).device
        dtype = next(unet.parameters()).dtype
        size = self.resolution // 8
        channels = int(unet.config.in_channels)
        # A half-precision UNet with the float32 LoRA hooked in needs autocast, as in training.
        autocast: Any = nullcontext()
        if dtype != torch.float32:
            autocast = torch.autocast(device_type=device.type, dtype=dtype)
        was_training = unet.training
        unet.eval()
        self.folder.mkdir(parents=True, exist_ok=True)
        written = []
        try:
            with torch.no_grad(), autocast:
                for index in range(len(self.prompts)):
                    gen = torch.Generator().manual_seed(seed_for(index))
                    latents = torch.randn((1, channels, size, size), generator=gen).to(device, dtype)
                    latents = latents * scheduler.init_noise_sigma
                    text = torch.cat([self.uncond, self.cond[index : index + 1]]).to(device, dtype)
                    for t in scheduler.timesteps:
                        model_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
                        uncond_pred, cond_pred = unet(model_in, t, encoder_hidden_states=text).sample.chunk(2)
                        guided = uncond_pred + GUIDANCE_SCALE * (cond_pred - uncond_pred)
                        latents = scheduler.step(guided, t, latents).prev_sample
                    vae_dtype = next(self.vae.parameters()).dtype
                    with torch.autocast(device_type=device.type, enabled=False):  # the VAE stays float32
                        image = self.vae.decode(latents.to(vae_dtype) / self.vae.config.scaling_factor).sample
                    pixels = ((image[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu()
                    path = self.folder / sample_name(epoch, index)
                    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
                    Image.fromarray(np.asarray(pixels)).save(tmp, format="PNG")
                    os.replace(tmp, path)
                    written.append(path)
        finally:
            if was_training:
                unet.train()
        return written
