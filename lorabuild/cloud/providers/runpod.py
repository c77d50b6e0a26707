"""RunPod pods through RunPod's REST API v2 (`https://api.runpod.io/v2/...`).

Owns everything lorabuild knows about RunPod's API: the GPU catalogue as offers, the create body,
pod states and their SSH endpoint, listing by name, deletion, and the script a pod runs to delete
itself with its pod-scoped key. The HTTP calls sit behind `RunPodV2`, a small class with one
method per call; `API` names the class in use, so a future v3 (RunPod retired v1 on 2026-11-15
and retires GraphQL in 2027) or a test double replaces it without touching the rest.

Facts from reference/openapi/runpod_v2_openapi.json: the create body allows no unknown field;
`startSsh` starts sshd with the `PUBLIC_KEY` the body sets; `ssh.direct` (what SFTP and rsync
need) appears once the pod runs with `22/tcp` published; `DELETE /v2/pods/{id}` answers 204 and
404 once the pod is gone. Prices are per GPU per hour, per cloud (Secure: RunPod's data centres;
Community: hosts of other people), so an offer costs price × GPU count.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import quote

from lorabuild.cloud import GpuNeed, InstanceState, LaunchRequest, Offer, ProviderError, SshEndpoint
from lorabuild.cloud.credentials import api_key
from lorabuild.cloud.providers import (
    Http,
    base_url,
    cheapest_first,
    delete_script,
    fits_vram,
    gpu_matches,
    json_body,
    within_price,
)

PROVIDER = "runpod"
DEFAULT_URL = "https://api.runpod.io"
URL_ENV = "LORABUILD_RUNPOD_API_URL"
CLOUDS = ("SECURE", "COMMUNITY")
POD_ENV_FILE = "/etc/rp_environment"  # where RunPod writes the pod's variables for SSH sessions
START_SCRIPT = "/start.sh"  # RunPod's images start sshd (from PUBLIC_KEY) here

STATUS: dict[str, str] = {
    "PROVISIONING": "provisioning",
    "STARTING": "provisioning",
    "RUNNING": "running",
    "EXITED": "stopped",
    "ERROR": "error",
    "TERMINATED": "terminated",
}


class RunPodApi(Protocol):
    """The RunPod calls lorabuild makes, whatever API version carries them."""

    version: str

    def gpu_types(self, cloud: str, count: int) -> list[dict[str, Any]]: ...
    def create_pod(self, body: dict[str, Any]) -> dict[str, Any]: ...
    def get_pod(self, pod_id: str) -> dict[str, Any] | None: ...
    def list_pods(self) -> list[dict[str, Any]]: ...
    def delete_pod(self, pod_id: str) -> bool: ...


class RunPodV2:
    """REST API v2. Each method is one HTTP call; `Http` bounds, retries reads and words errors."""

    version = "v2"

    def __init__(self, http: Http):
        self.http = http

    def __repr__(self) -> str:
        return f"RunPodV2({self.http.base!r})"

    def gpu_types(self, cloud: str, count: int) -> list[dict[str, Any]]:
        what = "reading RunPod's GPU catalogue"
        params = {"include": "AVAILABILITY", "product": "POD", "count": str(count), "cloud": cloud}
        response = self.http.request("GET", "/v2/catalog/gpus", what, params=params, idempotent=True)
        gpus = json_body(response, self.http, what).get("gpus")
        return [g for g in gpus if isinstance(g, dict)] if isinstance(gpus, list) else []

    def create_pod(self, body: dict[str, Any]) -> dict[str, Any]:
        what = "creating the pod"
        response = self.http.request("POST", "/v2/pods", what, body=body, ok=(200, 201))
        pod = json_body(response, self.http, what)
        return pod if isinstance(pod, dict) else {}

    def get_pod(self, pod_id: str) -> dict[str, Any] | None:
        what = f"checking pod {pod_id}"
        response = self.http.request("GET", f"/v2/pods/{quote(pod_id, safe='')}", what, allow=(404,), idempotent=True)
        if response.status_code == 404:
            return None
        pod = json_body(response, self.http, what)
        return pod if isinstance(pod, dict) else None

    def list_pods(self) -> list[dict[str, Any]]:
        what = "listing your pods"
        response = self.http.request("GET", "/v2/pods", what, idempotent=True)
        pods = json_body(response, self.http, what).get("pods")
        return [p for p in pods if isinstance(p, dict)] if isinstance(pods, list) else []

    def delete_pod(self, pod_id: str) -> bool:
        """True when deleted now, False when RunPod no longer knew the pod."""
        response = self.http.request(
            "DELETE", f"/v2/pods/{quote(pod_id, safe='')}", f"deleting pod {pod_id}", ok=(200, 204), allow=(404,)
        )
        return bool(response.status_code != 404)


API: Callable[[Http], RunPodApi] = RunPodV2


def _api() -> RunPodApi:
    return API(Http(PROVIDER, base_url(URL_ENV, DEFAULT_URL), api_key(PROVIDER)))


# --- offers ---------------------------------------------------------------------------------------


def _available(level: Any) -> bool:
    # absent means the catalogue did not say; only an explicit NONE rules the GPU out
    return level != "NONE"


def _offers_from(gpu: dict[str, Any], cloud: str, need: GpuNeed) -> Offer | None:
    if gpu.get("manufacturer", "NVIDIA") != "NVIDIA":
        return None  # lorabuild's backends need CUDA
    if not gpu.get(cloud.lower()) or not _available(gpu.get("availability")):
        return None
    max_count = (gpu.get("maxCount") or {}).get(cloud.lower())
    if isinstance(max_count, int) and max_count < need.gpu_count:
        return None
    name = str(gpu.get("name") or gpu.get("id") or "")
    if not gpu_matches(need.gpu, name) and not gpu_matches(need.gpu, str(gpu.get("id") or "")):
        return None
    memory = float(gpu.get("memory") or 0)
    if not fits_vram(memory, need):
        return None
    per_gpu = (gpu.get("price") or {}).get(cloud.lower())
    if not isinstance(per_gpu, (int, float)) or per_gpu <= 0:
        return None
    price = round(float(per_gpu) * need.gpu_count, 4)
    if not within_price(price, need):
        return None
    if need.min_reliability is not None and cloud != "SECURE":
        # RunPod publishes no reliability figure; only its own data centres are taken as meeting one
        return None
    centres = [dc for dc in gpu.get("dataCenters") or [] if isinstance(dc, dict) and _available(dc.get("availability"))]
    data_center_ids: list[str] = []
    if need.region:
        data_center_ids = [
            str(dc["id"]) for dc in centres if str(dc.get("id", "")).upper().startswith(need.region.upper())
        ]
        if not data_center_ids:
            return None
    where = f"RunPod {cloud.title()} Cloud" + (f" ({', '.join(data_center_ids)})" if data_center_ids else "")
    return Offer(
        provider=PROVIDER,
        offer_id=str(gpu["id"]),
        gpu=name,
        gpu_count=need.gpu_count,
        vram_gb=memory,
        price_per_hour=price,
        reliability=None,
        location=where,
        raw={"cloud": cloud, "dataCenterIds": data_center_ids, "gpu_type": gpu},
    )


def search_offers(need: GpuNeed) -> list[Offer]:
    api = _api()
    offers: list[Offer] = []
    for cloud in CLOUDS:
        for gpu in api.gpu_types(cloud, need.gpu_count):
            if "id" in gpu:
                offer = _offers_from(gpu, cloud, need)
                if offer is not None:
                    offers.append(offer)
    return cheapest_first(offers)


# --- instances ------------------------------------------------------------------------------------


def _start_args(onstart: str) -> str:
    """The container command when the pod must run a boot script: RunPod v2 has no `onstart`
    field, so the script runs in the background and the image's own start script follows."""
    script = (
        f"( {onstart}\n) >/tmp/lorabuild-onstart.log 2>&1 &\n"
        f"if [ -x {shlex.quote(START_SCRIPT)} ]; then exec {shlex.quote(START_SCRIPT)}; fi\n"
        "exec sleep infinity\n"
    )
    return shlex.join(["bash", "-c", script])


def create_body(offer: Offer, request: LaunchRequest) -> dict[str, Any]:
    """The `POST /v2/pods` body (`CreatePodRequest`) for an offer and a launch request."""
    cloud = str(offer.raw.get("cloud") or "SECURE")
    env = {str(k): str(v) for k, v in request.env.items()}
    # startSsh would inject the account's registered keys; setting PUBLIC_KEY makes it this key
    env["PUBLIC_KEY"] = request.ssh_public_key.strip()
    body: dict[str, Any] = {
        "name": request.label,
        "image": request.image,
        "gpu": {"id": offer.offer_id, "count": offer.gpu_count},
        "cloud": cloud if cloud in CLOUDS else "SECURE",
        "disk": int(request.disk_gb),
        "ports": ["22/tcp"],
        "startSsh": True,
        "env": env,
    }
    data_centers = offer.raw.get("dataCenterIds")
    if isinstance(data_centers, list) and data_centers:
        body["dataCenterIds"] = [str(d) for d in data_centers]
    if request.onstart.strip():
        body["args"] = _start_args(request.onstart)
    return body


def create(offer: Offer, request: LaunchRequest) -> str:
    pod = _api().create_pod(create_body(offer, request))
    pod_id = pod.get("id")
    if not pod_id:
        raise ProviderError(
            "RunPod accepted the pod but its answer had no pod id; lorabuild will find the pod by its name "
            f"({request.label}) and delete it or use it.",
            retryable=True,
        )
    return str(pod_id)


def instance_state(pod: dict[str, Any]) -> InstanceState:
    """A pod as lorabuild sees it: normalised status, direct SSH endpoint, price per hour."""
    status = STATUS.get(str(pod.get("status") or "").upper(), "provisioning")
    ssh: SshEndpoint | None = None
    if status == "running":
        direct = (pod.get("ssh") or {}).get("direct")
        if isinstance(direct, dict) and direct.get("host") and direct.get("port"):
            ssh = SshEndpoint(str(direct["host"]), int(direct["port"]), str(direct.get("username") or "root"))
        else:
            for port in (pod.get("runtime") or {}).get("ports") or []:
                if port.get("private") == 22 and port.get("public") and port.get("ip"):
                    ssh = SshEndpoint(str(port["ip"]), int(port["public"]), "root")
                    break
    cost = pod.get("cost")
    return InstanceState(
        provider=PROVIDER,
        id=str(pod.get("id")),
        label=pod.get("name"),
        status=status,
        ssh=ssh,
        cost_per_hour=float(cost) if isinstance(cost, (int, float)) else None,
        raw=pod,
    )


def get(instance_id: str) -> InstanceState | None:
    pod = _api().get_pod(instance_id)
    if pod is None:
        return None
    return instance_state(pod)


def list_by_label(prefix: str) -> list[InstanceState]:
    # v2 has no name filter (v1's ?name= went with v1): every pod is listed, filtered here
    return [instance_state(p) for p in _api().list_pods() if str(p.get("name") or "").startswith(prefix)]


def terminate(instance_id: str) -> None:
    _api().delete_pod(instance_id)


def self_delete_script() -> str:
    """POSIX sh, run on the pod: delete it with RUNPOD_API_KEY, the pod-scoped key RunPod injects.
    In an SSH session the variables come from /etc/rp_environment; `LORABUILD_INSTANCE_ENV`
    names another file to read (tests), `LORABUILD_API_URL` another API (tests)."""
    return delete_script(
        provider="RunPod",
        id_var="RUNPOD_POD_ID",
        key_var="RUNPOD_API_KEY",
        env_file=POD_ENV_FILE,
        default_url=DEFAULT_URL,
        path_prefix="/v2/pods/",
        done_codes="200|204|404",
    )
