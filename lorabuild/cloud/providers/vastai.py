"""Vast.ai instances through Vast's REST API: create, show and destroy on v0, list on v1.

Owns everything lorabuild knows about Vast.ai's API: offer search (`POST /api/v0/bundles`), renting
an offer (`PUT /api/v0/asks/{id}`, whose answer names the instance `new_contract`), registering
lorabuild's SSH key on the account first (Vast only puts registered keys on new instances),
instance states and their direct SSH endpoint, listing by label (`GET /api/v1/instances`, keyset
pages; v0's list is deprecated and answers nothing useful), destruction, and the script an
instance runs to destroy itself with its container-scoped key.

Facts from reference/openapi/vast_openapi.yaml: `gpu_ram` is in MB in the API (GB in the CLI);
`runtype` is one of ssh, ssh_direct, ssh_proxy, jupyter…; `env` is one string in Docker flag form
(`-e KEY=value -p 8000:8000`); `onstart` holds at most 4048 characters; destroying an unknown
instance answers 404 `not_found`. Instances run as root and accept keys only.
"""

from __future__ import annotations

import base64
import gzip
import os
import re
import shlex
from typing import Any

from lorabuild.cloud import GpuNeed, InstanceState, LaunchRequest, Offer, ProviderError, SshEndpoint
from lorabuild.cloud.credentials import api_key
from lorabuild.cloud.providers import (
    Http,
    base_url,
    cheapest_first,
    delete_script,
    dumps,
    fits_vram,
    gpu_matches,
    json_body,
    within_price,
)

PROVIDER = "vastai"
DEFAULT_URL = "https://console.vast.ai"
URL_ENV = "LORABUILD_VAST_API_URL"
SSH_USER_ENV = "LORABUILD_VAST_SSH_USER"  # Vast instances log in as root; a test server's sshd may not
RUNTYPE = "ssh_direct"  # a direct port 22 for SFTP/rsync; the spec's enum has no "ssh_direct ssh_proxy"
ONSTART_LIMIT = 4048
PAGE_SIZE = 25
MAX_PAGES = 400
SEARCH_LIMIT = 64
# Where the instance keeps its own id and scoped key for SSH sessions (which do not inherit them)
INSTANCE_ENV_FILE = "/etc/lorabuild-instance.env"

STATUS: dict[str, str] = {
    "running": "running",
    "loading": "provisioning",
    "created": "provisioning",
    "scheduling": "provisioning",
    "stopped": "stopped",
    "frozen": "stopped",
    # "if actual_status becomes exited, unknown, or offline it will never reach running"
    "exited": "error",
    "unknown": "error",
    "offline": "error",
    "destroyed": "terminated",
}

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _http() -> Http:
    return Http(PROVIDER, base_url(URL_ENV, DEFAULT_URL), api_key(PROVIDER))


def _instance_path(instance_id: str) -> str:
    if not str(instance_id).isdigit():
        raise ProviderError(f"{instance_id!r} is not a Vast.ai instance id (those are numbers).")
    return f"/api/v0/instances/{int(instance_id)}"


# --- offers ---------------------------------------------------------------------------------------


def search_query(need: GpuNeed) -> dict[str, Any]:
    """The `POST /api/v0/bundles` body: on-demand, verified, rentable offers with `need`'s GPUs."""
    query: dict[str, Any] = {
        "verified": {"eq": True},
        "rentable": {"eq": True},
        "rented": {"eq": False},
        "num_gpus": {"eq": need.gpu_count},
        # MB, and a little under the need: Vast lists a 24 GB card as 24564 MB
        "gpu_ram": {"gte": int(max(need.min_vram_gb - 0.5, 0) * 1000)},
        "type": "ondemand",
        "allocated_storage": float(need.disk_gb),
        # the spec asks for exactly two sort keys; the second breaks ties by reliability
        "order": [["dph_total", "asc"], ["reliability", "desc"]],
        "limit": SEARCH_LIMIT,
    }
    if need.gpu:
        # the API writes GPU names with spaces ("RTX 4090"), its own examples with underscores
        query["gpu_name"] = {"in": sorted({need.gpu, need.gpu.replace(" ", "_")})}
    if need.max_price_per_hour is not None:
        query["dph_total"] = {"lte": need.max_price_per_hour}
    if need.min_reliability is not None:
        query["reliability"] = {"gte": need.min_reliability}
    if need.region and len(need.region) == 2:
        query["geolocation"] = {"in": [need.region.upper()]}
    return query


def _in_region(location: str, region: str | None) -> bool:
    if not region:
        return True
    country = location.rsplit(",", 1)[-1].strip().upper()
    return country == region.upper() or region.lower() in location.lower()


def _offer(raw: dict[str, Any], need: GpuNeed) -> Offer | None:
    try:
        offer_id = int(raw["id"])
        price = float(raw["dph_total"])
        vram_gb = round(float(raw.get("gpu_ram") or 0) / 1024, 1)
        count = int(raw.get("num_gpus") or 0)
    except (KeyError, TypeError, ValueError):
        return None
    name = str(raw.get("gpu_name") or "")
    reliability = raw.get("reliability", raw.get("reliability2"))
    reliability = float(reliability) if isinstance(reliability, (int, float)) else None
    location = str(raw.get("geolocation") or "")
    if raw.get("rentable") is False or count != need.gpu_count or not gpu_matches(need.gpu, name):
        return None
    if not fits_vram(vram_gb, need) or not within_price(price, need) or not _in_region(location, need.region):
        return None
    if need.min_reliability is not None and (reliability is None or reliability < need.min_reliability):
        return None
    return Offer(
        provider=PROVIDER,
        offer_id=str(offer_id),
        gpu=name,
        gpu_count=count,
        vram_gb=vram_gb,
        price_per_hour=round(price, 4),
        reliability=reliability,
        location=location or None,
        raw=raw,
    )


def search_offers(need: GpuNeed) -> list[Offer]:
    http = _http()
    what = "searching Vast.ai offers"
    response = http.request("POST", "/api/v0/bundles", what, body=search_query(need), idempotent=True)
    body = json_body(response, http, what)
    raw_offers = body.get("offers") if isinstance(body, dict) else None
    if isinstance(raw_offers, dict):  # one offer comes back bare in some answers
        raw_offers = [raw_offers]
    offers = [_offer(o, need) for o in raw_offers or [] if isinstance(o, dict)]
    return cheapest_first([o for o in offers if o is not None])


# --- instances ------------------------------------------------------------------------------------


def env_flags(env: dict[str, str]) -> str:
    """`env` in the Docker flag form the API takes: `-e KEY=value -e …`, each pair shell-quoted."""
    parts = []
    for key, value in env.items():
        if not _ENV_NAME.match(key):
            raise ValueError(f"{key!r} cannot be an environment variable name on a Vast.ai instance")
        parts.append(f"-e {shlex.quote(f'{key}={value}')}")
    return " ".join(parts)


def onstart_script(onstart: str) -> str:
    """The instance's boot script: keep its id and scoped key for later SSH sessions (mode 600),
    stop Vast's auto-tmux from wrapping lorabuild's commands, then the caller's script — packed
    with gzip+base64 when it would exceed Vast's 4048 characters."""
    keep = (
        f"(umask 077; printf \"export CONTAINER_ID='%s'\\nexport CONTAINER_API_KEY='%s'\\n\" "
        f'"$CONTAINER_ID" "$CONTAINER_API_KEY" > {shlex.quote(INSTANCE_ENV_FILE)})\n'
        "touch ~/.no_auto_tmux\n"
    )
    script = keep + onstart
    if len(script) <= ONSTART_LIMIT:
        return script
    packed = base64.b64encode(gzip.compress(script.encode("utf-8"))).decode("ascii")
    wrapped = f"echo {packed} | base64 -d | gunzip | sh"
    if len(wrapped) > ONSTART_LIMIT:
        raise ValueError(
            f"the instance's start script is too long for Vast.ai even compressed ({len(wrapped)} characters)"
        )
    return wrapped


def create_body(request: LaunchRequest) -> dict[str, Any]:
    """The `PUT /api/v0/asks/{id}` body for a launch request."""
    return {
        "image": request.image,
        "label": request.label,
        "disk": float(request.disk_gb),
        "runtype": RUNTYPE,
        "target_state": "running",
        "cancel_unavail": True,  # fail now rather than wait for a GPU that may never come
        "env": env_flags(request.env),
        "onstart": onstart_script(request.onstart),
    }


def _key_id(key: str) -> str:
    # "ssh-ed25519 AAAA… comment": type and key identify it; the comment may differ
    return " ".join(key.split()[:2])


def ensure_ssh_key(http: Http, public_key: str) -> None:
    """Register `public_key` on the account unless it already is: Vast copies the account's keys
    into an instance only when it is created."""
    what = "reading your Vast.ai SSH keys"
    response = http.request("GET", "/api/v0/ssh", what, allow=(404,), idempotent=True)
    keys = json_body(response, http, what) if response.status_code == 200 else []
    wanted = _key_id(public_key)
    for item in keys if isinstance(keys, list) else []:
        if isinstance(item, dict) and _key_id(str(item.get("key") or item.get("public_key") or "")) == wanted:
            return
    http.request(
        "POST", "/api/v0/ssh", "registering lorabuild's SSH key with Vast.ai", body={"ssh_key": public_key.strip()}
    )


def create(offer: Offer, request: LaunchRequest) -> str:
    if not offer.offer_id.isdigit():
        raise ProviderError(f"{offer.offer_id!r} is not a Vast.ai offer id (those are numbers).")
    body = create_body(request)  # checked before anything is registered or rented
    http = _http()
    ensure_ssh_key(http, request.ssh_public_key)
    what = f"renting Vast.ai offer {offer.offer_id}"
    response = http.request("PUT", f"/api/v0/asks/{int(offer.offer_id)}", what, body=body, allow=(404, 410))
    answer = json_body(response, http, what)
    if response.status_code in (404, 410):
        raise ProviderError(
            f"The Vast.ai offer {offer.offer_id} ({offer.gpu}) was taken by someone else a moment ago. "
            "Fix: run again — lorabuild searches the offers anew.",
            status=int(response.status_code),
        )
    if not isinstance(answer, dict) or not answer.get("success") or not answer.get("new_contract"):
        raise ProviderError(
            f"Vast.ai did not confirm the rental of offer {offer.offer_id}; lorabuild will look for an instance "
            f"labelled {request.label} and delete it or use it.",
            retryable=True,
            status=int(response.status_code),
        )
    return str(answer["new_contract"])


def _ssh(raw: dict[str, Any]) -> SshEndpoint | None:
    ports = raw.get("ports")
    host = raw.get("public_ipaddr")
    if not isinstance(ports, dict) or not host:
        return None
    mapping = ports.get("22/tcp")
    if not isinstance(mapping, list) or not mapping or not isinstance(mapping[0], dict):
        return None
    try:
        port = int(mapping[0]["HostPort"])  # a string in the API
    except (KeyError, TypeError, ValueError):
        return None
    return SshEndpoint(str(host).strip(), port, os.environ.get(SSH_USER_ENV) or "root")


def instance_state(raw: dict[str, Any]) -> InstanceState:
    actual = raw.get("actual_status")
    status = STATUS.get(str(actual).lower(), "provisioning") if actual else "provisioning"
    cost = raw.get("dph_total")
    return InstanceState(
        provider=PROVIDER,
        id=str(raw.get("id")),
        label=raw.get("label"),
        status=status,
        ssh=_ssh(raw) if status == "running" else None,
        cost_per_hour=float(cost) if isinstance(cost, (int, float)) else None,
        raw=raw,
    )


def get(instance_id: str) -> InstanceState | None:
    http = _http()
    what = f"checking instance {instance_id}"
    response = http.request("GET", _instance_path(instance_id), what, allow=(404,), idempotent=True)
    if response.status_code == 404:
        return None
    body = json_body(response, http, what)
    raw = body.get("instances") if isinstance(body, dict) else None
    if not isinstance(raw, dict) or not raw:
        return None  # Vast answers {"instances": null} for an instance it no longer has
    return instance_state(raw)


def list_by_label(prefix: str) -> list[InstanceState]:
    """All pages of `GET /api/v1/instances`, filtered on the label. The server filter is
    `label >= prefix`, which every label starting with the prefix passes in any collation; the
    exact prefix test is made here."""
    http = _http()
    found: list[InstanceState] = []
    params = {
        "limit": str(PAGE_SIZE),
        "order_by": dumps([{"col": "id", "dir": "asc"}]),
        "select_filters": dumps({"label": {"gte": prefix}}),
    }
    token: str | None = None
    seen_tokens: set[str] = set()
    for page in range(MAX_PAGES):
        what = f"listing your Vast.ai instances (page {page + 1})"
        query = dict(params, after_token=token) if token else params
        response = http.request("GET", "/api/v1/instances", what, params=query, idempotent=True)
        body = json_body(response, http, what)
        for raw in body.get("instances") or [] if isinstance(body, dict) else []:
            if isinstance(raw, dict) and str(raw.get("label") or "").startswith(prefix):
                found.append(instance_state(raw))
        token = body.get("next_token") if isinstance(body, dict) else None
        if not token:
            return found
        if token in seen_tokens:
            raise ProviderError(
                "Vast.ai sent the same page of instances twice; trying again usually works.", retryable=True
            )
        seen_tokens.add(token)
    raise ProviderError(f"Vast.ai listed more than {MAX_PAGES * PAGE_SIZE} instances; lorabuild stopped reading.")


def terminate(instance_id: str) -> None:
    http = _http()
    what = f"destroying instance {instance_id}"
    response = http.request("DELETE", _instance_path(instance_id), what, allow=(404,))
    if response.status_code == 404:
        return  # not_found: already gone
    body = json_body(response, http, what)
    if isinstance(body, dict) and body.get("success") is False and body.get("error") != "not_found":
        reason = body.get("msg") or body.get("error") or "no reason given"
        raise ProviderError(f"Vast.ai did not destroy instance {instance_id}: {reason}.", retryable=True)


def self_delete_script() -> str:
    """POSIX sh, run on the instance: destroy it with CONTAINER_API_KEY, the key Vast injects that
    "can only start, stop, or destroy that specific instance". SSH sessions read the variables
    from the file the boot script saved; `LORABUILD_INSTANCE_ENV` names another file (tests),
    `LORABUILD_API_URL` another API (tests)."""
    return delete_script(
        provider="Vast.ai",
        id_var="CONTAINER_ID",
        key_var="CONTAINER_API_KEY",
        env_file=INSTANCE_ENV_FILE,
        default_url=DEFAULT_URL,
        path_prefix="/api/v0/instances/",
        done_codes="200|404",
    )
