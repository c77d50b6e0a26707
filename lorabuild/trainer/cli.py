"""The trainer's command line and process behaviour (`python -m lorabuild.trainer`).

This module owns what makes the trainer a well-behaved subprocess of lorabuild: parsing the
arguments, keeping stdout for protocol lines only (everything else written to fd 1 is sent
to stderr), turning SIGTERM/SIGINT into "finish the step, save, exit 130", dying with the
parent (`LORABUILD_PARENT_PID`), and mapping every way a run can end to one `error` or
`interrupted` event and the contract's exit code. A traceback is printed (to stderr) only
for unexpected failures.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from types import FrameType
from typing import NoReturn, Protocol, TextIO

from lorabuild.trainer.events import (
    EXIT_SIGNAL,
    Emitter,
    Interrupted,
    TrainerError,
    classify_exception,
)

PARENT_PID_ENV = "LORABUILD_PARENT_PID"
_PR_SET_PDEATHSIG = 1


class StopLike(Protocol):
    """What the signal handlers need of train.StopControl."""

    def request(self, reason: str) -> None: ...


class _ArgumentError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # Bad arguments are a config problem, reported as a protocol line, not just usage text.
        raise _ArgumentError(message)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be 1 or more")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m lorabuild.trainer",
        description="Train a LoRA for a diffusers SD-1.x/2.x model from lorabuild's train.json "
        "(see docs/trainer.md). Prints one JSON event per line.",
    )
    parser.add_argument("config", nargs="?", type=Path, help="the train.json that lorabuild wrote")
    parser.add_argument("--max-steps", type=_positive, help="stop after N optimizer steps of this invocation")
    parser.add_argument("--no-checkpoints", action="store_true", help="never write into the checkpoints folder")
    parser.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    parser.add_argument("--lora-out", type=Path, help="write the final LoRA here instead of output.lora")
    parser.add_argument("--batch-size", type=_positive, help="override training.batch_size")
    parser.add_argument("--gradient-accumulation", type=_positive, help="override training.gradient_accumulation")
    parser.add_argument("--make-demo-model", type=Path, metavar="DIR", help="create the demo model in DIR and exit")
    return parser


def _set_library_environment() -> None:
    # Before torch/diffusers/transformers are imported: they read these at import time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # OpenMP's default busy-waiting makes multi-threaded steps up to ~100× slower as soon as
    # other processes want the same cores (measured: 0.02 s -> 2.5 s per demo step on 2 cores
    # with three trainers running). Sleeping threads cost little on real models' large kernels.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _protocol_stream() -> TextIO:
    """A private handle on the real stdout; fd 1 itself is pointed at stderr, so prints and C
    libraries can never corrupt the protocol."""
    sys.stdout.flush()
    fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(fd, "w", encoding="utf-8", buffering=1)


def _install_signal_handlers(stop: StopLike) -> None:
    def handler(signum: int, _frame: FrameType | None) -> None:
        stop.request(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


def _watch_parent(stop: StopLike) -> None:
    value = os.environ.get(PARENT_PID_ENV)
    if not value:
        return
    try:
        parent = int(value)
    except ValueError:
        return
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # no prctl: the getppid check below still catches a parent that is already gone
    # The parent may have died before prctl took effect; then no signal will ever come.
    if os.getppid() != parent:
        stop.request("parent process exited")


def _make_demo(target: Path, out: Emitter) -> int:
    from lorabuild.trainer.demo import DEMO_MODEL_NAME, make_demo_model

    try:
        make_demo_model(target, DEMO_MODEL_NAME)
    except FileExistsError:
        raise TrainerError(
            "config",
            f"{target} already exists and is not the lorabuild demo model, so it was left alone. Fix: "
            "choose a new or empty folder.",
            str(target),
        ) from None
    except OSError as exc:
        from lorabuild.trainer.events import is_out_of_memory

        if is_out_of_memory(exc):
            raise
        raise TrainerError(
            "model_load",
            f"The demo model could not be written to {target} ({exc}). Fix: "
            "check that the folder is writable and the disk has space.",
            str(exc),
        ) from None
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    out.emit("saved", path=str(target.absolute()), bytes=size)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the trainer as a command; returns the exit code. Takes over stdout and the
    SIGTERM/SIGINT handlers, so call it only as the main program of a process."""
    started = time.monotonic()
    _set_library_environment()
    out = Emitter(_protocol_stream())

    from lorabuild.trainer.train import RunOptions, StopControl

    stop = StopControl()
    try:
        _install_signal_handlers(stop)
        _watch_parent(stop)
        try:
            args = build_parser().parse_args(argv)
        except _ArgumentError as exc:
            raise TrainerError(
                "config",
                f"Bad trainer arguments: {exc}. Fix: see `python -m lorabuild.trainer --help`.",
                str(exc),
            ) from None
        if args.make_demo_model is not None:
            return _make_demo(args.make_demo_model, out)
        if args.config is None:
            raise TrainerError(
                "config",
                "No config file was given. Fix: run `python -m lorabuild.trainer "
                "CONFIG.json` with the train.json that lorabuild wrote.",
                "",
            )

        from lorabuild.trainer.config import load_config, with_overrides
        from lorabuild.trainer.train import Run

        cfg = load_config(args.config)
        overridden = with_overrides(cfg, args.batch_size, args.gradient_accumulation)
        old, new = cfg.training, overridden.training
        if old.batch_size * old.gradient_accumulation != new.batch_size * new.gradient_accumulation:
            out.warning(
                f"The effective batch changed from {old.batch_size}×{old.gradient_accumulation} to "
                f"{new.batch_size}×{new.gradient_accumulation}; checkpoints made with the old one cannot be "
                "resumed and the result differs from the planned run."
            )
        opts = RunOptions(
            max_steps=args.max_steps,
            checkpoints=not args.no_checkpoints,
            resume=not args.no_resume,
            lora_out=args.lora_out.absolute() if args.lora_out else None,
        )
        return Run(overridden, opts, out, stop, started).run()
    # In each handler: from here on a signal is only noted, so it cannot cut the last line short.
    except TrainerError as exc:
        stop.armed = True
        out.error(exc)
        return exc.exit_code
    except (Interrupted, KeyboardInterrupt):
        stop.armed = True
        out.emit("interrupted", step=stop.step, checkpoint=None)
        return EXIT_SIGNAL
    except Exception as exc:  # MemoryError included: it is an Exception
        stop.armed = True
        error = classify_exception(exc)
        if error.kind == "internal":
            traceback.print_exc(file=sys.stderr)
        with contextlib.suppress(MemoryError):  # nothing left to report with; the exit code says it
            out.error(error)
        return error.exit_code


def run_module() -> NoReturn:
    raise SystemExit(main())
