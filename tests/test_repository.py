"""The repository keeps its promises: the README's two commands, CI running the test one, lint and types."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def fresh_machine_commands() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## On a fresh machine", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.+?)\n```", section, re.S)


def test_readme_gives_exactly_two_fresh_machine_commands() -> None:
    main, tests = fresh_machine_commands()
    assert main.endswith("lorabuild run specs/example.yaml") and "torch==2.13.0" in main
    assert "pytest" in tests and "torch==2.13.0" in tests
    assert main.index("torch==2.13.0") < main.index("-e '.[train]'")


def test_ci_runs_the_readme_test_command() -> None:
    _, tests = fresh_machine_commands()
    ci = (REPO / ".ci" / "run").read_text()
    assert tests in ci.splitlines()


def test_every_module_has_a_docstring() -> None:
    for path in sorted((REPO / "lorabuild").rglob("*.py")):
        text = path.read_text()
        if path.name == "__main__.py" or not text.strip():
            continue
        assert text.lstrip().startswith(('"""', "'''")), f"{path.relative_to(REPO)} has no module docstring"


@pytest.mark.skipif(
    shutil.which("ruff") is None and not (Path(sys.executable).parent / "ruff").exists(),
    reason="ruff is a test dependency: pip install -e '.[test]'",
)
def test_ruff_is_clean() -> None:
    ruff = str(Path(sys.executable).parent / "ruff") if (Path(sys.executable).parent / "ruff").exists() else "ruff"
    done = subprocess.run(
        [ruff, "check", "lorabuild", "tests", "bench", "examples", "dodo.py"], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_is_clean() -> None:
    done = subprocess.run([sys.executable, "-m", "mypy"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
