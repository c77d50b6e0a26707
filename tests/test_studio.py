"""Machine facts: the no-GPU path for real, the GPU path with recorded NVML answers at the boundary."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest

from lorabuild.compat import arch_covered
from lorabuild.gates.environment import check_environment
from lorabuild.studio import NVML_PROBLEMS, Machine, read_gpus, read_machine, record_machine

# Recorded from `nvidia-smi`/NVML on an RTX 4090 workstation (driver 570.86.15, CUDA 12.8).
RTX_4090 = {
    "driver": "570.86.15",
    "cuda": 12080,
    "devices": [
        {"name": "NVIDIA GeForce RTX 4090", "total": 25_757_220_864, "free": 25_217_728_512, "capability": (8, 9)}
    ],
}


class RecordedNvml:
    """Answers like pynvml from a recording; raises a real pynvml error when told to."""

    def __init__(self, recording: dict[str, Any], fail_init: int | None = None, bytes_names: bool = False):
        self.recording = recording
        self.fail_init = fail_init
        self.bytes_names = bytes_names
        self.shutdown = False

    def nvmlInit(self) -> None:
        if self.fail_init is not None:
            raise pynvml.NVMLError(self.fail_init)

    def nvmlShutdown(self) -> None:
        self.shutdown = True

    def nvmlSystemGetDriverVersion(self) -> str | bytes:
        v = self.recording["driver"]
        return v.encode() if self.bytes_names else v

    def nvmlSystemGetCudaDriverVersion_v2(self) -> int:
        return int(self.recording["cuda"])

    def nvmlDeviceGetCount(self) -> int:
        return len(self.recording["devices"])

    def nvmlDeviceGetHandleByIndex(self, i: int) -> dict[str, Any]:
        return dict(self.recording["devices"][i])

    def nvmlDeviceGetName(self, h: dict[str, Any]) -> str | bytes:
        return h["name"].encode() if self.bytes_names else h["name"]

    def nvmlDeviceGetMemoryInfo(self, h: dict[str, Any]) -> SimpleNamespace:
        return SimpleNamespace(total=h["total"], free=h["free"], used=h["total"] - h["free"])

    def nvmlDeviceGetCudaComputeCapability(self, h: dict[str, Any]) -> tuple[int, int]:
        return tuple(h["capability"])  # type: ignore[return-value]


def test_this_machine_without_a_driver_says_so_in_plain_language() -> None:
    report = read_gpus()  # the real path: no NVIDIA driver on CI machines
    if report.gpus:
        pytest.skip("this machine has an NVIDIA GPU; the recorded tests cover that path")
    assert report.problem == NVML_PROBLEMS["NVMLError_LibraryNotFound"]
    assert "no NVIDIA GPU found" in report.problem


@pytest.mark.parametrize("bytes_names", [False, True])
def test_recorded_rtx_4090(bytes_names: bool) -> None:
    nvml = RecordedNvml(RTX_4090, bytes_names=bytes_names)
    report = read_gpus(nvml)
    assert report.problem is None and nvml.shutdown
    (gpu,) = report.gpus
    assert gpu.name == "NVIDIA GeForce RTX 4090" and round(gpu.total_gb) == 26 and gpu.capability == (8, 9)
    assert report.driver == "570.86.15" and report.cuda_driver == "12.8"
    assert report.fingerprint() == {
        "gpus": [["NVIDIA GeForce RTX 4090", 25.8]],
        "driver": "570.86.15",
        "cuda_driver": "12.8",
    }


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "driver is installed but not running"),
        (pynvml.NVML_ERROR_NO_PERMISSION, "not allowed to read the GPU"),
        (pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH, "updated but the machine was not restarted"),
        (pynvml.NVML_ERROR_GPU_IS_LOST, "stopped responding"),
        (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, "no NVIDIA GPU found"),
    ],
)
def test_each_nvml_failure_has_a_plain_message(code: int, words: str) -> None:
    report = read_gpus(RecordedNvml(RTX_4090, fail_init=code))
    assert report.gpus == () and report.problem is not None and words in report.problem


def test_studio_json_is_written_once_and_only_when_facts_change(tmp_path: Path) -> None:
    machine = read_machine()
    assert record_machine(tmp_path, machine) is True
    first = (tmp_path / "studio.json").stat().st_mtime_ns
    assert record_machine(tmp_path, machine) is False
    assert (tmp_path / "studio.json").stat().st_mtime_ns == first
    changed = Machine(machine.hostname, machine.system, machine.cpus + 1, machine.ram_gb, machine.gpus)
    assert record_machine(tmp_path, changed) is True
    data = json.loads((tmp_path / "studio.json").read_text())
    assert data["machines"]["local"]["cpus"] == machine.cpus + 1
    assert "# Studio" in (tmp_path / "studio.md").read_text()


def test_environment_checks_with_a_recorded_gpu_and_probe(bare_project: Any) -> None:
    from lorabuild.dataset import list_dataset
    from lorabuild.plan import make_plan
    from lorabuild.spec import load_spec

    gpus = read_gpus(RecordedNvml(RTX_4090))
    machine = Machine("ws", "Linux x86_64", 16, 64.0, gpus)
    loaded = load_spec(bare_project.write_spec())
    plan = make_plan(loaded, machine, list_dataset(bare_project.dataset, ".txt"), None, grimoire=bare_project.grimoire)
    good_probe = {
        "torch": "2.7.1+cu128",
        "torch_cuda": "12.8",
        "cuda_available": True,
        "arch_list": ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"],
        "executable": "/venv/python",
        "python": "3.11.7",
        "modules": {"diffusers": "0.35.0", "transformers": "4.55.0", "safetensors": "0.6.2"},
    }
    checks, record = check_environment(plan, gpus, bare_project.root, good_probe)
    assert record["passed"], checks
    messages = [c.message for c in checks]
    assert any("Your NVIDIA GeForce RTX 4090 has 26 GB VRAM — plenty" in m for m in messages)
    assert any("CUDA 12.8 and PyTorch 2.7 are compatible" in m for m in messages)

    old_driver = read_gpus(RecordedNvml({**RTX_4090, "driver": "520.61.05", "cuda": 11080}))
    checks, record = check_environment(plan, old_driver, bare_project.root, good_probe)
    assert not record["passed"]
    (driver,) = [c for c in checks if "but you have 520.61.05" in c.message]
    assert "needs NVIDIA driver 525.60.13 or newer" in driver.message
    # the exact fix: the newest torch build this driver can run (CUDA 11.8) for this GPU
    assert "install torch==2.7.0 --index-url https://download.pytorch.org/whl/cu118" in driver.fix

    blackwell = {
        **RTX_4090,
        "devices": [
            {
                **RTX_4090["devices"][0],
                "name": "NVIDIA GeForce RTX 5090",  # type: ignore[dict-item]
                "capability": (12, 0),
            }
        ],
    }
    old_build = {
        **good_probe,
        "torch": "2.6.0+cu124",
        "torch_cuda": "12.4",
        "arch_list": ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"],
    }
    checks, record = check_environment(plan, read_gpus(RecordedNvml(blackwell)), bare_project.root, old_build)
    (arch,) = [c for c in checks if "RTX 5090 (sm_120) is not supported by this PyTorch build" in c.message]
    assert "PyTorch 2.7 or newer built for CUDA 12.8 or newer, and driver 570" in arch.fix
    # driver 570 cannot run CUDA 13 builds, and 2.12+ ship no cu128: the newest that fits is 2.11 cu128
    assert "torch==2.11.0 --index-url https://download.pytorch.org/whl/cu128" in arch.fix

    missing = {**good_probe, "modules": {"diffusers": None, "transformers": "4.55.0", "safetensors": "0.6.2"}}
    checks, _ = check_environment(plan, gpus, bare_project.root, missing)
    assert any("diffusers cannot be imported" in c.message for c in checks)


def test_arch_matching() -> None:
    assert arch_covered((8, 9), ["sm_80", "sm_86"])  # same major, lower minor
    assert not arch_covered((12, 0), ["sm_80", "sm_90"])
    assert arch_covered((12, 0), ["sm_90", "compute_90"])  # PTX JIT
    assert not arch_covered((7, 0), ["sm_75", "sm_80"])
