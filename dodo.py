"""For doit users: `doit` runs every gate of every spec under specs/, sharing lorabuild's state.

    doit list                 # one task per gate and spec: example:config, example:train, ...
    doit example              # every gate of specs/example.yaml (like `lorabuild run`)
    doit example:dryrun       # up to the dry run

The tasks, their up-to-date keys and their state (grimoire/.lorabuild/doit.sqlite) are exactly
those of `lorabuild run`, so either tool sees what the other did. The write-through sqlite
backend is registered in pyproject.toml ([tool.doit.plugins.backend]).
"""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lorabuild.pipeline import dodo_config, dodo_tasks

DOIT_CONFIG = dodo_config()


def task_lorabuild() -> Iterator[dict[str, Any]]:
    """Every gate of every spec under specs/."""
    yield from dodo_tasks(sorted(Path("specs").glob("*.yaml")))
