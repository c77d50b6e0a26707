"""Why a backend run failed, from its own words: the diagnosis table of Gates 4 and 10.

A backend reports some failures as `error` events (the builtin trainer always does; the other
backends' modules turn their known messages into events). What remains is read here from the
output itself, with patterns that hold across trainers (Python, PyTorch, safetensors, CUDA and
accelerate messages). Each diagnosis says what happened, the usual cause, and the fix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Diagnosis:
    kind: str
    what: str  # "the base model could not be loaded — usually a wrong path or a corrupted download"
    fix: str


DIAGNOSES: dict[str, Diagnosis] = {
    "model_missing": Diagnosis(
        "model_missing",
        "the base model file was not found — usually a wrong model path",
        "check `base_model.path` (relative paths start at the spec's folder)",
    ),
    "model_corrupt": Diagnosis(
        "model_corrupt",
        "the base model file is damaged or incomplete — usually an interrupted download",
        "download the model again and check its size against the download page",
    ),
    "model_family": Diagnosis(
        "model_family",
        "the base model does not match its family — its layers are not the ones this family has",
        "check `base_model.family` (sd15, sdxl, pony or flux) against the model you downloaded",
    ),
    "model_load": Diagnosis(
        "model_load",
        "the base model could not be loaded — usually a wrong model path or a corrupted download",
        "check `base_model.path`; if it is right, download the model again",
    ),
    "dataset": Diagnosis(
        "dataset",
        "the dataset could not be read — the folder is missing, empty, or holds no pictures the backend reads",
        "check `dataset.path` and that it holds .png/.jpg/.webp pictures",
    ),
    "caption": Diagnosis(
        "caption",
        "a caption could not be read — usually a text-encoding problem or a missing file",
        "save the caption files as UTF-8 text in your editor",
    ),
    "oom": Diagnosis(
        "oom",
        "out of memory — the batch size or resolution is too high for this GPU",
        "lower `training.batch_size` (or the resolution), or turn on `gradient_checkpointing`",
    ),
    "cuda": Diagnosis(
        "cuda",
        "a CUDA error — the PyTorch build does not match the driver or the GPU (Gate 3 should have caught this)",
        "run `lorabuild env` and follow its fix",
    ),
    "not_installed": Diagnosis(
        "not_installed",
        "the backend is not installed completely — a module or program it needs is missing",
        "install the backend's requirements in its own environment (see the README's backend section)",
    ),
    "nan": Diagnosis(
        "nan",
        "the loss became NaN (not a number) — the learning rate is far too high, or fp16 overflowed",
        "lower `training.learning_rate`, or use `mixed_precision: bf16`",
    ),
    "config": Diagnosis(
        "config", "the backend rejected its config", "this is likely a lorabuild bug — please report it"
    ),
    "interrupted": Diagnosis("interrupted", "the backend was stopped before it finished", "run again to continue"),
    "internal": Diagnosis("internal", "the backend crashed", "read the log named below for the backend's own message"),
}

# (pattern, kind), first match wins: the more specific patterns come first.
PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p, re.I), kind)
    for p, kind in (
        (
            r"OutOfMemoryError|CUDA out of memory|CUDA error: out of memory|\bMemoryError\b|"
            r"DefaultCPUAllocator: can't allocate memory|Cannot allocate memory|OOM during training step",
            "oom",
        ),
        (
            r"no kernel image is available|CUDA driver version is insufficient|cudaErrorUnsupportedPtxVersion|"
            r"invalid device function|CUDA error: (?!out of memory)|Found no NVIDIA driver|"
            r"Torch not compiled with CUDA enabled|is not compatible with the current PyTorch installation",
            "cuda",
        ),
        (
            r"HeaderTooLarge|incomplete metadata|Error while deserializing header|MetadataIncompleteBuffer|"
            r"invalid load key|PytorchStreamReader failed|unexpected EOF|file is not a zip file|"
            r"not a valid safetensors|safetensors_rust\.SafetensorError",
            "model_corrupt",
        ),
        (
            r"size mismatch for|Missing key\(s\) in state_dict|Unexpected key\(s\) in state_dict|"
            r"Error\(s\) in loading state_dict",
            "model_family",
        ),
        (r"UnicodeDecodeError|'utf-8' codec can't decode", "caption"),
        (
            r"No data found|no images found in|No image files found|ZeroDivisionError.*(dataloader|len)|"
            r"num_samples should be a positive integer",
            "dataset",
        ),
        (
            r"(No such file or directory|does not exist|not found|FileNotFoundError|Can't load|"
            r"does not appear to have a file named|Repository Not Found|is not a local folder)"
            r".*(safetensors|\.ckpt|model|checkpoint|pretrained)",
            "model_missing",
        ),
        (
            r"(safetensors|\.ckpt|model|pretrained_model).*(No such file or directory|does not exist|not found)",
            "model_missing",
        ),
        (
            r"ModuleNotFoundError|No module named|ImportError: cannot import|command not found|"
            r"accelerate: not found",
            "not_installed",
        ),
        (r"\bnan\b.*loss|loss.*\bnan\b|Non-finite training loss|loss is nan", "nan"),
    )
)


def diagnose_text(text: str) -> Diagnosis | None:
    """The diagnosis for a backend's output, or None when nothing in it is recognised."""
    for pattern, kind in PATTERNS:
        if pattern.search(text):
            return DIAGNOSES[kind]
    return None


def diagnose(error_kinds: list[str], text: str) -> Diagnosis:
    """Error events first (the backend knew what happened), then the output, then "crashed"."""
    for kind in error_kinds:
        if kind in DIAGNOSES:
            refined = diagnose_text(text) if kind == "model_load" else None
            if refined is not None and refined.kind.startswith("model_"):
                return refined  # "could not load" made precise: missing, damaged, wrong family
            return DIAGNOSES[kind]
    return diagnose_text(text) or DIAGNOSES["internal"]
