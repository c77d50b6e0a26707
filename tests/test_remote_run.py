"""`compute: ssh` end to end: the builtin trainer on the example data, over a real OpenSSH server.

The "remote" machine is this one, reached through the test sshd on 127.0.0.1; everything the
pipeline does there goes through SSH (deploy, Gate 3, dry run, the detached training job, the
fetch), into a remote folder of its own.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from tests.conftest import Project
from tests.sshd import SshServer, kill_pid


def remote_compute(sshd: SshServer, remote: Path) -> dict[str, Any]:
    return {
        "target": "ssh",
        "host": sshd.host,
        "port": sshd.port,
        "user": sshd.user,
        "identity_file": str(sshd.key),
        "remote_dir": str(remote),
    }


def write_remote_spec(project: Project, sshd: SshServer, remote: Path, **sections: Any) -> Path:
    return project.write_spec(
        backend={"name": "builtin", "python": sys.executable},
        compute=remote_compute(sshd, remote),
        **sections,
    )


def test_an_ssh_target_trains_there_and_brings_the_lora_home(
    project: Project, sshd_server: SshServer, tmp_path: Path
) -> None:
    remote = tmp_path / "remote"
    spec = write_remote_spec(project, sshd_server, remote, samples={"prompts": ["a red square"], "steps": 4})
    done = project.lorabuild("run", spec.name, "--yes", timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    run = project.run_dir()
    # the sample pictures rendered there came home with the LoRA
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["epoch-0001-1.png", "epoch-0002-1.png"]
    assert "2 sample picture(s) fetched from 127.0.0.1" in out
    lora = load_file(str(run / "t.safetensors"))
    assert lora and all(name.startswith("lora_unet_") for name in lora)
    # it trained over there: the inputs, the job and the checkpoints are in the remote folder
    assert (remote / "datasets" / "t").is_dir() and (remote / "src" / "lorabuild" / "cli.py").is_file()
    assert list((remote / "training" / "t" / "checkpoints").rglob("*.safetensors"))
    assert "Deploy — sending the inputs to 127.0.0.1" in out and "Fetching the results passed" in out
    # the local run folder has what the monitor made of the streamed log, and the checkpoints
    progress = json.loads((run / "progress.json").read_text())
    assert progress["status"] == "COMPLETE" and progress["step"] == progress["total_steps"]
    assert list((run / "checkpoints").rglob("*.safetensors"))
    assert (run / "environment.md").read_text().count("127.0.0.1") >= 1
    # the machine's host key was pinned in the grimoire, for the next run to check against
    assert (
        f"[{sshd_server.host}]:{sshd_server.port} ssh-ed25519 "
        in (project.grimoire / ".lorabuild" / "known_hosts").read_text()
    )
    status = json.loads(project.lorabuild("status", spec.name, "--json", check=True).stdout)
    assert [(g["name"], g["state"]) for g in status["gates"]] == [
        ("config", "up-to-date"),
        ("environment", "up-to-date"),
        ("dryrun", "up-to-date"),
        ("train", "up-to-date"),
        ("pull", "up-to-date"),
    ]
    again = project.lorabuild("run", spec.name, "--yes", check=True)
    assert "nothing to do" in again.stdout + again.stderr
    # that run left a record, and the next answers from it, naming the fetch too, without connecting
    assert list((project.grimoire / ".lorabuild" / "uptodate").glob("*.json"))
    third = project.lorabuild("run", spec.name, "--yes", check=True)
    assert third.stdout == again.stdout and "Fetching the results — up to date" in third.stdout


def test_a_failed_fetch_fetches_again_without_training_again(
    project: Project, sshd_server: SshServer, tmp_path: Path
) -> None:
    remote = tmp_path / "remote"
    spec = write_remote_spec(project, sshd_server, remote, training={"epochs": 1})
    assert project.lorabuild("run", spec.name, "--yes", "--until", "train", timeout=600).returncode == 0
    run = project.run_dir()
    assert not (run / "t.safetensors").exists()
    sshd_server.stop()  # the machine cannot be reached: the fetch fails, plainly
    try:
        failed = project.lorabuild("run", spec.name, "--yes", env={"LORABUILD_SSH_ATTEMPTS": "1"})
    finally:
        sshd_server.start()
    assert failed.returncode == 1
    assert "could not fetch the results" in failed.stdout + failed.stderr
    assert "Traceback" not in failed.stdout + failed.stderr
    log_before = (run / "train.log").read_text()
    done = project.lorabuild("run", spec.name, "--yes", check=True)
    out = done.stdout + done.stderr
    assert "Training — up to date" in out and "Fetching the results passed" in out
    assert (run / "t.safetensors").is_file()
    assert (run / "train.log").read_text() == log_before


def test_ssh_dropped_mid_training_reattaches_and_training_continues(
    project: Project, sshd_server: SshServer, tmp_path: Path
) -> None:
    """The training is a detached job there: killing lorabuild and every SSH connection leaves it
    running, and the next run re-attaches to it instead of starting another."""
    remote = tmp_path / "remote"
    spec = write_remote_spec(project, sshd_server, remote, training={"epochs": 3})
    assert project.lorabuild("run", spec.name, "--yes", "--until", "dryrun", timeout=600).returncode == 0
    proc = project.popen("run", spec.name, "--yes")
    run = project.run_dir()
    job_record = project.grimoire / ".lorabuild" / "runs" / "t" / "remote-job.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if job_record.exists() and '"step"' in (run / "train.log").read_text(errors="replace"):
            break
        time.sleep(0.2)
    else:
        proc.kill()
        raise AssertionError("training never started")
    job_dir = Path(json.loads(job_record.read_text())["job_dir"])
    proc.kill()  # kill -9: lorabuild is gone mid-training
    proc.wait()
    sshd_server.stop()  # and every SSH connection with it
    sshd_server.start()
    assert not (job_dir / "exit").exists(), "the training job stopped with lorabuild"
    done = project.lorabuild("run", spec.name, "--yes", timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "Re-attaching to the training still running" in out or "Training finished" in out
    jobs = sorted(p.name for p in (remote / "jobs").iterdir() if "-train-" in p.name)
    assert len(jobs) == 1, jobs  # one training job in all: re-attached, not started again
    assert (job_dir / "exit").read_text().strip() == "0"
    assert (run / "t.safetensors").is_file()


def test_a_dropped_connection_is_reopened_and_the_training_log_keeps_flowing(
    project: Project, sshd_server: SshServer, tmp_path: Path
) -> None:
    remote = tmp_path / "remote"
    spec = write_remote_spec(project, sshd_server, remote, training={"epochs": 40})
    assert project.lorabuild("run", spec.name, "--yes", "--until", "dryrun", timeout=600).returncode == 0
    proc = project.popen("run", spec.name, "--yes")
    run = project.run_dir()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and '"step"' not in _read(run / "train.log"):
        time.sleep(0.2)
    assert '"event": "done"' not in _read(run / "train.log"), "training ended before the drop"
    sessions = sshd_server.session_pids()
    assert sessions, "lorabuild holds no SSH connection while training"
    for pid in sessions:
        kill_pid(pid)  # the network drops: every connection lorabuild had is cut
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert "Re-attaching" not in out  # the same lorabuild reconnected; nothing was restarted
    progress = json.loads((run / "progress.json").read_text())
    assert progress["status"] == "COMPLETE" and progress["step"] == progress["total_steps"]
    steps = [json.loads(line)["step"] for line in _read(run / "train.log").splitlines() if '"event": "step"' in line]
    assert steps == sorted(set(steps)), "log lines were lost or repeated across the drop"
    assert (run / "t.safetensors").is_file()


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
