"""Tests for the builtin trainer (`python -m lorabuild.trainer`, docs/trainer.md).

Most tests run the trainer for real, as the subprocess lorabuild runs, on the tiny demo model
and a handful of 64 px shapes drawn here; the rest call its pieces in-process where the
subprocess adds nothing but start-up time. Fixtures live in this file on purpose.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lorabuild.trainer import (
    DEMO_MARKER,
    DEMO_MODEL_NAME,
    DEMO_MODEL_VERSION,
    EXIT_BAD_INPUT,
    EXIT_NAN,
    EXIT_OOM,
    EXIT_SIGNAL,
    is_demo_model,
    make_demo_model,
    plan_steps,
)

# The trainer's own package imports without them; running it does not.
pytest.importorskip("torch")
pytest.importorskip("diffusers")

REPO = Path(__file__).resolve().parent.parent

# 6 images, batch 2, repeats 1 -> 3 steps per epoch; 4 epochs -> 12 steps.
SHAPES = [
    ("red", "circle"),
    ("blue", "square"),
    ("green", "triangle"),
    ("yellow", "circle"),
    ("red", "square"),
    ("blue", "triangle"),
]
EPOCHS = 4
STEPS_PER_EPOCH = 3
TOTAL_STEPS = EPOCHS * STEPS_PER_EPOCH


# ---------------------------------------------------------------------------- helpers


@dataclass
class Result:
    rc: int
    events: list[dict[str, Any]]
    stderr: str

    def of(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == name]

    def one(self, name: str) -> dict[str, Any]:
        found = self.of(name)
        assert len(found) == 1, (name, self.events, self.stderr)
        return found[0]

    def losses(self) -> dict[int, float]:
        return {e["step"]: e["loss"] for e in self.of("step")}


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("LORABUILD_PARENT_PID", None)
    env.update(extra or {})
    return env


def _parse(stdout: str) -> list[dict[str, Any]]:
    events = []
    for line in stdout.splitlines():
        event = json.loads(line)  # every stdout line must be a protocol line
        assert isinstance(event, dict) and "event" in event, line
        events.append(event)
    return events


def run_trainer(*args: str | Path, env: dict[str, str] | None = None, prefix: list[str] | None = None) -> Result:
    cmd = [sys.executable, *(prefix or ["-m", "lorabuild.trainer"]), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(env), cwd=REPO, timeout=300)
    return Result(proc.returncode, _parse(proc.stdout), proc.stderr)


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def load_lora(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118


def write_config(folder: Path, model_path: Path, dataset: Path, **training: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    checkpoints = training.pop("checkpoints", {"every_n_epochs": 1, "keep_last": 2})
    model_section = training.pop("model", {"path": str(model_path), "demo": DEMO_MODEL_NAME, "family": "sd15"})
    config = {
        "format": 1,
        "name": "shapes",
        "model": model_section,
        "dataset": {
            "path": str(dataset),
            "caption_extension": ".txt",
            "repeats": 1,
            "images": sorted(p.name for p in dataset.glob("*.png")),
        },
        "training": {
            "learning_rate": 0.001,
            "epochs": EPOCHS,
            "max_train_steps": None,
            "batch_size": 2,
            "gradient_accumulation": 1,
            "resolution": 64,
            "rank": 4,
            "alpha": 2.0,
            "optimizer": "adamw",
            "optimizer_args": {},
            "lr_scheduler": "constant",
            "lr_warmup_steps": 0,
            "mixed_precision": "no",
            "gradient_checkpointing": False,
            "seed": 42,
            "noise_offset": 0.0,
            "flip_aug": False,
            "save_precision": "fp16",
            **training,
        },
        "checkpoints": checkpoints,
        "output": {
            "dir": str(folder),
            "lora": str(folder / "shapes.safetensors"),
            "checkpoints": str(folder / "checkpoints"),
        },
        "resume_key": "key-1",
        "device": "cpu",
        "threads": None,
        "metadata": {"ss_sd_model_name": "tiny-sd", "lorabuild_spec": "shapes"},
    }
    path = folder / "train.json"
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("trainer")


@pytest.fixture(scope="module")
def dataset(work: Path) -> Path:
    from PIL import Image, ImageDraw

    folder = work / "shapes"
    folder.mkdir()
    colours = {"red": (220, 40, 40), "blue": (40, 60, 220), "green": (40, 170, 60), "yellow": (230, 200, 40)}
    for colour, shape in SHAPES:
        image = Image.new("RGB", (64, 64), (245, 235, 210))
        draw = ImageDraw.Draw(image)
        box = (14, 14, 50, 50)
        if shape == "circle":
            draw.ellipse(box, fill=colours[colour])
        elif shape == "square":
            draw.rectangle(box, fill=colours[colour])
        else:
            draw.polygon([(32, 12), (52, 50), (12, 50)], fill=colours[colour])
        stem = f"{colour}-{shape}"
        image.save(folder / f"{stem}.png")
        (folder / f"{stem}.txt").write_text(f"shapestyle, a {colour} {shape} on a cream background\n", "utf-8")
    return folder


@pytest.fixture(scope="module")
def demo_model(work: Path) -> Path:
    """Created through the command line, as lorabuild does."""
    target = work / "models" / "tiny-sd"
    result = run_trainer("--make-demo-model", target)
    assert result.rc == 0, result.stderr
    assert result.one("saved")["path"] == str(target)
    return target


@pytest.fixture(scope="module")
def reference(work: Path, demo_model: Path, dataset: Path) -> tuple[Path, Result]:
    """One complete, uninterrupted run that the other tests compare against."""
    config = write_config(work / "reference", demo_model, dataset)
    result = run_trainer(config)
    assert result.rc == 0, result.stderr
    return config, result


# ------------------------------------------------------------------------ 1. demo model


def test_demo_model_is_deterministic_and_marked(demo_model: Path, tmp_path: Path) -> None:
    assert is_demo_model(demo_model)
    marker = json.loads((demo_model / DEMO_MARKER).read_text())
    assert marker == {"demo": DEMO_MODEL_NAME, "version": DEMO_MODEL_VERSION}
    for part in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (demo_model / part).exists(), part

    # A second build, in-process this time, gives byte-identical files.
    again = tmp_path / "again"
    assert make_demo_model(again) is True
    assert make_demo_model(again) is False  # already there: left alone
    assert tree_hashes(again) == tree_hashes(demo_model)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_demo_model_creation_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lorabuild.trainer import demo

    def broken_build(folder: Path) -> None:
        (folder / "model_index.json").write_text("{}")
        raise RuntimeError("disk full, say")

    monkeypatch.setattr(demo, "_build_into", broken_build)
    target = tmp_path / "tiny-sd"
    with pytest.raises(RuntimeError, match="disk full"):
        make_demo_model(target)
    assert list(tmp_path.iterdir()) == [], "a half-built model (or its temporary folder) was left"

    # Someone's real model is never overwritten.
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "model_index.json").write_text("{}")
    with pytest.raises(FileExistsError):
        make_demo_model(tmp_path / "real")


# ------------------------------------------------------------------------ 2. a full run


def test_full_run_follows_the_protocol(reference: tuple[Path, Result], demo_model: Path) -> None:
    config_path, result = reference
    config = json.loads(config_path.read_text())
    names = [e["event"] for e in result.events]
    assert names[:3] == ["start", "model_loaded", "dataset"]
    assert names[-2:] == ["saved", "done"]
    assert "error" not in names and "resumed" not in names

    start = result.one("start")
    assert start["device"] == "cpu" and start["threads"] == 1 and start["pid"] > 0 and start["torch"]
    loaded = result.one("model_loaded")
    assert loaded["model"] == str(demo_model) and loaded["lora_modules"] > 0 and loaded["lora_params"] > 0
    ds = result.one("dataset")
    plan = plan_steps(len(SHAPES), 1, 2, 1, EPOCHS)
    assert ds == {
        "event": "dataset",
        "images": len(SHAPES),
        "captions": len(SHAPES),
        "repeats": 1,
        "samples_per_epoch": plan.samples_per_epoch,
        "steps_per_epoch": STEPS_PER_EPOCH,
        "total_steps": TOTAL_STEPS,
        "epochs": EPOCHS,
    }

    steps = result.of("step")
    assert [s["step"] for s in steps] == list(range(1, TOTAL_STEPS + 1))
    for s in steps:
        assert set(s) == {"event", "step", "total_steps", "epoch", "epochs", "loss", "lr", "step_seconds"}
        assert s["epoch"] == (s["step"] - 1) // STEPS_PER_EPOCH + 1 and s["total_steps"] == TOTAL_STEPS
        assert math.isfinite(s["loss"]) and s["lr"] == pytest.approx(0.001)
    epochs = result.of("epoch")
    assert [(e["epoch"], e["step"]) for e in epochs] == [(i, i * STEPS_PER_EPOCH) for i in range(1, EPOCHS + 1)]
    first = [s["loss"] for s in steps[:STEPS_PER_EPOCH]]
    assert epochs[0]["mean_loss"] == pytest.approx(sum(first) / len(first))

    # Checkpoints after every epoch but the last; keep_last=2 removes the oldest.
    ckpt_root = Path(config["output"]["checkpoints"])
    made = result.of("checkpoint")
    assert [(c["epoch"], c["step"]) for c in made] == [(1, 3), (2, 6), (3, 9)]
    assert [Path(c["path"]).name for c in made] == ["epoch-0001", "epoch-0002", "epoch-0003"]
    assert [e["path"] for e in result.of("checkpoint_removed")] == [str(ckpt_root / "epoch-0001")]
    assert sorted(p.name for p in ckpt_root.iterdir()) == ["epoch-0002", "epoch-0003"]
    for folder in ckpt_root.iterdir():
        info = json.loads((folder / "checkpoint.json").read_text())
        assert info["resume_key"] == "key-1" and info["step"] == info["epoch"] * STEPS_PER_EPOCH
        assert (folder / "state.pt").is_file()
        assert (folder / f"shapes-{folder.name}.safetensors").is_file()

    # The final LoRA: kohya key names, shapes, dtype and metadata.
    lora_path = Path(config["output"]["lora"])
    saved = result.one("saved")
    assert saved == {"event": "saved", "path": str(lora_path), "bytes": lora_path.stat().st_size}
    tensors, meta = load_lora(lora_path)
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    assert len(modules) == loaded["lora_modules"]
    assert sum(t.numel() for k, t in tensors.items() if not k.endswith(".alpha")) == loaded["lora_params"]
    for name in modules:
        assert name.startswith("lora_unet_") and name.endswith(("_to_q", "_to_k", "_to_v", "_to_out_0"))
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        assert down.shape[0] == 4 and up.shape[1] == 4 and down.dtype == up.dtype
        assert str(down.dtype) == "torch.float16"
        assert tensors[f"{name}.alpha"].shape == () and float(tensors[f"{name}.alpha"]) == 2.0
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in modules
    assert any(float(t.abs().max()) > 0 for k, t in tensors.items() if "lora_up" in k), "nothing was learned"
    expected_meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": "4",
        "ss_network_alpha": "2.0",
        "ss_base_model_version": "sd_v1",
        "ss_sd_model_name": "tiny-sd",
        "ss_steps": str(TOTAL_STEPS),
        "ss_epoch": str(EPOCHS),
        "ss_num_epochs": str(EPOCHS),
        "ss_learning_rate": "0.001",
        "ss_resolution": "(64, 64)",
        "ss_seed": "42",
        "ss_output_name": "shapes",
        "lorabuild_spec": "shapes",
    }
    assert {k: meta.get(k) for k in expected_meta} == expected_meta
    assert "AdamW" in meta["ss_optimizer"] and float(meta["ss_training_started_at"]) > 0
    assert meta["lorabuild_version"]

    done = result.one("done")
    assert done["steps"] == TOTAL_STEPS and done["seconds"] > 0
    leftovers = [p for p in lora_path.parent.rglob(".*")]
    assert leftovers == [], "temporary files left behind"


# ----------------------------------------------------------------------- 3. determinism


def test_same_config_gives_identical_losses(reference: tuple[Path, Result], work: Path) -> None:
    config_path, first = reference
    config = json.loads(config_path.read_text())
    config["output"] = {"dir": str(work / "again"), "lora": str(work / "again" / "shapes.safetensors")}
    second_path = work / "again.json"
    second_path.write_text(json.dumps(config))
    second = run_trainer(second_path)
    assert second.rc == 0, second.stderr
    assert second.losses() == first.losses()  # exactly, not approximately
    a, _ = load_lora(Path(json.loads(config_path.read_text())["output"]["lora"]))
    b, _ = load_lora(work / "again" / "shapes.safetensors")
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


def test_sample_pictures_do_not_change_the_training(reference: tuple[Path, Result], work: Path) -> None:
    """Samples of each epoch and the last, the same pictures run after run, and the losses and
    the LoRA exactly those of the same training without samples."""
    config_path, first = reference
    config = json.loads(config_path.read_text())
    runs = []
    for name in ("samples-a", "samples-b"):
        folder = work / name
        config["output"] = {"dir": str(folder), "lora": str(folder / "shapes.safetensors")}
        config["samples"] = {"prompts": ["shapestyle, a red square", "a blue circle"], "every_n_epochs": 2, "steps": 4}
        path = work / f"{name}.json"
        path.write_text(json.dumps(config))
        result = run_trainer(path)
        assert result.rc == 0, result.stderr
        assert result.losses() == first.losses()
        runs.append((folder, result))
    (folder_a, result), (folder_b, _) = runs
    epochs = int(config["training"]["epochs"])
    rendered = sorted({2 * k for k in range(1, epochs // 2 + 1)} | {epochs})
    names = sorted(f"epoch-{e:04d}-{i}.png" for e in rendered for i in (1, 2))
    assert sorted(p.name for p in (folder_a / "samples").iterdir()) == names
    assert [(e["epoch"], e["index"]) for e in result.of("sample")] == [(e, i) for e in rendered for i in (1, 2)]
    assert tree_hashes(folder_a / "samples") == tree_hashes(folder_b / "samples")
    from PIL import Image

    picture = Image.open(folder_a / "samples" / names[0])
    assert picture.size == (config["training"]["resolution"],) * 2 and picture.mode == "RGB"
    a, _ = load_lora(Path(json.loads(config_path.read_text())["output"]["lora"]))
    b, _ = load_lora(folder_a / "shapes.safetensors")
    assert all(bool((a[k] == b[k]).all()) for k in a)
    # a dry run renders none
    dry = work / "samples-dry"
    config["output"] = {"dir": str(dry), "lora": str(dry / "shapes.safetensors")}
    (work / "dry.json").write_text(json.dumps(config))
    done = run_trainer(work / "dry.json", "--max-steps", "2", "--no-checkpoints", "--no-resume")
    assert done.rc == 0 and not done.of("sample") and not (dry / "samples").exists()


# -------------------------------------------------------------------------- 4. resuming


def _copy_config(source: Path, folder: Path) -> Path:
    config = json.loads(source.read_text())
    folder.mkdir(parents=True)
    config["output"] = {
        "dir": str(folder),
        "lora": str(folder / "shapes.safetensors"),
        "checkpoints": str(folder / "checkpoints"),
    }
    path = folder / "train.json"
    path.write_text(json.dumps(config))
    return path


def test_sigterm_saves_a_resume_point_and_resume_matches(reference: tuple[Path, Result], work: Path) -> None:
    ref_config, ref = reference
    config = _copy_config(ref_config, work / "sigterm")
    stderr = (work / "sigterm" / "stderr.txt").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lorabuild.trainer", str(config)],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env=_env(),
        cwd=REPO,
    )
    assert proc.stdout is not None
    events = []
    for line in proc.stdout:
        events.append(json.loads(line))
        if events[-1]["event"] == "checkpoint" and len([e for e in events if e["event"] == "checkpoint"]) == 1:
            proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == EXIT_SIGNAL
    stderr.close()
    first = Result(EXIT_SIGNAL, events, "")
    stopped = first.one("interrupted")
    step = stopped["step"]
    assert STEPS_PER_EPOCH <= step < TOTAL_STEPS
    assert max(first.losses()) == step, "the step in progress was finished before stopping"
    assert stopped["checkpoint"] is not None
    saved_at = Path(stopped["checkpoint"])
    assert saved_at.is_dir() and json.loads((saved_at / "checkpoint.json").read_text())["step"] == step
    assert not (work / "sigterm" / "shapes.safetensors").exists()
    assert first.losses() == {k: v for k, v in ref.losses().items() if k <= step}

    resumed = run_trainer(config)
    assert resumed.rc == 0, resumed.stderr
    assert resumed.one("resumed") == {
        "event": "resumed",
        "step": step,
        "epoch": (step - 1) // 3 + 1,
        "checkpoint": str(saved_at),
    }
    assert resumed.losses() == {k: v for k, v in ref.losses().items() if k > step}
    # The epoch mean includes the steps done before the interruption.
    ref_means = {e["epoch"]: e["mean_loss"] for e in ref.of("epoch")}
    for e in resumed.of("epoch"):
        assert e["mean_loss"] == pytest.approx(ref_means[e["epoch"]], abs=1e-12)
    a, _ = load_lora(Path(json.loads(ref_config.read_text())["output"]["lora"]))
    b, meta = load_lora(work / "sigterm" / "shapes.safetensors")
    assert all(bool((a[k] == b[k]).all()) for k in a)
    assert meta["ss_steps"] == str(TOTAL_STEPS)
    # The interrupt save is gone once newer checkpoints exist.
    names = sorted(p.name for p in (work / "sigterm" / "checkpoints").iterdir())
    assert not [n for n in names if n.startswith(("step-", "."))], names


def test_max_steps_then_resume_with_a_different_batch_split(reference: tuple[Path, Result], work: Path) -> None:
    ref_config, ref = reference
    config = _copy_config(ref_config, work / "maxsteps")
    partial = run_trainer(config, "--max-steps", "7", "--lora-out", work / "maxsteps" / "partial.safetensors")
    assert partial.rc == 0, partial.stderr
    assert max(partial.losses()) == 7 and partial.losses() == {k: v for k, v in ref.losses().items() if k <= 7}
    assert (work / "maxsteps" / "partial.safetensors").is_file()
    assert not (work / "maxsteps" / "shapes.safetensors").exists()

    # As out-of-memory recovery would: same effective batch, split 1 × 2.
    resumed = run_trainer(config, "--batch-size", "1", "--gradient-accumulation", "2")
    assert resumed.rc == 0, resumed.stderr
    assert resumed.one("resumed")["step"] == 6  # the newest checkpoint: epoch-0002
    expected = {k: v for k, v in ref.losses().items() if k > 6}
    assert resumed.losses().keys() == expected.keys()
    for k, loss in resumed.losses().items():
        assert loss == pytest.approx(expected[k], rel=1e-5)
    a, _ = load_lora(Path(json.loads(ref_config.read_text())["output"]["lora"]))
    b, _ = load_lora(work / "maxsteps" / "shapes.safetensors")
    for key in a:
        scale = max(1.0, float(a[key].abs().max()))
        assert float((a[key].float() - b[key].float()).abs().max()) <= 2e-3 * scale


# ------------------------------------------------------------------ 5. diffusers loading


def test_diffusers_loads_the_lora_with_the_right_weights(reference: tuple[Path, Result], demo_model: Path) -> None:
    import torch
    from diffusers import StableDiffusionPipeline

    config_path, _ = reference
    lora_path = Path(json.loads(config_path.read_text())["output"]["lora"])
    tensors, _ = load_lora(lora_path)

    pipe = StableDiffusionPipeline.from_pretrained(str(demo_model))
    pipe.set_progress_bar_config(disable=True)

    def render() -> Any:
        return pipe(
            "shapestyle, a red circle",
            num_inference_steps=3,
            height=64,
            width=64,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images

    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"
    name = "lora_unet_" + path.replace(".", "_")
    base = pipe.unet.get_submodule(path).weight.detach().clone()
    before = render()
    pipe.load_lora_weights(str(lora_path))
    after = render()
    assert float(abs(after - before).max()) > 1e-5, "the LoRA did not change the output"

    pipe.fuse_lora()
    fused = pipe.unet.get_submodule(path).base_layer.weight.detach()
    up = tensors[f"{name}.lora_up.weight"].float()
    down = tensors[f"{name}.lora_down.weight"].float()
    alpha, rank = float(tensors[f"{name}.alpha"]), down.shape[0]
    expected = up @ down * alpha / rank
    assert float(expected.abs().max()) > 0
    torch.testing.assert_close(fused - base, expected, atol=1e-6, rtol=1e-4)


# -------------------------------------------------------------------------- 6. optimizers


@pytest.mark.parametrize(("optimizer", "lr"), [("adamw", 1e-3), ("lion", 1e-4), ("prodigy", 1.0), ("adafactor", 1e-2)])
def test_each_optimizer_trains(
    optimizer: str, lr: float, work: Path, demo_model: Path, dataset: Path, tmp_path: Path
) -> None:
    from lorabuild.trainer.config import load_config
    from lorabuild.trainer.events import Emitter
    from lorabuild.trainer.train import Run, RunOptions, StopControl

    config = write_config(
        tmp_path,
        demo_model,
        dataset,
        optimizer=optimizer,
        learning_rate=lr,
        save_precision="float",
        lr_scheduler="cosine",
        lr_warmup_steps=1,
    )
    events: list[dict[str, Any]] = []
    out = tmp_path / "two-steps.safetensors"
    opts = RunOptions(max_steps=2, checkpoints=False, resume=False, lora_out=out)
    assert Run(load_config(config), opts, Emitter(sink=events.append), StopControl()).run() == 0
    steps = [e for e in events if e["event"] == "step"]
    assert [s["step"] for s in steps] == [1, 2] and all(math.isfinite(s["loss"]) for s in steps)
    tensors, meta = load_lora(out)
    assert any(float(t.abs().max()) > 0 for k, t in tensors.items() if "lora_up" in k), "no update happened"
    assert meta["ss_steps"] == "2" and not (tmp_path / "checkpoints").exists()


def test_learning_rate_schedules() -> None:
    from lorabuild.trainer.optim import lr_factor

    assert [lr_factor("constant", 3, 10)(i) for i in (0, 9)] == [1.0, 1.0]
    warm = lr_factor("constant_with_warmup", 4, 10)
    assert [warm(i) for i in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    linear = lr_factor("linear", 0, 10)
    assert linear(0) == 1.0 and linear(9) == pytest.approx(0.1)
    cosine = lr_factor("cosine", 2, 12)
    assert cosine(0) == 0.5 and cosine(2) == 1.0 and 0 < cosine(11) < 0.05


def test_config_defaults_and_errors(tmp_path: Path) -> None:
    from lorabuild.trainer.config import parse_config
    from lorabuild.trainer.events import TrainerError

    minimal = {
        "format": 1,
        "name": "x",
        "model": {"path": "model"},
        "dataset": {"path": "data"},
        "training": {"learning_rate": 1},
        "output": {"dir": "out"},
    }
    cfg = parse_config(minimal, tmp_path)
    assert cfg.model.path == tmp_path / "model" and cfg.output.lora == tmp_path / "out" / "x.safetensors"
    assert cfg.training.alpha == cfg.training.rank == 4 and cfg.training.learning_rate == 1.0
    assert cfg.checkpoints.every_n_epochs == 1 and cfg.checkpoints.keep_last is None
    assert cfg.device == "auto" and cfg.threads is None and cfg.metadata == {}
    cases: list[tuple[str, dict[str, Any]]] = [
        ("training.learning_rate", {"training": {"learning_rate": -1}}),
        ("training.batch_size", {"training": {"learning_rate": 1, "batch_size": True}}),
        ("training.resolution", {"training": {"learning_rate": 1, "resolution": 100}}),
        ("name", {"name": "../escape"}),
        ("format", {"format": 2}),
        ("device", {"device": "tpu"}),
    ]
    for where, bad in cases:
        with pytest.raises(TrainerError) as caught:
            parse_config({**minimal, **bad}, tmp_path)
        assert caught.value.kind == "config" and where in caught.value.message, caught.value.message


def test_package_import_is_light() -> None:
    code = "import sys, lorabuild.trainer; print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd=REPO)
    assert done.stdout.strip() == "[]", done.stderr


def test_plan_steps_formula() -> None:
    plan = plan_steps(images=8, repeats=2, batch_size=3, gradient_accumulation=2, epochs=5)
    assert (plan.samples_per_epoch, plan.micro_batches_per_epoch, plan.steps_per_epoch) == (16, 6, 3)
    assert (plan.total_steps, plan.epochs) == (15, 5)
    capped = plan_steps(8, 2, 3, 2, epochs=5, max_train_steps=7)
    assert (capped.total_steps, capped.epochs) == (7, 3)


# ---------------------------------------------------------------------------- 7. failures


def _no_traceback(result: Result) -> None:
    assert "Traceback" not in result.stderr, result.stderr


def test_missing_model_folder(work: Path, dataset: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    config = write_config(tmp_path, missing, dataset, model={"path": str(missing), "demo": None})
    result = run_trainer(config)
    assert result.rc == EXIT_BAD_INPUT
    error = result.one("error")
    assert error["kind"] == "model_load" and str(missing) in error["message"] and "Fix:" in error["message"]
    _no_traceback(result)


def test_corrupt_model_folder(demo_model: Path, tmp_path: Path) -> None:
    import shutil

    import torch

    from lorabuild.trainer.events import TrainerError
    from lorabuild.trainer.model import load_model

    broken = tmp_path / "broken"
    shutil.copytree(demo_model, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(TrainerError) as caught:
        load_model(broken, torch.device("cpu"), torch.float32)
    assert caught.value.kind == "model_load" and "unet" in caught.value.message


def test_caption_that_is_not_utf8(demo_model: Path, dataset: Path, tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "bad-captions"
    shutil.copytree(dataset, bad)
    (bad / "red-circle.txt").write_bytes("shapestyle, a red circle in a caf\xe9".encode("latin-1"))
    result = run_trainer(write_config(tmp_path, demo_model, bad))
    assert result.rc == EXIT_BAD_INPUT
    error = result.one("error")
    assert error["kind"] == "caption" and "red-circle.txt" in error["message"] and "UTF-8" in error["message"]
    _no_traceback(result)


def test_unreadable_image(tmp_path: Path) -> None:
    from lorabuild.trainer.dataset import load_image
    from lorabuild.trainer.events import TrainerError

    image = tmp_path / "broken.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(TrainerError) as caught:
        load_image(image, 64)
    assert caught.value.kind == "dataset" and "broken.png" in caught.value.message


def test_bad_config_and_arguments(tmp_path: Path, dataset: Path, demo_model: Path) -> None:
    config = write_config(tmp_path, demo_model, dataset, optimizer="sgd")
    result = run_trainer(config)
    assert result.rc == EXIT_BAD_INPUT and result.one("error")["kind"] == "config"
    assert "training.optimizer" in result.one("error")["message"]
    result = run_trainer(config, "--max-steps", "zero")
    assert result.rc == EXIT_BAD_INPUT and result.one("error")["kind"] == "config"
    (tmp_path / "not.json").write_text("{nope")
    result = run_trainer(tmp_path / "not.json")
    assert result.rc == EXIT_BAD_INPUT and result.one("error")["kind"] == "config"
    _no_traceback(result)


def test_parent_gone_stops_at_once(tmp_path: Path, dataset: Path, demo_model: Path) -> None:
    # pid 1 is never this trainer's parent here, so it behaves as if lorabuild had died.
    result = run_trainer(write_config(tmp_path, demo_model, dataset), env={"LORABUILD_PARENT_PID": "1"})
    assert result.rc == EXIT_SIGNAL
    assert result.one("interrupted") == {"event": "interrupted", "step": 0, "checkpoint": None}


def test_out_of_memory_classification() -> None:
    from lorabuild.trainer.events import classify_exception

    assert classify_exception(MemoryError()).kind == "oom"
    assert classify_exception(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")).kind == "oom"
    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")
    assert classify_exception(cpu).kind == "oom"
    assert classify_exception(RuntimeError("shape mismatch")).kind == "internal"
    assert classify_exception(ValueError("out of memory")).kind == "internal"


# A convolution under an address-space cap at exactly the current size: on x86 CPUs oneDNN's
# kernel generation is the first allocation to fail, worded only "could not create a primitive".
_CONV_AT_THE_CAP = textwrap.dedent(
    """
    import json, resource, torch
    from lorabuild.trainer.events import allocations_can_fail, classify_exception
    x, w = torch.randn(4, 64, 96, 96), torch.randn(64, 64, 3, 3)
    torch.ones(64, 64) @ torch.ones(64, 64)
    size = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (size, resource.RLIM_INFINITY))
    try:
        torch.nn.functional.conv2d(x, w, padding=1)
        print(json.dumps({"failed": False}))
    except RuntimeError as exc:
        print(json.dumps({"failed": True, "text": str(exc), "kind": classify_exception(exc).kind,
                          "can_fail": allocations_can_fail()}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc and RLIMIT_AS")
def test_a_convolution_at_a_memory_cap_is_out_of_memory() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _CONV_AT_THE_CAP], capture_output=True, text=True, env=_env(), timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome["failed"], "the cap left room for the convolution"
    assert outcome["can_fail"] and outcome["kind"] == "oom", outcome["text"]


def test_out_of_memory_behind_another_error() -> None:
    from lorabuild.trainer.events import classify_exception

    # diffusers' load_state_dict: the read fails, it peeks at the file as text, and raises its own
    def load_weights() -> None:
        try:
            raise RuntimeError("Error while loading: Cannot allocate memory (os error 12)")
        except RuntimeError:
            try:
                b"\x80".decode()
            except UnicodeDecodeError as peek:
                raise OSError("Unable to load weights from checkpoint file for 'unet'") from peek

    with pytest.raises(OSError) as caught:
        load_weights()
    error = classify_exception(caught.value)
    assert error.kind == "oom"
    assert error.detail.startswith("OSError: Unable to load weights") and "os error 12" in error.detail
    try:
        raise OSError("Unable to load weights") from UnicodeDecodeError("utf-8", b"\x80", 0, 1, "bad")
    except OSError as unrelated:
        assert classify_exception(unrelated).kind == "internal"


def test_onednn_failure_is_out_of_memory_only_where_allocations_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import resource

    from lorabuild.trainer import events

    created = RuntimeError("could not create a primitive")
    executed = RuntimeError("could not execute a primitive")
    unsupported = RuntimeError("could not create a primitive descriptor for a matmul primitive")
    overcommit = tmp_path / "overcommit_memory"
    monkeypatch.setattr(events, "OVERCOMMIT_SETTING", str(overcommit))
    monkeypatch.setattr(events.sys, "platform", "linux")
    unlimited = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
    monkeypatch.setattr(resource, "getrlimit", lambda which: unlimited)

    # Linux's usual heuristic overcommit: memory runs out through the OOM killer, not this error
    overcommit.write_text("0\n")
    assert [events.classify_exception(e).kind for e in (created, executed, unsupported)] == ["internal"] * 3
    # strict overcommit: allocations fail, and oneDNN words it this way
    overcommit.write_text("2\n")
    assert [events.classify_exception(e).kind for e in (created, executed, unsupported)] == ["oom", "oom", "internal"]
    # an address-space limit (ulimit -v), as the test below sets
    overcommit.write_text("0\n")
    monkeypatch.setattr(resource, "getrlimit", lambda which: (2**33, resource.RLIM_INFINITY))
    assert events.classify_exception(created).kind == "oom"
    overcommit.unlink()
    assert events.allocations_can_fail()
    monkeypatch.setattr(resource, "getrlimit", lambda which: unlimited)
    assert not events.allocations_can_fail()
    monkeypatch.setattr(events.sys, "platform", "win32")
    assert events.classify_exception(created).kind == "oom"


# Imports first, then a memory limit just above what they use: the model loads and the
# dataset is encoded, but a 512 px, 16-image step does not fit. oneDNN stays on (unlike
# LORABUILD_MEMORY_HEADROOM_MB's cap), so the failure comes either from torch's allocator or
# as oneDNN's bare "could not create a primitive", depending on which allocation hits the limit.
_OOM_WRAPPER = textwrap.dedent(
    """
    import resource, runpy, sys
    import torch, diffusers, transformers
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    torch.ones(256, 256) @ torch.ones(256, 256)  # start the thread pool before the limit
    size = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize:"))
    limit = size + 700 * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    sys.argv = ["lorabuild.trainer", *sys.argv[1:]]
    runpy.run_module("lorabuild.trainer", run_name="__main__", alter_sys=True)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc and RLIMIT_AS")
def test_out_of_memory_exits_3(tmp_path: Path, dataset: Path, demo_model: Path) -> None:
    config = write_config(tmp_path, demo_model, dataset, resolution=512, batch_size=16)
    result = run_trainer(config, "--no-checkpoints", "--no-resume", prefix=["-c", _OOM_WRAPPER])
    assert result.rc == EXIT_OOM, (result.events, result.stderr[-2000:])
    error = result.one("error")
    assert error["kind"] == "oom" and "batch_size" in error["message"]
    assert result.of("start"), "imports and start-up should have fit under the limit"
    _no_traceback(result)


def test_nan_loss_exits_4(tmp_path: Path, dataset: Path, demo_model: Path) -> None:
    result = run_trainer(write_config(tmp_path, demo_model, dataset, learning_rate=1e30))
    assert result.rc == EXIT_NAN
    error = result.one("error")
    assert error["kind"] == "nan" and "learning_rate" in error["message"]
    assert not (tmp_path / "shapes.safetensors").exists()
    _no_traceback(result)
