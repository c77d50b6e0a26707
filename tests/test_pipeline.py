"""The spine end to end, for real: doit gates, the builtin trainer, incremental reruns, crash safety.

Every run here is a real `lorabuild` process training the demo model on this machine's processor.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import REPO, lorabuild_env

TARGETS = [
    "config.md",
    "plan.json",
    "backend/train.json",
    "environment.md",
    "environment.json",
    "dryrun.log",
    "dryrun.ok",
    "example.safetensors",
    "train.log",
    "progress.md",
    "progress.json",
]


class Example:
    """A copy of specs/ and examples/ whose grimoire shares the session's demo model."""

    def __init__(self, root: Path, demo_model: Path):
        self.root = root
        shutil.copytree(REPO / "specs", root / "specs")
        shutil.copytree(REPO / "examples", root / "examples")
        models = root / "grimoire" / "models"
        models.mkdir(parents=True)
        (models / "tiny-sd").symlink_to(demo_model, target_is_directory=True)
        self.spec = root / "specs" / "example.yaml"
        self.run_dir = root / "grimoire" / "training" / "example"

    def lorabuild(self, *args: str, code: int | None = 0) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "lorabuild", *args],
            cwd=self.root,
            env=lorabuild_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        if code is not None:
            assert done.returncode == code, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
        return done

    def status(self) -> dict[str, dict[str, object]]:
        data = json.loads(self.lorabuild("status", "specs/example.yaml", "--json").stdout)
        return {g["name"]: g for g in data["gates"]}

    def stamps(self) -> dict[str, tuple[int, int]]:
        """(inode, mtime_ns) of every target: any rewrite changes one of them."""
        out = {}
        for name in TARGETS:
            st = (self.run_dir / name).stat()
            out[name] = (st.st_ino, st.st_mtime_ns)
        return out

    def edit_spec(self, old: str, new: str) -> None:
        text = self.spec.read_text()
        assert old in text
        self.spec.write_text(text.replace(old, new))


def executed(output: str) -> list[str]:
    titles = {
        "Gate 2 — training config": "config",
        "Gate 3 — environment": "environment",
        "Gate 4 — dry run": "dryrun",
        "Training": "train",
    }
    return [gate for title, gate in titles.items() if f"▶ {title}\n" in output + "\n"]


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> Example:
    ex = Example(tmp_path_factory.mktemp("example"), demo_model_dir)
    done = ex.lorabuild("run", "specs/example.yaml")
    assert executed(done.stdout) == ["config", "environment", "dryrun", "train"], done.stdout
    return ex


def test_first_run_leaves_every_target(example: Example) -> None:
    for name in TARGETS:
        assert (example.run_dir / name).is_file(), name
    progress = json.loads((example.run_dir / "progress.json").read_text())
    assert progress["status"] == "COMPLETE"
    assert progress["step"] == progress["total_steps"] == 40
    assert progress["epoch"] == progress["epochs"] == 5
    assert progress["resumed_from_step"] is None and progress["oom_recoveries"] == 0
    assert isinstance(progress["loss"], float) and isinstance(progress["loss_start"], float)
    assert progress["checkpoints"] == ["epoch-0002", "epoch-0003", "epoch-0004"]  # keep_last 3
    on_disk = sorted(p.name for p in (example.run_dir / "checkpoints").iterdir() if not p.name.startswith("."))
    assert on_disk == progress["checkpoints"]
    assert json.loads((example.run_dir / "dryrun.ok").read_text())["steps"] >= 2
    # the sample picture of each epoch, linked from progress.md (the dry run rendered none)
    samples = sorted(p.name for p in (example.run_dir / "samples").iterdir())
    assert samples == [f"epoch-{e:04d}-1.png" for e in range(1, 6)]
    assert progress["samples"] == ["samples/epoch-0005-1.png"] and progress["samples_epoch"] == 5
    assert "![sample 1](samples/epoch-0005-1.png)" in (example.run_dir / "progress.md").read_text()
    config_md = (example.run_dir / "config.md").read_text()
    for field in (
        "**Backend**",
        "**Base model**",
        "**Preset**",
        "**Key parameters**",
        "**Estimated memory**",
        "**Estimated time**",
        "**Config file**",
    ):
        assert field in config_md
    assert not list((example.run_dir.parent.parent / ".lorabuild" / "runs" / "example" / "incomplete").iterdir())
    studio = json.loads((example.root / "grimoire" / "studio.json").read_text())
    assert "local" in studio["machines"]


def test_the_lora_loads_in_diffusers_and_changes_the_output(example: Example, demo_model_dir: Path) -> None:
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    lora = example.run_dir / "example.safetensors"
    with safe_open(str(lora), "pt") as handle:
        keys = list(handle.keys())
        meta = handle.metadata()
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] in ("2", "2.0")
    assert meta["ss_steps"] == "40" and meta["ss_num_epochs"] == "5"

    pipe = StableDiffusionPipeline.from_pretrained(str(demo_model_dir), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)

    def render() -> torch.Tensor:
        out = pipe(
            "shapestyle, a red circle",
            num_inference_steps=3,
            height=64,
            width=64,
            output_type="pt",
            generator=torch.Generator().manual_seed(0),
        )
        return out.images

    before = render()
    pipe.load_lora_weights(str(lora))
    after = render()
    assert (before - after).abs().max() > 1e-4


def test_rerun_does_nothing_rewrites_nothing_and_never_imports_torch(example: Example) -> None:
    stamps = example.stamps()
    code = (
        "import sys\n"
        "from lorabuild.cli import cli\n"
        "try:\n"
        "    cli(['run', 'specs/example.yaml'])\n"
        "except SystemExit as exit:\n"
        "    print('EXIT', exit.code)\n"
        "print('HEAVY', sorted(m for m in ('torch', 'diffusers', 'transformers', 'fabric') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=example.root, env=lorabuild_env(), capture_output=True, text=True, timeout=60
    )
    assert "EXIT 0" in done.stdout and "HEAVY []" in done.stdout, done.stdout + done.stderr
    assert "nothing to do" in done.stdout and executed(done.stdout) == []
    assert example.stamps() == stamps
    assert all(g["state"] == "up-to-date" for g in example.status().values())


def test_changing_epochs_reruns_config_and_train_only(example: Example) -> None:
    before = example.stamps()
    example.edit_spec("  learning_rate: 5.0e-4\n", "  learning_rate: 5.0e-4\n  epochs: 6\n")
    predicted = example.status()
    assert {k: v["state"] for k, v in predicted.items()} == {
        "config": "stale",
        "environment": "up-to-date",
        "dryrun": "up-to-date",
        "train": "stale",
    }
    assert any("epochs changed: 5 → 6" in r for r in predicted["train"]["reasons"])  # type: ignore[union-attr]
    done = example.lorabuild("run", "specs/example.yaml")
    assert executed(done.stdout) == ["config", "train"], done.stdout
    after = example.stamps()
    for untouched in ("environment.md", "environment.json", "dryrun.ok", "dryrun.log"):
        assert after[untouched] == before[untouched], untouched
    for rewritten in ("config.md", "plan.json", "example.safetensors", "progress.json"):
        assert after[rewritten] != before[rewritten], rewritten
    assert json.loads((example.run_dir / "progress.json").read_text())["total_steps"] == 48

    # the earlier run's checkpoints cannot be resumed: they are set aside, not mixed with the new ones
    def names(folder: Path) -> list[str]:
        return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))

    assert names(example.run_dir / "checkpoints.earlier") == ["epoch-0002", "epoch-0003", "epoch-0004"]
    assert names(example.run_dir / "checkpoints") == ["epoch-0003", "epoch-0004", "epoch-0005"]


def test_changing_one_caption_reruns_dryrun_and_train_only(example: Example) -> None:
    before = example.stamps()
    caption = example.root / "examples" / "shapes" / "red-circle.txt"
    caption.write_text("shapestyle, a bright red circle on a cream background\n")
    predicted = example.status()
    assert {k: v["state"] for k, v in predicted.items()} == {
        "config": "up-to-date",
        "environment": "up-to-date",
        "dryrun": "stale",
        "train": "stale",
    }
    for gate in ("dryrun", "train"):
        assert any("red-circle.txt" in r for r in predicted[gate]["reasons"])  # type: ignore[union-attr]
    done = example.lorabuild("run", "specs/example.yaml")
    assert executed(done.stdout) == ["dryrun", "train"], done.stdout
    after = example.stamps()
    for untouched in ("config.md", "plan.json", "environment.md", "environment.json"):
        assert after[untouched] == before[untouched], untouched
    assert after["dryrun.ok"] != before["dryrun.ok"] and after["example.safetensors"] != before["example.safetensors"]


def test_until_stops_after_the_named_gate(tmp_path: Path, demo_model_dir: Path) -> None:
    ex = Example(tmp_path, demo_model_dir)
    done = ex.lorabuild("run", "specs/example.yaml", "--until", "environment")
    assert executed(done.stdout) == ["config", "environment"]
    states = {k: v["state"] for k, v in ex.status().items()}
    assert states == {"config": "up-to-date", "environment": "up-to-date", "dryrun": "missing", "train": "missing"}


def wait_for(predicate: Callable[[], bool], timeout: float = 120, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def trainer_pids(run_dir: Path) -> list[int]:
    """Processes whose command line is the builtin trainer of this run folder."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"lorabuild.trainer" in cmd and any(str(run_dir).encode() in part for part in cmd):
            pids.append(int(entry.name))
    return pids


@pytest.fixture
def long_example(tmp_path: Path, demo_model_dir: Path) -> Example:
    """The example with enough epochs to interrupt it mid-training, its first gates already passed."""
    ex = Example(tmp_path, demo_model_dir)
    ex.edit_spec("  learning_rate: 5.0e-4\n", "  learning_rate: 5.0e-4\n  epochs: 120\n")
    ex.lorabuild("run", "specs/example.yaml", "--until", "dryrun")
    return ex


def start_run(ex: Example) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "lorabuild", "run", "specs/example.yaml"],
        cwd=ex.root,
        env=lorabuild_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def test_kill_9_then_rerun_resumes_from_the_last_checkpoint(long_example: Example) -> None:
    ex = long_example
    before = ex.stamps() if (ex.run_dir / "example.safetensors").exists() else None
    assert before is None
    gate_files = {n: (ex.run_dir / n).stat().st_mtime_ns for n in ("config.md", "environment.json", "dryrun.ok")}
    proc = start_run(ex)
    wait_for(lambda: (ex.run_dir / "checkpoints" / "epoch-0002").is_dir(), what="the second checkpoint")

    # a second run of the same spec is refused and names the holder
    second = ex.lorabuild("run", "specs/example.yaml", code=None)
    assert second.returncode != 0
    assert f"process {proc.pid}" in second.stderr and "kill" in second.stderr

    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    # the trainer exits with its parent (it saves a resume point on the way out)
    wait_for(lambda: not trainer_pids(ex.run_dir), timeout=60, what="the orphaned trainer to stop")

    status = ex.status()
    assert status["config"]["state"] == status["environment"]["state"] == status["dryrun"]["state"] == "up-to-date"
    assert status["train"]["state"] == "missing"  # it never finished once
    reasons = " ".join(status["train"]["reasons"])  # type: ignore[arg-type]
    assert "interrupted" in reasons and "will resume from the checkpoint at step" in reasons

    done = ex.lorabuild("run", "specs/example.yaml")
    assert executed(done.stdout) == ["train"], done.stdout
    for name, mtime in gate_files.items():
        assert (ex.run_dir / name).stat().st_mtime_ns == mtime, name
    progress = json.loads((ex.run_dir / "progress.json").read_text())
    assert progress["status"] == "COMPLETE"
    assert progress["resumed_from_step"] is not None and progress["resumed_from_step"] > 0
    assert "Resuming from step" in done.stdout


def test_sigterm_stops_training_cleanly_and_the_next_run_resumes(long_example: Example) -> None:
    ex = long_example
    proc = start_run(ex)
    wait_for(lambda: (ex.run_dir / "checkpoints" / "epoch-0001").is_dir(), what="the first checkpoint")
    os.kill(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "Traceback" not in out and "Run the same command again" in out
    assert not trainer_pids(ex.run_dir)
    assert not (ex.run_dir / "example.safetensors").exists()
    progress = json.loads((ex.run_dir / "progress.json").read_text())
    assert progress["status"] == "STOPPED"
    status = ex.status()["train"]
    assert status["state"] == "missing"
    assert any("will resume from the checkpoint at step" in r for r in status["reasons"])  # type: ignore[union-attr]


def test_doit_runs_the_same_tasks_with_the_same_state(example: Example) -> None:
    shutil.copy(REPO / "dodo.py", example.root / "dodo.py")
    shutil.copy(REPO / "pyproject.toml", example.root / "pyproject.toml")
    doit = [sys.executable, "-m", "doit"]
    listed = subprocess.run(
        [*doit, "list", "--all"], cwd=example.root, env=lorabuild_env(), capture_output=True, text=True, timeout=60
    )
    assert listed.returncode == 0, listed.stderr
    for gate in ("config", "environment", "dryrun", "train"):
        assert f"example:{gate}" in listed.stdout
    done = subprocess.run(
        [*doit, "example"], cwd=example.root, env=lorabuild_env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # lorabuild ran everything already: doit agrees it is all up to date
    assert "-- example:train" in done.stdout and ".  example:" not in done.stdout, done.stdout
