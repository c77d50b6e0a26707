"""Fetch the results of a remote training: the LoRA, its checkpoints, into the run folder.

Only for remote targets (`compute: ssh | runpod | vastai`). Training leaves its result on the
machine that trained and records that in .lorabuild/runs/{name}/remote-train.json; this step
fetches it. Being its own step is what makes a failed fetch cheap: running again fetches again,
it does not train again. When the remote result is gone (the cloud instance was deleted), the
record is removed, so the next run trains again, and the message says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lorabuild import backends
from lorabuild.gates import GateContext, GateFailed
from lorabuild.gates import train as train_gate

TITLE = "Fetching the results"


def targets(ctx: GateContext) -> list[Path]:
    return [ctx.run.lora]


def inputs(ctx: GateContext) -> dict[str, Any]:
    return train_gate.inputs(ctx)  # the same result as the training that made it


def file_deps(ctx: GateContext) -> list[Path]:
    return [ctx.run.remote_result]


def run(ctx: GateContext) -> None:
    from lorabuild.machine import RemoteMachine, machine_for
    from lorabuild.remote import RemoteError

    record = _read_record(ctx)
    machine = None
    try:
        machine = machine_for(ctx)
        assert isinstance(machine, RemoteMachine)
        final, output_dir = str(record["final"]), str(record["output_dir"])
        # a new cloud instance never has the result of the one that was deleted
        other_instance = record.get("instance") not in (None, machine.instance_id)
        if other_instance or not machine.exists(Path(final)):
            ctx.run.remote_result.unlink(missing_ok=True)
            raise GateFailed(
                f"the trained LoRA is no longer on {machine.where()} ({final} is gone — "
                "a cloud instance may have deleted itself, or the files were removed)",
                "run the same command again: lorabuild trains it again",
            )
        final_name = Path(final).name
        others = [n for n in machine.host.list_files(output_dir) if n != final_name]
        if others:
            fetched = machine.host.fetch_dir(output_dir, ctx.run.checkpoints, patterns=others)
            ctx.console.say(f"  {len(fetched.files)} checkpoint file(s) fetched from {machine.where()}")
        for removed in backends.prune_checkpoints(ctx.plan, ctx.run.checkpoints):
            ctx.console.say(f"  Older checkpoint removed here: {removed.name}")
        pictures = machine.host.fetch_dir(f"{machine.layout.run_dir}/samples", ctx.run.samples, patterns=["*.png"])
        # other backends render theirs among the outputs fetched above
        count = len(pictures.files) + backends.collect_samples(ctx.plan, ctx.run.checkpoints, ctx.run.samples)
        if count:
            ctx.console.say(f"  {count} sample picture(s) fetched from {machine.where()}")
        machine.host.get_file(final, ctx.run.lora)  # last: its presence means everything arrived
    except RemoteError as exc:
        raise GateFailed(
            f"could not fetch the results: {exc}",
            "run the same command again: lorabuild fetches them (nothing is trained again)",
        ) from None
    finally:
        if machine is not None:
            machine.close()
    ctx.console.say(f"  Your LoRA is ready: {ctx.run.lora}")


def _read_record(ctx: GateContext) -> dict[str, Any]:
    try:
        record = json.loads(ctx.run.remote_result.read_text(encoding="utf-8"))
        if isinstance(record, dict) and record.get("final") and record.get("output_dir"):
            return record
    except (OSError, ValueError):
        pass
    ctx.run.remote_result.unlink(missing_ok=True)
    raise GateFailed(
        "lorabuild has no record of a finished remote training to fetch",
        "run the same command again: the training runs first",
    )
