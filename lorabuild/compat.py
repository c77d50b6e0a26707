"""CUDA ↔ PyTorch ↔ NVIDIA driver ↔ GPU architecture: the compatibility matrix, kept as data.

Facts from reference/vram.md §3 (PyTorch release matrix, architectures per build, NVIDIA's
minimum drivers). `check_stack` compares what Gate 3 found — the GPUs and driver through NVML,
the backend environment's torch through the probe — and returns each finding with the exact fix:
the pip line for a torch build that matches this GPU and driver, or the driver to install.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Stable CUDA builds of each PyTorch minor release (wheel index tags; §3.1).
TORCH_CUDA_BUILDS: dict[str, tuple[str, ...]] = {
    "2.0": ("11.7", "11.8"),
    "2.1": ("11.8", "12.1"),
    "2.2": ("11.8", "12.1"),
    "2.3": ("11.8", "12.1"),
    "2.4": ("11.8", "12.1", "12.4"),
    "2.5": ("11.8", "12.1", "12.4"),
    "2.6": ("11.8", "12.4", "12.6"),
    "2.7": ("11.8", "12.6", "12.8"),
    "2.8": ("12.6", "12.8", "12.9"),
    "2.9": ("12.6", "12.8", "13.0"),
    "2.10": ("12.6", "12.8", "13.0"),
    "2.11": ("12.6", "12.8", "13.0"),
    "2.12": ("12.6", "13.0", "13.2"),
    "2.13": ("12.6", "13.0", "13.2"),
}
NEWEST_TORCH = "2.13.0"

# Minimum Linux driver of each CUDA toolkit (NVIDIA release notes, §3.3 table 3).
TOOLKIT_MIN_DRIVER: dict[str, str] = {
    "11.7": "515.43.04",
    "11.8": "520.61.05",
    "12.0": "525.60.13",
    "12.1": "530.30.02",
    "12.2": "535.54.03",
    "12.3": "545.23.06",
    "12.4": "550.54.14",
    "12.5": "555.42.02",
    "12.6": "560.28.03",
    "12.8": "570.26",
    "12.9": "575.51.03",
    "13.0": "580.65.06",
    "13.1": "590.44.01",
    "13.2": "595.45.04",
}
# Minor-version compatibility: the least driver with which a CUDA major version starts at all.
MAJOR_MIN_DRIVER: dict[int, str] = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}


def build_archs(cuda: str) -> tuple[tuple[int, int], ...]:
    """GPU architectures (compute capabilities) a PyTorch build for `cuda` ships kernels for (§3.2)."""
    major, minor = (int(p) for p in cuda.split(".")[:2])
    if major >= 13:  # CUDA 13 dropped Maxwell, Pascal and Volta
        return ((7, 5), (8, 0), (8, 6), (9, 0), (10, 0), (12, 0))
    if (major, minor) >= (12, 8):
        return ((7, 5), (8, 0), (8, 6), (9, 0), (10, 0), (12, 0))
    return ((5, 0), (6, 0), (7, 0), (7, 5), (8, 0), (8, 6), (9, 0))


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text))


def driver_supports(driver: str, cuda: str) -> bool:
    """Whether NVIDIA driver `driver` can run a build for CUDA `cuda` (minor-version compatibility)."""
    major = int(cuda.split(".")[0])
    floor = MAJOR_MIN_DRIVER.get(major)
    return floor is not None and version_tuple(driver) >= version_tuple(floor)


def arch_covered(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Whether a torch build's arch list (`sm_86`, `compute_90`, ...) runs a GPU of `capability`:
    exact SASS, same major with a lower minor (binary compatible), or PTX it can JIT."""
    major, minor = capability
    for arch in arch_list:
        match = re.fullmatch(r"(sm|compute)_(\d+?)(\d)a?", arch)
        if not match:
            continue
        a_major, a_minor = int(match.group(2)), int(match.group(3))
        if match.group(1) == "sm" and a_major == major and a_minor <= minor:
            return True
        if match.group(1) == "compute" and (a_major, a_minor) <= (major, minor):
            return True
    return False


def best_build(capability: tuple[int, int] | None, driver: str | None) -> tuple[str, str] | None:
    """(torch version, CUDA version) of the newest build that runs this GPU with this driver."""
    for torch_minor in sorted(TORCH_CUDA_BUILDS, key=version_tuple, reverse=True):
        for cuda in sorted(TORCH_CUDA_BUILDS[torch_minor], key=version_tuple, reverse=True):
            if driver is not None and not driver_supports(driver, cuda):
                continue
            if capability is not None and not _in_build(capability, cuda):
                continue
            version = NEWEST_TORCH if torch_minor == ".".join(NEWEST_TORCH.split(".")[:2]) else f"{torch_minor}.0"
            return version, cuda
    return None


def _in_build(capability: tuple[int, int], cuda: str) -> bool:
    archs = build_archs(cuda)
    return any(a[0] == capability[0] and a[1] <= capability[1] for a in archs)


def pip_line(python: str, torch_version: str, cuda: str) -> str:
    tag = "cu" + cuda.replace(".", "")
    return f"{python} -m pip install torch=={torch_version} --index-url https://download.pytorch.org/whl/{tag}"


@dataclass(frozen=True)
class Finding:
    ok: bool
    message: str
    fix: str = ""
    warning: bool = False


def check_stack(
    *,
    gpu_name: str,
    capability: tuple[int, int] | None,
    driver: str,
    driver_cuda: str | None,
    torch_version: str,
    torch_cuda: str | None,
    arch_list: list[str],
    python: str,
) -> list[Finding]:
    """Every compatibility finding for one GPU and one torch build, each with its fix."""
    short = ".".join(torch_version.split("+")[0].split(".")[:2])
    suggestion = best_build(capability, driver)
    install = pip_line(python, *suggestion) if suggestion else ""
    if not torch_cuda:
        return [
            Finding(
                False,
                f"Problem: PyTorch {short} was built without CUDA, so it cannot use your {gpu_name}",
                install or "install a CUDA build of PyTorch",
            )
        ]
    findings: list[Finding] = []
    major = int(torch_cuda.split(".")[0])
    if not driver_supports(driver, torch_cuda):
        floor = MAJOR_MIN_DRIVER.get(major, "?")
        fix = f"update the NVIDIA driver to {floor} or newer"
        if suggestion:
            fix += f", or install a PyTorch built for CUDA {suggestion[1]}: {install}"
        findings.append(
            Finding(
                False,
                f"Problem: PyTorch {short} needs CUDA {torch_cuda}, which needs NVIDIA driver "
                f"{floor} or newer, but you have {driver}",
                fix,
            )
        )
    else:
        findings.append(
            Finding(
                True,
                f"CUDA {torch_cuda} and PyTorch {short} are compatible with driver {driver}"
                + (f" (supports CUDA up to {driver_cuda})" if driver_cuda else ""),
            )
        )
        if driver_cuda and version_tuple(driver_cuda) < version_tuple(torch_cuda):
            needed = TOOLKIT_MIN_DRIVER.get(torch_cuda)
            findings.append(
                Finding(
                    True,
                    f"Note: the driver supports CUDA up to {driver_cuda}, older than the CUDA "
                    f"{torch_cuda} PyTorch was built for; most training works, some new features may not",
                    f"update the NVIDIA driver to {needed} or newer" if needed else "",
                    warning=True,
                )
            )
    if capability is not None and arch_list and not arch_covered(capability, arch_list):
        cap = f"sm_{capability[0]}{capability[1]}"
        fix = install or "install a PyTorch build that supports this GPU"
        if capability >= (12, 0):
            fix = (
                f"RTX 50-series cards need PyTorch 2.7 or newer built for CUDA 12.8 or newer, and driver 570 or "
                f"newer: {install or pip_line(python, NEWEST_TORCH, '12.8')}"
            )
        findings.append(
            Finding(
                False,
                f"Problem: your {gpu_name} ({cap}) is not supported by this PyTorch build "
                f"(it supports {', '.join(arch_list)})",
                fix,
            )
        )
    return findings
