"""How fast `lorabuild validate` checks a studio's catalogue of specs (issue #7: 500 in under 2 s).

Writes COUNT varied specs (four model families, three presets, four backends, half with a
declared cloud GPU) that share four datasets and three synthetic base models (a real safetensors
header, then zeros as a sparse file of the model's real size), then validates the whole folder as
a fresh process RUNS times (interpreter start-up included) and prints the median and the specs
per second. Every spec must come out valid, so no check is skipped.

    python bench/validate.py [COUNT=500] [RUNS=5]
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import sys
from pathlib import Path
from typing import Any

from _common import REPO, lorabuild, median, scratch_project

COUNT = int(sys.argv[1]) if len(sys.argv) > 1 else 500
RUNS = int(sys.argv[2]) if len(sys.argv) > 2 else 5

MODELS: dict[str, tuple[dict[str, list[int]], float]] = {
    "sd15": (
        {
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": [320, 768],
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": [49408, 768],
        },
        2.13e9,
    ),
    "sdxl": (
        {
            "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": [640, 2048],
            "conditioner.embedders.1.model.token_embedding.weight": [49408, 1280],
        },
        6.94e9,
    ),
    "flux": (
        {"double_blocks.0.img_attn.qkv.weight": [9216, 3072], "single_blocks.0.linear1.weight": [21504, 3072]},
        23.8e9,
    ),
}


def write_model(path: Path, tensors: dict[str, list[int]], size: float) -> None:
    """A safetensors header with these fp16 tensors, one more filling the file to `size` bytes."""
    header: dict[str, Any] = {}
    offset = 0
    for name, shape in tensors.items():
        n = math.prod(shape) * 2
        header[name] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    filler = int(size) - offset - 4096
    header["model.zeros"] = {"dtype": "F16", "shape": [filler // 2], "data_offsets": [offset, offset + filler]}
    raw = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        handle.truncate(8 + len(raw) + offset + filler)  # sparse: no disk used


def write_catalogue(root: Path, count: int) -> Path:
    folder = root / "catalogue"
    for i in range(4):
        shutil.copytree(REPO / "examples" / "shapes", folder / f"data{i}")
    for family, (tensors, size) in MODELS.items():
        write_model(folder / "models" / f"{family}.safetensors", tensors, size)
    kinds = [
        ("{demo: tiny-sd}", "builtin"),
        ("{path: models/sd15.safetensors, family: sd15}", "kohya"),
        ("{path: models/sdxl.safetensors, family: sdxl}", "kohya"),
        ("{path: models/flux.safetensors, family: flux}", "kohya"),
    ]
    for i in range(count):
        model, backend = kinds[i % 4]
        (folder / f"lora{i:04}.yaml").write_text(
            "# yaml-language-server: $schema=../schemas/training.schema.json\n"
            f"version: 1\nname: lora{i:04}\nbase_model: {model}\ndataset: {{path: data{i % 4}, repeats: 5}}\n"
            f"backend: {backend}\npreset: {('quick', 'standard', 'thorough')[i % 3]}\n"
            f"training: {{rank: {4 * (1 + i % 4)}, alpha: 2, seed: {i}}}\n"
            + ("compute: {target: runpod, gpu: RTX 4090}\n" if i % 2 else "")
        )
    return folder


def main() -> None:
    root = scratch_project()
    try:
        folder = write_catalogue(root, COUNT)
        times = []
        for _ in range(RUNS):
            seconds, done = lorabuild(folder, "validate", "--format", "json", ".")
            summary = json.loads(done.stdout)["summary"] if done.stdout.startswith("{") else {}
            if done.returncode != 0 or summary.get("valid") != COUNT:
                raise SystemExit(f"validate did not pass every spec:\n{done.stdout[-3000:]}\n{done.stderr}")
            times.append(seconds)
        best = median(times)
        print(
            f"validate: {COUNT} specs in a median {best:.2f} s wall over {RUNS} fresh processes "
            f"(min {min(times):.2f} s, max {max(times):.2f} s): {COUNT / best:.0f} specs per second"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
