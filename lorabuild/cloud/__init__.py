"""The cloud provider interface: one module per provider, the same small set of functions.

Each provider module (`lorabuild/cloud/providers/<name>.py`) provides exactly the functions
below, minus the leading `provider` argument, thin and versioned over the provider's published
HTTP API (httpx; no vendor SDK). Base URLs can be overridden (`LORABUILD_RUNPOD_API_URL`,
`LORABUILD_VAST_API_URL`), which is how the tests point them at a local fake server. API keys
come from the environment or the provider's usual config file and are never written to anything
lorabuild writes or logs (`ProviderError` messages never contain them).

Lifecycle lorabuild follows (the ledger, `lorabuild.cloud.ledger`, records each step):
search_offers → create (after the ledger recorded the intent) → get until `running` with an
SSH endpoint → … → terminate (idempotent; confirmed by `get` before the ledger says TERMINATED).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

PROVIDERS: dict[str, str] = {
    "runpod": "lorabuild.cloud.providers.runpod",
    "vastai": "lorabuild.cloud.providers.vastai",
}
LABEL_PREFIX = "lorabuild-"  # every instance lorabuild creates is named/labelled with this prefix


class ProviderError(Exception):
    """A provider call that failed. `retryable`: a timeout, a 429 or a 5xx — worth trying again."""

    def __init__(self, message: str, *, retryable: bool = False, status: int | None = None):
        self.retryable = retryable
        self.status = status
        super().__init__(message)


class MissingCredentials(ProviderError):
    """No API key for the provider in the environment or its config file."""


@dataclass(frozen=True)
class GpuNeed:
    """What an instance must have (from the plan: Gate 2's memory need and the spec's hints)."""

    min_vram_gb: float
    gpu: str | None = None  # a catalogue name ("RTX 4090"); None: any GPU with enough memory
    gpu_count: int = 1
    max_price_per_hour: float | None = None
    min_reliability: float | None = None
    region: str | None = None
    disk_gb: int = 60


@dataclass(frozen=True)
class Offer:
    provider: str
    offer_id: str  # RunPod: the GPU type id; Vast.ai: the ask id
    gpu: str  # the GPU's name as the provider writes it
    gpu_count: int
    vram_gb: float  # per GPU
    price_per_hour: float  # for the whole instance, USD
    reliability: float | None = None
    location: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class LaunchRequest:
    label: str  # unique per job, starts with LABEL_PREFIX; the provider's name or label field
    image: str  # container image with sshd, Python 3 and CUDA
    disk_gb: int
    ssh_public_key: str  # the key lorabuild connects with (one per grimoire, see ledger)
    env: dict[str, str] = field(default_factory=dict)  # non-secret settings for the instance
    onstart: str = ""  # shell script run when the instance boots (the self-delete timer)


@dataclass(frozen=True)
class SshEndpoint:
    host: str
    port: int
    user: str


@dataclass(frozen=True)
class InstanceState:
    provider: str
    id: str
    label: str | None
    status: str  # "provisioning", "running", "stopped", "terminated" or "error"
    ssh: SshEndpoint | None  # a direct SSH endpoint once the instance can be reached
    cost_per_hour: float | None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


def _module(provider: str) -> ModuleType:
    try:
        return importlib.import_module(PROVIDERS[provider])
    except KeyError:
        raise ProviderError(f"lorabuild does not know the cloud provider {provider!r}") from None


def search_offers(provider: str, need: GpuNeed) -> list[Offer]:
    """Offers that satisfy `need`, cheapest first (live prices)."""
    offers: list[Offer] = _module(provider).search_offers(need)
    return offers


def create(provider: str, offer: Offer, request: LaunchRequest) -> str:
    """Rent `offer` as described by `request`; the new instance's id."""
    instance_id: str = _module(provider).create(offer, request)
    return instance_id


def get(provider: str, instance_id: str) -> InstanceState | None:
    """The instance's state now, or None when the provider no longer knows it (it is gone)."""
    state: InstanceState | None = _module(provider).get(instance_id)
    return state


def list_by_label(provider: str, prefix: str = LABEL_PREFIX) -> list[InstanceState]:
    """Every instance of this account whose name/label starts with `prefix` (all pages)."""
    found: list[InstanceState] = _module(provider).list_by_label(prefix)
    return found


def terminate(provider: str, instance_id: str) -> None:
    """Delete the instance for good (never just stop it: storage keeps billing). An instance that
    is already gone counts as terminated."""
    _module(provider).terminate(instance_id)


def self_delete_script(provider: str) -> str:
    """A POSIX shell snippet that, run on the instance, deletes that instance with the
    instance-scoped key the provider injects (never the account key). It reads
    `LORABUILD_API_URL` when set (the tests' fake server)."""
    script: str = _module(provider).self_delete_script()
    return script
