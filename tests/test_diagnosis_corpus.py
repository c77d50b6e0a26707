"""A corpus of broken datasets, model files and environments, each with the diagnosis and fix it
must produce (issue #4). Datasets are real files checked by the pre-flight; backend failures are
the messages the trainers really print (reference/*.md); environments are recorded probe and NVML
answers checked by Gate 3's own function."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from lorabuild.diagnose import diagnose, diagnose_text
from lorabuild.preflight import check_dataset
from tests.conftest import EXAMPLE_DATA

# --- datasets -------------------------------------------------------------------------------


def png_bytes(size: int = 64, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (size, size), (200, 30, 30) if mode == "RGB" else 128).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg_bytes(size: int = 64, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (size, size)).save(buffer, "JPEG")
    return buffer.getvalue()


# name: (files to write {name: bytes}, blocking?, words expected in the report)
DATASETS: dict[str, tuple[dict[str, bytes], bool, str]] = {
    "truncated png": ({"a.png": png_bytes()[:60], "a.txt": b"x"}, True, "a.png cannot be read as a picture"),
    "truncated jpeg": ({"a.jpg": jpeg_bytes(256)[:300], "a.txt": b"x"}, True, "cut short"),
    "empty picture file": ({"a.png": b"", "a.txt": b"x"}, True, "a.png cannot be read as a picture"),
    "text saved as .png": ({"a.png": b"hello, I am not a picture", "a.txt": b"x"}, True, "not a picture Pillow knows"),
    "caption not utf-8": ({"a.png": png_bytes(), "a.txt": b"caf\xe9"}, True, "a.txt is not UTF-8 text"),
    "caption utf-16": ({"a.png": png_bytes(), "a.txt": "chat".encode("utf-16")}, True, "a.txt is not UTF-8 text"),
    "no pictures": ({"notes.txt": b"x"}, True, "no pictures"),
    "caption missing": ({"a.png": png_bytes()}, False, "1 pictures have no caption (a.png)"),
    "caption empty": ({"a.png": png_bytes(), "a.txt": b"  \n"}, False, "1 captions are empty (a.txt)"),
    "duplicate pictures": (
        {"a.png": png_bytes(), "b.png": png_bytes(), "a.txt": b"x", "b.txt": b"y"},
        False,
        "b.png is the same picture as a.png",
    ),
    "picture smaller than resolution": (
        {"a.png": png_bytes(32), "a.txt": b"x"},
        False,
        "smaller than the training resolution of 64 px (a.png (32×32))",
    ),
    "formats the trainers skip": (
        {"a.png": png_bytes(), "a.txt": b"x", "b.gif": b"GIF89a", "c.heic": b"x"},
        False,
        "formats the trainers skip (.gif, .heic",
    ),
    "caption without picture": (
        {"a.png": png_bytes(), "a.txt": b"x", "gone.txt": b"y"},
        False,
        "captions have no picture (gone.txt)",
    ),
    "grey and palette pictures are fine": ({"a.png": png_bytes(mode="L"), "a.txt": b"x"}, False, "1 pictures"),
    "cmyk jpeg is fine": ({"a.jpg": jpeg_bytes(mode="CMYK"), "a.txt": b"x"}, False, "1 pictures"),
}


@pytest.mark.parametrize("case", sorted(DATASETS))
def test_broken_datasets(tmp_path: Path, case: str) -> None:
    files, blocking, words = DATASETS[case]
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    images = sorted(n for n in files if n.endswith((".png", ".jpg")))
    report = check_dataset(tmp_path, images, ".txt", 64)
    assert (not report.ok) == blocking, report.lines()
    text = " ".join(report.lines())
    assert words in text, text
    for line in report.blocking:
        assert " — " in line, line  # every blocking problem says how to fix it


def test_the_example_dataset_is_clean() -> None:
    images = sorted(p.name for p in EXAMPLE_DATA.glob("*.png"))
    report = check_dataset(EXAMPLE_DATA, images, ".txt", 64)
    assert report.ok and not report.warnings and report.images == report.captions == 8


# --- backend output: model files, datasets, CUDA, installs ------------------------------------

OUTPUTS: list[tuple[str, str, str, str]] = [
    # (case, backend output, expected kind, words in the fix)
    (
        "safetensors header too large",
        "safetensors_rust.SafetensorError: Error while deserializing header: HeaderTooLarge",
        "model_corrupt",
        "download the model again",
    ),
    (
        "safetensors incomplete",
        "Error while deserializing header: MetadataIncompleteBuffer",
        "model_corrupt",
        "download the model again",
    ),
    (
        "torch checkpoint truncated",
        "RuntimeError: PytorchStreamReader failed reading zip archive: failed finding central directory",
        "model_corrupt",
        "download the model again",
    ),
    (
        "wrong family",
        "RuntimeError: Error(s) in loading state_dict for UNet2DConditionModel: size mismatch for "
        "conv_in.weight: copying a param with shape torch.Size([320, 4, 3, 3])",
        "model_family",
        "base_model.family",
    ),
    (
        "model path wrong",
        "FileNotFoundError: [Errno 2] No such file or directory: '/models/sd_xl_base_1.0.safetensors'",
        "model_missing",
        "base_model.path",
    ),
    (
        "hub-style name not local",
        "OSError: stabilityai/sdxl does not appear to have a file named model_index.json",
        "model_missing",
        "base_model.path",
    ),
    (
        "kohya no data",
        "No data found. Please verify arguments (train_data_dir must be the parent of folders with images)",
        "dataset",
        "dataset.path",
    ),
    ("ai-toolkit no images", "Error running job: no images found in /data/mychar", "dataset", "dataset.path"),
    ("caption encoding", "UnicodeDecodeError: 'utf-8' codec can't decode byte 0xe9 in position 4", "caption", "UTF-8"),
    ("cuda oom", "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", "oom", "batch_size"),
    (
        "cpu oom",
        "RuntimeError: [enforce fail at alloc_cpu.cpp:115] DefaultCPUAllocator: can't allocate memory",
        "oom",
        "batch_size",
    ),
    (
        "blackwell on old torch",
        "RuntimeError: CUDA error: no kernel image is available for execution on the device",
        "cuda",
        "lorabuild env",
    ),
    (
        "driver too old",
        "RuntimeError: The NVIDIA driver on your system is too old / CUDA driver version is "
        "insufficient for CUDA runtime version",
        "cuda",
        "lorabuild env",
    ),
    ("torch without cuda", "AssertionError: Torch not compiled with CUDA enabled", "cuda", "lorabuild env"),
    ("kohya library missing", "ModuleNotFoundError: No module named 'library'", "not_installed", "requirements"),
    ("accelerate missing", "/venv/bin/accelerate: command not found", "not_installed", "requirements"),
    ("simpletuner nan", "RuntimeError: Non-finite training loss detected at step 12", "nan", "learning_rate"),
]


@pytest.mark.parametrize(("case", "output", "kind", "fix"), OUTPUTS, ids=[o[0] for o in OUTPUTS])
def test_backend_failures_are_diagnosed(case: str, output: str, kind: str, fix: str) -> None:
    found = diagnose_text(f"some earlier line\n{output}\nTraceback follows")
    assert found is not None and found.kind == kind, (case, found)
    assert fix in found.fix


def test_error_events_come_first_and_model_load_is_made_precise() -> None:
    assert diagnose(["oom"], "anything").kind == "oom"
    assert diagnose(["model_load"], "HeaderTooLarge").kind == "model_corrupt"
    assert diagnose(["model_load"], "no detail").kind == "model_load"
    assert diagnose([], "nothing recognisable").kind == "internal"


# --- environments -----------------------------------------------------------------------------

GOOD_PROBE: dict[str, Any] = {
    "torch": "2.13.0+cu130",
    "torch_cuda": "13.0",
    "cuda_available": True,
    "python": "3.11.7",
    "arch_list": ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"],
    "executable": "/venv/bin/python",
    "modules": {"diffusers": "0.42.1", "transformers": "5.24.0", "safetensors": "0.8.0"},
}

ENVIRONMENTS: list[tuple[str, dict[str, Any], str, str]] = [
    # (case, probe answer, words in the failed check's message, words in its fix)
    (
        "backend python missing",
        {"error": "the backend's Python was not found: /nope/bin/python"},
        "Python was not found",
        "backend.python",
    ),
    (
        "torch not installed",
        {**GOOD_PROBE, "torch": None, "torch_error": "ModuleNotFoundError: No module named 'torch'"},
        "PyTorch is not installed",
        "pip install torch",
    ),
    (
        "a backend module missing",
        {**GOOD_PROBE, "modules": {"diffusers": None, "transformers": "5.24.0", "safetensors": "0.8.0"}},
        "diffusers cannot be imported",
        "pip install diffusers",
    ),
    (
        "cuda cannot start",
        {**GOOD_PROBE, "cuda_available": False, "cuda_error": "CUDA unknown error"},
        "PyTorch cannot start CUDA",
        "restart the machine",
    ),
    (
        "cpu-only torch for a GPU backend",
        {**GOOD_PROBE, "torch": "2.13.0+cpu", "torch_cuda": None, "arch_list": []},
        "built without CUDA",
        "download.pytorch.org/whl/cu",
    ),
]


@pytest.mark.parametrize(("case", "probe", "words", "fix"), ENVIRONMENTS, ids=[e[0] for e in ENVIRONMENTS])
def test_broken_environments(bare_project: Any, case: str, probe: dict[str, Any], words: str, fix: str) -> None:
    from lorabuild.dataset import list_dataset
    from lorabuild.gates.environment import check_environment
    from lorabuild.plan import make_plan
    from lorabuild.spec import load_spec
    from lorabuild.studio import Gpu, GpuReport, Machine

    gpus = GpuReport((Gpu(0, "NVIDIA GeForce RTX 4090", 24.0, 23.0, (8, 9)),), "580.82.07", "13.0")
    machine = Machine("ws", "Linux", 16, 64.0, gpus)
    spec = bare_project.write_spec(training={"mixed_precision": "bf16"})
    plan = make_plan(
        load_spec(spec), machine, list_dataset(bare_project.dataset, ".txt"), None, grimoire=bare_project.grimoire
    )
    if case == "cpu-only torch for a GPU backend":
        plan = plan.model_copy(update={"backend": plan.backend.model_copy(update={"name": "kohya"})})
        pytest.importorskip("lorabuild.backends.kohya")
    checks, record = check_environment(plan, gpus, bare_project.root, probe)
    failed = [c for c in checks if not c.ok]
    assert not record["passed"] and failed, checks
    assert any(words in c.message and fix in c.fix for c in failed), failed


def test_not_enough_disk_is_a_failure_with_its_fix(bare_project: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from lorabuild.gates import environment
    from lorabuild.gates.environment import environment_for

    monkeypatch.setattr(environment, "free_bytes", lambda where: 2_000_000_000)
    checks, record, _plan = environment_for(
        "builtin", model_gb=6.5, dataset_images=30, where=bare_project.root, facts=GOOD_PROBE
    )
    (disk,) = [c for c in checks if c.name == "disk"]
    assert not record["passed"] and not disk.ok
    assert "only 2.0 GB free disk" in disk.message and "base model" in disk.message
    assert "free some disk space" in disk.fix
