"""A fake RunPod (REST v2) and Vast.ai API on 127.0.0.1, held to the providers' published OpenAPI files.

Nothing in the tests may reach a real provider, so this server stands in for both, with the few
endpoints lorabuild uses — RunPod `listGpuTypes`, `createPod`, `getPod`, `listPods`, `deletePod`;
Vast.ai `searchOffers`, `getSshKeysUser`, `createSshKey`, `createInstance`, `showInstance`,
`showInstances` (v1), `destroyInstance` — and it is strict where the real ones are:

- every request is checked against the OpenAPI description (reference/openapi/): the path and
  method exist; path, query and header parameters are declared, typed and present when required;
  the bearer token is there; the JSON body validates against the operation's schema (JSON Schema
  2020-12, `$ref`s resolved in the whole document). A request that fails is answered like the
  real API (RunPod 422/400 problem+json, Vast.ai 400 `invalid_args`) and recorded in
  `violations`; the fixture fails the test at teardown unless the test allowed it;
- every JSON answer the fake gives is checked against the response schema too (`SPEC_ERRATA`
  lists the three places where Vast.ai's file contradicts the API it describes);
- instances go through states (provisioning for the first `provisioning_gets` reads, then running)
  and report the SSH endpoint the test gives — a real sshd on 127.0.0.1 — whose authorized_keys
  file receives the key each create call carries;
- each instance gets the variables its provider injects (RunPod `RUNPOD_POD_ID` + a pod-scoped
  `RUNPOD_API_KEY`; Vast.ai `CONTAINER_ID` + `CONTAINER_API_KEY`) in a file the test can source
  (`instance_env_file`, used as LORABUILD_INSTANCE_ENV; `latest_env_file`, which `env()` names,
  holds the last created instance's); that scoped key is accepted for deleting that one instance
  and nothing else.

Fault injection from Python: `fail(op, status, times)`, `delay(op, seconds, times)` (the request is
handled after the delay, so a create past the client's timeout still makes an instance),
`lose_response(op, times)` (handled, then the connection is dropped: the "lost id" case),
`on(op, callback)` (runs before the handler; e.g. read studio.json at create time),
`delete_in_console(provider, id)` and `add_instance(provider, label)`.

Use the `fake_cloud` fixture, or `fake_cloud_factory(**options)`; both point lorabuild at the
server through the environment (`FakeCloud.env()`, also for subprocesses).
"""

from __future__ import annotations

import base64
import copy
import getpass
import itertools
import json
import secrets
import shlex
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import pytest
import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

REPO = Path(__file__).resolve().parents[1]
SPEC_DIRS = (REPO / "tests" / "data" / "openapi", Path("/work/shared/reference/openapi"))
RUNPOD_SPEC = "runpod_v2_openapi.json"
VAST_SPEC = "vast_openapi.yaml"

# Where reference/openapi/vast_openapi.yaml contradicts the API it describes (and the v1 list in
# the same file), patched before the fake's own answers are checked against it:
SPEC_ERRATA: dict[str, str] = {
    "Instance.ports": "typed as a list of integers; the API (and v1's list in the same file) sends "
    '{"22/tcp": [{"HostIp": …, "HostPort": "…"}]}, which every client reads for direct SSH',
    "Instance.extra_env": "typed as a list of strings; v1's list types it as [[name, value], …]",
    "showInstance.instances": 'the API answers {"instances": null} for an instance it no longer has',
}


def spec_dir() -> Path:
    for folder in SPEC_DIRS:
        if (folder / RUNPOD_SPEC).exists() and (folder / VAST_SPEC).exists():
            return folder
    raise FileNotFoundError(
        f"the providers' OpenAPI files ({RUNPOD_SPEC}, {VAST_SPEC}) are in none of: "
        + ", ".join(str(d) for d in SPEC_DIRS)
    )


def _pointer(*parts: str) -> str:
    return "/" + "/".join(quote(p.replace("~", "~0").replace("/", "~1"), safe="~") for p in parts)


# --- OpenAPI checking ---------------------------------------------------------------------------------


@dataclass
class Operation:
    op_id: str
    method: str
    template: str
    spec: dict[str, Any]
    parameters: list[dict[str, Any]]


class OpenApi:
    """One OpenAPI 3.1 document: finds the operation for a request and checks requests and
    responses against it."""

    def __init__(self, document: dict[str, Any], uri: str):
        self.doc = document
        self.uri = uri
        self.registry: Registry[Any] = Registry().with_resource(
            uri, Resource(contents=document, specification=DRAFT202012)
        )
        self.operations: dict[str, Operation] = {}
        self.routes: list[tuple[list[str], dict[str, Operation]]] = []
        for template, item in document["paths"].items():
            by_method: dict[str, Operation] = {}
            for method in ("get", "post", "put", "patch", "delete"):
                if method not in item:
                    continue
                spec = item[method]
                params = [self.deref(p) for p in item.get("parameters", []) + spec.get("parameters", [])]
                op = Operation(spec.get("operationId", f"{method} {template}"), method.upper(), template, spec, params)
                op.spec["_pointer"] = _pointer("paths", template, method)
                by_method[method.upper()] = op
                self.operations[op.op_id] = op
            self.routes.append((template.strip("/").split("/"), by_method))
        self._validators: dict[str, Draft202012Validator] = {}

    def deref(self, node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            target: Any = self.doc
            for part in node["$ref"].lstrip("#/").split("/"):
                target = target[part.replace("~1", "/").replace("~0", "~")]
            node = target
        return node

    def validator(self, pointer: str) -> Draft202012Validator:
        if pointer not in self._validators:
            self._validators[pointer] = Draft202012Validator({"$ref": f"{self.uri}#{pointer}"}, registry=self.registry)
        return self._validators[pointer]

    def errors(self, pointer: str, value: Any) -> list[str]:
        return [
            f"{'/'.join(str(p) for p in e.absolute_path) or '$'}: {e.message}"
            for e in self.validator(pointer).iter_errors(value)
        ]

    def match(self, method: str, path: str) -> tuple[Operation | None, dict[str, str], int]:
        """The operation, its path parameters, and 200 — or None with 404 (no such path) / 405."""
        parts = path.strip("/").split("/")
        best: tuple[int, dict[str, Operation], dict[str, str]] | None = None
        for template, by_method in self.routes:
            if len(template) != len(parts):
                continue
            params: dict[str, str] = {}
            literal = 0
            for t, p in zip(template, parts, strict=True):
                if t.startswith("{") and t.endswith("}"):
                    params[t[1:-1]] = p
                elif t == p:
                    literal += 1
                else:
                    break
            else:
                if best is None or literal > best[0]:  # /instances/bid_price/{id} beats /instances/{id}/…
                    best = (literal, by_method, params)
        if best is None:
            return None, {}, 404
        if method not in best[1]:
            return None, {}, 405
        return best[1][method], best[2], 200

    def _coerce(self, schema: dict[str, Any], raw: str) -> Any:
        schema = self.deref(schema)
        kind = schema.get("type")
        if kind == "integer":
            return int(raw)
        if kind == "number":
            return float(raw)
        if kind == "boolean":
            if raw not in ("true", "false"):
                raise ValueError(raw)
            return raw == "true"
        if kind == "array":
            return [self._coerce(schema.get("items", {}), item) for item in raw.split(",")]
        return raw

    def check_request(
        self, op: Operation, path_params: dict[str, str], query: dict[str, list[str]], headers: Any, body: bytes
    ) -> list[str]:
        problems: list[str] = []
        declared = {(p["in"], p["name"]) for p in op.parameters}
        for name in query:
            if ("query", name) not in declared:
                problems.append(f"query parameter {name!r} is not defined for {op.op_id}")
        for index, param in enumerate(op.parameters):
            where, name = param["in"], param["name"]
            if where == "path":
                raw: str | None = path_params.get(name)
            elif where == "query":
                values = query.get(name)
                if values and len(values) > 1:
                    problems.append(f"query parameter {name!r} given {len(values)} times")
                raw = values[0] if values else None
            elif where == "header":
                raw = headers.get(name)
            else:
                continue
            if raw is None:
                if param.get("required"):
                    problems.append(f"{where} parameter {name!r} is required")
                continue
            schema = param.get("schema", {})
            try:
                value = self._coerce(schema, raw)
            except ValueError:
                problems.append(f"{where} parameter {name!r}: {raw!r} is not a {self.deref(schema).get('type')}")
                continue
            # the parameter's schema, found through its own pointer so its $refs resolve
            pointer = self._param_pointer(op, param, index)
            problems += [f"{where} parameter {name!r}: {e}" for e in self.errors(pointer + "/schema", value)]
        security = op.spec.get("security", self.doc.get("security", []))
        if security:
            auth = headers.get("Authorization") or ""
            if not auth.startswith("Bearer ") or not auth[7:].strip():
                problems.append("missing bearer token (Authorization: Bearer …)")
        request_body = op.spec.get("requestBody")
        if request_body is None:
            if body.strip():
                problems.append(f"{op.op_id} takes no request body")
            return problems
        if not body.strip():
            if request_body.get("required"):
                problems.append("request body is required")
            return problems
        content_type = (headers.get("Content-Type") or "").split(";")[0].strip()
        if content_type != "application/json":
            problems.append(f"request body must be application/json, not {content_type!r}")
            return problems
        try:
            value = json.loads(body)
        except ValueError as exc:
            return [*problems, f"request body is not JSON: {exc}"]
        pointer = op.spec["_pointer"] + _pointer("requestBody", "content", "application/json", "schema")
        return problems + [f"body {e}" for e in self.errors(pointer, value)]

    def _param_pointer(self, op: Operation, param: dict[str, Any], index: int) -> str:
        item = self.doc["paths"][op.template]
        path_level = [self.deref(p) for p in item.get("parameters", [])]
        for i, p in enumerate(item.get("parameters", [])):
            if path_level[i] is param:
                return self._ref_or(p, _pointer("paths", op.template, "parameters", str(i)))
        for i, p in enumerate(op.spec.get("parameters", [])):
            if self.deref(p) is param:
                return self._ref_or(p, op.spec["_pointer"] + _pointer("parameters", str(i)))
        raise KeyError(param["name"])

    @staticmethod
    def _ref_or(node: dict[str, Any], pointer: str) -> str:
        ref = node.get("$ref")
        return ref[1:] if isinstance(ref, str) and ref.startswith("#") else pointer

    def check_response(self, op: Operation, status: int, body: Any) -> list[str]:
        responses = op.spec.get("responses", {})
        key = str(status) if str(status) in responses else "default"
        if key not in responses:
            return [f"{op.op_id} does not define HTTP {status}"]
        response = self.deref(responses[key])
        content = response.get("content") or {}
        if body is None:
            return [f"{op.op_id} HTTP {status} must have a body"] if content else []
        for media in ("application/json", "application/problem+json"):
            if media in content and "schema" in content[media]:
                ref = responses[key].get("$ref")
                base = ref[1:] if isinstance(ref, str) else op.spec["_pointer"] + _pointer("responses", key)
                return [f"response {e}" for e in self.errors(base + _pointer("content", media, "schema"), body)]
        return []


def load_specs() -> tuple[OpenApi, OpenApi]:
    folder = spec_dir()
    runpod = json.loads((folder / RUNPOD_SPEC).read_text(encoding="utf-8"))
    vast = yaml.safe_load((folder / VAST_SPEC).read_text(encoding="utf-8"))
    vast = copy.deepcopy(vast)
    instance = vast["components"]["schemas"]["Instance"]["properties"]
    listed = vast["paths"]["/api/v1/instances"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    listed_item = listed["properties"]["instances"]["items"]["properties"]
    instance["ports"] = listed_item["ports"]
    instance["extra_env"] = listed_item["extra_env"]
    show = vast["paths"]["/api/v0/instances/{id}"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    show["properties"]["instances"] = {"anyOf": [{"$ref": "#/components/schemas/Instance"}, {"type": "null"}]}
    return OpenApi(runpod, "urn:lorabuild-test:runpod-v2"), OpenApi(vast, "urn:lorabuild-test:vast")


_SPECS: tuple[OpenApi, OpenApi] | None = None
_SPECS_LOCK = threading.Lock()


def specs() -> tuple[OpenApi, OpenApi]:
    """The two documents, parsed once per test session (the files are large)."""
    global _SPECS
    with _SPECS_LOCK:
        if _SPECS is None:
            _SPECS = load_specs()
        return _SPECS


# --- provider state -----------------------------------------------------------------------------------


@dataclass
class SshTarget:
    host: str = "127.0.0.1"
    port: int = 22
    user: str = field(default_factory=getpass.getuser)
    authorized_keys: Path | None = None  # keys from create calls are appended here


@dataclass
class FakeInstance:
    provider: str
    id: str
    label: str
    scoped_key: str
    env_file: Path
    body: dict[str, Any]
    created_at: float
    gets: int = 0
    running_after: int = 2
    deleted: bool = False
    deleted_with: str | None = None  # "account" or "instance" (its scoped key)
    terminate_calls: int = 0
    gpu: str = "NVIDIA GeForce RTX 4090"
    gpu_count: int = 1
    price: float = 0.69
    public_key: str | None = None

    @property
    def running(self) -> bool:
        return not self.deleted and self.gets >= self.running_after


@dataclass
class Call:
    op: str
    provider: str
    method: str
    path: str
    status: int | None
    auth: str  # "account", "instance:<id>", "none" or "wrong"
    body: Any = None


@dataclass
class FakeRequest:
    """What a hook sees: the operation, its parameters and parsed body."""

    op: str
    provider: str
    method: str
    path: str
    path_params: dict[str, str]
    query: dict[str, list[str]]
    body: Any


RUNPOD_CATALOG: list[dict[str, Any]] = [
    # id, name, memory GB, secure $/h, community $/h, availability
    {"id": "NVIDIA GeForce RTX 3090", "name": "RTX 3090", "memory": 24, "secure": 0.43, "community": 0.22},
    {"id": "NVIDIA GeForce RTX 4090", "name": "RTX 4090", "memory": 24, "secure": 0.69, "community": 0.34},
    {"id": "NVIDIA GeForce RTX 5090", "name": "RTX 5090", "memory": 32, "secure": 0.89, "community": 0.69},
    {"id": "NVIDIA L40S", "name": "L40S", "memory": 48, "secure": 0.86, "community": 0.79},
    {"id": "NVIDIA A100 80GB PCIe", "name": "A100 PCIe", "memory": 80, "secure": 1.64, "community": 1.19},
    {"id": "NVIDIA H100 80GB HBM3", "name": "H100 SXM", "memory": 80, "secure": 2.99, "community": 2.69},
    {"id": "AMD Instinct MI300X OAM", "name": "MI300X", "memory": 192, "secure": 2.49, "community": 0.0, "amd": True},
]

VAST_OFFERS: list[dict[str, Any]] = [
    {"id": 5001, "gpu_name": "RTX 4090", "num_gpus": 1, "gpu_ram": 24564, "dph_total": 0.41, "reliability": 0.995,
     "geolocation": "California, US"},
    {"id": 5002, "gpu_name": "RTX 4090", "num_gpus": 1, "gpu_ram": 24564, "dph_total": 0.33, "reliability": 0.91,
     "geolocation": "Quebec, CA"},
    {"id": 5003, "gpu_name": "RTX 3090", "num_gpus": 1, "gpu_ram": 24576, "dph_total": 0.22, "reliability": 0.998,
     "geolocation": "Texas, US"},
    {"id": 5004, "gpu_name": "RTX 4090", "num_gpus": 2, "gpu_ram": 24564, "dph_total": 0.80, "reliability": 0.999,
     "geolocation": "Oregon, US"},
    {"id": 5005, "gpu_name": "A100 SXM4", "num_gpus": 1, "gpu_ram": 81920, "dph_total": 1.10, "reliability": 0.997,
     "geolocation": "Hesse, DE"},
    {"id": 5006, "gpu_name": "RTX 4090", "num_gpus": 1, "gpu_ram": 24564, "dph_total": 0.38, "reliability": 0.999,
     "geolocation": "Hesse, DE", "verification": "unverified", "verified": False},
    {"id": 5007, "gpu_name": "H100 SXM", "num_gpus": 1, "gpu_ram": 81559, "dph_total": 1.95, "reliability": 0.999,
     "geolocation": "Virginia, US"},
]  # fmt: skip


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _compare(op: str, have: Any, want: Any) -> bool:
    try:
        if op == "eq":
            return bool(have == want)
        if op == "neq":
            return bool(have != want)
        if op == "in":
            return have in want
        if op == "notin":
            return have not in want
        if have is None:
            return False
        return bool({"gt": have > want, "gte": have >= want, "lt": have < want, "lte": have <= want}[op])
    except (TypeError, KeyError):
        return False


def _filters_pass(item: dict[str, Any], filters: dict[str, Any]) -> bool:
    for column, condition in filters.items():
        if not isinstance(condition, dict):
            continue
        have = item.get(column)
        if column == "geolocation" and isinstance(have, str):
            have = have.rsplit(",", 1)[-1].strip()  # "California, US": the filter takes country codes
        for op, want in condition.items():
            if not _compare(op, have, want):
                return False
    return True


class FakeCloud:
    """Both providers' APIs on one local port (their paths do not overlap)."""

    def __init__(
        self,
        workdir: Path,
        *,
        ssh: SshTarget | None = None,
        provisioning_gets: int = 2,
        client_timeout: float = 2.0,
    ):
        self.workdir = workdir
        self.ssh = ssh or SshTarget()
        self.provisioning_gets = provisioning_gets
        self.client_timeout = client_timeout
        self.keys = {"runpod": "rp_acct_" + secrets.token_hex(16), "vastai": "vast_acct_" + secrets.token_hex(16)}
        self.runpod_spec, self.vast_spec = specs()
        self.instances: dict[str, dict[str, FakeInstance]] = {"runpod": {}, "vastai": {}}
        self.vast_ssh_keys: list[dict[str, Any]] = []
        self.vast_offers = copy.deepcopy(VAST_OFFERS)
        self.runpod_catalog = copy.deepcopy(RUNPOD_CATALOG)
        self.runpod_no_capacity: set[str] = set()
        self.calls: list[Call] = []
        self.violations: list[str] = []  # requests that broke the OpenAPI description
        self.response_violations: list[str] = []  # answers of this fake that broke it
        self.errors: list[str] = []  # hooks that raised, handler bugs
        self.allow_violations = False
        self._faults: dict[str, list[tuple[str, Any]]] = {}
        self._hooks: dict[str, list[Callable[[FakeRequest], None]]] = {}
        self._lock = threading.RLock()
        self._next_vast_id = 41000
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ---

    def start(self) -> FakeCloud:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                fake._handle(self)

            do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fakecloud", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the fake first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def env(self) -> dict[str, str]:
        """Environment variables that point lorabuild (in-process or a subprocess) at this server."""
        return {
            "LORABUILD_RUNPOD_API_URL": self.url,
            "LORABUILD_VAST_API_URL": self.url,
            "LORABUILD_API_URL": self.url,  # what an instance's self-delete script calls
            # the variables of the instance created last, for a self-delete run over SSH (e2e tests)
            "LORABUILD_INSTANCE_ENV": str(self.latest_env_file),
            "RUNPOD_API_KEY": self.keys["runpod"],
            "VAST_API_KEY": self.keys["vastai"],
            "LORABUILD_VAST_SSH_USER": self.ssh.user,
            "LORABUILD_CLOUD_TIMEOUT": str(self.client_timeout),
            "LORABUILD_CLOUD_BACKOFF": "0.01",
        }

    def check(self) -> None:
        """Fail when lorabuild sent a request the OpenAPI files forbid, or the fake answered one."""
        assert not self.errors, "hooks or handlers of the fake failed:\n" + "\n".join(self.errors)
        assert not self.response_violations, "the fake's own answers broke the spec:\n" + "\n".join(
            self.response_violations
        )
        if not self.allow_violations:
            assert not self.violations, "lorabuild sent requests the OpenAPI files forbid:\n" + "\n".join(
                self.violations
            )

    # --- fault injection and hooks ---

    def _known(self, op: str) -> None:
        if op not in self.runpod_spec.operations and op not in self.vast_spec.operations:
            raise KeyError(f"no operation {op!r} in either OpenAPI file")

    def fail(self, op: str, status: int = 503, times: int = 1) -> None:
        """Answer the next `times` calls of `op` with `status` (nothing is done)."""
        self._known(op)
        with self._lock:
            self._faults.setdefault(op, []).extend([("fail", status)] * times)

    def delay(self, op: str, seconds: float, times: int = 1) -> None:
        """Hold the next `times` calls of `op` for `seconds` before handling them."""
        self._known(op)
        with self._lock:
            self._faults.setdefault(op, []).extend([("delay", seconds)] * times)

    def lose_response(self, op: str, times: int = 1) -> None:
        """Handle the next `times` calls of `op`, then drop the connection without an answer."""
        self._known(op)
        with self._lock:
            self._faults.setdefault(op, []).extend([("lose", None)] * times)

    def on(self, op: str, callback: Callable[[FakeRequest], None]) -> None:
        """Call `callback` before each handled call of `op` (an exception answers HTTP 500)."""
        self._known(op)
        self._hooks.setdefault(op, []).append(callback)

    def delete_in_console(self, provider: str, instance_id: str) -> None:
        """The artist deleted the instance on the provider's website."""
        with self._lock:
            self.instances[provider][instance_id].deleted = True
            self.instances[provider][instance_id].deleted_with = "console"

    def add_instance(self, provider: str, label: str, *, running: bool = True) -> str:
        """An instance lorabuild did not record (made by a process whose ledger was lost)."""
        with self._lock:
            inst = self._new_instance(provider, label, {"label": label}, public_key=None)
            if running:
                inst.gets = inst.running_after
            return inst.id

    # --- what tests assert ---

    def live(self, provider: str | None = None) -> list[FakeInstance]:
        """Instances that exist (not deleted), in any state — what would be billing."""
        with self._lock:
            return [
                i
                for p, by_id in self.instances.items()
                if provider in (None, p)
                for i in by_id.values()
                if not i.deleted
            ]

    def running(self, provider: str | None = None) -> list[FakeInstance]:
        """Live instances that reached the running state."""
        return [i for i in self.live(provider) if i.running]

    def instance(self, provider: str, instance_id: str) -> FakeInstance:
        return self.instances[provider][instance_id]

    @property
    def latest_env_file(self) -> Path:
        """The injected variables of the instance created last (rewritten at each create)."""
        return self.workdir / "instance.env"

    def instance_env_file(self, provider: str, instance_id: str) -> Path:
        return self.instances[provider][instance_id].env_file

    def terminate_calls(self, provider: str, instance_id: str) -> int:
        return self.instances[provider][instance_id].terminate_calls

    def count(self, op: str) -> int:
        with self._lock:
            return sum(1 for c in self.calls if c.op == op)

    # --- request handling ---

    def _auth(self, provider: str, header: str) -> tuple[str, FakeInstance | None]:
        if not header.startswith("Bearer ") or not header[7:].strip():
            return "none", None
        token = header[7:].strip()
        if token == self.keys[provider]:
            return "account", None
        for inst in self.instances[provider].values():
            if token == inst.scoped_key:
                return f"instance:{inst.id}", inst
        return "wrong", None

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        split = urlsplit(handler.path)
        path = split.path
        query = parse_qs(split.query, keep_blank_values=True)
        length = int(handler.headers.get("Content-Length") or 0)
        raw_body = handler.rfile.read(length) if length else b""
        provider = "runpod" if path.startswith("/v2/") else "vastai"
        api = self.runpod_spec if provider == "runpod" else self.vast_spec
        op, path_params, found = api.match(handler.command, path)
        if op is None:
            with self._lock:
                self.violations.append(f"{handler.command} {path}: {'no such path' if found == 404 else 'method'}")
            self._send_error(handler, provider, found, "Not Found" if found == 404 else "Method Not Allowed", None)
            return
        with self._lock:
            auth, scoped = self._auth(provider, handler.headers.get("Authorization") or "")
            call = Call(op.op_id, provider, handler.command, path, None, auth)
            self.calls.append(call)
            fault = self._faults[op.op_id].pop(0) if self._faults.get(op.op_id) else None
        if fault and fault[0] == "delay":
            time.sleep(float(fault[1]))
        if fault and fault[0] == "fail":
            call.status = int(fault[1])
            self._send_error(handler, provider, int(fault[1]), "injected failure", op)
            return
        problems = api.check_request(op, path_params, query, handler.headers, raw_body)
        if problems:
            with self._lock:
                self.violations.extend(f"{op.op_id}: {p}" for p in problems)
            if any("bearer token" in p for p in problems):
                call.status = 401
                self._send_error(handler, provider, 401, "missing bearer token", op)
                return
            status = 422 if provider == "runpod" and any(p.startswith("body") for p in problems) else 400
            call.status = status
            self._send_error(handler, provider, status, "; ".join(problems), op, errors=problems)
            return
        body = json.loads(raw_body) if raw_body.strip() else None
        call.body = body
        if auth in ("none", "wrong"):
            call.status = 401
            self._send_error(handler, provider, 401, "invalid API key", op)
            return
        if scoped is not None and not self._scoped_allowed(op.op_id, path_params, scoped):
            call.status = 403
            self._send_error(handler, provider, 403, "an instance key may only delete its own instance", op)
            return
        request = FakeRequest(op.op_id, provider, handler.command, path, path_params, query, body)
        try:
            for hook in self._hooks.get(op.op_id, []):
                hook(request)
            with self._lock:
                status, answer = getattr(self, f"_op_{op.op_id}")(request, auth)
        except Exception as exc:  # a failing hook (a test's assertion) or a bug here: reported by check()
            with self._lock:
                self.errors.append(f"{op.op_id}: {exc!r}")
            call.status = 500
            self._send_error(handler, provider, 500, "fake server error", op)
            return
        call.status = status
        if answer is not None or status != 204:
            problems = api.check_response(op, status, answer)
            if problems:
                with self._lock:
                    self.response_violations.extend(f"{op.op_id} {status}: {p}" for p in problems)
        if fault and fault[0] == "lose":
            handler.close_connection = True  # handled; the answer never arrives
            return
        content_type = "application/problem+json" if provider == "runpod" and status >= 400 else "application/json"
        self._send(handler, status, answer, content_type)

    def _scoped_allowed(self, op: str, params: dict[str, str], inst: FakeInstance) -> bool:
        return op in ("deletePod", "destroyInstance") and params.get("id") == inst.id

    def _send(self, handler: BaseHTTPRequestHandler, status: int, answer: Any, content_type: str) -> None:
        data = b"" if answer is None else json.dumps(answer).encode()
        try:
            handler.send_response(status)
            if data:
                handler.send_header("Content-Type", content_type)
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up waiting (a delay past its timeout)

    def _send_error(
        self,
        handler: BaseHTTPRequestHandler,
        provider: str,
        status: int,
        detail: str,
        op: Operation | None,
        errors: list[str] | None = None,
    ) -> None:
        if provider == "runpod":
            titles = {
                400: "Bad Request",
                401: "Unauthorized",
                403: "Forbidden",
                404: "Not Found",
                422: "Unprocessable Entity",
                429: "Too Many Requests",
            }
            answer: dict[str, Any] = {"title": titles.get(status, "Error"), "status": status, "detail": detail}
            if errors:
                answer["errors"] = errors
            self._send(handler, status, answer, "application/problem+json")
        elif status == 429:
            self._send(
                handler, status, {"detail": "API requests too frequent endpoint threshold=2.0"}, "application/json"
            )
        else:
            kind = {400: "invalid_args", 401: "auth_error", 403: "forbidden", 404: "not_found"}.get(status, "error")
            self._send(handler, status, {"success": False, "error": kind, "msg": detail}, "application/json")

    def _new_instance(self, provider: str, label: str, body: dict[str, Any], *, public_key: str | None) -> FakeInstance:
        if provider == "runpod":
            instance_id = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(14))
            scoped = "rp_pod_" + secrets.token_hex(16)
            lines = [f"export RUNPOD_POD_ID='{instance_id}'", f"export RUNPOD_API_KEY='{scoped}'"]
        else:
            self._next_vast_id += 1
            instance_id = str(self._next_vast_id)
            scoped = "vast_ctr_" + secrets.token_hex(16)
            lines = [f"export CONTAINER_ID='{instance_id}'", f"export CONTAINER_API_KEY='{scoped}'"]
        env_file = self.workdir / f"{provider}-{instance_id}.env"
        env_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
        self.latest_env_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
        inst = FakeInstance(
            provider=provider,
            id=instance_id,
            label=label,
            scoped_key=scoped,
            env_file=env_file,
            body=body,
            created_at=time.time(),
            running_after=self.provisioning_gets,
            public_key=public_key,
        )
        if public_key and self.ssh.authorized_keys is not None:
            with open(self.ssh.authorized_keys, "a", encoding="utf-8") as handle:
                handle.write(public_key.strip() + "\n")
        self.instances[provider][instance_id] = inst
        return inst

    # --- RunPod v2 ---

    def _gpu_type(self, gpu: dict[str, Any], query: dict[str, list[str]]) -> dict[str, Any]:
        amd = bool(gpu.get("amd"))
        answer: dict[str, Any] = {
            "id": gpu["id"],
            "name": gpu["name"],
            "pool": None,
            "manufacturer": "AMD" if amd else "NVIDIA",
            "memory": gpu["memory"],
            "secure": True,
            "community": not amd,
            "price": {"secure": gpu["secure"], "community": gpu["community"]},
            "maxCount": {"secure": 8, "community": 0 if amd else 4},
        }
        if "include" in query:
            level = "NONE" if gpu["id"] in self.runpod_no_capacity else "HIGH"
            answer["availability"] = level
            if level != "NONE":
                answer["dataCenters"] = [
                    {"id": "US-KS-2", "name": "US Kansas 2", "availability": "HIGH"},
                    {"id": "EU-RO-1", "name": "EU Romania 1", "availability": "MEDIUM"},
                ]
        return answer

    def _op_listGpuTypes(self, req: FakeRequest, auth: str) -> tuple[int, Any]:
        with_availability = req.query.get("include") == ["AVAILABILITY"]
        if with_availability != ("product" in req.query):
            return 400, {"title": "Bad Request", "status": 400, "detail": "include=AVAILABILITY requires product"}
        for only in ("count", "cloud", "countryCodes", "cudaVersions", "minCudaVersion"):
            if only in req.query and not with_availability:
                return 400, {"title": "Bad Request", "status": 400, "detail": f"{only} needs include=AVAILABILITY"}
        return 200, {"gpus": [self._gpu_type(g, req.query) for g in self.runpod_catalog]}

    def _pod(self, inst: FakeInstance) -> dict[str, Any]:
        body = inst.body
        running = inst.running
        direct = None
        runtime: dict[str, Any] | None = None
        if running:
            host, port, user = self.ssh.host, self.ssh.port, self.ssh.user
            direct = {"host": host, "port": port, "username": user, "command": f"ssh {user}@{host} -p {port}"}
            runtime = {"uptime": 10, "ports": [{"private": 22, "public": port, "type": "tcp", "ip": host}]}
        status = "RUNNING" if running else ("PROVISIONING" if inst.gets == 0 else "STARTING")
        return {
            "id": inst.id,
            "name": inst.label,
            "image": body.get("image", "runpod/base:1.0.2-ubuntu2204"),
            "args": body.get("args", ""),
            "disk": body.get("disk", 50),
            "ports": body.get("ports", []),
            "env": {k: v for k, v in (body.get("env") or {}).items() if k != "PUBLIC_KEY"},
            "registry": None,
            "status": status,
            "actions": ["stop", "restart", "terminate"] if running else ["stop", "terminate"],
            "mounts": {},
            "gpu": {"id": inst.gpu, "count": inst.gpu_count},
            "cloud": body.get("cloud", "SECURE"),
            "dataCenterId": "US-KS-2",
            "cudaVersion": "12.8",
            "ssh": {
                "proxy": {
                    "host": "ssh.runpod.io",
                    "port": 22,
                    "username": f"{inst.id}-64411eb2",
                    "command": f"ssh {inst.id}-64411eb2@ssh.runpod.io",
                },
                "direct": direct,
            },
            "template": None,
            "cost": inst.price,
            "locked": False,
            "globalNetworking": {"enabled": False},
            "runtime": runtime,
            "createdAt": _iso(inst.created_at),
            "startedAt": _iso(inst.created_at + 30) if running else None,
        }

    def _op_createPod(self, req: FakeRequest, auth: str) -> tuple[int, Any]:
        body = req.body or {}
        if ("gpu" in body) == ("cpu" in body):
            return 400, {"title": "Bad Request", "status": 400, "detail": "exactly one of gpu or cpu"}
        gpu = next((g for g in self.runpod_catalog if g["id"] == body["gpu"]["id"]), None)
        if gpu is None:
            return 400, {"title": "Bad Request", "status": 400, "detail": f"unknown GPU type {body['gpu']['id']}"}
        if gpu["id"] in self.runpod_no_capacity:
            detail = "There are no longer any instances available with the requested specifications."
            return 400, {"title": "Bad Request", "status": 400, "detail": detail}
        public_key = (body.get("env") or {}).get("PUBLIC_KEY")
        inst = self._new_instance("runpod", body["name"], body, public_key=public_key)
        inst.gpu, inst.gpu_count = gpu["id"], int(body["gpu"].get("count", 1))
        cloud = str(body.get("cloud", "SECURE")).lower()
        inst.price = round(float(gpu[cloud]) * inst.gpu_count, 4)
        return 201, self._pod(inst)

    def _live_pod(self, pod_id: str) -> FakeInstance | None:
        inst = self.instances["runpod"].get(pod_id)
        return inst if inst is not None and not inst.deleted else None

    def _op_getPod(self, req: FakeRequest, auth: str) -> tuple[int, Any]:
        inst = self._live_pod(req.path_params["id"])
        if inst is None:
            return 404, {"title": "Not Found", "status": 404, "detail": "pod not found"}
        inst.gets += 1
        return 200, self._pod(inst)

    def _op_listPods(self, req: FakeRequest, auth: str) -> tuple[int, Any]:
        return 200, {"pods": [self._pod(i) for i in self.instances["runpod"].values() if not i.deleted]}

    def _op_deletePod(self, req: FakeRequest, auth: str) -> tuple[int, Any]:
        known = self.instances["runpod"].get(req.path_params["id"])
        if known is not None:
            known.terminate_calls += 1
        if known is None or known.deleted:
            return 404, {"title": "Not Found", "status": 404, "detail": "pod not found"}
        known.deleted = True
        known.deleted_with = "account" if auth == "account" else "instance"
        return 204, None

    # --- Vast.ai ---

    def _offer(self, offer: dict[str, Any]) -> dict[str, Any]:
        full = {
            "ask_contract_id": offer["id"],
            "verified": True,
            "verification": "verified",
            "rentable": True,
            "rented": False,
            "cuda_max_good": 12.8,
            "disk_space": 500.0,
            "inet_down": 900.0,
            "inet_up": 800.0,
            "public_ipaddr": self.ssh.host,
            "reliability2": offer.get("reliability"),
        }
        full.update(offer)
        full["gpu_total_ram"] = full["gpu_ram"] * full["num_gpus"]
        return full

    def _op_searchOffers(self, req: FakeRequest, auth: str) -> tuple[int, Any]:
        query = dict(req.body or {})
        special = {k: query.pop(k, None) for k in ("limit", "type", "order", "allocated_storage")}
        query.setdefault("verified", {"eq": True})
        query.setdefault("rentable", {"eq": True})
        offers = [o for o in map(self._offer, self.vast_offers) if _filters_pass(o, query)]
        for column, direction in reversed(special["order"] or []):
            offers.sort(key=lambda o, c=column: (o.get(c) is None, o.get(c) or 0), reverse=direction == "desc")
        if special["limit"]:
            offers = offers[: int(special["limit"])]
        return 200, {"offers": offers}

    def _op_getSshKeysUser(self, req: FakeRequest, auth: str) -> tuple[int, Any]:
        if not self.vast_ssh_keys:
            return 404, {"success": False, "error": "not_found", "msg": "No SSH keys found for the user."}
        return 200, self.vast_ssh_keys

    def _op_createSshKey(self, req: FakeRequest, auth: str) -> tuple[int, Any]:
        key = str((req.body or {}).get("ssh_key") or "").strip()
        if not key:
            return 400, {"success": False, "error": "no_ssh_key", "msg": "No ssh key provided"}
        record = {"id": len(self.vast_ssh_keys) + 1, "user_id": 7, "key": key, "created_at": _iso(time.time()),
                  "deleted_at": None}  # fmt: skip
        self.vast_ssh_keys.append(record)
        answer = {k: v for k, v in record.items() if k != "key"}
        return 200, {"success": True, "key": {**answer, "public_key": key}}

    def _op_createInstance(self, req: FakeRequest, auth: str) -> tuple[int, Any]:
        ask = int(req.path_params["id"])
        offer = next((o for o in self.vast_offers if o["id"] == ask), None)
        if offer is None:
            msg = f"error 404/3603: no_such_ask Instance type by id {ask} is not available."
            return 404, {"success": False, "error": "invalid_args", "msg": msg, "ask_id": ask}
        body = req.body or {}
        keys = "\n".join(k["key"] for k in self.vast_ssh_keys)
        inst = self._new_instance("vastai", str(body.get("label") or ""), body, public_key=keys or None)
        inst.gpu, inst.gpu_count, inst.price = offer["gpu_name"], offer["num_gpus"], offer["dph_total"]
        return 200, {"success": True, "new_contract": int(inst.id)}

    def _vast_instance(self, inst: FakeInstance) -> dict[str, Any]:
        running = inst.running
        status = "running" if running else (None if inst.gets == 0 else "loading")
        tokens = shlex.split(str(inst.body.get("env") or ""))
        env_pairs = [list(v.split("=", 1)) for f, v in itertools.pairwise(tokens) if f == "-e" and "=" in v]
        answer: dict[str, Any] = {
            "id": int(inst.id),
            "actual_status": status,
            "intended_status": "running",
            "cur_state": "running",
            "next_state": "running",
            "label": inst.label or None,
            "image_uuid": inst.body.get("image", "vastai/base-image"),
            "image_runtype": inst.body.get("runtype", "ssh"),
            "extra_env": env_pairs,
            "onstart": inst.body.get("onstart", ""),
            "status_msg": "success, running" if running else "Pulling image",
            "public_ipaddr": self.ssh.host,
            "ssh_host": "ssh5.vast.ai",
            "ssh_port": 10600,
            "machine_id": 12,
            "start_date": inst.created_at,
            "gpu_name": inst.gpu,
            "num_gpus": inst.gpu_count,
            "dph_total": inst.price,
            "ports": {"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": str(self.ssh.port)}]} if running else None,
        }
        return answer

    def _live_vast(self, instance_id: str) -> FakeInstance | None:
        inst = self.instances["vastai"].get(instance_id)
        return inst if inst is not None and not inst.deleted else None

    def _op_showInstance(self, req: FakeRequest, auth: str) -> tuple[int, Any]:
        inst = self._live_vast(req.path_params["id"])
        if inst is None:
            return 200, {"instances": None}
        inst.gets += 1
        return 200, {"instances": self._vast_instance(inst)}

    def _op_showInstances(self, req: FakeRequest, auth: str) -> tuple[int, Any]:
        limit = int(req.query.get("limit", ["25"])[0])
        limit = 5 if limit <= 0 else limit
        filters = json.loads(req.query.get("select_filters", ["{}"])[0])
        order = json.loads(req.query.get("order_by", ['[{"col":"id","dir":"asc"}]'])[0])
        rows = [self._vast_instance(i) for i in self.instances["vastai"].values() if not i.deleted]
        rows = [r for r in rows if _filters_pass(r, filters)]
        rows.sort(key=lambda r: r["id"], reverse=bool(order) and order[0].get("dir") == "desc")
        after = req.query.get("after_token", [None])[0]
        if after:
            try:
                last = int(json.loads(base64.b64decode(after))["values"]["id"])
            except (ValueError, KeyError, TypeError):
                return 400, {"success": False, "error": "invalid_args", "msg": "invalid after_token"}
            rows_after = [r for r in rows if r["id"] > last]
        else:
            rows_after = rows
        page = rows_after[:limit]
        more = len(rows_after) > limit
        token = base64.b64encode(json.dumps({"values": {"id": page[-1]["id"]}}).encode()).decode() if more else None
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["label"] or ""] = counts.get(r["label"] or "", 0) + 1
        return 200, {
            "success": True,
            "instances_found": len(page),
            "total_instances": len(rows),
            "label_counts": counts,
            "next_token": token,
            "instances": page,
        }

    def _op_destroyInstance(self, req: FakeRequest, auth: str) -> tuple[int, Any]:
        known = self.instances["vastai"].get(req.path_params["id"])
        if known is not None:
            known.terminate_calls += 1
        if known is None or known.deleted:
            return 404, {"success": False, "error": "not_found", "msg": "Instance not found"}
        known.deleted = True
        known.deleted_with = "account" if auth == "account" else "instance"
        return 200, {"success": True, "msg": "Instance destroyed successfully"}


# --- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture
def fake_cloud_factory(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., FakeCloud]]:
    """`make(**options) -> FakeCloud`: a started fake whose env() is set for this test; at teardown
    it is stopped and `check()`ed (no request may have broken the OpenAPI files)."""
    made: list[FakeCloud] = []

    def make(**options: Any) -> FakeCloud:
        fake = FakeCloud(tmp_path_factory.mktemp("fakecloud"), **options).start()
        made.append(fake)
        for key, value in fake.env().items():
            monkeypatch.setenv(key, value)
        return fake

    yield make
    for fake in made:
        fake.stop()
    for fake in made:
        fake.check()


@pytest.fixture
def fake_cloud(fake_cloud_factory: Callable[..., FakeCloud]) -> FakeCloud:
    """A started fake with default options (instances run after two reads)."""
    return fake_cloud_factory()
