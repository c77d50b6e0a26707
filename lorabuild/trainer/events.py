"""The trainer's output protocol and its failure vocabulary.

This module owns everything lorabuild reads back from the trainer: the JSON-lines event
stream on stdout (`Emitter`), the error kinds and exit codes of docs/trainer.md, the
`TrainerError` exception that carries a plain-language failure up to the command line, and
`classify_exception`, which decides which unexpected exceptions are really out-of-memory.
It imports nothing heavy, so lorabuild can use the constants without torch installed.
"""

from __future__ import annotations

import json
import math
import re
import sys
import threading
from collections.abc import Callable
from typing import Any, Final, TextIO

EXIT_OK: Final = 0
EXIT_INTERNAL: Final = 1
EXIT_BAD_INPUT: Final = 2
EXIT_OOM: Final = 3
EXIT_NAN: Final = 4
EXIT_SIGNAL: Final = 130

ERROR_KINDS: Final = ("config", "model_load", "dataset", "caption", "oom", "nan", "internal")

# kind -> exit code, per the contract's exit-code list.
ERROR_EXIT_CODES: Final[dict[str, int]] = {
    "config": EXIT_BAD_INPUT,
    "model_load": EXIT_BAD_INPUT,
    "dataset": EXIT_BAD_INPUT,
    "caption": EXIT_BAD_INPUT,
    "oom": EXIT_OOM,
    "nan": EXIT_NAN,
    "internal": EXIT_INTERNAL,
}

EVENT_NAMES: Final = (
    "start",
    "model_loaded",
    "dataset",
    "resumed",
    "step",
    "epoch",
    "checkpoint",
    "checkpoint_removed",
    "sample",
    "samples_done",
    "saved",
    "warning",
    "done",
    "interrupted",
    "error",
)

EventSink = Callable[[dict[str, Any]], None]


class TrainerError(Exception):
    """An expected failure, described for a person: what happened, why, and the fix."""

    def __init__(self, kind: str, message: str, detail: str = "") -> None:
        if kind not in ERROR_KINDS:
            raise ValueError(f"unknown error kind {kind!r}")
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.detail = detail

    @property
    def exit_code(self) -> int:
        return ERROR_EXIT_CODES[self.kind]


class Interrupted(BaseException):
    """Raised when a stop signal arrives while there is nothing to save yet.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way up
    (ours or a library's) can mistake a stop for a failure.
    """


def _json_safe(value: Any) -> Any:
    # JSON has no NaN/Infinity; lorabuild's parser must never choke on a non-finite loss.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


class Emitter:
    """Writes one JSON object per line and flushes it, so lorabuild sees progress at once."""

    def __init__(self, stream: TextIO | None = None, sink: EventSink | None = None) -> None:
        self._stream = stream
        self._sink = sink
        # The signal handler may emit while the main thread is mid-line.
        self._lock = threading.RLock()

    def emit(self, event: str, **fields: Any) -> None:
        if event not in EVENT_NAMES:
            raise ValueError(f"unknown event {event!r}")
        record: dict[str, Any] = {"event": event, **_json_safe(fields)}
        with self._lock:
            if self._sink is not None:
                self._sink(record)
            if self._stream is not None:
                try:
                    self._stream.write(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")
                    self._stream.flush()
                except (BrokenPipeError, ValueError):
                    # The reader is gone (lorabuild died); keep going so the resume point
                    # still gets written, just without anyone to tell.
                    self._stream = None

    def warning(self, message: str) -> None:
        self.emit("warning", message=message)

    def error(self, error: TrainerError) -> None:
        self.emit("error", kind=error.kind, message=error.message, detail=error.detail)


_OOM_MARKERS: Final = (
    "out of memory",
    "can't allocate memory",  # torch's CPU allocator: "DefaultCPUAllocator: can't allocate memory"
    "cannot allocate memory",  # ENOMEM as strerror
    "std::bad_alloc",
)


# oneDNN, which runs PyTorch's CPU convolutions, reports a failed allocation with nothing more
# than these words. Its own bugs say the same, so they mean "out of memory" only where an
# allocation can fail at all ("... primitive descriptor" is a shape it does not support).
_ONEDNN_FAILURE: Final = re.compile(r"could not (?:create|execute) a primitive(?! descriptor)")
OVERCOMMIT_SETTING: Final = "/proc/sys/vm/overcommit_memory"


def allocations_can_fail() -> bool:
    """Whether running out of memory reaches this process as a failed allocation.

    True under an address-space limit (RLIMIT_AS, `ulimit -v`), with Linux's strict overcommit
    (vm.overcommit_memory = 2) and on Windows, which commits every allocation. Otherwise Linux
    hands out memory freely and its out-of-memory killer ends the process instead.
    """
    if sys.platform == "win32":
        return True
    try:
        import resource

        soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            return True
    except (ImportError, OSError, ValueError):
        pass
    try:
        with open(OVERCOMMIT_SETTING, encoding="ascii") as setting:
            return setting.read().strip() == "2"
    except OSError:
        return False


def is_out_of_memory(exc: BaseException) -> bool:
    """True when `exc` means the process ran out of (device or host) memory.

    A CPU process under RLIMIT_AS fails with MemoryError (Python allocations), a RuntimeError
    from torch's allocator, or oneDNN's bare "could not create a primitive"; CUDA fails with
    torch.OutOfMemoryError, which is a RuntimeError subclass whose message says "out of memory".
    The exceptions `exc` was raised from count too: diffusers turns a checkpoint that could not
    be read for lack of memory into "Unable to load weights from checkpoint file".
    """
    return out_of_memory_cause(exc) is not None


def out_of_memory_cause(exc: BaseException) -> BaseException | None:
    """The exception in `exc`'s chain (itself first) that says memory ran out, if any."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if _says_out_of_memory(cause):
            return cause
        cause = cause.__cause__ or cause.__context__
    return None


def _says_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    if type(exc).__name__ == "OutOfMemoryError":
        return True
    if isinstance(exc, RuntimeError | OSError):
        text = str(exc).lower()
        if any(marker in text for marker in _OOM_MARKERS):
            return True
        return bool(_ONEDNN_FAILURE.search(text)) and allocations_can_fail()
    return False


OOM_MESSAGE: Final = (
    "Training ran out of memory. The model, the batch and the resolution together need more "
    "memory than this machine could give. Fix: lower training.batch_size (raise "
    "gradient_accumulation to keep the effective batch), lower the resolution, or turn on "
    "gradient_checkpointing or mixed_precision; then run again - it resumes from the last "
    "checkpoint."
)


def classify_exception(exc: BaseException) -> TrainerError:
    """Turn any exception that escaped training into the error lorabuild should see."""
    if isinstance(exc, TrainerError):
        return exc
    detail = f"{type(exc).__name__}: {exc}".strip()
    cause = out_of_memory_cause(exc)
    if cause is not None and cause is not exc:
        detail += f" (raised while handling {type(cause).__name__}: {cause})"
    if len(detail) > 2000:
        detail = detail[:2000] + "…"
    if cause is not None:
        return TrainerError("oom", OOM_MESSAGE, detail)
    return TrainerError(
        "internal",
        f"The trainer failed unexpectedly ({type(exc).__name__}: {exc}). This is a bug in "
        "lorabuild or a library it uses, not in your spec. Fix: run again; if it repeats, report "
        "it with the trainer's stderr.",
        detail,
    )
