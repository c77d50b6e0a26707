"""The cloud instance ledger: every machine lorabuild rents, from before it exists until the
provider confirms it is gone.

Owns the `instances` list of grimoire/studio.json (studio.md is rendered beside it) and the rules
that make a forgotten instance impossible:

- write-ahead: `record_intent` writes the entry (state CREATING, a label unique to this grimoire)
  before the create call; `record_created` adds the provider's id right after; every state change
  is recorded with the cost so far (price × time in billable states);
- TERMINATED only on the provider's word: `mark_terminated` and `teardown` ask the provider and
  write TERMINATED only when it no longer has the instance;
- `teardown` deletes with retries and exponential backoff, then confirms; it is idempotent, so the
  pipeline's `finally`, a signal handler and `lorabuild cloud down` may all call it;
- `reconcile` compares the ledger with what each provider says: an entry whose create call may
  have happened without its id being recorded is found by its label, an instance with this
  grimoire's label but no entry is adopted, and what the provider no longer has becomes
  TERMINATED;
- `running_warning` is the cheap line every command prints while anything may still cost money.

Every read-modify-write of studio.json holds `studio.studio_lock`; no provider call is made while
holding it. Nothing here writes or logs an API key (`credentials.redact` guards the messages).
Per grimoire it also keeps the SSH key pair lorabuild logs in to instances with.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import secrets
import socket
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lorabuild import cloud
from lorabuild.cloud import LABEL_PREFIX, PROVIDERS, InstanceState, LaunchRequest, Offer, ProviderError
from lorabuild.cloud.credentials import PROVIDER_NAMES, api_key, has_api_key, redact
from lorabuild.procs import pid_alive
from lorabuild.studio import load_studio, studio_lock, update_studio

log = logging.getLogger(__name__)

STATES = ("CREATING", "PROVISIONING", "RUNNING", "STOPPED", "ERROR", "TERMINATING", "TERMINATED")
# Conservative: a machine that exists and is not stopped is counted as billing (RunPod bills from
# creation; Vast.ai not while loading — the estimate errs on the side of the artist's wallet).
BILLABLE = frozenset({"PROVISIONING", "RUNNING", "ERROR", "TERMINATING"})
DEFAULT_ATTEMPTS = 6
DEFAULT_BACKOFF_S = 2.0
# A create call whose process died (or this process) and whose label the provider does not know
# after this long never made an instance. A live creator gets CREATE_GRACE_S.
CREATE_SETTLE_S = 60.0
CREATE_GRACE_S = 1800.0
DEADLINE_GRACE_S = 600.0  # past its deadline plus this, an instance that did not delete itself is deleted
KEY_DIR = Path(".lorabuild") / "cloud"


def _now() -> float:
    return time.time()


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _ts(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _env_seconds(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name, ""))
    except ValueError:
        return default
    return value if value >= 0 else default


def settle_s() -> float:
    return _env_seconds("LORABUILD_CREATE_SETTLE_S", CREATE_SETTLE_S)


def default_backoff_s() -> float:
    return _env_seconds("LORABUILD_CLOUD_BACKOFF", DEFAULT_BACKOFF_S)


def provider_name(provider: str) -> str:
    return PROVIDER_NAMES.get(provider, provider)


@dataclass(frozen=True)
class Entry:
    """One instance as the ledger knows it (a read-only view of its studio.json record)."""

    entry: str  # the ledger's own id, known before the provider's
    provider: str
    label: str
    run: str | None
    gpu: str
    price_per_hour: float
    id: str | None  # the provider's id; None until the create call answered
    state: str
    created: str
    state_since: str
    deadline: str | None = None
    cost_usd: float = 0.0  # accumulated up to state_since
    pid: int | None = None
    host: str | None = None
    note: str | None = None
    problem: str | None = None
    ssh: dict[str, Any] | None = None
    history: tuple[dict[str, Any], ...] = field(default=(), compare=False, repr=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Entry:
        return cls(
            entry=str(d.get("entry")),
            provider=str(d.get("provider")),
            label=str(d.get("label") or ""),
            run=d.get("run"),
            gpu=str(d.get("gpu") or "?"),
            price_per_hour=float(d.get("price_per_hour") or 0.0),
            id=str(d["id"]) if d.get("id") not in (None, "") else None,
            state=str(d.get("state") or "CREATING"),
            created=str(d.get("created") or ""),
            state_since=str(d.get("state_since") or d.get("created") or ""),
            deadline=d.get("deadline"),
            cost_usd=float(d.get("cost_usd") or 0.0),
            pid=d.get("pid"),
            host=d.get("host"),
            note=d.get("note"),
            problem=d.get("problem"),
            ssh=d.get("ssh"),
            history=tuple(d.get("history") or ()),
        )

    @property
    def active(self) -> bool:
        return self.state != "TERMINATED"

    def cost_so_far(self, now: float | None = None) -> float:
        """USD spent so far: the cost up to the last state change plus the time since, if billing."""
        cost = self.cost_usd
        since = _ts(self.state_since)
        if self.state in BILLABLE and since is not None:
            cost += self.price_per_hour * max(0.0, (now if now is not None else _now()) - since) / 3600
        return round(cost, 4)

    def describe(self) -> str:
        name = f"{provider_name(self.provider)} {self.id or '(being created)'}"
        return f"{name} ({self.gpu}, {self.state.lower()}, ${self.cost_so_far():.2f} so far)"


# --- reading and writing the ledger -----------------------------------------------------------------


def _entries(studio: dict[str, Any]) -> list[dict[str, Any]]:
    instances = studio.get("instances")
    if not isinstance(instances, list):
        instances = []
        studio["instances"] = instances
    return [i for i in instances if isinstance(i, dict)]


def load_entries(root: Path) -> list[Entry]:
    """Every entry, oldest first (reads studio.json only)."""
    return [Entry.from_dict(d) for d in _entries(load_studio(root))]


def active(root: Path) -> list[Entry]:
    """Entries not confirmed TERMINATED: instances that may exist and may cost money."""
    return [e for e in load_entries(root) if e.active]


def find(root: Path, ref: str) -> Entry | None:
    """The entry with this ledger id — or else provider id or label, a live entry first."""
    entries = load_entries(root)
    by_entry = [e for e in entries if e.entry == ref]
    others = sorted((e for e in entries if ref in (e.id, e.label)), key=lambda e: not e.active)
    return (by_entry + others)[0] if by_entry or others else None


def _ref(entry: str | Entry) -> str:
    return entry.entry if isinstance(entry, Entry) else entry


def _require(root: Path, entry: str | Entry) -> Entry:
    found = find(root, _ref(entry))
    if found is None:
        raise KeyError(f"the cloud ledger has no instance {_ref(entry)!r}; `lorabuild cloud ls` lists them")
    return found


def _refresh_costs(studio: dict[str, Any], now: float) -> None:
    for d in _entries(studio):
        d["cost_so_far"] = Entry.from_dict(d).cost_so_far(now)


def _change(root: Path, entry: str | Entry, change: Any) -> Entry:
    """Apply `change(record, now)` to one entry under the studio lock and return the result."""
    ref = _ref(entry)

    def apply(studio: dict[str, Any]) -> Entry:
        now = _now()
        for d in _entries(studio):
            if d.get("entry") == ref:
                change(d, now)
                _refresh_costs(studio, now)
                return Entry.from_dict(d)
        raise KeyError(f"the cloud ledger has no instance {ref!r}")

    result: Entry = update_studio(root, apply)
    return result


def _set_state(d: dict[str, Any], state: str, now: float, note: str | None = None) -> None:
    """Move a record to `state`, adding the cost of the time spent in the old one."""
    old = str(d.get("state") or "CREATING")
    if old == state:
        if note:
            d["note"] = note
        return
    since = _ts(d.get("state_since")) or now
    if old in BILLABLE:
        d["cost_usd"] = round(
            float(d.get("cost_usd") or 0.0) + float(d.get("price_per_hour") or 0.0) * max(0.0, now - since) / 3600, 6
        )
    d["state"] = state
    d["state_since"] = _iso(now)
    history = d.setdefault("history", [])
    history.append({"state": state, "at": _iso(now), **({"note": note} if note else {})})
    if note:
        d["note"] = note
    if state == "TERMINATED":
        d["problem"] = None
        d["ssh"] = None


def _deadline_text(deadline: float | str | datetime | None) -> str | None:
    if deadline is None:
        return None
    if isinstance(deadline, datetime):
        return _iso(deadline.timestamp())
    if isinstance(deadline, (int, float)):
        return _iso(float(deadline))
    return _iso(_ts(deadline) or 0) if _ts(deadline) is not None else str(deadline)


def grimoire_id(root: Path) -> str:
    """This grimoire's id (created once): its instances' labels carry it, so a sweep never
    touches another folder's instances."""
    studio = load_studio(root)
    if isinstance(studio.get("grimoire_id"), str):
        return str(studio["grimoire_id"])

    def ensure(s: dict[str, Any]) -> str:
        if not isinstance(s.get("grimoire_id"), str):
            s["grimoire_id"] = secrets.token_hex(4)
        return str(s["grimoire_id"])

    result: str = update_studio(root, ensure)
    return result


def label_prefix(root: Path) -> str:
    return f"{LABEL_PREFIX}{grimoire_id(root)}-"


def new_label(root: Path, run: str) -> str:
    """A label unique to one instance of one run: lorabuild-<grimoire>-<run>-<random>."""
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in run.lower())[:40] or "run"
    return f"{label_prefix(root)}{safe}-{secrets.token_hex(3)}"


def ssh_keypair(root: Path) -> tuple[Path, str]:
    """The private key file lorabuild logs in to this grimoire's instances with, and its public
    key (created once, mode 0600, never sent anywhere but to the provider as a public key)."""
    folder = root / KEY_DIR
    private = folder / "id_ed25519"
    public = folder / "id_ed25519.pub"
    with studio_lock(root):
        if not (private.exists() and public.exists()):
            from cryptography.hazmat.primitives import serialization
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

            folder.mkdir(parents=True, exist_ok=True)
            os.chmod(folder, 0o700)
            key = Ed25519PrivateKey.generate()
            pem = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            )
            pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            tmp = private.with_name(f".{private.name}.tmp-{os.getpid()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(pem)
            os.replace(tmp, private)
            public.write_text(f"{pub.decode('ascii')} lorabuild-{grimoire_id(root)}\n", encoding="utf-8")
    return private, public.read_text(encoding="utf-8").strip()


def known_hosts_file(root: Path, entry: Entry) -> Path:
    """Where the host key of this instance is pinned: one file per instance, since a later
    instance may answer on the same address with a key of its own."""
    name = f"{entry.provider}-{entry.id}"
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,80}", name):  # provider ids are not ours to trust as paths
        name = f"{entry.provider}-{hashlib.sha256(str(entry.id).encode()).hexdigest()[:16]}"
    return root / KEY_DIR / "known_hosts" / name


def record_intent(
    root: Path,
    *,
    provider: str,
    label: str,
    run: str | None,
    gpu: str,
    price_per_hour: float,
    deadline: float | str | datetime | None,
) -> str:
    """Write the entry BEFORE the create call (state CREATING); its ledger id."""
    if provider not in PROVIDERS:
        raise ValueError(f"unknown cloud provider {provider!r}")
    entry_id = "c" + secrets.token_hex(4)

    def add(studio: dict[str, Any]) -> str:
        now = _now()
        _entries(studio)
        studio["instances"].append(
            {
                "entry": entry_id,
                "provider": provider,
                "label": label,
                "run": run,
                "gpu": gpu,
                "price_per_hour": round(float(price_per_hour), 4),
                "id": None,
                "state": "CREATING",
                "created": _iso(now),
                "state_since": _iso(now),
                "deadline": _deadline_text(deadline),
                "cost_usd": 0.0,
                "cost_so_far": 0.0,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "note": None,
                "problem": None,
                "ssh": None,
                "history": [{"state": "CREATING", "at": _iso(now)}],
            }
        )
        return entry_id

    result: str = update_studio(root, add)
    return result


def record_created(root: Path, entry: str | Entry, instance_id: str) -> Entry:
    """Record the provider's id right after the create call answered (state PROVISIONING)."""

    def change(d: dict[str, Any], now: float) -> None:
        d["id"] = str(instance_id)
        if d.get("state") == "CREATING":
            _set_state(d, "PROVISIONING", now)

    return _change(root, entry, change)


def record_state(
    root: Path,
    entry: str | Entry,
    state: str,
    *,
    price_per_hour: float | None = None,
    ssh: dict[str, Any] | None = None,
    note: str | None = None,
    problem: str | None = None,
) -> Entry:
    """Record a state change ("running", "RUNNING", …) and the cost up to it. TERMINATED is
    refused here: only the provider's confirmation writes it (`mark_terminated`, `teardown`)."""
    wanted = state.upper()
    if wanted not in STATES:
        raise ValueError(f"unknown instance state {state!r}")
    if wanted == "TERMINATED":
        raise ValueError("TERMINATED is recorded only after the provider confirmed it: use mark_terminated")

    def change(d: dict[str, Any], now: float) -> None:
        _set_state(d, wanted, now, note)
        if price_per_hour is not None and price_per_hour > 0:
            d["price_per_hour"] = round(float(price_per_hour), 4)
        if ssh is not None:
            d["ssh"] = ssh
        if problem is not None:
            d["problem"] = redact(problem) or None

    return _change(root, entry, change)


def _record_problem(root: Path, entry: str | Entry, problem: str) -> None:
    with contextlib.suppress(KeyError):
        _change(root, entry, lambda d, now: d.__setitem__("problem", redact(problem)))


def _write_terminated(root: Path, entry: str | Entry, note: str) -> Entry:
    return _change(root, entry, lambda d, now: _set_state(d, "TERMINATED", now, note))


def _gone(state: InstanceState | None) -> bool:
    return state is None or state.status == "terminated"


def _create_settled(e: Entry, now: float | None = None) -> bool:
    """Whether a CREATING entry's create call can no longer produce an instance: its process is
    gone (or is this one, which is not creating now) and the provider had time to show it."""
    age = (now if now is not None else _now()) - (_ts(e.created) or 0.0)
    if age >= CREATE_GRACE_S:
        return True
    if e.host != socket.gethostname():
        return False  # another machine's process: only the grace period can tell
    creator_gone = e.pid == os.getpid() or not pid_alive(e.pid)
    return creator_gone and age >= settle_s()


def _label_matches(provider: str, label: str) -> list[InstanceState] | None:
    """Live instances with exactly this label, or None when the provider could not be asked."""
    try:
        found = cloud.list_by_label(provider, label)
    except ProviderError as exc:
        log.warning("%s", redact(str(exc)))
        return None
    return [s for s in found if s.label == label and not _gone(s)]


def mark_terminated(root: Path, entry: str | Entry, *, note: str = "the provider confirmed it is gone") -> bool:
    """Write TERMINATED if, and only if, the provider confirms it no longer has the instance
    (get() is None or says terminated; without an id: no instance carries the label). True if
    the entry is TERMINATED now."""
    e = _require(root, entry)
    if not e.active:
        return True
    if e.id is None:
        matches = _label_matches(e.provider, e.label)
        if matches is None or matches:
            return False
        _write_terminated(root, e, note)
        return True
    try:
        state = cloud.get(e.provider, e.id)
    except ProviderError as exc:
        _record_problem(root, e, str(exc))
        return False
    if not _gone(state):
        return False
    _write_terminated(root, e, note)
    return True


# --- creating ---------------------------------------------------------------------------------------


def _gpu_text(offer: Offer) -> str:
    return f"{offer.gpu_count}× {offer.gpu}" if offer.gpu_count > 1 else offer.gpu


def launch(
    root: Path, offer: Offer, request: LaunchRequest, *, run: str | None, deadline: float | str | datetime | None
) -> Entry:
    """Record the intent, create the instance, record its id: the write-ahead sequence in one
    call. When the create call fails in a way that may still have made an instance (a timeout, a
    lost answer, a 5xx), the instance is looked for by its label and, if found, used; otherwise
    the entry stays CREATING for `reconcile`/`teardown` and the error is raised. A plain refusal
    (no capacity, a bad request) marks the entry TERMINATED once no instance carries the label."""
    api_key(offer.provider)  # a missing key stops here, before anything is recorded or rented
    ref = record_intent(
        root,
        provider=offer.provider,
        label=request.label,
        run=run,
        gpu=_gpu_text(offer),
        price_per_hour=offer.price_per_hour,
        deadline=deadline,
    )
    try:
        instance_id = cloud.create(offer.provider, offer, request)
    except ProviderError as exc:
        matches = _label_matches(offer.provider, request.label)
        if matches:
            entry = record_created(root, ref, matches[0].id)
            for extra in matches[1:]:
                _adopt(root, extra, "a second instance with the same label (a create call was repeated)")
            return entry
        _record_problem(root, ref, str(exc))
        if matches is not None and not exc.retryable:
            _write_terminated(root, ref, f"never created: {redact(str(exc))}")
        raise
    return record_created(root, ref, instance_id)


# --- teardown ---------------------------------------------------------------------------------------


def _sleep(seconds: float) -> None:
    if seconds > 0:
        time.sleep(seconds)


def teardown(root: Path, entry: str | Entry, *, attempts: int = DEFAULT_ATTEMPTS, backoff: float | None = None) -> bool:
    """Delete the instance for good and confirm it with the provider; True once the ledger says
    TERMINATED. Retries timeouts, 429 and 5xx with exponential backoff (backoff, 2×, 4×, …);
    idempotent (an instance already gone is a success). On failure the entry keeps its state and
    a `problem` saying why, and False is returned."""
    wait = default_backoff_s() if backoff is None else backoff
    attempts = max(1, attempts)
    e = _require(root, entry)
    if not e.active:
        return True
    name = provider_name(e.provider)
    if e.id is None:
        # the create call may have made an instance whose id was never recorded: find it by label
        matches: list[InstanceState] | None = None
        for attempt in range(attempts):
            matches = _label_matches(e.provider, e.label)
            if matches:
                break
            if matches is not None and _create_settled(e):
                _write_terminated(root, e, "never created: the provider has no instance with its label")
                return True
            _sleep(wait * 2**attempt)
        if not matches:
            _record_problem(
                root,
                e,
                f"lorabuild could not yet tell whether {name} made instance {e.label}; "
                "`lorabuild cloud down --all` checks again",
            )
            return False
        e = record_created(root, e, matches[0].id)
        for extra in matches[1:]:
            extra_entry = _adopt(root, extra, "a second instance with the same label (a create call was repeated)")
            teardown(root, extra_entry, attempts=attempts, backoff=backoff)
    e = record_state(root, e, "TERMINATING")
    instance_id = e.id
    assert instance_id is not None
    if not _terminate_with_retries(root, e, attempts, wait):
        return False
    for attempt in range(attempts):
        try:
            state = cloud.get(e.provider, instance_id)
        except ProviderError as exc:
            if not exc.retryable:
                _record_problem(root, e, str(exc))
                return False
            log.info("confirming the deletion of %s %s: %s", name, e.id, redact(str(exc)))
            _sleep(wait * 2**attempt)
            continue
        if _gone(state):
            _write_terminated(root, e, f"deleted; {name} confirmed it is gone")
            return True
        # still listed: deletion takes a moment at some providers; asking again does no harm
        _sleep(wait * 2**attempt)
        with contextlib.suppress(ProviderError):
            cloud.terminate(e.provider, instance_id)
    _record_problem(
        root, e, f"{name} still shows instance {e.id} after lorabuild deleted it; it checks again next time"
    )
    return False


def _terminate_with_retries(root: Path, e: Entry, attempts: int, wait: float) -> bool:
    assert e.id is not None
    for attempt in range(attempts):
        try:
            cloud.terminate(e.provider, e.id)
            return True
        except ProviderError as exc:
            message = redact(str(exc))
            if not exc.retryable or attempt == attempts - 1:
                _record_problem(root, e, message)
                log.warning("deleting %s %s failed: %s", provider_name(e.provider), e.id, message)
                return False
            delay = wait * 2**attempt
            log.info(
                "deleting %s %s failed (%s); trying again in %g s", provider_name(e.provider), e.id, message, delay
            )
            _sleep(delay)
    return False


# --- reconciling ------------------------------------------------------------------------------------


@dataclass
class ReconcileReport:
    """What `reconcile` found and did, in ledger entry ids (problems in plain words)."""

    checked: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    found_by_label: list[str] = field(default_factory=list)  # create answered nothing; the label found it
    terminated: list[str] = field(default_factory=list)  # the provider no longer has them
    never_created: list[str] = field(default_factory=list)
    still_creating: list[str] = field(default_factory=list)
    adopted: list[str] = field(default_factory=list)
    overdue: list[str] = field(default_factory=list)  # past their deadline: deleted (or tried)
    foreign: list[str] = field(default_factory=list)  # lorabuild instances of other grimoires
    problems: list[str] = field(default_factory=list)

    def describe(self) -> list[str]:
        lines = []
        if self.found_by_label:
            lines.append(f"Found {len(self.found_by_label)} instance(s) whose creation was interrupted: recorded.")
        if self.adopted:
            lines.append(f"Found {len(self.adopted)} instance(s) of this folder that the ledger did not list: added.")
        if self.terminated:
            lines.append(f"{len(self.terminated)} instance(s) are gone at the provider: marked TERMINATED.")
        if self.never_created:
            lines.append(f"{len(self.never_created)} interrupted creation(s) made no instance: marked TERMINATED.")
        if self.overdue:
            lines.append(f"{len(self.overdue)} instance(s) outlived their deadline and were deleted.")
        if self.foreign:
            lines.append(
                f"{len(self.foreign)} other lorabuild instance(s) belong to another project folder: "
                + ", ".join(self.foreign)
                + " — run `lorabuild cloud ls` there."
            )
        lines.extend(self.problems)
        return lines

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) for k, v in self.__dict__.items()}


def _ssh_dict(state: InstanceState) -> dict[str, Any] | None:
    return {"host": state.ssh.host, "port": state.ssh.port, "user": state.ssh.user} if state.ssh else None


def _apply_state(root: Path, e: Entry, state: InstanceState, note: str | None = None) -> Entry:
    price = state.cost_per_hour if state.cost_per_hour and state.cost_per_hour > 0 else None
    return record_state(root, e, state.status.upper(), price_per_hour=price, ssh=_ssh_dict(state), note=note)


def _adopt(root: Path, state: InstanceState, why: str) -> Entry:
    """Add (or revive) the entry for an instance the provider has and the ledger does not count
    as active. Checked again under the lock, so a concurrent create is never entered twice."""
    status = state.status.upper() if state.status.upper() in STATES else "RUNNING"
    note = f"adopted: {why}"

    def adopt(studio: dict[str, Any]) -> Entry:
        now = _now()
        records = _entries(studio)
        for d in records:
            same_id = d.get("provider") == state.provider and str(d.get("id")) == state.id
            waiting = (
                d.get("provider") == state.provider and d.get("id") in (None, "") and d.get("label") == state.label
            )
            if same_id or waiting:
                d["id"] = state.id
                _set_state(d, status, now, note if d.get("state") == "TERMINATED" else None)
                _refresh_costs(studio, now)
                return Entry.from_dict(d)
        record = {
            "entry": "c" + secrets.token_hex(4),
            "provider": state.provider,
            "label": state.label or "",
            "run": None,
            "gpu": str(state.raw.get("gpu_name") or (state.raw.get("gpu") or {}).get("id") or "?"),
            "price_per_hour": round(state.cost_per_hour or 0.0, 4),
            "id": state.id,
            "state": status,
            "created": _iso(now),
            "state_since": _iso(now),
            "deadline": None,
            "cost_usd": 0.0,
            "pid": None,
            "host": None,
            "note": note,
            "problem": None,
            "ssh": _ssh_dict(state),
            "history": [{"state": status, "at": _iso(now), "note": note}],
        }
        studio["instances"].append(record)
        _refresh_costs(studio, now)
        return Entry.from_dict(record)

    result: Entry = update_studio(root, adopt)
    return result


def _providers_to_check(root: Path, entries: list[Entry]) -> list[str]:
    used = {e.provider for e in entries}
    return [p for p in PROVIDERS if p in used or has_api_key(p)]


def reconcile(root: Path, *, providers: list[str] | None = None, enforce_deadlines: bool = True) -> ReconcileReport:
    """Make the ledger agree with the providers (see the module docstring). Entries past their
    deadline by DEADLINE_GRACE_S are deleted when `enforce_deadlines`."""
    report = ReconcileReport()
    entries = load_entries(root)
    mine_prefix = label_prefix(root)
    for provider in providers if providers is not None else _providers_to_check(root, entries):
        name = provider_name(provider)
        listing: list[InstanceState] | None
        try:
            listing = [s for s in cloud.list_by_label(provider, LABEL_PREFIX) if not _gone(s)]
        except ProviderError as exc:
            report.problems.append(f"Could not list {name} instances: {redact(str(exc))}")
            listing = None
        mine = {s.id: s for s in listing or [] if (s.label or "").startswith(mine_prefix)}
        report.foreign.extend(
            f"{name} {s.id} ({s.label})" for s in listing or [] if not (s.label or "").startswith(mine_prefix)
        )
        claimed: set[str] = set()
        for e in (x for x in load_entries(root) if x.provider == provider and x.active):
            report.checked.append(e.entry)
            if e.id is None:
                if listing is None:
                    report.still_creating.append(e.entry)
                    continue
                matches = [s for s in mine.values() if s.label == e.label and s.id not in claimed]
                if matches:
                    claimed.add(matches[0].id)
                    _apply_state(root, record_created(root, e, matches[0].id), matches[0], "found by its label")
                    report.found_by_label.append(e.entry)
                elif _create_settled(e):
                    _write_terminated(root, e, "never created: the provider has no instance with its label")
                    report.never_created.append(e.entry)
                else:
                    report.still_creating.append(e.entry)
                continue
            claimed.add(e.id)
            state: InstanceState | None = mine.get(e.id)
            if state is None:
                # not in the listing (relabelled, or the listing failed): ask for it directly
                try:
                    state = cloud.get(provider, e.id)
                except ProviderError as exc:
                    report.problems.append(f"Could not check {name} instance {e.id}: {redact(str(exc))}")
                    continue
            if _gone(state):
                _write_terminated(root, e, f"{name} no longer has it")
                report.terminated.append(e.entry)
            else:
                assert state is not None
                _apply_state(root, e, state)
                report.updated.append(e.entry)
        for state in mine.values():
            if state.id not in claimed:
                adopted = _adopt(root, state, "it carries this folder's label but the ledger had no live entry")
                report.adopted.append(adopted.entry)
    if enforce_deadlines:
        now = _now()
        for e in active(root):
            deadline = _ts(e.deadline)
            if e.id is not None and deadline is not None and now > deadline + DEADLINE_GRACE_S:
                report.overdue.append(e.entry)
                if not teardown(root, e):
                    report.problems.append(f"{e.describe()} is past its deadline and could not be deleted yet.")
    return report


# --- what the CLI shows -------------------------------------------------------------------------------


def _row(e: Entry, now: float) -> dict[str, Any]:
    return {
        "entry": e.entry,
        "provider": e.provider,
        "id": e.id,
        "label": e.label,
        "run": e.run,
        "gpu": e.gpu,
        "state": e.state,
        "price_per_hour": e.price_per_hour,
        "cost_so_far": e.cost_so_far(now),
        "created": e.created,
        "state_since": e.state_since,
        "deadline": e.deadline,
        "ssh": e.ssh,
        "note": e.note,
        "problem": e.problem,
    }


def list_for_cli(root: Path, *, refresh: bool = True) -> dict[str, Any]:
    """What `lorabuild cloud ls [--json]` shows: every entry (live ones first), after asking the
    providers when `refresh` (their problems are listed, the ledger is shown regardless)."""
    problems: list[str] = []
    notes: list[str] = []
    if refresh:
        try:
            report = reconcile(root)
        except Exception as exc:  # the listing must still show what the ledger knows
            problems.append(f"Could not ask the providers: {redact(str(exc))}")
        else:
            problems.extend(report.problems)
            notes.extend(line for line in report.describe() if line not in report.problems)
    now = _now()
    entries = load_entries(root)
    rows = [_row(e, now) for e in sorted(entries, key=lambda e: (not e.active, e.created))]
    live = [r for r in rows if r["state"] != "TERMINATED"]
    return {
        "instances": rows,
        "running": len(live),
        "cost_so_far_running": round(sum(r["cost_so_far"] for r in live), 4),
        "notes": notes,
        "problems": problems,
    }


def format_listing(listing: dict[str, Any]) -> str:
    """The text form of `list_for_cli`'s answer."""
    lines: list[str] = list(listing.get("notes") or [])
    rows = listing.get("instances") or []
    if not rows:
        lines.append("No cloud instances in this folder's ledger.")
    for r in rows:
        name = f"{provider_name(r['provider'])} {r['id'] or '(being created)'}"
        where = f", run {r['run']}" if r.get("run") else ""
        lines.append(
            f"{r['entry']}  {name}: {r['gpu']}{where} — {r['state']}, ${r['price_per_hour']:.2f}/h, "
            f"${r['cost_so_far']:.2f} so far"
        )
        if r.get("problem") and r["state"] != "TERMINATED":
            lines.append(f"    problem: {r['problem']}")
    if listing.get("running"):
        lines.append(
            f"{listing['running']} instance(s) may still cost money; `lorabuild cloud down --all` deletes them."
        )
    lines.extend(listing.get("problems") or [])
    return "\n".join(lines)


@dataclass
class DownReport:
    """What `down` did: entry id → whether the provider confirmed it gone."""

    results: dict[str, bool] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    descriptions: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems and all(self.results.values())

    def describe(self) -> list[str]:
        lines = []
        for ref, done in self.results.items():
            what = self.descriptions.get(ref, ref)
            lines.append(f"{what}: deleted, the provider confirmed it." if done else f"{what}: NOT deleted yet.")
        if not self.results and not self.problems:
            lines.append("No cloud instance is running for this folder.")
        lines.extend(self.problems)
        return lines


def down(root: Path, id_or_all: str, *, attempts: int = DEFAULT_ATTEMPTS, backoff: float | None = None) -> DownReport:
    """`lorabuild cloud down ID|--all`: reconcile with the providers, then tear down the entry
    named by ledger id, provider id or label — or every live one ("--all" or "all")."""
    report = DownReport()
    try:
        rec = reconcile(root, enforce_deadlines=False)
        report.problems.extend(rec.problems)
    except ProviderError as exc:
        report.problems.append(redact(str(exc)))
    if id_or_all in ("--all", "all"):
        targets = active(root)
    else:
        found = find(root, id_or_all)
        if found is None:
            report.problems.append(f"The cloud ledger has no instance {id_or_all!r}; `lorabuild cloud ls` lists them.")
            return report
        targets = [found] if found.active else []
    for e in targets:
        done = teardown(root, e, attempts=attempts, backoff=backoff)
        report.results[e.entry] = done
        after = find(root, e.entry) or e
        report.descriptions[e.entry] = f"{provider_name(e.provider)} {after.id or e.label}"
        if not done and after.problem:
            report.problems.append(f"{provider_name(e.provider)} {after.id or e.label}: {after.problem}")
    # problems from the reconcile that a successful teardown made moot are kept: they are facts
    return report


def running_warning(root: Path) -> str | None:
    """One plain line naming the instances that may still cost money, or None. Reads studio.json
    only — no network — so every command can afford it."""
    try:
        live = active(root)
    except (OSError, ValueError):
        return None
    if not live:
        return None
    total = sum(e.cost_so_far() for e in live)
    names = "; ".join(e.describe() for e in live)
    many = len(live) > 1
    return (
        f"{len(live)} cloud instance{'s' if many else ''} may still be running and costing money "
        f"(${total:.2f} so far): {names}. See {'them' if many else 'it'} with `lorabuild cloud ls`; "
        f"delete {'them' if many else 'it'} with `lorabuild cloud down --all`."
    )
