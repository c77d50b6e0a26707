"""Gate 3 — environment: the GPU, CUDA, PyTorch, the backend and the disk (workflow.md Phase 8).

One implementation serves the gate and `lorabuild env`. It reads the GPUs through NVML, probes
the backend's *own* Python in a subprocess for its torch/CUDA build, checks free disk against
what the run will write, and reports each finding in plain language. It only reads, so it is
safe to re-run at any time (after an SSH drop, say). It passes on a CPU-only machine for the
builtin backend only.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lorabuild import backends, presets
from lorabuild.compat import check_stack
from lorabuild.estimate import BYTES_PER_PARAM, lora_parameters
from lorabuild.fsutil import atomic_write_json, atomic_write_text, free_bytes
from lorabuild.gates import GateContext, GateFailed
from lorabuild.glossary import Explainer
from lorabuild.plan import Plan
from lorabuild.studio import GpuReport, Machine

TITLE = "Gate 3 — environment"
PROBE_TIMEOUT_S = 180
DISK_MARGIN_BYTES = 1_000_000_000  # logs and a little room to breathe
DATASET_BYTES_PER_IMAGE = 3_000_000  # a typical training picture (when only the count is known)
GB = 1e9


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    message: str
    fix: str = ""
    warning: bool = False  # passes, but the artist should know


def targets(ctx: GateContext) -> list[Path]:
    return [ctx.run.environment_md, ctx.run.environment_json]


def inputs(ctx: GateContext) -> dict[str, Any]:
    plan = ctx.plan
    return {
        # sizes, not contents: editing a caption must not re-check the machine
        **plan.pick(("backend", "compute", "model.bytes", "estimates.memory_needed_gb")),
        "dataset_images": len(plan.dataset.images),
        "machine": ctx.environment_stamp,
    }


def file_deps(ctx: GateContext) -> list[Path]:
    return []


def remote_stamp(compute: Any) -> dict[str, Any]:
    """A remote machine as the spec names it: the address of an SSH host; for a cloud the GPU
    asked for. Not the instance: its id is unknown until spin-up, and a finished run has none, so
    a later instance of the same kind is trusted (deploy still installs what it lacks)."""
    return {"target": compute.target, "host": compute.host, "gpu": compute.gpu}


def environment_stamp(ctx: GateContext) -> dict[str, Any]:
    """Cheap identity of the machine and the backend's torch: no import, no subprocess. A remote
    machine is known by its address, a cloud one by the GPU asked for (see remote_stamp)."""
    if ctx.plan.compute.target != "local":
        return remote_stamp(ctx.plan.compute)
    return {
        "hostname": ctx.machine.hostname,
        **ctx.machine.gpus.fingerprint(),
        "backend_torch": torch_stamp(ctx.plan.backend.python),
    }


def torch_stamp(python: str) -> dict[str, str | None] | None:
    """torch's version and CUDA build from its version.py in the environment of `python`."""
    version_file = _torch_version_file(python)
    if version_file is None:
        return None
    try:
        text = version_file.read_text(encoding="utf-8")
    except OSError:
        return None
    version = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)", text, re.M)
    cuda = re.search(r"^cuda\s*(?::[^=]*)?=\s*['\"]([^'\"]+)", text, re.M)
    return {"version": version.group(1) if version else None, "cuda": cuda.group(1) if cuda else None}


def _torch_version_file(python: str) -> Path | None:
    import sys

    if Path(python) == Path(sys.executable):
        spec = importlib.util.find_spec("torch")
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(next(iter(spec.submodule_search_locations))) / "version.py"
    exe = shutil.which(python)
    if exe is None:
        return None
    prefix = Path(exe).parent.parent
    for candidate in sorted(prefix.glob("lib/python3*/site-packages/torch/version.py")):
        return candidate
    return None


def stamp_sources(ctx: GateContext) -> list[Path]:
    """The files and folders `environment_stamp` reads (none for a remote machine): where the
    backend's Python is looked up, its torch's version.py, and the folder that would hold it."""
    if ctx.plan.compute.target != "local":
        return []
    import sys

    python = ctx.plan.backend.python
    version_file = _torch_version_file(python)
    if Path(python) == Path(sys.executable):
        return [version_file] if version_file else []  # torch's install shows in site-packages
    sources: list[Path] = []
    if os.sep not in python:  # looked up on PATH: a new one could appear in any of its folders
        sources += [Path(d or ".") for d in os.environ.get("PATH", os.defpath).split(os.pathsep)]
    exe = shutil.which(python)
    if exe is not None:
        prefix = Path(exe).parent.parent
        # where torch would appear: a new python3.x folder, or torch put into one
        sources += [Path(exe), prefix / "lib", *prefix.glob("lib/python3*/site-packages")]
    if version_file is not None:
        sources += [version_file, version_file.parent.parent]
    return sources


def probe(plan: Plan) -> dict[str, Any]:
    """Run the probe with the backend's Python; a dict with `error` when it cannot run."""
    argv = backends.probe_command(plan)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False)
    except FileNotFoundError:
        return {"error": f"the backend's Python was not found: {argv[0]}"}
    except subprocess.TimeoutExpired:
        return {"error": f"the backend's Python did not answer within {PROBE_TIMEOUT_S} seconds"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            try:
                result: dict[str, Any] = json.loads(line)
                return result
            except json.JSONDecodeError:
                break
    return {"error": f"the backend's Python failed to start (exit {done.returncode}): {done.stderr.strip()[-300:]}"}


def lora_bytes(plan: Plan) -> int:
    demo = presets.DEMO_MODELS.get(plan.model.demo or "")
    params = lora_parameters(plan.model.family, plan.training.rank, demo)
    return int(params * BYTES_PER_PARAM.get(plan.training.save_precision, 2.0))


# Cached latents and text-encoder outputs per picture, when a backend caches them to disk.
CACHE_BYTES_PER_IMAGE = {"sd15": 100_000, "sdxl": 400_000, "pony": 400_000, "flux": 1_000_000}


def disk_parts(plan: Plan, *, inputs_to_place: bool) -> dict[str, int]:
    """What the run needs on disk, in bytes, by part (the model and dataset only when they are
    still to be put there: a demo model to create, a remote machine, or `lorabuild env`)."""
    lora = lora_bytes(plan)
    state = lora * 4  # LoRA weights plus optimizer state in fp32
    parts = {
        "checkpoints": (plan.checkpoints.keep_last + 1) * (lora + state),
        "final LoRA": lora,
        "caches": len(plan.dataset.images) * CACHE_BYTES_PER_IMAGE.get(plan.model.family, 400_000),
        "logs and working files": DISK_MARGIN_BYTES,
    }
    if inputs_to_place or plan.model.demo:
        parts["base model"] = plan.model.bytes
    if inputs_to_place:
        parts["dataset"] = len(plan.dataset.images) * DATASET_BYTES_PER_IMAGE
    return parts


def disk_needed(plan: Plan, *, inputs_to_place: bool = False) -> int:
    return sum(disk_parts(plan, inputs_to_place=inputs_to_place).values())


def check_environment(
    plan: Plan,
    gpus: GpuReport,
    where: Path | str,
    facts: dict[str, Any] | None = None,
    *,
    inputs_to_place: bool = False,
    free: int | None = None,
    install: backends.Installation | None = None,
) -> tuple[list[Check], dict[str, Any]]:
    """Every environment check for `plan` on the machine that trains, and the facts they were made from.

    Locally everything is read here; for a remote machine the caller passes what it read there
    (`facts` from the backend's Python, `free` disk at `where`, the backend's `install`), and the
    checks and their words are the same.
    `inputs_to_place`: count the model and dataset in the disk check (they are not there yet)."""
    facts = facts if facts is not None else probe(plan)
    checks: list[Check] = []
    needs_gpu = plan.backend.name != "builtin"
    best = max(gpus.gpus, key=lambda g: g.total_gb) if gpus.gpus else None

    if best is not None:
        more = f" (and {len(gpus.gpus) - 1} more)" if len(gpus.gpus) > 1 else ""
        need = plan.estimates.memory_needed_gb
        enough = best.total_gb >= need
        verdict = (
            "plenty for this training"
            if best.total_gb >= need * 1.5
            else ("enough for this training" if enough else f"not enough: this training needs about {need:g} GB")
        )
        checks.append(
            Check(
                "gpu",
                enough,
                f"Your {best.name}{more} has {best.total_gb:.0f} GB VRAM — {verdict}",
                "" if enough else "lower the batch size, resolution or rank, or use a bigger GPU",
            )
        )
    elif needs_gpu:
        checks.append(
            Check(
                "gpu",
                False,
                f"Problem: {gpus.problem}. The {plan.backend.name} backend needs an NVIDIA GPU",
                "train on a machine with an NVIDIA GPU (compute: ssh, runpod or vastai), "
                "or use `backend: builtin` for a test on this processor",
            )
        )
    else:
        checks.append(
            Check(
                "gpu",
                True,
                f"{gpus.problem[:1].upper()}{gpus.problem[1:]}. The builtin trainer will use this "
                "computer's processor: fine for the demo model, very slow for real ones"
                if gpus.problem
                else "No GPU: training runs on the processor",
                warning=True,
            )
        )

    if facts.get("error"):
        checks.append(
            Check(
                "python",
                False,
                f"Problem: {facts['error']}",
                "check `backend.python` (or `backend.path`) in the spec points at the backend's environment",
            )
        )
    elif not facts.get("torch"):
        checks.append(
            Check(
                "pytorch",
                False,
                f"Problem: PyTorch is not installed for {facts.get('executable')} "
                f"({facts.get('torch_error', 'import failed')})",
                "install it in that environment, e.g. pip install torch==2.13.0",
            )
        )
    else:
        checks.extend(_cuda_checks(plan, gpus, facts, needs_gpu))

    if inputs_to_place:
        pass  # `lorabuild env`: the model is described by its size, not looked for
    elif plan.model.kind == "missing":  # remote targets get this very file uploaded
        checks.append(
            Check(
                "model",
                False,
                f"Problem: the base model {plan.model.path} was not found",
                "check `base_model.path` (relative paths start at the spec's folder), or download the model there",
            )
        )
    elif not plan.model.demo:
        checks.append(
            Check(
                "model", True, f"The base model is there: {Path(plan.model.path).name} ({plan.model.bytes / GB:.1f} GB)"
            )
        )
    install = install if install is not None else backends.installation(plan)
    modules = facts.get("modules") or {}
    missing = [name for name, version in modules.items() if version is None]
    if not install.ok:
        checks.append(Check("backend", False, f"Problem: {install.message}", install.fix))
    elif not facts.get("error"):
        if missing:
            checks.append(
                Check(
                    "backend",
                    False,
                    f"Problem: the {plan.backend.name} backend is not fully installed: "
                    f"{', '.join(missing)} cannot be imported",
                    f"install them in {facts.get('executable')}: pip install {' '.join(missing)}",
                )
            )
        else:
            shown = ", ".join(f"{k} {v}" for k, v in modules.items())
            checks.append(Check("backend", True, f"The backend is installed: {install.message} ({shown})"))

    free = free if free is not None else free_bytes(Path(where))
    parts = disk_parts(plan, inputs_to_place=inputs_to_place or plan.compute.target != "local")
    needed = sum(parts.values())
    what = ", ".join(name for name, size in parts.items() if size)
    enough_disk = free >= needed
    checks.append(
        Check(
            "disk",
            enough_disk,
            f"You have {free / GB:.0f} GB free disk — need about {needed / GB:.1f} GB for {what}"
            if enough_disk
            else f"Problem: only {free / GB:.1f} GB free disk, but the run needs about {needed / GB:.1f} GB ({what})",
            "" if enough_disk else "free some disk space or lower `checkpoints.keep_last`",
        )
    )
    record = {
        "gpus": [asdict(g) for g in gpus.gpus],
        "gpu_problem": gpus.problem,
        "driver": gpus.driver,
        "cuda_driver": gpus.cuda_driver,
        "backend": {
            "name": plan.backend.name,
            "python": plan.backend.python,
            "version": install.version,
            "entry_point": install.entry_point,
            "probe": facts,
        },
        "disk": {"free_bytes": free, "needed_bytes": needed, "parts": parts, "where": str(where)},
        "checks": [asdict(c) for c in checks],
        "passed": all(c.ok for c in checks),
    }
    return checks, record


def _cuda_checks(plan: Plan, gpus: GpuReport, facts: dict[str, Any], needs_gpu: bool) -> list[Check]:
    torch_version = str(facts["torch"])
    torch_cuda = facts.get("torch_cuda")
    short = ".".join(torch_version.split("+")[0].split(".")[:2])
    if not gpus.gpus:
        where = "with CUDA " + torch_cuda if torch_cuda else "for processors only"
        return [Check("pytorch", True, f"PyTorch {short} is installed ({where})")]
    checks: list[Check] = []
    arch_list = [str(a) for a in facts.get("arch_list") or []]
    seen: set[str] = set()
    for gpu in gpus.gpus:
        for finding in check_stack(
            gpu_name=gpu.name,
            capability=gpu.capability,
            driver=gpus.driver or "0",
            driver_cuda=gpus.cuda_driver,
            torch_version=torch_version,
            torch_cuda=torch_cuda,
            arch_list=arch_list,
            python=plan.backend.python,
        ):
            if finding.message in seen:
                continue  # several identical GPUs: say it once
            seen.add(finding.message)
            # a CPU-only torch is fine for the builtin trainer (it then trains on the processor)
            soft = not finding.ok and not needs_gpu and not torch_cuda
            checks.append(
                Check(
                    "cuda",
                    finding.ok or soft,
                    finding.message.replace("Problem:", "Note:") if soft else finding.message,
                    finding.fix,
                    warning=finding.warning or soft,
                )
            )
    if torch_cuda and facts.get("cuda_available") is False:
        checks.append(
            Check(
                "cuda",
                False,
                f"Problem: PyTorch cannot start CUDA: {facts.get('cuda_error') or 'no usable GPU'}",
                "restart the machine; if it persists, reinstall the NVIDIA driver",
            )
        )
    return checks


def render_environment_md(plan: Plan, checks: list[Check], record: dict[str, Any]) -> str:
    ex = Explainer()
    lines = [
        f"# Environment: {plan.name}",
        "",
        f"Checked for the {plan.backend.name} backend ({ex.first('backend')}).",
        "",
    ]
    for check in checks:
        mark = "✓" if check.ok and not check.warning else ("!" if check.ok else "✗")
        lines.append(f"- {mark} {check.message}" + (f". Fix: {check.fix}" if check.fix and not check.ok else ""))
    probe_facts = record["backend"]["probe"]
    lines += ["", "## Details", ""]
    lines.append(
        f"- **GPU** ({ex.first('gpu')}): "
        + (
            ", ".join(f"{g['name']} {g['total_gb']:.1f} GB" for g in record["gpus"])
            or f"none — {record['gpu_problem']}"
        )
    )
    if record["driver"]:
        lines.append(
            f"- **NVIDIA driver** ({ex.first('driver')}): {record['driver']}, CUDA up to {record['cuda_driver']}"
        )
    lines.append(
        f"- **Backend Python**: {probe_facts.get('executable', plan.backend.python)} "
        f"(Python {probe_facts.get('python', '?')})"
    )
    lines.append(
        f"- **PyTorch** ({ex.first('pytorch')}): {probe_facts.get('torch') or 'not installed'}, "
        f"built for CUDA {probe_facts.get('torch_cuda') or 'none'} ({ex.first('cuda')})"
    )
    disk = record["disk"]
    lines.append(
        f"- **Disk**: {disk['free_bytes'] / GB:.1f} GB free at {disk['where']}, "
        f"about {disk['needed_bytes'] / GB:.1f} GB needed"
    )
    lines += ["", "**Result**: " + ("passed" if record["passed"] else "failed"), ""]
    return "\n".join(lines)


def run(ctx: GateContext) -> None:
    from lorabuild.machine import is_remote

    if is_remote(ctx.plan):
        checks, record, plan = check_remote(ctx)
    else:
        checks, record = check_environment(ctx.plan, ctx.machine.gpus, ctx.run.root)
        plan = ctx.plan
    atomic_write_json(ctx.run.environment_json, record)
    atomic_write_text(ctx.run.environment_md, render_environment_md(plan, checks, record))
    for check in checks:
        (ctx.console.say if check.ok else ctx.console.fail)(f"  {check.message}")
    failed = [c for c in checks if not c.ok]
    if failed:
        raise GateFailed(
            "the environment is not ready for this training",
            "; ".join(c.fix for c in failed if c.fix) or "see environment.md",
            [c.message for c in failed],
        )


def check_remote(ctx: GateContext) -> tuple[list[Check], dict[str, Any], Plan]:
    """Gate 3 on the machine that trains, over SSH: the same checks and words as here."""
    from lorabuild.machine import RemoteMachine, machine_for

    machine = machine_for(ctx)
    assert isinstance(machine, RemoteMachine)
    host = machine.host
    try:
        host.run(["mkdir", "-p", "--", machine.layout.root], timeout=60)
        plan = machine.plan
        gpus = host.gpu_report()
        facts = host.probe_python(plan.backend.python, backends.probe_command(plan)[3:])
        free = host.free_bytes(machine.layout.root)
        install = _remote_installation(machine)
        checks, record = check_environment(
            plan, gpus, machine.layout.root, facts, free=free, install=install, inputs_to_place=True
        )
    finally:
        machine.close()
    installable = bool(backends.install_commands(plan))
    softened = []
    for check in checks:
        # lorabuild installs a missing backend there before the dry run, so it is news, not a stop
        if not check.ok and check.name == "backend" and installable:
            check = Check(
                check.name,
                True,
                check.message.replace("Problem: ", "Note: ") + " — lorabuild installs it there before the dry run",
                warning=True,
            )
        softened.append(check)
    if ctx.plan.model.kind == "missing":
        softened.append(
            Check(
                "model",
                False,
                f"Problem: the base model {ctx.plan.model.path} was not found on this computer, so it cannot be sent",
                "check `base_model.path` (relative paths start at the spec's folder)",
            )
        )
    record["checks"] = [asdict(c) for c in softened]
    record["passed"] = all(c.ok for c in softened)
    record["machine"] = host.target.describe()
    record["remote_dir"] = machine.layout.root
    return softened, record, plan


def _remote_installation(machine: Any) -> backends.Installation:
    entry = backends.remote_entry_point(machine.plan)
    name = machine.plan.backend.name
    where = machine.host.target.host
    if entry is None:
        return backends.Installation(True, f"lorabuild's own trainer (sent to {where} with each run)")
    path = machine.host.expand_path(entry)
    if machine.host.run(["test", "-f", path], timeout=60, check=False).ok:
        return backends.Installation(True, f"{name} at {path.rsplit('/', 1)[0]} on {where}", entry_point=path)
    return backends.Installation(
        False,
        f"the {name} backend is not installed on {where} ({path} is missing)",
        backends.installation(machine.plan).fix or f"install {name} there",
    )


def guess_family(model_gb: float) -> str:
    """A model family from a file size, for `lorabuild env` without `--family` (rough bands)."""
    if model_gb <= 4.5:
        return "sd15"
    if model_gb <= 10:
        return "sdxl"
    return "flux"


def environment_for(
    backend: str,
    *,
    model_gb: float,
    dataset_images: int,
    where: Path,
    family: str | None = None,
    backend_path: str | None = None,
    python: str | None = None,
    machine: Machine | None = None,
    facts: dict[str, Any] | None = None,
) -> tuple[list[Check], dict[str, Any], Plan]:
    """`lorabuild env`: Gate 3's checks for a training described only by its sizes.

    The same implementation as the gate: a notional plan is made for the sizes given, and checked
    exactly as a spec's would be (with the model and pictures counted in the disk check).
    """
    from lorabuild.dataset import DatasetListing
    from lorabuild.modelfile import ModelListing
    from lorabuild.plan import make_plan
    from lorabuild.spec import LoadedSpec, Spec
    from lorabuild.studio import read_machine
    from lorabuild.yamlsource import SourceMap

    machine = machine or read_machine()
    family = family or guess_family(model_gb)
    backend_ref: dict[str, Any] = {"name": backend}
    if backend_path:
        backend_ref["path"] = backend_path
    if python:
        backend_ref["python"] = python
    spec = Spec.model_validate(
        {
            "version": 1,
            "name": "environment-check",
            "base_model": {"path": "model.safetensors", "family": family},
            "dataset": {"path": "."},
            "backend": backend_ref,
        }
    )
    here = Path.cwd()
    loaded = LoadedSpec(spec, here / "lorabuild-env.yaml", SourceMap("(lorabuild env)", None))
    images = tuple(f"picture-{i:05d}.png" for i in range(dataset_images))
    dataset = DatasetListing(here, images, (), images, dataset_images * DATASET_BYTES_PER_IMAGE)
    model = ModelListing(here / "model.safetensors", "file", (), int(model_gb * 1e9))
    plan = make_plan(loaded, machine, dataset, model, grimoire=where)
    checks, record = check_environment(plan, machine.gpus, where, facts, inputs_to_place=True)
    return checks, record, plan
