"""The kohya backend (lorabuild/backends/kohya.py) against reference/kohya.md and a stand-in sd-scripts.

Config rendering is checked over a matrix of plans against data/kohya_args.json (every key known,
with its type); each cross-field rule has its own test. The stand-in (tests/standins/kohya/) is a
fake sd-scripts checkout and venv whose `accelerate` and training scripts replay sd-scripts' real
console output and write its real file names, so launching, log reading, failure detection,
checkpoints, retention and resume run as real subprocesses through lorabuild's own gates.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from lorabuild.backends import Event, kohya
from lorabuild.gates import GateFailed, RunOptions
from lorabuild.gates import config as config_gate
from lorabuild.gates import dryrun as dryrun_gate
from lorabuild.gates import train as train_gate
from lorabuild.pipeline import build_context
from lorabuild.plan import Plan
from lorabuild.procs import run_streaming
from lorabuild.ui import Console
from tests.conftest import REPO, Project, lorabuild_env

STANDIN = REPO / "tests" / "standins" / "kohya"
KEYS_FILE = REPO / "lorabuild" / "backends" / "data" / "kohya_args.json"
REFERENCE_ARGS = Path("/work/shared/reference/kohya-args.json")
OPTIMIZERS = ("adamw", "adamw8bit", "lion", "prodigy", "adafactor")


# --- helpers ----------------------------------------------------------------------------------


def write_safetensors(path: Path) -> None:
    header = json.dumps({"w": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))


def kohya_spec(project: Project, name: str, backend: dict[str, str], **sections: Any) -> Path:
    """A kohya spec over the shapes dataset: 8 pictures × 4 repeats ÷ batch 2 = 16 steps per epoch."""
    model = project.root / "model.safetensors"
    if not model.exists():
        write_safetensors(model)
    data: dict[str, Any] = {
        "base_model": {"path": "model.safetensors", "family": "sd15"},
        "backend": {"name": "kohya", **backend},
        "dataset": {"path": "data", "repeats": 4},
        "training": {
            "epochs": 4,
            "batch_size": 2,
            "rank": 8,
            "alpha": 4,
            "learning_rate": 1e-4,
            "seed": 7,
            "resolution": 512,
            "mixed_precision": "bf16",
        },
        "checkpoints": {"every_n_epochs": 1, "keep_last": 2},
    }
    for key, value in sections.items():
        data[key] = {**data[key], **value} if isinstance(data.get(key), dict) and key != "base_model" else value
    return project.write_spec(name, **data)


def plan_for(project: Project, name: str = "k", **sections: Any) -> Plan:
    spec = kohya_spec(project, name, {"path": str(project.root / "sd-scripts")}, **sections)
    return build_context(spec, root=project.grimoire).plan


def variant(plan: Plan, family: str | None = None, **training: Any) -> Plan:
    """The same plan with another family or training values (no re-planning)."""
    update: dict[str, Any] = {"training": plan.training.model_copy(update=training)}
    if family is not None:
        update["model"] = plan.model.model_copy(update={"family": family})
    return plan.model_copy(update=update)


def rendered(plan: Plan) -> tuple[dict[str, Any], dict[str, Any]]:
    files = kohya.render_config(plan)
    return tomllib.loads(files[kohya.CONFIG_FILE]), tomllib.loads(files[kohya.DATASET_FILE])


def flat(config: dict[str, Any]) -> dict[str, Any]:
    """sd-scripts' read_config_from_file: each table's keys copied to the top level."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(value)
        else:
            out[key] = value
    return out


def type_ok(value: Any, kind: str) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if kind in ("int", "int_or_float"):  # lorabuild writes absolute step counts, never ratios
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, float)
    if kind in ("str", "Path"):
        return isinstance(value, str)
    if kind == "list[int]":
        return isinstance(value, list) and all(type_ok(v, "int") for v in value)
    if kind == "list[float]":
        return isinstance(value, list) and all(type_ok(v, "float") for v in value)
    if kind == "dict":
        return isinstance(value, dict)
    raise AssertionError(f"unknown type {kind}")


def check_keys(plan: Plan) -> None:
    """Every key lorabuild writes is one sd-scripts has, for this family's script, with its type."""
    keys = kohya.key_list()
    script = keys["scripts"][plan.model.family]
    config, dataset = rendered(plan)
    values = flat(config)
    assert not ({"max_train_epochs", "max_train_steps"} <= values.keys()), "epochs would override steps"
    for key, value in values.items():
        assert key in keys["config"], f"{key} is not an sd-scripts option"
        spec = keys["config"][key]
        assert script in spec["scripts"], f"{script} has no {key}"
        if spec["nargs"] == "*":
            assert isinstance(value, list) and all(type_ok(v, spec["type"]) for v in value), key
        else:
            assert type_ok(value, spec["type"]), f"{key} = {value!r} is not {spec['type']}"
        if spec["choices"] is not None and spec["nargs"] is None:
            assert value in spec["choices"], f"{key} = {value!r} not in {spec['choices']}"
    assert set(dataset) <= {"general", "datasets"}
    sections = [("general", dataset["general"])]
    assert len(dataset["datasets"]) == 1 and len(dataset["datasets"][0]["subsets"]) == 1
    sections.append(("datasets", {k: v for k, v in dataset["datasets"][0].items() if k != "subsets"}))
    sections.append(("subsets", dataset["datasets"][0]["subsets"][0]))
    for section, table in sections:
        for key, value in table.items():
            schema = keys["dataset"].get(key)
            assert schema is not None and section in schema["sections"], f"{section}.{key} is not allowed"
            assert any(type_ok(value, t) for t in schema["types"]), f"{section}.{key} = {value!r}"
    described = {(line.file, line.key) for line in kohya.describe_config(plan)}
    emitted = {(kohya.CONFIG_FILE, k) for k in values}
    emitted |= {(kohya.DATASET_FILE, f"general.{k}") for k in dataset["general"]}
    emitted |= {(kohya.DATASET_FILE, f"datasets.{k}") for k in sections[1][1]}
    emitted |= {(kohya.DATASET_FILE, f"datasets.subsets.{k}") for k in sections[2][1]}
    assert emitted <= described, f"no ConfigLine for {emitted - described}"
    assert all(line.meaning.strip() and "\n" not in line.meaning for line in kohya.describe_config(plan))


@pytest.fixture(scope="module")
def base_plan(tmp_path_factory: pytest.TempPathFactory) -> Plan:
    project = Project(tmp_path_factory.mktemp("kohya-plan"), None)
    return plan_for(project, samples={"prompts": ["mychar waving"], "every_n_epochs": 2})


# --- the key list -----------------------------------------------------------------------------


@pytest.mark.skipif(not REFERENCE_ARGS.is_file(), reason="the shared reference is not on this machine")
def test_key_list_agrees_with_the_reference() -> None:
    keys = kohya.key_list()["config"]
    for entry in json.loads(REFERENCE_ARGS.read_text()):
        mine = keys[entry["dest"]]
        kind = "bool" if entry["action"] == "store_true" else entry["type"] or "str"
        assert (mine["type"], mine["nargs"], mine["choices"]) == (kind, entry["nargs"], entry["choices"])
        assert entry["func"] in mine["defined_by"]
    assert keys["split_mode"]["scripts"] == ["flux_train_network.py"]
    assert keys["cache_text_encoder_outputs"]["scripts"] == ["sdxl_train_network.py", "flux_train_network.py"]
    assert keys["t5xxl"]["scripts"] == ["flux_train_network.py"]


@pytest.mark.parametrize("family", kohya.FAMILIES)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_rendered_key_is_an_sd_scripts_option_with_its_type(base_plan: Plan, family: str, optimizer: str) -> None:
    for mixed, base in (("no", "fp32"), ("fp16", "fp16"), ("bf16", "bf16"), ("bf16", "fp8")):
        for max_steps in (None, 300):
            for train_te in (False, True):
                plan = variant(
                    base_plan,
                    family,
                    optimizer=optimizer,
                    mixed_precision=mixed,
                    base_precision=base,
                    max_train_steps=max_steps,
                    train_text_encoder=train_te,
                    text_encoder_lr=1e-5,
                    noise_offset=0.05,
                    min_snr_gamma=5.0,
                    network_dropout=0.1,
                    lr_scheduler="cosine",
                    lr_warmup_steps=10,
                    optimizer_args={"weight_decay": 0.02},
                )
                check_keys(plan)


def test_variant_files_use_only_known_keys(base_plan: Plan, tmp_path: Path) -> None:
    for family in kohya.FAMILIES:
        plan = variant(base_plan, family)
        run = kohya.launch(plan, tmp_path, tmp_path / "out", max_steps=5, batch_size=1, gradient_accumulation=4)
        keys = kohya.key_list()
        for path, text in run.files.items():
            data = tomllib.loads(text)
            if path.name.endswith(kohya.DATASET_FILE):
                assert data["datasets"][0]["batch_size"] == 1
                continue
            for key in flat(data):
                assert keys["scripts"][family] in keys["config"][key]["scripts"]


# --- rendering and cross-field rules ----------------------------------------------------------


def test_config_shape_for_sdxl(base_plan: Plan) -> None:
    plan = variant(base_plan, "sdxl", resolution=1024)
    config, dataset = rendered(plan)
    values = flat(config)
    assert values["network_module"] == "networks.lora"
    assert values["resolution"] == "1024,1024"
    assert values["learning_rate"] == values["unet_lr"] == 1e-4
    assert values["network_dim"] == 8 and values["network_alpha"] == 4.0
    assert values["max_train_epochs"] == plan.steps.epochs and "max_train_steps" not in values
    assert values["output_dir"] == str(Path(plan.run_dir) / "checkpoints")
    assert values["output_name"] == plan.name and values["save_model_as"] == "safetensors"
    assert values["save_state"] is True and values["console_log_simple"] is True
    assert values["save_every_n_epochs"] == 1 and values["save_last_n_epochs"] == 2
    assert values["dataset_config"] == str(Path(plan.run_dir) / "backend" / kohya.DATASET_FILE)
    assert values["sample_prompts"] == str(Path(plan.run_dir) / "backend" / kohya.PROMPTS_FILE)
    assert dataset["general"]["caption_extension"] == ".txt"
    subset = dataset["datasets"][0]["subsets"][0]
    assert subset == {"image_dir": plan.dataset.path, "num_repeats": 4}
    assert dataset["datasets"][0]["resolution"] == [1024, 1024]
    # sd-scripts documents [[datasets.subsets]] tables, not inline ones
    assert "[[datasets.subsets]]" in kohya.render_config(plan)[kohya.DATASET_FILE]
    prompts = kohya.render_config(plan)[kohya.PROMPTS_FILE]
    assert prompts == "mychar waving --w 1024 --h 1024 --s 20 --d 42\n"


def test_max_train_steps_replaces_epochs(base_plan: Plan) -> None:
    values = flat(rendered(variant(base_plan, max_train_steps=321))[0])
    assert values["max_train_steps"] == 321 and "max_train_epochs" not in values


def test_rule_caching_caption_reader_outputs_means_it_is_not_trained() -> None:
    training = {
        "mixed_precision": "bf16",
        "base_precision": "bf16",
        "cache_text_encoder_outputs": True,
        "train_text_encoder": True,
        "shuffle_caption": False,
        "lr_scheduler": "cosine",
        "lr_warmup_steps": 0,
    }
    changes = kohya.adjust_settings(training, on_cpu=False)
    assert [(s, v) for s, v, _ in changes] == [("cache_text_encoder_outputs", False)]


def test_rule_training_the_caption_reader_renders_its_learning_rate(base_plan: Plan) -> None:
    values = flat(rendered(variant(base_plan, "sdxl", train_text_encoder=True, text_encoder_lr=2e-5))[0])
    assert values["network_train_unet_only"] is False and values["text_encoder_lr"] == [2e-5]
    values = flat(rendered(variant(base_plan, "sdxl", train_text_encoder=False))[0])
    assert values["network_train_unet_only"] is True and "text_encoder_lr" not in values


def test_rule_shuffled_captions_cannot_be_cached() -> None:
    training = {
        "mixed_precision": "bf16",
        "base_precision": "bf16",
        "cache_text_encoder_outputs": True,
        "train_text_encoder": False,
        "shuffle_caption": True,
        "lr_scheduler": "constant",
        "lr_warmup_steps": 0,
    }
    assert [(s, v) for s, v, _ in kohya.adjust_settings(training, on_cpu=False)] == [
        ("cache_text_encoder_outputs", False)
    ]


def test_rule_through_the_plan(tmp_path: Path) -> None:
    plan = plan_for(
        Project(tmp_path, None),
        base_model={"path": "model.safetensors", "family": "sdxl"},
        training={"resolution": 1024, "train_text_encoder": True, "text_encoder_lr": 1e-5},
    )
    assert plan.training.cache_text_encoder_outputs is False
    assert plan.sources["training.cache_text_encoder_outputs"] == "set by the kohya backend"
    assert any("caption reader is being trained" in note for note in plan.adjustments)
    assert not plan.problems


def test_rule_constant_schedule_has_no_warmup(base_plan: Plan) -> None:
    training = {
        "mixed_precision": "bf16",
        "base_precision": "bf16",
        "cache_text_encoder_outputs": False,
        "train_text_encoder": False,
        "shuffle_caption": False,
        "lr_scheduler": "constant",
        "lr_warmup_steps": 50,
    }
    assert ("lr_warmup_steps", 0) in [(s, v) for s, v, _ in kohya.adjust_settings(training, on_cpu=False)]
    # even an unadjusted plan never renders a warm-up with `constant`
    assert flat(rendered(variant(base_plan, lr_scheduler="constant", lr_warmup_steps=50))[0])["lr_warmup_steps"] == 0
    cosine = flat(rendered(variant(base_plan, lr_scheduler="cosine", lr_warmup_steps=50))[0])
    assert cosine["lr_warmup_steps"] == 50 and isinstance(cosine["lr_warmup_steps"], int)


def test_rule_base_precision_follows_mixed_precision() -> None:
    training = {
        "mixed_precision": "fp16",
        "base_precision": "bf16",
        "cache_text_encoder_outputs": False,
        "train_text_encoder": False,
        "shuffle_caption": False,
        "lr_scheduler": "constant",
        "lr_warmup_steps": 0,
    }
    assert [(s, v) for s, v, _ in kohya.adjust_settings(training, on_cpu=True)] == [("base_precision", "fp16")]
    assert kohya.adjust_settings({**training, "base_precision": "fp8"}, on_cpu=False) == []


def test_rule_fp16_sdxl_keeps_the_vae_in_full_precision(base_plan: Plan) -> None:
    for family in ("sdxl", "pony"):
        assert flat(rendered(variant(base_plan, family, mixed_precision="fp16"))[0])["no_half_vae"] is True
        assert flat(rendered(variant(base_plan, family, mixed_precision="bf16"))[0])["no_half_vae"] is False
    assert "no_half_vae" not in flat(rendered(variant(base_plan, "sd15", mixed_precision="fp16"))[0])


def test_rule_fp8_base_needs_mixed_precision(base_plan: Plan) -> None:
    bad = variant(base_plan, base_precision="fp8", mixed_precision="no")
    assert [i.field for i in kohya.check_plan(bad)] == [("training", "mixed_precision")]
    good = variant(base_plan, base_precision="fp8", mixed_precision="bf16")
    assert kohya.check_plan(good) == [] and flat(rendered(good)[0])["fp8_base"] is True


def test_rule_full_precision_flags_are_never_written(base_plan: Plan) -> None:
    # full_fp16/full_bf16 demand a matching mixed precision; lorabuild never asks for them
    for mixed in ("no", "fp16", "bf16"):
        values = flat(rendered(variant(base_plan, "sdxl", mixed_precision=mixed))[0])
        assert "full_fp16" not in values and "full_bf16" not in values and values["mixed_precision"] == mixed


def test_rule_prodigy_gets_one_learning_rate_and_its_arguments(base_plan: Plan) -> None:
    plan = variant(
        base_plan,
        optimizer="prodigy",
        learning_rate=1.0,
        train_text_encoder=True,
        text_encoder_lr=1e-5,
        optimizer_args={"d_coef": 2, "use_bias_correction": False},
    )
    values = flat(rendered(plan)[0])
    assert values["optimizer_type"] == "Prodigy"
    assert values["learning_rate"] == values["unet_lr"] == 1.0 and values["text_encoder_lr"] == [1.0]
    assert values["optimizer_args"] == [
        "decouple=True",
        "weight_decay=0.01",
        "d_coef=2",
        "use_bias_correction=False",
        "safeguard_warmup=True",
        "betas=0.9,0.99",
    ]


def test_rule_adafactor_keeps_a_fixed_learning_rate(base_plan: Plan) -> None:
    values = flat(rendered(variant(base_plan, optimizer="adafactor"))[0])
    assert values["optimizer_args"] == ["scale_parameter=False", "relative_step=False", "warmup_init=False"]


def test_rule_optimizer_arguments_are_python_literals(base_plan: Plan) -> None:
    args = {"flag": True, "name": "cosine", "pair": "0.9,0.99", "lower": "false", "n": 3, "x": 0.5}
    values = flat(rendered(variant(base_plan, optimizer_args=args))[0])
    assert values["optimizer_args"] == ["flag=True", "name='cosine'", "pair=0.9,0.99", "lower=False", "n=3", "x=0.5"]
    bad = variant(base_plan, optimizer_args={"expr": "a=b"})
    assert [i.field for i in kohya.check_plan(bad)] == [("training", "optimizer_args", "expr")]


def test_rule_bucket_steps_and_range_by_family(base_plan: Plan) -> None:
    for family, resolution, step in (("sd15", 512, 64), ("sd15", 576, 64), ("sdxl", 1024, 32), ("flux", 768, 32)):
        plan = variant(base_plan, family, resolution=resolution)
        dataset = rendered(plan)[1]["datasets"][0]
        assert dataset["bucket_reso_steps"] == step
        low, high = dataset["min_bucket_reso"], dataset["max_bucket_reso"]
        assert low <= resolution <= high and low % step == 0 and high % step == 0
    off = rendered(variant(base_plan, bucketing=False))[1]["datasets"][0]
    assert off["enable_bucket"] is False


def test_rule_text_encoder_training_needs_a_learning_rate(base_plan: Plan) -> None:
    plan = variant(base_plan, train_text_encoder=True, text_encoder_lr=0.0)
    assert [i.field for i in kohya.check_plan(plan)] == [("training", "text_encoder_lr")]


def test_models_kohya_cannot_load(base_plan: Plan) -> None:
    demo = base_plan.model_copy(update={"model": base_plan.model.model_copy(update={"kind": "demo"})})
    assert [i.field for i in kohya.check_plan(demo)] == [("base_model", "demo")]
    folder = base_plan.model_copy(update={"model": base_plan.model.model_copy(update={"kind": "folder"})})
    assert [i.field for i in kohya.check_plan(folder)] == [("base_model", "path")]
    flux = base_plan.model_copy(
        update={"model": base_plan.model.model_copy(update={"kind": "diffusers", "family": "flux"})}
    )
    assert [i.field for i in kohya.check_plan(flux)] == [("base_model", "path")]
    gguf = base_plan.model_copy(update={"model": base_plan.model.model_copy(update={"path": "/m/flux.gguf"})})
    assert "gguf" in kohya.check_plan(gguf)[0].message
    assert [i.field for i in kohya.check_plan(variant(base_plan, base_precision="nf4"))] == [
        ("training", "base_precision")
    ]


def test_unsupported_family_names_the_backends_that_train_it(base_plan: Plan) -> None:
    other = base_plan.model_copy(update={"model": base_plan.model.model_copy(update={"family": "sd3"})})
    issue = kohya.check_plan(other)[0]
    assert issue.field == ("base_model", "family") and "cannot train sd3" in issue.message


def test_settings_follow_what_each_script_honours(base_plan: Plan) -> None:
    sd15 = kohya.settings(variant(base_plan, "sd15"))
    sdxl = kohya.settings(variant(base_plan, "sdxl"))
    flux = kohya.settings(variant(base_plan, "flux"))
    assert "clip_skip" in sd15 and "cache_text_encoder_outputs" not in sd15
    assert "clip_skip" not in sdxl and "cache_text_encoder_outputs" in sdxl  # SDXL ignores clip_skip
    assert "noise_offset" not in flux and "min_snr_gamma" not in flux
    assert "clip_skip" in flat(rendered(variant(base_plan, "sd15"))[0])


def test_spec_setting_an_ignored_value_is_reported(tmp_path: Path) -> None:
    plan = plan_for(
        Project(tmp_path, None),
        base_model={"path": "model.safetensors", "family": "sdxl"},
        training={"resolution": 1024, "clip_skip": 2},
    )
    assert [(i.kind, i.field) for i in plan.problems] == [("backend", ("training", "clip_skip"))]


def test_flux_gets_its_separate_files(base_plan: Plan) -> None:
    values = flat(rendered(variant(base_plan, "flux", base_precision="fp8"))[0])
    model = Path(base_plan.model.path)
    assert values["network_module"] == "networks.lora_flux"
    assert values["clip_l"] == str(model.parent / "clip_l.safetensors")
    assert values["t5xxl"] == str(model.parent / "t5xxl_fp16.safetensors")
    assert values["ae"] == str(model.parent / "ae.safetensors")
    assert values["fp8_base"] is True and "sdpa" not in values
    with_vae = base_plan.model_copy(
        update={"model": base_plan.model.model_copy(update={"family": "flux", "vae": "/m/my-ae.safetensors"})}
    )
    assert flat(rendered(with_vae)[0])["ae"] == "/m/my-ae.safetensors"


def test_describe_uses_the_glossary_for_concepts(base_plan: Plan) -> None:
    from lorabuild.glossary import explain

    lines = {line.key: line for line in kohya.describe_config(base_plan)}
    assert lines["network_dim"].meaning == explain("rank")
    assert lines["learning_rate"].value == "0.0001"
    assert lines["datasets.subsets.num_repeats"].meaning == explain("repeats")
    sdxl = {line.key: line for line in kohya.describe_config(variant(base_plan, "sdxl", mixed_precision="fp16"))}
    assert sdxl["no_half_vae"].value == "true" and "NaN" in sdxl["no_half_vae"].meaning
    assert sdxl["optimizer_type"].meaning == explain("optimizer")


# --- launching --------------------------------------------------------------------------------


def test_launch_is_accelerate_from_the_backend_venv(base_plan: Plan) -> None:
    plan = base_plan.model_copy(
        update={
            "backend": base_plan.backend.model_copy(update={"python": "/opt/sd/venv/bin/python", "path": "/opt/sd"}),
            "model": base_plan.model.model_copy(update={"family": "sdxl"}),
        }
    )
    run = Path(plan.run_dir)
    launch = kohya.launch(plan, run / "backend", run / "checkpoints")
    assert launch.argv == [
        "/opt/sd/venv/bin/accelerate",
        "launch",
        "--num_cpu_threads_per_process",
        "1",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "bf16",
        "--dynamo_backend",
        "no",
        "/opt/sd/sdxl_train_network.py",
        "--config_file",
        str(run / "backend" / "config.toml"),
    ]
    assert launch.cwd == Path("/opt/sd") and launch.files == {}
    assert launch.env["PYTHONUNBUFFERED"] == "1" and launch.env["PYTHONIOENCODING"] == "utf-8"


def test_launch_on_several_gpus_and_without_a_venv(base_plan: Plan, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = base_plan.model_copy(
        update={
            "compute": base_plan.compute.model_copy(update={"gpu_count": 2}),
            "backend": base_plan.backend.model_copy(update={"python": "python3-for-kohya"}),
        }
    )
    monkeypatch.setenv("PATH", "/nonexistent")
    argv = kohya.launch(plan, Path("/c"), Path("/o")).argv
    assert argv[:3] == ["python3-for-kohya", "-m", "accelerate.commands.launch"]
    assert argv[argv.index("--num_processes") + 1] == "2" and "--multi_gpu" in argv


def test_dry_run_variant(base_plan: Plan, tmp_path: Path) -> None:
    launch = kohya.launch(base_plan, tmp_path / "backend", tmp_path / "scratch", max_steps=5, resume=False)
    config_file = tmp_path / "backend" / "dryrun-config.toml"
    assert launch.argv[-2:] == ["--config_file", str(config_file)] and "--resume" not in launch.argv
    values = flat(tomllib.loads(launch.files[config_file]))
    assert values["max_train_steps"] == 5 and "max_train_epochs" not in values
    assert not {"save_every_n_epochs", "save_last_n_epochs", "save_state", "sample_prompts"} & values.keys()
    assert values["output_dir"] == str(tmp_path / "scratch")
    assert values["dataset_config"] == str(tmp_path / "backend" / "dataset.toml")


def test_out_of_memory_retry_variant(base_plan: Plan, tmp_path: Path) -> None:
    launch = kohya.launch(base_plan, tmp_path, tmp_path / "out", batch_size=1, gradient_accumulation=2)
    config = flat(tomllib.loads(launch.files[tmp_path / "train-config.toml"]))
    assert config["gradient_accumulation_steps"] == 2
    assert config["dataset_config"] == str(tmp_path / "train-dataset.toml")
    assert config["max_train_epochs"] == base_plan.steps.epochs and config["save_state"] is True
    dataset = tomllib.loads(launch.files[tmp_path / "train-dataset.toml"])
    assert dataset["datasets"][0]["batch_size"] == 1


def make_state(folder: Path, epoch: int, complete: bool = True) -> None:
    folder.mkdir(parents=True)
    (folder / "train_state.json").write_text(json.dumps({"current_epoch": epoch, "current_step": 3}))
    if complete:
        (folder / "random_states_0.pkl").write_bytes(b"x")


def test_resume_points_at_the_newest_complete_state(base_plan: Plan, tmp_path: Path) -> None:
    out = tmp_path / "out"
    make_state(out / f"{base_plan.name}-000001-state", 1)
    make_state(out / f"{base_plan.name}-000002-state", 2)
    make_state(out / f"{base_plan.name}-000003-state", 3, complete=False)  # killed while saving
    make_state(out / f"{base_plan.name}-state", 4)  # the final state: nothing to resume
    argv = kohya.launch(base_plan, tmp_path, out).argv
    assert argv[-4:] == ["--resume", str(out / f"{base_plan.name}-000002-state"), "--initial_epoch", "3"]
    assert "--resume" not in kohya.launch(base_plan, tmp_path, out, resume=False).argv
    assert "--resume" not in kohya.launch(base_plan, tmp_path, out, max_steps=5).argv


# --- reading the output -----------------------------------------------------------------------

HEADER = [
    "running training / 学習開始",
    "num train images * repeats / 学習画像の数×繰り返し回数: 400",
    "num validation images * repeats / 学習画像の数×繰り返し回数: 0",
    "num reg images / 正則化画像の数: 0",
    "num batches per epoch / 1epochのバッチ数: 200",
    "num epochs / epoch数: 10",
    "batch size per device / バッチサイズ: 2",
    "gradient accumulation steps / 勾配を合計するステップ数 = 1",
    "total optimization steps / 学習ステップ数: 2000",
]


def read(lines: list[str]) -> list[Event]:
    kohya.reset_log_reader()
    return [event for line in lines for event in kohya.parse_log_line(line)]


def test_reference_progress_lines() -> None:
    events = read(
        [
            "found directory /data/img contains 40 image files",
            "import network module: networks.lora",
            *HEADER,
            "steps:   0%|          | 0/2000 [00:00<?, ?it/s]",
            "epoch 1/10",
            "steps:  25%|██▌       | 500/2000 [08:20<25:00,  1.00it/s, avr_loss=0.103]",
            "steps:  26%|██▌       | 1985/7650 [33:07<1:34:33,  1.00s/it, avr_loss=0.0928]",
        ]
    )
    kinds = [e.kind for e in events]
    assert kinds == ["model_loaded", "dataset", "step", "step"]
    assert events[1].data == {
        "total_steps": 2000,
        "epochs": 10,
        "images": 40,
        "samples_per_epoch": 400,
        "steps_per_epoch": 200,
    }
    assert events[2].data == {
        "step": 500,
        "total_steps": 2000,
        "loss": 0.103,
        "epoch": 1,
        "epochs": 10,
        "step_seconds": 1.0,
    }
    assert events[3].data["step_seconds"] == 1.0 and events[3].data["loss"] == 0.0928


def test_epoch_lines_glued_to_the_bar_and_epoch_ends() -> None:
    events = read(
        [
            *HEADER,
            "steps:   0%|   | 0/850 [00:00<?, ?it/s]epoch 1/10",
            "steps:  10%|█  | 200/2000 [01:00<09:00,  3.30it/s, avr_loss=0.12]",
            "epoch 2/10",
            "model saved.",
        ]
    )
    shown = [(e.kind, e.data.get("epoch")) for e in events]
    assert shown == [("dataset", None), ("step", 1), ("epoch", 1), ("epoch", 2), ("done", None)]
    assert events[2].data["mean_loss"] == 0.12


def test_validation_bars_are_not_training_steps() -> None:
    events = read(
        [
            *HEADER,
            "epoch 1/10",
            "validation steps:  50%|█████     | 4/8 [00:01<00:01,  3.00it/s, val_avg_loss=0.2, timestep=400]",
            "epoch validation steps: 100%|██████████| 8/8 [00:02<00:00,  3.00it/s, val_epoch_avg_loss=0.2]",
        ]
    )
    assert [e.kind for e in events] == ["dataset"]


def test_nan_loss_is_an_error_once() -> None:
    events = read(
        [
            *HEADER,
            "epoch 1/10",
            "steps:   1%|          | 12/2000 [00:15<41:12,  1.24s/it, avr_loss=nan]",
            "steps:   1%|          | 13/2000 [00:16<41:12,  1.24s/it, avr_loss=nan]",
        ]
    )
    errors = [e for e in events if e.kind == "error"]
    assert len(errors) == 1 and errors[0].data["kind"] == "nan" and "step 12" in errors[0].data["message"]
    assert math.isnan(events[1].data["loss"]) and events[1].data["step_seconds"] == 1.24


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        (
            "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of "
            "8.00 GiB of which 0 bytes is free.",
            "oom",
        ),
        (
            "No data found. Please verify arguments (train_data_dir must be the parent of folders with images)",
            "dataset",
        ),
        ("illegal char in file (not UTF-8) / ファイルにUTF-8以外の文字があります: /d/a.txt", "caption"),
        ("model is not found as a file or in Hugging Face, perhaps file name is wrong? / …: /m/x", "model_load"),
        ("safetensors_rust.SafetensorError: Error while deserializing header: HeaderTooLarge", "model_load"),
        ("RuntimeError: NaN detected in latents: /d/a.png", "nan"),
        ("ERROR Invalid user config / ユーザ設定の形式が正しくないようです", "config"),
        ("train_network.py: error: unrecognized arguments: --bogus", "config"),
        ("ImportError: No bitsandbytes / bitsandbytesがインストールされていないようです", "not_installed"),
        ("RuntimeError: CUDA error: no kernel image is available for execution on the device", "cuda"),
        ("ValueError: SchedulerType.CONSTANT does not require `num_warmup_steps`. Set None or 0.", "config"),
        ("ValueError: file not found / ファイルが見つかりません: /run/backend/dataset.toml", "config"),
    ],
)
def test_exact_failure_messages(line: str, kind: str) -> None:
    errors = [e.data for e in read([line]) if e.kind == "error"]
    assert errors and errors[0]["kind"] == kind


def test_tracebacks_and_accelerate_exit() -> None:
    events = read(
        [
            "Traceback (most recent call last):",
            'File "/sd/train_network.py", line 1412, in train',
            "loss = self.process_batch(batch)",
            "KeyError: 'lora_unet_mid'",
            "subprocess.CalledProcessError: Command '['/v/python', 'x.py']' returned non-zero exit status 1.",
            "AssertionError: not in a traceback, so only a line",
        ]
    )
    assert [(e.kind, e.data["kind"]) for e in events] == [("error", "internal"), ("error", "internal")]
    assert events[0].data["message"] == "KeyError: 'lora_unet_mid'"
    assert "exit status 1" in events[1].data["message"]
    assert kohya.is_out_of_memory("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert not kohya.is_out_of_memory("all good")


def test_save_remove_warning_and_resume_lines() -> None:
    events = read(
        [
            "resume training from local state: /o/k-000002-state",
            "load train state from /o/k-000002-state/train_state.json: {'current_epoch': 2, 'current_step': 400}",
            *HEADER,
            "epoch 3/10",
            "steps:   0%|          | 1/2000 [00:01<1:00:00,  1.00it/s, avr_loss=0.1]",
            "saving checkpoint: /o/k-000003.safetensors",
            "removing old checkpoint: /o/k-000001.safetensors",
            "No caption file found for 3 images. Training will continue without captions for these images.",
            "saving checkpoint: /o/k.safetensors",
        ]
    )
    events = [e for e in events if e.kind != "dataset"]
    assert [e.kind for e in events] == ["resumed", "step", "checkpoint", "checkpoint_removed", "warning", "saved"]
    assert events[0].data == {"step": 400, "epoch": 2}
    assert events[1].data["step"] == 401 and events[1].data["epoch"] == 3
    assert events[2].data == {"path": "/o/k-000003.safetensors", "epoch": 3, "step": 600}


# --- the stand-in sd-scripts ------------------------------------------------------------------


def make_standin(root: Path) -> tuple[Path, Path]:
    """A fake sd-scripts checkout (the three scripts, library/, .git at tag v0.10.1) and its venv."""
    checkout = root / "sd-scripts"
    (checkout / "library").mkdir(parents=True)
    (checkout / "library" / "train_util.py").write_text("")
    for script in set(kohya.SCRIPTS.values()):
        shutil.copy(STANDIN / "train_network.py", checkout / script)
    git = checkout / ".git"
    (git / "refs" / "heads").mkdir(parents=True)
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    (git / "refs" / "heads" / "main").write_text("48d368fa" + "0" * 32 + "\n")
    (git / "packed-refs").write_text(
        "# pack-refs with: peeled fully-peeled sorted\n"
        "1111111111111111111111111111111111111111 refs/tags/v0.10.1\n"
        "^48d368fa00000000000000000000000000000000\n"
    )
    bin_dir = checkout / "venv" / "bin"  # where lorabuild looks for sd-scripts' venv
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").symlink_to(sys.executable)
    accelerate = bin_dir / "accelerate"
    accelerate.write_text(f"#!{sys.executable}\n" + (STANDIN / "accelerate.py").read_text())
    accelerate.chmod(accelerate.stat().st_mode | stat.S_IXUSR)
    return checkout, bin_dir / "python"


@pytest.fixture
def standin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Project, Path, Path]]:
    project = Project(tmp_path, None)
    checkout, python = make_standin(tmp_path)
    monkeypatch.setenv("KOHYA_STANDIN_KEYS", str(KEYS_FILE))
    monkeypatch.delenv("KOHYA_STANDIN_SCENARIO", raising=False)
    yield project, checkout, python


def standin_spec(project: Project, checkout: Path, python: Path, name: str = "k", **sections: Any) -> Path:
    return kohya_spec(project, name, {"path": str(checkout), "python": str(python)}, **sections)


def run_standin(plan: Plan, output: Path, scenario: str, **options: Any) -> tuple[int, list[Event], list[str]]:
    """Render, launch into `output` and read every line: (exit code, events, lines)."""
    assert plan.backend.path is not None
    (Path(plan.backend.path) / "scenario").write_text(scenario)
    backend_dir = Path(plan.run_dir) / "backend"
    backend_dir.mkdir(parents=True, exist_ok=True)
    for name, text in kohya.render_config(plan).items():
        (backend_dir / name).write_text(text)
    launch = kohya.launch(plan, backend_dir, output, **options)
    lines: list[str] = []
    with open(output.parent / f"{output.name}.log", "a", encoding="utf-8") as log:
        finished = run_streaming(launch, log=log, on_line=lines.append, pid_file=output.parent / "backend.pid")
    kohya.reset_log_reader()
    events = [event for line in lines for event in kohya.parse_log_line(line)]
    return finished.returncode, events, lines


def gate_rule(rc: int, events: list[Event], final: Path) -> bool:
    """Gate 10's success rule: exit code 0, no error event, and the final LoRA on disk."""
    return rc == 0 and not [e for e in events if e.kind == "error"] and final.is_file()


def test_standin_normal_run(standin: tuple[Project, Path, Path]) -> None:
    project, checkout, python = standin
    plan = build_context(standin_spec(project, checkout, python), root=project.grimoire).plan
    assert not plan.problems
    out = project.root / "out"
    rc, events, lines = run_standin(plan, out, "normal")
    assert rc == 0, "\n".join(lines[-20:])
    kinds = [e.kind for e in events]
    assert kinds[:2] == ["model_loaded", "dataset"] and kinds[-2:] == ["epoch", "done"]
    steps = [e.data for e in events if e.kind == "step"]
    assert steps[-1]["step"] == plan.steps.total_steps == 64 and steps[-1]["epoch"] == 4
    assert all(math.isfinite(s["loss"]) for s in steps)
    assert [e.data["epoch"] for e in events if e.kind == "checkpoint"] == [1, 2, 3]
    assert [Path(e.data["path"]).name for e in events if e.kind == "checkpoint_removed"] == ["k-000001.safetensors"]
    assert [e.data["epoch"] for e in events if e.kind == "epoch"] == [1, 2, 3, 4]
    final = kohya.final_lora(plan, out)
    assert gate_rule(rc, events, final) and kohya.complete_safetensors(final)
    assert [(c.epoch, c.step, c.lora.name if c.lora else None) for c in kohya.checkpoints(plan, out)] == [
        (2, 32, "k-000002.safetensors"),
        (3, 48, "k-000003.safetensors"),
    ]
    pruned = kohya.prune_checkpoints(
        plan.model_copy(update={"checkpoints": plan.checkpoints.model_copy(update={"keep_last": 1})}), out
    )
    assert sorted(p.name for p in pruned) == ["k-000002-state", "k-000002.safetensors", "k-state"]
    assert [c.epoch for c in kohya.checkpoints(plan, out)] == [3]
    assert (out / "k-000003-state").is_dir() and final.is_file()


@pytest.mark.parametrize(
    ("scenario", "kind", "rc", "final"),
    [
        ("oom", "oom", 1, False),
        ("nan", "nan", 0, True),
        ("nodata", "dataset", 0, False),
        ("crash", "internal", 1, False),
        ("exit0", None, 0, False),
    ],
)
def test_standin_failures(
    standin: tuple[Project, Path, Path], scenario: str, kind: str | None, rc: int, final: bool
) -> None:
    project, checkout, python = standin
    plan = build_context(standin_spec(project, checkout, python), root=project.grimoire).plan
    out = project.root / "out"
    code, events, lines = run_standin(plan, out, scenario)
    errors = [e.data for e in events if e.kind == "error"]
    assert code == rc, "\n".join(lines[-10:])
    assert (errors[0]["kind"] if errors else None) == kind
    assert kohya.final_lora(plan, out).is_file() == final
    assert not gate_rule(code, events, kohya.final_lora(plan, out))  # every one of them is a failure
    if scenario == "oom":
        assert kohya.is_out_of_memory("\n".join(lines))


def test_standin_rejects_nothing_lorabuild_writes_for_any_family(standin: tuple[Project, Path, Path]) -> None:
    project, checkout, python = standin
    base = build_context(standin_spec(project, checkout, python), root=project.grimoire).plan
    for family in ("sdxl", "flux"):
        plan = variant(base, family, resolution=1024, max_train_steps=20)
        rc, events, lines = run_standin(plan, project.root / f"out-{family}", "normal")
        assert rc == 0 and not [e for e in events if e.kind == "error"], "\n".join(lines[-10:])
        assert f"import network module: networks.lora{'_flux' if family == 'flux' else ''}" in lines


def test_standin_resume_after_a_kill(standin: tuple[Project, Path, Path]) -> None:
    project, checkout, python = standin
    plan = build_context(standin_spec(project, checkout, python), root=project.grimoire).plan
    out = project.root / "out"
    rc, events, _ = run_standin(plan, out, "die_after:2")
    assert rc == 1 and "internal" in [e.data["kind"] for e in events if e.kind == "error"]
    assert [c.epoch for c in kohya.checkpoints(plan, out)] == [1, 2]
    assert kohya.resume_state(plan, out) == (out / "k-000002-state", 2)
    rc, events, lines = run_standin(plan, out, "normal")
    assert rc == 0
    invocation = json.loads((checkout / "invocations.jsonl").read_text().splitlines()[-1])
    assert invocation["argv"][-4:] == ["--resume", str(out / "k-000002-state"), "--initial_epoch", "3"]
    assert f"resume training from local state: {out / 'k-000002-state'}" in lines
    resumed = [e.data for e in events if e.kind == "resumed"]
    assert resumed == [{"step": 32, "epoch": 2}]
    steps = [e.data["step"] for e in events if e.kind == "step"]
    assert steps[0] == 33 and steps[-1] == 64
    assert [c.epoch for c in kohya.checkpoints(plan, out)] == [2, 3] and kohya.final_lora(plan, out).is_file()


# --- through lorabuild's gates ----------------------------------------------------------------


def test_gates_dry_run_and_training_with_the_standin(standin: tuple[Project, Path, Path]) -> None:
    project, checkout, python = standin
    spec = standin_spec(project, checkout, python)
    (checkout / "scenario").write_text("oom_above:1")  # the dry run runs out of memory at batch 2
    ctx = build_context(spec, root=project.grimoire, options=RunOptions(yes=True), console=Console())
    config_gate.run(ctx)
    assert sorted(p.name for p in ctx.run.backend_dir.iterdir()) == ["config.toml", "dataset.toml"]
    dryrun_gate.run(ctx)
    record = json.loads(ctx.run.dryrun_ok.read_text())
    assert record["passed"] and record["steps"] >= 2 and record["batch_size"] == 1
    assert (ctx.run.backend_dir / "dryrun-dataset.toml").is_file()

    (checkout / "scenario").write_text("die_after:2")
    ctx = build_context(spec, root=project.grimoire, options=RunOptions(yes=True), console=Console())
    with pytest.raises(GateFailed) as failed:
        train_gate.run(ctx)
    assert "Training failed" in failed.value.message
    assert [c.epoch for c in kohya.checkpoints(ctx.plan, ctx.run.checkpoints)] == [1, 2]

    (checkout / "scenario").write_text("normal")
    ctx = build_context(spec, root=project.grimoire, options=RunOptions(yes=True), console=Console())
    train_gate.run(ctx)
    assert ctx.run.lora.is_file() and kohya.complete_safetensors(ctx.run.lora)
    progress = json.loads(ctx.run.progress_json.read_text())
    assert progress["status"] == "COMPLETE" and progress["step"] == 64 and progress["resumed_from_step"] == 32
    assert "--resume" in json.loads((checkout / "invocations.jsonl").read_text().splitlines()[-1])["argv"]
    left = sorted(p.name for p in ctx.run.checkpoints.iterdir() if not p.name.startswith("."))
    assert left == ["k-000002-state", "k-000002.safetensors", "k-000003-state", "k-000003.safetensors"]
    assert "train.toml" not in os.listdir(ctx.run.backend_dir)  # the rendered config was used as it is


def test_train_gate_fails_on_nan_even_with_exit_0(standin: tuple[Project, Path, Path]) -> None:
    project, checkout, python = standin
    spec = standin_spec(project, checkout, python)
    (checkout / "scenario").write_text("nan")
    ctx = build_context(spec, root=project.grimoire, options=RunOptions(yes=True), console=Console())
    config_gate.run(ctx)
    with pytest.raises(GateFailed) as failed:
        train_gate.run(ctx)
    assert "NaN" in failed.value.message and not ctx.run.lora.exists()


def test_installation_and_probe(standin: tuple[Project, Path, Path], tmp_path: Path) -> None:
    project, checkout, python = standin
    plan = build_context(standin_spec(project, checkout, python), root=project.grimoire).plan
    found = kohya.installation(plan)
    assert found.ok and found.version == "v0.10.1" and found.entry_point == str(checkout / "train_network.py")
    assert found.message == f"kohya-ss sd-scripts v0.10.1 at {checkout}"
    argv = kohya.probe_command(plan)
    assert argv[:2] == [str(python), "-c"] and {"accelerate", "toml", "voluptuous"} <= set(argv[3:])

    def at(path: str | None, python_path: str = str(python)) -> Any:
        backend = plan.backend.model_copy(update={"path": path, "python": python_path})
        return kohya.installation(plan.model_copy(update={"backend": backend}))

    assert not at(None).ok and "git clone https://github.com/kohya-ss/sd-scripts" in at(None).fix
    assert "does not exist" in at(str(tmp_path / "nowhere")).message
    gui = tmp_path / "kohya_ss"
    shutil.copytree(checkout, gui / "sd-scripts")
    assert at(str(gui)).fix == f"set `backend.path` to {gui / 'sd-scripts'}"
    bare = tmp_path / "bare-venv" / "bin"
    bare.mkdir(parents=True)
    (bare / "python").write_text("")
    assert "accelerate is not installed" in at(str(checkout), str(bare / "python")).message
    # a spec's venv python resolved through its symlink still runs sd-scripts' venv
    resolved = plan.backend.model_copy(update={"python": str(python.resolve())})
    assert kohya.backend_python(plan.model_copy(update={"backend": resolved})) == str(python)
    assert at(str(checkout), str(python.resolve())).ok
    (checkout / ".git" / "packed-refs").unlink()
    assert kohya.git_version(checkout) == "main 48d368fa"


def test_full_lorabuild_run_with_the_standin(standin: tuple[Project, Path, Path]) -> None:
    """`lorabuild run` end to end: Gate 2 renders the config; on a machine without an NVIDIA GPU,
    Gate 3 stops the kohya backend (it needs one), so the gates after it are driven directly above."""
    project, checkout, python = standin
    spec = standin_spec(project, checkout, python)
    done = project.lorabuild("run", str(spec), "--yes", timeout=240)
    run = project.run_dir("k")
    assert (run / "backend" / "config.toml").is_file() and (run / "config.md").is_file()
    if done.returncode != 0:
        assert "Gate 3" in done.stdout + done.stderr
        assert json.loads((run / "environment.json").read_text())["backend"]["version"] == "v0.10.1"
    else:  # a machine whose GPU and backend Python pass Gate 3: the stand-in trains
        assert (run / "k.safetensors").is_file()


# --- the example spec -------------------------------------------------------------------------


def test_example_spec_validates_and_renders(tmp_path: Path) -> None:
    spec = REPO / "specs" / "mychar.yaml"
    assert spec.read_text().startswith("# yaml-language-server: $schema=../schemas/training.schema.json\n")
    data = yaml.safe_load(spec.read_text())
    assert data["backend"]["name"] == "kohya" and data["base_model"]["family"] == "sdxl"
    env = lorabuild_env()
    valid = subprocess.run(
        [sys.executable, "-m", "lorabuild", "validate", str(spec)], env=env, capture_output=True, text=True
    )
    assert valid.returncode == 0, valid.stdout + valid.stderr
    # Gate 2 plans without the model file (it usually lives on the training machine)
    done = subprocess.run(
        [sys.executable, "-m", "lorabuild", "run", str(spec), "--until", "config", "--root", str(tmp_path / "g")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    backend = tmp_path / "g" / "training" / "mychar" / "backend"
    values = flat(tomllib.loads((backend / "config.toml").read_text()))
    assert values["optimizer_type"] == "AdamW8bit" and values["network_train_unet_only"] is True
    plan = json.loads((tmp_path / "g" / "training" / "mychar" / "plan.json").read_text())
    assert 50 <= plan["steps"]["total_steps"] <= 20000


def test_rendered_files_read_the_same_with_sd_scripts_toml_parser(base_plan: Plan) -> None:
    """sd-scripts reads its TOML files with the old `toml==0.10.2` package (reference §2)."""
    toml = pytest.importorskip("toml")
    for family in kohya.FAMILIES:
        plan = variant(base_plan, family, optimizer="prodigy", train_text_encoder=True, text_encoder_lr=1e-5)
        for name, text in kohya.render_config(plan).items():
            if name.endswith(".toml"):
                assert toml.loads(text) == tomllib.loads(text), name


def test_sample_pictures_are_collected_into_the_run_folder(standin: tuple[Project, Path, Path]) -> None:
    project, checkout, python = standin
    samples = {"prompts": ["k, portrait", "k, full body"], "every_n_epochs": 2}
    spec = standin_spec(project, checkout, python, samples=samples)
    (checkout / "scenario").write_text("normal")
    ctx = build_context(spec, root=project.grimoire, options=RunOptions(yes=True), console=Console())
    config_gate.run(ctx)
    train_gate.run(ctx)
    epochs = ctx.plan.training.epochs
    # kohya's own names ({name}_e{epoch:06d}_{idx:02d}_{time}.png) become epoch-NNNN-K.png
    expected = sorted(f"epoch-{e:04d}-{k}.png" for e in range(2, epochs + 1, 2) for k in (1, 2))
    assert expected and sorted(p.name for p in ctx.run.samples.iterdir()) == expected
    assert sorted(p.name for p in (ctx.run.checkpoints / "sample").iterdir())[0].startswith("k_e000002_00_")
