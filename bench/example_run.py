"""How long `lorabuild run specs/example.yaml` takes from nothing to a trained LoRA.

Starts from an empty grimoire (the demo model is created too), on this machine's processor.
Prints the wall time of the whole run and of each gate. Issue #2 asks for under 2 minutes on a
2-core CPU.
"""

from __future__ import annotations

import re
import shutil

from _common import lorabuild, scratch_project


def main() -> None:
    root = scratch_project()
    try:
        seconds, done = lorabuild(root, "run", "specs/example.yaml")
        if done.returncode != 0:
            raise SystemExit(f"run failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        gates = re.findall(r"^✓ (.+) passed$", done.stdout, re.M)
        print(f"example run, every gate from an empty grimoire: {seconds:.1f} s wall ({len(gates)} gates passed)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
