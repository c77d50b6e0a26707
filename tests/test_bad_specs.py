"""Bad specs end with a located, plain-language message and exit code 2 (run) / 1 (validate),
with no traceback and nothing written under grimoire/."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import Project

GOOD = "version: 1\nname: x\nbase_model: {demo: tiny-sd}\ndataset: {path: data}\n"

BAD: dict[str, tuple[str | bytes, str, str]] = {
    # name: (content, expected location, expected words)
    "yaml-syntax": (GOOD + "training: {epochs: 3\n", ":6:1:", "YAML syntax error"),
    "unknown-key": (GOOD + "colour: red\n", ":5:1: colour:", "not a setting lorabuild knows"),
    "wrong-type": (GOOD + "training:\n  rank: sixteen\n", ":6:9: training.rank:", "should be a whole number"),
    "duplicate-key": (GOOD + "name: y\n", ":5:1:", "`name` appears twice"),
    "missing-dataset": (GOOD.replace("path: data", "path: gone"), ":4:17: dataset.path:", "does not exist"),
    "name-traversal": (GOOD.replace("name: x", "name: ../x"), ":2:7: name:", "becomes a folder name"),
    "negative-epochs": (GOOD + "training:\n  epochs: -3\n", ":6:11: training.epochs:", "at least 1"),
    "empty-file": ("", ":1:1:", "the spec is empty"),
    "binary-file": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)), ":1:1:", "binary file"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_spec_is_refused_cleanly(bare_project: Project, case: str) -> None:
    content, where, words = BAD[case]
    spec = bare_project.root / f"{case}.yaml"
    if isinstance(content, bytes):
        spec.write_bytes(content)
    else:
        spec.write_text(content)

    run = bare_project.lorabuild("run", spec.name)
    assert run.returncode == 2, run.stdout + run.stderr
    first = run.stderr.splitlines()[0]
    assert first.startswith(f"{case}.yaml") and where in first and words in first, run.stderr
    assert "Traceback" not in run.stdout + run.stderr
    assert len(run.stderr.splitlines()) <= 24  # one screen
    assert not (bare_project.root / "grimoire" / "training").exists()
    assert not (bare_project.root / "grimoire" / ".lorabuild").exists()
    assert not (bare_project.root / "grimoire" / "studio.json").exists()

    validate = bare_project.lorabuild("validate", spec.name)
    assert validate.returncode == 1, validate.stdout + validate.stderr
    assert where in validate.stdout and words in validate.stdout
    assert "Traceback" not in validate.stdout + validate.stderr

    status = bare_project.lorabuild("status", spec.name)
    assert status.returncode == 2 and "Traceback" not in status.stderr


def test_validate_usage_errors_exit_2(bare_project: Project) -> None:
    assert bare_project.lorabuild("validate").returncode == 2
    missing = bare_project.lorabuild("validate", "no-such.yaml")
    assert missing.returncode == 2 and "no such file" in missing.stderr
    assert bare_project.lorabuild("validate", "--bogus", "x.yaml").returncode == 2


def test_validate_mixed_set_exits_1_and_reports_each(bare_project: Project) -> None:
    (bare_project.root / "good.yaml").write_text(GOOD)
    (bare_project.root / "bad.yaml").write_text(GOOD + "training: {epochs: 0}\n")
    done = bare_project.lorabuild("validate", "good.yaml", "bad.yaml")
    assert done.returncode == 1
    assert "bad.yaml:5:20: training.epochs" in done.stdout
    assert "good.yaml" not in done.stdout
    assert "2 specs checked: 1 valid, 1 invalid" in done.stderr
    ok = bare_project.lorabuild("validate", "good.yaml")
    assert ok.returncode == 0


def test_validate_reports_safe_range_problems_at_their_line(bare_project: Project) -> None:
    (bare_project.root / "lr.yaml").write_text(GOOD + "training:\n  optimizer: adamw\n  learning_rate: 0.5\n")
    done = bare_project.lorabuild("validate", "lr.yaml")
    assert done.returncode == 1
    assert "lr.yaml:7:18: training.learning_rate: learning rate for adamw 0.5 is outside the safe range" in done.stdout


def test_validate_folders_and_globs(bare_project: Project) -> None:
    folder = bare_project.root / "many"
    folder.mkdir()
    shutil.copytree(bare_project.dataset, folder / "data")
    for i in range(3):
        (folder / f"s{i}.yaml").write_text(GOOD.replace("name: x", f"name: s{i}"))
    assert bare_project.lorabuild("validate", "many").returncode == 0
    assert bare_project.lorabuild("validate", "many/*.yaml").returncode == 0
    assert bare_project.lorabuild("validate", "many/*.yml").returncode == 2


def test_validate_never_imports_torch(bare_project: Project, tmp_path: Path) -> None:
    (bare_project.root / "good.yaml").write_text(GOOD)
    code = (
        "import sys\n"
        "from lorabuild.cli import cli\n"
        "try:\n"
        "    cli(['validate', 'good.yaml'], standalone_mode=False)\n"
        "finally:\n"
        "    heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'fabric') if m in sys.modules)\n"
        "    print('HEAVY', heavy)\n"
    )
    import subprocess
    import sys

    from tests.conftest import lorabuild_env

    done = subprocess.run(
        [sys.executable, "-c", code], cwd=bare_project.root, env=lorabuild_env(), capture_output=True, text=True
    )
    assert "HEAVY []" in done.stdout, done.stdout + done.stderr
