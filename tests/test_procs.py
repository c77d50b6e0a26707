"""Backend processes: own process group, stopped as a group, never outliving lorabuild; the run lock."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lorabuild import runlock
from lorabuild.backends import Launch
from lorabuild.procs import _proc_start_time, run_streaming, stop_leftover
from tests.conftest import lorabuild_env


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_until(predicate, timeout: float = 20) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_output_is_streamed_and_logged(tmp_path: Path) -> None:
    lines: list[str] = []
    log = io.StringIO()
    launch = Launch(
        [sys.executable, "-u", "-c", "import sys; print('one'); print('two', file=sys.stderr); print('three')"],
        tmp_path,
    )
    done = run_streaming(launch, log=log, on_line=lines.append, pid_file=tmp_path / "pid")
    assert done.returncode == 0
    assert [line.strip() for line in lines] == ["one", "two", "three"]
    assert log.getvalue().split() == ["one", "two", "three"]
    assert not (tmp_path / "pid").exists()


def test_the_backend_runs_in_its_own_group_and_an_error_stops_the_whole_group(tmp_path: Path) -> None:
    script = textwrap.dedent("""
        import os, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print(os.getpid(), os.getpgid(0), child.pid, flush=True)
        time.sleep(60)
    """)
    seen: list[list[int]] = []

    def on_line(line: str) -> None:
        seen.append([int(x) for x in line.split()])
        raise RuntimeError("stop it")

    with pytest.raises(RuntimeError):
        run_streaming(
            Launch([sys.executable, "-c", script], tmp_path),
            log=io.StringIO(),
            on_line=on_line,
            pid_file=tmp_path / "pid",
        )
    ((pid, pgid, grandchild),) = seen
    assert pgid == pid != os.getpgid(0)
    assert wait_until(lambda: not alive(pid) and not alive(grandchild))


def test_a_backend_dies_with_a_lorabuild_killed_outright(tmp_path: Path) -> None:
    marker = tmp_path / "child.pid"
    parent = textwrap.dedent(f"""
        import io, sys
        from pathlib import Path
        from lorabuild.backends import Launch
        from lorabuild.procs import run_streaming
        child = "import os, time; open({str(marker)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
        run_streaming(Launch([sys.executable, "-c", child], Path({str(tmp_path)!r})), log=io.StringIO(),
                      on_line=lambda line: None, pid_file=Path({str(tmp_path / "pid")!r}))
    """)
    proc = subprocess.Popen([sys.executable, "-c", parent], env=lorabuild_env(), start_new_session=True)
    assert wait_until(lambda: marker.exists() and marker.read_text() != "")
    child = int(marker.read_text())
    assert alive(child)
    proc.kill()  # SIGKILL: no cleanup code in lorabuild runs
    proc.wait()
    assert wait_until(lambda: not alive(child)), "the backend outlived lorabuild"


def test_the_next_run_stops_a_recorded_leftover(tmp_path: Path) -> None:
    # a backend that ignores its parent's death (as a grandchild of `accelerate launch` would)
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    pid_file = tmp_path / "backend.pid"
    pid_file.write_text(json.dumps({"pid": orphan.pid, "pgid": orphan.pid, "start": _proc_start_time(orphan.pid)}))
    assert stop_leftover(pid_file) == orphan.pid
    orphan.wait(timeout=10)
    assert not pid_file.exists()


def test_a_reused_pid_is_never_killed(tmp_path: Path) -> None:
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
    pid_file = tmp_path / "backend.pid"
    pid_file.write_text(json.dumps({"pid": bystander.pid, "pgid": 999_999_999, "start": "not-its-start-time"}))
    assert stop_leftover(pid_file) is None
    assert bystander.poll() is None
    bystander.kill()
    bystander.wait()


def test_interrupt_stops_the_group_with_sigterm_first(tmp_path: Path) -> None:
    script = textwrap.dedent("""
        import signal, sys, time
        def bye(*_):
            print("got SIGTERM, saving", flush=True)
            sys.exit(130)
        signal.signal(signal.SIGTERM, bye)
        print("ready", flush=True)
        time.sleep(60)
    """)
    lines: list[str] = []

    def on_line(line: str) -> None:
        lines.append(line.strip())
        if line.strip() == "ready":
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        run_streaming(
            Launch([sys.executable, "-u", "-c", script], tmp_path),
            log=io.StringIO(),
            on_line=on_line,
            pid_file=tmp_path / "pid",
        )
    assert lines == ["ready"]  # the backend got SIGTERM (its own handler ran; output after it is not read)


def test_lock_is_exclusive_across_processes_and_names_the_holder(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from lorabuild import runlock; from pathlib import Path; "
            f"runlock.acquire(Path({str(lock)!r})); print('held', flush=True); time.sleep(30)",
        ],
        env=lorabuild_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    with pytest.raises(runlock.LockBusy) as busy:
        runlock.acquire(lock)
    assert busy.value.holder.pid == holder.pid
    assert runlock.is_held(lock)
    holder.kill()
    holder.wait()
    # the kernel releases the lock of a killed process: no stale lock
    runlock.acquire(lock)
    runlock.acquire(lock)  # re-entrant in one process
    runlock.release(lock)
    assert not runlock.is_held(lock)
