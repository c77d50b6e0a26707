"""Stand-in for SimpleTuner's simpletuner/train.py, for tests only (no torch, no GPU).

Behaves as reference/simpletuner.md describes the real one: reads config.json through
CONFIG_BACKEND=json / CONFIG_PATH, turns its keys into command-line flags and rejects unknown
ones and wrong types as SimpleTuner's argparse does, applies its post-parse checks, reads the
dataset list, resumes from `resume_from_checkpoint`, and writes what SimpleTuner writes into
output_dir: `checkpoint-<step>/` folders (LoRA, training_state.json, checkpoint_manifest.json,
then `.guard`), training_metrics.jsonl and the final pytorch_lora_weights.safetensors. Its output
is SimpleTuner's own lines: logging with the `[RANK 0] time [LEVEL]` prefix, the start-up
summary, the tqdm bar redrawn with \\r on stderr, tracebacks.

Scenario (env SIMPLETUNER_STANDIN_SCENARIO, else the file `standin-scenario` in the checkout):
normal, oom, nan, nodata, crash, exit0 (stops quietly with exit 0, as after a swallowed
Ctrl-C), stop-after-N (dies after step N, as when killed).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
KEYS = json.loads((Path(__file__).resolve().parent / "standin_keys.json").read_text())
ALLOW_EMPTY = {"resume_from_checkpoint"}


def log(level: str, message: str) -> None:
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S,%f")[:-3]
    print(f"[RANK 0] {stamp} [{level}] {message}", file=sys.stderr, flush=True)


def fail(exc_line: str, where: str = "simpletuner/helpers/training/trainer.py") -> None:
    print("Traceback (most recent call last):", file=sys.stderr)
    print(f'  File "{CHECKOUT / where}", line 1234, in train', file=sys.stderr)
    print(exc_line, file=sys.stderr, flush=True)
    sys.exit(1)


def scenario() -> str:
    chosen = os.environ.get("SIMPLETUNER_STANDIN_SCENARIO")
    marker = CHECKOUT / "standin-scenario"
    if not chosen and marker.is_file():
        chosen = marker.read_text().strip()
    return chosen or "normal"


def to_cli(config: dict) -> list[str]:
    """cli_utils.mapping_to_cli_args (§2): null skipped, booleans as flags, "false" and "" dropped."""
    args = []
    for key, value in config.items():
        key = key.removeprefix("--")
        if value is None or isinstance(value, dict):
            continue
        if value is True:
            args.append(f"--{key}")
        elif value is False:
            args.append(f"--{key}=false")
        elif value == "false" or (value == "" and key not in ALLOW_EMPTY):
            continue
        elif value == "true":
            args.append(f"--{key}")
        elif isinstance(value, list):
            args += [f"--{key}={item}" for item in value]
        else:
            args.append(f"--{key}={value}")
    return args


def parse(args: list[str]) -> dict:
    """argparse over the field registry: exact names, types and choices; unknown flags rejected."""
    known = KEYS["config"]
    optimizers = [n for names in KEYS["optimizers"].values() for n in names]
    parsed: dict = {}
    unknown = []
    for arg in args:
        name, _, raw = arg[2:].partition("=")
        spec = known.get(name)
        if spec is None:
            unknown.append(arg)
            continue
        kind = spec["type"]
        value: object
        try:
            if kind == "int":
                value = int(raw)
            elif kind == "float":
                value = float(raw)
            elif kind == "bool":
                value = raw.lower() not in ("false", "0", "no", "off")
            else:
                value = raw
        except ValueError:
            raise ValueError(f"argument --{name}: invalid {kind} value: '{raw}'") from None
        choices = optimizers if spec.get("choices_from") == "optimizers" else spec.get("choices")
        if kind == "select" and choices and value not in choices:
            raise ValueError(f"argument --{name}: invalid choice: '{value}' (choose from {', '.join(choices)})")
        parsed[name] = value
    if unknown:
        raise ValueError(f"Could not parse command line arguments:\nerror: unrecognized arguments: {' '.join(unknown)}")
    missing = [f"--{k}" for k, v in known.items() if v.get("required") and k not in parsed]
    if missing:
        raise ValueError(f"the following arguments are required: {', '.join(missing)}")
    return parsed


def write_safetensors(path: Path, rank: int) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    tmp = path.with_name(path.name + ".part")
    save_file(
        {
            "transformer.blocks.0.attn.to_q.lora_A.weight": np.full((rank, 8), 0.01, dtype=np.float32),
            "transformer.blocks.0.attn.to_q.lora_B.weight": np.zeros((8, rank), dtype=np.float32),
        },
        str(tmp),
    )
    os.replace(tmp, path)


def bar(epoch: int, epochs: int, step: int, total: int, started: float, postfix: str, first: bool) -> str:
    pct = int(100 * step / total) if total else 0
    filled = int(10 * step / total) if total else 0
    elapsed = time.monotonic() - started
    rate = f"{step / elapsed:.2f}it/s" if step and elapsed > 0 and not first else "?it/s"
    desc = f"Epoch {epoch}/{epochs} Steps" if first else f"Epoch {epoch}/{epochs}, Steps"
    tail = f", {postfix}" if postfix else ""
    remaining = "?" if first else "00:01"
    return f"\r{desc}: {pct:3d}%|{'█' * filled}{' ' * (10 - filled)}| {step}/{total} [00:00<{remaining}, {rate}{tail}]"


def main() -> None:
    chosen = scenario()
    backend = os.environ.get("SIMPLETUNER_CONFIG_BACKEND") or os.environ.get("CONFIG_BACKEND") or "json"
    config_path = os.environ.get("CONFIG_PATH", "config/config.json")
    if backend != "json":
        fail(f"ValueError: the stand-in reads JSON configs only, not {backend}")
    path = Path(config_path)
    if not path.suffix:
        path = path.with_suffix(".json")
    if not path.is_file():
        fail(
            f"ValueError: JSON configuration file not found. Paths tried: ['{path}']",
            "helpers/configuration/json_file.py",
        )
    # SimpleTuner writes debug.log into its working folder
    Path("debug.log").write_text("stand-in debug log\n")
    config = json.loads(path.read_text())
    args = to_cli(config)
    try:
        opts = parse(args)
    except ValueError as exc:
        log("ERROR", f"Could not parse input: {args}")
        fail(f"ValueError: {exc}", "helpers/configuration/cmd_args.py")
    epochs = opts.get("num_train_epochs", 1)
    max_steps = opts.get("max_train_steps")
    if max_steps and epochs > 0:
        fail(
            "ValueError: When using --max_train_steps (MAX_NUM_STEPS), you must set --num_train_epochs "
            "(NUM_EPOCHS) to 0."
        )
    if not max_steps and epochs <= 0:
        fail("ValueError: You must specify either --max_train_steps or --num_train_epochs with a value > 0")
    if opts["optimizer"] in KEYS["removed_optimizers"]:
        fail(f"ValueError: Optimizer {opts['optimizer']} has been removed.")
    if opts.get("seed") is not None:
        log("INFO", f"Using seed {opts['seed']}")

    model = Path(opts.get("pretrained_model_name_or_path", ""))
    if not (model / "model_index.json").is_file():
        fail(f"OSError: Error no file named model_index.json found in directory {model}.", "diffusers/loader.py")
    log("INFO", f"Loading {opts['model_family']} model from {model}")

    datasets = json.loads(Path(opts["data_backend_config"]).read_text())
    images_entry = next(d for d in datasets if d.get("dataset_type", "image") == "image")
    folder = Path(images_entry["instance_data_dir"])
    pictures = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if chosen == "nodata" or not pictures:
        log("WARNING", f"No images were discovered by the bucket manager in the dataset: {images_entry['id']}.")
        fail(
            f"ValueError: (id={images_entry['id']}) Dataset produced no usable samples.",
            "helpers/data_backend/factory.py",
        )
    for picture in pictures:
        picture.with_suffix(".txt").read_text(encoding="utf-8")  # a bad caption raises UnicodeDecodeError

    output = Path(opts["output_dir"])
    output.mkdir(parents=True, exist_ok=True)
    batch = opts.get("train_batch_size", 4)
    accumulation = opts.get("gradient_accumulation_steps", 1)
    samples = len(pictures) * (int(images_entry.get("repeats", 0)) + 1)
    per_epoch = math.ceil(math.ceil(samples / batch) / accumulation)
    if max_steps:
        total, epochs = max_steps, math.ceil(max_steps / per_epoch)
    else:
        total = epochs * per_epoch
        log(
            "INFO",
            f"Calculated our maximum training steps at {total} because we have {epochs} epochs "
            f"and {per_epoch} steps per epoch.",
        )

    step = 0
    resume = opts.get("resume_from_checkpoint", "latest")
    if resume:
        if resume == "latest":
            found = sorted(
                (int(p.name.split("-")[1]), p.name)
                for p in output.glob("checkpoint-*")
                if p.is_dir() and not p.name.endswith("tmp")
            )
            name = found[-1][1] if found else None
        else:
            name = os.path.basename(resume)
        if name is None or not (output / name).is_dir():
            log("INFO", f"Checkpoint '{resume}' does not exist. Starting a new training run.")
        else:
            log("INFO", f"Resuming from checkpoint {name}")
            step = json.loads((output / name / "training_state.json").read_text())["global_step"]

    summary = [
        "***** Running training *****",
        "-  Trainable parameters: 18,677,760 - 18.68M",
        f"-  Num batches = {math.ceil(samples / batch)}",
        f"-  Num Epochs = {epochs}",
        f"  - Current Epoch = {step // per_epoch + 1}",
        f"-  Total train batch size (w. parallel, distributed & accumulation) = {batch * accumulation}",
        f"  - Instantaneous batch size per device = {batch}",
        f"  - Gradient Accumulation steps = {accumulation}",
        f"-  Total optimization steps = {total}",
        f"-  Total optimization steps remaining = {total - step}",
    ]
    log("INFO", "\n".join(summary))

    rank = opts.get("lora_rank", 16)
    lr = opts.get("learning_rate", 4e-7)
    interval = opts.get("checkpoint_step_interval", 500)
    limit = opts.get("checkpoints_total_limit", 5)
    metrics = output / "training_metrics.jsonl"
    started = time.monotonic()
    stop_after = int(chosen.split("-")[-1]) if chosen.startswith("stop-after-") else None
    sys.stderr.write(bar(step // per_epoch + 1, epochs, step, total, started, "", first=True))
    sys.stderr.flush()
    while step < total:
        step += 1
        epoch = (step - 1) // per_epoch + 1
        time.sleep(0.005)
        if chosen == "oom" and step == 2:
            sys.stderr.write("\n")
            fail(
                "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                "capacity of 23.53 GiB of which 1.12 GiB is free. Of the allocated memory 20.91 GiB is allocated "
                "by PyTorch, and 512.00 MiB is reserved by PyTorch but unallocated."
            )
        if chosen == "nan" and step == 3:
            sys.stderr.write("\n")
            fail(
                f"RuntimeError: Non-finite training loss detected at step 3 (loss=nan). Batch files: ['{pictures[0]}']"
            )
        if chosen == "crash" and step == 2:
            sys.stderr.write("\n")
            fail("KeyError: 'latents'", "simpletuner/helpers/training/collate.py")
        if chosen == "exit0" and step == 3:
            sys.exit(0)  # a Ctrl-C inside train.py is swallowed: exit 0, nothing saved
        loss = 0.2 + 0.1 / step
        sys.stderr.write(bar(epoch, epochs, step, total, started, f"lr={lr:.3g}, step_loss={loss:.3g}", first=False))
        sys.stderr.flush()
        if opts.get("report_to") == "simpletuner":
            record = {
                "metrics": {"train_loss": loss, "learning_rate": lr, "epoch": epoch},
                "schema_version": 1,
                "step": step,
                "timestamp": datetime.datetime.now().isoformat(),
            }
            with open(metrics, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        if step % interval == 0:
            folder = output / f"checkpoint-{step}"
            folder.mkdir()
            write_safetensors(folder / "pytorch_lora_weights.safetensors", rank)
            (folder / "training_state.json").write_text(json.dumps({"global_step": step, "epoch": epoch}))
            (folder / "checkpoint_manifest.json").write_text(json.dumps({"version": 1, "checkpoint": folder.name}))
            (folder / ".guard").write_text("complete\n")
            # no newline first: a log line lands right after the bar, as it does with the real one
            log("INFO", f"Saving current state to {folder}")
            kept = sorted((int(p.name.split("-")[1]), p) for p in output.glob("checkpoint-*") if p.is_dir())
            for _, old in kept[: max(0, len(kept) - limit)]:
                for file in old.iterdir():
                    file.unlink()
                old.rmdir()
        if stop_after is not None and step == stop_after:
            sys.stderr.write("\n")
            print("Killed", file=sys.stderr, flush=True)
            sys.exit(137)
    sys.stderr.write("\n")
    log("INFO", f"Exiting training loop. Beginning model unwind at epoch {epoch}, step {step}")
    write_safetensors(output / "pytorch_lora_weights.safetensors", rank)
    log(
        "INFO",
        f"Training has completed.\n -> global_step = {step}, max_train_steps = {total}, epoch = {epoch}, "
        f"num_train_epochs = {epochs}",
    )


if __name__ == "__main__":
    main()
