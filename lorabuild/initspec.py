"""`lorabuild init`: write a commented training spec from a few questions an artist can answer.

Owns the questions (what you are training, which base model, where the pictures are and how
many, which GPU or cloud, which preset), the choices derived from the answers (name, repeats,
backend, mirror-image augmentation), the commented YAML it writes, and saving it safely: the text
is validated with `lorabuild.validate` before it replaces anything, and an existing file is never
overwritten without `--force`. Problems that only mean the dataset is not ready yet (no folder,
no pictures, missing captions) do not stop the file being written: they are listed as what to do
before training. Everything else (an impossible setting, a LoRA given as the base model) does.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import yaml

from lorabuild import presets
from lorabuild.dataset import list_dataset
from lorabuild.explain import meaning
from lorabuild.glossary import TERMS
from lorabuild.hardware import find_gpu
from lorabuild.runfolder import NAME_PATTERN
from lorabuild.spec import BACKENDS, FAMILIES, SCHEMA_ID
from lorabuild.validate import FAMILY_WORDS, Validator
from lorabuild.yamlsource import Problem

WHATS: dict[str, str] = {
    "character": "a person, creature or mascot that should look the same in every picture",
    "style": "a way of drawing or painting, applied to anything you ask for",
    "object": "a thing: a prop, an outfit, a vehicle, a building",
}
DEMO = "demo"  # the family answer that means lorabuild's tiny demo model
FAMILY_CHOICES: tuple[str, ...] = (*FAMILIES, DEMO)
TARGETS: dict[str, str] = {
    "local": "this computer",
    "ssh": "another machine you reach over SSH",
    "runpod": "a GPU rented from RunPod",
    "vastai": "a GPU rented from Vast.ai",
}
PICTURES_PER_EPOCH = 200  # repeats are chosen so an epoch shows about this many pictures
SCHEMA_FILE = Path("schemas") / "training.schema.json"


class InitError(Exception):
    """The spec could not be written; carries the problems found, if any."""

    def __init__(self, message: str, problems: list[Problem] | None = None):
        self.problems = problems or []
        super().__init__(message)


@dataclass
class Answers:
    """What the artist told `init` (paths as typed, relative to the current folder)."""

    what: str = "character"
    family: str = "sdxl"
    model: str | None = None
    dataset: str = ""
    images: int | None = None  # only needed when the dataset folder does not exist yet
    target: str = "local"
    host: str | None = None
    gpu: str | None = None
    vram_gb: float | None = None
    preset: str = "standard"
    name: str = ""
    backend: str | None = None  # None: chosen from the model (see `suggest_backend`)


@dataclass
class InitResult:
    path: Path
    text: str
    todo: list[Problem] = field(default_factory=list)  # what to do before training
    schema: str = SCHEMA_ID  # what the modeline points at

    def report(self) -> list[str]:
        """What to tell the artist once the spec is saved."""
        lines = [
            f"\nWrote {self.path}. Check it with `lorabuild validate {self.path}`; see every setting with "
            f"`lorabuild explain {self.path}`."
        ]
        if self.schema == SCHEMA_ID:
            lines.append(
                "For completion and checking in your editor, save the schema beside your specs with "
                "`lorabuild schema > schemas/training.schema.json` and point the file's first line at it "
                "(docs/ci.md)."
            )
        if self.todo:
            lines.append("Before you train:")
            lines += [f"  {problem.render()}" for problem in self.todo]
        return lines


# --- choices made from the answers ------------------------------------------------------------


def suggest_name(dataset: str, what: str) -> str:
    """A valid spec name from the dataset folder's name (lowercase, digits, - and _)."""
    base = Path(dataset.rstrip("/\\")).name.lower() if dataset else ""
    name = re.sub(r"[^a-z0-9_-]+", "-", base).strip("-_")[:64]
    return name if re.fullmatch(NAME_PATTERN, name) else f"my{what}"


def suggest_repeats(images: int) -> int:
    """Repeats so an epoch shows about PICTURES_PER_EPOCH pictures, within the safe range."""
    high = int(presets.GENERAL_RANGES["repeats"].high)
    return max(1, min(high, round(PICTURES_PER_EPOCH / max(images, 1))))


def suggest_backend(family: str, model: Path | None) -> str:
    """builtin for the demo model and diffusers SD 1.5 folders (what it trains); else kohya."""
    if family == DEMO or (family == "sd15" and model is not None and (model / "model_index.json").is_file()):
        return "builtin"
    return "kohya"  # the most popular trainer; it handles SD 1.5, SDXL, Pony and Flux


def count_images(folder: Path) -> int | None:
    """How many pictures a dataset folder holds, or None when there is no such folder yet."""
    try:
        return len(list_dataset(folder, ".txt").images) if folder.is_dir() else None
    except OSError:
        return None


def check_answers(answers: Answers, *, complete: bool = True) -> None:
    """Refuse answers that cannot make a spec (usage errors); `complete=False` checks only the values."""
    if answers.what not in WHATS:
        raise click.UsageError(f"--what must be one of {', '.join(WHATS)}")
    if answers.family not in FAMILY_CHOICES:
        raise click.UsageError(f"--family must be one of {', '.join(FAMILY_CHOICES)}")
    if answers.target not in TARGETS:
        raise click.UsageError(f"--target must be one of {', '.join(TARGETS)}")
    if complete and answers.family != DEMO and not answers.model:
        raise click.UsageError("--model is needed: the path of your base model (or use --family demo)")
    if complete and not answers.dataset:
        raise click.UsageError("--dataset is needed: the folder of your training pictures")
    if complete and answers.target == "ssh" and not answers.host:
        raise click.UsageError("--host is needed with --target ssh")
    if answers.preset not in presets.PRESETS:
        raise click.UsageError(f"--preset must be one of {', '.join(presets.PRESETS)}")
    if answers.backend is not None and answers.backend not in BACKENDS:
        raise click.UsageError(f"--backend must be one of {', '.join(BACKENDS)}")
    if answers.name and not re.fullmatch(NAME_PATTERN, answers.name):
        raise click.UsageError("--name: use lowercase letters, digits, - and _ (it becomes a folder name)")


def answers_from(flags: dict[str, Any], *, interactive: bool) -> Answers:
    """The answers: the flags given, then (interactively) a question for each one missing.

    Raises `click.UsageError` (exit 2) for values that cannot make a spec.
    """
    given = {key: value for key, value in flags.items() if value is not None}
    answers = Answers(**given)
    check_answers(answers, complete=False)  # a wrong flag is said before any question
    if interactive:
        answers = ask(answers, set(given))
    else:
        answers.name = answers.name or suggest_name(answers.dataset, answers.what)
    check_answers(answers)
    return answers


# --- the questions ----------------------------------------------------------------------------


Prompt = Callable[..., Any]


def ask(
    answers: Answers, given: set[str], prompt: Prompt = click.prompt, echo: Callable[[str], None] = click.echo
) -> Answers:
    """Ask, one by one, every question whose answer was not given as a flag."""
    a = dataclasses.replace(answers)

    def choice(text: str, options: dict[str, str] | tuple[str, ...], default: str) -> str:
        if isinstance(options, dict):
            for key, line in options.items():
                echo(f"  {key:<10} {line}")
        answer: str = prompt(text, type=click.Choice(list(options)), default=default)
        return answer

    echo("lorabuild init writes a training spec (training.yaml) from a few questions.")
    echo("Press Enter to take the suggestion in [brackets].\n")
    if "what" not in given:
        echo("What are you training?")
        a.what = choice("Training", WHATS, a.what)
    if "family" not in given:
        echo(f"\nWhich kind of base model? ({TERMS['family']})")
        families = {f: FAMILY_WORDS[f] for f in FAMILIES}
        families[DEMO] = "lorabuild's tiny demo model, to try lorabuild on any computer"
        a.family = choice("Model family", families, a.family)
    if a.family != DEMO and "model" not in given:
        a.model = prompt("\nWhere is the base model? (its .safetensors file or diffusers folder)", type=str)
    if "dataset" not in given:
        default = a.dataset or ("examples/shapes" if a.family == DEMO and Path("examples/shapes").is_dir() else None)
        a.dataset = prompt(f"\nWhere are your training pictures? ({TERMS['dataset']})", type=str, default=default)
    found = count_images(Path(a.dataset).expanduser())
    if found is not None:
        echo(f"Found {found} picture{'s' if found != 1 else ''} there.")
    elif "images" not in given and a.family != DEMO:
        a.images = prompt(
            "That folder does not exist yet. How many pictures will you train on?",
            type=click.IntRange(1, 100_000),
            default=a.images or 20,
        )
    if "target" not in given:
        echo("\nWhere will it train?")
        a.target = choice("Train on", TARGETS, a.target)
    if a.target == "ssh" and "host" not in given:
        a.host = prompt("SSH host (name or address of the machine)", type=str)
    if "gpu" not in given and a.family != DEMO:
        gpu = prompt(
            f"\nWhich GPU does it have? ({TERMS['gpu']}; e.g. RTX 4090 — leave empty if you don't know)",
            type=str,
            default=a.gpu or "",
            show_default=False,
        ).strip()
        a.gpu = gpu or None
        if a.gpu and find_gpu(a.gpu) is None and "vram_gb" not in given:
            a.vram_gb = prompt(
                f"lorabuild does not know the {a.gpu}. How much memory does it have, in GB? ({TERMS['vram']})",
                type=click.FloatRange(1, 2048),
            )
    if "preset" not in given:
        echo(f"\nWhich preset? ({TERMS['preset']})")
        blurbs = {p: f"{presets.PRESETS[p]['epochs']} epochs: {presets.PRESET_BLURBS[p]}" for p in presets.PRESETS}
        a.preset = choice("Preset", blurbs, a.preset)
    if "name" not in given:
        a.name = prompt(
            f"\nA short name for this LoRA ({meaning('name')})",
            type=str,
            default=a.name or suggest_name(a.dataset, a.what),
        )
    return a


# --- the spec text ----------------------------------------------------------------------------


def _scalar(value: Any) -> str:
    """A YAML scalar, quoted only when YAML needs it."""
    text: str = yaml.safe_dump(value, default_flow_style=True, width=10_000, allow_unicode=True)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def _relative_to_spec(value: str, spec_dir: Path, cwd: Path) -> str:
    """A path typed relative to where `init` runs, rewritten relative to the spec's folder."""
    if value.startswith("~") or os.path.isabs(value):
        return value
    return Path(os.path.relpath(cwd / value, spec_dir)).as_posix()


def schema_reference(spec_dir: Path) -> str:
    """The modeline's schema: the nearest schemas/training.schema.json above the spec, else its URL."""
    for folder in (spec_dir, *spec_dir.parents):
        if (folder / SCHEMA_FILE).is_file():
            return Path(os.path.relpath(folder / SCHEMA_FILE, spec_dir)).as_posix()
    return SCHEMA_ID


def render_spec(answers: Answers, output: Path, cwd: Path) -> str:
    """The commented spec for these answers (paths relative to the spec's folder)."""
    a = answers
    spec_dir = (cwd / output).parent.resolve()
    file = output.name
    lines: list[str] = []

    def comment(text: str, indent: int = 0) -> None:
        lines.append(" " * indent + "# " + text)

    def put(key: str, value: Any, explain: str | None = None, indent: int = 0) -> None:
        if explain:
            comment(explain, indent)
        lines.append(" " * indent + (f"{key}: {_scalar(value)}" if value is not ... else f"{key}:"))

    lines.append(f"# yaml-language-server: $schema={schema_reference(spec_dir)}")
    lines.append("#")
    comment(f"A LoRA of a {a.what}: {WHATS[a.what]}. Written by `lorabuild init`.")
    comment(f"Check it:        lorabuild validate {file}")
    comment(f"Every setting:   lorabuild explain {file}   (value, where it comes from, what it means)")
    comment(f"Train:           lorabuild run {file}")
    comment("Settings left out come from the preset and the model family; paths start at this file's folder.")
    put("version", 1)
    put("name", a.name, meaning("name"))
    put("base_model", ..., meaning("base_model.path"))
    if a.family == DEMO:
        put("demo", "tiny-sd", meaning("base_model.demo"), indent=2)
    else:
        assert a.model is not None
        put("path", _relative_to_spec(a.model, spec_dir, cwd), indent=2)
        put("family", a.family, meaning("base_model.family"), indent=2)
    put("dataset", ..., meaning("dataset.path"))
    put("path", _relative_to_spec(a.dataset, spec_dir, cwd), indent=2)
    put("caption_extension", ".txt", meaning("dataset.caption_extension"), indent=2)
    images = count_images(cwd / Path(a.dataset).expanduser()) or a.images
    if images and a.family != DEMO:
        repeats = suggest_repeats(images)
        comment(meaning("dataset.repeats"), 2)
        put("repeats", repeats, f"{images} pictures × {repeats} = {images * repeats} pictures per epoch", indent=2)
    backend = a.backend or suggest_backend(a.family, (cwd / a.model).expanduser() if a.model else None)
    put("backend", backend, f"{meaning('backend.name')}")
    epochs = presets.PRESETS[a.preset]["epochs"]
    blurb = presets.PRESET_BLURBS[a.preset].lower()
    put("preset", a.preset, f"{meaning('preset')} ({a.preset}: {epochs} epochs, {blurb})")
    put("training", ...)
    flip = a.what == "style"
    why = "a style looks the same mirrored" if flip else f"a {a.what}'s left and right sides may differ"
    put("flip_aug", flip, f"{meaning('training.flip_aug')} ({why})", indent=2)
    put("compute", ..., meaning("compute.target"))
    put("target", a.target, indent=2)
    if a.host:
        put("host", a.host, indent=2)
    if a.gpu:
        put("gpu", a.gpu, meaning("compute.gpu"), indent=2)
    if a.vram_gb:
        put("vram_gb", a.vram_gb, meaning("compute.vram_gb"), indent=2)
    return "\n".join(lines) + "\n"


# --- saving -----------------------------------------------------------------------------------


def write_spec(answers: Answers, output: Path, *, force: bool = False, cwd: Path | None = None) -> InitResult:
    """Render, validate, and only then save the spec (atomically). Raises `InitError`."""
    cwd = cwd or Path.cwd()
    target = cwd / output
    if target.exists() and not force:
        raise InitError(f"{output} already exists — use --force to replace it, or -o to write another file")
    if target.is_dir():
        raise InitError(f"{output} is a folder — give a file name, e.g. -o {output}/training.yaml")
    text = render_spec(answers, output, cwd)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = target.parent / f".{target.name}.lorabuild-init-{os.getpid()}"
    try:
        scratch.write_text(text, encoding="utf-8")
        report = Validator().validate(scratch)
        problems = [dataclasses.replace(p, file=str(output)) for p in report.problems]
        blocking = [p for p in problems if p.severity == "error" and p.field_path != ("dataset", "path")]
        if blocking:
            raise InitError(f"the spec for these answers is not valid, so {output} was not written", blocking)
        os.replace(scratch, target)
    finally:
        scratch.unlink(missing_ok=True)
    return InitResult(output, text, problems, schema_reference(target.parent.resolve()))
