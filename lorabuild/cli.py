"""The `lorabuild` command line. Commands parse and print; the work is in plain functions.

Exit codes: 0 success; 1 a gate failed, a spec is invalid (validate) or the run folder is busy;
2 a spec cannot be loaded, or the command was used wrongly; 130 stopped by Ctrl-C or SIGTERM.
Light start-up: nothing here imports torch, diffusers or fabric.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from lorabuild import __version__
from lorabuild.runfolder import GATES
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
def cli() -> None:
    """Turn a training spec (training.yaml) into a trained LoRA, through safety gates.

    Re-running does only what changed; a failed run continues where it stopped.
    """


@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--until", type=click.Choice(GATES[:-1]), help="Stop after this gate.")
@click.option("--yes", "-y", is_flag=True, help="Answer yes to confirmations (for scripts).")
@root_option
def run(spec: Path, until: str | None, yes: bool, root: Path | None) -> None:
    """Run every gate of SPEC that is not up to date, then train."""
    from lorabuild.gates import RunOptions
    from lorabuild.pipeline import run_spec

    options = RunOptions(yes=yes, interactive=sys.stdin.isatty() and sys.stdout.isatty())
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
def validate(paths: tuple[str, ...]) -> None:
    """Check specs (files, folders or globs) without running anything."""
    from lorabuild.validate import UsageError, expand_paths, validate_spec

    try:
        files = expand_paths(list(paths))
    except UsageError as exc:
        raise click.UsageError(str(exc)) from None
    if not files:
        raise click.UsageError("no .yaml or .yml spec files found")
    invalid = 0
    for file in files:
        report = validate_spec(file)
        for problem in report.problems:
            click.echo(problem.render())
        if not report.valid:
            invalid += 1
    click.echo(
        f"{len(files)} spec{'s' if len(files) != 1 else ''} checked: {len(files) - invalid} valid, {invalid} invalid",
        err=True,
    )
    sys.exit(1 if invalid else 0)


@cli.command()
def schema() -> None:
    """Print the JSON Schema of the spec format (for editors and CI)."""
    from lorabuild.spec import schema_text

    click.echo(schema_text(), nl=False)


def main() -> None:
    cli(prog_name="lorabuild")


if __name__ == "__main__":
    main()
