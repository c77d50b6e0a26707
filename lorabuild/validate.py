"""`lorabuild validate`: check specs without running anything, without a GPU and without torch.

Checks the schema, the dataset folder, safe ranges and what the backend supports, and reports
each problem as `file:line:col: field.path: problem — fix`. Memory is checked only against a GPU
the spec declares (`compute.gpu` / `compute.vram_gb`), since the machine validating is usually
not the one that trains.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path

from lorabuild.dataset import list_dataset
from lorabuild.modelfile import list_model
from lorabuild.plan import locate_issue, make_plan, model_listing_path
from lorabuild.spec import LoadedSpec, load_spec
from lorabuild.studio import Gpu, GpuReport, Machine
from lorabuild.yamlsource import Problem, SpecError

SPEC_SUFFIXES = (".yaml", ".yml")


def declared_machine(loaded: LoadedSpec) -> Machine:
    """The machine the spec says it trains on; validation must not depend on the computer CI uses."""
    from lorabuild.hardware import find_gpu

    compute = loaded.spec.compute
    known = find_gpu(compute.gpu)
    vram = compute.vram_gb or (known.vram_gb if known else None)
    gpus = GpuReport(problem="not checked")
    if vram is not None:
        name = known.name if known else (compute.gpu or "declared GPU")
        gpus = GpuReport(gpus=(Gpu(0, name, vram, vram, known.capability if known else None),))
    return Machine(hostname="validate", system="any", cpus=1, ram_gb=1e6, gpus=gpus)


class UsageError(Exception):
    """A path argument that names nothing."""


@dataclass
class SpecReport:
    path: str
    problems: list[Problem] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return not any(p.severity == "error" for p in self.problems)


def expand_paths(args: list[str]) -> list[Path]:
    """Files, folders (their .yaml/.yml files, recursively) and globs, in a stable order."""
    found: list[Path] = []
    for arg in args:
        matches = sorted(glob.glob(arg, recursive=True)) if glob.has_magic(arg) else [arg]
        if not matches:
            raise UsageError(f"{arg}: no file matches this pattern")
        for match in matches:
            path = Path(match)
            if path.is_dir():
                for root, dirs, files in os.walk(path):
                    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                    found.extend(Path(root) / f for f in sorted(files) if f.endswith(SPEC_SUFFIXES))
            elif path.exists():
                found.append(path)
            else:
                raise UsageError(f"{arg}: no such file or folder")
    return found


def validate_spec(path: Path) -> SpecReport:
    report = SpecReport(str(path))
    try:
        loaded = load_spec(path)
    except SpecError as exc:
        report.problems.extend(exc.problems)
        return report
    report.problems.extend(plan_problems(loaded))
    return report


def plan_problems(loaded: LoadedSpec) -> list[Problem]:
    """Range, backend and (declared) memory problems, located in the spec."""
    spec = loaded.spec
    dataset = list_dataset(loaded.resolve(spec.dataset.path), spec.dataset.caption_extension)
    model_path = model_listing_path(loaded)
    model = list_model(model_path) if model_path is not None else None
    machine = declared_machine(loaded)
    plan = make_plan(loaded, machine, dataset, model, grimoire=loaded.folder / "grimoire")
    problems = []
    for issue in plan.problems:
        if issue.kind == "memory" and not machine.gpus.gpus:
            continue  # no GPU declared: nothing to compare the estimate with
        if issue.kind == "unavailable":
            continue  # a valid spec for something this version of lorabuild cannot run yet
        line, col = locate_issue(loaded, issue)
        problems.append(Problem(loaded.source.file, line, col, issue.field, issue.message, issue.fix))
    if model is not None and model.kind == "missing" and spec.compute.target == "local":
        line, col = loaded.locate(("base_model", "path"))
        problems.append(
            Problem(
                loaded.source.file,
                line,
                col,
                ("base_model", "path"),
                f"the base model {model.path} was not found here",
                "fine if it lives on the training machine; otherwise check the path",
                severity="warning",
            )
        )
    return problems
