"""Stand-in for kohya-ss sd-scripts' LoRA scripts, for tests/test_backend_kohya.py (stdlib only).

Copied into a fake checkout as train_network.py, sdxl_train_network.py and flux_train_network.py.
It reads `--config_file` the way sd-scripts does (TOML sections flattened), checks the dataset
TOML as strictly as sd-scripts' voluptuous schema (unknown keys and wrong types fail; it knows the
keys lorabuild may write), and is
stricter than the real script on one point: a config key sd-scripts does not have (the key list
is named by KOHYA_STANDIN_KEYS) fails instead of being silently ignored. It then replays the real
console output (reference/kohya.md §7, §9, §11, §12): the run summary, `epoch N/M` lines, the
tqdm `steps:` bar with `avr_loss` on stderr redrawn with \\r, the save/remove lines, resume lines,
`model saved.` — and writes what sd-scripts writes: `{name}-{epoch:06d}.safetensors`, state
folders with train_state.json and random_states_0.pkl (last), `{name}.safetensors`.

Scenario (env KOHYA_STANDIN_SCENARIO, else the file `scenario` in the working folder):
normal, oom (CUDA out of memory at step 2), oom_above:B (only when the batch is larger than B),
nan (avr_loss=nan from step 3, training goes on), nodata (`No data found…`, exit 0, no model),
crash (a Python exception), exit0 (no final model, exit 0), die_after:E (killed by SIGKILL
after saving epoch E). Every invocation is appended to `invocations.jsonl` in the working folder.
"""

import argparse
import json
import math
import os
import signal
import struct
import sys
import time
import tomllib
from pathlib import Path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DATASET_SCHEMA = {
    "general": {
        "caption_extension": (str,),
        "shuffle_caption": (bool,),
        "keep_tokens": (int,),
        "flip_aug": (bool,),
        "num_repeats": (int,),
        "resolution": (int, list),
        "batch_size": (int,),
        "enable_bucket": (bool,),
        "min_bucket_reso": (int,),
        "max_bucket_reso": (int,),
        "bucket_reso_steps": (int,),
    },
    "datasets": {
        "resolution": (int, list),
        "batch_size": (int,),
        "enable_bucket": (bool,),
        "min_bucket_reso": (int,),
        "max_bucket_reso": (int,),
        "bucket_reso_steps": (int,),
        "caption_extension": (str,),
        "num_repeats": (int,),
        "flip_aug": (bool,),
        "shuffle_caption": (bool,),
        "keep_tokens": (int,),
        "subsets": (list,),
    },
    "subsets": {
        "image_dir": (str,),
        "num_repeats": (int,),
        "caption_extension": (str,),
        "class_tokens": (str,),
        "flip_aug": (bool,),
        "shuffle_caption": (bool,),
        "keep_tokens": (int,),
    },
}


def out(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def err(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()


def scenario() -> str:
    name = os.environ.get("KOHYA_STANDIN_SCENARIO")
    if name:
        return name
    marker = Path("scenario")
    return marker.read_text().strip() if marker.is_file() else "normal"


def write_safetensors(path: Path, tensors: dict[str, tuple[list[int], int]], metadata: dict[str, str]) -> None:
    """A real .safetensors file of zero-filled F16 tensors (header, then the raw data)."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, (shape, _) in tensors.items():
        size = 2 * math.prod(shape)
        header[name] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw + bytes(offset))


# a 1×1 PNG: what a sample picture is does not matter here, where it lands does
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de"
    "0000000c4944415408d763f8cfc000000301010018dd8db00000000049454e44ae426082"
)


def save_lora(path: Path, args: dict[str, object], epoch: int, step: int) -> None:
    rank = int(args.get("network_dim") or 4)
    tensors = {
        "lora_unet_down_blocks_0_attn.lora_down.weight": ([rank, 8], 0),
        "lora_unet_down_blocks_0_attn.lora_up.weight": ([8, rank], 0),
    }
    meta = {"ss_epoch": str(epoch), "ss_steps": str(step), "ss_network_dim": str(rank), "ss_output_name": path.stem}
    write_safetensors(path, tensors, meta)


def save_state(folder: Path, epoch: int, step: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    out(f"save train state to {folder / 'train_state.json'} at epoch {epoch} step {step}")
    (folder / "train_state.json").write_text(json.dumps({"current_epoch": epoch, "current_step": step}))
    write_safetensors(folder / "model.safetensors", {"w": ([4], 0)}, {})
    (folder / "optimizer.bin").write_bytes(b"\0" * 64)
    (folder / "scheduler.bin").write_bytes(b"\0" * 16)
    (folder / "random_states_0.pkl").write_bytes(b"\0" * 16)  # accelerate writes this last


def fail(lines: list[str], code: int = 1) -> None:
    err("".join(line + "\n" for line in lines))
    sys.exit(code)


def invalid_dataset(where: str) -> None:
    out("Invalid user config / ユーザ設定の形式が正しくないようです")
    fail(
        [
            "Traceback (most recent call last):",
            '  File "/sd-scripts/library/config_util.py", line 386, in sanitize_user_config',
            "    return self.user_config_validator(user_config)",
            f"voluptuous.error.MultipleInvalid: {where}",
        ]
    )


def check_dataset(data: dict[str, object]) -> dict[str, object]:
    def check(table: object, section: str, path: str) -> None:
        if not isinstance(table, dict):
            invalid_dataset(f"expected a dictionary @ data{path}")
        assert isinstance(table, dict)
        for key, value in table.items():
            kinds = DATASET_SCHEMA[section].get(key)
            if kinds is None:
                invalid_dataset(f"extra keys not allowed @ data{path}['{key}']")
                continue
            wrong_bool = isinstance(value, bool) and bool not in kinds
            if wrong_bool or not isinstance(value, kinds):
                invalid_dataset(f"expected {kinds[0].__name__} for dictionary value @ data{path}['{key}']")

    for key in data:
        if key not in ("general", "datasets"):
            invalid_dataset(f"extra keys not allowed @ data['{key}']")
    check(data.get("general", {}), "general", "['general']")
    datasets = data.get("datasets")
    if not isinstance(datasets, list) or len(datasets) != 1:
        invalid_dataset("required key not provided @ data['datasets']")
    assert isinstance(datasets, list)
    check(datasets[0], "datasets", "['datasets'][0]")
    subsets = datasets[0].get("subsets")
    if not isinstance(subsets, list) or len(subsets) != 1:
        invalid_dataset("required key not provided @ data['datasets'][0]['subsets']")
    assert isinstance(subsets, list)
    check(subsets[0], "subsets", "['datasets'][0]['subsets'][0]")
    if "image_dir" not in subsets[0]:
        invalid_dataset("required key not provided @ data['datasets'][0]['subsets'][0]['image_dir']")
    return {**data.get("general", {}), **datasets[0], **subsets[0]}


def load_config(path: str) -> dict[str, object]:
    """read_config_from_file: every table's keys copied to the top level (reference §2)."""
    if not Path(path).is_file():
        out(f"{path} not found.")
        sys.exit(1)
    out(f"Loading settings from {path}...")
    with open(path, "rb") as handle:
        data = tomllib.load(handle)
    flat: dict[str, object] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    keys_file = os.environ.get("KOHYA_STANDIN_KEYS")
    if keys_file:
        known = json.loads(Path(keys_file).read_text())["config"]
        script = Path(sys.argv[0]).name
        unknown = sorted(k for k in flat if k not in known or script not in known[k]["scripts"])
        if unknown:
            fail([f"stand-in: {script} has no option(s) {', '.join(unknown)}"], 2)
    return flat


def bar(done: int, total: int, loss: float | None) -> None:
    """One redraw of sd-scripts' tqdm bar (desc="steps"), on stderr, starting with \\r."""
    pct = int(100 * done / total) if total else 0
    filled = "█" * (pct // 10)
    post = f", avr_loss={loss:.3g}" if loss is not None else ""
    rate = "?it/s" if done == 0 else " 4.20it/s"
    err(f"\rsteps: {pct:3d}%|{filled:<10}| {done}/{total} [00:0{min(done, 9)}<00:10,{rate}{post}]")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config_file", required=True)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--initial_epoch", type=int, default=None)
    args = parser.parse_args()
    with open("invocations.jsonl", "a", encoding="utf-8") as log:
        log.write(json.dumps({"argv": sys.argv, "cwd": os.getcwd()}) + "\n")
    what = scenario()
    config = load_config(args.config_file)

    dataset_file = Path(str(config["dataset_config"]))
    if not dataset_file.is_file():
        fail([f"ValueError: file not found / ファイルが見つかりません: {dataset_file}"])
    with open(dataset_file, "rb") as handle:
        dataset = check_dataset(tomllib.load(handle))
    image_dir = Path(str(dataset["image_dir"]))
    images = (
        sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS) if image_dir.is_dir() else []
    )
    out("prepare tokenizers")
    if what == "nodata" or not images:
        out(
            "No data found. Please verify arguments (train_data_dir must be the parent of folders with images) "
            "/ 画像がありません。引数指定を確認してください（train_data_dirには画像があるフォルダではなく、"
            "画像があるフォルダの親フォルダを指定する必要があります）"
        )
        sys.exit(0)
    repeats, batch = int(dataset.get("num_repeats", 1)), int(dataset.get("batch_size", 1))
    accumulation = int(config.get("gradient_accumulation_steps", 1))
    out(f"found directory {image_dir} contains {len(images)} image files")
    out(f"{len(images) * repeats} train images with repeats.")

    model = Path(str(config["pretrained_model_name_or_path"]))
    out(f"load StableDiffusion checkpoint: {model}")
    if not model.is_file():
        out(
            "model is not found as a file or in Hugging Face, perhaps file name is wrong? "
            "/ 指定したモデル名のファイル、またはHugging Faceのモデルが見つかりません。"
            f"ファイル名が誤っているかもしれません: {model}"
        )
        fail(
            [
                "Traceback (most recent call last):",
                '  File "/sd-scripts/library/model_util.py", line 1022, in load_models',
                f"OSError: Error no file named model_index.json found in directory {model}.",
            ]
        )
    out(f"import network module: {config['network_module']}")
    out(f"create LoRA network. base dim (rank): {config.get('network_dim')}, alpha: {config.get('network_alpha')}")
    if what == "crash":
        raise KeyError("lora_unet_mid_block_attentions_0_proj_in")
    out("prepare optimizer, data loader etc.")
    out(f"use {config.get('optimizer_type', 'AdamW')} optimizer | {{}}")

    samples = len(images) * repeats
    batches = math.ceil(samples / batch)
    per_epoch = math.ceil(batches / accumulation)
    if "max_train_epochs" in config:
        total = int(config["max_train_epochs"]) * per_epoch
        out(f"override steps. steps for {config['max_train_epochs']} epochs is / 指定エポックまでのステップ数: {total}")
    else:
        total = int(config.get("max_train_steps", 1600))
    epochs = math.ceil(total / per_epoch)

    output = Path(str(config["output_dir"]))
    name = str(config.get("output_name") or "last")
    start_epoch = 0
    if args.resume:
        out(f"resume training from local state: {args.resume}")
        state = json.loads((Path(args.resume) / "train_state.json").read_text())
        out(f"load train state from {Path(args.resume) / 'train_state.json'}: {state}")
        if args.initial_epoch is not None:
            out(
                "steps from the state is ignored because initial_step is specified "
                "/ initial_stepが指定されているため、stateからのステップ数は無視されます"
            )
            start_epoch = args.initial_epoch - 1
        else:
            start_epoch = int(state["current_step"]) // per_epoch

    out("running training / 学習開始")
    out(f"  num train images * repeats / 学習画像の数×繰り返し回数: {samples}")
    out("  num validation images * repeats / 学習画像の数×繰り返し回数: 0")
    out("  num reg images / 正則化画像の数: 0")
    out(f"  num batches per epoch / 1epochのバッチ数: {batches}")
    out(f"  num epochs / epoch数: {epochs}")
    out(f"  batch size per device / バッチサイズ: {batch}")
    out(f"  gradient accumulation steps / 勾配を合計するステップ数 = {accumulation}")
    out(f"  total optimization steps / 学習ステップ数: {total}")

    every = config.get("save_every_n_epochs")
    keep = config.get("save_last_n_epochs")
    keep_state = config.get("save_last_n_epochs_state") or keep
    step, losses = 0, []
    bar(0, total, None)
    for epoch in range(start_epoch, epochs):
        out(f"\nepoch {epoch + 1}/{epochs}\n")
        for _ in range(per_epoch):
            oom_above = what.startswith("oom_above:") and batch > int(what.split(":")[1])
            if (what == "oom" and step == 1) or oom_above:
                fail(
                    [
                        "\nTraceback (most recent call last):",
                        '  File "/sd-scripts/train_network.py", line 1412, in train',
                        "    accelerator.backward(loss)",
                        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total "
                        "capacity of 8.00 GiB of which 0 bytes is free. Including non-PyTorch memory, this process has "
                        "7.97 GiB memory in use. Of the allocated memory 7.28 GiB is allocated by PyTorch, and 150.53 "
                        "MiB is reserved by PyTorch but unallocated.",
                    ]
                )
            step += 1
            loss = math.nan if what == "nan" and step >= 3 else 0.12 / (1 + 0.01 * step)
            # progress_bar.update(1) redraws with the old postfix, then set_postfix with the new avr_loss
            bar(step, total, sum(losses) / len(losses) if losses else None)
            losses.append(loss)
            bar(step, total, sum(losses) / len(losses))
            if step >= total:
                break
        if every and (epoch + 1) % int(every) == 0 and epoch + 1 < epochs:
            output.mkdir(parents=True, exist_ok=True)
            ckpt = output / f"{name}-{epoch + 1:06d}.safetensors"
            out(f"\nsaving checkpoint: {ckpt}")
            save_lora(ckpt, config, epoch + 1, step)
            if keep:
                old = output / f"{name}-{epoch + 1 - int(every) * int(keep):06d}.safetensors"
                if old.exists():
                    out(f"removing old checkpoint: {old}")
                    old.unlink()
            if config.get("save_state"):
                out("")
                out(f"saving state at epoch {epoch + 1}")
                save_state(output / f"{name}-{epoch + 1:06d}-state", epoch + 1, step)
                if keep_state:
                    gone = output / f"{name}-{epoch + 1 - int(every) * int(keep_state):06d}-state"
                    if gone.exists():
                        out(f"removing old state: {gone}")
                        for child in gone.iterdir():
                            child.unlink()
                        gone.rmdir()
            if what == f"die_after:{epoch + 1}":
                os.kill(os.getpid(), signal.SIGKILL)
        sample_every = config.get("sample_every_n_epochs")
        if config.get("sample_prompts") and sample_every and (epoch + 1) % int(sample_every) == 0:
            # train_util.sample_images: {output_dir}/sample/{output_name}_e{epoch:06d}_{idx:02d}_{time}.png
            prompts = [line for line in Path(str(config["sample_prompts"])).read_text().splitlines() if line.strip()]
            folder = output / "sample"
            folder.mkdir(parents=True, exist_ok=True)
            stamp = time.strftime("%Y%m%d%H%M%S")
            for idx in range(len(prompts)):
                (folder / f"{name}_e{epoch + 1:06d}_{idx:02d}_{stamp}.png").write_bytes(PNG)
        if step >= total:
            break
    err("\n")
    if what == "exit0":
        sys.exit(0)
    output.mkdir(parents=True, exist_ok=True)
    if config.get("save_state"):
        out("saving last state.")
        save_state(output / f"{name}-state", epochs, step)
    final = output / f"{name}.safetensors"
    out(f"\nsaving checkpoint: {final}")
    save_lora(final, config, epochs, step)
    out("model saved.")


if __name__ == "__main__":
    main()
