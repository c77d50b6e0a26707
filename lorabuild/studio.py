"""The studio: the machines lorabuild can train on, kept in grimoire/studio.json (+ studio.md).

Owns the facts about this machine that plans and gates depend on: its NVIDIA GPUs (through
nvidia-ml-py, with every failure mode in plain language), memory and processor count. Reading
them is cheap: when no NVIDIA driver library exists, pynvml is never imported. The file is
rewritten only when something changed, so an up-to-date run leaves it alone. Cloud instances
are recorded in the same file by the cloud ledger (`lorabuild.cloud.ledger`).

Several lorabuild processes may write studio.json at once (a run recording this machine while
`lorabuild cloud down` records a teardown), so every read-modify-write holds `studio_lock`: an
exclusive `flock` on studio.json.lock beside it, released by the kernel however the process
ends, and re-entrant within a process.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import platform
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

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


def studio_lock_path(root: Path) -> Path:
    return root / "studio.json.lock"


# One lock per process: flock locks belong to an open file, so a second open() of the lock file in
# this process would wait for itself. The RLock keeps this process's threads apart and lets a
# holder re-enter (record_machine → save_studio).
_STUDIO_RLOCK = threading.RLock()
_STUDIO_HELD: dict[Path, tuple[int, int]] = {}  # lock file → (fd, depth)

T = TypeVar("T")


@contextlib.contextmanager
def studio_lock(root: Path) -> Iterator[None]:
    """Hold the studio.json lock of `root` (waiting for another process that holds it)."""
    root.mkdir(parents=True, exist_ok=True)
    path = studio_lock_path(root.resolve())
    with _STUDIO_RLOCK:
        held = _STUDIO_HELD.get(path)
        if held is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                raise
            held = (fd, 0)
        _STUDIO_HELD[path] = (held[0], held[1] + 1)
        try:
            yield
        finally:
            fd, depth = _STUDIO_HELD[path]
            if depth <= 1:
                del _STUDIO_HELD[path]
                os.close(fd)  # closing the last descriptor releases the flock
            else:
                _STUDIO_HELD[path] = (fd, depth - 1)


def load_studio(root: Path) -> dict[str, Any]:
    path = studio_paths(root)[0]
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {"version": 1, "machines": {}, "instances": []}
    return data if isinstance(data, dict) else {"version": 1, "machines": {}, "instances": []}


def update_studio(root: Path, change: Callable[[dict[str, Any]], T]) -> T:
    """Read studio.json, apply `change` to it and write it back, all under the lock. `change`
    returns a value for the caller; it may raise to leave the file untouched."""
    with studio_lock(root):
        studio = load_studio(root)
        result = change(studio)
        save_studio(root, studio)
        return result


def _keep_damaged(root: Path) -> None:
    """Copy a studio.json that cannot be read aside before it is rewritten: it may hold the only
    record of a rented cloud instance."""
    path = studio_paths(root)[0]
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return
    except (json.JSONDecodeError, UnicodeDecodeError):
        shutil.copy2(path, path.with_name(f"studio.json.damaged-{int(time.time())}"))


def machine_facts(machine: Machine) -> dict[str, Any]:
    """The facts of a machine that planning reads, as plain JSON values (studio.json's entry)."""
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
    facts: dict[str, Any] = json.loads(json.dumps(entry))
    return facts


def record_machine(root: Path, machine: Machine) -> bool:
    """Write this machine into studio.json/.md when its facts changed; True if written."""
    entry = machine_facts(machine)
    with studio_lock(root):
        studio = load_studio(root)
        machines = studio.setdefault("machines", {})
        if machines.get("local") == entry:
            return False
        machines["local"] = entry
        save_studio(root, studio)
        return True


def save_studio(root: Path, studio: dict[str, Any]) -> None:
    json_path, md_path = studio_paths(root)
    with studio_lock(root):
        _keep_damaged(root)
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
    lines.append("")
    if not instances:
        lines.append("None.")
    else:
        lines.append(
            "Every cloud machine lorabuild rented from this folder. TERMINATED means the provider confirmed it "
            "is gone; any other state may still cost money — `lorabuild cloud down --all` deletes them."
        )
        lines.append("")
    for inst in instances:
        price = inst.get("price_per_hour")
        bits = [f"{inst.get('state')}"]
        if inst.get("state") != "TERMINATED" and inst.get("state_since"):
            bits[0] += f" since {inst.get('state_since')}"
        if isinstance(price, (int, float)):
            bits.append(f"${price:.2f}/h")
        bits.append(f"cost so far ${inst.get('cost_so_far', 0):.2f}")
        if inst.get("deadline") and inst.get("state") != "TERMINATED":
            bits.append(f"deletes itself by {inst.get('deadline')}")
        provider = {"runpod": "RunPod", "vastai": "Vast.ai"}.get(str(inst.get("provider")), inst.get("provider"))
        name = f"{provider} {inst.get('id') or '(creating)'}"
        run = f", run {inst['run']}" if inst.get("run") else ""
        lines.append(f"- **{name}**: {inst.get('gpu')}{run} — {', '.join(bits)}")
        if inst.get("label"):
            lines.append(f"  - label `{inst.get('label')}`")
        if inst.get("problem") and inst.get("state") != "TERMINATED":
            lines.append(f"  - problem: {inst.get('problem')}")
    lines.append("")
    return "\n".join(lines)


def as_dict(report: GpuReport) -> dict[str, Any]:
    return asdict(report)
