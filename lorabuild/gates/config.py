"""Gate 2 — training config: plan.json, the backend's config files and config.md.

Passes when every parameter is in its safe range, the backend can train this model, and the
memory estimate fits the device with the 20% safety margin (workflow.md Phase 7). On failure
it writes nothing and lists every problem with its fix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lorabuild import backends, presets
from lorabuild.fsutil import atomic_write_text, remove_path
from lorabuild.gates import GateContext, GateFailed
from lorabuild.glossary import Explainer
from lorabuild.plan import Plan, locate_issue

TITLE = "Gate 2 — training config"

FAMILY_NAMES = {"sd15": "SD 1.5", "sdxl": "SDXL", "pony": "Pony (SDXL)", "flux": "Flux"}
BACKEND_NAMES = {
    "builtin": "lorabuild's own trainer",
    "kohya": "kohya-ss sd-scripts",
    "simpletuner": "SimpleTuner",
    "ai-toolkit": "ai-toolkit",
}

# Settings shown in config.md, in the order an artist thinks about them.
SHOWN_SETTINGS = (
    "learning_rate",
    "epochs",
    "batch_size",
    "gradient_accumulation",
    "resolution",
    "rank",
    "alpha",
    "optimizer",
    "lr_scheduler",
    "lr_warmup_steps",
    "mixed_precision",
    "base_precision",
    "gradient_checkpointing",
    "cache_latents",
    "cache_text_encoder_outputs",
    "train_text_encoder",
    "noise_offset",
    "min_snr_gamma",
    "flip_aug",
    "shuffle_caption",
    "clip_skip",
    "seed",
    "save_precision",
)


def backend_files(plan: Plan) -> list[str]:
    """Names of the backend's config files (known without rendering, for the target list)."""
    if plan.backend.name not in backends.IMPLEMENTED:
        return []
    return sorted(backends.render_config(plan))


def targets(ctx: GateContext) -> list[Path]:
    run = ctx.run
    return [run.config_md, run.plan_json, *[run.backend_dir / n for n in backend_files(ctx.plan)]]


def inputs(ctx: GateContext) -> dict[str, Any]:
    # plan.json holds the whole plan, so every planned value is an input (not the version stamp)
    data = ctx.plan.model_dump(mode="json", exclude={"lorabuild"})
    return {"plan": data}


def file_deps(ctx: GateContext) -> list[Path]:
    return []


def run(ctx: GateContext) -> None:
    plan = ctx.plan
    problems = [f"{_where(ctx, i.field)}: {i.message} — {i.fix}" for i in plan.problems]
    if problems:
        raise GateFailed(
            f"the training config cannot pass ({len(problems)} problem{'s' if len(problems) > 1 else ''})",
            "change the settings named above in your spec, then run again",
            problems,
        )
    files = backends.render_config(plan)
    if ctx.run.backend_dir.exists():
        for stale in ctx.run.backend_dir.iterdir():
            if stale.name not in files:
                remove_path(stale)
    for name, text in files.items():
        atomic_write_text(ctx.run.backend_dir / name, text)
    atomic_write_text(ctx.run.plan_json, plan.model_dump_json(indent=2) + "\n")
    atomic_write_text(ctx.run.config_md, render_config_md(plan, files, ctx.run.backend_dir))
    ctx.console.say(
        f"  {plan.steps.total_steps} steps ({plan.steps.epochs} epochs), about {plan.estimates.memory_gb:g} GB of "
        f"{plan.device.memory_gb:g} GB memory, {plan.estimates.time_text} on {plan.estimates.time_device}"
    )
    for note in plan.adjustments:
        ctx.console.say(f"  note: {note}")


def _where(ctx: GateContext, field: tuple[str, ...]) -> str:
    from lorabuild.plan import Issue

    line, col = locate_issue(ctx.loaded, Issue(field=field, message="", fix=""))
    return f"{ctx.loaded.path}:{line}:{col}: {'.'.join(field)}"


def shown_path(path: Path, base: Path) -> str:
    """`path` relative to the project folder (the grimoire's parent), so reports don't depend on cwd."""
    try:
        relative = os.path.relpath(path, base)
    except ValueError:
        return str(path)
    return str(path) if relative.startswith("../..") else relative


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def render_config_md(plan: Plan, files: dict[str, str], backend_dir: Path) -> str:
    """config.md in the shape of workflow.md Phase 7 step 7, each term explained once."""
    ex = Explainer()
    t, e = plan.training, plan.estimates
    base = Path(plan.grimoire).parent
    model = f"demo model {plan.model.demo}" if plan.model.demo else shown_path(Path(plan.model.path), base)
    first_file = backend_dir / next(iter(sorted(files)))
    if plan.device.kind == "gpu":
        memory_line = (
            f"- **Estimated VRAM**: {e.memory_gb:g} GB, {e.memory_needed_gb:g} GB with the safety margin "
            f"(available: {plan.device.memory_gb:g} GB on {plan.device.name}) ({ex.first('vram')}; "
            f"{ex.first('safety_margin')})"
        )
    else:
        memory_line = (
            f"- **Estimated memory**: {e.memory_gb:g} GB, {e.memory_needed_gb:g} GB with the safety margin "
            f"(available: {plan.device.memory_gb:g} GB RAM; no graphics card, so training uses "
            f"{plan.device.name}) ({ex.first('ram')}; {ex.first('safety_margin')})"
        )
    lines = [
        f"# Training Config: {plan.name}",
        "",
        f"- **Backend**: {plan.backend.name} — {BACKEND_NAMES[plan.backend.name]} ({ex.first('backend')})",
        f"- **Base model**: {model}, {FAMILY_NAMES[plan.model.family]} family ({ex.first('base_model')})",
        f"- **Preset**: {plan.preset.capitalize()} — {presets.PRESET_BLURBS[plan.preset]} ({ex.first('preset')})",
        f"- **Key parameters**: lr={_value(t.learning_rate)}, epochs={plan.steps.epochs}, batch={t.batch_size}, "
        f"rank={t.rank}",
        memory_line,
        f"- **Estimated time**: {e.time_text} on {e.time_device} ({plan.steps.total_steps} steps × "
        f"{e.step_seconds:.3g} s, plus {e.setup_seconds:.0f} s to load; an estimate: {e.time_source})",
        *(
            [
                f"- **Estimated cost**: about ${e.cost_usd:.2f} at ${e.cost_per_hour:.2f} per hour "
                f"({e.cost_source}; live prices are checked before anything is rented)"
            ]
            if e.cost_usd is not None and e.cost_per_hour is not None
            else []
        ),
        f"- **Config file**: {shown_path(first_file, base)}",
        "",
        "## Your dataset",
        "",
        f"- {len(plan.dataset.images)} pictures in {shown_path(Path(plan.dataset.path), base)}, each shown "
        f"{plan.dataset.repeats} times per epoch ({ex.first('repeats')})",
        f"- {plan.steps.steps_per_epoch} steps per epoch × {plan.steps.epochs} epochs = {plan.steps.total_steps} "
        f"steps; each step learns from {plan.steps.effective_batch} pictures ({ex.first('effective_batch')})",
    ]
    if plan.dataset.missing_captions:
        shown = ", ".join(plan.dataset.missing_captions[:5])
        more = len(plan.dataset.missing_captions) - 5
        lines.append(
            f"- {len(plan.dataset.missing_captions)} pictures have no caption: {shown}"
            + (f" and {more} more" if more > 0 else "")
        )
    lines += ["", "## Settings", "", "| Setting | Value | Came from | What it means |", "|---|---|---|---|"]
    used = backends.settings(plan)
    for name in SHOWN_SETTINGS:
        if name not in used:
            continue
        value = getattr(t, name)
        if name == "epochs":
            value = plan.steps.epochs
        source = plan.sources.get(f"training.{name}", "derived")
        lines.append(f"| {name} | {_value(value)} | {source} | {ex.first(name) or 'see above'} |")
    lines.append(
        f"| checkpoints | every {plan.checkpoints.every_n_epochs} epochs, keep {plan.checkpoints.keep_last} | "
        f"{plan.sources.get('checkpoints.every_n_epochs')} | {ex.first('checkpoint')} |"
    )
    if t.optimizer in presets.OPTIMIZER_BLURBS:
        lines += ["", f"Optimizer {t.optimizer}: {presets.OPTIMIZER_BLURBS[t.optimizer]}."]
    lines += ["", "## Memory estimate", "", f"Where the {e.memory_gb:g} GB go (an estimate):", ""]
    for part, gb in e.memory_breakdown.items():
        lines.append(f"- {part}: {gb:.3g} GB")
    lines.append(f"- available: {plan.device.memory_gb:g} GB — {plan.device.source}")
    if plan.adjustments:
        lines += ["", "## Adjustments lorabuild made", ""]
        lines += [f"- {a}" for a in plan.adjustments]
    lines += [
        "",
        "## Generated config, explained",
        "",
        "| File | Setting | Value | What it means |",
        "|---|---|---|---|",
    ]
    explained = set(ex.lines_given())
    for line in backends.describe_config(plan):
        value = line.value if len(line.value) <= 60 else line.value[:57] + "..."
        meaning = "explained above" if line.meaning in explained else line.meaning
        explained.add(line.meaning)
        lines.append(f"| {line.file} | `{line.key}` | `{value}` | {meaning} |")
    lines.append("")
    for name, text in sorted(files.items()):
        fence = "json" if name.endswith(".json") else ("toml" if name.endswith(".toml") else "yaml")
        lines += [f"`{shown_path(backend_dir / name, base)}`:", "", f"```{fence}", text.rstrip("\n"), "```", ""]
    return "\n".join(lines)
