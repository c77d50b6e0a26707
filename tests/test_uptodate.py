"""The up-to-date shortcut: it answers only when nothing the full path reads has changed.

One real trained run (the builtin trainer, one epoch) serves the module. Each change below is
made, seen to turn the shortcut off, undone, and the full path run again, which must find
nothing to do and leave a fresh record that the shortcut answers from.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from lorabuild import uptodate
from lorabuild.pipeline import build_context, gate_status, run_spec
from lorabuild.studio import GpuReport, Machine, read_machine
from lorabuild.ui import Console
from tests.conftest import REPO, Project, lorabuild_env


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> Project:
    project = Project(tmp_path_factory.mktemp("uptodate"), demo_model_dir)
    project.write_spec(training={"epochs": 1}, checkpoints={"every_n_epochs": 1, "keep_last": 1})
    project.lorabuild("run", "t.yaml", check=True, timeout=600)
    confirm_up_to_date(project)
    return project


def confirm_up_to_date(project: Project) -> subprocess.CompletedProcess[str]:
    """The full path (no record), finding nothing to do and leaving a record."""
    record = uptodate.record_path(project.grimoire.resolve(), (project.root / "t.yaml").resolve())
    record.unlink(missing_ok=True)
    time.sleep(uptodate.FINE_TICK_NS / 1e9)  # a change just made would keep the record from being written
    done = project.lorabuild("run", "t.yaml", check=True)
    assert "nothing to do" in done.stdout and "▶" not in done.stdout, done.stdout
    assert record.is_file(), "the full path found nothing to do but left no record"
    return done


@pytest.fixture(autouse=True)
def same_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process sees the environment the lorabuild processes it starts see (the record holds it)."""
    for name in set(os.environ) - set(lorabuild_env()):
        monkeypatch.delenv(name)
    for name, value in lorabuild_env().items():
        monkeypatch.setenv(name, value)


def answer(project: Project, until: str | None = None) -> uptodate.Answer | None:
    """The shortcut's answer, asked from the project's folder as its lorabuild runs are."""
    old = Path.cwd()
    os.chdir(project.root)
    try:
        return uptodate.shortcut(project.root / "t.yaml", project.grimoire, until)
    finally:
        os.chdir(old)


@pytest.fixture
def at_root(trained: Project) -> Iterator[Project]:
    old = Path.cwd()
    os.chdir(trained.root)
    try:
        yield trained
    finally:
        os.chdir(old)


def test_an_up_to_date_run_answers_without_pydantic_or_doit_and_says_the_same(trained: Project) -> None:
    full = confirm_up_to_date(trained)
    code = (
        "import sys\n"
        "from lorabuild.cli import cli\n"
        "try:\n"
        "    cli(['run', 't.yaml'])\n"
        "except SystemExit as exit:\n"
        "    print('EXIT', exit.code)\n"
        "print('LOADED', sorted(m for m in ('pydantic', 'doit', 'torch', 'lorabuild.spec') if m in sys.modules))\n"
    )
    before = {p: p.stat().st_mtime_ns for p in (trained.run_dir()).rglob("*") if p.is_file()}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=trained.root, env=lorabuild_env(), capture_output=True, text=True, timeout=60
    )
    assert "EXIT 0" in done.stdout and "LOADED []" in done.stdout, done.stdout + done.stderr
    assert done.stdout.split("EXIT")[0] == full.stdout  # word for word what the full path says
    assert done.stderr == full.stderr == ""
    assert {p: p.stat().st_mtime_ns for p in (trained.run_dir()).rglob("*") if p.is_file()} == before
    # --until stops the list where the full path would
    shortened = answer(trained, until="environment")
    assert shortened is not None and shortened.titles == ["Gate 2 — training config", "Gate 3 — environment"]


def _touch_earlier(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - 10_000_000_000))


# Each: (what changes, how to make the change, how to undo it). Undoing restores the content,
# not the `stat`, so the full path runs again after each and finds nothing to do.
def _edit(path: Callable[[Project], Path], text: str) -> tuple[Callable[[Project], None], Callable[[Project], None]]:
    saved: dict[str, str] = {}

    def change(p: Project) -> None:
        saved["text"] = path(p).read_text()
        path(p).write_text(saved["text"] + text)

    def undo(p: Project) -> None:
        path(p).write_text(saved["text"])

    return change, undo


def _create(path: Callable[[Project], Path]) -> tuple[Callable[[Project], None], Callable[[Project], None]]:
    def change(p: Project) -> None:
        path(p).parent.mkdir(parents=True, exist_ok=True)
        path(p).write_text("12345")

    def undo(p: Project) -> None:
        path(p).unlink()

    return change, undo


def _move_away(path: Callable[[Project], Path]) -> tuple[Callable[[Project], None], Callable[[Project], None]]:
    def change(p: Project) -> None:
        path(p).rename(path(p).with_name(path(p).name + ".away"))

    def undo(p: Project) -> None:
        path(p).with_name(path(p).name + ".away").rename(path(p))

    return change, undo


def _state(p: Project, *parts: str) -> Path:
    return p.grimoire / ".lorabuild" / "runs" / "t" / Path(*parts)


CHANGES: dict[str, tuple[Callable[[Project], None], Callable[[Project], None]]] = {
    "the spec": _edit(lambda p: p.root / "t.yaml", "# a comment\n"),
    "a caption": _edit(lambda p: p.dataset / "red-circle.txt", ", bold"),
    "a picture's time": (
        lambda p: _touch_earlier(p.dataset / "red-circle.png"),
        lambda p: None,
    ),
    "a file in the dataset folder": _create(lambda p: p.dataset / "blue-star.png"),
    "a target": _move_away(lambda p: p.run_dir() / "progress.md"),
    "the final LoRA": _move_away(lambda p: p.run_dir() / "t.safetensors"),
    "an incomplete marker": _create(lambda p: _state(p, "incomplete", "dryrun")),
    "a failure record": _create(lambda p: _state(p, "failed", "train.json")),
    "a backend left running": _create(lambda p: _state(p, "backend.pid")),
    "a learned memory limit": _create(lambda p: _state(p, "limits.json")),
    "doit's state": _move_away(lambda p: p.grimoire / ".lorabuild" / "doit.sqlite"),
}


@pytest.mark.parametrize("what", list(CHANGES))
def test_a_change_sends_the_run_down_the_full_path(trained: Project, what: str) -> None:
    change, undo = CHANGES[what]
    assert answer(trained) is not None
    change(trained)
    try:
        assert answer(trained) is None, f"the shortcut did not see a change to {what}"
    finally:
        undo(trained)
    if what == "a picture's time":  # same content: the full path's checksum finds it unchanged
        assert answer(trained) is None
    confirm_up_to_date(trained)
    assert answer(trained) is not None


def test_a_changed_environment_variable_turns_it_off_a_secret_is_never_read(
    trained: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    confirm_up_to_date(trained)
    monkeypatch.setenv("RUNPOD_API_KEY", "rp_planted_secret_value_0123456789")
    assert answer(trained) is not None  # secrets are left out of the digest
    monkeypatch.setenv("LORABUILD_TEST_SETTING", "1")
    assert answer(trained) is None
    monkeypatch.delenv("LORABUILD_TEST_SETTING")
    assert answer(trained) is not None
    assert uptodate.environment_digest({"A": "1", "OPENAI_API_KEY": "x"}) == uptodate.environment_digest({"A": "1"})
    assert uptodate.environment_digest({"A": "1", "_": "/bin/ls"}) == uptodate.environment_digest({"A": "1"})


def test_a_different_machine_turns_it_off(trained: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    confirm_up_to_date(trained)
    here = read_machine()
    monkeypatch.setattr(
        "lorabuild.studio.read_machine",
        lambda: Machine(here.hostname, here.system, here.cpus, here.ram_gb, GpuReport(driver="570.1", problem="x")),
    )
    assert answer(trained) is None


def test_a_newly_installed_package_turns_it_off(
    trained: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    confirm_up_to_date(trained)
    site = tmp_path / "lib" / "site-packages"
    site.mkdir(parents=True)
    monkeypatch.syspath_prepend(str(site))
    before = uptodate.code_digest()
    assert answer(trained) is None  # a site-packages folder that was not there
    (site / "doit-0.37.0.dist-info").mkdir()
    assert uptodate.code_digest() != before


def test_a_busy_run_folder_gets_the_full_path_which_names_the_holder(trained: Project) -> None:
    confirm_up_to_date(trained)
    lock = _state(trained, "lock")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from lorabuild import runlock\n"
            f"runlock.acquire(Path({str(lock)!r})); print('held', flush=True); time.sleep(60)",
        ],
        env=lorabuild_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert answer(trained) is None
        done = trained.lorabuild("run", "t.yaml")
        assert done.returncode == 1 and str(holder.pid) in done.stderr, done.stdout + done.stderr
    finally:
        holder.kill()
        holder.wait()


def test_a_record_of_another_format_or_a_broken_one_is_ignored(trained: Project) -> None:
    confirm_up_to_date(trained)
    record = uptodate.record_path(trained.grimoire.resolve(), (trained.root / "t.yaml").resolve())
    data = json.loads(record.read_text())
    record.write_text(json.dumps({**data, "format": uptodate.FORMAT + 1}))
    assert answer(trained) is None
    record.write_text("{not json")
    assert answer(trained) is None
    record.write_text(json.dumps({**data, "gates": "config"}))
    assert answer(trained) is None
    confirm_up_to_date(trained)


def test_a_path_changed_within_a_tick_keeps_the_record_from_being_written(at_root: Project) -> None:
    ctx = build_context("t.yaml", root=at_root.grimoire)
    taken = uptodate.snapshot(ctx, time.time_ns())
    assert uptodate.remember(ctx, taken)
    late = replace(taken, paths={**taken.paths, "x": [0, 0, 0, taken.taken_ns - 1_000, 0]})
    assert not uptodate.remember(ctx, late)
    whole_second = (taken.taken_ns // 10**9 - 1) * 10**9  # a filesystem keeping seconds: a 2 s tick
    assert not uptodate.remember(ctx, replace(taken, paths={**taken.paths, "x": [0, 0, 0, whole_second, 0]}))
    ten_seconds_ago = taken.taken_ns - 10 * 10**9
    assert uptodate.remember(ctx, replace(taken, paths={**taken.paths, "x": [0, 0, 0, ten_seconds_ago, 0]}))
    confirm_up_to_date(at_root)


# --- everything the full path reads is in the record --------------------------------------------

PYTHON_PLACES = {Path(p).resolve() for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
SYSTEM_PLACES = [Path("/proc"), Path("/sys"), Path("/dev"), Path("/etc"), Path("/usr/lib"), Path("/lib")]


LISTINGS = ("listdir", "scandir")


def _traced(fn: Callable[[], Any]) -> set[tuple[str, Path]]:
    """Every (operation, path) `fn` does through os and open: stat, exists, listing, opening."""
    seen: set[tuple[str, Path]] = set()

    def wrap(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def traced(path: Any = ".", *args: Any, **kwargs: Any) -> Any:
            if isinstance(path, (str, bytes, os.PathLike)):
                seen.add((name, Path(os.path.abspath(os.fsdecode(path)))))
            return real(path, *args, **kwargs)

        return traced

    patches = [(os, n) for n in ("stat", "lstat", "open", "listdir", "scandir", "access")]
    patches += [(builtins, "open"), (io, "open")]
    saved = [(mod, name, getattr(mod, name)) for mod, name in patches]
    for mod, name, real in saved:
        setattr(mod, name, wrap(name, real))
    try:
        fn()
    finally:
        for mod, name, real in saved:
            setattr(mod, name, real)
    return seen


def _python_or_system(path: Path) -> bool:
    """lorabuild's code and this Python's packages (code_digest), the Python, the system."""
    resolved = path.resolve()
    ours = [REPO / "lorabuild", *(Path(e) for e in sys.path if e.endswith(("site-packages", "dist-packages")))]
    if any(resolved.is_relative_to(p.resolve()) for p in ours):
        return True
    if any(resolved.is_relative_to(p) for p in PYTHON_PLACES):
        return True
    return any(path.is_relative_to(p) for p in SYSTEM_PLACES)


def _covered(op: str, path: Path, watched: set[Path], state: Path, written: set[Path]) -> bool:
    if _python_or_system(path) or path in watched:
        return True
    if path in written or path.is_relative_to(state / "uptodate"):
        return True
    if not path.exists() and path.parent in watched:
        return True  # absent, in a watched folder: its coming shows in the folder
    # a folder looked at (not listed) on the way to watched paths: their `stat` shows its change
    return op not in LISTINGS and any(w.is_relative_to(path) for w in watched if w != path)


def test_the_record_covers_every_path_the_full_path_reads(at_root: Project) -> None:
    """A new input to the plan or a gate that the record does not watch fails here."""
    spec = at_root.root / "t.yaml"
    confirm_up_to_date(at_root)
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        seen = _traced(lambda: run_spec(str(spec), root=at_root.grimoire, console=Console(quiet=True)))
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    record = json.loads(uptodate.record_path(at_root.grimoire.resolve(), spec.resolve()).read_text())
    watched = {Path(p) for p in record["paths"]}
    state = at_root.grimoire.resolve() / ".lorabuild"
    written_by_every_run = {
        state / "runs" / "t" / "lock",  # the run lock and its holder line
        at_root.grimoire.resolve() / "studio.json.lock",  # studio.json's own lock
    }
    unwatched = sorted(f"{op} {p}" for op, p in seen if not _covered(op, p, watched, state, written_by_every_run))
    assert unwatched == [], "\n".join(unwatched)


def _make_kohya(project: Project) -> None:
    from tests.test_backend_kohya import make_standin, standin_spec

    checkout, python = make_standin(project.root)
    standin_spec(project, checkout, python, name="t")


def _make_simpletuner(project: Project) -> None:
    from tests import test_backend_simpletuner as st

    st.make_standin(project.root)
    st.make_model(project.root)
    project.write_spec(**st.STANDIN_SPEC)


def _make_ai_toolkit(project: Project) -> None:
    from tests import test_backend_ai_toolkit as aitk

    aitk.make_standin(project.root)
    aitk.make_model(project.root)
    project.write_spec(**aitk.STANDIN_SPEC)


def _make_ssh(project: Project, request: pytest.FixtureRequest) -> None:
    from tests.test_remote_run import write_remote_spec

    write_remote_spec(project, request.getfixturevalue("sshd_server"), project.root / "remote")


@pytest.mark.parametrize(
    "make", [_make_kohya, _make_simpletuner, _make_ai_toolkit, _make_ssh], ids=lambda f: f.__name__[6:]
)
def test_the_record_covers_what_each_backend_plans_from(
    bare_project: Project, make: Callable[..., None], request: pytest.FixtureRequest
) -> None:
    """What planning and the up-to-date checks read for the other backends and an SSH machine
    (traced through `status`, which reads what `run` reads to decide: a run of these cannot pass
    Gate 3 here, without a GPU, and an SSH one is covered end to end in test_remote_run)."""
    make(bare_project, request) if make is _make_ssh else make(bare_project)
    spec = bare_project.root / "t.yaml"
    found: dict[str, Any] = {}

    def plan_and_check() -> None:
        found["ctx"] = ctx = build_context(spec, root=bare_project.grimoire)
        gate_status(ctx)

    seen = _traced(plan_and_check)
    watched = set(uptodate.watched_paths(found["ctx"]))
    state = bare_project.grimoire.resolve() / ".lorabuild"
    unwatched = sorted(f"{op} {p}" for op, p in seen if not _covered(op, p, watched, state, set()))
    assert unwatched == [], "\n".join(unwatched)


# --- the record's own rules, on plans that were never run (no training needed) ------------------


def recorded(project: Project, spec: str = "t.yaml") -> None:
    """Leave a record for `spec` as the full path would, and see the shortcut answer from it."""
    time.sleep(2 * uptodate.FINE_TICK_NS / 1e9)  # what the test just made is older than a tick
    started = time.time_ns()
    ctx = build_context(project.root / spec, root=project.grimoire)
    assert uptodate.remember(ctx, uptodate.snapshot(ctx, started))
    assert uptodate.shortcut(project.root / spec, project.grimoire, None) is not None


def test_a_symlink_switched_to_another_folder_turns_it_off(bare_project: Project) -> None:
    first, second = bare_project.root / "d1", bare_project.root / "d2"
    shutil.copytree(bare_project.dataset, first)
    shutil.copytree(bare_project.dataset, second)
    (second / "extra.png").write_bytes((second / "red-circle.png").read_bytes())
    link = bare_project.root / "current"
    link.symlink_to(first, target_is_directory=True)
    bare_project.write_spec(dataset={"path": "current"})
    recorded(bare_project)
    link.unlink()
    link.symlink_to(second, target_is_directory=True)
    assert uptodate.shortcut(bare_project.root / "t.yaml", bare_project.grimoire, None) is None


def test_a_venv_or_torch_appearing_for_the_backend_turns_it_off(bare_project: Project) -> None:
    from tests.test_backend_kohya import kohya_spec, make_standin

    checkout, python = make_standin(bare_project.root)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = checkout / "venv" / "lib" / version / "site-packages"
    site.mkdir(parents=True)
    kohya_spec(bare_project, "t", {"path": str(checkout)})  # its venv found by looking
    spec = bare_project.root / "t.yaml"
    recorded(bare_project)
    other = checkout / ".venv" / "bin"
    other.mkdir(parents=True)
    (other / "python").symlink_to(sys.executable)
    assert uptodate.shortcut(spec, bare_project.grimoire, None) is None
    shutil.rmtree(checkout / ".venv")

    kohya_spec(bare_project, "t", {"path": str(checkout), "python": str(python)})  # named in the spec
    recorded(bare_project)
    (site / "torch").mkdir()
    (site / "torch" / "version.py").write_text("__version__ = '2.13.0'\ncuda = '12.8'\n")
    assert uptodate.shortcut(spec, bare_project.grimoire, None) is None


def test_a_copied_grimoire_or_another_folder_turns_it_off(
    bare_project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    bare_project.write_spec()
    spec = bare_project.root / "t.yaml"
    recorded(bare_project)
    copy = bare_project.root / "copy"
    shutil.copytree(bare_project.grimoire, copy, symlinks=True)
    assert uptodate.shortcut(spec, copy, None) is None  # its record names the original's files
    assert uptodate.shortcut(spec, bare_project.grimoire, None) is not None
    monkeypatch.chdir(bare_project.dataset)  # `.` on PATH, relative paths: another folder, other files
    assert uptodate.shortcut(spec, bare_project.grimoire, None) is None


def test_a_change_made_while_planning_keeps_the_record_away(bare_project: Project) -> None:
    spec = bare_project.write_spec()
    time.sleep(2 * uptodate.FINE_TICK_NS / 1e9)
    started = time.time_ns()
    ctx = build_context(spec, root=bare_project.grimoire)
    spec.write_text(spec.read_text().replace("epochs: 2", "epochs: 3"))  # after the plan read it
    time.sleep(2 * uptodate.FINE_TICK_NS / 1e9)
    assert not uptodate.remember(ctx, uptodate.snapshot(ctx, started))
    assert uptodate.shortcut(spec, bare_project.grimoire, None) is None


def test_doit_state_waiting_in_its_write_ahead_log_turns_it_off(bare_project: Project) -> None:
    bare_project.write_spec()
    recorded(bare_project)
    (bare_project.grimoire / ".lorabuild" / "doit.sqlite-wal").write_bytes(b"\0" * 32)
    assert uptodate.shortcut(bare_project.root / "t.yaml", bare_project.grimoire, None) is None
