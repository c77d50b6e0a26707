"""Cloud runs end to end: the fake provider server (tests/fakecloud.py, every request checked
against the published OpenAPI files) rents "instances" that are the test's real OpenSSH server,
and `lorabuild run` goes spinup → remote validate → deploy → dry run → train → pull → teardown.

Fault injection: provider 5xx and timeouts on create and on terminate, Ctrl-C and kill -9 of
lorabuild at each cloud step. After each, once the next command reconciles, no instance is left
running at the fake provider and the ledger agrees with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import fakecloud
from tests.conftest import Project
from tests.sshd import SshServer

fake_cloud_factory = fakecloud.fake_cloud_factory

FAST = {
    "LORABUILD_CLOUD_POLL_S": "0.1",
    "LORABUILD_CREATE_SETTLE_S": "0",
    "LORABUILD_SELF_DELETE_WAIT": "0.2",
    "LORABUILD_SSH_ATTEMPTS": "3",
}


@dataclass
class CloudProject:
    project: Project
    fake: fakecloud.FakeCloud
    provider: str
    spec: Path
    remote: Path

    def run(self, *args: str, env: dict[str, str] | None = None, timeout: float = 600) -> Any:
        return self.project.lorabuild(*args, env={**FAST, **(env or {})}, timeout=timeout)

    def popen(self, *args: str, env: dict[str, str] | None = None) -> Any:
        import subprocess

        from tests.conftest import lorabuild_env

        return subprocess.Popen(
            [sys.executable, "-m", "lorabuild", *args],
            cwd=self.project.root,
            env={**lorabuild_env(), **FAST, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    def assert_nothing_left(self) -> None:
        """No instance billing at the fake, and the ledger agrees (every entry TERMINATED)."""
        assert self.fake.live() == [], [(i.id, i.label) for i in self.fake.live()]
        from lorabuild.cloud import ledger

        live = ledger.active(self.project.grimoire)
        assert live == [], [e.describe() for e in live]
        for entry in ledger.load_entries(self.project.grimoire):
            if entry.id is not None:
                assert self.fake.instance(entry.provider, entry.id).deleted


def kill_remote_jobs(folder: Path) -> None:
    """Stop what lorabuild left sleeping on the "instance" (self-delete timers): on a real cloud
    it goes with the instance; here the instance is this machine."""
    for pgid_file in folder.rglob("pgid"):
        with contextlib.suppress(OSError, ValueError):
            os.killpg(int(pgid_file.read_text().strip()), signal.SIGKILL)


@pytest.fixture(params=["runpod", "vastai"])
def provider(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def make_cloud_project(
    project: Project,
    sshd: SshServer,
    factory: Callable[..., fakecloud.FakeCloud],
    provider: str,
    remote: Path,
    **compute: Any,
) -> CloudProject:
    fake = factory(
        ssh=fakecloud.SshTarget(
            host=sshd.host, port=sshd.port, user=sshd.user, authorized_keys=sshd.folder / "authorized_keys"
        )
    )
    spec = project.write_spec(
        backend={"name": "builtin", "python": sys.executable},
        compute={
            "target": provider,
            "gpu": "RTX 4090",
            "max_price_per_hour": 2.0,
            "remote_dir": str(remote),
            "max_hours": 1,
            **compute,
        },
    )
    return CloudProject(project, fake, provider, spec, remote)


@pytest.fixture
def cloud(
    project: Project,
    sshd_server: SshServer,
    fake_cloud_factory: Callable[..., fakecloud.FakeCloud],
    provider: str,
    tmp_path: Path,
) -> Iterator[CloudProject]:
    remote = tmp_path / "instance"
    made = make_cloud_project(project, sshd_server, fake_cloud_factory, provider, remote)
    try:
        yield made
    finally:
        kill_remote_jobs(remote)


def test_a_cloud_run_rents_trains_fetches_and_deletes(cloud: CloudProject) -> None:
    done = cloud.run("run", cloud.spec.name, "--yes")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    # the price and the estimate came before anything was rented
    assert out.index("per hour") < out.index("Rented")
    assert "Estimated cost: about $" in out and "deletes itself after 1 hour " in out
    for step in ("spin-up on", "Deploy — sending the inputs", "Dry run passed", "Fetching the results passed"):
        assert step in out, step
    assert "Cloud instance deleted" in out
    run = cloud.project.run_dir()
    assert (run / "t.safetensors").is_file()
    cloud.assert_nothing_left()
    (instance,) = cloud.fake.instances[cloud.provider].values()
    assert instance.deleted_with == "account"  # lorabuild deleted it, and the provider confirmed
    # its host key was pinned in a file of its own (a later instance may reuse the address)
    pinned = cloud.project.grimoire / ".lorabuild" / "cloud" / "known_hosts" / f"{cloud.provider}-{instance.id}"
    assert "ssh-ed25519 " in pinned.read_text()
    # the instance armed its own deadline over SSH (besides the boot timer in its onstart)
    assert list((cloud.remote / "lorabuild-self-delete").glob("deadline-*/pgid"))
    studio_md = (cloud.project.grimoire / "studio.md").read_text()
    assert instance.id in studio_md and "terminated" in studio_md.lower()
    # a second run has nothing to do and rents nothing
    again = cloud.run("run", cloud.spec.name, "--yes")
    assert again.returncode == 0 and "nothing to do" in again.stdout + again.stderr
    assert len(cloud.fake.instances[cloud.provider]) == 1
    # a cloud run's up-to-date answer always goes the full way (which makes sure nothing stays rented)
    assert not list((cloud.project.grimoire / ".lorabuild" / "uptodate").glob("*"))
    # no API key is written anywhere: the planted account key and the instance's own key are in
    # no file lorabuild wrote (here or on the instance) and in none of its output
    listing = cloud.run("cloud", "ls", "--json", "--root", "grimoire")
    assert json.loads(listing.stdout)["running"] == 0
    secrets = [cloud.fake.keys[cloud.provider], instance.scoped_key]
    texts = [out, again.stdout + again.stderr, listing.stdout + listing.stderr]
    files = [p for folder in (cloud.project.grimoire, cloud.remote) for p in folder.rglob("*") if p.is_file()]
    assert len(files) > 20
    for secret in secrets:
        assert len(secret) >= 16
        assert not [text for text in texts if secret in text]
        assert not [path for path in files if secret.encode() in path.read_bytes()]


def test_without_yes_and_nobody_to_ask_nothing_is_rented(cloud: CloudProject) -> None:
    done = cloud.run("run", cloud.spec.name)
    out = done.stdout + done.stderr
    assert done.returncode == 1
    assert "Estimated cost" in out and "run again with --yes" in out
    assert cloud.fake.count("createPod") + cloud.fake.count("createInstance") == 0
    assert "Traceback" not in out


def test_a_missing_api_key_is_explained(cloud: CloudProject) -> None:
    env_name = "RUNPOD_API_KEY" if cloud.provider == "runpod" else "VAST_API_KEY"
    done = cloud.run("run", cloud.spec.name, "--yes", env={env_name: "", "HOME": str(cloud.project.root)})
    out = done.stdout + done.stderr
    assert done.returncode == 1
    assert "API key" in out and env_name in out and "Traceback" not in out


def test_a_trained_lora_not_yet_fetched_keeps_the_instance_until_it_deletes_itself(cloud: CloudProject) -> None:
    """The lost laptop: training ended there, nobody fetched; the instance deletes itself with
    its own instance-scoped key once the grace time has passed."""
    done = cloud.run("run", cloud.spec.name, "--yes", "--until", "train", env={"LORABUILD_PULL_GRACE_S": "1"})
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "kept" in out and "still on it" in out
    (instance,) = cloud.fake.instances[cloud.provider].values()
    deadline = time.monotonic() + 60
    while not instance.deleted and time.monotonic() < deadline:
        time.sleep(0.2)
    assert instance.deleted_with == "instance"
    listing = cloud.run("cloud", "ls", "--json", "--root", "grimoire")
    assert json.loads(listing.stdout)["running"] == 0
    cloud.assert_nothing_left()
    # the next run cannot fetch from an instance that is gone: it says so, and trains next time
    again = cloud.run("run", cloud.spec.name, "--yes")
    out = again.stdout + again.stderr
    assert again.returncode == 1 and "the trained LoRA is no longer on" in out and "trains it again" in out
    status = json.loads(cloud.run("status", cloud.spec.name, "--json").stdout)
    assert {g["name"]: g["state"] for g in status["gates"]}["train"] != "up-to-date"
    cloud.assert_nothing_left()


# --- provider faults ------------------------------------------------------------------------------

CREATE = {"runpod": "createPod", "vastai": "createInstance"}
DELETE = {"runpod": "deletePod", "vastai": "destroyInstance"}


@pytest.mark.parametrize("fault", ["5xx", "timeout", "lost answer"])
def test_faults_on_create_never_leak_an_instance(cloud: CloudProject, fault: str) -> None:
    op = CREATE[cloud.provider]
    if fault == "5xx":
        cloud.fake.fail(op, 503)
    elif fault == "timeout":
        cloud.fake.delay(op, 3.0)  # longer than the client's 2 s timeout; the fake creates it afterwards
    else:
        cloud.fake.lose_response(op)  # created, but the answer with its id never arrives
    done = cloud.run("run", cloud.spec.name, "--yes", "--until", "environment")
    out = done.stdout + done.stderr
    assert "Traceback" not in out
    if fault == "lost answer":
        # found by its label, used, deleted
        assert done.returncode == 0, out
        assert "Cloud instance deleted" in out
    else:
        assert done.returncode == 1 and "did not rent the GPU" in out
    if fault == "timeout":
        # the provider made it after lorabuild gave up: the next command finds it by its label
        deadline = time.monotonic() + 30
        while not cloud.fake.live() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert cloud.fake.live()
        down = cloud.run("cloud", "down", "--all", "--root", "grimoire")
        assert down.returncode == 0, down.stdout + down.stderr
    cloud.assert_nothing_left()


@pytest.mark.parametrize("times", [2, 50])
def test_faults_on_terminate_are_retried_or_left_to_cloud_down(cloud: CloudProject, times: int) -> None:
    cloud.fake.fail(DELETE[cloud.provider], 503, times=times)
    done = cloud.run("run", cloud.spec.name, "--yes", "--until", "environment")
    out = done.stdout + done.stderr
    assert "Traceback" not in out
    if times == 2:
        assert done.returncode == 0 and "Cloud instance deleted" in out
    else:
        assert "could not be deleted yet" in out and "cloud down --all" in out
        assert len(cloud.fake.live()) == 1
        cloud.fake._faults.clear()
        down = cloud.run("cloud", "down", "--all", "--root", "grimoire")
        assert down.returncode == 0, down.stdout + down.stderr
    cloud.assert_nothing_left()


# --- Ctrl-C and kill -9 at each cloud step --------------------------------------------------------

STEPS = {
    # the moment: a hook on a provider call, or a line lorabuild prints
    "create": ("op", "create"),
    "provisioning": ("op", "get"),
    "deploy": ("line", "Deploy — sending"),
    "environment": ("line", "Gate 3"),
    "dryrun": ("line", "Gate 4"),
    "train": ("line", "Training"),
    "mid-training": ("line", "Epoch 1/"),
    "pull": ("line", "Fetching the results"),
    "teardown": ("line", "Deleting the"),
}
GET = {"runpod": "getPod", "vastai": "showInstance"}


def _signal_at(cloud: CloudProject, step: str, sig: int, proc: Any) -> tuple[str, threading.Event]:
    """Send `sig` to lorabuild at `step`; its output, and an event set once the signal went."""
    kind, what = STEPS[step]
    sent = threading.Event()

    def send(*_: Any) -> None:
        if not sent.is_set():
            sent.set()
            os.kill(proc.pid, sig)
            if sig == signal.SIGKILL:
                time.sleep(0.3)  # the process is gone before the fake answers

    if kind == "op":
        op = CREATE[cloud.provider] if what == "create" else GET[cloud.provider]
        cloud.fake.on(op, send)
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if kind == "line" and what in line:
            send()
    proc.wait()
    return "".join(lines), sent


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
@pytest.mark.parametrize("step", [s for s in STEPS if s != "mid-training"])
@pytest.mark.parametrize("provider", ["runpod"])
def test_stopping_lorabuild_at_any_cloud_step_leaves_nothing_running(cloud: CloudProject, step: str, sig: int) -> None:
    proc = cloud.popen("run", cloud.spec.name, "--yes")
    out, sent = _signal_at(cloud, step, sig, proc)
    assert sent.is_set(), f"lorabuild never reached {step}:\n{out}"
    assert "Traceback" not in out
    if sig == signal.SIGINT:
        assert proc.returncode == 130, out
        if step == "pull":
            # the trained LoRA is still there: kept (with its timers) for the next run to fetch
            assert "kept" in out and "still on it" in out
        elif step not in ("create", "provisioning"):
            # Ctrl-C is a normal stop: lorabuild itself deleted the instance on the way out
            assert cloud.fake.live() == [], out
    if step == "create":
        # the provider finishes the create after lorabuild stopped; the next command comes after
        # that (lorabuild gives such a create LORABUILD_CREATE_SETTLE_S to appear; FAST sets 0 s)
        deadline = time.monotonic() + 10
        while not cloud.fake.instances[cloud.provider] and time.monotonic() < deadline:
            time.sleep(0.05)
    # the next command reconciles; `cloud down --all` deletes whatever is still up
    down = cloud.run("cloud", "down", "--all", "--root", "grimoire")
    assert down.returncode == 0, down.stdout + down.stderr
    cloud.assert_nothing_left()


@pytest.mark.parametrize("provider", ["runpod"])
def test_after_kill_9_mid_training_the_next_run_reuses_the_instance_and_reattaches(
    cloud: CloudProject,
) -> None:
    cloud.project.write_spec(
        backend={"name": "builtin", "python": sys.executable},
        compute=json.loads(json.dumps(_compute(cloud))),
        training={"epochs": 30},
    )
    proc = cloud.popen("run", cloud.spec.name, "--yes")
    out, sent = _signal_at(cloud, "mid-training", signal.SIGKILL, proc)
    assert sent.is_set(), out
    assert len(cloud.fake.live()) == 1  # killed: nobody deleted it (its timers would)
    warned = cloud.run("status", cloud.spec.name)
    assert "may still be running and costing money" in warned.stderr
    done = cloud.run("run", cloud.spec.name, "--yes")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "Using the instance still up from the last run" in out
    assert "Re-attaching to the training still running" in out or "finished while lorabuild was away" in out
    assert len(cloud.fake.instances[cloud.provider]) == 1  # no second instance was rented
    jobs = [p for p in (cloud.remote / "jobs").iterdir() if "-train-" in p.name and "self-delete" not in p.name]
    assert len(jobs) == 1
    assert (cloud.project.run_dir() / "t.safetensors").is_file()
    cloud.assert_nothing_left()


def _compute(cloud: CloudProject) -> dict[str, Any]:
    import yaml

    return dict(yaml.safe_load(cloud.spec.read_text())["compute"])
