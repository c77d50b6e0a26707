"""The pipeline: the only module that talks to doit.

Turns a spec into doit tasks (one per gate, with file targets and an up-to-date key made of
exactly the plan values the gate reads), runs them in-process, and answers `status`. It also
closes doit's crash-safety gaps (reference/doit.md §4):

- results are committed to sqlite as soon as each task succeeds (`WriteThroughSqliteDB`);
- each gate is marked incomplete before it starts and unmarked only on success, and its old
  targets are removed first, so a killed gate always reruns and never looks complete;
- SIGTERM becomes KeyboardInterrupt, which stops the backend's whole process group;
- one lock per run folder; a backend left behind by a killed lorabuild is stopped first.

One doit database serves every spec of a grimoire (task names are `{spec name}:{gate}`), so
`lorabuild run` and `doit` (through dodo.py) share the same state.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from doit.dependency import Dependency, MD5Checker, SqliteDB
from doit.exceptions import BaseFail, TaskFailed
from doit.task import Task, dict_to_task

from lorabuild import gates, runlock, uptodate
from lorabuild.dataset import list_dataset
from lorabuild.fsutil import atomic_write_json, digest, remove_path
from lorabuild.gates import GateContext, GateFailed, RunOptions
from lorabuild.limits import machine_key, read_limit
from lorabuild.modelfile import list_model
from lorabuild.plan import default_grimoire, make_plan, model_listing_path
from lorabuild.procs import Interrupted, sigterm_as_interrupt, stop_leftover
from lorabuild.runfolder import RunFolder
from lorabuild.spec import load_spec
from lorabuild.studio import Machine, read_machine, record_machine
from lorabuild.ui import Console

BACKEND_NAME = "sqlite3-write-through"
BACKEND_PLUGIN = f"{__name__}:WriteThroughSqliteDB"
INPUTS_VALUE = "_lorabuild_inputs"

EXIT_OK, EXIT_FAILED, EXIT_SPEC, EXIT_INTERRUPTED = 0, 1, 2, 130


class WriteThroughSqliteDB(SqliteDB):
    """doit's sqlite backend, committing each task's row the moment doit saves it."""

    desc = "sqlite3, committed after every task"

    def __init__(self, name: str, codec: Any, *, module_name: str | None = None):
        super().__init__(name, codec, module_name=module_name)
        self._conn.execute("pragma journal_mode=wal")
        self._conn.execute("pragma busy_timeout=10000")

    def set(self, task_id: str, dependency: str, value: Any) -> None:
        super().set(task_id, dependency, value)
        # 'deps:' is the last key Dependency.save_success writes for a task
        if dependency in ("deps:", "ignore:"):
            encoded = self.codec.encode(self._cache[task_id])
            # an unchanged row is not written again: an up-to-date run leaves the file as it was
            if self.codec.decode(encoded) != self._get_task_data(task_id):
                self._conn.execute("insert or replace into doit values (?,?)", (task_id, encoded))
                self._conn.commit()
            self._dirty.discard(task_id)

    def remove(self, task_id: str) -> None:
        super().remove(task_id)
        self._conn.commit()


class InputsUnchanged:
    """doit up-to-date check: the gate's inputs equal those of its last success.

    Unlike doit's `config_changed` it keeps the inputs themselves, not a digest, so `status`
    can say which value changed.
    """

    def __init__(self, inputs: dict[str, Any]):
        self.inputs = json.loads(json.dumps(inputs, sort_keys=True))

    def configure_task(self, task: Task) -> None:
        task.value_savers.append(lambda: {INPUTS_VALUE: self.inputs})

    def __call__(self, task: Task, values: dict[str, Any]) -> bool:
        return bool(values.get(INPUTS_VALUE) == self.inputs)

    def __repr__(self) -> str:
        return f"InputsUnchanged({digest(self.inputs)})"


def not_incomplete(marker: str) -> bool | None:
    """False (rerun) when the gate started and never finished; None means "no opinion"."""
    return False if os.path.exists(marker) else None


# --- building -------------------------------------------------------------------------------


def build_context(
    spec_path: str | os.PathLike[str],
    *,
    root: Path | None = None,
    options: RunOptions | None = None,
    console: Console | None = None,
    machine: Machine | None = None,
) -> GateContext:
    """Load the spec and plan it for this machine. Raises SpecError; writes nothing."""
    loaded = load_spec(spec_path)
    grimoire = default_grimoire(loaded, root)
    run = RunFolder(grimoire, loaded.spec.name)
    machine = machine or read_machine()
    dataset = list_dataset(loaded.resolve(loaded.spec.dataset.path), loaded.spec.dataset.caption_extension)
    model_path = model_listing_path(loaded)
    model = list_model(model_path) if model_path is not None else None
    if loaded.spec.compute.target != "local":
        from lorabuild.gates.environment import remote_stamp

        key = machine_key(remote_stamp(loaded.spec.compute))
    else:
        key = machine_key({"hostname": machine.hostname, **machine.gpus.fingerprint()})
    limit = read_limit(run.limits, key)
    plan = make_plan(loaded, machine, dataset, model, grimoire=grimoire, memory_limit=limit)
    return GateContext(loaded, plan, run, machine, dataset, model, options or RunOptions(), console or Console())


def task_dicts(ctx: GateContext) -> list[dict[str, Any]]:
    """The doit tasks of one spec, in gate order.

    A remote target adds steps that are doit `setup` tasks (run only when a gate that needs
    them runs): `deploy` sends the inputs before the dry run and the training; a cloud target
    also has `spinup` (rent the instance) whose doit `teardown` deletes it once the run ends,
    whether it passed, failed or was interrupted."""
    from lorabuild.machine import CLOUD_TARGETS, is_remote

    tasks: list[dict[str, Any]] = []
    cloud = ctx.plan.compute.target in CLOUD_TARGETS
    spinup = ctx.run.task_name("spinup")
    deploy = ctx.run.task_name("deploy")
    if cloud:
        tasks.append(
            {
                "name": spinup,
                "doc": "rent the cloud GPU (deleted again when the run ends)",
                "actions": [(run_step, [ctx, "spinup"])],
                "teardown": [(run_teardown, [ctx])],
                "verbosity": 2,
            }
        )
    if is_remote(ctx.plan):
        tasks.append(
            {
                "name": deploy,
                "doc": "send the dataset, the model and the backend's config to the machine that trains",
                "actions": [(run_step, [ctx, "deploy"])],
                "setup": [spinup] if cloud else [],
                "verbosity": 2,
            }
        )
    previous: str | None = None
    for gate in gates.gates_for(ctx):
        mod = gates.module(gate)
        name = ctx.run.task_name(gate)
        marker = str(ctx.run.incomplete_marker(gate))
        setup: list[str] = []
        if gate != "config" and cloud:
            setup.append(spinup)
        if gate in ("dryrun", "train") and is_remote(ctx.plan):
            setup.append(deploy)
        tasks.append(
            {
                "name": name,
                "doc": mod.TITLE,
                "actions": [(run_gate, [ctx, gate])],
                "file_dep": [str(p) for p in mod.file_deps(ctx)],
                "targets": [str(p) for p in mod.targets(ctx)],
                "task_dep": [previous] if previous else [],
                "setup": setup,
                "uptodate": [(not_incomplete, [marker]), InputsUnchanged(mod.inputs(ctx))],
                "verbosity": 2,
            }
        )
        previous = name
    tasks.append(
        {"name": ctx.run.name, "doc": f"every gate of {ctx.run.name}", "actions": None, "task_dep": [previous]}
    )
    return tasks


def run_step(ctx: GateContext, step: str) -> bool | BaseFail:
    """The doit action of a remote step (not a gate: it has no targets; it prepares the machine)."""
    runlock.acquire(ctx.run.lock)
    try:
        if step == "spinup":
            from lorabuild.cloud import session

            session.spinup(ctx)
        elif step == "deploy":
            deploy(ctx)
        else:
            raise ValueError(step)
    except GateFailed as exc:
        title = "Cloud spin-up" if step == "spinup" else "Deploy"
        ctx.console.fail(f"{title} failed: {exc.render()}")
        return TaskFailed(exc.message, report=False)
    return True


def deploy(ctx: GateContext) -> None:
    """Put the dataset, the model, the backend's config (and the backend, when missing) there."""
    from lorabuild.machine import RemoteMachine, machine_for
    from lorabuild.remote import RemoteError

    machine = None
    try:
        machine = machine_for(ctx)
        assert isinstance(machine, RemoteMachine)
        ctx.console.step(f"Deploy — sending the inputs to {machine.where()}")
        machine.deploy()
    except RemoteError as exc:
        raise GateFailed(
            f"could not send the inputs to the machine that trains: {exc}",
            "check that it is on and reachable, then run again (only what changed is sent again)",
        ) from None
    finally:
        if machine is not None:
            machine.close()


def run_teardown(ctx: GateContext) -> bool:
    """doit teardown of `spinup`: delete the instance (or keep it while a result waits there)."""
    from lorabuild.cloud import session

    session.teardown(ctx)
    return True


def run_gate(ctx: GateContext, gate: str) -> bool | BaseFail:
    """The doit action of one gate: mark, clear old targets, run, record the outcome."""
    mod = gates.module(gate)
    runlock.acquire(ctx.run.lock)  # re-entrant; protects `doit` users of dodo.py too
    marker = ctx.run.incomplete_marker(gate)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(os.getpid()))
    failure = ctx.run.failure_record(gate)
    failure.unlink(missing_ok=True)
    keep = getattr(mod, "kept_targets", lambda: ())()
    for target in mod.targets(ctx):
        if target.name not in keep:
            remove_path(target)
    ctx.run.dir.mkdir(parents=True, exist_ok=True)
    ctx.console.step(f"{mod.TITLE}")
    try:
        mod.run(ctx)
    except GateFailed as exc:
        atomic_write_json(
            failure,
            {
                "gate": gate,
                "message": exc.message,
                "fix": exc.fix,
                "details": exc.details,
                "inputs": digest(mod.inputs(ctx)),
                "at": time.strftime("%Y-%m-%d %H:%M:%S"),
            },
        )
        ctx.console.fail(f"{mod.TITLE} failed: {exc.render()}")
        return TaskFailed(exc.message, report=False)
    marker.unlink(missing_ok=True)
    ctx.console.ok(f"{mod.TITLE} passed")
    return True


class GateReporter:
    """doit reporter that speaks for the gates: quiet for what passes, plain for what doesn't."""

    desc = "lorabuild gates"

    def __init__(self, console: Console, titles: dict[str, str]):
        self.console = console
        self.titles = titles
        self.executed: list[str] = []
        self.failed: list[str] = []
        self.errors: list[str] = []

    def initialize(self, tasks: Any, selected_tasks: Any) -> None:
        pass

    def get_status(self, task: Task) -> None:
        pass

    def execute_task(self, task: Task) -> None:
        if task.actions:
            self.executed.append(task.name)

    def add_failure(self, task: Task, fail: BaseFail) -> None:
        self.failed.append(task.name)
        if fail.report:
            self.errors.append(f"{task.name}: {fail.get_msg()}")

    def add_success(self, task: Task) -> None:
        pass

    def skip_uptodate(self, task: Task) -> None:
        if task.name in self.titles:
            self.console.up_to_date(self.titles[task.name])

    def skip_ignore(self, task: Task) -> None:
        pass

    def cleanup_error(self, exception: BaseFail) -> None:
        self.errors.append(exception.get_msg())

    def runtime_error(self, msg: str) -> None:
        self.errors.append(msg)

    def teardown_task(self, task: Task) -> None:
        pass

    def complete_run(self) -> None:
        for error in self.errors:
            self.console.fail(error.rstrip())


def doit_config(ctx_root: Path, reporter: GateReporter | None, default_tasks: list[str]) -> dict[str, Any]:
    state = ctx_root / ".lorabuild"
    state.mkdir(parents=True, exist_ok=True)  # doit needs the database's folder to exist
    config: dict[str, Any] = {
        "dep_file": str(state / "doit.sqlite"),
        "backend": BACKEND_NAME,
        "check_file_uptodate": "md5",
        "verbosity": 2,
        "action_string_formatting": "new",
        "default_tasks": default_tasks,
    }
    if reporter is not None:
        config["reporter"] = reporter
    return config


@dataclass
class RunResult:
    code: int
    executed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


@contextlib.contextmanager
def _only_named_doit_plugins() -> Iterator[None]:
    """doit with the plugins named here and none from installed packages' entry points: as with
    config_filenames=(), what a run does must not depend on what else is installed, and each of
    doit's three entry-point scans reads every installed package's metadata (tens of ms a run)."""
    import doit.plugin

    saved = doit.plugin.entry_points_impl
    doit.plugin.entry_points_impl = lambda: lambda group: ()
    try:
        yield
    finally:
        doit.plugin.entry_points_impl = saved


def run_pipeline(ctx: GateContext, *, until: str | None = None) -> RunResult:
    """Run the gates up to `until` (default: all). The caller has taken the run lock."""
    from doit.cmd_base import TaskLoader2
    from doit.doit_cmd import DoitMain

    titles = {ctx.run.task_name(g): gates.module(g).TITLE for g in gates.gates_for(ctx)}
    reporter = GateReporter(ctx.console, titles)
    selected = [ctx.run.task_name(until)] if until else [ctx.run.name]

    class Loader(TaskLoader2):
        def setup(self, opt_values: dict[str, Any]) -> None:
            pass

        def load_doit_config(self) -> dict[str, Any]:
            return doit_config(ctx.run.root, reporter, selected)

        def load_tasks(self, cmd: Any, pos_args: list[str]) -> list[Task]:
            return [dict_to_task(t) for t in task_dicts(ctx)]

    leftover = stop_leftover(ctx.run.backend_pid)
    if leftover:
        ctx.console.warn(f"stopped a training process (pid {leftover}) left behind by an earlier lorabuild")
    record_machine(ctx.run.root, ctx.machine)
    with _only_named_doit_plugins():
        main = DoitMain(Loader(), config_filenames=(), extra_config={"BACKEND": {BACKEND_NAME: BACKEND_PLUGIN}})
        code = main.run(["run", *selected])
    if code == 3:
        return RunResult(EXIT_FAILED, reporter.executed, reporter.failed)
    return RunResult(EXIT_OK if code == 0 else EXIT_FAILED, reporter.executed, reporter.failed)


def run_spec(
    spec_path: str,
    *,
    root: Path | None = None,
    until: str | None = None,
    options: RunOptions | None = None,
    console: Console | None = None,
) -> int:
    """`lorabuild run`: load, lock, run the gates; the exit code. SpecError propagates (exit 2)."""
    console = console or Console()
    started_ns = time.time_ns()  # a change made while planning must keep the up-to-date record away
    ctx = build_context(spec_path, root=root, options=options, console=console)
    sigterm_as_interrupt()
    try:
        runlock.acquire(ctx.run.lock)
    except runlock.LockBusy as busy:
        console.fail(
            f"another lorabuild is already working on {ctx.run.dir}: {busy.holder.describe()}. "
            f"Wait for it to finish, or stop it with: kill {busy.holder.pid}"
        )
        return EXIT_FAILED
    try:
        taken = uptodate.snapshot(ctx, started_ns)
        uptodate.forget(ctx)
        result = run_pipeline(ctx, until=until)
        if result.code == EXIT_OK and not result.executed and until is None:
            _remember_up_to_date(ctx, taken)
    except (KeyboardInterrupt, Interrupted):
        console.fail("stopped. Run the same command again to continue where it stopped.")
        return EXIT_INTERRUPTED
    finally:
        try:
            _teardown_cloud(ctx)
        finally:
            runlock.release(ctx.run.lock)
    if result.code == EXIT_OK and not result.executed:
        console.nothing_to_do()
    return result.code


def _remember_up_to_date(ctx: GateContext, taken: uptodate.Snapshot) -> None:
    """Leave the record the next run's shortcut answers from (still holding the run lock). Not
    for a cloud GPU: its up-to-date run still makes sure that nothing is left rented."""
    from lorabuild.machine import CLOUD_TARGETS

    if ctx.plan.compute.target not in CLOUD_TARGETS:
        uptodate.remember(ctx, taken)


def _teardown_cloud(ctx: GateContext) -> None:
    """The safety net behind doit's teardown (which a second Ctrl-C can cut short): no run ends
    with its cloud instance still rented, unless a trained LoRA waits on it."""
    from lorabuild.machine import CLOUD_TARGETS

    if ctx.plan.compute.target not in CLOUD_TARGETS:
        return
    from lorabuild.cloud import session

    try:
        session.teardown(ctx)
    except (KeyboardInterrupt, Interrupted):
        console = ctx.console
        console.fail("the cloud instance may still be running: delete it with `lorabuild cloud down --all`")


# --- status ---------------------------------------------------------------------------------


@dataclass
class GateStatus:
    name: str
    state: str  # "up-to-date", "stale", "missing" or "failed"
    reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state, "reasons": self.reasons}


def gate_status(ctx: GateContext) -> list[GateStatus]:
    """What `run` would do for each gate, and why — without running or writing anything."""
    db_path = ctx.run.doit_db
    result: list[GateStatus] = []
    task_list = [dict_to_task(t) for t in task_dicts(ctx)]
    tasks = {t.name: t for t in task_list}
    dep = Dependency(_ReadOnlySqliteDB, str(db_path), checker_cls=MD5Checker) if db_path.exists() else None
    try:
        for gate in gates.gates_for(ctx):
            task = tasks[ctx.run.task_name(gate)]
            result.append(_one_status(ctx, gate, task, tasks, dep))
    finally:
        if dep is not None:
            dep.backend.close()
    _propagate(ctx, result)
    return result


class _ReadOnlySqliteDB(SqliteDB):
    """Reads doit's state without ever writing it (status must not change anything)."""

    def _sqlite3(self, name: str) -> Any:
        import sqlite3

        conn = sqlite3.connect(f"file:{name}?mode=ro", uri=True)

        def row(cursor: Any, values: Any) -> dict[str, Any]:
            return {col[0]: values[i] for i, col in enumerate(cursor.description)}

        conn.row_factory = row
        return conn

    def _get_task_data(self, task_id: str) -> dict[str, Any]:
        data = self._conn.execute("select task_data from doit where task_id=?", (task_id,)).fetchone()
        return self.codec.decode(data["task_data"]) if data else {}

    def set(self, task_id: str, dependency: str, value: Any) -> None:
        pass

    def remove(self, task_id: str) -> None:
        pass

    def close(self) -> None:
        self._conn.close()


def _one_status(ctx: GateContext, gate: str, task: Task, tasks: dict[str, Task], dep: Dependency | None) -> GateStatus:
    mod = gates.module(gate)
    current = InputsUnchanged(mod.inputs(ctx)).inputs
    failure = _read_json(ctx.run.failure_record(gate))
    incomplete = ctx.run.incomplete_marker(gate).exists()
    saved = dep.get_values(task.name) if dep is not None and dep._in(task.name) else None
    if failure and failure.get("inputs") == digest(mod.inputs(ctx)):
        return GateStatus(
            gate,
            "failed",
            [f"failed last time: {failure.get('message')}"]
            + ([f"fix: {failure['fix']}"] if failure.get("fix") else []),
        )
    reasons = []
    if incomplete and not failure:
        reasons.append("interrupted: the last run stopped before this gate finished")
    if incomplete and gate == "train":
        steps = _checkpoint_steps(ctx)
        if steps:
            reasons.append(f"will resume from the checkpoint at step {max(steps)}")
    if saved is None or INPUTS_VALUE not in saved:
        if failure:
            reasons.insert(0, f"inputs changed since it failed ({failure.get('message')})")
        return GateStatus(gate, "missing", reasons or ["never run"])
    reasons.extend(describe_changes(saved.get(INPUTS_VALUE) or {}, current))
    status = dep.get_status(task, tasks, get_log=True) if dep is not None else None
    missing_targets = []
    if status is not None:
        missing_targets = [str(t) for t in status.reasons.get("missing_target", [])]
        for path in status.reasons.get("changed_file_dep", []):
            reasons.append(f"file changed: {_short(ctx, path)}")
        for path in status.reasons.get("added_file_dep", []):
            reasons.append(f"file added: {_short(ctx, path)}")
        for path in status.reasons.get("removed_file_dep", []):
            reasons.append(f"file removed: {_short(ctx, path)}")
        for path in status.reasons.get("missing_file_dep", []):
            reasons.append(f"file missing: {_short(ctx, path)}")
    if missing_targets and not reasons:
        return GateStatus(gate, "missing", [f"{Path(t).name} is missing" for t in missing_targets])
    reasons.extend(f"{Path(t).name} is missing" for t in missing_targets)
    if failure:
        reasons.append(f"last attempt failed: {failure.get('message')}")
    return GateStatus(gate, "stale" if reasons else "up-to-date", reasons)


def _propagate(ctx: GateContext, result: list[GateStatus]) -> None:
    """Say, on each gate that will run, which earlier gate must pass first, and why it may not."""
    if ctx.plan.problems:
        config = result[0]
        config.reasons.extend(f"will fail: {i.message}" for i in ctx.plan.problems)
        if config.state == "up-to-date":
            config.state = "stale"
    blocker: GateStatus | None = None
    for status in result:
        if blocker is not None and status.state != "up-to-date":
            status.reasons.append(f"runs after {blocker.name} ({blocker.state})")
        if status.state != "up-to-date" and blocker is None:
            blocker = status


def describe_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Plain lines naming each changed value, e.g. 'training.epochs changed: 15 → 20'."""
    flat_old, flat_new = _flatten(old), _flatten(new)
    lines = []
    for key in sorted(set(flat_old) | set(flat_new)):
        before, after = flat_old.get(key, "(unset)"), flat_new.get(key, "(unset)")
        if before == after:
            continue
        name = key.removeprefix("plan.")
        if isinstance(before, list) and isinstance(after, list):
            added = [x for x in after if x not in before]
            removed = [x for x in before if x not in after]
            bits = ([f"added {', '.join(map(str, added[:3]))}"] if added else []) + (
                [f"removed {', '.join(map(str, removed[:3]))}"] if removed else []
            )
            lines.append(f"{name} changed: {'; '.join(bits) or 'reordered'}")
        else:
            lines.append(f"{name} changed: {_brief(before)} → {_brief(after)}")
    return lines


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    else:
        out[prefix] = data
    return out


def _brief(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def _short(ctx: GateContext, path: str) -> str:
    try:
        return os.path.relpath(path, ctx.loaded.folder)
    except ValueError:
        return path


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _checkpoint_steps(ctx: GateContext) -> list[int]:
    from lorabuild import backends

    if ctx.plan.backend.name not in backends.IMPLEMENTED:
        return []
    return [c.step for c in backends.checkpoints(ctx.plan, ctx.run.checkpoints)]


# --- dodo.py --------------------------------------------------------------------------------


def dodo_tasks(spec_paths: list[Path], root: Path | None = None) -> Iterator[dict[str, Any]]:
    """Tasks for `doit` users: every gate of every spec, sharing lorabuild's own state."""
    sigterm_as_interrupt()
    machine = read_machine()
    for path in spec_paths:
        try:
            ctx = build_context(
                path, root=root, machine=machine, options=RunOptions(yes=False, interactive=sys.stdin.isatty())
            )
        except Exception as exc:  # one broken spec must not hide the others
            print(f"lorabuild: skipping {path}: {exc}", file=sys.stderr)
            continue
        record_machine(ctx.run.root, ctx.machine)
        for task in task_dicts(ctx):
            # `basename` keeps the names exactly those of `lorabuild run` (doit would prefix `name`)
            yield {"basename": task.pop("name"), **task}


def dodo_config(root: Path | None = None) -> dict[str, Any]:
    grimoire = (root or Path.cwd() / "grimoire").resolve()
    return doit_config(grimoire, None, [])


def print_problems(problems: list[Any], stream: TextIO) -> None:
    for problem in problems:
        print(problem.render(), file=stream)
