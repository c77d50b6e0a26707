"""The CUDA ↔ PyTorch ↔ driver ↔ GPU matrix, on recorded GPUs, drivers and torch builds."""

from __future__ import annotations

import pytest

from lorabuild.compat import arch_covered, best_build, check_stack, driver_supports

ARCH_CU118 = ["sm_50", "sm_60", "sm_61", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]
ARCH_CU124 = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]
ARCH_CU128 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
ARCH_CU130 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]

# (case, GPU name, capability, driver, driver CUDA, torch, torch CUDA, arch list, expected ok, words in message/fix)
CASES = [
    (
        "4090, current stack",
        "NVIDIA GeForce RTX 4090",
        (8, 9),
        "570.86.15",
        "12.8",
        "2.7.1+cu128",
        "12.8",
        ARCH_CU128,
        True,
        "are compatible with driver 570.86.15",
    ),
    (
        "4090, driver too old for CUDA 12",
        "NVIDIA GeForce RTX 4090",
        (8, 9),
        "520.61.05",
        "11.8",
        "2.7.1+cu128",
        "12.8",
        ARCH_CU128,
        False,
        "whl/cu118",
    ),
    (
        "5090 on a torch without Blackwell",
        "NVIDIA GeForce RTX 5090",
        (12, 0),
        "570.124.06",
        "12.8",
        "2.6.0+cu124",
        "12.4",
        ARCH_CU124,
        False,
        "torch==2.11.0 --index-url https://download.pytorch.org/whl/cu128",
    ),
    (
        "5090, current stack",
        "NVIDIA GeForce RTX 5090",
        (12, 0),
        "580.82.07",
        "13.0",
        "2.13.0+cu130",
        "13.0",
        ARCH_CU130,
        True,
        "compatible",
    ),
    (
        "GTX 1080 on a CUDA 13 build",
        "NVIDIA GeForce GTX 1080",
        (6, 1),
        "580.82.07",
        "13.0",
        "2.13.0+cu130",
        "13.0",
        ARCH_CU130,
        False,
        "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126",
    ),
    (
        "V100 on a cu128 build",
        "Tesla V100-SXM2-16GB",
        (7, 0),
        "535.104.05",
        "12.2",
        "2.9.0+cu128",
        "12.8",
        ARCH_CU128,
        False,
        "whl/cu126",
    ),
    (
        "A100 on cu118 with an old driver",
        "NVIDIA A100-SXM4-80GB",
        (8, 0),
        "470.82.01",
        "11.4",
        "2.5.1+cu118",
        "11.8",
        ARCH_CU118,
        True,
        "compatible",
    ),
    (
        "CPU-only torch on a 3090",
        "NVIDIA GeForce RTX 3090",
        (8, 6),
        "550.54.14",
        "12.4",
        "2.13.0+cpu",
        None,
        [],
        False,
        "built without CUDA",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_recorded_stacks(case: tuple) -> None:  # type: ignore[type-arg]
    _, name, cap, driver, driver_cuda, torch, torch_cuda, archs, ok, words = case
    findings = check_stack(
        gpu_name=name,
        capability=cap,
        driver=driver,
        driver_cuda=driver_cuda,
        torch_version=torch,
        torch_cuda=torch_cuda,
        arch_list=archs,
        python="/venv/bin/python",
    )
    assert all(f.ok for f in findings) == ok, findings
    text = " ".join(f"{f.message} {f.fix}" for f in findings)
    assert words in text, text
    for finding in findings:
        if not finding.ok:
            assert finding.fix, finding  # every problem comes with its fix


def test_a_driver_older_than_torch_cuda_is_a_warning_not_a_failure() -> None:
    findings = check_stack(
        gpu_name="NVIDIA H100 80GB HBM3",
        capability=(9, 0),
        driver="550.54.15",
        driver_cuda="12.4",
        torch_version="2.9.0+cu128",
        torch_cuda="12.8",
        arch_list=ARCH_CU128,
        python="python",
    )
    assert all(f.ok for f in findings)
    (note,) = [f for f in findings if f.warning]
    assert "supports CUDA up to 12.4" in note.message and "570.26" in note.fix


def test_matrix_rules() -> None:
    assert driver_supports("525.60.13", "12.8") and not driver_supports("520.61.05", "12.1")
    assert driver_supports("580.65.06", "13.0") and not driver_supports("575.57.08", "13.0")
    assert arch_covered((8, 9), ["sm_86"]) and not arch_covered((9, 0), ["sm_86"])
    assert arch_covered((12, 0), ["sm_90", "compute_90"])  # PTX JIT
    assert best_build((12, 0), "570.86.15") == ("2.11.0", "12.8")
    assert best_build((8, 6), "580.95.05") == ("2.13.0", "13.2")
    assert best_build((6, 1), "595.45.04") == ("2.13.0", "12.6")
    assert best_build((8, 6), "440.33.01") is None  # too old for any build
