"""`lorabuild explain`: every setting with its value, where it came from, and what it means."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from lorabuild import explain
from lorabuild.cli import cli
from lorabuild.glossary import TERMS
from lorabuild.plan import CheckpointPlan, MonitorPlan, SamplesPlan, TrainingPlan
from lorabuild.spec import Compute
from tests.conftest import EXAMPLE_DATA, REPO, lorabuild_env

SDXL_SPEC = """\
version: 1
name: mychar
base_model: {path: models/sdxl.safetensors, family: sdxl}
dataset: {path: data}
backend: kohya
preset: quick
training:
  optimizer: prodigy
  rank: 32
compute: {target: runpod, gpu: RTX 4090}
"""


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    shutil.copytree(EXAMPLE_DATA, tmp_path / "data")
    path = tmp_path / "mychar.yaml"
    path.write_text(SDXL_SPEC)
    return path


def as_json(path: Path) -> dict[str, Any]:
    result = CliRunner().invoke(cli, ["explain", "--json", str(path)])
    assert result.exit_code == 0, result.output
    data: dict[str, Any] = json.loads(result.output)
    return data


def test_every_setting_has_a_value_a_source_and_a_meaning(spec: Path) -> None:
    data = as_json(spec)
    settings = {s["key"]: s for s in data["settings"]}
    expected = (
        [f"training.{f}" for f in TrainingPlan.model_fields]
        + [f"checkpoints.{f}" for f in CheckpointPlan.model_fields]
        + [f"monitor.{f}" for f in MonitorPlan.model_fields]
        + [f"samples.{f}" for f in SamplesPlan.model_fields]
        + [f"compute.{f}" for f in Compute.model_fields]  # remote target: every compute setting
        + ["version", "name", "preset", "grimoire", "base_model.path", "base_model.family", "base_model.vae"]
        + ["dataset.path", "dataset.caption_extension", "dataset.repeats", "backend.name", "backend.python"]
    )
    assert sorted(settings) == sorted(expected)
    for setting in data["settings"] + data["derived"]:
        assert setting["meaning"], setting["key"]
        assert setting["source"] and setting["from"], setting["key"]


def test_sources_say_where_each_value_came_from(spec: Path) -> None:
    settings = {s["key"]: s for s in as_json(spec)["settings"]}

    def source(key: str) -> tuple[str, str]:
        return settings[key]["source"], settings[key]["from"]

    assert source("training.rank") == ("spec", "your spec")
    assert source("training.epochs") == ("preset quick", "the quick preset")
    assert source("checkpoints.every_n_epochs") == ("preset quick", "the quick preset")
    assert source("training.learning_rate") == ("optimizer prodigy", "the prodigy optimizer's default")
    assert settings["training.learning_rate"]["value"] == 1.0
    assert source("training.resolution") == ("sdxl default", "the SDXL default")
    assert settings["training.resolution"]["value"] == 1024
    assert source("training.seed") == ("lorabuild default", "lorabuild's default")
    assert source("monitor.plateau_epochs") == ("lorabuild default", "lorabuild's default")
    assert source("compute.gpu") == ("spec", "your spec")
    assert settings["training.learning_rate"]["meaning"] == TERMS["learning_rate"]


def test_demo_model_and_terminal_page(tmp_path: Path) -> None:
    shutil.copytree(REPO / "specs", tmp_path / "specs")
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    result = CliRunner().invoke(cli, ["explain", str(tmp_path / "specs" / "example.yaml")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("example (")
    assert "  resolution                 64    (from the tiny-sd demo model)" in lines
    assert "  epochs                     5    (from the quick preset)" in lines
    assert f"      {TERMS['epochs']}" in lines
    assert "worked out from the settings" in lines
    assert "No problems found (`lorabuild validate` checks the same)." in lines
    page = explain.render_text(explain.explain_spec(tmp_path / "specs" / "example.yaml"), width=70)
    assert max(len(line) for line in page.splitlines() if not line.startswith("example (")) <= 70


def test_problems_are_listed_with_the_settings(spec: Path) -> None:
    spec.write_text(SDXL_SPEC.replace("rank: 32", "rank: 512"))
    data = as_json(spec)
    assert "training.rank" in [p["field"] for p in data["problems"]]
    page = CliRunner().invoke(cli, ["explain", str(spec)]).output
    assert "Problems (" in page and "rank 512 is outside the safe range 1 to 128" in page


def test_a_broken_spec_exits_2_with_located_problems(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nname: x\nbase_model: {demo: tiny-sd}\ndataset: {path: d}\ntraining: {rank: many}\n")
    result = CliRunner().invoke(cli, ["explain", str(bad)])
    assert result.exit_code == 2
    assert "bad.yaml:5:18: training.rank: should be a whole number" in result.output
    assert isinstance(result.exception, SystemExit)


def test_source_words() -> None:
    assert explain.source_words("pony default") == "the Pony (SDXL) default"
    assert explain.source_words("demo model tiny-sd") == "the tiny-sd demo model"
    assert explain.source_words("reduced to fit memory") == "reduced to fit memory"


def test_explain_never_imports_heavy_modules(spec: Path) -> None:
    code = (
        "import sys\n"
        "from lorabuild.cli import cli\n"
        f"try:\n    cli(['explain', {str(spec)!r}])\nexcept SystemExit:\n    pass\n"
        "heavy = ('torch', 'diffusers', 'transformers', 'fabric', 'PIL')\n"
        "print('HEAVY', sorted(m for m in heavy if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=spec.parent, env=lorabuild_env(), capture_output=True, text=True, timeout=60
    )
    assert "HEAVY []" in done.stdout, done.stdout[-2000:] + done.stderr
