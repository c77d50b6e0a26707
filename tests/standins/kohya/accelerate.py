"""Stand-in for `accelerate` (the console script in sd-scripts' venv), for tests/test_backend_kohya.py.

The test writes it as `<fake venv>/bin/accelerate` with a `#!` line naming the test's Python.
Like the real `accelerate launch` with one process (reference/kohya.md §11), it parses its own
options, runs the training script with the same Python, and when the script fails prints
`subprocess.CalledProcessError: … returned non-zero exit status N.` and exits 1, whatever N was.
"""

import argparse
import os
import subprocess
import sys


def main() -> int:
    parser = argparse.ArgumentParser(prog="accelerate")
    commands = parser.add_subparsers(dest="command", required=True)
    launch = commands.add_parser("launch")
    launch.add_argument("--num_cpu_threads_per_process", type=int, default=None)
    launch.add_argument("--num_processes", type=int, default=None)
    launch.add_argument("--num_machines", type=int, default=None)
    launch.add_argument("--mixed_precision", choices=["no", "fp16", "bf16", "fp8"], default=None)
    launch.add_argument("--dynamo_backend", default=None)
    launch.add_argument("--multi_gpu", action="store_true")
    launch.add_argument("training_script")
    launch.add_argument("training_script_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = [sys.executable, args.training_script, *args.training_script_args]
    env = dict(os.environ)
    if args.mixed_precision:
        env["ACCELERATE_MIXED_PRECISION"] = args.mixed_precision
    if args.num_cpu_threads_per_process:
        env["OMP_NUM_THREADS"] = str(args.num_cpu_threads_per_process)
    process = subprocess.run(command, env=env, check=False)
    if process.returncode != 0:
        sys.stderr.write(
            "Traceback (most recent call last):\n"
            '  File "/venv/bin/accelerate", line 8, in <module>\n'
            "    sys.exit(main())\n"
            f"subprocess.CalledProcessError: Command '{command}' returned non-zero exit status "
            f"{process.returncode}.\n"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
