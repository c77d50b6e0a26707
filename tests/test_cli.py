"""The thin commands, through click's test runner, and their light start-up."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from lorabuild.cli import cli
from lorabuild.spec import SCHEMA_PATH
from tests.conftest import Project, lorabuild_env


def test_schema_prints_the_checked_in_schema() -> None:
    result = CliRunner().invoke(cli, ["schema"])
    assert result.exit_code == 0
    assert result.output == SCHEMA_PATH.read_text()


def test_status_json_shape(bare_project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = bare_project.write_spec()
    monkeypatch.chdir(bare_project.root)
    result = CliRunner().invoke(cli, ["status", str(spec), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["spec"] == str(spec.resolve())
    assert [g["name"] for g in data["gates"]] == ["config", "environment", "dryrun", "train"]
    assert all(set(g) == {"name", "state", "reasons"} for g in data["gates"])
    assert all(g["state"] in ("up-to-date", "stale", "missing", "failed") for g in data["gates"])


def test_run_with_a_broken_spec_exits_2(bare_project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    (bare_project.root / "bad.yaml").write_text("version: 1\nname: [\n")
    monkeypatch.chdir(bare_project.root)
    result = CliRunner().invoke(cli, ["run", "bad.yaml"])
    assert result.exit_code == 2
    assert isinstance(result.exception, SystemExit)
    assert "bad.yaml:" in result.output and "nothing was run or written" in result.output


def test_until_refuses_unknown_gates(bare_project: Project) -> None:
    result = CliRunner().invoke(cli, ["run", "x.yaml", "--until", "train"])
    assert result.exit_code == 2


@pytest.mark.parametrize("command", [["status", "t.yaml"], ["schema"], ["validate", "t.yaml"], ["--help"]])
def test_light_commands_never_import_heavy_modules(bare_project: Project, command: list[str]) -> None:
    bare_project.write_spec()
    code = (
        "import sys\n"
        "from lorabuild.cli import cli\n"
        f"try:\n    cli({command!r})\nexcept SystemExit:\n    pass\n"
        "print('HEAVY', sorted(m for m in ('torch', 'diffusers', 'transformers', 'fabric') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=bare_project.root,
        env=lorabuild_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "HEAVY []" in done.stdout, done.stdout + done.stderr


def test_python_dash_m_works(bare_project: Project) -> None:
    done = bare_project.lorabuild("--version")
    assert done.returncode == 0 and "lorabuild" in done.stdout
