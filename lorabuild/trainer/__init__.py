"""The builtin LoRA trainer, run by lorabuild as `python -m lorabuild.trainer` (docs/trainer.md).

This package owns training itself; lorabuild talks to it only through the config file, the
command line and the JSON-lines events on stdout. What is importable from here is light
(no torch, no diffusers), so the rest of lorabuild can use the constants, the step formula
and the demo-model helpers without the training extras being imported.

Modules: `config` (train.json and the step formula), `events` (output protocol, error kinds,
exit codes), `demo` (the tiny-sd demo model), `model` (base model checks and loading),
`dataset` (images, captions, cached latents), `lora` (the network and its file), `optim`
(optimizers and schedules), `checkpoints` (checkpoint folders), `train` (the run), `cli`
(the process: arguments, signals, exit codes).
"""

from __future__ import annotations

from lorabuild.trainer.config import (
    CONFIG_FORMAT,
    LR_SCHEDULERS,
    OPTIMIZERS,
    StepPlan,
    TrainerConfig,
    load_config,
    parse_config,
    plan_steps,
)
from lorabuild.trainer.demo import (
    DEMO_MARKER,
    DEMO_MODEL_NAME,
    DEMO_MODEL_VERSION,
    DEMO_MODELS,
    DEMO_RESOLUTION,
    demo_marker,
    is_demo_model,
    make_demo_model,
)
from lorabuild.trainer.events import (
    ERROR_EXIT_CODES,
    ERROR_KINDS,
    EVENT_NAMES,
    EXIT_BAD_INPUT,
    EXIT_INTERNAL,
    EXIT_NAN,
    EXIT_OK,
    EXIT_OOM,
    EXIT_SIGNAL,
    TrainerError,
)

__all__ = [
    "CONFIG_FORMAT",
    "DEMO_MARKER",
    "DEMO_MODELS",
    "DEMO_MODEL_NAME",
    "DEMO_MODEL_VERSION",
    "DEMO_RESOLUTION",
    "ERROR_EXIT_CODES",
    "ERROR_KINDS",
    "EVENT_NAMES",
    "EXIT_BAD_INPUT",
    "EXIT_INTERNAL",
    "EXIT_NAN",
    "EXIT_OK",
    "EXIT_OOM",
    "EXIT_SIGNAL",
    "LR_SCHEDULERS",
    "OPTIMIZERS",
    "StepPlan",
    "TrainerConfig",
    "TrainerError",
    "demo_marker",
    "is_demo_model",
    "load_config",
    "main",
    "make_demo_model",
    "parse_config",
    "plan_steps",
]


def main(argv: list[str] | None = None) -> int:
    """The command line (`python -m lorabuild.trainer ...`); returns the exit code.

    It takes over stdout and the signal handlers, so run it as its own process."""
    from lorabuild.trainer.cli import main as cli_main

    return cli_main(argv)
