"""Where everything about one training lives: the paths of the run folder and of lorabuild's state.

```
grimoire/
  studio.md, studio.json
  models/                        demo models created here
  training/{name}/               the run folder (DESIGN.md)
  .lorabuild/                    doit state, locks, incomplete markers, failures, backend pids,
                                 pinned SSH host keys (known_hosts), up-to-date records (uptodate.py)
```

The spec name is a slug (checked by the spec), and every path is also checked to stay inside
the grimoire, so nothing from a spec can point outside it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

# A run name is a slug, so it can name a folder and nothing else (the spec's `name` pattern).
NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"

GATES: tuple[str, ...] = ("config", "environment", "dryrun", "train")
REMOTE_GATES: tuple[str, ...] = (*GATES, "pull")  # a remote training's results are fetched last


def grimoire_path(spec_folder: Path, named: str | None, root: Path | None) -> Path:
    """Where a spec's runs live: `--root`, else the spec's `grimoire:` (read from the spec's
    folder, `~` expanded), else ./grimoire."""
    if root is not None:
        return root.resolve()
    if named:
        return (spec_folder / os.path.expanduser(named)).resolve()
    return (Path.cwd() / "grimoire").resolve()


def grimoire_of(spec: Path, root: Path | None) -> Path | None:
    """`grimoire_path` for a spec file, read as plain YAML without validating it — cheap enough
    for every command, and None when the file cannot be read as a mapping."""
    named = None
    if root is None:
        import yaml

        try:
            data = yaml.load(spec.read_bytes(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        except (OSError, ValueError, yaml.YAMLError):
            return None
        if not isinstance(data, dict):
            return None
        named = data.get("grimoire")
        if named is not None and not isinstance(named, str):
            return None
    return grimoire_path(spec.expanduser().resolve().parent, named, root)


class UnsafeName(ValueError):
    """A run name that would leave the run folder."""


@dataclass(frozen=True)
class RunFolder:
    """All paths for the training `name` under the grimoire `root`."""

    root: Path
    name: str

    def __post_init__(self) -> None:
        if not re.fullmatch(NAME_PATTERN, self.name):
            raise UnsafeName(f"{self.name!r} is not a safe run name")
        for path in (self.dir, self.state):
            if not path.resolve().is_relative_to(self.root.resolve()):
                raise UnsafeName(f"{self.name!r} would leave {self.root}")

    # --- the run folder (targets) ---
    @property
    def dir(self) -> Path:
        return self.root / "training" / self.name

    @property
    def config_md(self) -> Path:
        return self.dir / "config.md"

    @property
    def plan_json(self) -> Path:
        return self.dir / "plan.json"

    @property
    def backend_dir(self) -> Path:
        return self.dir / "backend"

    @property
    def environment_md(self) -> Path:
        return self.dir / "environment.md"

    @property
    def environment_json(self) -> Path:
        return self.dir / "environment.json"

    @property
    def dryrun_log(self) -> Path:
        return self.dir / "dryrun.log"

    @property
    def dryrun_ok(self) -> Path:
        return self.dir / "dryrun.ok"

    @property
    def train_log(self) -> Path:
        return self.dir / "train.log"

    @property
    def progress_md(self) -> Path:
        return self.dir / "progress.md"

    @property
    def progress_json(self) -> Path:
        return self.dir / "progress.json"

    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def samples(self) -> Path:
        return self.dir / "samples"

    @property
    def lora(self) -> Path:
        return self.dir / f"{self.name}.safetensors"

    @property
    def loss_png(self) -> Path:
        return self.dir / "loss.png"

    # --- lorabuild's own state ---
    @property
    def state_root(self) -> Path:
        return self.root / ".lorabuild"

    @property
    def known_hosts(self) -> Path:
        """The host keys of the SSH machines this grimoire trains on, pinned the first time."""
        return self.state_root / "known_hosts"

    @property
    def state(self) -> Path:
        return self.state_root / "runs" / self.name

    @property
    def doit_db(self) -> Path:
        return self.state_root / "doit.sqlite"

    @property
    def lock(self) -> Path:
        return self.state / "lock"

    @property
    def backend_pid(self) -> Path:
        return self.state / "backend.pid"

    @property
    def remote_result(self) -> Path:
        """Written when a training finished on a remote machine; read by the pull step."""
        return self.state / "remote-train.json"

    @property
    def remote_job(self) -> Path:
        """The detached training job on a remote machine, for re-attaching to it."""
        return self.state / "remote-job.json"

    @property
    def limits(self) -> Path:
        return self.state / "limits.json"

    def incomplete_marker(self, gate: str) -> Path:
        return self.state / "incomplete" / gate

    def failure_record(self, gate: str) -> Path:
        return self.state / "failed" / f"{gate}.json"

    @property
    def models(self) -> Path:
        return self.root / "models"

    def task_name(self, gate: str) -> str:
        """doit task name: one database serves every spec of a grimoire, so names carry the spec."""
        return f"{self.name}:{gate}"
