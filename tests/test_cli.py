"""The thin commands, through click's test runner, and their light start-up."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from lorabuild.cli import cli
from lorabuild.spec import SCHEMA_PATH
from tests.conftest import REPO, Project, lorabuild_env


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


def test_vram_prints_the_estimate_in_plain_language_and_json() -> None:
    args = ["vram", "--model", "sdxl", "--resolution", "1024", "--batch", "2", "--rank", "16"]
    text = CliRunner().invoke(cli, args)
    assert text.exit_code == 0, text.output
    assert "Estimated VRAM (the memory on your graphics card" in text.output
    assert "base model weights (frozen)" in text.output and "Fits on:" in text.output
    as_json = CliRunner().invoke(cli, [*args, "--json", "--optimizer", "prodigy", "--no-gradient-checkpointing"])
    data = json.loads(as_json.output)
    assert set(data) >= {"total_gb", "breakdown"} and data["total_gb"] == round(data["total_gb"], 2)
    assert abs(sum(data["breakdown"].values()) - data["total_gb"]) < 0.02
    smaller = json.loads(CliRunner().invoke(cli, [*args, "--json", "--base-precision", "fp8"]).output)
    assert smaller["total_gb"] < data["total_gb"]
    assert CliRunner().invoke(cli, ["vram", "--model", "sdxl"]).exit_code == 2  # usage error


def test_env_shares_gate_3_and_reports_plainly(tmp_path: Path) -> None:
    root = ["--root", str(tmp_path / "grimoire")]
    ok = CliRunner().invoke(
        cli,
        ["env", "--backend", "builtin", "--model-size", "2", "--dataset-size", "30", "--python", sys.executable, *root],
    )
    assert ok.exit_code == 0, ok.output
    assert "PyTorch" in ok.output and "free disk" in ok.output and ok.output.rstrip().endswith("Passed.")
    data = json.loads(
        CliRunner()
        .invoke(
            cli,
            [
                "env",
                "--backend",
                "builtin",
                "--model-size",
                "2",
                "--dataset-size",
                "30",
                "--python",
                sys.executable,
                "--json",
                *root,
            ],
        )
        .output
    )
    assert data["passed"] is True and data["family"] == "sd15" and data["disk"]["parts"]["base model"] == 2e9
    broken = CliRunner().invoke(
        cli,
        [
            "env",
            "--backend",
            "builtin",
            "--model-size",
            "2",
            "--dataset-size",
            "3",
            "--python",
            str(tmp_path / "no-python"),
            *root,
        ],
    )
    assert broken.exit_code == 1 and "Python was not found" in broken.output and "Fix:" in broken.output
    assert not (tmp_path / "grimoire").exists()  # it only reads


def test_a_ctrl_c_inside_a_finaliser_is_delivered_not_printed() -> None:
    """Python drops a KeyboardInterrupt raised in a weakref callback with an "Exception ignored"
    traceback; lorabuild's hook sends it again, where the run can stop cleanly."""
    script = textwrap.dedent("""
        import sys, weakref
        from lorabuild.cli import _deliver_lost_interrupts
        sys.unraisablehook = _deliver_lost_interrupts
        class Thing:
            pass
        def finaliser(_):
            raise KeyboardInterrupt
        thing = Thing()
        ref = weakref.ref(thing, finaliser)
        try:
            del thing
            import time
            time.sleep(5)  # the interrupt arrives within this
            print("lost")
        except KeyboardInterrupt:
            print("delivered")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.stdout.strip() == "delivered" and "Traceback" not in done.stderr, done.stderr
