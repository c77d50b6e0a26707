"""Stand-in for the `accelerate` console script of SimpleTuner's venv, for tests only.

Understands `accelerate launch [--flag=value ...] [--multi_gpu] SCRIPT [ARGS...]`, checks the
flags lorabuild passes, records them in `accelerate-launch.json` in the working folder, and runs
SCRIPT with this Python. Like accelerate's simple launcher, a failing script ends with a
CalledProcessError traceback and exit code 1.
"""

from __future__ import annotations

import json
import subprocess
import sys

VALUES = {
    "--mixed_precision": ("no", "fp16", "bf16", "fp8"),
    "--dynamo_backend": ("no",),
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "launch":
        print("usage: accelerate launch [options] script [args]", file=sys.stderr)
        return 2
    options: dict[str, str | bool] = {}
    rest = argv[1:]
    while rest and rest[0].startswith("--"):
        flag, _, value = rest.pop(0).partition("=")
        if flag == "--multi_gpu":
            options[flag] = True
            continue
        if flag not in ("--mixed_precision", "--num_processes", "--num_machines", "--dynamo_backend"):
            print(f"accelerate <command> [<args>] launch: error: unrecognized arguments: {flag}", file=sys.stderr)
            return 2
        if flag in VALUES and value not in VALUES[flag]:
            print(f"accelerate launch: error: argument {flag}: invalid choice: '{value}'", file=sys.stderr)
            return 2
        options[flag] = value
    if not rest:
        print("accelerate launch: error: the following arguments are required: training_script", file=sys.stderr)
        return 2
    with open("accelerate-launch.json", "w") as handle:
        json.dump({"options": options, "script": rest[0], "args": rest[1:]}, handle)
    cmd = [sys.executable, *rest]
    code = subprocess.call(cmd)
    if code != 0:
        print("Traceback (most recent call last):", file=sys.stderr)
        print(f"subprocess.CalledProcessError: Command '{cmd}' returned non-zero exit status {code}.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
