"""The cloud instance ledger against the fake provider server: write-ahead, teardown, reconcile, down.

The ledger must never forget an instance: its entry is written before the create call (the fake
reads studio.json while it handles the call), TERMINATED is written only on the provider's word,
teardown retries through 5xx and timeouts and confirms, reconcile finds instances whose id was
lost, notices ones deleted in the provider's console and adopts labelled strangers, and
`down --all` leaves nothing running. A lorabuild killed with SIGKILL in the middle of a create
is recovered by the next process. No API key ever reaches a file under grimoire/.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lorabuild import cloud
from lorabuild.cloud import GpuNeed, LaunchRequest, ProviderError, ledger
from lorabuild.studio import load_studio, read_machine, record_machine, render_studio_md, save_studio, studio_lock
from tests import fakecloud
from tests.conftest import lorabuild_env
from tests.fakecloud import FakeCloud, FakeRequest

fake_cloud = fakecloud.fake_cloud  # the fixtures (see tests/fakecloud.py)
fake_cloud_factory = fakecloud.fake_cloud_factory

BOTH = ("runpod", "vastai")


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    for var in ("RUNPOD_API_KEY", "VAST_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("LORABUILD_CREATE_SETTLE_S", "0")
    yield


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "grimoire"


def launch(root: Path, provider: str, run: str = "mychar", **kw: Any) -> ledger.Entry:
    offer = cloud.search_offers(provider, GpuNeed(min_vram_gb=20))[0]
    _, public_key = ledger.ssh_keypair(root)
    request = LaunchRequest(
        label=ledger.new_label(root, run), image="img:1", disk_gb=40, ssh_public_key=public_key, env={}, onstart=""
    )
    return ledger.launch(root, offer, request, run=run, deadline=kw.get("deadline"))


def entry(root: Path, ref: str) -> ledger.Entry:
    found = ledger.find(root, ref)
    assert found is not None
    return found


# --- write-ahead and states ----------------------------------------------------------------------------


@pytest.mark.parametrize("provider", BOTH)
def test_the_intent_is_on_disk_before_the_create_call(fake_cloud: FakeCloud, root: Path, provider: str) -> None:
    seen: list[dict[str, Any]] = []

    def read_ledger(req: FakeRequest) -> None:
        label = req.body["name"] if provider == "runpod" else req.body["label"]
        studio = json.loads((root / "studio.json").read_text())
        seen.extend(i for i in studio["instances"] if i["label"] == label)
        assert label in (root / "studio.md").read_text()

    fake_cloud.on("createPod" if provider == "runpod" else "createInstance", read_ledger)
    made = launch(root, provider)
    assert len(seen) == 1 and seen[0]["state"] == "CREATING" and seen[0]["id"] is None
    assert seen[0]["entry"] == made.entry and seen[0]["pid"] == os.getpid()
    assert made.id is not None and made.state == "PROVISIONING"
    assert [i.id for i in fake_cloud.live(provider)] == [made.id]
    assert made.label.startswith(ledger.label_prefix(root)) and "-mychar-" in made.label
    md = (root / "studio.md").read_text()
    assert made.id in md and "PROVISIONING" in md and made.label in md


def test_states_and_cost_so_far(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1_800_000_000.0]
    monkeypatch.setattr(ledger, "_now", lambda: clock[0])
    ref = ledger.record_intent(
        root, provider="runpod", label="lorabuild-x-1", run="r", gpu="RTX 4090", price_per_hour=0.36, deadline=None
    )
    clock[0] += 300  # creating costs nothing: nothing is rented yet
    assert entry(root, ref).cost_so_far(clock[0]) == 0
    ledger.record_created(root, ref, "pod1")
    clock[0] += 600
    ledger.record_state(root, ref, "running", price_per_hour=0.36)
    clock[0] += 3000
    assert entry(root, ref).cost_so_far(clock[0]) == pytest.approx(0.36)  # 3600 s billable
    ledger.record_state(root, ref, "STOPPED")
    clock[0] += 7200  # stopped: compute no longer billed
    stopped = entry(root, ref)
    assert stopped.cost_so_far(clock[0]) == pytest.approx(0.36) and stopped.state == "STOPPED"
    assert [h["state"] for h in stopped.history] == ["CREATING", "PROVISIONING", "RUNNING", "STOPPED"]
    with pytest.raises(ValueError, match="provider confirmed"):
        ledger.record_state(root, ref, "terminated")
    with pytest.raises(ValueError, match="unknown instance state"):
        ledger.record_state(root, ref, "paused")
    studio = load_studio(root)
    assert studio["instances"][0]["cost_so_far"] == pytest.approx(0.36)
    assert "cost so far $0.36" in render_studio_md(studio)


def test_mark_terminated_needs_the_providers_word(fake_cloud: FakeCloud, root: Path) -> None:
    made = launch(root, "runpod")
    assert not ledger.mark_terminated(root, made)
    assert entry(root, made.entry).active
    assert made.id is not None
    cloud.terminate("runpod", made.id)
    assert ledger.mark_terminated(root, made)
    assert entry(root, made.entry).state == "TERMINATED"
    assert ledger.active(root) == []


# --- teardown --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", BOTH)
def test_teardown_deletes_confirms_and_is_idempotent(fake_cloud: FakeCloud, root: Path, provider: str) -> None:
    made = launch(root, provider)
    assert made.id is not None
    assert ledger.teardown(root, made, backoff=0)
    assert fake_cloud.live() == [] and fake_cloud.terminate_calls(provider, made.id) == 1
    done = entry(root, made.entry)
    assert done.state == "TERMINATED" and [h["state"] for h in done.history][-2:] == ["TERMINATING", "TERMINATED"]
    calls = len(fake_cloud.calls)
    assert ledger.teardown(root, made, backoff=0)  # again: nothing to do, nothing asked
    assert len(fake_cloud.calls) == calls
    assert "TERMINATED" in (root / "studio.md").read_text()


@pytest.mark.parametrize("provider", BOTH)
def test_teardown_retries_through_5xx_and_timeouts(
    fake_cloud_factory: Callable[..., FakeCloud], root: Path, provider: str
) -> None:
    fake = fake_cloud_factory(client_timeout=0.4)
    delete, show = ("deletePod", "getPod") if provider == "runpod" else ("destroyInstance", "showInstance")
    made = launch(root, provider)
    fake.fail(delete, status=503, times=2)
    fake.fail(delete, status=429)
    fake.fail(show, status=500, times=4)  # the confirmation is retried too
    assert ledger.teardown(root, made, backoff=0.01)
    assert fake.count(delete) == 4 and fake.live() == []
    # a delete that times out: the provider still deletes it; the retry finds it gone (404)
    second = launch(root, provider, run="second")
    assert second.id is not None
    fake.delay(delete, seconds=0.8)
    assert ledger.teardown(root, second, backoff=0.5)
    assert fake.terminate_calls(provider, second.id) == 2 and fake.live() == []
    assert not ledger.active(root)


def test_teardown_that_keeps_failing_says_why_and_succeeds_later(fake_cloud: FakeCloud, root: Path) -> None:
    made = launch(root, "vastai")
    fake_cloud.fail("destroyInstance", status=502, times=3)
    assert not ledger.teardown(root, made, attempts=3, backoff=0.01)
    stuck = entry(root, made.entry)
    assert stuck.active and "on its side" in (stuck.problem or "")
    warning = ledger.running_warning(root)
    assert warning is not None and "cloud down --all" in warning
    assert ledger.teardown(root, made, backoff=0.01)
    assert entry(root, made.entry).problem is None and fake_cloud.live() == []


def test_teardown_refused_key_is_not_retried(
    fake_cloud: FakeCloud, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = launch(root, "runpod")
    monkeypatch.setenv("RUNPOD_API_KEY", "rp_revoked_" + "0" * 20)
    assert not ledger.teardown(root, made, attempts=5, backoff=0.01)
    assert fake_cloud.count("deletePod") == 1
    assert "RUNPOD_API_KEY" in (entry(root, made.entry).problem or "")
    monkeypatch.setenv("RUNPOD_API_KEY", fake_cloud.keys["runpod"])
    assert ledger.teardown(root, made, backoff=0.01)


# --- reconcile --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", BOTH)
def test_a_lost_create_answer_is_recovered_by_label(fake_cloud: FakeCloud, root: Path, provider: str) -> None:
    fake_cloud.lose_response("createPod" if provider == "runpod" else "createInstance")
    made = launch(root, provider)  # the answer never came; the label found the instance
    assert made.id is not None and [i.id for i in fake_cloud.live(provider)] == [made.id]

    # killed between create and recording the id: the next reconcile finds it
    ref = ledger.record_intent(
        root, provider=provider, label=ledger.new_label(root, "r"), run="r", gpu="x", price_per_hour=1, deadline=None
    )
    offer = cloud.search_offers(provider, GpuNeed(min_vram_gb=20))[0]
    lost = cloud.create(provider, offer, LaunchRequest(entry(root, ref).label, "img", 40, "ssh-ed25519 AAAA k"))
    report = ledger.reconcile(root)
    assert report.found_by_label == [ref] and entry(root, ref).id == lost
    assert report.adopted == [] and sorted(report.updated) == [made.entry]


def test_a_create_answered_too_late_stays_creating_until_found(
    fake_cloud_factory: Callable[..., FakeCloud], root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORABUILD_CREATE_SETTLE_S", "30")
    fake = fake_cloud_factory(client_timeout=0.3)
    fake.delay("createPod", seconds=1.0)  # handled after lorabuild gave up
    with pytest.raises(ProviderError, match="did not answer"):
        launch(root, "runpod")
    [waiting] = ledger.active(root)
    assert waiting.state == "CREATING" and "did not answer" in (waiting.problem or "")
    assert ledger.reconcile(root).still_creating == [waiting.entry]  # too early to say it was never made
    for _ in range(40):
        if fake.live():
            break
        time.sleep(0.05)
    report = ledger.reconcile(root)
    assert report.found_by_label == [waiting.entry]
    assert ledger.down(root, "--all", backoff=0.01).ok and fake.live() == []


def test_a_refused_create_leaves_nothing_behind(fake_cloud: FakeCloud, root: Path) -> None:
    fake_cloud.runpod_no_capacity.add("NVIDIA GeForce RTX 3090")
    fake_cloud.runpod_no_capacity.add("NVIDIA GeForce RTX 4090")
    offer = cloud.Offer("runpod", "NVIDIA GeForce RTX 4090", "RTX 4090", 1, 24, 0.69, raw={"cloud": "SECURE"})
    request = LaunchRequest(ledger.new_label(root, "r"), "img", 40, "ssh-ed25519 AAAA k")
    with pytest.raises(ProviderError, match="no longer any instances"):
        ledger.launch(root, offer, request, run="r", deadline=None)
    [refused] = ledger.load_entries(root)
    assert refused.state == "TERMINATED" and "never created" in (refused.note or "")
    assert ledger.running_warning(root) is None


def test_reconcile_sees_console_deletions_and_adopts_strangers(fake_cloud: FakeCloud, root: Path) -> None:
    deleted = launch(root, "runpod", run="a")
    kept = launch(root, "vastai", run="b")
    assert deleted.id is not None and kept.id is not None
    fake_cloud.delete_in_console("runpod", deleted.id)
    stranger = fake_cloud.add_instance("vastai", ledger.new_label(root, "lost-ledger"))
    foreign = fake_cloud.add_instance("runpod", "lorabuild-ffffffff-other-abc123")
    fake_cloud.add_instance("runpod", "someones-notebook")
    report = ledger.reconcile(root)
    assert report.terminated == [deleted.entry]
    assert entry(root, deleted.entry).state == "TERMINATED" and "no longer has it" in (
        entry(root, deleted.entry).note or ""
    )
    assert report.updated == [kept.entry]
    [adopted] = report.adopted
    assert entry(root, adopted).id == stranger and entry(root, adopted).state == "RUNNING"
    assert entry(root, adopted).price_per_hour > 0
    assert report.foreign == [f"RunPod {foreign} (lorabuild-ffffffff-other-abc123)"]
    assert any("another project folder" in line for line in report.describe())
    again = ledger.reconcile(root)
    assert again.adopted == [] and again.terminated == []
    # the ledger and the provider agree on what is live (foreign and unlabelled ones are not ours)
    assert {e.id for e in ledger.active(root)} == {kept.id, stranger}


def test_an_interrupted_create_that_made_nothing_is_closed(root: Path, fake_cloud: FakeCloud) -> None:
    ref = ledger.record_intent(
        root, provider="vastai", label=ledger.new_label(root, "r"), run="r", gpu="x", price_per_hour=1, deadline=None
    )
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        # a live process is still creating: give it time
        studio = load_studio(root)
        studio["instances"][0]["pid"] = sleeper.pid
        save_studio(root, studio)
        assert ledger.reconcile(root).still_creating == [ref]
    finally:
        sleeper.kill()
        sleeper.wait()
    report = ledger.reconcile(root)  # its process is gone and the provider has no such label
    assert report.never_created == [ref] and not ledger.active(root)


def test_an_instance_past_its_deadline_is_deleted(fake_cloud: FakeCloud, root: Path) -> None:
    overdue = launch(root, "runpod", deadline=time.time() - 3600)
    fine = launch(root, "runpod", run="later", deadline=time.time() + 3600)
    report = ledger.reconcile(root)
    assert report.overdue == [overdue.entry]
    assert [i.id for i in fake_cloud.live()] == [fine.id]


# --- the CLI's functions --------------------------------------------------------------------------------------


def test_down_all_leaves_nothing_running(fake_cloud: FakeCloud, root: Path) -> None:
    made = [launch(root, "runpod", run="a"), launch(root, "runpod", run="b"), launch(root, "vastai", run="c")]
    fake_cloud.add_instance("runpod", ledger.new_label(root, "orphan"))  # the ledger lost this one
    warning = ledger.running_warning(root)
    assert warning is not None and warning.startswith("3 cloud instances may still be running")
    listing = ledger.list_for_cli(root)
    assert listing["running"] == 4 and len(listing["instances"]) == 4
    assert any("did not list" in n for n in listing["notes"])
    json.dumps(listing)  # `cloud ls --json`
    text = ledger.format_listing(listing)
    assert all(m.entry in text for m in made) and "cloud down --all" in text

    one = ledger.down(root, str(made[0].id), backoff=0.01)  # by the provider's id
    assert one.ok and list(one.results) == [made[0].entry]
    assert len(fake_cloud.live()) == 3
    report = ledger.down(root, "--all", backoff=0.01)
    assert report.ok and len(report.results) == 3, report.describe()
    assert fake_cloud.live() == [] and ledger.active(root) == []
    assert ledger.running_warning(root) is None
    assert ledger.down(root, "--all").describe() == ["No cloud instance is running for this folder."]
    missing = ledger.down(root, "nosuch")
    assert not missing.ok and "no instance 'nosuch'" in missing.describe()[0]


def test_running_warning_never_touches_the_network(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert ledger.running_warning(root) is None
    ref = ledger.record_intent(
        root, provider="runpod", label="lorabuild-x-1", run="r", gpu="RTX 4090", price_per_hour=0.5, deadline=None
    )
    ledger.record_created(root, ref, "podx")

    def no_network(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("running_warning asked a provider")

    for name in ("get", "list_by_label", "terminate", "search_offers"):
        monkeypatch.setattr(cloud, name, no_network)
    warning = ledger.running_warning(root)
    assert warning is not None and "RunPod podx (RTX 4090, provisioning, $0.00 so far)" in warning


def test_no_api_key_in_any_file_under_the_grimoire(
    fake_cloud_factory: Callable[..., FakeCloud], root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake = fake_cloud_factory(client_timeout=0.3)
    planted = list(fake.keys.values())
    handler = logging.FileHandler(root.parent / "cloud.log")
    logging.getLogger("lorabuild").addHandler(handler)
    caplog.set_level(logging.DEBUG)
    try:
        for provider in BOTH:
            made = launch(root, provider)
            delete = "deletePod" if provider == "runpod" else "destroyInstance"
            fake.fail(delete, status=503, times=2)
            fake.delay(delete, seconds=0.5)
            assert ledger.teardown(root, made, backoff=0.01)
            fake.fail("createPod" if provider == "runpod" else "createInstance", status=500)
            with pytest.raises(ProviderError):
                launch(root, provider, run="fails")
        ledger.down(root, "--all", backoff=0.01)
        ledger.list_for_cli(root)
    finally:
        logging.getLogger("lorabuild").removeHandler(handler)
        handler.close()
    files = [p for p in root.rglob("*") if p.is_file()] + [root.parent / "cloud.log"]
    assert any(p.name == "studio.json" for p in files)
    for path in files:
        data = path.read_bytes()
        for key in planted:
            assert key.encode() not in data, f"{path} holds an API key"
    for key in planted:
        assert key not in caplog.text
    assert fake.live() == []


# --- processes ----------------------------------------------------------------------------------------------


def run_python(code: str, fake: FakeCloud, root: Path) -> subprocess.Popen[str]:
    env = {**lorabuild_env(), **fake.env(), "LORABUILD_CREATE_SETTLE_S": "0", "HOME": os.environ["HOME"]}
    script = f"from pathlib import Path\nroot = Path({str(root)!r})\n" + textwrap.dedent(code)
    return subprocess.Popen(
        [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.mark.parametrize("provider", BOTH)
def test_kill_9_during_create_is_recovered_by_the_next_process(
    fake_cloud: FakeCloud, root: Path, provider: str
) -> None:
    create = "createPod" if provider == "runpod" else "createInstance"
    fake_cloud.delay(create, seconds=1.0)
    child = run_python(
        f"""
        from lorabuild import cloud
        from lorabuild.cloud import GpuNeed, LaunchRequest, ledger
        offer = cloud.search_offers({provider!r}, GpuNeed(min_vram_gb=20))[0]
        label = ledger.new_label(root, "killed")
        ledger.launch(root, offer, LaunchRequest(label, "img", 40, "ssh-ed25519 AAAA k"), run="killed", deadline=None)
        """,
        fake_cloud,
        root,
    )
    for _ in range(200):
        if fake_cloud.count(create):
            break
        time.sleep(0.02)
    assert fake_cloud.count(create) == 1, child.communicate()[0]
    child.send_signal(signal.SIGKILL)  # mid-create: the provider goes on and makes the instance
    child.wait()
    [waiting] = ledger.active(root)
    assert waiting.state == "CREATING" and waiting.pid == child.pid
    for _ in range(100):
        if fake_cloud.live():
            break
        time.sleep(0.02)
    report = ledger.down(root, "--all", backoff=0.01)
    assert report.ok, report.describe()
    assert fake_cloud.live() == [] and ledger.active(root) == []
    assert entry(root, waiting.entry).id == fake_cloud.instances[provider].popitem()[0]


def test_kill_9_before_the_create_call_made_nothing(fake_cloud: FakeCloud, root: Path) -> None:
    child = run_python(
        """
        import os, signal
        from lorabuild.cloud import ledger
        ledger.record_intent(root, provider="runpod", label=ledger.new_label(root, "k"), run="k", gpu="x",
                             price_per_hour=1.0, deadline=None)
        os.kill(os.getpid(), signal.SIGKILL)
        """,
        fake_cloud,
        root,
    )
    child.wait()
    [waiting] = ledger.active(root)
    assert waiting.state == "CREATING"
    report = ledger.reconcile(root)
    assert report.never_created == [waiting.entry] and ledger.active(root) == []


def test_studio_json_writers_in_parallel_lose_nothing(root: Path, fake_cloud: FakeCloud) -> None:
    code = """
        import os
        from lorabuild.cloud import ledger
        for n in range(15):
            label = f"lorabuild-p{os.getpid()}-{n}"
            ledger.record_intent(root, provider="runpod", label=label, run="p", gpu="x", price_per_hour=1.0,
                                 deadline=None)
        """
    children = [run_python(code, fake_cloud, root) for _ in range(4)]
    record_machine(root, read_machine())
    for child in children:
        out, _ = child.communicate(timeout=60)
        assert child.returncode == 0, out
    studio = load_studio(root)
    assert len(studio["instances"]) == 60 and "local" in studio["machines"]
    assert len({i["entry"] for i in studio["instances"]}) == 60
    with studio_lock(root), studio_lock(root):  # re-entrant within a process
        pass


def test_ssh_keypair_is_made_once_and_private(root: Path) -> None:
    private, public = ledger.ssh_keypair(root)
    assert public.startswith("ssh-ed25519 ") and public.endswith(f"lorabuild-{ledger.grimoire_id(root)}")
    assert oct(private.stat().st_mode & 0o777) == "0o600"
    assert private.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert ledger.ssh_keypair(root) == (private, public)
    import paramiko

    assert paramiko.Ed25519Key.from_private_key_file(str(private)).get_base64() == public.split()[1]
