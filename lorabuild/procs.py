"""Running a backend as a child process that can never outlive lorabuild.

Owns the backend process: started with an argv (never a shell) in its own session and process
group, asked by the kernel to get SIGTERM when lorabuild dies (PR_SET_PDEATHSIG), recorded in a
pid file so the next run finds and stops a survivor (a grandchild of `accelerate launch`, say),
and stopped as a whole group — SIGTERM, a grace period to save a checkpoint, then SIGKILL — on
Ctrl-C, SIGTERM or any error. Its output is merged into one stream, written to a log file and
handed to the caller line by line.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from lorabuild.fsutil import atomic_write_json, atomic_write_text

if TYPE_CHECKING:  # backends imports the plan (pydantic): not needed to stop a process
    from lorabuild.backends import Launch

PR_SET_PDEATHSIG = 1
STOP_GRACE_SECONDS = 30.0


@dataclass(frozen=True)
class Finished:
    returncode: int
    seconds: float
    tail: list[str]  # the last lines of output, for diagnosis


class LaunchFailed(Exception):
    """The backend's program could not be started at all (missing or not executable)."""

    def __init__(self, program: str, reason: str):
        self.program = program
        self.reason = reason
        super().__init__(f"{program}: {reason}")


class Interrupted(KeyboardInterrupt):
    """lorabuild was asked to stop (Ctrl-C or SIGTERM) while a backend ran."""


def sigterm_as_interrupt() -> None:
    """Turn SIGTERM into KeyboardInterrupt, so doit's cleanup and ours run as for Ctrl-C."""

    def handler(signum: int, _frame: object) -> None:
        raise Interrupted(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def _child_setup(memory_limit_bytes: int | None) -> Callable[[], None]:
    parent = os.getpid()

    def setup() -> None:
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL("libc.so.6", use_errno=True)
                libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
            except OSError:
                pass
            if os.getppid() != parent:  # the parent died before prctl took effect
                os._exit(1)
        if memory_limit_bytes:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (memory_limit_bytes, memory_limit_bytes))

    return setup


def _proc_start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (guards against a reused pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name may contain spaces and parentheses: fields start after the last ')'
    return stat.rsplit(")", 1)[1].split()[19]


def run_streaming(
    launch: Launch,
    *,
    log: IO[str],
    on_line: Callable[[str], None],
    pid_file: Path,
    memory_limit_bytes: int | None = None,
    tail_lines: int = 40,
) -> Finished:
    """Run `launch` to the end, teeing its output to `log` and `on_line`; stop it on interrupt.

    `on_line` may raise (for example to stop a run whose loss exploded); the process group is
    then stopped and the exception propagates.
    """
    env = {**os.environ, **launch.env, "LORABUILD_PARENT_PID": str(os.getpid())}
    started = time.monotonic()
    for path, text in launch.files.items():
        atomic_write_text(path, text)
    try:
        proc = _start(launch, env, memory_limit_bytes)
    except FileNotFoundError:
        raise LaunchFailed(launch.argv[0], "the program was not found") from None
    except PermissionError:
        raise LaunchFailed(launch.argv[0], "the program is not executable") from None
    except OSError as exc:
        raise LaunchFailed(launch.argv[0], exc.strerror or str(exc)) from None
    return _follow(proc, launch, log, on_line, pid_file, tail_lines, started)


def _start(launch: Launch, env: dict[str, str], memory_limit_bytes: int | None) -> subprocess.Popen[bytes]:
    if not launch.cwd.is_dir():
        raise LaunchFailed(str(launch.cwd), "the folder the backend runs in does not exist")
    return subprocess.Popen(
        launch.argv,
        cwd=launch.cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        bufsize=0,
        start_new_session=True,
        preexec_fn=_child_setup(memory_limit_bytes),
    )


def _follow(
    proc: subprocess.Popen[bytes],
    launch: Launch,
    log: IO[str],
    on_line: Callable[[str], None],
    pid_file: Path,
    tail_lines: int,
    started: float,
) -> Finished:
    atomic_write_json(
        pid_file,
        {"pid": proc.pid, "pgid": proc.pid, "start": _proc_start_time(proc.pid), "argv": launch.argv[:4]},
    )
    tail: list[str] = []
    splitter = LineSplitter()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    try:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        while chunk := os.read(fd, 65536):
            log.write(decoder.decode(chunk))
            log.flush()
            for line in splitter.feed(chunk):
                tail.append(line)
                del tail[:-tail_lines]
                on_line(line)
        for line in splitter.feed(b"", end=True):
            tail.append(line)
            on_line(line)
        proc.wait()
    except BaseException:
        stop_group(proc.pid, proc)
        raise
    finally:
        if proc.poll() is None:
            stop_group(proc.pid, proc)
        pid_file.unlink(missing_ok=True)
    return Finished(proc.returncode, time.monotonic() - started, tail)


class LineSplitter:
    """Split a byte stream into text lines on \\n and on \\r (progress bars redraw with \\r).

    A line is handed on as soon as its end arrives, so a tqdm update is seen at once rather
    than when the next one is drawn. Blank lines are dropped.
    """

    def __init__(self) -> None:
        self._rest = b""

    def feed(self, chunk: bytes, end: bool = False) -> list[str]:
        data = self._rest + chunk
        parts = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        self._rest = b"" if end else parts.pop()
        # a trailing \r may be half of a \r\n still to come: that only ever yields a blank line
        return [text for part in parts if (text := part.decode("utf-8", errors="replace").strip())]


def stop_group(pgid: int, proc: subprocess.Popen[bytes] | None = None, grace: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM the whole process group, wait up to `grace` seconds, then SIGKILL it."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None and not _group_alive(pgid):
            return
        if proc is None and not _group_alive(pgid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    if proc is not None:
        proc.wait()


def pid_alive(pid: object) -> bool:
    """Whether a process with this id exists (one of another user's counts; a bad id does not)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie leader still counts for killpg; treat a group of zombies as gone
    try:
        members = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return True
    for pid in members:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def stop_leftover(pid_file: Path) -> int | None:
    """Stop a backend left running by a lorabuild that was killed outright; its pid, if any."""
    try:
        info = json.loads(pid_file.read_text(encoding="utf-8"))
        pid, pgid, start = int(info["pid"]), int(info["pgid"]), info.get("start")
    except (OSError, ValueError, KeyError, TypeError):
        pid_file.unlink(missing_ok=True)
        return None
    alive = _proc_start_time(pid) is not None and _proc_start_time(pid) == start
    if alive or _group_alive(pgid):
        stop_group(pgid, None, grace=STOP_GRACE_SECONDS)
        pid_file.unlink(missing_ok=True)
        return pid
    pid_file.unlink(missing_ok=True)
    return None
