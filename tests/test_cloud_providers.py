"""RunPod and Vast.ai provider modules against the fake provider server (held to their OpenAPI files).

Every function of lorabuild.cloud's interface for both providers; offer selection by GPU, memory,
price, reliability and region; pagination; how HTTP failures become ProviderErrors (and which
are retried: reads yes, create never); credentials; the self-delete script run for real with
`sh` against the fake; and that no API key ever reaches an exception, a repr or a log.
"""

from __future__ import annotations

import base64
import gzip
import logging
import os
import shlex
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from lorabuild import cloud
from lorabuild.cloud import GpuNeed, LaunchRequest, MissingCredentials, Offer, ProviderError, providers
from lorabuild.cloud import credentials as creds
from lorabuild.cloud.providers import runpod, vastai
from tests import fakecloud
from tests.fakecloud import FakeCloud, SshTarget

fake_cloud = fakecloud.fake_cloud  # the fixtures (see tests/fakecloud.py)
fake_cloud_factory = fakecloud.fake_cloud_factory

PUBLIC_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHq0Jx0Sg3R4q2y8l0n1m2b3v4c5x6z7a8s9d0f1g2h3 lorabuild-test"
BOTH = ("runpod", "vastai")


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """No test may read the real ~/.runpod or ~/.config/vastai."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    for var in ("RUNPOD_API_KEY", "VAST_API_KEY", "LORABUILD_INSTANCE_ENV", "LORABUILD_API_URL"):
        monkeypatch.delenv(var, raising=False)
    yield home


def request(label: str = "lorabuild-0a1b2c3d-t-abc123", **changes: Any) -> LaunchRequest:
    values: dict[str, Any] = {
        "label": label,
        "image": "runpod/pytorch:1.0.2-cu1281-torch280-ubuntu2404",
        "disk_gb": 40,
        "ssh_public_key": PUBLIC_KEY,
        "env": {"LORABUILD_RUN": "t", "LORABUILD_NOTE": "two words"},
        "onstart": "(sleep 3600; echo deadline) &",
    }
    values.update(changes)
    return LaunchRequest(**values)


def cheapest(provider: str, **need: Any) -> Offer:
    offers = cloud.search_offers(provider, GpuNeed(**{"min_vram_gb": 20, **need}))
    assert offers, f"no {provider} offer for {need}"
    return offers[0]


def wait_running(provider: str, instance_id: str) -> cloud.InstanceState:
    for _ in range(10):
        state = cloud.get(provider, instance_id)
        assert state is not None
        if state.status == "running":
            return state
    raise AssertionError("never running")


# --- offers -------------------------------------------------------------------------------------------


def test_runpod_offers_come_from_the_gpu_catalogue_cheapest_first(fake_cloud: FakeCloud) -> None:
    offers = cloud.search_offers("runpod", GpuNeed(min_vram_gb=24, gpu="RTX 4090"))
    # "RTX 4090" matches "NVIDIA GeForce RTX 4090" (lorabuild.hardware.find_gpu), in both clouds
    assert [(o.offer_id, o.price_per_hour, o.raw["cloud"]) for o in offers] == [
        ("NVIDIA GeForce RTX 4090", 0.34, "COMMUNITY"),
        ("NVIDIA GeForce RTX 4090", 0.69, "SECURE"),
    ]
    assert offers[0].vram_gb == 24 and offers[0].gpu == "RTX 4090" and offers[0].provider == "runpod"
    # the catalogue was asked for pod availability in each cloud
    asked = [c for c in fake_cloud.calls if c.op == "listGpuTypes"]
    assert len(asked) == 2

    two = cloud.search_offers("runpod", GpuNeed(min_vram_gb=24, gpu="RTX 4090", gpu_count=2))
    assert [o.price_per_hour for o in two] == [0.68, 1.38]  # price per GPU × count
    assert all(o.gpu_count == 2 for o in two)


def test_runpod_offers_filtered_by_memory_price_reliability_region_and_stock(fake_cloud: FakeCloud) -> None:
    big = cloud.search_offers("runpod", GpuNeed(min_vram_gb=40))
    assert {o.gpu for o in big} == {"L40S", "A100 PCIe", "H100 SXM"}  # no 24/32 GB card, no AMD card
    assert [o.price_per_hour for o in big] == sorted(o.price_per_hour for o in big)

    cheap = cloud.search_offers("runpod", GpuNeed(min_vram_gb=20, max_price_per_hour=0.40))
    assert {(o.gpu, o.price_per_hour) for o in cheap} == {("RTX 3090", 0.22), ("RTX 4090", 0.34)}

    # RunPod publishes no reliability: with a minimum, only its own data centres (Secure Cloud) count
    reliable = cloud.search_offers("runpod", GpuNeed(min_vram_gb=24, gpu="RTX 4090", min_reliability=0.99))
    assert [o.raw["cloud"] for o in reliable] == ["SECURE"]

    europe = cloud.search_offers("runpod", GpuNeed(min_vram_gb=24, gpu="RTX 4090", region="EU"))
    assert europe and all(o.raw["dataCenterIds"] == ["EU-RO-1"] for o in europe)
    instance_id = cloud.create("runpod", europe[0], request())
    assert fake_cloud.instance("runpod", instance_id).body["dataCenterIds"] == ["EU-RO-1"]
    assert cloud.search_offers("runpod", GpuNeed(min_vram_gb=24, region="AP")) == []

    fake_cloud.runpod_no_capacity.add("NVIDIA GeForce RTX 4090")
    assert cloud.search_offers("runpod", GpuNeed(min_vram_gb=24, gpu="RTX 4090")) == []


def test_vast_offers_search_bundles_in_megabytes_cheapest_first(fake_cloud: FakeCloud) -> None:
    offers = cloud.search_offers("vastai", GpuNeed(min_vram_gb=24, gpu="RTX 4090"))
    # 5006 is cheaper but unverified; 5004 has two GPUs
    assert [(o.offer_id, o.price_per_hour) for o in offers] == [("5002", 0.33), ("5001", 0.41)]
    assert offers[0].vram_gb == 24.0 and offers[0].reliability == 0.91 and offers[0].location == "Quebec, CA"
    query = next(c.body for c in fake_cloud.calls if c.op == "searchOffers")
    assert query["gpu_ram"] == {"gte": 23500}  # MB in the API; a 24 GB card lists 24564 MB
    assert query["verified"] == {"eq": True} and query["rentable"] == {"eq": True}
    assert query["order"] == [["dph_total", "asc"], ["reliability", "desc"]]
    assert query["type"] == "ondemand" and query["num_gpus"] == {"eq": 1}
    assert "RTX 4090" in query["gpu_name"]["in"]

    reliable = cloud.search_offers("vastai", GpuNeed(min_vram_gb=24, gpu="RTX 4090", min_reliability=0.99))
    assert [o.offer_id for o in reliable] == ["5001"]
    cheap = cloud.search_offers("vastai", GpuNeed(min_vram_gb=16, max_price_per_hour=0.35))
    assert [o.offer_id for o in cheap] == ["5003", "5002"]
    pair = cloud.search_offers("vastai", GpuNeed(min_vram_gb=24, gpu="RTX 4090", gpu_count=2))
    assert [o.offer_id for o in pair] == ["5004"]
    large = cloud.search_offers("vastai", GpuNeed(min_vram_gb=60))
    assert [o.offer_id for o in large] == ["5005", "5007"]
    germany = cloud.search_offers("vastai", GpuNeed(min_vram_gb=20, region="DE"))
    assert [o.offer_id for o in germany] == ["5005"]


# --- create, get, list, terminate ---------------------------------------------------------------------------


def test_runpod_create_sends_a_spec_valid_pod_with_the_ssh_key(fake_cloud_factory: Callable[..., FakeCloud]) -> None:
    keys = Path(os.environ["HOME"]) / "authorized_keys"
    fake = fake_cloud_factory(ssh=SshTarget(port=2222, user="artist", authorized_keys=keys))
    offer = cheapest("runpod", gpu="RTX 4090")
    instance_id = cloud.create("runpod", offer, request())
    body = fake.instance("runpod", instance_id).body
    assert body["name"] == "lorabuild-0a1b2c3d-t-abc123"
    assert body["gpu"] == {"id": "NVIDIA GeForce RTX 4090", "count": 1}
    assert body["ports"] == ["22/tcp"] and body["startSsh"] is True and body["disk"] == 40
    assert body["cloud"] == "COMMUNITY"
    assert body["env"] == {"LORABUILD_RUN": "t", "LORABUILD_NOTE": "two words", "PUBLIC_KEY": PUBLIC_KEY}
    assert "sleep 3600" in body["args"] and "/start.sh" in body["args"]  # v2 has no onstart field
    assert keys.read_text().strip() == PUBLIC_KEY

    assert cloud.get("runpod", instance_id).status == "provisioning"  # type: ignore[union-attr]
    state = wait_running("runpod", instance_id)
    assert state.ssh == cloud.SshEndpoint("127.0.0.1", 2222, "artist")
    assert state.label == "lorabuild-0a1b2c3d-t-abc123" and state.cost_per_hour == 0.34
    assert "args" not in runpod.create_body(offer, request(onstart=""))


def test_vast_create_registers_the_key_once_and_rents_the_offer(fake_cloud_factory: Callable[..., FakeCloud]) -> None:
    keys = Path(os.environ["HOME"]) / "authorized_keys"
    fake = fake_cloud_factory(ssh=SshTarget(port=2200, user="artist", authorized_keys=keys))
    offer = cheapest("vastai", gpu="RTX 4090")
    first = cloud.create("vastai", offer, request())
    second = cloud.create("vastai", offer, request(label="lorabuild-0a1b2c3d-t-def456"))
    assert fake.count("createSshKey") == 1 and fake.count("getSshKeysUser") == 2
    assert [k["key"] for k in fake.vast_ssh_keys] == [PUBLIC_KEY]
    body = fake.instance("vastai", first).body
    assert body["runtype"] == "ssh_direct" and body["label"] == "lorabuild-0a1b2c3d-t-abc123"
    assert body["disk"] == 40.0 and body["image"].startswith("runpod/pytorch")
    assert shlex.split(body["env"]) == ["-e", "LORABUILD_RUN=t", "-e", "LORABUILD_NOTE=two words"]
    assert "CONTAINER_API_KEY" in body["onstart"] and body["onstart"].endswith("(sleep 3600; echo deadline) &")
    assert keys.read_text().split("\n")[:2] == [PUBLIC_KEY, PUBLIC_KEY]  # on both instances

    state = wait_running("vastai", second)
    assert state.ssh == cloud.SshEndpoint("127.0.0.1", 2200, "artist")  # public_ipaddr + ports["22/tcp"]
    assert state.cost_per_hour == 0.33 and state.label == "lorabuild-0a1b2c3d-t-def456"


def test_a_long_vast_onstart_is_packed_under_4048_characters() -> None:
    long = "echo " + "x" * 6000
    packed = vastai.onstart_script(long)
    assert len(packed) <= vastai.ONSTART_LIMIT and packed.startswith("echo ")
    unpacked = gzip.decompress(base64.b64decode(packed.split()[1])).decode()
    assert unpacked.endswith(long) and "CONTAINER_ID" in unpacked
    with pytest.raises(ValueError, match="cannot be an environment variable"):
        vastai.env_flags({"BAD NAME": "x"})


@pytest.mark.parametrize("provider", BOTH)
def test_get_answers_none_once_the_instance_is_gone(fake_cloud: FakeCloud, provider: str) -> None:
    instance_id = cloud.create(provider, cheapest(provider), request())
    assert cloud.get(provider, instance_id) is not None
    cloud.terminate(provider, instance_id)
    assert cloud.get(provider, instance_id) is None
    cloud.terminate(provider, instance_id)  # already gone: still a success
    assert fake_cloud.terminate_calls(provider, instance_id) == 2
    assert fake_cloud.live(provider) == []
    unknown = "nosuchpod" if provider == "runpod" else "999999"
    assert cloud.get(provider, unknown) is None
    # terminate means delete: lorabuild never calls stop/start/manage endpoints
    assert {c.op for c in fake_cloud.calls} <= {
        "listGpuTypes", "createPod", "getPod", "listPods", "deletePod",
        "searchOffers", "getSshKeysUser", "createSshKey", "createInstance", "showInstance", "showInstances",
        "destroyInstance",
    }  # fmt: skip


def test_vast_get_treats_404_as_gone(fake_cloud: FakeCloud) -> None:
    instance_id = cloud.create("vastai", cheapest("vastai"), request())
    fake_cloud.fail("showInstance", status=404)
    assert cloud.get("vastai", instance_id) is None
    with pytest.raises(ProviderError, match=r"not a Vast\.ai instance id"):
        cloud.get("vastai", "../../api/v0/users")


def test_status_mapping() -> None:
    pods = [("PROVISIONING", "provisioning"), ("STARTING", "provisioning"), ("RUNNING", "running"),
            ("EXITED", "stopped"), ("ERROR", "error"), ("TERMINATED", "terminated"),
            ("NEW", "provisioning")]  # fmt: skip
    for raw, status in pods:
        assert runpod.instance_state({"id": "p", "status": raw}).status == status
    # a RUNNING pod without ssh.direct yet has no endpoint; runtime.ports serves when direct is absent
    assert runpod.instance_state({"id": "p", "status": "RUNNING", "ssh": {"direct": None}}).ssh is None
    via_ports = {
        "id": "p",
        "status": "RUNNING",
        "runtime": {"ports": [{"private": 22, "public": 4000, "ip": "1.2.3.4"}]},
    }
    assert runpod.instance_state(via_ports).ssh == cloud.SshEndpoint("1.2.3.4", 4000, "root")
    for raw_vast, status in [(None, "provisioning"), ("loading", "provisioning"), ("created", "provisioning"),
                             ("running", "running"), ("stopped", "stopped"), ("exited", "error"),
                             ("offline", "error"), ("unknown", "error")]:  # fmt: skip
        assert vastai.instance_state({"id": 1, "actual_status": raw_vast}).status == status
    no_ports = vastai.instance_state({"id": 1, "actual_status": "running", "public_ipaddr": "1.2.3.4", "ports": None})
    assert no_ports.ssh is None


@pytest.mark.parametrize("provider", BOTH)
def test_list_by_label_finds_only_the_prefix(fake_cloud: FakeCloud, provider: str) -> None:
    mine = [cloud.create(provider, cheapest(provider), request(label=f"lorabuild-0a1b2c3d-t-{n}")) for n in range(3)]
    other = fake_cloud.add_instance(provider, "lorabuild-99999999-x-1")
    fake_cloud.add_instance(provider, "my-own-box")
    found = cloud.list_by_label(provider, "lorabuild-0a1b2c3d-")
    assert sorted(s.id for s in found) == sorted(mine)
    assert {s.id for s in cloud.list_by_label(provider)} == {*mine, other}  # default: every lorabuild instance


def test_vast_lists_every_page_through_next_token(fake_cloud: FakeCloud) -> None:
    ids = {fake_cloud.add_instance("vastai", f"lorabuild-0a1b2c3d-t-{n:02d}") for n in range(30)}
    fake_cloud.add_instance("vastai", "aaa-before-the-prefix")
    found = cloud.list_by_label("vastai", "lorabuild-0a1b2c3d-")
    assert {s.id for s in found} == ids and len(found) == 30
    pages = [c for c in fake_cloud.calls if c.op == "showInstances"]
    assert len(pages) == 2  # 25 + 5; the second one carried the first page's next_token
    assert all(s.status == "running" and s.ssh is not None for s in found)


# --- failures -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", BOTH)
def test_reads_are_retried_through_5xx_429_and_timeouts(
    fake_cloud_factory: Callable[..., FakeCloud], provider: str
) -> None:
    fake = fake_cloud_factory(client_timeout=0.5)
    instance_id = cloud.create(provider, cheapest(provider), request())
    show = "getPod" if provider == "runpod" else "showInstance"
    fake.fail(show, status=503, times=2)
    assert cloud.get(provider, instance_id) is not None
    assert fake.count(show) == 3
    fake.fail(show, status=429)
    fake.delay(show, seconds=1.0)
    assert cloud.get(provider, instance_id) is not None
    fake.fail(show, status=502, times=3)
    with pytest.raises(ProviderError) as failed:
        cloud.get(provider, instance_id)
    assert failed.value.retryable and failed.value.status == 502
    assert "on its side" in str(failed.value) and "trying again" in str(failed.value)


@pytest.mark.parametrize("provider", BOTH)
def test_create_is_never_retried_by_the_provider_module(
    fake_cloud_factory: Callable[..., FakeCloud], provider: str
) -> None:
    fake = fake_cloud_factory(client_timeout=0.5)
    offer = cheapest(provider)
    create_op = "createPod" if provider == "runpod" else "createInstance"
    fake.fail(create_op, status=500)
    with pytest.raises(ProviderError) as failed:
        cloud.create(provider, offer, request())
    assert failed.value.retryable and failed.value.status == 500
    assert fake.count(create_op) == 1 and fake.live() == []

    # a timeout: the provider still makes the instance after lorabuild gave up waiting
    fake.delay(create_op, seconds=0.8)
    with pytest.raises(ProviderError, match=r"did not answer within 0\.5 s") as slow:
        cloud.create(provider, offer, request(label="lorabuild-0a1b2c3d-t-slow"))
    assert slow.value.retryable and fake.count(create_op) == 2
    # the lost answer: made, but the connection dropped
    fake.lose_response(create_op)
    with pytest.raises(ProviderError, match="could not talk to") as lost:
        cloud.create(provider, offer, request(label="lorabuild-0a1b2c3d-t-lost"))
    assert lost.value.retryable
    for _ in range(50):
        if len(fake.live(provider)) == 2:
            break
        time.sleep(0.05)
    assert sorted(i.label for i in fake.live(provider)) == ["lorabuild-0a1b2c3d-t-lost", "lorabuild-0a1b2c3d-t-slow"]


def test_refusals_are_plain_and_not_retryable(fake_cloud: FakeCloud) -> None:
    fake_cloud.runpod_no_capacity.add("NVIDIA GeForce RTX 4090")
    offer = Offer("runpod", "NVIDIA GeForce RTX 4090", "RTX 4090", 1, 24, 0.69)
    with pytest.raises(ProviderError, match="no longer any instances available") as full:
        cloud.create("runpod", offer, request())
    assert not full.value.retryable and full.value.status == 400
    gone = Offer("vastai", "777", "RTX 4090", 1, 24, 0.4)
    with pytest.raises(ProviderError, match="taken by someone else") as taken:
        cloud.create("vastai", gone, request())
    assert not taken.value.retryable and taken.value.status == 404


@pytest.mark.parametrize("provider", BOTH)
def test_a_refused_key_names_the_fix_but_never_the_key(
    fake_cloud: FakeCloud, monkeypatch: pytest.MonkeyPatch, provider: str
) -> None:
    var = creds.ENV_VARS[provider]
    wrong = "wrong_key_" + "9" * 24
    monkeypatch.setenv(var, wrong)
    with pytest.raises(ProviderError) as refused:
        cloud.search_offers(provider, GpuNeed(min_vram_gb=24))
    text = str(refused.value)
    assert refused.value.status == 401 and not refused.value.retryable
    assert var in text and "refused lorabuild's API key" in text
    assert wrong not in text and wrong not in repr(refused.value)
    fake_cloud.allow_violations = True
    monkeypatch.delenv(var)
    with pytest.raises(MissingCredentials, match=var):
        cloud.get(provider, "1")


def test_an_instance_key_may_delete_its_own_instance_only(fake_cloud: FakeCloud) -> None:
    own = cloud.create("runpod", cheapest("runpod"), request(label="lorabuild-0a1b2c3d-t-a"))
    other = cloud.create("runpod", cheapest("runpod"), request(label="lorabuild-0a1b2c3d-t-b"))
    scoped = fake_cloud.instance("runpod", own).scoped_key
    headers = {"Authorization": f"Bearer {scoped}"}
    assert httpx.get(f"{fake_cloud.url}/v2/pods/{own}", headers=headers).status_code == 403
    assert httpx.delete(f"{fake_cloud.url}/v2/pods/{other}", headers=headers).status_code == 403
    assert httpx.delete(f"{fake_cloud.url}/v2/pods/{own}", headers=headers).status_code == 204
    assert fake_cloud.instance("runpod", own).deleted_with == "instance"
    assert [i.id for i in fake_cloud.live()] == [other]


def test_the_fake_refuses_what_the_openapi_files_forbid(fake_cloud: FakeCloud) -> None:
    fake_cloud.allow_violations = True
    auth = {"Authorization": f"Bearer {fake_cloud.keys['runpod']}"}
    bogus = {"name": "x", "image": "i", "gpu": {"id": "NVIDIA GeForce RTX 4090"}, "bogus": 1}
    answer = httpx.post(f"{fake_cloud.url}/v2/pods", json=bogus, headers=auth)
    assert answer.status_code == 422 and "bogus" in answer.json()["detail"]
    assert httpx.get(f"{fake_cloud.url}/v2/pods", params={"name": "x"}, headers=auth).status_code == 400
    assert httpx.get(f"{fake_cloud.url}/v2/pods").status_code == 401
    assert httpx.delete(f"{fake_cloud.url}/v2/pods", headers=auth).status_code == 405
    vast = {"Authorization": f"Bearer {fake_cloud.keys['vastai']}"}
    assert httpx.get(f"{fake_cloud.url}/api/v0/instances/abc", headers=vast).status_code == 400
    wrong_runtype = {"image": "i", "runtype": "ssh_direct ssh_proxy"}  # the CLI's form is not in the spec's enum
    assert httpx.put(f"{fake_cloud.url}/api/v0/asks/5001", json=wrong_runtype, headers=vast).status_code == 400
    env_object = {"image": "i", "env": {"A": "b"}}  # the spec types env as a string
    assert httpx.put(f"{fake_cloud.url}/api/v0/asks/5001", json=env_object, headers=vast).status_code == 400
    over_limit = {"limit": "26"}
    assert httpx.get(f"{fake_cloud.url}/api/v1/instances", params=over_limit, headers=vast).status_code == 400
    assert len(fake_cloud.violations) == 8
    assert fake_cloud.live() == []


def test_the_transport_can_be_swapped(monkeypatch: pytest.MonkeyPatch) -> None:
    """RunPod's API class and the HTTP transport are both replaceable (a future v3, a test double)."""
    monkeypatch.setenv("RUNPOD_API_KEY", "rp_test_" + "1" * 20)

    class Catalogue:
        version = "test"

        def __init__(self, http: providers.Http):
            self.http = http

        def gpu_types(self, cloud_name: str, count: int) -> list[dict[str, Any]]:
            gpu = {"id": "NVIDIA L40S", "name": "L40S", "memory": 48, "secure": True, "community": False}
            return [{**gpu, "price": {"secure": 0.8, "community": 0}, "maxCount": {"secure": 8, "community": 0}}]

    monkeypatch.setattr(runpod, "API", Catalogue)
    assert [o.offer_id for o in cloud.search_offers("runpod", GpuNeed(min_vram_gb=40))] == ["NVIDIA L40S"]
    monkeypatch.undo()

    seen: list[httpx.Request] = []

    def answer(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        return httpx.Response(200, json={"pods": []})

    monkeypatch.setenv("RUNPOD_API_KEY", "rp_test_" + "1" * 20)
    monkeypatch.setattr(providers, "TRANSPORT", httpx.MockTransport(answer))
    assert cloud.list_by_label("runpod") == []
    assert str(seen[0].url) == "https://api.runpod.io/v2/pods"  # the real base URL by default


# --- credentials -------------------------------------------------------------------------------------------


def test_keys_come_from_the_environment_then_the_providers_files(
    isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for provider in BOTH:
        assert not creds.has_api_key(provider)
        with pytest.raises(MissingCredentials) as missing:
            creds.api_key(provider)
        assert creds.ENV_VARS[provider] in str(missing.value) and "Fix:" in str(missing.value)
    (isolated_home / ".runpod").mkdir()
    (isolated_home / ".runpod" / "config.toml").write_text('[default]\napi_key = "rp_from_file_123456"\n')
    assert creds.api_key("runpod") == "rp_from_file_123456"
    monkeypatch.setenv("RUNPOD_API_KEY", "rp_from_env_123456")
    assert creds.api_key("runpod") == "rp_from_env_123456"

    (isolated_home / ".vast_api_key").write_text("vast_home_123456\n")
    assert creds.api_key("vastai") == "vast_home_123456"
    xdg = isolated_home / "xdg"
    (xdg / "vastai").mkdir(parents=True)
    (xdg / "vastai" / "vast_api_key").write_text("vast_xdg_123456")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    assert creds.api_key("vastai") == "vast_xdg_123456"
    (xdg / "vastai" / "vast_api_key").write_text("")  # an empty file does not count
    assert creds.api_key("vastai") == "vast_home_123456"

    text = "env rp_from_env_123456 file rp_from_file_123456 vast vast_home_123456"
    assert creds.redact(text) == "env [redacted] file [redacted] vast [redacted]"


def test_no_key_in_exceptions_reprs_or_logs(
    fake_cloud_factory: Callable[..., FakeCloud], caplog: pytest.LogCaptureFixture
) -> None:
    fake = fake_cloud_factory(client_timeout=0.3)
    planted = [fake.keys["runpod"], fake.keys["vastai"]]
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    for provider in BOTH:
        http = providers.Http(provider, fake.url, creds.api_key(provider))
        texts.append(repr(http))
        show = "getPod" if provider == "runpod" else "showInstance"
        instance_id = cloud.create(provider, cheapest(provider), request())
        for inject in (lambda op=show: fake.fail(op, 500, times=3), lambda op=show: fake.delay(op, 0.5, times=3)):
            inject()
            with pytest.raises(ProviderError) as failed:
                cloud.get(provider, instance_id)
            texts += [str(failed.value), repr(failed.value), repr(failed.value.args)]
    os.environ["LORABUILD_RUNPOD_API_URL"] = "http://127.0.0.1:9"  # nothing listens: connection refused
    with pytest.raises(ProviderError) as refused:
        cloud.list_by_label("runpod")
    texts.append(str(refused.value))
    texts.append(caplog.text)
    assert "could not talk to RunPod" in str(refused.value)
    for text in texts:
        for key in planted:
            assert key not in text


# --- the self-delete script ----------------------------------------------------------------------------------


def run_script(script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`sh -c script` in an environment as bare as an SSH session's (no provider variables)."""
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LORABUILD_SELF_DELETE_WAIT": "0"}
    return subprocess.run(["sh", "-c", script], env={**base, **env}, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("provider", BOTH)
def test_self_delete_uses_the_instance_scoped_key(fake_cloud: FakeCloud, provider: str) -> None:
    keep = cloud.create(provider, cheapest(provider), request(label="lorabuild-0a1b2c3d-t-keep"))
    doomed = cloud.create(provider, cheapest(provider), request(label="lorabuild-0a1b2c3d-t-doomed"))
    script = cloud.self_delete_script(provider)
    # the account key in the environment must not be what deletes it
    account = {creds.ENV_VARS[provider]: fake_cloud.keys[provider]}
    env = {
        "LORABUILD_API_URL": fake_cloud.url,
        "LORABUILD_INSTANCE_ENV": str(fake_cloud.instance_env_file(provider, doomed)),
    }
    assert fake_cloud.latest_env_file.read_text() == fake_cloud.instance_env_file(provider, doomed).read_text()
    done = run_script(script, {**env, **account})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "was deleted" in done.stdout
    assert fake_cloud.instance(provider, doomed).deleted_with == "instance"
    assert [i.id for i in fake_cloud.live(provider)] == [keep]
    again = run_script(script, env)  # already gone (404): still done
    assert again.returncode == 0, again.stderr
    assert fake_cloud.instance(provider, doomed).scoped_key not in done.stdout + done.stderr
    missing = run_script(script, {"LORABUILD_API_URL": fake_cloud.url})
    assert missing.returncode == 2 and "not set" in missing.stderr
    assert [i.id for i in fake_cloud.live(provider)] == [keep]


def test_self_delete_script_is_posix_and_quotes_its_values() -> None:
    for provider in BOTH:
        script = cloud.self_delete_script(provider)
        assert subprocess.run(["sh", "-n", "-c", script], capture_output=True).returncode == 0
        assert script.startswith("(") and script.rstrip().endswith(")")
        assert "-H @-" in script  # the key reaches curl on stdin, never on its command line
    assert "/etc/rp_environment" in runpod.self_delete_script()
    assert vastai.INSTANCE_ENV_FILE in vastai.self_delete_script()
