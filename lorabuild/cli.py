"""The `lorabuild` command line. Commands parse and print; the work is in plain functions.

Exit codes: 0 success; 1 a gate failed, a spec is invalid (validate) or the run folder is busy;
2 a spec cannot be loaded, or the command was used wrongly; 130 stopped by Ctrl-C or SIGTERM.
Light start-up: nothing here imports torch, diffusers or fabric.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import click

from lorabuild import __version__
from lorabuild.runfolder import REMOTE_GATES, grimoire_of
from lorabuild.yamlsource import SpecError

EXIT_SPEC = 2

root_option = click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for run folders and state (default: ./grimoire, or the spec's `grimoire:`).",
)


def _print_spec_error(error: SpecError) -> None:
    for problem in error.problems:
        click.echo(problem.render(), err=True)
    count = len(error.problems)
    click.echo(f"The spec has {count} problem{'s' if count != 1 else ''}; nothing was run or written.", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lorabuild")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Turn a training spec (training.yaml) into a trained LoRA, through safety gates.

    Re-running does only what changed; a failed run continues where it stopped.
    """
    ctx.obj = {}
    ctx.call_on_close(lambda: _warn_running_instances(ctx.obj))


def _use_grimoire(root: Path | None) -> None:
    """Tell the running-instance warning which grimoire this command worked in."""
    context = click.get_current_context(silent=True)
    if context is not None and context.find_root().obj is not None and root is not None:
        context.find_root().obj["root"] = root


def _warn_running_instances(obj: dict[str, object] | None) -> None:
    """Every command ends with this line while the ledger shows cloud instances still running
    (they cost money). Reads grimoire/studio.json only: no network, no heavy import."""
    from lorabuild.cloud.ledger import running_warning

    root = (obj or {}).get("root")
    folder = Path(str(root)) if root else Path("grimoire")
    if not (folder / "studio.json").is_file():
        return
    warning = running_warning(folder)
    if warning:
        click.secho(f"Warning: {warning}", err=True, fg="yellow")


@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--until",
    type=click.Choice(REMOTE_GATES[:-1]),
    help="Stop after this gate (train: before a remote result is fetched).",
)
@click.option("--yes", "-y", is_flag=True, help="Answer yes to confirmations (for scripts).")
@root_option
def run(spec: Path, until: str | None, yes: bool, root: Path | None) -> None:
    """Run every gate of SPEC that is not up to date, then train."""
    from lorabuild.uptodate import shortcut

    answer = shortcut(spec, root, until)
    if answer is not None:  # nothing changed since a run found every gate up to date
        from lorabuild.ui import Console

        console = Console()
        for title in answer.titles:
            console.up_to_date(title)
        console.nothing_to_do()
        _use_grimoire(answer.grimoire)
        sys.exit(0)

    from lorabuild.gates import RunOptions
    from lorabuild.pipeline import run_spec

    options = RunOptions(yes=yes, interactive=sys.stdin.isatty() and sys.stdout.isatty())
    _use_grimoire(grimoire_of(spec, root))
    try:
        code = run_spec(str(spec), root=root, until=until, options=options)
    except SpecError as exc:
        _print_spec_error(exc)
        sys.exit(EXIT_SPEC)
    sys.exit(code)


@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@root_option
def status(spec: Path, as_json: bool, root: Path | None) -> None:
    """Show each gate of SPEC as up-to-date, stale, missing or failed, and why."""
    from lorabuild.pipeline import build_context, gate_status

    try:
        ctx = build_context(str(spec), root=root)
    except SpecError as exc:
        _print_spec_error(exc)
        sys.exit(EXIT_SPEC)
    _use_grimoire(ctx.run.root)
    states = gate_status(ctx)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "spec": str(ctx.loaded.path),
                    "name": ctx.plan.name,
                    "run_dir": str(ctx.run.dir),
                    "gates": [s.as_dict() for s in states],
                },
                indent=2,
            )
        )
        return
    click.echo(f"{ctx.plan.name} ({ctx.run.dir})")
    for s in states:
        click.echo(f"  {s.name:<12} {s.state}")
        for reason in s.reasons:
            click.echo(f"      {reason}")


@cli.command()
@click.argument("paths", nargs=-1, required=True)
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["text", "json", "github"]),
    default="text",
    show_default=True,
    help="text: file:line:col lines; json: one document for scripts; github: GitHub Actions annotations.",
)
@click.option(
    "--schema-only",
    is_flag=True,
    help="Skip the checks that need the dataset and model files (for repositories without them).",
)
def validate(paths: tuple[str, ...], output_format: str, schema_only: bool) -> None:
    """Check specs (files, folders or globs) without running anything, GPU or torch.

    Exit code 0 when every spec is valid (warnings allowed), 1 when any is invalid, 2 when the
    command is used wrongly (no spec found, unknown option).
    """
    from lorabuild import validate as checks

    try:
        files = checks.expand_paths(paths)
    except checks.UsageError as exc:
        raise click.UsageError(str(exc)) from None
    if not files:
        raise click.UsageError("no .yaml or .yml spec files found")
    reports = checks.validate_paths(files, schema_only=schema_only)
    if output_format == "json":
        click.echo(checks.render_json(reports))
    else:
        lines = checks.render_github(reports) if output_format == "github" else checks.render_text(reports)
        for line in lines:
            click.echo(line)
        click.echo(checks.summary_line(reports), err=True)
    sys.exit(checks.exit_code(reports))


@cli.command()
def schema() -> None:
    """Print the JSON Schema of the spec format (for editors and CI)."""
    from lorabuild.spec import schema_text

    click.echo(schema_text(), nl=False)


@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def explain(spec: Path, as_json: bool) -> None:
    """Show every setting of SPEC: its value, where it came from, and what it means."""
    from lorabuild.explain import explain_spec, render_text

    try:
        explanation = explain_spec(spec)
    except SpecError as exc:
        _print_spec_error(exc)
        sys.exit(EXIT_SPEC)
    click.echo(json.dumps(explanation.as_dict(), indent=2) if as_json else render_text(explanation))


@cli.command("init")
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("training.yaml"),
    show_default=True,
    help="Where to write the spec.",
)
@click.option("--force", is_flag=True, help="Replace the file if it exists.")
@click.option("--non-interactive", is_flag=True, help="Ask nothing: take every answer from the flags (for scripts).")
@click.option("--what", type=click.Choice(["character", "style", "object"]), help="What the LoRA learns.")
@click.option("--family", help="Base model family: sd15, sdxl, pony, flux, or demo (lorabuild's tiny model).")
@click.option("--model", help="The base model's file or diffusers folder.")
@click.option("--dataset", help="The folder of training pictures and captions.")
@click.option("--images", type=click.IntRange(1, 100_000), help="How many pictures, if the folder is not there yet.")
@click.option("--target", help="Where it trains: local, ssh, runpod or vastai.")
@click.option("--host", help="The SSH host (with --target ssh).")
@click.option("--gpu", help="The GPU's name, e.g. 'RTX 4090'.")
@click.option(
    "--vram-gb", type=click.FloatRange(1, 2048), help="The GPU's memory in GB (if lorabuild does not know it)."
)
@click.option("--preset", help="quick, standard or thorough.")
@click.option("--name", help="The LoRA's short name (lowercase letters, digits, - and _).")
@click.option("--backend", help="builtin, kohya, simpletuner or ai-toolkit (default: chosen from the model).")
def init_spec(output: Path, force: bool, non_interactive: bool, **flags: object) -> None:
    """Write a commented training spec from a few questions (validated before it is saved)."""
    from lorabuild.initspec import InitError, answers_from, write_spec

    if (Path.cwd() / output).exists() and not force:  # before any question
        click.echo(f"{output} already exists — use --force to replace it, or -o to write another file", err=True)
        sys.exit(1)
    answers = answers_from(flags, interactive=not non_interactive)
    try:
        result = write_spec(answers, output, force=force)
    except InitError as exc:
        for problem in exc.problems:
            click.echo(problem.render(), err=True)
        click.echo(str(exc), err=True)
        sys.exit(1)
    for line in result.report():
        click.echo(line)


@cli.command()
@click.option(
    "--model", "family", type=click.Choice(["sd15", "sdxl", "pony", "flux"]), required=True, help="Model family."
)
@click.option("--resolution", type=click.IntRange(64, 4096), required=True, help="Picture width in pixels.")
@click.option("--height", type=click.IntRange(64, 4096), default=None, help="Picture height (default: square).")
@click.option("--batch", type=click.IntRange(1, 256), required=True, help="Batch size.")
@click.option("--rank", type=click.IntRange(1, 1024), required=True, help="LoRA rank.")
@click.option(
    "--optimizer",
    type=click.Choice(["adamw", "adamw8bit", "lion", "prodigy", "adafactor"]),
    default="adamw8bit",
    show_default=True,
)
@click.option(
    "--base-precision",
    type=click.Choice(["fp32", "bf16", "fp16", "fp8", "nf4"]),
    default="bf16",
    show_default=True,
    help="Number format of the frozen base model.",
)
@click.option("--mixed-precision", type=click.Choice(["no", "fp16", "bf16"]), default="bf16", show_default=True)
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=True, show_default=True)
@click.option("--cache-latents/--no-cache-latents", default=True, show_default=True)
@click.option("--cache-text-encoder/--no-cache-text-encoder", default=True, show_default=True)
@click.option("--train-text-encoder/--no-train-text-encoder", default=False, show_default=True)
@click.option(
    "--lora-targets",
    type=click.Choice(["all", "attention"]),
    default="all",
    show_default=True,
    help="LoRA on every usual layer, or on attention only.",
)
@click.option("--json", "as_json", is_flag=True, help='Print {"total_gb": …, "breakdown": {…}} for scripts.')
def vram(
    family: str,
    resolution: int,
    height: int | None,
    batch: int,
    rank: int,
    optimizer: str,
    base_precision: str,
    mixed_precision: str,
    gradient_checkpointing: bool,
    cache_latents: bool,
    cache_text_encoder: bool,
    train_text_encoder: bool,
    lora_targets: str,
    as_json: bool,
) -> None:
    """Estimate the GPU memory a LoRA training needs, part by part, and which GPUs fit it."""
    from lorabuild.estimate import MemoryInputs, memory_report, render_memory_report

    inputs = MemoryInputs(
        family=family,
        resolution=resolution,
        height=height,
        batch_size=batch,
        rank=rank,
        optimizer=optimizer,
        base_precision=base_precision,
        mixed_precision=mixed_precision,
        gradient_checkpointing=gradient_checkpointing,
        cache_latents=cache_latents,
        cache_text_encoder_outputs=cache_text_encoder,
        train_text_encoder=train_text_encoder,
        lora_targets=lora_targets,
    )
    report = memory_report(inputs)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(render_memory_report(inputs, report))


@cli.command()
@click.option("--backend", type=click.Choice(["builtin", "kohya", "simpletuner", "ai-toolkit"]), required=True)
@click.option("--model-size", type=click.FloatRange(0.001, 1000), required=True, help="Base model size in GB.")
@click.option("--dataset-size", type=click.IntRange(1, 1_000_000), required=True, help="Number of pictures.")
@click.option(
    "--family",
    type=click.Choice(["sd15", "sdxl", "pony", "flux"]),
    default=None,
    help="Model family (default: guessed from the model size).",
)
@click.option("--backend-path", default=None, help="Where the backend is installed.")
@click.option("--python", "python_path", default=None, help="The backend environment's Python.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@root_option
def env(
    backend: str,
    model_size: float,
    dataset_size: int,
    family: str | None,
    backend_path: str | None,
    python_path: str | None,
    as_json: bool,
    root: Path | None,
) -> None:
    """Check this machine for a training: GPU, CUDA, PyTorch, the backend and free disk (Gate 3).

    Only reads, so it is safe to run again at any time (after an SSH drop, say). Exit code 0 when
    everything passes, 1 when something must be fixed first.
    """
    from lorabuild.gates.environment import environment_for

    where = (root or Path.cwd() / "grimoire").resolve()
    checks, record, plan = environment_for(
        backend,
        model_gb=model_size,
        dataset_images=dataset_size,
        where=where,
        family=family,
        backend_path=backend_path,
        python=python_path,
    )
    if as_json:
        click.echo(json.dumps({**record, "family": plan.model.family}, indent=2, default=str))
    else:
        click.echo(
            f"Environment for {backend}, a {model_size:g} GB {plan.model.family} model and {dataset_size} pictures:"
        )
        for check in checks:
            mark = "✓" if check.ok and not check.warning else ("!" if check.ok else "✗")
            click.echo(
                f"  {mark} {check.message}" + (f"\n      Fix: {check.fix}" if check.fix and not check.ok else "")
            )
        click.echo("Passed." if record["passed"] else "Not ready: fix the problems above, then run this again.")
    sys.exit(0 if record["passed"] else 1)


@cli.command()
@click.option(
    "--log",
    "log_path",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The training log to follow (it may not exist yet).",
)
@click.option("--epochs", type=click.IntRange(1, 100_000), required=True, help="Planned epochs.")
@click.option(
    "--backend",
    type=click.Choice(["builtin", "kohya", "simpletuner", "ai-toolkit"]),
    default="kohya",
    show_default=True,
    help="Which trainer wrote the log.",
)
@click.option(
    "--steps", "total_steps", type=click.IntRange(1), default=None, help="Planned steps, when the log does not say."
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where progress.json/.md and loss.png go (default: the log's folder).",
)
@click.option("--pid", type=int, default=None, help="Stop when this training process ends.")
@click.option("--idle", type=click.FloatRange(1), default=None, help="Stop after this many seconds without output.")
def monitor(
    log_path: Path,
    epochs: int,
    backend: str,
    total_steps: int | None,
    out: Path | None,
    pid: int | None,
    idle: float | None,
) -> None:
    """Follow a training log (any backend, any launcher) and keep progress.md current.

    Warns about a loss plateau or divergence, reports an explosion, draws loss.png, and stops
    when the run ends. Exit code 0 when it completed, 1 when it failed or stopped early.
    """
    from lorabuild.monitor import monitor_log
    from lorabuild.ui import Console, TrainingView

    folder = (out or log_path.parent).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    view = TrainingView(Console(), total_steps or 0, epochs)

    def show(event: object) -> None:
        from lorabuild.backends import Event

        if isinstance(event, Event) and event.kind == "epoch":
            view.say(f"  epoch {event.data.get('epoch')} done")

    click.echo(f"Following {log_path} — progress in {folder / 'progress.md'} (Ctrl-C stops watching, not training)")
    try:
        status = monitor_log(
            log_path.resolve(),
            backend=backend,
            epochs=epochs,
            out=folder,
            total_steps=total_steps,
            pid=pid,
            idle_timeout=idle,
            on_event=show,
        )
    finally:
        view.close()
    click.echo(f"Run {status.lower()}: see {folder / 'progress.md'}")
    sys.exit(0 if status == "COMPLETE" else 1)


@cli.group("cloud")
def cloud_group() -> None:
    """See and delete the cloud GPUs this grimoire rented (RunPod, Vast.ai)."""


@cloud_group.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--offline", is_flag=True, help="Show the ledger only; do not ask the providers.")
@root_option
def cloud_ls(as_json: bool, offline: bool, root: Path | None) -> None:
    """List the instances the ledger knows, checked with the providers first."""
    from lorabuild.cloud import ledger

    folder = root or Path("grimoire")
    _use_grimoire(folder)
    listing = ledger.list_for_cli(folder, refresh=not offline)
    if as_json:
        click.echo(json.dumps(listing, indent=2))
    else:
        click.echo(ledger.format_listing(listing))


@cloud_group.command("down")
@click.argument("instance", required=False)
@click.option("--all", "everything", is_flag=True, help="Delete every instance of this grimoire.")
@root_option
def cloud_down(instance: str | None, everything: bool, root: Path | None) -> None:
    """Delete INSTANCE (its id, ledger id or label), or every instance with --all."""
    from lorabuild.cloud import ledger

    if bool(instance) == everything:
        raise click.UsageError("name one instance, or use --all")
    folder = root or Path("grimoire")
    _use_grimoire(folder)
    report = ledger.down(folder, "all" if everything else str(instance))
    for line in report.describe():
        click.echo(line)
    sys.exit(0 if report.ok else 1)


def _deliver_lost_interrupts(unraisable: Any) -> None:
    """A Ctrl-C that lands while Python runs a finaliser (a weakref callback, a __del__) cannot
    stop anything there: Python would print it as "Exception ignored" with a traceback and drop
    it. Send it again a moment later instead (from here it would only be dropped again), so it
    stops the run where the run handles it."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
        import threading

        threading.Timer(0.01, os.kill, (os.getpid(), signal.SIGINT)).start()
        return
    sys.__unraisablehook__(unraisable)


def main() -> None:
    sys.unraisablehook = _deliver_lost_interrupts
    cli(prog_name="lorabuild")


if __name__ == "__main__":
    main()
