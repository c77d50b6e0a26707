"""One run's cloud instance: spin it up, say where to reach it, tear it down.

Owns the steps `lorabuild run` adds for `compute: runpod | vastai` (the pipeline makes them doit
tasks): `spinup` chooses the cheapest offer that fits Gate 2's memory need and the spec's limits,
shows its price and the cost estimate, asks, then rents it through the write-ahead ledger
(`lorabuild.cloud.ledger`) and waits until SSH answers; `instance_target` tells the gates where
the instance is; `teardown` deletes it, confirmed by the provider, when the pipeline stops for
any reason — unless a trained LoRA is still on it and not yet fetched, in which case it stays
up, protected by its self-delete timers, for the next run to fetch.

Self-delete (so a lost laptop cannot leak an instance): the instance deletes itself with the
provider's instance-scoped key when its deadline passes (a timer started at boot, and another
over SSH) and `PULL_GRACE_S` after training ends there.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from lorabuild import cloud
from lorabuild.cloud import GpuNeed, LaunchRequest, Offer, ProviderError, ledger
from lorabuild.cloud.credentials import MissingCredentials, redact, where_to_put_it
from lorabuild.gates import GateContext, GateFailed
from lorabuild.glossary import explain

if TYPE_CHECKING:
    from lorabuild.remote import RemoteHost, SshTarget

# Container images with CUDA, Python 3 and sshd that honour the provider's SSH key convention
# (override with `compute.image`).
DEFAULT_IMAGES = {
    "runpod": "runpod/pytorch:2.4.0-py3.11-cuda12.4.1-devel-ubuntu22.04",
    "vastai": "vastai/pytorch:latest",
}
PROVISIONING_HOURS = 10 / 60  # start-up and image download, billed, counted in the estimate
MIN_DEADLINE_HOURS = 2.0
PULL_GRACE_S = 3600.0  # after training ends there, the instance waits this long to be fetched from
SELF_DELETE_DIR = "lorabuild-self-delete"  # job folders (under the remote lorabuild folder)
# environment forwarded to the instance's self-delete jobs (the tests' fake API and instance file)
FORWARDED_ENV = ("LORABUILD_API_URL", "LORABUILD_INSTANCE_ENV", "LORABUILD_SELF_DELETE_WAIT")


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def boot_timeout_s() -> float:
    """How long a new instance may take to run and answer SSH before it is given up (and deleted)."""
    return _env_float("LORABUILD_BOOT_TIMEOUT_S", 900.0)


def poll_s() -> float:
    return _env_float("LORABUILD_CLOUD_POLL_S", 5.0)


def pull_grace_s() -> float:
    return _env_float("LORABUILD_PULL_GRACE_S", PULL_GRACE_S)


def provider_of(ctx: GateContext) -> str:
    return str(ctx.plan.compute.target)


# --- choosing and pricing -------------------------------------------------------------------------


def gpu_need(ctx: GateContext) -> GpuNeed:
    """What the instance must have: Gate 2's memory need (with its safety margin) and the spec's limits."""
    plan, compute = ctx.plan, ctx.plan.compute
    return GpuNeed(
        min_vram_gb=max(compute.vram_gb or 0.0, plan.estimates.memory_needed_gb),
        gpu=compute.gpu,
        gpu_count=compute.gpu_count,
        max_price_per_hour=compute.max_price_per_hour,
        min_reliability=compute.min_reliability,
        region=compute.region,
        disk_gb=compute.disk_gb or 60,
    )


def estimated_hours(ctx: GateContext) -> float:
    """Billed hours: start-up, the dry run and the training (Gate 2's time estimate)."""
    return PROVISIONING_HOURS + ctx.plan.estimates.time_seconds / 3600


def deadline_hours(ctx: GateContext) -> float:
    """The spec's `compute.max_hours`, or twice the estimate (at least MIN_DEADLINE_HOURS)."""
    if ctx.plan.compute.max_hours:
        return float(ctx.plan.compute.max_hours)
    return max(MIN_DEADLINE_HOURS, 2 * estimated_hours(ctx))


def describe_offer(ctx: GateContext, offer: Offer) -> str:
    """The price and the estimate, in words, before anything is rented."""
    hours = estimated_hours(ctx)
    limit = deadline_hours(ctx)
    count = f"{offer.gpu_count}× " if offer.gpu_count > 1 else ""
    where = f" in {offer.location}" if offer.location else ""
    reliability = f", reliability {offer.reliability:.0%}" if offer.reliability is not None else ""
    return (
        f"  Cheapest offer ({explain('offer')}) on {ledger.provider_name(offer.provider)}: {count}{offer.gpu} "
        f"({offer.vram_gb:g} GB){where}{reliability} at ${offer.price_per_hour:.2f} per hour.\n"
        f"  Estimated cost: about ${offer.price_per_hour * hours:.2f} "
        f"(training {ctx.plan.estimates.time_text.removeprefix('about ')} plus about "
        f"{PROVISIONING_HOURS * 60:.0f} minutes to start).\n"
        f"  At most ${offer.price_per_hour * limit:.2f}: the instance deletes itself after {limit:g} "
        f"hour{'' if limit == 1 else 's'} whatever happens (`compute.max_hours`; {explain('self_delete')})."
    )


def choose_offer(ctx: GateContext) -> Offer:
    provider = provider_of(ctx)
    need = gpu_need(ctx)
    try:
        offers = cloud.search_offers(provider, need)
    except MissingCredentials:
        raise GateFailed(
            f"lorabuild has no {ledger.provider_name(provider)} API key",
            where_to_put_it(provider),
        ) from None
    except ProviderError as exc:
        raise GateFailed(
            f"could not ask {ledger.provider_name(provider)} for offers: {redact(str(exc))}",
            "check your internet connection and the provider's status page, then run again",
        ) from None
    if not offers:
        wanted = [f"at least {need.min_vram_gb:.0f} GB of GPU memory"]
        if need.gpu:
            wanted.append(f"a {need.gpu}")
        if need.max_price_per_hour:
            wanted.append(f"at most ${need.max_price_per_hour:.2f} per hour")
        if need.min_reliability:
            wanted.append(f"reliability of at least {need.min_reliability:.0%}")
        if need.region:
            wanted.append(f"in region {need.region}")
        raise GateFailed(
            f"{ledger.provider_name(provider)} has no GPU for rent right now with {', '.join(wanted)}",
            "raise `compute.max_price_per_hour`, remove `compute.gpu` or `compute.region`, try again later, "
            "or try the other provider",
        )
    return offers[0]


# --- the instance of this run ---------------------------------------------------------------------


def current_entry(ctx: GateContext) -> ledger.Entry | None:
    """This run's live instance in the ledger (the newest, if several)."""
    provider = provider_of(ctx)
    found = [e for e in ledger.active(ctx.run.root) if e.run == ctx.plan.name and e.provider == provider]
    return found[-1] if found else None


def _target(root: Path, e: ledger.Entry) -> SshTarget:
    from lorabuild.remote import SshTarget

    if not e.ssh:
        raise GateFailed(
            f"the instance {e.id} has no SSH address yet",
            "run again; lorabuild waits for it to start",
        )
    key, _public = ledger.ssh_keypair(root)
    return SshTarget(
        host=str(e.ssh["host"]),
        port=int(e.ssh["port"]),
        user=str(e.ssh.get("user") or "root"),
        key_file=str(key),
        known_hosts=str(ledger.known_hosts_file(root, e)),
    )


def instance_target(ctx: GateContext) -> tuple[SshTarget, Callable[[], SshTarget]]:
    """Where this run's instance answers SSH, and how to look it up again after a drop (the
    provider may move it)."""
    e = current_entry(ctx)
    if e is None or e.state != "RUNNING":
        raise GateFailed(
            f"this run has no running {ledger.provider_name(provider_of(ctx))} instance",
            "run `lorabuild run` again: it rents one first",
        )
    root = ctx.run.root

    def resolve() -> SshTarget:
        assert e is not None and e.id is not None
        state = cloud.get(e.provider, e.id)
        if state is None or state.ssh is None:
            raise RuntimeError(f"{ledger.provider_name(e.provider)} shows no SSH address for {e.id}")
        updated = ledger.record_state(root, e, "RUNNING", ssh=_ssh_dict(state))
        return _target(root, updated)

    return _target(root, e), resolve


def _ssh_dict(state: cloud.InstanceState) -> dict[str, Any] | None:
    return {"host": state.ssh.host, "port": state.ssh.port, "user": state.ssh.user} if state.ssh else None


# --- spin-up --------------------------------------------------------------------------------------


def spinup(ctx: GateContext) -> None:
    """Have a running instance for this run: the one still up from an earlier run, or a new one."""
    provider = provider_of(ctx)
    name = ledger.provider_name(provider)
    root = ctx.run.root
    console = ctx.console
    console.step(f"Cloud — spin-up on {name}")
    try:
        report = ledger.reconcile(root, providers=[provider])
    except MissingCredentials:
        raise GateFailed(f"lorabuild has no {name} API key", where_to_put_it(provider)) from None
    for line in report.describe():
        console.say(f"  {line}")
    existing = current_entry(ctx)
    if existing is not None and existing.id is not None and existing.state in ("PROVISIONING", "RUNNING"):
        console.say(f"  Using the instance still up from the last run: {existing.describe()}")
        entry = existing
    else:
        entry = _rent(ctx)
    entry = _wait_running(ctx, entry)
    target = _target(root, entry)
    host = _host(target)
    try:
        host.wait_until_reachable(time.monotonic() + boot_timeout_s())
        _arm_deadline(ctx, host, entry)
    except Exception as exc:
        from lorabuild.remote import RemoteError

        if not isinstance(exc, RemoteError):
            raise
        raise GateFailed(
            f"the {name} instance {entry.id} started but does not answer SSH: {exc}",
            "lorabuild deletes it now; run again to rent another",
        ) from None
    finally:
        host.close()
    console.ok(
        f"Cloud instance ready: {entry.describe()}, reachable over SSH ({explain('ssh_login')}) at {target.describe()}"
    )


def _confirm(ctx: GateContext, offer: Offer) -> None:
    ctx.console.say(describe_offer(ctx, offer))
    if ctx.options.yes:
        return
    if not ctx.options.interactive:
        raise GateFailed(
            "renting a cloud GPU costs money and needs your confirmation, and nobody is at the terminal to give it",
            "run again with --yes to rent it without asking",
        )
    if not click.confirm("Rent it?", default=False):
        raise GateFailed("you chose not to rent a cloud GPU", "run again when you are ready")


def _rent(ctx: GateContext) -> ledger.Entry:
    offer = choose_offer(ctx)
    _confirm(ctx, offer)
    root = ctx.run.root
    _key, public = ledger.ssh_keypair(root)
    hours = deadline_hours(ctx)
    request = LaunchRequest(
        label=ledger.new_label(root, ctx.plan.name),
        image=ctx.plan.compute.image or DEFAULT_IMAGES[offer.provider],
        disk_gb=ctx.plan.compute.disk_gb or 60,
        ssh_public_key=public,
        onstart=boot_timer(offer.provider, hours * 3600),
    )
    try:
        entry = ledger.launch(root, offer, request, run=ctx.plan.name, deadline=time.time() + hours * 3600)
    except MissingCredentials:
        raise GateFailed(
            f"lorabuild has no {ledger.provider_name(offer.provider)} API key", where_to_put_it(offer.provider)
        ) from None
    except ProviderError as exc:
        raise GateFailed(
            f"{ledger.provider_name(offer.provider)} did not rent the GPU: {redact(str(exc))}",
            "run again (another offer may be free); `lorabuild cloud ls` shows what the account has",
        ) from None
    ctx.console.say(f"  Rented the instance ({explain('instance')}): {entry.describe()}; waiting for it to start")
    return entry


def _wait_running(ctx: GateContext, entry: ledger.Entry) -> ledger.Entry:
    root = ctx.run.root
    name = ledger.provider_name(entry.provider)
    assert entry.id is not None
    give_up = time.monotonic() + boot_timeout_s()
    last = "no answer yet"
    while True:
        try:
            state = cloud.get(entry.provider, entry.id)
        except ProviderError as exc:
            if not exc.retryable:
                raise GateFailed(
                    f"could not check the {name} instance {entry.id}: {redact(str(exc))}", "run again"
                ) from None
            last = redact(str(exc))
            state = None
        else:
            if state is None or state.status in ("terminated", "error", "stopped"):
                what = "is gone" if state is None else f"is {state.status}"
                if state is None:
                    ledger.mark_terminated(root, entry, note=f"{name} no longer has it")
                raise GateFailed(
                    f"the {name} instance {entry.id} {what} before it started",
                    "run again to rent another (lorabuild deletes this one)",
                )
            if state.status == "running" and state.ssh is not None:
                return ledger.record_state(
                    root, entry, "RUNNING", price_per_hour=state.cost_per_hour or None, ssh=_ssh_dict(state)
                )
            if entry.state != "PROVISIONING":
                entry = ledger.record_state(root, entry, "PROVISIONING")
            last = state.status
        if time.monotonic() > give_up:
            raise GateFailed(
                f"the {name} instance {entry.id} did not start within {boot_timeout_s() / 60:.0f} minutes "
                f"(last seen: {last})",
                "run again to rent another (lorabuild deletes this one); busy machines sometimes hang while "
                "downloading the image",
            )
        time.sleep(poll_s())


def _host(target: SshTarget) -> RemoteHost:
    from lorabuild.remote import RemoteHost

    return RemoteHost(target)


# --- self-delete ----------------------------------------------------------------------------------


def boot_timer(provider: str, seconds: float) -> str:
    """The onstart script: delete this instance after `seconds` from boot, whatever happens."""
    script = cloud.self_delete_script(provider)
    return f"(sleep {int(seconds)}; {script}) > /tmp/lorabuild-deadline.log 2>&1 &\n"


def forwarded_env() -> dict[str, str]:
    return {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}


def _remote_dir(ctx: GateContext, host: RemoteHost) -> str:
    from lorabuild.machine import REMOTE_DIR_DEFAULT

    return host.expand_path(ctx.plan.compute.remote_dir or REMOTE_DIR_DEFAULT).rstrip("/")


def _arm_deadline(ctx: GateContext, host: RemoteHost, entry: ledger.Entry) -> None:
    """Start the over-SSH deadline timer (once per instance), beside the boot timer: the boot
    timer depends on the image running onstart scripts, this one only on SSH."""
    deadline = ledger._ts(entry.deadline)
    if deadline is None:
        return
    folder = f"{_remote_dir(ctx, host)}/{SELF_DELETE_DIR}/deadline-{entry.entry}"
    if host.job_state(folder) != "missing":
        return
    seconds = max(0, int(deadline - time.time()))
    script = f"sleep {seconds}\n{cloud.self_delete_script(entry.provider)}\n"
    host.run(["mkdir", "-p", "--", folder.rsplit("/", 1)[0]], timeout=60)
    host.start_job(folder, ["sh", "-c", script], env=forwarded_env(), cwd="/")


def after_training_guard(ctx: GateContext) -> Callable[[RemoteHost, str], None]:
    """A hook for the train job: once it ends, the instance waits PULL_GRACE_S to be fetched
    from, then deletes itself (if lorabuild is gone by then, nobody else will)."""
    provider = provider_of(ctx)

    def arm(host: RemoteHost, job_dir: str) -> None:
        folder = f"{job_dir}-self-delete"
        if host.job_state(folder) != "missing":
            return
        grace = int(pull_grace_s())
        script = (
            f"while [ ! -s {shlex.quote(job_dir)}/exit ]; do sleep 10; done\n"
            f"sleep {grace}\n{cloud.self_delete_script(provider)}\n"
        )
        host.start_job(folder, ["sh", "-c", script], env=forwarded_env(), cwd="/")

    return arm


# --- teardown -------------------------------------------------------------------------------------


_KEPT_SAID: set[str] = set()  # entries whose "kept running" warning was shown (said once per process)


def unfetched_result(ctx: GateContext) -> bool:
    """A training finished on the instance and its LoRA has not been fetched yet."""
    return ctx.run.remote_result.exists() and not ctx.run.lora.exists()


def teardown(ctx: GateContext) -> None:
    """Delete this run's instance (idempotent; safe to call more than once)."""
    e = current_entry(ctx)
    if e is None:
        return
    console = ctx.console
    name = ledger.provider_name(e.provider)
    if unfetched_result(ctx) and e.state == "RUNNING":
        if e.entry in _KEPT_SAID:
            return
        _KEPT_SAID.add(e.entry)
        console.warn(
            f"kept {e.describe()} running: your trained LoRA is still on it and was not fetched yet. "
            f"Run the same command again to fetch it (nothing is trained again), or delete it with "
            f"`lorabuild cloud down {e.id}`. It deletes itself {pull_grace_s() / 60:.0f} minutes after "
            f"training ended, and at {e.deadline or 'its deadline'} at the latest."
        )
        return
    console.say(f"  Deleting the {name} instance {e.id or e.label} (every minute costs money)…")
    try:
        done = ledger.teardown(root=ctx.run.root, entry=e)
    except MissingCredentials:
        done = False
    after = ledger.find(ctx.run.root, e.entry) or e
    if done:
        console.ok(f"Cloud instance deleted; {name} confirmed it is gone. It cost about ${after.cost_usd:.2f}.")
    else:
        console.fail(
            f"the {name} instance {e.id or e.label} could not be deleted yet"
            + (f": {after.problem}" if after.problem else "")
            + ". Delete it with `lorabuild cloud down --all` (it also deletes itself at its deadline)."
        )


def teardown_quietly(ctx: GateContext) -> None:
    """teardown() for `finally` blocks: never raises (a second Ctrl-C is left to the deadline)."""
    with contextlib.suppress(Exception):
        teardown(ctx)
