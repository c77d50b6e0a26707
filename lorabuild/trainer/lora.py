"""The LoRA network: what is trained, and how it is written to a `.safetensors` file.

This module owns attaching low-rank adapters to the UNet's attention projections (`to_q`,
`to_k`, `to_v`, `to_out.0`) as forward hooks, so the UNet itself is untouched, with
`y = W x + up(down(x)) × alpha / rank`; the kohya/webui key names that diffusers'
`load_lora_weights` and the web UIs read; and writing the file atomically with its
`ss_*` metadata. Requires torch.
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import torch
from torch import nn

from lorabuild.trainer.files import normal_permissions

TARGET_SUFFIXES: Final = (".to_q", ".to_k", ".to_v", ".to_out.0")
SAVE_DTYPES: Final = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32}


def kohya_name(module_path: str, prefix: str = "lora_unet") -> str:
    """`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0` ->
    `lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0`."""
    return f"{prefix}_{module_path.replace('.', '_')}"


def target_modules(unet: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """The UNet's attention projections, in module order (which fixes the init order)."""
    for path, module in unet.named_modules():
        if isinstance(module, nn.Linear) and path.endswith(TARGET_SUFFIXES):
            yield path, module


class LoRAModule(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.lora_down = nn.Linear(in_features, rank, bias=False)
        self.lora_up = nn.Linear(rank, out_features, bias=False)
        self.rank = rank
        self.alpha = alpha
        self.scale = alpha / rank

    def reset(self, generator: torch.Generator) -> None:
        # Same init as nn.Linear / peft / kohya: a Kaiming-uniform `down`, a zero `up`, so the
        # network starts as the identity and the base model's output is unchanged at step 0.
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.lora_up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_up(self.lora_down(x)) * self.scale


class LoRANetwork(nn.ModuleDict):
    """LoRA modules keyed by kohya name, so `state_dict()` already has the file's key names."""

    def __init__(self, unet: nn.Module, rank: int, alpha: float, seed: int) -> None:
        super().__init__()
        self.rank = rank
        self.alpha = alpha
        self.module_paths: dict[str, str] = {}
        self._targets: dict[str, nn.Linear] = {}
        self._handles: list[Any] = []
        generator = torch.Generator().manual_seed(seed)
        for path, linear in target_modules(unet):
            name = kohya_name(path)
            module = LoRAModule(linear.in_features, linear.out_features, rank, alpha)
            module.reset(generator)
            self[name] = module
            self.module_paths[name] = path
            self._targets[name] = linear
        if not self.module_paths:
            raise ValueError("the UNet has no attention projections (to_q/to_k/to_v/to_out.0) to train")

    def attach(self) -> None:
        for name, linear in self._targets.items():
            self._handles.append(linear.register_forward_hook(_make_hook(self[name])))

    def detach_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def export(self, save_precision: str) -> dict[str, torch.Tensor]:
        """The tensors of the LoRA file: down [rank, in], up [out, rank], alpha (scalar)."""
        dtype = SAVE_DTYPES[save_precision]
        tensors: dict[str, torch.Tensor] = {}
        for name in self.module_paths:
            module = self[name]
            assert isinstance(module, LoRAModule)
            tensors[f"{name}.lora_down.weight"] = module.lora_down.weight.detach().to("cpu", dtype).contiguous()
            tensors[f"{name}.lora_up.weight"] = module.lora_up.weight.detach().to("cpu", dtype).contiguous()
            tensors[f"{name}.alpha"] = torch.tensor(float(self.alpha), dtype=dtype)
        return tensors


def _make_hook(module: nn.Module) -> Any:
    def hook(_linear: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        return output + module(args[0]).to(output.dtype)

    return hook


def save_lora(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> int:
    """Write atomically (temporary name beside it, then rename). Returns the file's size."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        normal_permissions(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path.stat().st_size
