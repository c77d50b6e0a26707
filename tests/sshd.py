"""A real OpenSSH server on 127.0.0.1 for tests, and ways to drop its connections for real.

`sshd_server` (session-scoped fixture) starts /usr/sbin/sshd with a private sshd_config in a
temporary folder: ed25519 host and client keys made by ssh-keygen, a free port, no PAM, key
login only for the user running the tests (root in CI: sessions land in that user's home, so
tests use temporary remote folders), internal-sftp, and `PerSourcePenalties no` when this sshd
knows the keyword (OpenSSH >= 9.8 otherwise penalises the rapid reconnects tests make). The
tests are skipped when no sshd is installed; CI installs openssh-server, so there they run.

Dropping connections, for fault-injection tests, without touching any process we did not start:
- `connection_pid(remote)` finds the sshd process serving one RemoteHost's connection (the
  nearest sshd ancestor of a shell it runs) and `kill_pid(pid)` kills exactly that process;
- `stop()` / `start()` take the whole server down (listener and every session process under it)
  and bring it back on the same port with the same host key.

Other test modules use the fixture with `from tests.sshd import sshd_server` re-exported at
module level (or through conftest.py).
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
SSH_KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"
HOST = "127.0.0.1"


def free_port() -> int:
    """A port nothing listens on now (sshd does not accept Port 0; the race is small)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def read_banner(port: int, timeout: float = 1.0) -> bytes:
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        return sock.recv(64)


def parent_pid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may contain spaces and parentheses: split after its last ')'
    return int(stat.rsplit(")", 1)[1].split()[1])


def command_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and parent_pid(int(entry.name)) == pid:
            found.append(int(entry.name))
    return found


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for child in children(todo.pop()):
            out.append(child)
            todo.append(child)
    return out


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie still answers kill(0); it is dead for our purposes
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@dataclass
class SshServer:
    """One private sshd on 127.0.0.1 (see the module docstring)."""

    folder: Path
    port: int
    user: str
    key: Path
    config: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    host: str = HOST
    _log_handle: Any = field(default=None, repr=False)

    @classmethod
    def create(cls, folder: Path) -> SshServer:
        if not Path(SSHD).exists():
            pytest.skip(f"OpenSSH server not installed ({SSHD} missing): apt-get install openssh-server")
        folder.chmod(0o700)
        host_key, client_key = folder / "host_ed25519", folder / "client_ed25519"
        for key in (host_key, client_key):
            subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        authorized = folder / "authorized_keys"
        authorized.write_text(client_key.with_suffix(".pub").read_text())
        authorized.chmod(0o600)
        if os.geteuid() == 0:
            # a root sshd refuses to start without its privilege separation folder
            Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)
        server = cls(
            folder=folder,
            port=free_port(),
            user=getpass.getuser(),
            key=client_key,
            config=folder / "sshd_config",
            log=folder / "sshd.log",
        )
        server._write_config()
        server.start()
        return server

    def _write_config(self) -> None:
        lines = [
            f"Port {self.port}",
            f"ListenAddress {HOST}",
            f"HostKey {self.folder / 'host_ed25519'}",
            f"PidFile {self.folder / 'sshd.pid'}",
            f"AuthorizedKeysFile {self.folder / 'authorized_keys'}",
            "UsePAM no",
            "StrictModes no",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "PermitRootLogin prohibit-password",
            "Subsystem sftp internal-sftp",
            "LogLevel VERBOSE",
            "PrintMotd no",
            "UseDNS no",
            "MaxStartups 100",
            "MaxSessions 100",
        ]
        self.config.write_text("\n".join([*lines, "PerSourcePenalties no"]) + "\n")
        if self._config_ok() is not None:
            self.config.write_text("\n".join(lines) + "\n")  # sshd < 9.8 does not know the keyword
            problem = self._config_ok()
            if problem is not None:
                pytest.fail(f"sshd rejects the test configuration: {problem}")

    def _config_ok(self) -> str | None:
        done = subprocess.run([SSHD, "-t", "-f", str(self.config)], capture_output=True, text=True, check=False)
        return None if done.returncode == 0 else done.stderr.strip()

    def start(self, timeout: float = 10.0) -> None:
        """Start sshd on this server's port and wait until it sends its banner."""
        if self._log_handle is None:
            self._log_handle = open(self.log, "ab")  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(self.config)],
            stdin=subprocess.DEVNULL,
            stdout=self._log_handle,
            stderr=self._log_handle,
        )
        end = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited with {self.proc.returncode}:\n{self.log.read_text()[-2000:]}")
            try:
                if read_banner(self.port).startswith(b"SSH-2.0-"):
                    return
            except OSError:
                pass
            if time.monotonic() > end:
                raise RuntimeError(f"sshd sent no banner within {timeout} s:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    def session_pids(self) -> list[int]:
        """The sshd processes serving connections (everything sshd-named under the listener)."""
        if self.proc is None:
            return []
        return [pid for pid in descendants(self.proc.pid) if command_name(pid) == "sshd"]

    def stop(self) -> None:
        """Take the whole server down: the listener and every connection it serves (a shell or a
        detached job started through it is not an sshd process and keeps running)."""
        if self.proc is None:
            return
        sessions = self.session_pids()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for pid in sessions:
            kill_pid(pid)
        self.proc = None

    def close(self) -> None:
        self.stop()
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None

    def target(self, **overrides: Any) -> Any:
        from lorabuild.remote import SshTarget

        values: dict[str, Any] = {"host": self.host, "port": self.port, "user": self.user, "key_file": str(self.key)}
        values.update(overrides)
        return SshTarget(**values)


_FIND_SSHD = """
import os
pid = os.getpid()
while pid > 1:
    stat = open(f"/proc/{pid}/stat").read()
    pid = int(stat.rsplit(")", 1)[1].split()[1])
    if open(f"/proc/{pid}/comm").read().strip() == "sshd":
        print(pid)
        break
"""


def connection_pid(remote: Any) -> int:
    """The sshd process serving `remote`'s current connection (a lorabuild.remote.RemoteHost on a
    server of this machine): the nearest sshd ancestor of a process run through it. The walk
    happens remotely, while that process still lives (its shell may be gone a moment later)."""
    out = remote.run([sys.executable, "-c", _FIND_SSHD], timeout=30).stdout.strip()
    if not out:
        raise RuntimeError("no sshd process above the remote command")
    pid = int(out)
    if command_name(pid) != "sshd":
        raise RuntimeError(f"process {pid} is not an sshd process")
    return pid


def kill_pid(pid: int, sig: int = signal.SIGKILL, timeout: float = 5.0) -> None:
    """Kill exactly `pid` and wait until it is gone."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    end = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < end:
        time.sleep(0.02)


@pytest.fixture(scope="session")
def sshd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    server = SshServer.create(tmp_path_factory.mktemp("sshd"))
    try:
        yield server
    finally:
        server.close()
