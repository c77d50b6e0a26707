"""Shared test helpers: a project folder with a dataset, a grimoire, and a way to run lorabuild."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.sshd import sshd_server  # noqa: F401 - one real OpenSSH server for every test module

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_DATA = REPO / "examples" / "shapes"

# Ctrl-C is part of what the tests check. Started where SIGINT is ignored (a background job of a
# non-interactive shell, some CI runners), the tests would pass that on to every lorabuild they
# start, and Python would ignore Ctrl-C in them; with a handler here, children start with the default.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def lorabuild_env() -> dict[str, str]:
    env = dict(os.environ)
    if env.get("PYTHONPATH", "").split(os.pathsep)[0] != str(REPO):
        env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("LORABUILD_PARENT_PID", None)
    return env


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny demo model, built once per test session and shared (read-only) by every test."""
    folder = tmp_path_factory.mktemp("shared-models") / "tiny-sd"
    subprocess.run(
        [sys.executable, "-m", "lorabuild.trainer", "--make-demo-model", str(folder)],
        check=True,
        env=lorabuild_env(),
        capture_output=True,
    )
    return folder


class Project:
    """A folder with a dataset and specs, whose grimoire already holds the shared demo model."""

    def __init__(self, root: Path, demo_model: Path | None):
        self.root = root
        self.dataset = root / "data"
        shutil.copytree(EXAMPLE_DATA, self.dataset)
        self.grimoire = root / "grimoire"
        if demo_model is not None:
            (self.grimoire / "models").mkdir(parents=True)
            (self.grimoire / "models" / "tiny-sd").symlink_to(demo_model, target_is_directory=True)

    def spec_data(self, name: str = "t", **sections: Any) -> dict[str, Any]:
        data: dict[str, Any] = {
            "version": 1,
            "name": name,
            "base_model": {"demo": "tiny-sd"},
            "dataset": {"path": "data", "repeats": 1},
            "backend": "builtin",
            "preset": "quick",
            "training": {"epochs": 2, "batch_size": 2, "rank": 4, "alpha": 2, "learning_rate": 5e-4, "seed": 7},
            "checkpoints": {"every_n_epochs": 1, "keep_last": 2},
        }
        # sections merge into the defaults (a None value removes a key); base_model is replaced whole
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict) and key != "base_model":
                merged = {**data[key], **value}
                data[key] = {k: v for k, v in merged.items() if v is not None}
            else:
                data[key] = value
        return data

    def write_spec(self, name: str = "t", filename: str | None = None, **sections: Any) -> Path:
        path = self.root / (filename or f"{name}.yaml")
        text = "# yaml-language-server: $schema=../schemas/training.schema.json\n"
        text += yaml.safe_dump(self.spec_data(name, **sections), sort_keys=False)
        path.write_text(text)
        return path

    def run_dir(self, name: str = "t") -> Path:
        return self.grimoire / "training" / name

    def lorabuild(
        self, *args: str, timeout: float = 300, check: bool = False, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "lorabuild", *args],
            cwd=self.root,
            env={**lorabuild_env(), **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"lorabuild {' '.join(args)} exited {done.returncode}\n{done.stdout}\n{done.stderr}")
        return done

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "lorabuild", *args],
            cwd=self.root,
            env=lorabuild_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )


@pytest.fixture
def project(tmp_path: Path, demo_model_dir: Path) -> Project:
    return Project(tmp_path, demo_model_dir)


@pytest.fixture
def bare_project(tmp_path: Path) -> Project:
    """A project without the demo model (for tests that never train)."""
    return Project(tmp_path, None)


@pytest.fixture
def chdir(tmp_path: Path) -> Iterator[Path]:
    old = Path.cwd()
    os.chdir(tmp_path)
    try:
        yield tmp_path
    finally:
        os.chdir(old)
