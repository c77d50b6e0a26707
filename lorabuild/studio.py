"""The studio: the machines lorabuild can train on, kept in grimoire/studio.json (+ studio.md).

Owns the facts about this machine that plans and gates depend on: its NVIDIA GPUs (through
nvidia-ml-py, with every failure mode in plain language), memory and processor count. Reading
them is cheap: when no NVIDIA driver library exists, pynvml is never imported. The file is
rewritten only when something changed, so an up-to-date run leaves it alone. Cloud instances
are recorded in the same file by the cloud ledger.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lorabuild.fsutil import atomic_write_text

NVML_LIBRARY = "libnvidia-ml.so.1"

# Each NVML failure, as an artist would want to hear it (reference/vram.md §6).
NVML_PROBLEMS: dict[str, str] = {
    "NVMLError_LibraryNotFound": "no NVIDIA GPU found (the NVIDIA driver is not installed on this machine)",
    "NVMLError_DriverNotLoaded": "the NVIDIA driver is installed but not running — restart the machine",
    "NVMLError_NoPermission": "this user is not allowed to read the GPU — ask the admin for access",
    "NVMLError_NotSupported": "this GPU does not report its details to the driver",
    "NVMLError_FunctionNotFound": "the NVIDIA driver is older than this program expects — update the driver",
    "NVMLError_GpuIsLost": "the GPU stopped responding — restart the machine",
    "NVMLError_LibRmVersionMismatch": ("the NVIDIA driver was updated but the machine was not restarted — restart it"),
    "NVMLError_Uninitialized": "the NVIDIA library could not start",
    "NVMLError_Unknown": "the NVIDIA driver reported an unknown error",
}


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    total_gb: float
    free_gb: float
    capability: tuple[int, int] | None


@dataclass(frozen=True)
class GpuReport:
    """The NVIDIA GPUs of a machine, or why none could be read."""

    gpus: tuple[Gpu, ...] = ()
    driver: str | None = None
    cuda_driver: str | None = None  # the newest CUDA the driver supports, e.g. "12.8"
    problem: str | None = None  # plain-language reason when `gpus` is empty

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the hardware (free memory left out: it changes all the time)."""
        return {
            "gpus": [[g.name, round(g.total_gb, 1)] for g in self.gpus],
            "driver": self.driver,
            "cuda_driver": self.cuda_driver,
        }


def read_gpus(nvml: Any = None) -> GpuReport:
    """Query NVML for this machine's GPUs. `nvml` replaces the pynvml module in tests."""
    if nvml is None:
        try:
            ctypes.CDLL(NVML_LIBRARY)
        except OSError:
            return GpuReport(problem=NVML_PROBLEMS["NVMLError_LibraryNotFound"])
        import pynvml

        nvml = pynvml
    try:
        nvml.nvmlInit()
    except Exception as exc:
        return GpuReport(problem=_nvml_problem(exc))
    try:
        driver = _text(nvml.nvmlSystemGetDriverVersion())
        cuda_raw = nvml.nvmlSystemGetCudaDriverVersion_v2()
        cuda = f"{cuda_raw // 1000}.{(cuda_raw % 1000) // 10}"
        gpus = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            try:
                major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
                capability: tuple[int, int] | None = (int(major), int(minor))
            except Exception:
                capability = None
            gpus.append(
                Gpu(
                    index=index,
                    name=_text(nvml.nvmlDeviceGetName(handle)),
                    total_gb=memory.total / 1e9,
                    free_gb=memory.free / 1e9,
                    capability=capability,
                )
            )
    except Exception as exc:
        return GpuReport(problem=_nvml_problem(exc))
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()
    if not gpus:
        return GpuReport(driver=driver, cuda_driver=cuda, problem="the NVIDIA driver is running but sees no GPU")
    return GpuReport(tuple(gpus), driver, cuda)


def _text(value: Any) -> str:
    # old nvidia-ml-py versions return bytes
    return value.decode() if isinstance(value, bytes) else str(value)


def _nvml_problem(exc: BaseException) -> str:
    for klass in type(exc).__mro__:
        if klass.__name__ in NVML_PROBLEMS:
            return NVML_PROBLEMS[klass.__name__]
    return f"the NVIDIA driver could not be read ({exc})"


@dataclass(frozen=True)
class Machine:
    """This machine, as far as planning and the environment check care."""

    hostname: str
    system: str
    cpus: int
    ram_gb: float
    gpus: GpuReport = field(default_factory=GpuReport)

    @property
    def best_gpu(self) -> Gpu | None:
        return max(self.gpus.gpus, key=lambda g: g.total_gb) if self.gpus.gpus else None


def ram_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return 0.0


def read_machine(nvml: Any = None) -> Machine:
    return Machine(
        hostname=socket.gethostname(),
        system=f"{platform.system()} {platform.machine()}",
        cpus=os.cpu_count() or 1,
        ram_gb=round(ram_gb(), 1),
        gpus=read_gpus(nvml),
    )


# --- grimoire/studio.json -----------------------------------------------------------------------


def studio_paths(root: Path) -> tuple[Path, Path]:
    return root / "studio.json", root / "studio.md"


def load_studio(root: Path) -> dict[str, Any]:
    path = studio_paths(root)[0]
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {"version": 1, "machines": {}, "instances": []}
    return data if isinstance(data, dict) else {"version": 1, "machines": {}, "instances": []}


def record_machine(root: Path, machine: Machine) -> bool:
    """Write this machine into studio.json/.md when its facts changed; True if written."""
    studio = load_studio(root)
    entry = {
        "hostname": machine.hostname,
        "system": machine.system,
        "cpus": machine.cpus,
        "ram_gb": machine.ram_gb,
        "gpus": [
            {"name": g.name, "vram_gb": round(g.total_gb, 1), "capability": g.capability} for g in machine.gpus.gpus
        ],
        "driver": machine.gpus.driver,
        "cuda_driver": machine.gpus.cuda_driver,
        "gpu_problem": machine.gpus.problem,
    }
    machines = studio.setdefault("machines", {})
    if machines.get("local") == json.loads(json.dumps(entry)):
        return False
    machines["local"] = entry
    save_studio(root, studio)
    return True


def save_studio(root: Path, studio: dict[str, Any]) -> None:
    json_path, md_path = studio_paths(root)
    atomic_write_text(json_path, json.dumps(studio, indent=2, sort_keys=True) + "\n")
    atomic_write_text(md_path, render_studio_md(studio))


def render_studio_md(studio: dict[str, Any]) -> str:
    lines = ["# Studio", "", "Machines lorabuild knows about. Rendered from studio.json; edit neither by hand.", ""]
    for label, m in sorted(studio.get("machines", {}).items()):
        lines.append(f"## {label}: {m.get('hostname')} ({m.get('system')})")
        lines.append(f"- **Processors**: {m.get('cpus')}")
        lines.append(f"- **Memory (RAM)**: {m.get('ram_gb')} GB")
        gpus = m.get("gpus") or []
        if gpus:
            for g in gpus:
                lines.append(f"- **GPU**: {g['name']} with {g['vram_gb']} GB VRAM")
            lines.append(f"- **NVIDIA driver**: {m.get('driver')} (supports CUDA up to {m.get('cuda_driver')})")
        else:
            lines.append(f"- **GPU**: none — {m.get('gpu_problem')}")
        lines.append("")
    instances = studio.get("instances") or []
    lines.append("## Cloud instances")
    if not instances:
        lines.append("None.")
    for inst in instances:
        lines.append(
            f"- {inst.get('provider')} {inst.get('id') or '(creating)'}: {inst.get('gpu')} — "
            f"{inst.get('state')}, cost so far ${inst.get('cost_so_far', 0):.2f}"
        )
    lines.append("")
    return "\n".join(lines)


def as_dict(report: GpuReport) -> dict[str, Any]:
    return asdict(report)
