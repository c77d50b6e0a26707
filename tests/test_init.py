"""`lorabuild init`: questions an artist can answer, a commented spec, validated before it is saved."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from lorabuild import initspec
from lorabuild.cli import cli
from lorabuild.glossary import TERMS
from lorabuild.spec import SCHEMA_ID, SCHEMA_PATH
from lorabuild.validate import validate_spec
from tests.conftest import EXAMPLE_DATA
from tests.test_validate import LORA, SDXL, write_safetensors


@pytest.fixture
def studio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A catalogue folder with pictures and an SDXL model, as the current folder."""
    shutil.copytree(EXAMPLE_DATA, tmp_path / "pictures" / "mychar")
    write_safetensors(tmp_path / "models" / "sdxl.safetensors", SDXL, size=int(6.94e9))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def init(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(cli, ["init", *args], input=input)


SCRIPTED = [
    "--non-interactive",
    "--what",
    "character",
    "--family",
    "sdxl",
    "--model",
    "models/sdxl.safetensors",
    "--dataset",
    "pictures/mychar",
    "--gpu",
    "RTX 4090",
    "--preset",
    "thorough",
]


def test_non_interactive_writes_a_commented_valid_spec(studio: Path) -> None:
    result = init(*SCRIPTED)
    assert result.exit_code == 0, result.output
    text = (studio / "training.yaml").read_text()
    data = yaml.safe_load(text)
    assert data == {
        "version": 1,
        "name": "mychar",
        "base_model": {"path": "models/sdxl.safetensors", "family": "sdxl"},
        "dataset": {"path": "pictures/mychar", "caption_extension": ".txt", "repeats": 25},
        "backend": "kohya",
        "preset": "thorough",
        "training": {"flip_aug": False},
        "compute": {"target": "local", "gpu": "RTX 4090"},
    }
    assert text.startswith(f"# yaml-language-server: $schema={SCHEMA_ID}\n")
    for term in ("base_model", "dataset", "repeats", "preset", "flip_aug", "gpu"):
        assert f"# {TERMS[term]}" in text, term
    assert "8 pictures × 25 = 200 pictures per epoch" in text
    assert "Wrote training.yaml" in result.output
    report = validate_spec(studio / "training.yaml")
    assert report.valid and report.problems == [], [p.render() for p in report.problems]


def test_interactive_questions(studio: Path) -> None:
    answers = "\n".join(
        [
            "style",  # what are you training
            "sdxl",  # family
            "models/sdxl.safetensors",  # model
            "pictures/mychar",  # pictures (8 found: no question about how many)
            "runpod",  # where
            "RTX 4090",  # which GPU
            "quick",  # preset
            "",  # name: take the suggestion
        ]
    )
    result = init("-o", "specs/mine.yaml", input=answers + "\n")
    assert result.exit_code == 0, result.output
    assert "What are you training?" in result.output
    assert "Found 8 pictures there." in result.output
    assert TERMS["family"] in result.output and TERMS["preset"] in result.output
    data = yaml.safe_load((studio / "specs" / "mine.yaml").read_text())
    assert data["name"] == "mychar"
    # paths are rewritten relative to the spec's own folder
    assert data["base_model"] == {"path": "../models/sdxl.safetensors", "family": "sdxl"}
    assert data["dataset"]["path"] == "../pictures/mychar"
    assert data["training"] == {"flip_aug": True}
    assert data["compute"] == {"target": "runpod", "gpu": "RTX 4090"}
    assert validate_spec(studio / "specs" / "mine.yaml").valid


def test_interactive_asks_how_many_pictures_and_the_vram_of_an_unknown_gpu(studio: Path) -> None:
    answers = ["object", "flux", "models/flux.safetensors", "pictures/later", "40", "local", "Voodoo 5", "24", "", ""]
    result = init(input="\n".join(answers) + "\n")
    assert result.exit_code == 0, result.output
    assert "How many pictures will you train on?" in result.output
    assert "How much memory does it have" in result.output
    data = yaml.safe_load((studio / "training.yaml").read_text())
    assert data["dataset"] == {"path": "pictures/later", "caption_extension": ".txt", "repeats": 5}
    assert data["compute"] == {"target": "local", "gpu": "Voodoo 5", "vram_gb": 24.0}
    assert data["name"] == "later" and data["preset"] == "standard"
    # what is not ready yet is said, but does not stop the spec being written
    assert "Before you train:" in result.output
    assert "dataset.path" in result.output and "does not exist" in result.output
    assert "was not found here" in result.output


def test_demo_model(studio: Path) -> None:
    result = init("--non-interactive", "--family", "demo", "--dataset", "pictures/mychar", "--name", "shapes")
    assert result.exit_code == 0, result.output
    data = yaml.safe_load((studio / "training.yaml").read_text())
    assert data["base_model"] == {"demo": "tiny-sd"} and data["backend"] == "builtin"
    assert "repeats" not in data["dataset"]  # the demo model's own profile decides
    assert validate_spec(studio / "training.yaml").valid


def test_refuses_to_overwrite_without_force(studio: Path) -> None:
    (studio / "training.yaml").write_text("mine\n")
    refused = init(*SCRIPTED)
    assert refused.exit_code == 1 and "already exists" in refused.output
    assert (studio / "training.yaml").read_text() == "mine\n"
    interactive = init(input="character\n")
    assert interactive.exit_code == 1 and "What are you training?" not in interactive.output
    forced = init(*SCRIPTED, "--force")
    assert forced.exit_code == 0 and yaml.safe_load((studio / "training.yaml").read_text())["name"] == "mychar"


def test_an_invalid_spec_is_never_saved(studio: Path) -> None:
    write_safetensors(studio / "models" / "lora.safetensors", LORA, metadata={"ss_network_module": "networks.lora"})
    lora = init(*[a if a != "models/sdxl.safetensors" else "models/lora.safetensors" for a in SCRIPTED])
    assert lora.exit_code == 1
    assert "training.yaml:13:9: base_model.path: this file is a LoRA" in lora.output
    assert "was not written" in lora.output
    builtin_sdxl = init(*SCRIPTED, "--backend", "builtin")
    assert builtin_sdxl.exit_code == 1 and "the builtin trainer cannot train sdxl models" in builtin_sdxl.output
    assert not (studio / "training.yaml").exists()
    assert [p.name for p in studio.iterdir() if p.name.startswith(".")] == []  # no scratch file left


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--non-interactive", "--family", "sdxl", "--dataset", "d"], "--model is needed"),
        (["--non-interactive", "--family", "sd3", "--model", "m", "--dataset", "d"], "--family must be one of"),
        (["--non-interactive", "--family", "demo"], "--dataset is needed"),
        (["--non-interactive", "--family", "demo", "--dataset", "d", "--target", "ssh"], "--host is needed"),
        (["--non-interactive", "--family", "demo", "--dataset", "d", "--preset", "fast"], "--preset must be one of"),
        (["--non-interactive", "--family", "demo", "--dataset", "d", "--name", "../x"], "--name: use lowercase"),
        (["--what", "landscape"], "Invalid value for '--what'"),
        (["--family", "sd3"], "--family must be one of"),  # checked before any question
    ],
)
def test_usage_errors_exit_2(studio: Path, args: list[str], words: str) -> None:
    result = init(*args)
    assert result.exit_code == 2, result.output
    assert words in result.output
    assert not (studio / "training.yaml").exists()


def test_modeline_points_at_the_nearest_schema(studio: Path) -> None:
    (studio / "schemas").mkdir()
    shutil.copy(SCHEMA_PATH, studio / "schemas" / "training.schema.json")
    result = init(*SCRIPTED, "-o", "specs/team/mychar.yaml")
    assert result.exit_code == 0, result.output
    first = (studio / "specs" / "team" / "mychar.yaml").read_text().splitlines()[0]
    assert first == "# yaml-language-server: $schema=../../schemas/training.schema.json"
    assert "lorabuild schema >" not in result.output


def test_written_spec_matches_the_json_schema(studio: Path) -> None:
    import jsonschema

    assert init(*SCRIPTED).exit_code == 0
    schema = json.loads(SCHEMA_PATH.read_text())
    data: Any = yaml.safe_load((studio / "training.yaml").read_text())
    assert list(jsonschema.Draft202012Validator(schema).iter_errors(data)) == []


def test_suggestions() -> None:
    assert initspec.suggest_name("datasets/My Char!", "character") == "my-char"
    assert initspec.suggest_name("", "style") == "mystyle"
    assert initspec.suggest_name("---", "object") == "myobject"
    assert (
        initspec.suggest_repeats(8) == 25 and initspec.suggest_repeats(400) == 1 and initspec.suggest_repeats(1) == 100
    )
    assert initspec.suggest_backend("demo", None) == "builtin"
    assert initspec.suggest_backend("flux", None) == "kohya"


def test_the_command_line_offers_the_same_choices_as_init() -> None:
    command = cli.commands["init"]
    what = next(p for p in command.params if p.name == "what")
    assert list(what.type.choices) == list(initspec.WHATS)  # type: ignore[attr-defined]
