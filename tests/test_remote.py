"""lorabuild.remote against a real OpenSSH server on 127.0.0.1 (tests/sshd.py), no SSH mocks.

The "remote" machine is this one, so remote folders are temporary folders here and the tests can
look at remote processes and files directly. Connections are dropped for real: by killing the
one sshd process that serves a connection, or by stopping the whole server and starting it again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lorabuild.remote import RemoteError, RemoteHost, RetryPolicy, SshTarget, parse_nvidia_smi
from tests import sshd as sshd_helpers
from tests.conftest import lorabuild_env
from tests.sshd import SshServer, connection_pid, kill_pid, pid_alive

PY = sys.executable
# what `ps -eww -o args` shows, read the way ps reads it (procps may be missing in slim CI images)
PROCESS_LIST = """
import glob
def cmdline(path):
    try:
        return open(path, 'rb').read().replace(bytes(1), b' ').decode(errors='replace')
    except OSError:  # the process ended meanwhile
        return ''
ps = '\\n'.join(cmdline(f) for f in glob.glob('/proc/[0-9]*/cmdline'))
"""
needs_rsync = pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync is not installed here")
FAST = RetryPolicy(attempts=8, first_delay=0.2, factor=2.0, max_delay=2.0)
NASTY = [
    "two words",
    "it's",
    'say "hi"',
    "$HOME",
    "${PATH}",
    "a;b",
    "x && y",
    "new\nline",
    "tab\there",
    "`id`",
    "$(id)",
    "*",
    "~",
    "-n",
    "back\\slash",
    "",
    "ünïcødé",
]


@pytest.fixture
def remote(sshd_server: SshServer) -> Iterator[RemoteHost]:
    with RemoteHost(sshd_server.target(), retry=FAST) as host:
        yield host


def wait_exit(remote: RemoteHost, job_dir: str, timeout: float = 30) -> tuple[str, int | None]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        state = remote.job_state(job_dir)
        if isinstance(state, tuple):
            return state
        time.sleep(0.1)
    raise AssertionError(f"the job in {job_dir} did not end within {timeout} s")


def wait_for(predicate: Callable[[], bool], timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def read_all(remote: RemoteHost, job_dir: str, offset: int = 0, timeout: float = 30) -> tuple[bytes, int | None]:
    """Stream the job's log until it ended; (every byte from `offset`, its exit code)."""
    data = b""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        state = remote.job_state(job_dir)
        chunk, offset = remote.read_log(job_dir, offset)
        data += chunk
        if isinstance(state, tuple):
            chunk, offset = remote.read_log(job_dir, offset)
            return data + chunk, state[1]
        time.sleep(0.1)
    raise AssertionError("the job did not end")


# --- commands ----------------------------------------------------------------------------------------


def test_arguments_arrive_intact_and_never_run_as_commands(remote: RemoteHost, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    attacks = [f"; touch {marker}", f"$(touch {marker})", f"`touch {marker}`", f"' ; touch {marker}; '"]
    code = "import json, sys; print(json.dumps(sys.argv[1:]))"
    done = remote.run([PY, "-c", code, *NASTY, *attacks], timeout=30)
    assert json.loads(done.stdout) == [*NASTY, *attacks]
    assert not marker.exists()


def test_env_values_arrive_on_stdin_not_on_any_command_line(remote: RemoteHost) -> None:
    secret = "s3cr3t-run-$(id)-'q' \"dq\"\nline2"
    code = (
        PROCESS_LIST
        + "import os; v = os.environ['LB_SECRET']; print(repr(v)); print(v[:10] in ps, 'LB_' + 'SECRET' in ps)"
    )
    done = remote.run([PY, "-c", code], timeout=30, env={"LB_SECRET": secret})
    assert done.stdout.splitlines() == [repr(secret), "False True"]  # not there; the list itself works
    with pytest.raises(ValueError):
        remote.run(["true"], timeout=10, env={"BAD-NAME": "x"})


def test_failures_say_what_ran_and_how_it_ended(remote: RemoteHost) -> None:
    with pytest.raises(RemoteError) as err:
        remote.run(["sh", "-c", "echo first >&2; echo the reason >&2; exit 3"], timeout=10)
    assert err.value.exit_code == 3 and not err.value.retryable
    assert "exit code 3" in str(err.value) and "the reason" in str(err.value) and "sh -c" in str(err.value)
    done = remote.run(["sh", "-c", "exit 4"], timeout=10, check=False)
    assert done.exited == 4 and not done.ok
    with pytest.raises(RemoteError, match="not installed there"):
        remote.run(["lorabuild-no-such-program"], timeout=10)
    assert remote.which("lorabuild-no-such-program") is None
    assert remote.which("sh")


def test_a_command_that_runs_too_long_times_out_and_the_host_stays_usable(remote: RemoteHost) -> None:
    started = time.monotonic()
    with pytest.raises(RemoteError) as err:
        remote.run(["sleep", "20"], timeout=1)
    assert err.value.timed_out and time.monotonic() - started < 5
    assert "did not finish within 1 s" in str(err.value)
    assert remote.run(["echo", "still here"], timeout=10).stdout == "still here\n"


def test_a_dropped_connection_is_reopened_and_the_command_repeated(remote: RemoteHost, sshd_server: SshServer) -> None:
    kill_pid(connection_pid(remote))
    assert remote.run(["echo", "back"], timeout=10).stdout == "back\n"
    assert remote.reconnects == 1


def test_a_command_that_must_not_repeat_is_reported_when_its_connection_drops(remote: RemoteHost) -> None:
    pid = connection_pid(remote)
    threading.Timer(0.5, kill_pid, args=(pid,)).start()
    with pytest.raises(RemoteError, match="may or may not have finished") as err:
        remote.run(["sleep", "5"], timeout=20, retry=False)
    assert err.value.retryable


def test_wrong_key_is_a_plain_login_problem_not_a_retry(sshd_server: SshServer, tmp_path: Path) -> None:
    key = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    with RemoteHost(sshd_server.target(key_file=str(key)), retry=FAST) as host:
        started = time.monotonic()
        with pytest.raises(RemoteError, match="did not let") as err:
            host.run(["true"], timeout=10)
    assert not err.value.retryable and time.monotonic() - started < 5
    assert "authorized_keys" in str(err.value)


def test_the_host_key_is_pinned_between_runs_and_a_different_one_refused(
    sshd_server: SshServer, tmp_path: Path
) -> None:
    known_hosts = tmp_path / "grimoire" / ".lorabuild" / "known_hosts"
    target = sshd_server.target(known_hosts=str(known_hosts))
    # first contact: trusted and written down
    with RemoteHost(target, retry=FAST) as host:
        assert host.run(["true"], timeout=10).ok
    server_key = (sshd_server.folder / "host_ed25519.pub").read_text().split()[1]
    pinned = known_hosts.read_text()
    assert f"[{sshd_server.host}]:{sshd_server.port} ssh-ed25519 {server_key}" in pinned
    # a later run (a new RemoteHost) connects with that pin, also through the system ssh (rsync)
    with RemoteHost(target, retry=FAST) as host:
        assert host.run(["true"], timeout=10).ok
        assert server_key in Path(host._known_hosts_file()).read_text()  # what rsync's ssh checks against
    assert known_hosts.read_text() == pinned
    # the same address answering with another key: refused at once, with the file to edit
    other = tmp_path / "other_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    other_key = (tmp_path / "other_host_key.pub").read_text().split()[1]
    known_hosts.write_text(pinned.replace(server_key, other_key))
    with RemoteHost(target, retry=FAST) as host:
        started = time.monotonic()
        with pytest.raises(RemoteError, match="different identity") as err:
            host.run(["true"], timeout=10)
    assert not err.value.retryable and time.monotonic() - started < 5
    assert str(known_hosts) in str(err.value) and "reinstalled" in str(err.value)
    assert "fingerprint" in str(err.value)  # the term is explained where it first appears


def test_wait_until_reachable(sshd_server: SshServer) -> None:
    with RemoteHost(sshd_server.target()) as host:
        host.wait_until_reachable(time.monotonic() + 10)
        assert host.run(["true"], timeout=10).ok
    nobody = SshTarget(host="127.0.0.1", port=sshd_helpers.free_port(), user=sshd_server.user, connect_timeout=1)
    with RemoteHost(nobody) as host:
        started = time.monotonic()
        with pytest.raises(RemoteError, match="could not be reached over SSH") as err:
            host.wait_until_reachable(time.monotonic() + 1.5, interval=0.2)
        assert err.value.retryable and time.monotonic() - started < 5


# --- files and folders -------------------------------------------------------------------------------


def test_put_and_get_a_binary_file(remote: RemoteHost, tmp_path: Path) -> None:
    data = bytes(range(256)) * 4096 + b"\r\n\x00end"
    local = tmp_path / "in.bin"
    local.write_bytes(data)
    target = tmp_path / "remote side" / "deep" / "it's.bin"
    remote.put_file(local, str(target), mode=0o600)
    assert target.read_bytes() == data and (target.stat().st_mode & 0o777) == 0o600
    back = tmp_path / "back" / "out.bin"
    remote.get_file(str(target), back)
    assert back.read_bytes() == data
    assert not list(back.parent.glob(".*part*")) and not list(target.parent.glob("*lorabuild-part"))
    with pytest.raises(RemoteError, match="does not exist"):
        remote.get_file(str(tmp_path / "nope"), tmp_path / "nope")


def make_tree(root: Path) -> dict[str, bytes]:
    files = {
        "a.png": os.urandom(50_000),
        "a.txt": b"a caption\n",
        "sub dir/b 'q'.txt": b"b caption\n",
        "sub dir/deeper/c.bin": os.urandom(1000),
    }
    for rel, content in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(content)
    return files


def tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and ".rsync-partial" not in p.parts
    }


@pytest.mark.parametrize("method", [pytest.param("rsync", marks=needs_rsync), "tar"])
def test_sync_dir_and_fetch_dir(remote: RemoteHost, tmp_path: Path, method: str) -> None:
    local, far, back = tmp_path / "local", tmp_path / "far away" / "data", tmp_path / "back"
    files = make_tree(local)
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"linked")
    (local / "link.txt").symlink_to(outside)  # a symlinked picture arrives as a real file
    linked_dir = tmp_path / "model"
    linked_dir.mkdir()
    (linked_dir / "w.bin").write_bytes(b"weights")
    (local / "model").symlink_to(linked_dir, target_is_directory=True)  # and a linked folder with its files
    expected = {**files, "link.txt": b"linked", "model/w.bin": b"weights"}

    first = remote.sync_dir(local, str(far), method=method)
    assert first.method == method and sorted(first.files) == sorted(expected)
    assert tree(far) == expected and not (far / "link.txt").is_symlink() and not (far / "model").is_symlink()

    (local / "a.txt").write_bytes(b"a better caption\n")
    second = remote.sync_dir(local, str(far), method=method)
    if method == "rsync":
        assert second.files == ("a.txt",)  # only what changed moves
    else:
        assert sorted(second.files) == sorted(expected)  # tar sends everything, every time
    assert (far / "a.txt").read_bytes() == b"a better caption\n"

    (far / "stale.txt").write_bytes(b"old")
    remote.sync_dir(local, str(far), method=method)
    assert (far / "stale.txt").exists()  # kept without delete=True
    remote.sync_dir(local, str(far), delete=True, method=method)
    assert not (far / "stale.txt").exists()

    got = remote.fetch_dir(str(far), back, patterns=["*.txt"], method=method)
    assert sorted(got.files) == ["a.txt", "link.txt", "sub dir/b 'q'.txt"]
    assert tree(back) == {k: v for k, v in tree(far).items() if k.endswith(".txt")}
    everything = remote.fetch_dir(str(far), back / "all", method=method)
    assert tree(back / "all") == tree(far) and len(everything.files) == len(tree(far))
    assert remote.fetch_dir(str(far), back / "none", patterns=["*.nothing"], method=method).files == ()


@pytest.mark.parametrize(
    "step", ["put_file", "sync_dir tar", "fetch_dir tar", pytest.param("sync_dir rsync", marks=needs_rsync)]
)
def test_a_transfer_cut_by_a_dropped_connection_is_redone(
    remote: RemoteHost, sshd_server: SshServer, tmp_path: Path, step: str
) -> None:
    big = os.urandom(64_000_000 if "rsync" in step else 24_000_000)
    local, far = tmp_path / "local", tmp_path / "far"
    for folder in (local, far):
        folder.mkdir()
        (folder / "big.bin").write_bytes(big)
        (folder / "small.txt").write_bytes(b"small")
    # kill the connection as soon as the first bytes of the big file have landed
    landing = {
        "put_file": lambda: list((far / "sub").glob("big.bin.lorabuild-part")),
        "sync_dir tar": lambda: list((far / "copy").glob("big.bin")),
        "fetch_dir tar": lambda: list((local / "back").glob(".big.bin.part-*")),
        "sync_dir rsync": lambda: list((far / "copy").glob(".big.bin.*")),  # rsync's temporary file
    }[step]
    ours = connection_pid(remote)
    remote.has_rsync()  # asked before the cut, so only the transfer's own connection is new

    def cut() -> None:
        end = time.monotonic() + 20
        while time.monotonic() < end:
            with contextlib.suppress(OSError):
                if any(p.stat().st_size > 0 for p in landing()):
                    break
            time.sleep(0.002)
        if "rsync" in step:  # rsync runs its own ssh: kill the session serving that one
            for pid in set(sshd_server.session_pids()) - {ours}:
                kill_pid(pid)
        else:
            kill_pid(ours)

    killer = threading.Thread(target=cut)
    killer.start()
    if step == "put_file":
        remote.put_file(local / "big.bin", str(far / "sub" / "big.bin"))
        assert (far / "sub" / "big.bin").read_bytes() == big
        assert sorted(p.name for p in (far / "sub").iterdir()) == ["big.bin"]
    elif step.startswith("sync_dir"):
        remote.sync_dir(local, str(far / "copy"), method=step.split()[1])
        assert tree(far / "copy") == tree(local)
    else:
        remote.fetch_dir(str(far), local / "back", method="tar")
        assert tree(local / "back") == tree(far)
        assert not [p for p in (local / "back").iterdir() if ".part-" in p.name]
    killer.join()
    assert remote.reconnects == 1


@needs_rsync
def test_auto_uses_rsync_when_both_ends_have_it(remote: RemoteHost, tmp_path: Path) -> None:
    make_tree(tmp_path / "local")
    assert remote.has_rsync()
    assert remote.sync_dir(tmp_path / "local", str(tmp_path / "far")).method == "rsync"


# --- detached jobs -----------------------------------------------------------------------------------

COUNTER = """
import sys, time
for i in range(int(sys.argv[1])):
    print(f"line {i}", flush=True)
    time.sleep(float(sys.argv[2]))
sys.exit(int(sys.argv[3]))
"""


def expected_lines(n: int) -> bytes:
    return "".join(f"line {i}\n" for i in range(n)).encode()


def test_job_survives_its_connection_being_killed_and_is_reattached_by_its_folder(
    sshd_server: SshServer, tmp_path: Path
) -> None:
    job_dir = str(tmp_path / "jobs" / "run 1")
    with RemoteHost(sshd_server.target(), retry=FAST) as first:
        job = first.start_job(job_dir, [PY, "-c", COUNTER, "40", "0.05", "7"], env={}, cwd=str(tmp_path))
        assert job.pgid > 1 and first.job_state(job_dir) == "running"
        wait_for(lambda: b"line 3" in (tmp_path / "jobs" / "run 1" / "out.log").read_bytes())
        seen, offset = first.read_log(job_dir, 0)
        kill_pid(connection_pid(first))  # the SSH session that started the job dies
        assert first.job_state(job_dir) == "running"  # reconnected; the job did not notice
        assert first.reconnects == 1
    # a new lorabuild process finds it again by its folder and reads on where the first stopped
    with RemoteHost(sshd_server.target(), retry=FAST) as second:
        rest, code = read_all(second, job_dir, offset)
    assert seen + rest == expected_lines(40)
    assert code == 7


def test_reading_the_log_resumes_at_the_right_offset_after_drops(remote: RemoteHost, tmp_path: Path) -> None:
    job_dir = str(tmp_path / "job")
    writer = "import sys\nfor i in range(400000): sys.stdout.write(f'{i:09d} ' + 'x' * 10 + '\\n')\n"
    remote.start_job(job_dir, [PY, "-c", writer], env={}, cwd=str(tmp_path))
    assert wait_exit(remote, job_dir) == ("exited", 0)
    expected = (tmp_path / "job" / "out.log").read_bytes()
    assert len(expected) > 8_000_000
    data, offset, drops = b"", 0, 0
    while True:
        if drops < 3:
            # kill the connection while a read is (probably) in flight; either way the next read
            # meets a dead connection and must resume exactly at `offset`
            threading.Timer(0.05, kill_pid, args=(connection_pid(remote),)).start()
            drops += 1
        chunk, offset = remote.read_log(job_dir, offset, max_bytes=3_000_000)
        if not chunk:
            break
        data += chunk
    assert remote.reconnects >= 3
    assert offset == len(expected)
    assert hashlib.sha256(data).hexdigest() == hashlib.sha256(expected).hexdigest()


def test_sshd_restarted_mid_job_reconnects_with_backoff(sshd_server: SshServer, tmp_path: Path) -> None:
    job_dir = str(tmp_path / "job")
    with RemoteHost(sshd_server.target(), retry=FAST) as host:
        host.start_job(job_dir, [PY, "-c", COUNTER, "40", "0.1", "0"], env={}, cwd=str(tmp_path))
        first, offset = host.read_log(job_dir, 0)
        sshd_server.stop()
        restart = threading.Timer(1.5, sshd_server.start)
        restart.start()
        try:
            started = time.monotonic()
            assert host.job_state(job_dir) == "running"  # refused, refused, … then back
            assert time.monotonic() - started >= 1.0
            assert host.reconnects == 1
        finally:
            restart.join()
        rest, code = read_all(host, job_dir, offset)
    assert first + rest == expected_lines(40) and code == 0


def test_job_env_is_private_and_never_on_a_command_line(remote: RemoteHost, tmp_path: Path) -> None:
    secret = "hf_plantedSecret-'$(id)'\"x\" end"
    digest = hashlib.sha256(secret.encode()).hexdigest()  # the job's own command line holds only this
    code = (
        "import hashlib, os, time; seen = hashlib.sha256(os.environ['LB_TOKEN'].encode()).hexdigest(); "
        f"print('secret ok' if seen == {digest!r} else 'secret WRONG', flush=True); time.sleep(30)"
    )
    job_dir = str(tmp_path / "job")
    remote.start_job(job_dir, [PY, "-c", code], env={"LB_TOKEN": secret, "OTHER": "1"}, cwd=str(tmp_path))
    try:
        wait_for(lambda: b"secret" in (tmp_path / "job" / "out.log").read_bytes())
        assert (tmp_path / "job" / "out.log").read_bytes() == b"secret ok\n"
        ps = remote.run([PY, "-c", PROCESS_LIST + "print(ps)"], timeout=10).stdout
        assert digest in ps  # the job's own command line is listed; its secret is not
        assert "plantedSecret" not in ps
        assert (tmp_path / "job" / "env").stat().st_mode & 0o777 == 0o600
        assert (tmp_path / "job").stat().st_mode & 0o077 == 0
    finally:
        remote.stop_job(job_dir, grace=2)


def test_stop_job_stops_the_whole_process_group(remote: RemoteHost, tmp_path: Path) -> None:
    code = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "open('child.pid', 'w').write(str(child.pid))\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    job_dir = str(tmp_path / "job")
    job = remote.start_job(job_dir, [PY, "-c", code], env={}, cwd=str(tmp_path))
    wait_for(lambda: (tmp_path / "job" / "out.log").read_bytes() == b"ready\n")
    child = int((tmp_path / "child.pid").read_text())
    assert os.getpgid(child) == job.pgid
    assert remote.stop_job(job_dir, grace=5) == ("exited", 143)  # SIGTERM ended it
    assert not pid_alive(child) and not pid_alive(job.pgid)
    assert remote.stop_job(job_dir, grace=5) == ("exited", 143)  # again: nothing left to stop


def test_stop_job_kills_a_job_that_ignores_sigterm(remote: RemoteHost, tmp_path: Path) -> None:
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    )
    job_dir = str(tmp_path / "job")
    job = remote.start_job(job_dir, [PY, "-c", code], env={}, cwd=str(tmp_path))
    wait_for(lambda: (tmp_path / "job" / "out.log").read_bytes() == b"ready\n")
    started = time.monotonic()
    assert remote.stop_job(job_dir, grace=1) == ("exited", 137)
    assert 1 <= time.monotonic() - started < 10 and not pid_alive(job.pgid)


def test_job_states_and_odd_folders(remote: RemoteHost, tmp_path: Path) -> None:
    assert remote.job_state(str(tmp_path / "no job here")) == "missing"
    work = tmp_path / "work dir 'q' $x"
    work.mkdir()
    job_dir = str(tmp_path / "job; rm -rf ~")
    code = "import os, sys; print(os.getcwd()); print(sys.argv[1:])"
    remote.start_job(job_dir, [PY, "-c", code, *NASTY], env={}, cwd=str(work))
    assert wait_exit(remote, job_dir) == ("exited", 0)
    log, _ = remote.read_log(job_dir, 0)
    assert log.decode().splitlines() == [str(work), repr(NASTY)]
    with pytest.raises(RemoteError, match="already holds a job"):
        remote.start_job(job_dir, ["true"], env={}, cwd=str(work))
    missing = str(tmp_path / "job2")
    remote.start_job(missing, ["lorabuild-no-such-program"], env={}, cwd=str(work))
    assert wait_exit(remote, missing) == ("exited", 127)
    remote.start_job(str(tmp_path / "job3"), ["true"], env={}, cwd=str(tmp_path / "gone"))
    assert wait_exit(remote, str(tmp_path / "job3")) == ("exited", 126)


# --- Gate 3, remotely ----------------------------------------------------------------------------------


def test_probe_python_with_this_venvs_python(remote: RemoteHost) -> None:
    facts = remote.probe_python(PY, ["json", "lorabuild_no_such_module"])
    assert facts["executable"] and facts["python"].count(".") == 2
    assert facts["modules"]["json"] and facts["modules"]["lorabuild_no_such_module"] is None
    assert "torch" in facts  # a version, or None with torch_error
    missing = remote.probe_python("/nonexistent/python3", [])
    assert "not found" in missing["error"]


def test_gpu_report_without_nvidia_smi(remote: RemoteHost) -> None:
    if remote.which("nvidia-smi"):
        pytest.skip("this machine has nvidia-smi")
    report = remote.gpu_report()
    assert report.gpus == () and report.problem and "no NVIDIA GPU found" in report.problem


def test_gpu_report_reads_nvidia_smi(remote: RemoteHost, tmp_path: Path) -> None:
    # a stand-in for the driver's tool (the transport and the parsing are real)
    fake = tmp_path / "nvidia-smi"
    fake.write_text(
        "#!/bin/sh\n"
        'case "$1" in\n'
        "  --query-gpu=compute_cap) printf '9.0\\n8.9\\n' ;;\n"
        "  --query-gpu=*) printf '0, NVIDIA H200, 143771, 143000, 570.86.15\\n"
        "1, NVIDIA GeForce RTX 4090, 24564, 20000, 570.86.15\\n' ;;\n"
        "  *) echo '| NVIDIA-SMI 570.86.15   Driver Version: 570.86.15   CUDA Version: 12.8 |' ;;\n"
        "esac\n"
    )
    fake.chmod(0o755)
    report = remote.gpu_report(nvidia_smi=str(fake))
    assert [g.name for g in report.gpus] == ["NVIDIA H200", "NVIDIA GeForce RTX 4090"]
    assert report.gpus[1].total_gb == pytest.approx(25.757, abs=0.01)
    assert report.gpus[0].capability == (9, 0) and report.driver == "570.86.15" and report.cuda_driver == "12.8"
    assert parse_nvidia_smi("").problem == "the NVIDIA driver is running but sees no GPU"


def test_free_bytes_and_paths(remote: RemoteHost, tmp_path: Path) -> None:
    free = remote.free_bytes(str(tmp_path / "not" / "yet"))
    assert abs(free - os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize) < 200_000_000
    assert remote.expand_path("~/runs") == str(Path.home() / "runs")
    assert remote.expand_path("/abs/~x") == "/abs/~x"


def test_importing_remote_stays_light() -> None:
    code = (
        "import sys, lorabuild.remote; "
        "print(sorted(m for m in ('fabric', 'paramiko', 'invoke', 'httpx') if m in sys.modules))"
    )
    done = subprocess.run([PY, "-c", code], capture_output=True, text=True, env=lorabuild_env(), check=True)
    assert done.stdout.strip() == "[]"
