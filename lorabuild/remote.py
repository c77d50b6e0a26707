"""One remote machine over SSH: commands, files, folders and detached jobs that survive drops.

Owns everything about talking to a machine lorabuild trains on but does not run on: a host the
artist can reach (`compute: {target: ssh}`) or a rented cloud instance. Built on a Fabric 3
`Connection` (paramiko underneath), isolated from the user's ~/.ssh/config and known_hosts, with
bounded connect / banner / auth timeouts and SSH keepalives. A machine's identity (its host key)
is trusted the first time and pinned from then on, in the target's own known_hosts file when it
has one (kept in the grimoire between runs), so a machine that answers with another key later is
refused. Every operation goes through one
reconnect-with-backoff wrapper, so a dropped connection (dead transport, EOF, socket error) is
reopened and the operation repeated; that is why every operation here is safe to repeat.

- Commands are argv lists joined with `shlex.join`, never strings built from spec values, so a
  value from a spec can never run as a command. Environment values go to the remote shell on
  stdin, never on its command line (where `ps` would show them).
- Folders move with rsync over the system ssh (only changed files; partial files kept aside)
  when both ends have rsync, otherwise as one tar stream over an SSH channel (everything, every
  time). Fabric itself has no recursive transfer.
- Training runs as a detached job in its own folder on the remote machine (`setsid nohup`, its
  own process group, output in `out.log`, exit code in `exit`), so it keeps running when SSH
  drops, and is found again by that folder.
- Gate 3 runs remotely from here: the backend Python's probe, the GPUs (nvidia-smi), free disk.

fabric and paramiko are imported inside functions: `lorabuild validate` and `status` stay light.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import math
import os
import re
import select
import shlex
import shutil
import socket
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from lorabuild.studio import Gpu, GpuReport

if TYPE_CHECKING:
    from fabric import Connection

log = logging.getLogger(__name__)

T = TypeVar("T")

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
STDERR_TAIL_LINES = 12
PROBE_TIMEOUT_S = 180.0
PARTIAL_DIR = ".rsync-partial"  # rsync keeps interrupted files here, never under their real name
READ_CHUNK = 65536

# rsync exit codes that mean the connection, not the files, failed (rsync(1) "EXIT VALUES";
# 255 is ssh's own): worth reconnecting and trying again.
RSYNC_RETRYABLE = {10, 12, 30, 35, 255}
RSYNC_VANISHED = 24  # some source files vanished while copying (a checkpoint pruned mid-pull)

JobState = Literal["running", "missing"] | tuple[Literal["exited"], int | None]


# --- public types ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SshTarget:
    """Where and how to log in. `key_file` None: use the SSH agent and ~/.ssh's default keys."""

    host: str
    port: int
    user: str
    key_file: str | None = None
    connect_timeout: float = 15.0  # seconds for the TCP connect, the SSH banner and the login each
    keepalive: int = 15  # seconds between SSH keepalive messages (0: none)
    known_hosts: str | None = None  # where the pinned host key is kept between runs (None: this run only)

    def describe(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try when the connection drops: `attempts` tries in all, waiting `first_delay`
    seconds after the first failure and `factor` times longer after each next one, at most
    `max_delay`. The defaults wait 1+2+4+8+16 = 31 s over 6 tries: enough for a cloud instance's
    network blip or an sshd restart, short enough that a machine that is gone is reported soon."""

    attempts: int = 6
    first_delay: float = 1.0
    factor: float = 2.0
    max_delay: float = 30.0

    def delays(self) -> list[float]:
        return [min(self.first_delay * self.factor**i, self.max_delay) for i in range(max(self.attempts - 1, 0))]


@dataclass(frozen=True)
class Result:
    exited: int  # the command's exit code; -1 when it was stopped by a signal
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exited == 0


@dataclass(frozen=True)
class Job:
    """A detached job on the remote machine. Its id is its folder."""

    job_dir: str
    pgid: int


@dataclass(frozen=True)
class SyncResult:
    method: Literal["rsync", "tar"]  # rsync moves only changed files; tar moves all of them
    files: tuple[str, ...]  # paths (relative to the folder) that were sent


class RemoteError(Exception):
    """Something on the remote machine failed, in plain language.

    `retryable`: a connection problem (the machine may be back soon), not a command that failed.
    `exit_code`, `stderr_tail`, `command`: what ran and how it ended, when a command ran."""

    def __init__(
        self,
        message: str,
        *,
        retryable: bool = False,
        exit_code: int | None = None,
        stderr_tail: str = "",
        command: str | None = None,
        timed_out: bool = False,
    ):
        self.retryable = retryable
        self.exit_code = exit_code
        self.stderr_tail = stderr_tail
        self.command = command
        self.timed_out = timed_out
        super().__init__(message)


class _Dropped(Exception):
    """The SSH connection went away in the middle of an operation (internal: always retried)."""


# --- remote shell snippets (constant text; values only ever arrive as quoted positional args) ----

# Each snippet runs as `sh -c SNIPPET sh ARG...`: the arguments are "$1", "$2"... inside it.
_STATE_SH = r"""
d=$1
[ -d "$d" ] || { echo missing; exit 0; }
[ -s "$d/exit" ] && { echo "exited $(cat "$d/exit")"; exit 0; }
if [ ! -s "$d/pgid" ]; then
  if [ -d "$d/started" ]; then
    if [ -n "$(find "$d/started" -maxdepth 0 -mmin +1 2>/dev/null)" ]; then echo "exited none"; else echo running; fi
  else
    echo missing
  fi
  exit 0
fi
if kill -s 0 -- "-$(cat "$d/pgid")" 2>/dev/null; then echo running; exit 0; fi
[ -s "$d/exit" ] && { echo "exited $(cat "$d/exit")"; exit 0; }
echo "exited none"
"""

# The job's wrapper. setsid made it a session and process-group leader, so its pid ($$) is the
# group every process of the job belongs to. The job runs in a subshell (which gets default
# signal handling back), so a SIGTERM to the group stops the job and the wrapper still writes the
# exit code once it has ended.
_WRAPPER_SH = r"""# lorabuild job wrapper (lorabuild.remote): runs command.sh detached from any SSH session,
# records its process group in ./pgid and the job's exit code in ./exit when it ends.
echo $$ > pgid.tmp && mv -f pgid.tmp pgid
trap 'stopping=1' HUP INT TERM
( . ./env && . ./command.sh ) > out.log 2>&1 < /dev/null
code=$?
echo "$code" > exit.tmp && mv -f exit.tmp exit
"""

# Start a job: the folder is created private (umask 077), `started` guards against starting the
# same folder twice (exit 75), the environment file arrives on stdin (0600, never on a command
# line), then the wrapper goes into the background in its own session and we wait for its pgid.
_LAUNCH_SH = r"""
set -e
umask 077
mkdir -p -- "$1"
cd -- "$1"
if ! mkdir started 2>/dev/null; then echo "a job was already started in $1" >&2; exit 75; fi
cat > env
printf '%s' "$2" > wrapper.sh
printf '%s' "$3" > command.sh
: > out.log
setsid nohup sh ./wrapper.sh > launch.log 2>&1 < /dev/null &
i=0
while [ ! -s pgid ]; do
  i=$((i + 1))
  if [ "$i" -gt 150 ]; then cat launch.log >&2; exit 70; fi
  sleep 0.1
done
cat pgid
"""

_WAIT_PGID_SH = r"""
i=0
while [ ! -s "$1/pgid" ]; do
  i=$((i + 1))
  if [ "$i" -gt 150 ]; then cat "$1/launch.log" >&2; exit 70; fi
  sleep 0.1
done
cat "$1/pgid"
"""

_STOP_SH = r"""
d=$1; tenths=$2
[ -s "$d/pgid" ] || { echo none; exit 0; }
g=$(cat "$d/pgid")
kill -s TERM -- "-$g" 2>/dev/null || { echo gone; exit 0; }
i=0
while kill -s 0 -- "-$g" 2>/dev/null; do
  if [ "$i" -ge "$tenths" ]; then
    kill -s KILL -- "-$g" 2>/dev/null || true
    sleep 0.2
    [ -s "$d/exit" ] || { echo 137 > "$d/exit.tmp" && mv -f "$d/exit.tmp" "$d/exit"; }
    echo killed; exit 0
  fi
  sleep 0.1
  i=$((i + 1))
done
echo stopped
"""

_READ_LOG_SH = r"""
[ -f "$1" ] || exit 0
tail -c "+$2" -- "$1" | head -c "$3"
"""

_FREE_SH = r"""
p=$1
while [ ! -e "$p" ]; do p=$(dirname -- "$p"); done
df -Pk -- "$p" | tail -n 1
"""

_LIST_FILES_SH = r"""
[ -d "$1" ] || exit 0
cd -- "$1" && find . -type f -print0
"""

# Environment values arrive on stdin as `export K='v'` lines and are evaluated by the remote
# shell, so they never appear in a process list.
_WITH_ENV_SH = 'eval "$(cat)" && exec "$@"'


def _snippet(script: str, *args: str) -> list[str]:
    return ["sh", "-c", script, "sh", *args]


def _exports(env: Mapping[str, str]) -> bytes:
    lines = []
    for key, value in env.items():
        if not ENV_NAME.fullmatch(key):
            raise ValueError(f"{key!r} cannot be an environment variable name (letters, digits and _ only)")
        lines.append(f"export {key}={shlex.quote(value)}\n")
    return "".join(lines).encode("utf-8")


def _short_command(argv: Iterable[str], limit: int = 60) -> str:
    """The command as a person can read it in an error message (long arguments cut)."""
    parts = []
    for arg in argv:
        arg = arg if len(arg) <= limit else arg[: limit - 1] + "…"
        parts.append(shlex.quote(" ".join(arg.split())) if "\n" in arg else shlex.quote(arg))
    return " ".join(parts)


def _tail(text: str, lines: int = STDERR_TAIL_LINES) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _describe_exc(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --- the remote host ------------------------------------------------------------------------------


def _load_host_keys(path: str | None) -> Any:
    """The pinned host keys: those kept in `path` (a known_hosts file), or none yet."""
    import paramiko

    keys = paramiko.HostKeys()
    if path and os.path.exists(path):
        with contextlib.suppress(OSError, UnicodeDecodeError):
            keys.load(path)  # paramiko skips lines it cannot read; then the key is learned again
    return keys


def _save_host_keys(keys: Any, path: str) -> None:
    """Write the pinned keys to `path` at once (a reader never sees half a file)."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}-{threading.get_ident()}")
    keys.save(tmp)
    os.replace(tmp, path)


def _check_tar(status: int, err: str, doing: str) -> None:
    """Raise for a tar stream that did not end well: cut off (retried) or failed (said plainly)."""
    if status == -1:
        raise _Dropped("the connection closed before tar reported how it ended")
    if status != 0:
        raise RemoteError(
            f"{doing} failed (tar exit code {status}):\n{_tail(err)}", exit_code=status, stderr_tail=_tail(err)
        )


class RemoteHost:
    """One remote machine. Use as a context manager; the connection opens on first use.

    `resolve`: called before each reconnect to find where the machine is now (a cloud instance's
    SSH host and port can change when the provider moves it); None keeps `target`.
    Safe to use from two threads at once (a log reader beside the main flow)."""

    def __init__(
        self,
        target: SshTarget,
        *,
        retry: RetryPolicy | None = None,
        io_timeout: float = 120.0,
        resolve: Callable[[], SshTarget] | None = None,
    ):
        self.target = target
        self.retry = retry or RetryPolicy()
        self.io_timeout = io_timeout
        self.resolve = resolve
        self.reconnects = 0  # how many times a dropped connection was reopened (for reports, tests)
        self._lock = threading.RLock()
        self._conn: Connection | None = None
        self._connected_once = False
        self._sftp: Any = None
        self._host_keys: Any = None  # paramiko.HostKeys: the first key seen per host, pinned
        self._tmpdir: str | None = None
        self._has_rsync: bool | None = None

    def __repr__(self) -> str:
        return f"RemoteHost({self.target.describe()})"

    def __enter__(self) -> RemoteHost:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._disconnect()
            if self._tmpdir is not None:
                shutil.rmtree(self._tmpdir, ignore_errors=True)
                self._tmpdir = None

    # --- connection ---------------------------------------------------------------------------

    def _open(self) -> Connection:
        """A new, authenticated connection (one try). Host keys: the first seen is pinned."""
        import paramiko
        from fabric import Config, Connection

        quiet = logging.getLogger("paramiko.transport")
        if quiet.level == logging.NOTSET:
            # paramiko logs every dropped connection at ERROR; we handle those and say so plainly
            quiet.setLevel(logging.CRITICAL)
        t = self.target
        connect_kwargs: dict[str, Any] = {
            # Fabric truncates connect_timeout to an int (0.5 → no timeout at all); paramiko's own
            # `timeout` keeps the float.
            "timeout": t.connect_timeout,
            "banner_timeout": t.connect_timeout,
            "auth_timeout": t.connect_timeout,
            "channel_timeout": t.connect_timeout,
        }
        if t.key_file:
            key = str(Path(t.key_file).expanduser())
            connect_kwargs.update(key_filename=key, look_for_keys=False, allow_agent=False)
        else:
            connect_kwargs.update(look_for_keys=True, allow_agent=True)
        # lazy + an empty SSHConfig: neither ~/.ssh/config nor ~/.fabric.yaml can change what we do
        config = Config(ssh_config=paramiko.SSHConfig(), lazy=True)
        conn = Connection(t.host, user=t.user, port=t.port, config=config, connect_kwargs=connect_kwargs)
        if self._host_keys is None:
            self._host_keys = _load_host_keys(t.known_hosts)
        known = conn.client.get_host_keys()
        for name, keys in self._host_keys.items():
            for keytype, key in keys.items():
                known.add(name, keytype, key)
        conn.open()
        learned = False
        for name, keys in known.items():
            for keytype, key in keys.items():
                if self._host_keys.lookup(name) is None or keytype not in self._host_keys.lookup(name):
                    self._host_keys.add(name, keytype, key)
                    learned = True
        if learned and t.known_hosts:
            _save_host_keys(self._host_keys, t.known_hosts)
        transport = conn.transport
        if t.keepalive:
            transport.set_keepalive(t.keepalive)
        with contextlib.suppress(OSError, AttributeError):
            transport.sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        return conn

    def _connection(self) -> Connection:
        with self._lock:
            if self._conn is not None and self._conn.is_connected:
                return self._conn
            self._disconnect()
            try:
                conn = self._open()
            except Exception as exc:
                self._raise_if_login_refused(exc)
                raise
            if self._connected_once:
                self.reconnects += 1
            self._connected_once = True
            self._conn = conn
            return conn

    def _disconnect(self, conn: Connection | None = None) -> None:
        """Close the connection (and its SFTP client); with `conn`, only if it is still current."""
        with self._lock:
            if conn is not None and conn is not self._conn:
                return
            if self._sftp is not None:
                with contextlib.suppress(Exception):
                    self._sftp.close()
                self._sftp = None
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.close()
                self._conn = None

    def _raise_if_login_refused(self, exc: BaseException) -> None:
        import paramiko

        t = self.target
        if isinstance(exc, paramiko.BadHostKeyException):
            from lorabuild.glossary import explain

            if t.known_hosts:
                raise RemoteError(
                    f"{t.host}:{t.port} answered with a different identity (host key: {explain('host_key')}) "
                    f"than when lorabuild last connected to it, so lorabuild stopped "
                    f"talking to it. If that machine was reinstalled or replaced, delete the lines for "
                    f"{t.host} in {t.known_hosts} and run again; if not, someone may be intercepting the "
                    "connection.",
                ) from None
            raise RemoteError(
                f"{t.host}:{t.port} answered with a different identity (host key) than earlier in this run, so "
                "lorabuild stopped talking to it: it may be a different machine now. If the instance was "
                "replaced, run again to connect to the new one.",
            ) from None
        if isinstance(exc, paramiko.AuthenticationException):
            how = f"the key {t.key_file}" if t.key_file else "your SSH agent or default keys"
            raise RemoteError(
                f"{t.host}:{t.port} did not let {t.user} log in with {how}. Check the user name and that the "
                "matching public key is in ~/.ssh/authorized_keys on that machine.",
            ) from None

    def _is_connection_problem(self, exc: BaseException, conn: Connection | None) -> bool:
        import paramiko

        if isinstance(exc, _Dropped):
            return True
        if isinstance(exc, paramiko.AuthenticationException | paramiko.BadHostKeyException):
            return False
        if isinstance(exc, EOFError | TimeoutError | ConnectionError | paramiko.SSHException):
            return True
        if isinstance(exc, paramiko.SFTPError):
            return True  # "Garbage packet received" and friends: a fresh SFTP session fixes them
        if isinstance(exc, OSError):
            # A file error (no such file, permission) leaves the transport up; a socket error
            # takes it down.
            alive = conn is not None and conn.transport is not None and conn.transport.is_active()
            return not alive or exc.errno is None
        return False

    def _retrying(self, what: str, op: Callable[[Connection, int], T], *, repeat: bool = True) -> T:
        """Run `op(connection, attempt)`, reconnecting with backoff when the connection drops.
        `repeat` False: once `op` has started, a drop is reported instead of running it again."""
        delays = self.retry.delays()
        started = time.monotonic()
        last: BaseException | None = None
        for attempt in range(1, self.retry.attempts + 1):
            conn: Connection | None = None
            began = False
            try:
                conn = self._connection()
                began = True
                return op(conn, attempt)
            except RemoteError:
                raise
            except Exception as exc:
                if not self._is_connection_problem(exc, conn):
                    raise
                last = exc
                self._disconnect(conn)
                if began and not repeat:
                    raise RemoteError(
                        f"the connection to {self.target.describe()} dropped while {what}; it may or may not "
                        "have finished there",
                        retryable=True,
                    ) from exc
                if attempt > len(delays):
                    break
                delay = delays[attempt - 1]
                log.warning(
                    "lost the connection to %s while %s (%s); trying again in %.1f s",
                    self.target.describe(),
                    what,
                    _describe_exc(exc),
                    delay,
                )
                time.sleep(delay)
                if self.resolve is not None:
                    try:
                        self.target = self.resolve()
                    except Exception as resolve_exc:
                        log.warning("could not look up where %s is now: %s", self.target.host, resolve_exc)
        waited = time.monotonic() - started
        raise RemoteError(
            f"lorabuild lost its connection to {self.target.describe()} while {what} and could not get it "
            f"back after {self.retry.attempts} tries over {waited:.0f} s (last problem: "
            f"{_describe_exc(last) if last else 'unknown'}). The machine may have stopped or its network "
            "dropped: check that it is still running, then run lorabuild again — finished steps are kept.",
            retryable=True,
        )

    def wait_until_reachable(self, deadline: float, *, interval: float = 3.0) -> None:
        """Wait until the machine answers SSH and runs a command; `deadline` is a time.monotonic()
        value. A new cloud instance takes minutes: its port first refuses, then sends a banner,
        then (once its SSH key is installed) lets us log in."""
        import paramiko

        t = self.target
        started = time.monotonic()
        last = "no answer yet"
        while True:
            remaining = deadline - time.monotonic()
            try:
                _read_banner(t.host, t.port, timeout=max(0.5, min(t.connect_timeout, remaining)))
                with self._lock:
                    self._disconnect()
                    conn = self._open()
                    self._conn, self._connected_once = conn, True
                code, _out, err = self._exec(conn, shlex.join(["true"]), timeout=max(5.0, t.connect_timeout))
                if code == 0:
                    return
                last = f"a test command failed: {_tail(err.decode('utf-8', 'replace'), 2)}"
            except paramiko.AuthenticationException:
                last = "the machine answers but does not accept lorabuild's key yet"
            except paramiko.BadHostKeyException as exc:
                self._raise_if_login_refused(exc)
            except Exception as exc:
                last = _describe_exc(exc)
            if self.resolve is not None:
                with contextlib.suppress(Exception):
                    t = self.target = self.resolve()
            if time.monotonic() + interval >= deadline:
                break
            time.sleep(interval)
        raise RemoteError(
            f"{t.describe()} could not be reached over SSH within {time.monotonic() - started:.0f} s "
            f"(last problem: {last}). A new cloud machine can take several minutes to start; if it is "
            "an SSH host of yours, check that it is on and that `ssh` to it works.",
            retryable=True,
        )

    # --- commands -----------------------------------------------------------------------------

    def _exec(
        self, conn: Connection, command: str, *, timeout: float, stdin: bytes | None = None
    ) -> tuple[int, bytes, bytes]:
        """Run one command line on a fresh channel; (exit code, stdout, stderr), binary-safe.

        Raises _Dropped when the connection goes away, RemoteError(timed_out) on `timeout`."""
        transport = conn.transport
        if transport is None or not transport.is_active():
            raise _Dropped("the SSH connection is closed")
        chan = transport.open_session(timeout=self.target.connect_timeout)
        deadline = time.monotonic() + timeout
        out, err = bytearray(), bytearray()
        try:
            chan.settimeout(max(0.1, timeout))
            chan.exec_command(command)
            if stdin:
                chan.sendall(stdin)
            chan.shutdown_write()
            while True:
                got = False
                while chan.recv_ready():
                    out += chan.recv(READ_CHUNK)
                    got = True
                while chan.recv_stderr_ready():
                    err += chan.recv_stderr(READ_CHUNK)
                    got = True
                # exit-status may come before the last output: wait for EOF (or close) as well
                if chan.exit_status_ready() and (chan.eof_received or chan.closed):
                    break
                if time.monotonic() > deadline:
                    raise RemoteError(
                        f"`{_clip(command)}` did not finish within {timeout:g} s on {self.target.host}, so lorabuild "
                        "stopped waiting for it (it may still be running there)",
                        command=_clip(command),
                        timed_out=True,
                    )
                if not got:
                    select.select([chan], [], [], 0.2)
            while chan.recv_ready():
                out += chan.recv(READ_CHUNK)
            while chan.recv_stderr_ready():
                err += chan.recv_stderr(READ_CHUNK)
            status = chan.exit_status
            if status == -1 and (not chan.eof_received or _transport_died(transport)):
                raise _Dropped("the connection closed before the command reported how it ended")
            return status, bytes(out), bytes(err)
        except RemoteError:
            # the command may still run remotely; closing the whole connection makes sure the next
            # operation starts from a fresh one (a hang is often a half-open connection)
            self._disconnect(conn)
            raise
        except TimeoutError as exc:
            raise _Dropped(f"the connection stopped answering ({exc})") from exc
        finally:
            with contextlib.suppress(Exception):
                chan.close()

    def run(
        self,
        argv: list[str],
        *,
        timeout: float,
        check: bool = True,
        env: Mapping[str, str] | None = None,
        retry: bool = True,
        what: str | None = None,
    ) -> Result:
        """Run `argv` on the remote machine (its login shell parses shlex.join(argv), so every
        argument arrives intact). `env` values reach it on stdin, not on its command line.
        `check`: raise RemoteError when it exits non-zero. `retry`: repeat it after a dropped
        connection (it may then run twice: pass False for commands that must not). `what`: what
        it does, in words, for messages ("checking the GPU")."""
        if not argv:
            raise ValueError("run() needs a command")
        full = _snippet(_WITH_ENV_SH, *argv) if env else list(argv)
        command = shlex.join(full)
        stdin = _exports(env) if env else None

        def op(conn: Connection, _attempt: int) -> Result:
            code, out, err = self._exec(conn, command, timeout=timeout, stdin=stdin)
            return Result(code, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))

        result = self._retrying(what or f"running {_short_command(argv[:1])}", op, repeat=retry)
        if check and not result.ok:
            raise self._command_failed(argv, result)
        return result

    def _command_failed(self, argv: list[str], result: Result) -> RemoteError:
        shown = _short_command(argv)
        tail = _tail(result.stderr) or _tail(result.stdout)
        if result.exited == -1:
            what = "was stopped by a signal"
        elif result.exited == 127:
            what = f"could not start: {argv[0]} is not installed there (exit code 127)"
        else:
            what = f"failed with exit code {result.exited}"
        detail = f":\n{tail}" if tail else " and printed nothing on stderr"
        return RemoteError(
            f"On {self.target.host}, `{shown}` {what}{detail}",
            exit_code=result.exited,
            stderr_tail=tail,
            command=shown,
        )

    def which(self, program: str) -> str | None:
        """Where `program` is on the remote PATH, or None."""
        done = self.run(_snippet('command -v -- "$1"', program), timeout=30, check=False, what=f"looking for {program}")
        path = done.stdout.strip()
        return path if done.ok and path else None

    def expand_path(self, path: str) -> str:
        """`path` with a leading ~ or ~/ replaced by the remote user's home (arguments are quoted, so
        the remote shell never expands ~ itself)."""
        if path != "~" and not path.startswith("~/"):
            return path
        home = self.run(_snippet('printf "%s" "$HOME"'), timeout=30).stdout
        return home + path[1:]

    def free_bytes(self, path: str) -> int:
        """Free disk space where `path` is (or would be created) on the remote machine."""
        done = self.run(_snippet(_FREE_SH, path), timeout=60, what="checking free disk space")
        fields = done.stdout.split()
        try:
            return int(fields[3]) * 1024
        except (IndexError, ValueError):
            raise RemoteError(f"could not read the free disk space on {self.target.host}: {done.stdout!r}") from None

    # --- Gate 3, remotely ---------------------------------------------------------------------

    def probe_python(self, python: str, modules: list[str], *, timeout: float = PROBE_TIMEOUT_S) -> dict[str, Any]:
        """lorabuild.probe's facts from `python` on the remote machine (the same dict as the local
        probe); a dict with `error` when that Python cannot run it."""
        from lorabuild.probe import PROBE_SOURCE

        where = self.target.host
        try:
            done = self.run([python, "-c", PROBE_SOURCE, *modules], timeout=timeout, check=False)
        except RemoteError as exc:
            if exc.timed_out:
                return {"error": f"the backend's Python on {where} did not answer within {timeout:.0f} seconds"}
            raise
        for line in reversed(done.stdout.splitlines()):
            if line.startswith("{"):
                try:
                    facts: dict[str, Any] = json.loads(line)
                    return facts
                except json.JSONDecodeError:
                    break
        if done.exited == 127:
            return {"error": f"the backend's Python was not found on {where}: {python}"}
        return {
            "error": f"the backend's Python on {where} failed to start (exit {done.exited}): "
            f"{done.stderr.strip()[-300:]}"
        }

    def gpu_report(self, nvidia_smi: str = "nvidia-smi") -> GpuReport:
        """The remote machine's NVIDIA GPUs, read with nvidia-smi (the same report as the local
        NVML reading, so Gate 3 judges both alike)."""
        query = [
            nvidia_smi,
            "--query-gpu=index,name,memory.total,memory.free,driver_version",
            "--format=csv,noheader,nounits",
        ]
        try:
            done = self.run(query, timeout=60, check=False, what="reading the GPUs")
        except RemoteError as exc:
            if not exc.timed_out:
                raise
            return GpuReport(
                problem="nvidia-smi did not answer within a minute: the GPU may be stuck — restart the machine"
            )
        if done.exited == 127:
            return GpuReport(
                problem=f"no NVIDIA GPU found on {self.target.host} (nvidia-smi, which comes with the NVIDIA "
                "driver, is not installed there)"
            )
        if not done.ok:
            return GpuReport(problem=_nvidia_smi_problem(done.stdout + done.stderr))
        caps = self.run([nvidia_smi, "--query-gpu=compute_cap", "--format=csv,noheader"], timeout=60, check=False)
        header = self.run([nvidia_smi], timeout=60, check=False)
        return parse_nvidia_smi(done.stdout, caps.stdout if caps.ok else "", header.stdout)

    # --- files ----------------------------------------------------------------------------------

    def _sftp_client(self, conn: Connection) -> Any:
        with self._lock:
            if self._sftp is None or conn is not self._conn:
                if self._sftp is not None:
                    with contextlib.suppress(Exception):
                        self._sftp.close()
                self._sftp = conn.client.open_sftp()
                self._sftp.get_channel().settimeout(self.io_timeout)
            return self._sftp

    def _drop_sftp(self) -> None:
        with self._lock:
            if self._sftp is not None:
                with contextlib.suppress(Exception):
                    self._sftp.close()
                self._sftp = None

    def put_file(self, local: Path | str, remote: str, *, mode: int | None = None) -> None:
        """Copy one file to the remote machine (SFTP), under a temporary name, then renamed into
        place: a dropped connection never leaves half a file under its real name."""
        local = Path(local)
        if not local.is_file():
            raise RemoteError(f"cannot send {local}: it is not a file here")
        parent = str(PurePosixPath(remote).parent)
        self.run(["mkdir", "-p", "--", parent], timeout=60)
        tmp = f"{remote}.lorabuild-part"

        def op(conn: Connection, _attempt: int) -> None:
            sftp = self._sftp_client(conn)
            try:
                sftp.put(str(local), tmp)
                if mode is not None:
                    sftp.chmod(tmp, mode)
                sftp.posix_rename(tmp, remote)
            except Exception as exc:
                self._drop_sftp()
                if isinstance(exc, OSError) and not self._is_connection_problem(exc, conn):
                    raise RemoteError(f"could not write {remote} on {self.target.host}: {exc.strerror or exc}") from exc
                raise

        self._retrying(f"sending {local.name}", op)

    def get_file(self, remote: str, local: Path | str) -> None:
        """Copy one remote file here (SFTP) to a temporary name, then rename it into place."""
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.part-{os.getpid()}")

        def op(conn: Connection, _attempt: int) -> None:
            sftp = self._sftp_client(conn)
            try:
                sftp.get(remote, str(tmp))
            except Exception as exc:
                self._drop_sftp()
                tmp.unlink(missing_ok=True)
                if isinstance(exc, FileNotFoundError) and not self._is_connection_problem(exc, conn):
                    raise RemoteError(f"{remote} does not exist on {self.target.host}") from exc
                if isinstance(exc, OSError) and not self._is_connection_problem(exc, conn):
                    raise RemoteError(f"could not read {remote} on {self.target.host}: {exc.strerror or exc}") from exc
                raise
            os.replace(tmp, local)

        self._retrying(f"fetching {PurePosixPath(remote).name}", op)

    # --- folders ----------------------------------------------------------------------------------

    def has_rsync(self) -> bool:
        """True when both this machine and the remote one have rsync (checked once)."""
        if self._has_rsync is None:
            self._has_rsync = shutil.which("rsync") is not None and self.which("rsync") is not None
        return self._has_rsync

    def _method(self, method: str) -> Literal["rsync", "tar"]:
        if method == "tar":
            return "tar"
        if method == "rsync":
            if not self.has_rsync():
                raise RemoteError(
                    f"rsync is missing here or on {self.target.host}: install it, or let lorabuild use tar"
                )
            return "rsync"
        if method != "auto":
            raise ValueError(f"unknown transfer method {method!r} (auto, rsync or tar)")
        return "rsync" if self.has_rsync() else "tar"

    def sync_dir(
        self, local_dir: Path | str, remote_dir: str, *, delete: bool = False, method: str = "auto"
    ) -> SyncResult:
        """Make `remote_dir` hold the files of `local_dir` (symlinks are followed: the remote side
        gets the real files). `delete`: also remove remote files that are not here. rsync (when
        both ends have it) moves only changed files; tar moves every file, every time."""
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise RemoteError(f"cannot send {local_dir}: it is not a folder here")
        self.run(["mkdir", "-p", "--", remote_dir], timeout=60)
        if self._method(method) == "rsync":
            options = ["-a", "--copy-links", *(["--delete"] if delete else [])]
            sent = self._rsync(options, f"{local_dir}/", remote_dir, upload=True, what=f"sending {local_dir.name}")
            return SyncResult("rsync", sent)
        if delete:
            self._delete_extra(local_dir, remote_dir)
        return SyncResult("tar", self._tar_up(local_dir, remote_dir))

    def fetch_dir(
        self, remote_dir: str, local_dir: Path | str, *, patterns: list[str] | None = None, method: str = "auto"
    ) -> SyncResult:
        """Copy the files of `remote_dir` here. `patterns`: only files whose path relative to
        `remote_dir` matches one of these shell patterns (fnmatch: `*` also matches `/`, so
        "*.safetensors" finds them in sub-folders too). Files arrive whole or not at all."""
        local_dir = Path(local_dir)
        local_dir.mkdir(parents=True, exist_ok=True)
        names = None if patterns is None else self._matching_files(remote_dir, patterns)
        if names == []:
            return SyncResult(self._method(method), ())
        if self._method(method) == "rsync":
            options = ["-a"]
            stdin = None
            if names is not None:
                options += ["--from0", "--files-from=-"]
                stdin = b"".join(n.encode("utf-8", "surrogateescape") + b"\0" for n in names)
            what = f"fetching {PurePosixPath(remote_dir).name}"
            sent = self._rsync(options, f"{local_dir}/", remote_dir, upload=False, what=what, stdin=stdin)
            return SyncResult("rsync", sent)
        return SyncResult("tar", self._tar_down(remote_dir, local_dir, names))

    def list_files(self, remote_dir: str) -> list[str]:
        """Every file under `remote_dir`, relative to it (empty when the folder does not exist)."""

        def op(conn: Connection, _attempt: int) -> list[str]:
            code, out, err = self._exec(conn, shlex.join(_snippet(_LIST_FILES_SH, remote_dir)), timeout=self.io_timeout)
            if code != 0:
                raise RemoteError(f"could not list {remote_dir} on {self.target.host}: {_tail(err.decode())}")
            return sorted(n.decode("utf-8", "surrogateescape").removeprefix("./") for n in out.split(b"\0") if n)

        return self._retrying(f"listing {remote_dir}", op)

    def _matching_files(self, remote_dir: str, patterns: list[str]) -> list[str]:
        return [n for n in self.list_files(remote_dir) if any(fnmatch.fnmatchcase(n, p) for p in patterns)]

    def _delete_extra(self, local_dir: Path, remote_dir: str) -> None:
        here = {rel for rel, is_dir in _local_entries(local_dir) if not is_dir}
        extra = [n for n in self.list_files(remote_dir) if n not in here]
        if not extra:
            return
        names = b"".join(n.encode("utf-8", "surrogateescape") + b"\0" for n in extra)
        script = 'cd -- "$1" && xargs -0 rm -f --'

        def op(conn: Connection, _attempt: int) -> None:
            code, _out, err = self._exec(
                conn, shlex.join(_snippet(script, remote_dir)), timeout=self.io_timeout, stdin=names
            )
            if code != 0:
                raise RemoteError(f"could not remove old files in {remote_dir}: {_tail(err.decode())}")

        self._retrying(f"cleaning {remote_dir}", op)

    # rsync ------------------------------------------------------------------------------------------

    def _rsync_remote(self, path: str) -> str:
        host = f"[{self.target.host}]" if ":" in self.target.host else self.target.host
        return f"{host}:{path.rstrip('/')}/"

    def _ssh_argv(self) -> list[str]:
        """The system ssh, set up like our own connection: same key, port, timeouts, keepalive,
        no ~/.ssh/config, and only the host key we pinned (a known_hosts file of our own)."""
        t = self.target
        argv = ["ssh", "-F", "/dev/null", "-p", str(t.port), "-l", t.user]
        options = {
            "BatchMode": "yes",
            "ConnectTimeout": str(max(1, math.ceil(t.connect_timeout))),
            "ServerAliveInterval": str(t.keepalive or 15),
            "ServerAliveCountMax": "3",
            "StrictHostKeyChecking": "yes",
            "UserKnownHostsFile": self._known_hosts_file(),
            "GlobalKnownHostsFile": "/dev/null",
            "LogLevel": "ERROR",
        }
        if t.key_file:
            argv += ["-i", str(Path(t.key_file).expanduser())]
            options["IdentitiesOnly"] = "yes"
        for key, value in options.items():
            argv += ["-o", f"{key}={value}"]
        return argv

    def _known_hosts_file(self) -> str:
        if not self._host_keys:
            self._retrying("connecting", lambda _conn, _attempt: None)  # pins the host key
        with self._lock:
            if self._tmpdir is None:
                self._tmpdir = tempfile.mkdtemp(prefix="lorabuild-ssh-")
            path = os.path.join(self._tmpdir, "known_hosts")
            self._host_keys.save(path)
            return path

    def _rsync(
        self, options: list[str], local: str, remote_dir: str, *, upload: bool, what: str, stdin: bytes | None = None
    ) -> tuple[str, ...]:
        """rsync between `local` and `remote_dir`, retried with backoff when the connection fails
        (the ssh command and address are rebuilt each try: `resolve` may have moved the host)."""
        delays = self.retry.delays()
        for attempt in range(1, self.retry.attempts + 1):
            remote = self._rsync_remote(remote_dir)
            argv = [
                "rsync",
                "--protect-args",  # remote paths travel inside rsync's protocol, never through a shell
                f"--partial-dir={PARTIAL_DIR}",  # an interrupted file waits there, never under its real name
                f"--timeout={max(10, int(self.io_timeout))}",
                "--out-format=%n",
                "-e",
                shlex.join(self._ssh_argv()),  # rsync splits -e on spaces and honours quotes
                *options,
                *((local, remote) if upload else (remote, local)),
            ]
            done = subprocess.run(argv, input=stdin, capture_output=True, check=False)
            stderr = done.stderr.decode("utf-8", "replace")
            if done.returncode in (0, RSYNC_VANISHED):
                lines = done.stdout.decode("utf-8", "surrogateescape").splitlines()
                return tuple(n for n in lines if n and not n.endswith("/") and not n.startswith("deleting "))
            if done.returncode not in RSYNC_RETRYABLE or attempt > len(delays):
                break
            log.warning("rsync lost the connection while %s (%s); trying again", what, _tail(stderr, 1))
            time.sleep(delays[attempt - 1])
            self.reconnects += 1
            if self.resolve is not None:
                with contextlib.suppress(Exception):
                    self.target = self.resolve()
        raise RemoteError(
            f"rsync failed while {what} with {self.target.host} (exit code {done.returncode}):\n{_tail(stderr)}",
            retryable=done.returncode in RSYNC_RETRYABLE,
            exit_code=done.returncode,
            stderr_tail=_tail(stderr),
        )

    # tar --------------------------------------------------------------------------------------------

    def _tar_up(self, local_dir: Path, remote_dir: str) -> tuple[str, ...]:
        command = shlex.join(["tar", "-x", "-f", "-", "-C", remote_dir])

        def op(conn: Connection, _attempt: int) -> tuple[str, ...]:
            transport = conn.transport
            if transport is None or not transport.is_active():
                raise _Dropped("the SSH connection is closed")
            chan = transport.open_session(timeout=self.target.connect_timeout)
            sent: list[str] = []
            try:
                chan.settimeout(self.io_timeout)
                chan.exec_command(command)
                sink: Any = _ChannelWriter(chan)
                with tarfile.open(fileobj=sink, mode="w|", dereference=True) as tar:
                    for rel, is_dir in _local_entries(local_dir):
                        tar.add(str(local_dir / rel), arcname=rel, recursive=False, filter=_anonymous)
                        if not is_dir:
                            sent.append(rel)
                chan.shutdown_write()
                status, err = _finish(chan, self.io_timeout)
            except TimeoutError as exc:
                raise _Dropped(f"the connection stopped answering ({exc})") from exc
            finally:
                with contextlib.suppress(Exception):
                    chan.close()
            _check_tar(status, err, f"unpacking the files in {remote_dir} on {self.target.host}")
            return tuple(sent)

        return self._retrying(f"sending {local_dir.name}", op)

    def _tar_down(self, remote_dir: str, local_dir: Path, names: list[str] | None) -> tuple[str, ...]:
        if names is None:
            command = shlex.join(["tar", "-c", "-f", "-", "-C", remote_dir, "."])
            stdin = b""
        else:
            command = shlex.join(["tar", "-c", "-f", "-", "-C", remote_dir, "--null", "-T", "-"])
            stdin = b"".join(n.encode("utf-8", "surrogateescape") + b"\0" for n in names)

        def op(conn: Connection, _attempt: int) -> tuple[str, ...]:
            transport = conn.transport
            if transport is None or not transport.is_active():
                raise _Dropped("the SSH connection is closed")
            chan = transport.open_session(timeout=self.target.connect_timeout)
            got: list[str] = []
            try:
                chan.settimeout(self.io_timeout)
                chan.exec_command(command)
                if stdin:
                    chan.sendall(stdin)
                chan.shutdown_write()
                broken: BaseException | None = None
                try:
                    with tarfile.open(fileobj=chan.makefile("rb"), mode="r|") as tar:
                        for member in tar:
                            rel = _safe_member(member.name)
                            if rel is None or not member.isfile():
                                continue
                            source = tar.extractfile(member)
                            if source is not None:
                                _write_atomically(local_dir / rel, source, member.mtime)
                                got.append(rel)
                except (tarfile.TarError, EOFError) as exc:
                    broken = exc  # a failed remote tar or a cut stream: the exit status says which
                status, err = _finish(chan, self.io_timeout)
                if broken is not None and status == 0:
                    raise RemoteError(f"the files from {remote_dir} arrived damaged ({broken}); run again")
            except TimeoutError as exc:
                raise _Dropped(f"the connection stopped answering ({exc})") from exc
            finally:
                with contextlib.suppress(Exception):
                    chan.close()
            _check_tar(status, err, f"packing the files of {remote_dir} on {self.target.host}")
            return tuple(got)

        return self._retrying(f"fetching {PurePosixPath(remote_dir).name}", op)

    # --- detached jobs ----------------------------------------------------------------------------

    def start_job(self, job_dir: str, argv: list[str], *, env: Mapping[str, str], cwd: str) -> Job:
        """Start `argv` in `cwd` as a detached job whose folder is `job_dir` (created; it must not
        hold a job yet). It runs under setsid + nohup in its own process group, so it survives
        SSH drops and lorabuild itself; output goes to `out.log`, the exit code to `exit`, the
        process group to `pgid`. `env` is written to `env` (mode 0600) and sourced by the
        wrapper: it never appears on a command line. Returns as soon as the job runs."""
        if not argv:
            raise ValueError("start_job() needs a command")
        command_sh = (
            f"# the job's command (lorabuild.remote)\ncd -- {shlex.quote(cwd)} || exit 126\nexec {shlex.join(argv)}\n"
        )
        env_file = _exports(env)
        launch = shlex.join(_snippet(_LAUNCH_SH, job_dir, _WRAPPER_SH, command_sh))
        wait = shlex.join(_snippet(_WAIT_PGID_SH, job_dir))

        def op(conn: Connection, attempt: int) -> Job:
            code, out, err = self._exec(conn, launch, timeout=60, stdin=env_file)
            if code == 75 and attempt > 1:
                # our first try started it before the connection dropped: pick it up
                code, out, err = self._exec(conn, wait, timeout=60)
            if code != 0:
                text = _tail(err.decode("utf-8", "replace"))
                if code == 75:
                    raise RemoteError(
                        f"{job_dir} on {self.target.host} already holds a job; re-attach to it with its folder, "
                        "or use a new folder for a new job",
                        exit_code=code,
                        stderr_tail=text,
                    )
                raise RemoteError(
                    f"the job in {job_dir} could not be started on {self.target.host} (exit code {code}):\n{text}",
                    exit_code=code,
                    stderr_tail=text,
                )
            return Job(job_dir, int(out.decode().split()[-1]))

        return self._retrying(f"starting {_short_command(argv[:1])}", op)

    def job_state(self, job_dir: str) -> JobState:
        """ "running", ("exited", code) or "missing" (no job in that folder). The code is None when
        the job ended without its wrapper recording one (the machine rebooted, or it was killed)."""
        text = self.run(_snippet(_STATE_SH, job_dir), timeout=60, what="checking the job").stdout.split()
        if not text:
            raise RemoteError(f"could not read the state of the job in {job_dir} on {self.target.host}")
        if text[0] == "running":
            return "running"
        if text[0] == "missing":
            return "missing"
        code = text[1] if len(text) > 1 else "none"
        return ("exited", int(code) if code.lstrip("-").isdigit() else None)

    def read_log(self, job_dir: str, offset: int, *, max_bytes: int = 1 << 20) -> tuple[bytes, int]:
        """The job's output from byte `offset` on (at most `max_bytes`), and the offset to ask for
        next. Binary-safe; a read cut by a dropped connection is repeated from the same offset,
        so no byte is lost or repeated."""
        command = shlex.join(_snippet(_READ_LOG_SH, f"{job_dir}/out.log", str(offset + 1), str(max_bytes)))

        def op(conn: Connection, _attempt: int) -> tuple[bytes, int]:
            code, out, err = self._exec(conn, command, timeout=self.io_timeout)
            if code != 0:
                raise RemoteError(f"could not read the log of {job_dir}: {_tail(err.decode('utf-8', 'replace'))}")
            return out, offset + len(out)

        return self._retrying("reading the training log", op)

    def stop_job(self, job_dir: str, grace: float = 30.0) -> JobState:
        """Stop the job's whole process group: SIGTERM, `grace` seconds to save a checkpoint and
        end, then SIGKILL. Safe to call on a job that has already ended."""
        tenths = str(max(0, int(grace * 10)))
        self.run(_snippet(_STOP_SH, job_dir, tenths), timeout=grace + 60, what="stopping the job")
        return self.job_state(job_dir)


# --- helpers --------------------------------------------------------------------------------------


class _ChannelWriter:
    """The file-like end tarfile writes to: the stdin of a remote command."""

    def __init__(self, chan: Any):
        self.chan = chan

    def write(self, data: bytes) -> int:
        self.chan.sendall(bytes(data))
        return len(data)


def _clip(command: str, limit: int = 200) -> str:
    return command if len(command) <= limit else command[: limit - 1] + "…"


def _transport_died(transport: Any, wait: float = 0.5) -> bool:
    """Whether the transport goes down within `wait` seconds (paramiko closes the channels of a
    broken connection a moment before it marks the transport inactive)."""
    end = time.monotonic() + wait
    while transport.is_active():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


def _finish(chan: Any, timeout: float) -> tuple[int, str]:
    """Wait for a streaming command to end: (exit code or -1, its stderr)."""
    end = time.monotonic() + timeout
    err = bytearray()
    while not (chan.exit_status_ready() and (chan.eof_received or chan.closed)):
        while chan.recv_stderr_ready():
            err += chan.recv_stderr(READ_CHUNK)
        while chan.recv_ready():
            chan.recv(READ_CHUNK)  # tar -x prints nothing on stdout; drain it so it cannot block
        if time.monotonic() > end:
            raise TimeoutError("no exit status")
        select.select([chan], [], [], 0.2)
    while chan.recv_stderr_ready():
        err += chan.recv_stderr(READ_CHUNK)
    status = chan.exit_status
    if status == -1 and chan.eof_received and not _transport_died(chan.get_transport()):
        status = 255  # stopped by a signal, not a dropped connection
    return status, err.decode("utf-8", "replace")


def _local_entries(root: Path) -> list[tuple[str, bool]]:
    """(relative path, is a folder) for every folder and regular file under `root`, following
    symlinks like rsync --copy-links does (a linked model folder arrives with its files)."""
    entries: list[tuple[str, bool]] = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs.sort()
        base = Path(folder).relative_to(root)
        entries.extend(((base / d).as_posix(), True) for d in dirs)
        entries.extend(((base / f).as_posix(), False) for f in sorted(files) if (Path(folder) / f).is_file())
    return entries


def _anonymous(info: tarfile.TarInfo) -> tarfile.TarInfo:
    # the remote side owns what it unpacks (as root, tar would restore our uid/gid otherwise)
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _safe_member(name: str) -> str | None:
    """A tar member's path relative to the target folder, or None when it would leave it."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        return None
    parts = [p for p in path.parts if p not in ("", ".")]
    return "/".join(parts) if parts else None


def _write_atomically(path: Path, source: Any, mtime: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            shutil.copyfileobj(source, handle, READ_CHUNK)
        os.utime(tmp, (mtime, mtime))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_banner(host: str, port: int, *, timeout: float) -> str:
    """The server's SSH identification line; raises OSError / TimeoutError when none comes."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        data = b""
        end = time.monotonic() + timeout
        while b"\n" not in data and time.monotonic() < end:
            chunk = sock.recv(256)
            if not chunk:
                break
            data += chunk
    line = data.decode("ascii", "replace").strip()
    if not line.startswith("SSH-"):
        raise ConnectionError(f"no SSH banner (got {line[:40]!r})" if line else "the port closed without a banner")
    return line


def _nvidia_smi_problem(output: str) -> str:
    text = output.strip()
    if "couldn't communicate with the NVIDIA driver" in text:
        return "the NVIDIA driver is installed but not running — restart the machine"
    if "No devices were found" in text:
        return "the NVIDIA driver is running but sees no GPU"
    return f"nvidia-smi failed: {_tail(text, 3)}" if text else "nvidia-smi failed without saying why"


_CUDA_VERSION = re.compile(r"CUDA Version:\s*([0-9]+(?:\.[0-9]+)?)")


def parse_nvidia_smi(csv_text: str, caps_text: str = "", header_text: str = "") -> GpuReport:
    """A GpuReport from nvidia-smi's `--query-gpu=index,name,memory.total,memory.free,driver_version
    --format=csv,noheader,nounits` (MiB), its compute_cap query and its plain header."""
    gpus: list[Gpu] = []
    driver = None
    caps = [c.strip() for c in caps_text.splitlines() if c.strip()]
    for line in csv_text.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 5:
            continue
        try:
            index, total_mib, free_mib = int(fields[0]), float(fields[-3]), float(fields[-2])
        except ValueError:
            continue
        capability = None
        if len(caps) > len(gpus):
            with contextlib.suppress(ValueError):
                major, minor = caps[len(gpus)].split(".")
                capability = (int(major), int(minor))
        gpus.append(
            Gpu(
                index=index,
                name=",".join(fields[1:-3]),
                total_gb=total_mib * 1024 * 1024 / 1e9,
                free_gb=free_mib * 1024 * 1024 / 1e9,
                capability=capability,
            )
        )
        driver = fields[-1]
    match = _CUDA_VERSION.search(header_text)
    cuda = match.group(1) if match else None
    if not gpus:
        return GpuReport(driver=driver, cuda_driver=cuda, problem="the NVIDIA driver is running but sees no GPU")
    return GpuReport(tuple(gpus), driver, cuda)
