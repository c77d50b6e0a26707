"""`lorabuild explain`: every setting of a spec, its value, where it came from and what it means.

Owns the list of settings shown to people (every section of the spec, in the spec's order), the
words for where a value came from (the plan's `sources` labels: "spec", "preset quick", "sdxl
default", ...), and the two renderings: a terminal page and JSON. The explanations themselves come
from `lorabuild.glossary`. Planning is validate's (the machine the spec declares), so `explain` is
as light as `validate`: no torch, no GPU.
"""

from __future__ import annotations

import shutil
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorabuild import presets
from lorabuild.glossary import TERMS
from lorabuild.plan import Plan
from lorabuild.spec import LoadedSpec, load_spec
from lorabuild.validate import FAMILY_WORDS, Validator
from lorabuild.yamlsource import Problem, SpecError

# The glossary term of each setting whose term is not simply its own last name.
TERM_OF: dict[str, str] = {
    "base_model.path": "base_model",
    "dataset.path": "dataset",
    "backend.name": "backend",
    "backend.path": "backend_path",
    "backend.python": "backend_python",
    "compute.target": "compute_target",
    "compute.vram_gb": "vram",
    "compute.host": "ssh",
    "compute.user": "ssh",
    "compute.port": "ssh",
    "compute.identity_file": "ssh",
    "samples.prompts": "sample_prompts",
    "samples.every_n_epochs": "sample_every_n_epochs",
    "samples.steps": "sample_steps",
    "steps.steps_per_epoch": "steps",
    "steps.total_steps": "steps",
    "steps.effective_batch": "effective_batch",
    "estimates.memory_needed_gb": "safety_margin",
}

# Cloud and SSH settings mean nothing for `target: local`; they are shown when set or remote.
REMOTE_ONLY = (
    "host",
    "user",
    "port",
    "identity_file",
    "remote_dir",
    "max_price_per_hour",
    "min_reliability",
    "region",
    "disk_gb",
    "image",
    "max_hours",
)


def meaning(key: str) -> str:
    """The plain-language line for a setting (dotted key)."""
    term = TERM_OF.get(key, key.rsplit(".", 1)[-1])
    return TERMS.get(term, "")


def source_words(label: str) -> str:
    """A plan source label ("preset quick", "sdxl default", ...) in words."""
    if label == "spec":
        return "your spec"
    if label == "lorabuild default":
        return "lorabuild's default"
    kind, _, rest = label.partition(" ")
    if kind == "preset":
        return f"the {rest} preset"
    if kind == "optimizer":
        return f"the {rest} optimizer's default"
    if label.startswith("demo model "):
        return f"the {label.removeprefix('demo model ')} demo model"
    if label.endswith(" default") and kind in FAMILY_WORDS:
        return f"the {FAMILY_WORDS[kind]} default"
    return label  # "set by the builtin backend", "reduced to fit memory", "derived" read as they are


@dataclass(frozen=True)
class Setting:
    key: str  # dotted, e.g. "training.learning_rate"
    value: Any
    source: str  # the plan's label: "spec", "preset quick", ...
    meaning: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "value": self.value,
            "source": self.source,
            "from": source_words(self.source),
            "meaning": self.meaning,
        }


@dataclass(frozen=True)
class Explanation:
    name: str
    spec: str
    planned_for: str
    settings: list[Setting]
    derived: list[Setting]
    notes: list[str]  # what the plan changed, and why
    problems: list[Problem]

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "spec": self.spec,
            "planned_for": self.planned_for,
            "settings": [s.as_dict() for s in self.settings],
            "derived": [s.as_dict() for s in self.derived],
            "notes": self.notes,
            "problems": [p.as_dict() for p in self.problems],
        }


def explain_spec(path: Path) -> Explanation:
    """Load and plan a spec as `validate` does, and list every setting. Raises `SpecError`."""
    loaded = load_spec(path, check_files=False)
    problems, plan = Validator().check(loaded)
    if plan is None:
        raise SpecError(problems)  # a path no file system can hold: nothing to plan
    settings = _settings(loaded, plan)
    derived = [
        Setting("steps.steps_per_epoch", plan.steps.steps_per_epoch, "derived", meaning("steps.steps_per_epoch")),
        Setting("steps.total_steps", plan.steps.total_steps, "derived", meaning("steps.total_steps")),
        Setting("steps.effective_batch", plan.steps.effective_batch, "derived", meaning("steps.effective_batch")),
        Setting(
            "estimates.memory_needed_gb",
            plan.estimates.memory_needed_gb,
            "derived",
            meaning("estimates.memory_needed_gb"),
        ),
    ]
    if not plan.dataset.images:
        derived = derived[2:]  # steps need the pictures
    device = plan.device
    planned_for = (
        f"{device.name} ({device.memory_gb:g} GB, {device.source})"
        if device.kind == "gpu"
        else "no particular GPU (the spec names none in `compute`)"
    )
    return Explanation(
        name=loaded.spec.name,
        spec=str(path),
        planned_for=planned_for,
        settings=settings,
        derived=derived,
        notes=list(plan.adjustments),
        problems=problems,
    )


def _settings(loaded: LoadedSpec, plan: Plan) -> list[Setting]:
    spec = loaded.spec
    out: list[Setting] = []

    def given(*path: str) -> bool:
        return loaded.source.node_at(path)[1] == len(path)

    def add(key: str, value: Any, source: str | None = None) -> None:
        parts = tuple(key.split("."))
        out.append(Setting(key, value, source or ("spec" if given(*parts) else "lorabuild default"), meaning(key)))

    add("version", spec.version, "spec")
    add("name", spec.name, "spec")
    add("preset", f"{spec.preset} ({presets.PRESET_BLURBS[spec.preset]})")
    add("grimoire", spec.grimoire or "./grimoire (in the folder you run lorabuild from)")
    ref = spec.base_model
    if ref.demo:
        add("base_model.demo", ref.demo, "spec")
        add("base_model.family", plan.model.family, "spec" if ref.family else f"demo model {ref.demo}")
    else:
        add("base_model.path", ref.path, "spec")
        add("base_model.family", ref.family, "spec")
        add("base_model.vae", ref.vae)
    add("dataset.path", spec.dataset.path, "spec")
    add("dataset.caption_extension", spec.dataset.caption_extension)
    add("dataset.repeats", plan.dataset.repeats, plan.sources.get("dataset.repeats"))
    add("backend.name", spec.backend.name, "spec" if given("backend") else "lorabuild default")
    if spec.backend.path:
        add("backend.path", spec.backend.path, "spec")
    add("backend.python", spec.backend.python or plan.backend.python)
    training = plan.training.model_dump()
    for name, value in training.items():
        key = f"training.{name}"
        if name == "max_train_steps":
            add(key, value)
        elif name == "optimizer_args":
            add(key, value, "spec" if value else "lorabuild default")
        else:
            add(key, value, plan.sources.get(key, "lorabuild default"))
    for name, value in plan.checkpoints.model_dump().items():
        add(f"checkpoints.{name}", value, plan.sources.get(f"checkpoints.{name}"))
    for name, value in plan.monitor.model_dump().items():
        add(f"monitor.{name}", value)
    for name, value in plan.samples.model_dump().items():
        add(f"samples.{name}", value)
    remote = spec.compute.target != "local"
    for name, value in spec.compute.model_dump().items():
        if name in REMOTE_ONLY and not remote and not given("compute", name):
            continue
        add(f"compute.{name}", value)
    return out


# --- rendering --------------------------------------------------------------------------------


def show(value: Any) -> str:
    """A value as a person reads it (YAML-like: true/false, plain numbers, `not set`)."""
    if value is None:
        return "not set"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {show(v)}" for k, v in value.items()) or "none"
    if isinstance(value, list):
        return "; ".join(show(v) for v in value) or "none"
    return str(value)


def render_text(explanation: Explanation, width: int | None = None) -> str:
    """A terminal page: one block per section, each setting with its source and meaning."""
    width = width or max(60, min(110, shutil.get_terminal_size((100, 24)).columns))
    lines = [
        f"{explanation.name} ({explanation.spec})",
        f"Planned for: {explanation.planned_for}.",
        "Each setting, its value, where the value came from, and what it means.",
    ]
    blocks = [(s, s.key.rpartition(".")[0] or "spec", "from " + source_words(s.source)) for s in explanation.settings]
    blocks += [(s, "worked out from the settings", "worked out") for s in explanation.derived]
    section = None
    for setting, head, where in blocks:
        if head != section:
            section = head
            lines += ["", head]
        first = f"  {setting.key.rpartition('.')[2]:<26} {show(setting.value)}"
        if len(first) + len(where) + 6 <= width:
            lines.append(f"{first}    ({where})")
        else:
            lines += textwrap.wrap(first, width, subsequent_indent=" " * 29, break_on_hyphens=False)
            lines.append(f"      ({where})")
        lines += textwrap.wrap(setting.meaning, width, initial_indent="      ", subsequent_indent="      ")
    if explanation.notes:
        lines += ["", "what lorabuild changed"]
        for note in explanation.notes:
            lines += textwrap.wrap(note, width, initial_indent="  - ", subsequent_indent="    ")
    lines.append("")
    if explanation.problems:
        lines.append(f"Problems ({len(explanation.problems)}), as `lorabuild validate` reports them:")
        lines += [f"  {p.render()}" for p in explanation.problems]
    else:
        lines.append("No problems found (`lorabuild validate` checks the same).")
    return "\n".join(lines)
