"""Where training runs: this computer, or another machine over SSH (a host or a cloud instance).

Owns the difference between the two for the gates: the plan as that machine sees it (its own
paths), putting the inputs there (deploy: lorabuild's trainer code for the builtin backend, the
dataset, the model, the backend's config files — and the backend's packages when they are
missing), running the backend there with its output streamed into the local run folder (so the
local monitor reads it exactly as for a local run), and what the backend left there (checkpoints,
the final LoRA). The gates ask `machine_for(ctx)` and read the same for both.

A remote backend runs as a detached job (lorabuild.remote) that survives SSH drops and lorabuild
itself; the job's folder is remembered in .lorabuild/runs/{name}/remote-job.json, so the next run
re-attaches to a training that is still going instead of starting another.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from lorabuild import backends
from lorabuild.backends import Launch
from lorabuild.fsutil import atomic_write_json
from lorabuild.gates import GateContext, GateFailed
from lorabuild.plan import Plan
from lorabuild.procs import Finished, LineSplitter, run_streaming

REMOTE_DIR_DEFAULT = "~/lorabuild"
RUN_STAMP = ".lorabuild-run.json"  # in checkpoints/: the settings its checkpoints were made with
POLL_S = 0.5  # how often a remote job's log and state are read
REMOTE_TARGETS = ("ssh", "runpod", "vastai")
CLOUD_TARGETS = ("runpod", "vastai")


def retry_policy() -> Any:
    """How hard to try when the connection drops (`LORABUILD_SSH_ATTEMPTS` tries; default 6, ~31 s)."""
    from lorabuild.remote import RetryPolicy

    try:
        attempts = int(os.environ.get("LORABUILD_SSH_ATTEMPTS", "6"))
    except ValueError:
        attempts = 6
    return RetryPolicy(attempts=max(1, attempts))


def is_remote(plan: Plan) -> bool:
    return plan.compute.target in REMOTE_TARGETS


class LocalMachine:
    """This computer: the plan as it is, the backend as a child process."""

    remote = False

    def __init__(self, ctx: GateContext):
        self.ctx = ctx
        self.plan = ctx.plan
        self.backend_dir = ctx.run.backend_dir
        self.output_dir = ctx.run.checkpoints

    def where(self) -> str:
        return "this computer"

    @contextlib.contextmanager
    def scratch(self, kind: str) -> Iterator[Path]:
        with tempfile.TemporaryDirectory(prefix=f".{kind}-", dir=self.ctx.run.dir) as folder:
            yield Path(folder)

    def run(self, launch: Launch, *, log: IO[str], on_line: Callable[[str], None], kind: str) -> Finished:
        return run_streaming(launch, log=log, on_line=on_line, pid_file=self.ctx.run.backend_pid)

    def exists(self, path: Path | PurePosixPath) -> bool:
        return Path(path).is_file()

    def remove(self, path: Path | PurePosixPath) -> None:
        Path(path).unlink(missing_ok=True)

    def stop(self) -> None:
        """Stop the backend's process group (the monitor found the loss exploded)."""
        try:
            pgid = int(json.loads(self.ctx.run.backend_pid.read_text(encoding="utf-8"))["pgid"])
            os.killpg(pgid, signal.SIGTERM)  # the backend saves what it can and stops
        except (OSError, ValueError, KeyError):
            pass

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class RemoteLayout:
    """Where a run's files live on the remote machine (all absolute paths there)."""

    root: str
    name: str

    @property
    def src(self) -> str:
        return f"{self.root}/src"  # lorabuild's own code, for the builtin trainer

    @property
    def dataset(self) -> str:
        return f"{self.root}/datasets/{self.name}"

    @property
    def models(self) -> str:
        return f"{self.root}/models"

    @property
    def run_dir(self) -> str:
        return f"{self.root}/training/{self.name}"

    @property
    def jobs(self) -> str:
        return f"{self.root}/jobs"


class RemoteMachine:
    """A machine over SSH: the plan with its paths, the backend as a detached job there."""

    remote = True

    def __init__(
        self,
        ctx: GateContext,
        target: Any,
        *,
        resolve: Callable[[], Any] | None = None,
        on_train_started: Callable[[Any, str], None] | None = None,
    ):
        from lorabuild.remote import RemoteHost

        self.ctx = ctx
        self.host = RemoteHost(target, resolve=resolve, retry=retry_policy())
        self.on_train_started = on_train_started
        self.instance_id: str | None = None  # the cloud instance, when it is one
        root = self.host.expand_path(ctx.plan.compute.remote_dir or REMOTE_DIR_DEFAULT)
        self.layout = RemoteLayout(root.rstrip("/"), ctx.plan.name)
        self.plan = remote_plan(ctx, self.layout, self._python())
        self.backend_dir = PurePosixPath(self.layout.run_dir) / "backend"
        self.output_dir = PurePosixPath(self.layout.run_dir) / "checkpoints"
        self.job_dir: str | None = None

    # --- the remote view of the plan ---

    def _python(self) -> str:
        spec = self.ctx.loaded.spec.backend
        if spec.python:
            return self.host.expand_path(spec.python)
        if spec.path and self.ctx.plan.backend.name != "builtin":
            base = self.host.expand_path(spec.path)
            for candidate in (f"{base}/venv/bin/python", f"{base}/.venv/bin/python"):
                if self.host.run(["test", "-x", candidate], timeout=60, check=False).ok:
                    return candidate
        return "python3"

    # --- deploy ---

    def where(self) -> str:
        return str(self.host.target.host)

    def deploy(self) -> None:
        """Put everything the backend reads on the remote machine (rsync moves only what changed)."""
        plan, local = self.plan, self.ctx.plan
        console = self.ctx.console
        self.host.run(
            [
                "mkdir",
                "-p",
                "--",
                self.layout.dataset,
                self.layout.models,
                str(self.backend_dir),
                str(self.output_dir),
                self.layout.jobs,
            ],
            timeout=60,
        )
        if plan.backend.name == "builtin":
            package = Path(__file__).resolve().parent
            self.host.sync_dir(package, f"{self.layout.src}/lorabuild", delete=True)
        sent = self.host.sync_dir(Path(local.dataset.path), self.layout.dataset)
        console.say(f"  Dataset on {self.host.target.host}: {len(sent.files)} file(s) sent ({sent.method})")
        if not local.model.demo:
            self._send_model(Path(local.model.path), plan.model.path)
        for name, text in backends.render_config(plan).items():
            self._write(str(self.backend_dir / name), text)
        self._install_if_missing()

    def _send_model(self, local: Path, remote: str) -> None:
        if local.is_dir():
            self.host.sync_dir(local, remote)
            return
        # a single file: rsync it through a folder holding only a link to it (links are followed)
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / local.name).symlink_to(local.resolve())
            self.host.sync_dir(folder, str(PurePosixPath(remote).parent))

    def _write(self, remote: str, text: str) -> None:
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".tmp", delete=False) as handle:
            handle.write(text)
        try:
            self.host.put_file(handle.name, remote)
        finally:
            os.unlink(handle.name)

    def _install_if_missing(self) -> None:
        argv = backends.probe_command(self.plan)
        modules = argv[3:]
        facts = self.host.probe_python(self.plan.backend.python, modules)
        missing = [m for m, v in (facts.get("modules") or {}).items() if v is None]
        if not missing and facts.get("torch"):
            return
        commands = backends.install_commands(self.plan)
        if not commands:
            raise GateFailed(
                f"the {self.plan.backend.name} backend is not installed on {self.host.target.host}",
                backends.installation(self.plan).fix or "install it there, then run again",
            )
        self.ctx.console.say(f"  Installing the {self.plan.backend.name} backend on {self.host.target.host}…")
        for command in commands:
            self.host.run(command, timeout=3600, what="installing the backend")
        # the install may have made the environment the backend runs in (a venv in its folder)
        self.plan = remote_plan(self.ctx, self.layout, self._python())

    # --- running ---

    @contextlib.contextmanager
    def scratch(self, kind: str) -> Iterator[PurePosixPath]:
        folder = f"{self.layout.root}/scratch/{kind}-{int(time.time() * 1000)}"
        self.host.run(["mkdir", "-p", "--", folder], timeout=60)
        try:
            yield PurePosixPath(folder)
        finally:
            with contextlib.suppress(Exception):
                self.host.run(["rm", "-rf", "--", folder], timeout=120, retry=False)

    def run(self, launch: Launch, *, log: IO[str], on_line: Callable[[str], None], kind: str) -> Finished:
        """Run the backend as a detached job there (or re-attach to the training still running),
        copying its output into `log` as it grows; stop it on Ctrl-C or SIGTERM."""
        state = self.ctx.run.remote_job
        started = time.monotonic()
        splitter = LineSplitter()
        tail: list[str] = []

        def copy(data: bytes) -> None:
            log.write(data.decode("utf-8", errors="replace"))
            log.flush()
            for line in splitter.feed(data):
                tail.append(line)
                del tail[:-40]
                on_line(line)

        job_dir, offset = self._attach(state) if kind == "train" else ("", 0)
        if job_dir:
            current = self.host.job_state(job_dir)
            if current != "running":
                # it ended while nobody watched: keep its last words, and its result if it finished
                while True:
                    data, offset = self.host.read_log(job_dir, offset)
                    if not data:
                        break
                    copy(data)
                state.unlink(missing_ok=True)
                if current == ("exited", 0):
                    self.ctx.console.say(f"  The training on {self.where()} finished while lorabuild was away")
                    for line in splitter.feed(b"", end=True):
                        on_line(line)
                    return Finished(0, time.monotonic() - started, tail)
                job_dir, offset = "", 0
            else:
                self.ctx.console.say(f"  Re-attaching to the training still running on {self.where()}")
        if not job_dir:
            for path, text in launch.files.items():
                self._write(str(path), text)
            job_dir = f"{self.layout.jobs}/{self.plan.name}-{kind}-{int(time.time() * 1000)}"
            self.host.start_job(job_dir, launch.argv, env=launch.env, cwd=str(launch.cwd))
            if kind == "train" and self.on_train_started is not None:
                self.on_train_started(self.host, job_dir)
        self.job_dir = job_dir
        record = {"host": self.where(), "job_dir": job_dir, "resume_key": self.plan.resume_key, "kind": kind}
        if kind == "train":
            atomic_write_json(state, {**record, "offset": offset})
        try:
            while True:
                data, offset = self.host.read_log(job_dir, offset)
                if data:
                    copy(data)
                    if kind == "train":
                        atomic_write_json(state, {**record, "offset": offset})
                    continue
                current = self.host.job_state(job_dir)
                if current != "running":
                    data, offset = self.host.read_log(job_dir, offset)
                    if data:
                        copy(data)
                        continue  # the last words, then once more
                    for line in splitter.feed(b"", end=True):
                        on_line(line)
                    code = current[1] if isinstance(current, tuple) and current[1] is not None else 137
                    break
                time.sleep(POLL_S)
        except KeyboardInterrupt:
            self.ctx.console.say(f"  Stopping the job on {self.where()} (it saves a checkpoint first)")
            with contextlib.suppress(Exception):
                self.host.stop_job(job_dir)
            raise
        if kind == "train":
            state.unlink(missing_ok=True)
        return Finished(code, time.monotonic() - started, tail)

    def _attach(self, state: Path) -> tuple[str, int]:
        """The training job an earlier lorabuild started here with the same settings, if any."""
        attach = _read_json(state)
        if not attach or attach.get("host") != self.where() or attach.get("resume_key") != self.plan.resume_key:
            return "", 0
        job_dir = str(attach.get("job_dir") or "")
        if not job_dir or self.host.job_state(job_dir) == "missing":
            return "", 0
        return job_dir, int(attach.get("offset", 0))

    def set_aside(self) -> int:
        """Remote twin of the train gate's set-aside: checkpoints made with other settings go to
        checkpoints.earlier/ there. Returns how many entries were moved."""
        folder = str(self.output_dir)
        earlier = f"{self.layout.run_dir}/checkpoints.earlier"
        stamp = f"{folder}/{RUN_STAMP}"
        key = self.plan.resume_key
        script = (
            'mkdir -p -- "$1"\n'
            'n=$(ls -A -- "$1" | grep -vx -- "$4" | wc -l)\n'
            'if [ "$n" -gt 0 ] && ! grep -qF -- "$5" "$3" 2>/dev/null; then\n'
            '  rm -rf -- "$2" && mv -- "$1" "$2" && mkdir -p -- "$1" && echo "$n"\n'
            "fi\n"
            'printf \'{"resume_key": "%s"}\\n\' "$5" > "$3"\n'
        )
        done = self.host.run(["sh", "-c", script, "sh", folder, earlier, stamp, RUN_STAMP, key], timeout=120)
        text = done.stdout.strip()
        return int(text) if text.isdigit() else 0

    def checkpoint_names(self) -> list[str]:
        """LoRA files in the remote output folder other than the final one."""
        final = backends.final_lora(self.plan, Path(self.output_dir)).name
        return [n for n in self.host.list_files(str(self.output_dir)) if n.endswith(".safetensors") and n != final]

    def exists(self, path: Path | PurePosixPath) -> bool:
        return self.host.run(["test", "-f", str(path)], timeout=60, check=False).ok

    def remove(self, path: Path | PurePosixPath) -> None:
        self.host.run(["rm", "-f", "--", str(path)], timeout=60)

    def stop(self) -> None:
        if self.job_dir:
            with contextlib.suppress(Exception):
                self.host.stop_job(self.job_dir)

    def close(self) -> None:
        self.host.close()


def remote_plan(ctx: GateContext, layout: RemoteLayout, python: str) -> Plan:
    """The plan with the remote machine's paths (what its backend config must say)."""
    plan = ctx.plan
    if plan.model.demo:
        model_path = f"{layout.models}/{plan.model.demo}"
    else:
        model_path = f"{layout.models}/{Path(plan.model.path).name}"
    spec = ctx.loaded.spec.backend
    backend_path = layout.src if plan.backend.name == "builtin" else (spec.path or plan.backend.path)
    return plan.model_copy(
        update={
            "grimoire": layout.root,
            "run_dir": layout.run_dir,
            "model": plan.model.model_copy(update={"path": model_path}),
            "dataset": plan.dataset.model_copy(update={"path": layout.dataset}),
            "backend": plan.backend.model_copy(update={"python": python, "path": backend_path}),
        }
    )


def ssh_target(ctx: GateContext) -> Any:
    """The SSH endpoint for `compute: ssh` (the spec's host, user, port and key)."""
    from lorabuild.remote import SshTarget

    compute = ctx.plan.compute
    assert compute.host is not None
    key = str(ctx.loaded.absolute(compute.identity_file)) if compute.identity_file else None
    return SshTarget(
        host=compute.host,
        port=compute.port or 22,
        user=compute.user or getpass.getuser(),
        key_file=key,
        known_hosts=str(ctx.run.known_hosts),
    )


def machine_for(ctx: GateContext) -> LocalMachine | RemoteMachine:
    """The machine the gates run the backend on."""
    if not is_remote(ctx.plan):
        return LocalMachine(ctx)
    if ctx.plan.compute.target == "ssh":
        return RemoteMachine(ctx, ssh_target(ctx))
    from lorabuild.cloud import session

    target, resolve = session.instance_target(ctx)
    machine = RemoteMachine(ctx, target, resolve=resolve, on_train_started=session.after_training_guard(ctx))
    entry = session.current_entry(ctx)
    machine.instance_id = entry.id if entry else None
    return machine


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
