"""The shortcut for a run with nothing to do: owns grimoire/.lorabuild/uptodate/.

An up-to-date `lorabuild run` would spend most of its time importing pydantic (to load the
spec) and doit (to ask it), only to say "nothing to do". So when the pipeline has found every
gate of a spec up to date, it leaves a record here of everything that answer rested on:

- the spec file and every file or folder the plan and the gates read (the dataset and its
  folder, the model, each gate's targets and file dependencies, its incomplete marker and
  failure record, the memory limits, the backend pid file, doit's database, the backend's
  Python and its torch, studio.json), each by its `stat` (size, times, inode; a symlink's own
  too) or by being absent, and the spec's paths as written as well as where they lead;
- the grimoire and the folder the run started in;
- this machine's facts (as studio.json holds them: processors, memory, GPUs, driver);
- lorabuild's own files, the Python running it and the packages installed beside it;
- the environment variables (as a digest, and without any whose name says it holds a secret).

The next `run` of the same spec compares them, with `stat` only, and when nothing differs it
answers itself. The record never decides anything the pipeline did not: any difference, a
missing or unreadable record, a record of another format, or a busy run folder sends the run
down the full path, which is always right and writes a fresh record. The full path deletes the
record before it runs doit, and writes it only when no watched path changed since it began to
plan, less one timestamp tick (a change made while it planned, or within the tick, could leave a
`stat` that the plan did not see).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorabuild import __version__, runlock
from lorabuild.fsutil import atomic_write_json
from lorabuild.runfolder import grimoire_of

if TYPE_CHECKING:
    from lorabuild.gates import GateContext

FORMAT = 1

# Variables that change between two commands of the same shell without changing anything a
# run reads; and words that mark a secret, which is never digested, let alone written.
VOLATILE_VARIABLES = frozenset({"_", "OLDPWD", "PWD", "SHLVL", "COLUMNS", "LINES", "PYTEST_CURRENT_TEST"})
SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL")

# A file changed within one timestamp tick of being recorded could change again without its
# `stat` changing. Linux filesystems keep nanoseconds but move them on the kernel's tick (at
# most 10 ms); a filesystem keeping whole seconds (FAT keeps two) shows as a whole-second time.
FINE_TICK_NS = 50_000_000
COARSE_TICK_NS = 2_000_000_000

Signature = list[int] | None


@dataclass(frozen=True)
class Answer:
    """What an up-to-date run says: each gate's title, in order, up to the one asked for."""

    grimoire: Path
    titles: list[str]


@dataclass(frozen=True)
class Snapshot:
    """The state the pipeline's answer will rest on, taken before doit looks."""

    taken_ns: int
    paths: dict[str, Signature]
    machine: dict[str, Any]
    code: str
    environment: str


def record_path(grimoire: Path, spec: Path) -> Path:
    key = hashlib.sha256(str(spec).encode("utf-8", "surrogateescape")).hexdigest()[:24]
    return grimoire / ".lorabuild" / "uptodate" / f"{key}.json"


# --- the shortcut -------------------------------------------------------------------------------


def shortcut(spec: Path, root: Path | None, until: str | None) -> Answer | None:
    """The answer of an up-to-date run of `spec`, when its record shows that nothing changed;
    None whenever that is not certain (the full path then decides). Writes nothing but the lock's
    holder line, which any run writes."""
    try:
        spec_path = spec.expanduser().resolve()
        grimoire = grimoire_of(spec, root)
        if grimoire is None:
            return None
        record = json.loads(record_path(grimoire, spec_path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RuntimeError):
        return None
    try:
        if record["format"] != FORMAT or record["spec"] != str(spec_path):
            return None
        # a copied grimoire holds a record of the original's files; `.` on PATH, a relative
        # --root or `grimoire:` mean another folder reads other files
        if record["grimoire"] != str(grimoire) or record["cwd"] != os.getcwd():
            return None
        gates = [(str(name), str(title)) for name, title in record["gates"]]
        lock = Path(record["lock"])
    except (KeyError, TypeError, ValueError):
        return None
    if until is not None and until not in [name for name, _ in gates]:
        return None
    try:
        runlock.acquire(lock)
    except (runlock.LockBusy, OSError):
        return None  # the full path names the holder
    try:
        if not _unchanged(record):
            return None
    finally:
        runlock.release(lock)
    titles: list[str] = []
    for name, title in gates:
        titles.append(title)
        if name == until:
            break
    return Answer(grimoire, titles)


def _unchanged(record: dict[str, Any]) -> bool:
    """Everything the record rests on is as it was; the cheap comparisons first."""
    if record.get("environment") != environment_digest():
        return False
    paths = record.get("paths")
    if not isinstance(paths, dict) or any(signature(Path(p)) != s for p, s in paths.items()):
        return False
    if record.get("code") != code_digest():
        return False
    from lorabuild.studio import machine_facts, read_machine

    return bool(record.get("machine") == machine_facts(read_machine()))


# --- what the full path leaves ------------------------------------------------------------------


def snapshot(ctx: GateContext, started_ns: int) -> Snapshot:
    """Take the state of everything `ctx`'s gates rest on, before doit looks, so that a change
    made while it looks shows as a difference next time. `started_ns`: when `ctx` began to be
    built (the spec and the folders were read then); a path changed since keeps the record away."""
    from lorabuild.studio import machine_facts

    paths = {str(p): signature(p) for p in sorted(set(watched_paths(ctx)))}
    return Snapshot(started_ns, paths, machine_facts(ctx.machine), code_digest(), environment_digest())


def forget(ctx: GateContext) -> None:
    """Remove the record of `ctx`'s spec (before the full path runs anything)."""
    record_path(ctx.run.root, ctx.loaded.path).unlink(missing_ok=True)


def remember(ctx: GateContext, taken: Snapshot) -> bool:
    """Record `taken` for the next run, after the pipeline found every gate up to date. Not when a
    path changed within a timestamp tick of the snapshot; True when written."""
    from lorabuild import gates

    if any(_recent(s, taken.taken_ns) for s in taken.paths.values()):
        return False
    atomic_write_json(
        record_path(ctx.run.root, ctx.loaded.path),
        {
            "format": FORMAT,
            "lorabuild": __version__,
            "spec": str(ctx.loaded.path),
            "grimoire": str(ctx.run.root.resolve()),
            "cwd": os.getcwd(),
            "lock": str(ctx.run.lock.resolve()),
            "gates": [[g, gates.module(g).TITLE] for g in gates.gates_for(ctx)],
            "environment": taken.environment,
            "code": taken.code,
            "machine": taken.machine,
            "paths": taken.paths,
        },
    )
    return True


def watched_paths(ctx: GateContext) -> list[Path]:
    """Every file and folder whose change could make a gate of `ctx` run again."""
    from lorabuild import gates
    from lorabuild.gates.environment import stamp_sources
    from lorabuild.plan import venv_pythons
    from lorabuild.studio import studio_paths

    run = ctx.run
    paths: list[Path] = [ctx.loaded.path, run.limits, run.backend_pid, ctx.dataset.folder]
    # doit's database, with its write-ahead log (a change may sit there while another run has it open)
    paths += [run.doit_db, run.doit_db.with_name(run.doit_db.name + "-wal")]
    # what every full run puts right when it is missing or stale
    paths += list(studio_paths(run.root))
    # the spec's paths as written, not only where they lead: a symlink switched to another folder
    ref = ctx.loaded.spec
    written = [ref.dataset.path, ref.base_model.path, ref.backend.path, ref.backend.python]
    paths += [ctx.loaded.absolute(value) for value in written if value]
    for gate in gates.gates_for(ctx):
        mod = gates.module(gate)
        paths += [*mod.targets(ctx), *mod.file_deps(ctx), run.incomplete_marker(gate), run.failure_record(gate)]
    if ctx.model is not None:
        paths += [ctx.model.path, *ctx.model.folders]
    paths += venv_pythons(ctx.loaded)
    paths += stamp_sources(ctx)
    return [Path(os.path.abspath(p)) for p in paths]


def signature(path: Path) -> Signature:
    """What `stat` says of `path` (following links) and, for a symlink, of the link itself (one
    made anew to point elsewhere is another link); None when nothing is there."""
    try:
        st = os.stat(path)
        link = os.lstat(path)
    except (OSError, ValueError):
        return None
    sig = [st.st_mode, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    if stat.S_ISLNK(link.st_mode):
        sig += [link.st_ino, link.st_mtime_ns, link.st_ctime_ns]
    return sig


def _recent(sig: Signature, taken_ns: int) -> bool:
    """A time in `sig` (modified, changed; the link's too) less than a tick before `taken_ns`."""
    if sig is None:
        return False
    times = [sig[3], sig[4], *sig[6:8]]
    return any(taken_ns - t < (COARSE_TICK_NS if t % 1_000_000_000 == 0 else FINE_TICK_NS) for t in times)


# --- digests of what no path names --------------------------------------------------------------


def environment_digest(environ: dict[str, str] | None = None) -> str:
    """The environment variables a run could read, as a digest; secrets are left out unread."""
    items = sorted(
        (k, v)
        for k, v in (os.environ if environ is None else environ).items()
        if k not in VOLATILE_VARIABLES and not any(w in k.upper() for w in SECRET_WORDS)
    )
    return _digest(f"{k}={v}" for k, v in items)


def code_digest() -> str:
    """lorabuild's own files, the Python running it and the packages installed beside it: a new
    lorabuild (or a new doit, pydantic, torch…) may plan differently."""
    parts = [__version__, sys.executable, sys.version]
    package = Path(__file__).parent
    for folder, dirs, files in os.walk(package):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            st = os.stat(os.path.join(folder, name))
            parts.append(f"{os.path.relpath(os.path.join(folder, name), package)}:{st.st_size}:{st.st_mtime_ns}")
    for entry in sys.path:
        if entry.endswith(("site-packages", "dist-packages")) and os.path.isdir(entry):
            parts.append(entry)
            parts += sorted(os.listdir(entry))  # dist-info folders carry each package's version
    return _digest(parts)


def _digest(parts: Iterable[str]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()
