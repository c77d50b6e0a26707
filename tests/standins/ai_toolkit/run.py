"""A stand-in for ostris/ai-toolkit's run.py (reference/ai-toolkit.md, ai-toolkit 27a03a91).

ai-toolkit cannot be installed here (it needs a GPU and gigabytes of models), so the tests run
this instead. It reads the job file as ai-toolkit does (absolute path, `${VAR}` and `[name]`
substitution, unknown keys silently ignored, the same hard errors), prints ai-toolkit's real
console lines (the tqdm bar redrawn with \\r on stderr, save, resume, OOM and result lines),
writes its real files (`<training_folder>/<name>/<name>_<step:09d>.safetensors` with
`training_info` metadata, `optimizer.pt`, the final `<name>.safetensors`, `config.yaml`, and
`.aitk_size.json` / `_latent_cache/` in the dataset folder), resumes as it does (from the newest
`<name>*` save by creation time) and exits as it does (1 on an error, 0 on "Job stopped").

The scenario comes from $AITK_STANDIN_SCENARIO, else from the file `standin-scenario` beside this
script: normal, oom, oom_skip, oom_above_batch_1, nan, nodata, crash, crash_after_save, stopped,
silent (claims success without writing the LoRA).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import sys
import time

import numpy as np
import yaml
from safetensors import safe_open
from safetensors.numpy import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
OPTIMIZERS = {"adam8bit", "adamw8bit", "ademamix8bit", "lion8bit", "adam8", "adamw8", "adam", "adamw", "adagrad"}
OPTIMIZERS |= {"lion", "adafactor", "automagic", "automagic2", "automagic3"}
SCHEDULERS = {"constant", "cosine", "cosine_with_restarts", "step", "linear", "constant_with_warmup"}
PROCESS_TYPES = {"sd_trainer", "diffusion_trainer", "ui_trainer", "textual_inversion_trainer"}


def scenario() -> str:
    chosen = os.environ.get("AITK_STANDIN_SCENARIO")
    if chosen:
        return chosen
    marker = os.path.join(HERE, "standin-scenario")
    if os.path.exists(marker):
        with open(marker, encoding="utf-8") as handle:
            return handle.read().strip() or "normal"
    return "normal"


def err(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()


def get_config(arg: str, name: str | None) -> dict:
    # toolkit/config.py: the repo's config/ folder first, then the argument, then the CWD
    candidates = [os.path.join(HERE, "config", arg)]
    candidates += [os.path.join(HERE, "config", arg + ext) for ext in (".json", ".jsonc", ".yaml", ".yml")]
    candidates += [arg, os.path.join(os.getcwd(), arg)]
    path = next((c for c in candidates if os.path.isfile(c)), None)
    if path is None:
        raise ValueError(f"Could not find config file {arg}")
    with open(path, encoding="utf-8") as handle:
        text = handle.read()

    def env(match: re.Match) -> str:
        if match.group(1) not in os.environ:
            raise ValueError(f"Environment variable {match.group(1)} not set. Please set it in your .env file")
        return os.environ[match.group(1)]

    text = re.sub(r"\$\{([^}]+)\}", env, text)
    config = yaml.safe_load(text)
    if "job" not in config:
        raise ValueError("config file must have a job key")
    if "config" not in config:
        raise ValueError("config file must have a config section")
    if "name" not in config["config"] and name is None:
        raise ValueError("config file must have a config.name key")
    job_name = name or config["config"]["name"]
    return json.loads(json.dumps(config).replace("[name]", job_name))


def metadata(meta: dict, name: str, step: int, epoch: int) -> dict[str, str]:
    saved = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    saved["training_info"] = json.dumps({"step": step, "epoch": epoch})
    saved["ss_output_name"] = name
    return saved


def write_lora(path: str, rank: int, meta: dict[str, str]) -> None:
    tensors = {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": np.full((rank, 8), 0.01, np.float16),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": np.zeros((8, rank), np.float16),
    }
    save_file(tensors, path, metadata=meta)


def bar(name: str, n: int, total: int, postfix: str = "") -> str:
    pct = int(100 * n / total) if total else 0
    filled = "#" * (pct // 10)
    return f"\r{name}: {pct:3d}%|{filled:<10}| {n}/{total} [00:0{n % 10}<00:10,  1.25it/s{postfix}]"


class Trainer:
    def __init__(self, config: dict, job_name: str, raw: dict):
        process = config["config"]["process"][0]
        if process.get("type") not in PROCESS_TYPES:
            raise ValueError(f"config file is invalid. Unknown process type: {process.get('type')}")
        self.name = job_name
        self.process = process
        self.meta = raw.get("meta", {})
        print(json.dumps(process, indent=4))
        # BaseTrainProcess: save_root = os.path.join(training_folder, name); None is a TypeError
        self.save_root = os.path.join(process.get("training_folder"), job_name)
        self.network = process.get("network") or {}
        self.save = process.get("save") or {}
        self.sample_config = process.get("sample") or {}
        self.train = process.get("train") or {}
        self.model = process.get("model") or {}
        self.datasets = process.get("datasets") or []
        if "gradient_accumulation" in self.train and "gradient_accumulation_steps" in self.train:
            raise ValueError("gradient_accumulation and gradient_accumulation_steps are mutually exclusive")
        if self.save.get("save_format", "safetensors") not in ("safetensors", "diffusers"):
            raise ValueError(f"save_format must be safetensors or diffusers, got {self.save.get('save_format')}")
        if self.model.get("name_or_path") is None:
            raise ValueError("name_or_path must be specified")
        self.raw = raw

    def run(self, what: str) -> None:
        os.makedirs(self.save_root, exist_ok=True)
        with open(os.path.join(self.save_root, "config.yaml"), "w", encoding="utf-8") as handle:
            yaml.safe_dump(self.raw, handle)
        model_path = self.model["name_or_path"]
        if os.path.isabs(model_path) and not os.path.exists(model_path):
            raise FileNotFoundError(f"[Errno 2] No such file or directory: '{model_path}'")
        optimizer = str(self.train.get("optimizer", "adamw")).lower()
        if optimizer not in OPTIMIZERS and not optimizer.startswith(("prodigy", "dadaptation")):
            raise ValueError(f"Unknown optimizer type {optimizer}")
        if self.train.get("lr_scheduler", "constant") not in SCHEDULERS:
            raise ValueError("Scheduler must be cosine, cosine_with_restarts, step, linear or constant")
        if what == "oom_above_batch_1" and int(self.train.get("batch_size", 1)) > 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 23.99 GiB total capacity)")

        images = 0
        for dataset in self.datasets:
            folder = dataset["folder_path"]
            print(f"Dataset: {folder}")
            print("  -  Preprocessing image dimensions")
            found = [n for n in sorted(os.listdir(folder)) if n.lower().endswith(IMAGE_EXTENSIONS)]
            if what == "nodata":
                found = []
            if not found:
                raise AssertionError(f"no images found in {folder}")
            with open(os.path.join(folder, ".aitk_size.json"), "w", encoding="utf-8") as handle:
                json.dump({n: [64, 64] for n in found}, handle)
            print(f"  -  Found {len(found)} images")
            if dataset.get("cache_latents_to_disk"):
                print("Caching latents to disk")
                os.makedirs(os.path.join(folder, "_latent_cache"), exist_ok=True)
            images += len(found) * int(dataset.get("num_repeats", 1))

        start = self.resume()
        if self.train.get("skip_first_sample") or self.train.get("disable_sampling"):
            print("Skipping first sample due to config setting")
        else:
            print("Generating baseline samples before training")

        steps = int(self.train.get("steps", 1000))
        save_every = int(self.save.get("save_every", 1000))
        lr = float(self.train.get("lr", 1e-6))
        batch = int(self.train.get("batch_size", 1)) * int(self.train.get("gradient_accumulation", 1))
        per_epoch = max(1, math.ceil(images / batch))
        err(bar(self.name, start, steps))
        oom_in_a_row = 0
        for step in range(start, steps):
            loss = 0.12 + 0.3 / (1 + step)
            if what == "oom" and step >= start + 1:
                oom_in_a_row += 1
                print("\n################################################")
                print(f"# OOM during training step, skipping batch {oom_in_a_row}/3 #")
                print("################################################")
                if oom_in_a_row >= 3:
                    raise RuntimeError("OOM during training step 3 times in a row, aborting training")
                continue
            if what == "oom_skip" and step == start + 1:
                print("\n################################################")
                print("# OOM during training step, skipping batch 1/3 #")
                print("################################################")
            if what == "nan" and step >= start + 2:
                print("loss is nan")
                loss = 0.0
            if what == "crash" and step == start + 2:
                raise RuntimeError("stand-in: an internal error in the trainer")
            if what == "stopped" and step == start + 2:
                raise KeyboardInterrupt
            # set_postfix_str redraws the bar where it is, then update(step - n) moves it to `step`
            postfix = f", lr: {lr:.1e} loss: {loss:.3e}"
            err(bar(self.name, max(start, step - 1), steps, postfix) + bar(self.name, step, steps, postfix))
            sample_every = int(self.sample_config.get("sample_every") or 0)
            if step != start and sample_every and step % sample_every == 0 and not self.train.get("disable_sampling"):
                self.sample(step)
            if step != start and save_every and step % save_every == 0:
                print(f"\nSaving at step {step}")
                self.save_lora(step, step // per_epoch)
                if what == "crash_after_save":
                    raise RuntimeError("stand-in: crashed after saving a checkpoint")
        err("\n")
        if not self.train.get("disable_sampling"):
            self.sample(steps)
            for i in range(1, 3):
                err(f"\rGenerating Images: {50 * i:3d}%|{'#' * 5 * i:<10}| {i}/2 [00:0{i}<00:00,  1.02it/s]")
            err("\n")
        print("")
        if what == "silent":
            return  # the odd exit: claims success, writes no LoRA
        self.save_lora(None, steps // per_epoch)

    def sample(self, step: int) -> None:
        # BaseSDTrainProcess.sample: <save_root>/samples/<epoch ms>__<step:09d>_<idx>.jpg
        folder = os.path.join(self.save_root, "samples")
        os.makedirs(folder, exist_ok=True)
        stamp = int(time.time() * 1000)
        for idx in range(len(self.sample_config.get("prompts") or [])):
            with open(os.path.join(folder, f"{stamp}__{step:09d}_{idx}.jpg"), "wb") as handle:
                handle.write(b"\xff\xd8\xff\xe0stand-in sample\xff\xd9")

    def resume(self) -> int:
        # get_latest_save_path: the newest `<name>*` in save_root by creation time, whatever it is
        paths = [p for p in glob.glob(os.path.join(self.save_root, f"{self.name}*")) if os.path.isfile(p)]
        if not paths:
            return 0
        latest = max(paths, key=os.path.getctime)
        print(f"#### IMPORTANT RESUMING FROM {latest} ####")
        print(f"Loading from {latest}")
        with safe_open(latest, "np") as handle:  # raises on a half-written file, as ai-toolkit's load does
            meta = handle.metadata() or {}
        step = 0
        if "training_info" in meta:
            step = int(json.loads(meta["training_info"])["step"])
            print(f"Found step {step} in metadata, starting from there")
        optimizer = os.path.join(self.save_root, "optimizer.pt")
        if os.path.exists(optimizer):
            print(f"Loading optimizer state from {optimizer}")
        return step

    def save_lora(self, step: int | None, epoch: int) -> None:
        suffix = "" if step is None else f"_{step:09d}"
        path = os.path.join(self.save_root, f"{self.name}{suffix}.safetensors")
        write_lora(path, int(self.network.get("linear", 4)), metadata(self.meta, self.name, step or 0, epoch))
        print(f"Saved checkpoint to {path}")
        optimizer = os.path.join(self.save_root, "optimizer.pt")
        with open(optimizer, "wb") as handle:
            handle.write(b"stand-in optimizer state")
        print(f"Saved optimizer to {optimizer}")
        self.clean_up_saves()

    def clean_up_saves(self) -> None:
        keep = int(self.save.get("max_step_saves_to_keep", 5))
        files = sorted(glob.glob(os.path.join(self.save_root, f"{self.name}_*.safetensors")), key=os.path.getctime)
        for old in files[:-keep] if len(files) > keep else []:
            print(f"Removing old save: {old}")
            os.remove(old)


def end_message(completed: int, failed: int) -> None:
    print("")
    print("========================================")
    print("Result:")
    print(f" - {completed} completed job{'' if completed == 1 else 's'}")
    if failed:
        print(f" - {failed} failure{'' if failed == 1 else 's'}")
    print("========================================")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config_file_list", nargs="+", type=str)
    parser.add_argument("-r", "--recover", action="store_true")
    parser.add_argument("-n", "--name", type=str, default=None)
    parser.add_argument("-l", "--log", type=str, default=None)
    args = parser.parse_args()
    what = scenario()
    print(f"Running {len(args.config_file_list)} job{'' if len(args.config_file_list) == 1 else 's'}")
    for config_file in args.config_file_list:
        try:
            config = get_config(config_file, args.name)
            if config["job"] != "extension":
                raise ValueError(f"Unknown job type {config['job']}")
            if not config["config"].get("process"):
                raise ValueError('config file is invalid. Missing "config.process" key')
            name = args.name or config["config"]["name"]
            print(f"Running job: {name}")
            trainer = Trainer(config, name, config)
            print("Running  1 process")
            trainer.run(what)
        except KeyboardInterrupt:
            print("Job stopped")
            sys.exit(0)
        except Exception as exc:
            print(f"Error running job: {exc}")
            end_message(0, 1)
            raise
    end_message(1, 0)


if __name__ == "__main__":
    main()
