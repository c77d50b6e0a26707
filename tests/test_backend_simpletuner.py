"""The SimpleTuner backend: its config files, rules, command, log reading, checkpoints and resume.

SimpleTuner itself is not installed here, so the runs use a stand-in (tests/standins/simpletuner):
a fake checkout whose simpletuner/train.py replays SimpleTuner's real output and writes its real
files, and a fake venv whose `python` is this interpreter and whose `accelerate` parses
`launch` as accelerate does. The stand-in rejects unknown keys and wrong types as SimpleTuner's
argparse does, so every run also checks the rendered config.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest

from lorabuild import backends
from lorabuild.backends import Event
from lorabuild.backends import simpletuner as st
from lorabuild.gates import GateFailed, RunOptions
from lorabuild.gates import config as config_gate
from lorabuild.gates import dryrun as dryrun_gate
from lorabuild.gates import environment as environment_gate
from lorabuild.gates import train as train_gate
from lorabuild.glossary import TERMS, explain
from lorabuild.pipeline import build_context
from lorabuild.plan import Plan
from lorabuild.studio import Gpu, GpuReport, Machine
from tests.conftest import EXAMPLE_DATA, REPO, Project, lorabuild_env

STANDIN = REPO / "tests" / "standins" / "simpletuner"
CPU = Machine("host", "Linux x86_64", 2, 32.0, GpuReport(problem="no NVIDIA GPU found"))


def gpu_machine(name: str = "NVIDIA H100 80GB HBM3", gb: float = 80.0) -> Machine:
    return Machine("host", "Linux x86_64", 16, 128.0, GpuReport((Gpu(0, name, gb, gb, (9, 0)),), "570.86.15", "12.8"))


# --- the stand-in installation ---------------------------------------------------------------------


def make_standin(root: Path) -> Path:
    """A SimpleTuner checkout with its .venv, as `git clone` + `pip install -e .` leave it."""
    checkout = root / "SimpleTuner"
    package = checkout / "simpletuner"
    package.mkdir(parents=True)
    shutil.copy(STANDIN / "train.py", package / "train.py")
    shutil.copy(st.KEYS_FILE, package / "standin_keys.json")
    (package / "__init__.py").write_text('__version__ = "4.8.0"\n')
    venv = checkout / ".venv"
    bin_dir = venv / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").symlink_to(sys.executable)
    # a real venv of this interpreter, whose packages are this one's plus the checkout (pip -e)
    shutil.copy(Path(sys.prefix) / "pyvenv.cfg", venv / "pyvenv.cfg")
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = venv / "lib" / version / "site-packages"
    site.mkdir(parents=True)
    (site / "standin.pth").write_text(f"{sysconfig.get_paths()['purelib']}\n{checkout}\n")
    accelerate = bin_dir / "accelerate"
    accelerate.write_text(f"#!{bin_dir / 'python'}\n" + (STANDIN / "accelerate.py").read_text())
    accelerate.chmod(0o755)
    return checkout


def make_model(root: Path, name: str = "sd15-model") -> Path:
    """A diffusers folder as far as lorabuild and the stand-in look at it."""
    folder = root / "models" / name
    flux = "flux" in name
    denoiser = "transformer" if flux else "unet"
    (folder / denoiser).mkdir(parents=True)
    index = {
        "_class_name": "FluxPipeline" if flux else "StableDiffusionPipeline",
        denoiser: ["diffusers", "FluxTransformer2DModel" if flux else "UNet2DConditionModel"],
    }
    (folder / "model_index.json").write_text(json.dumps(index) + "\n")
    return folder


def scenario(checkout: Path, name: str) -> None:
    (checkout / "standin-scenario").write_text(name + "\n")


# 8 pictures × 3 repeats ÷ batch 2 = 12 steps per epoch; 5 epochs = 60 steps; a checkpoint per epoch
STANDIN_SPEC: dict[str, Any] = {
    "base_model": {"path": "models/sd15-model", "family": "sd15"},
    "backend": {"name": "simpletuner", "path": "SimpleTuner"},
    "dataset": {"repeats": 3},
    "training": {"epochs": 5, "batch_size": 2, "rank": 4, "alpha": 2, "learning_rate": 1e-4, "resolution": 512},
    "checkpoints": {"every_n_epochs": 1, "keep_last": 2},
}


@pytest.fixture
def standin(bare_project: Project) -> tuple[Project, Path]:
    checkout = make_standin(bare_project.root)
    make_model(bare_project.root)
    bare_project.write_spec(**STANDIN_SPEC)
    return bare_project, checkout


def context(project: Project, machine: Machine = CPU, spec: str = "t.yaml") -> Any:
    return build_context(project.root / spec, root=project.grimoire, options=RunOptions(yes=True), machine=machine)


# --- plans for the config matrix -------------------------------------------------------------------


@pytest.fixture(scope="module")
def family_plans(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Plan]:
    """One real plan per family, on an 80 GB GPU; variations are made with model_copy."""
    root = tmp_path_factory.mktemp("plans")
    project = Project(root, None)
    plans = {}
    for family in st.FAMILIES:
        name = "flux1-dev" if family == "flux" else f"{family}-model"
        make_model(root, name)
        project.write_spec(
            name=family,
            base_model={"path": f"models/{name}", "family": family},
            backend={"name": "simpletuner", "path": "SimpleTuner"},
            dataset={"repeats": 10},
            training={"resolution": 512 if family == "sd15" else 1024, "rank": 16, "alpha": 8, "epochs": 4},
            checkpoints={"every_n_epochs": 2, "keep_last": 2},
        )
        plans[family] = context(project, gpu_machine(), spec=f"{family}.yaml").plan
    return plans


def vary(plan: Plan, **training: Any) -> Plan:
    return plan.model_copy(update={"training": plan.training.model_copy(update=training)})


def rendered(plan: Plan) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    files = st.render_config(plan)
    assert sorted(files) == ["config.json", "multidatabackend.json"]
    return json.loads(files["config.json"]), json.loads(files["multidatabackend.json"])


def check_value(table: dict[str, Any], key: str, value: Any) -> None:
    assert key in table, f"SimpleTuner does not accept `{key}`"
    spec = table[key]
    kind = spec["type"]
    if kind == "int":
        assert isinstance(value, int) and not isinstance(value, bool), (key, value)
    elif kind == "float":
        assert isinstance(value, float), (key, value)
    elif kind == "bool":
        assert isinstance(value, bool), (key, value)
    elif kind == "path":
        assert isinstance(value, str) and Path(value).is_absolute(), (key, value)
    else:
        assert isinstance(value, str), (key, value)
    if kind == "select":
        choices = st.accepted_optimizers() if spec.get("choices_from") == "optimizers" else spec["choices"]
        assert value in choices, (key, value)


def check_accepted(plan: Plan) -> None:
    keys = st.accepted_keys()
    config, datasets = rendered(plan)
    for key, value in config.items():
        check_value(keys["config"], key, value)
    for required in (k for k, v in keys["config"].items() if v.get("required")):
        assert required in config
    for entry in datasets:
        for key, value in entry.items():
            check_value(keys["dataset"], key, value)
    assert config["optimizer"] not in keys["removed_optimizers"]
    # SimpleTuner refuses max_train_steps with epochs, and needs one of them
    assert (config["num_train_epochs"] == 0) == ("max_train_steps" in config)
    assert config["num_train_epochs"] > 0 or config["max_train_steps"] > 0


PRECISIONS = [("bf16", "bf16"), ("bf16", "fp8"), ("bf16", "nf4"), ("fp16", "fp16"), ("no", "fp32")]


@pytest.mark.parametrize("family", st.FAMILIES)
def test_every_emitted_key_is_accepted_with_its_type(family_plans: dict[str, Plan], family: str) -> None:
    base = family_plans[family]
    assert not base.problems, base.problems
    for optimizer in st.OPTIMIZERS:
        for mixed, base_precision in PRECISIONS:
            for max_steps in (None, 120):
                for bucketing in (True, False):
                    plan = vary(
                        base,
                        optimizer=optimizer,
                        mixed_precision=mixed,
                        base_precision=base_precision,
                        max_train_steps=max_steps,
                        bucketing=bucketing,
                        optimizer_args={"weight_decay": 0.01, "foreach": True} if max_steps else {},
                    )
                    check_accepted(plan)
    samples = base.samples.model_copy(update={"prompts": ["shapestyle, a star"], "every_n_epochs": 1})
    check_accepted(base.model_copy(update={"samples": samples}))


def test_every_emitted_key_is_explained(family_plans: dict[str, Plan]) -> None:
    for plan in family_plans.values():
        config, datasets = rendered(plan)
        lines = st.describe_config(plan)
        described = {(line.file, line.key) for line in lines}
        assert described == {("config.json", k) for k in config} | {
            ("multidatabackend.json", f"{entry['id']}.{k}") for entry in datasets for k in entry
        }
        assert all(line.meaning and "\n" not in line.meaning for line in lines)
        meanings = {line.key: line.meaning for line in lines}
        # glossary terms are explained by the glossary, in its words
        assert meanings["lora_rank"] == explain("rank") and meanings["num_train_epochs"] == explain("epochs")
        assert meanings["learning_rate"] == TERMS["learning_rate"]
        assert "SimpleTuner counts beyond the first" in meanings["pictures.repeats"]


def test_the_gate_2_files_are_the_real_training_with_absolute_paths(family_plans: dict[str, Plan]) -> None:
    plan = family_plans["flux"]
    config, datasets = rendered(plan)
    run = Path(plan.run_dir)
    assert config["output_dir"] == str(run / "checkpoints")
    assert config["data_backend_config"] == str(run / "backend" / "multidatabackend.json")
    assert config["pretrained_model_name_or_path"] == plan.model.path
    assert config["resume_from_checkpoint"] == "latest"  # by hand it resumes, as SimpleTuner does
    assert (config["model_type"], config["model_family"], config["model_flavour"]) == ("lora", "flux", "dev")
    assert (config["lora_rank"], config["lora_alpha"], config["train_batch_size"]) == (
        16,
        8.0,
        plan.training.batch_size,
    )
    assert config["report_to"] == "simpletuner" and config["validation_disable"] is True
    assert "train_text_encoder" not in config  # Flux's text encoders are not trained
    pictures, text_embeds = datasets
    assert pictures["instance_data_dir"] == plan.dataset.path and pictures["caption_strategy"] == "textfile"
    assert pictures["text_embeds"] == text_embeds["id"] and text_embeds["default"] is True
    assert all(Path(v).is_absolute() for v in (pictures["cache_dir_vae"], text_embeds["cache_dir"]))


# --- cross-field rules, one test each --------------------------------------------------------------


def test_max_train_steps_sets_epochs_to_zero(family_plans: dict[str, Plan]) -> None:
    config, _ = rendered(vary(family_plans["sdxl"], max_train_steps=300))
    assert (config["max_train_steps"], config["num_train_epochs"]) == (300, 0)
    config, _ = rendered(family_plans["sdxl"])
    assert "max_train_steps" not in config and config["num_train_epochs"] == family_plans["sdxl"].steps.epochs


def test_constant_schedule_has_no_warmup(family_plans: dict[str, Plan]) -> None:
    # SimpleTuner would quietly turn "constant" with warm-up steps into constant_with_warmup
    config, _ = rendered(vary(family_plans["sdxl"], lr_scheduler="constant", lr_warmup_steps=20))
    assert (config["lr_scheduler"], config["lr_warmup_steps"]) == ("constant", 0)
    config, _ = rendered(vary(family_plans["sdxl"], lr_scheduler="constant_with_warmup", lr_warmup_steps=20))
    assert (config["lr_scheduler"], config["lr_warmup_steps"]) == ("constant_with_warmup", 20)


def test_repeats_count_the_extra_showings(family_plans: dict[str, Plan]) -> None:
    plan = family_plans["sdxl"]
    _, datasets = rendered(plan)
    assert plan.dataset.repeats == 10 and datasets[0]["repeats"] == 9


def test_optimizers_have_simpletuners_names(family_plans: dict[str, Plan]) -> None:
    names = {opt: rendered(vary(family_plans["sdxl"], optimizer=opt))[0]["optimizer"] for opt in st.OPTIMIZERS}
    assert names == {
        "adamw": "adamw_bf16",
        "adamw8bit": "bnb-adamw8bit",
        "lion": "optimi-lion",
        "prodigy": "prodigy",
        "adafactor": "torch-adafactor",
    }
    assert set(names.values()) <= set(st.accepted_optimizers())


def test_base_precision_and_where_it_is_quantised(family_plans: dict[str, Plan]) -> None:
    flux = family_plans["flux"]
    config, _ = rendered(vary(flux, base_precision="fp8"))
    assert (config["base_model_precision"], config["quantize_via"]) == ("int8-quanto", "accelerator")  # 80 GB
    small = flux.model_copy(update={"device": flux.device.model_copy(update={"memory_gb": 24.0})})
    config, _ = rendered(vary(small, base_precision="fp8"))
    assert config["quantize_via"] == "cpu"  # ≤ 24 GB: quantise on the processor (§7)
    config, _ = rendered(vary(flux, base_precision="nf4"))
    assert config["base_model_precision"] == "nf4-bnb"
    config, _ = rendered(vary(flux, base_precision="bf16"))
    assert config["base_model_precision"] == "no_change" and "quantize_via" not in config


def test_no_bucketing_crops_square(family_plans: dict[str, Plan]) -> None:
    config, datasets = rendered(vary(family_plans["sdxl"], bucketing=False))
    assert config["resolution_type"] == "pixel"
    assert (datasets[0]["crop"], datasets[0]["crop_aspect"], datasets[0]["resolution_type"]) == (
        True,
        "square",
        "pixel",
    )
    _, datasets = rendered(family_plans["sdxl"])
    assert datasets[0]["crop"] is False and datasets[0]["resolution_type"] == "pixel_area"


def test_checkpoint_cadence_is_counted_in_steps(family_plans: dict[str, Plan]) -> None:
    plan = family_plans["sdxl"]
    config, _ = rendered(plan)
    assert config["checkpoint_step_interval"] == 2 * plan.steps.steps_per_epoch
    assert config["checkpoints_total_limit"] == plan.checkpoints.keep_last == 2


def test_optimizer_args_become_one_line_that_reads_back_with_its_types(family_plans: dict[str, Plan]) -> None:
    args = {"weight_decay": 1e-20, "eps": 1e-8, "betas_steps": 3, "foreach": False, "mode": "fast", "beta": 2.0}
    config, _ = rendered(vary(family_plans["sdxl"], optimizer_args=args))
    assert config["optimizer_config"] == "beta=2.0,betas_steps=3,eps=1e-08,foreach=false,mode=fast,weight_decay=1e-20"
    no_args, _ = rendered(family_plans["sdxl"])
    assert "optimizer_config" not in no_args


def test_sample_prompts_become_validation(family_plans: dict[str, Plan]) -> None:
    plan = family_plans["sdxl"]
    samples = plan.samples.model_copy(update={"prompts": ["shapestyle, a star"], "every_n_epochs": 1})
    config, _ = rendered(plan.model_copy(update={"samples": samples}))
    assert config["validation_disable"] is False and config["validation_prompt"] == "shapestyle, a star"
    assert config["validation_step_interval"] == plan.steps.steps_per_epoch
    assert config["validation_resolution"] == "1024x1024"


def test_text_encoder_training_only_where_simpletuner_trains_it(family_plans: dict[str, Plan]) -> None:
    assert "train_text_encoder" in st.settings(family_plans["sdxl"])
    assert "train_text_encoder" not in st.settings(family_plans["flux"])
    config, _ = rendered(vary(family_plans["sd15"], train_text_encoder=True))
    assert config["train_text_encoder"] is True and config["model_family"] == "sd1x"
    assert config["model_flavour"] == "1.5"


def test_flux_flavour_follows_the_folder_name(family_plans: dict[str, Plan]) -> None:
    flux = family_plans["flux"]
    schnell = flux.model_copy(update={"model": flux.model.model_copy(update={"path": "/models/FLUX.1-schnell"})})
    assert rendered(schnell)[0]["model_flavour"] == "schnell"


def test_settings_simpletuner_decides_itself() -> None:
    training = {"cache_latents": False, "cache_text_encoder_outputs": False, "base_precision": "fp16"}
    changes = st.adjust_settings({**training, "mixed_precision": "bf16"}, on_cpu=False)
    assert [(s, v) for s, v, _ in changes] == [
        ("cache_latents", True),
        ("cache_text_encoder_outputs", True),
        ("base_precision", "bf16"),
    ]
    quantised = {"cache_latents": True, "cache_text_encoder_outputs": True, "base_precision": "fp8"}
    assert st.adjust_settings({**quantised, "mixed_precision": "bf16"}, on_cpu=True) == []


def issue_fields(plan: Plan) -> list[tuple[str, ...]]:
    return [i.field for i in st.check_plan(plan)]


def test_a_plain_plan_has_no_issues(family_plans: dict[str, Plan]) -> None:
    for plan in family_plans.values():
        assert st.check_plan(plan) == []


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"mixed_precision": "fp16"}, ("training", "mixed_precision"), "bf16"),
        ({"seed": 0}, ("training", "seed"), "new random seed"),
        ({"optimizer_args": {"betas": "0.9,0.99"}}, ("training", "optimizer_args"), "commas"),
    ],
)
def test_training_settings_simpletuner_cannot_take(
    family_plans: dict[str, Plan], change: dict[str, Any], field: tuple[str, ...], words: str
) -> None:
    issues = st.check_plan(vary(family_plans["sdxl"], **change))
    assert [i.field for i in issues] == [field] and words in issues[0].message
    assert issues[0].fix and issues[0].kind == "backend"


def test_other_plans_simpletuner_cannot_run(family_plans: dict[str, Plan]) -> None:
    plan = family_plans["sdxl"]
    model, dataset = plan.model, plan.dataset

    def with_model(**update: Any) -> Plan:
        return plan.model_copy(update={"model": model.model_copy(update=update)})

    assert issue_fields(with_model(kind="file")) == [("base_model", "path")]
    assert issue_fields(with_model(vae="/models/sdxl-vae.safetensors")) == [("base_model", "vae")]
    assert issue_fields(with_model(kind="demo")) == [("base_model", "demo")]
    unknown = st.check_plan(with_model(family="sd21"))
    assert unknown[0].field == ("base_model", "family") and "kohya" in unknown[0].fix
    captions = plan.model_copy(update={"dataset": dataset.model_copy(update={"caption_extension": ".caption"})})
    assert issue_fields(captions) == [("dataset", "caption_extension")]
    few = plan.model_copy(update={"steps": plan.steps.model_copy(update={"samples_per_epoch": 1})})
    assert issue_fields(few) == [("dataset", "repeats")]
    prompts = plan.model_copy(update={"samples": plan.samples.model_copy(update={"prompts": ["a", "b"]})})
    assert issue_fields(prompts) == [("samples", "prompts")]
    remote = plan.model_copy(update={"compute": plan.compute.model_copy(update={"target": "runpod"})})
    assert "unavailable" not in [i.kind for i in st.check_plan(remote)]  # targets are not a backend's business


# --- the command -----------------------------------------------------------------------------------


def test_launch_runs_accelerate_of_the_backends_venv(standin: tuple[Project, Path], tmp_path: Path) -> None:
    project, checkout = standin
    plan = context(project).plan
    out = tmp_path / "out"
    launch = st.launch(plan, Path(plan.run_dir) / "backend", out)
    venv_bin = checkout / ".venv" / "bin"
    assert plan.backend.python == str(venv_bin / "python")
    assert launch.argv == [
        str(venv_bin / "accelerate"),
        "launch",
        "--mixed_precision=bf16",
        "--num_processes=1",
        "--num_machines=1",
        "--dynamo_backend=no",
        str(checkout / "simpletuner" / "train.py"),
    ]
    workspace = out / st.WORKSPACE
    assert launch.cwd == workspace
    assert launch.env["CONFIG_BACKEND"] == launch.env["SIMPLETUNER_CONFIG_BACKEND"] == "json"
    assert launch.env["CONFIG_PATH"] == str(workspace / "config.json")
    assert launch.env["PYTHONUNBUFFERED"] == "1" and launch.env["PYTHONPATH"].split(os.pathsep)[0] == str(checkout)
    assert set(launch.files) == {workspace / "config.json", workspace / "multidatabackend.json"}
    config = json.loads(launch.files[workspace / "config.json"])
    assert config["output_dir"] == str(out) and config["data_backend_config"] == str(
        workspace / "multidatabackend.json"
    )
    assert config["resume_from_checkpoint"] == ""  # nothing to resume from yet
    # apart from where it writes and what it resumes, the run is exactly Gate 2's training
    gate2 = json.loads(st.render_config(plan)["config.json"])
    same = {"output_dir", "data_backend_config", "resume_from_checkpoint"}
    assert {k: v for k, v in config.items() if k not in same} == {k: v for k, v in gate2.items() if k not in same}


def test_dry_run_variant(standin: tuple[Project, Path], tmp_path: Path) -> None:
    project, _ = standin
    ctx = context(project)
    samples = ctx.plan.samples.model_copy(update={"prompts": ["shapestyle, a star"]})
    plan = ctx.plan.model_copy(update={"samples": samples})
    launch = st.launch(plan, tmp_path, tmp_path / "scratch", max_steps=5, resume=False)
    config = json.loads(launch.files[tmp_path / "scratch" / st.WORKSPACE / "config.json"])
    assert (config["max_train_steps"], config["num_train_epochs"], config["resume_from_checkpoint"]) == (5, 0, "")
    assert config["checkpoint_step_interval"] > 5 and config["validation_disable"] is True
    assert not [k for k in config if k.startswith("validation_") and k != "validation_disable"]


def test_out_of_memory_retry_and_several_gpus(standin: tuple[Project, Path], tmp_path: Path) -> None:
    project, _ = standin
    plan = context(project).plan
    launch = st.launch(plan, tmp_path, tmp_path, batch_size=1, gradient_accumulation=2)
    config = json.loads(launch.files[tmp_path / st.WORKSPACE / "config.json"])
    assert (config["train_batch_size"], config["gradient_accumulation_steps"]) == (1, 2)
    two = plan.model_copy(update={"compute": plan.compute.model_copy(update={"gpu_count": 2})})
    argv = st.launch(two, tmp_path, tmp_path).argv
    assert "--num_processes=2" in argv and "--multi_gpu" in argv


def test_a_python_without_accelerate_beside_it_runs_the_module(family_plans: dict[str, Plan], tmp_path: Path) -> None:
    plan = family_plans["sdxl"]
    plan = plan.model_copy(update={"backend": plan.backend.model_copy(update={"python": "python3", "path": None})})
    argv = st.launch(plan, tmp_path, tmp_path).argv
    assert argv[:3] == ["python3", "-m", "accelerate.commands.launch"]
    assert argv[-2:] == ["--module", "simpletuner.train"]  # pip-installed, where lorabuild did not look


def write_checkpoint(out: Path, step: int, *, guard: bool = True, lora: bool = True) -> Path:
    folder = out / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    if lora:
        (folder / st.LORA_FILE).write_bytes(b"x")
    (folder / "training_state.json").write_text(json.dumps({"global_step": step, "epoch": 1}))
    if guard:
        (folder / st.GUARD_FILE).write_text("complete\n")
    return folder


def test_resume_names_the_newest_complete_checkpoint(standin: tuple[Project, Path], tmp_path: Path) -> None:
    project, _ = standin
    plan = context(project).plan
    out = tmp_path / "out"
    write_checkpoint(out, 12)
    newest = write_checkpoint(out, 24)
    write_checkpoint(out, 36, guard=False)  # killed while saving
    config = json.loads(st.launch(plan, tmp_path, out).files[out / st.WORKSPACE / "config.json"])
    assert config["resume_from_checkpoint"] == str(newest)
    fresh = json.loads(st.launch(plan, tmp_path, out, resume=False).files[out / st.WORKSPACE / "config.json"])
    assert fresh["resume_from_checkpoint"] == ""


# --- checkpoints -----------------------------------------------------------------------------------


def test_checkpoints_are_complete_ones_oldest_first(family_plans: dict[str, Plan], tmp_path: Path) -> None:
    plan = family_plans["sdxl"]
    per_epoch = plan.steps.steps_per_epoch
    for step in (per_epoch * 4, per_epoch * 2):
        write_checkpoint(tmp_path, step)
    write_checkpoint(tmp_path, per_epoch * 6, guard=False)
    write_checkpoint(tmp_path, per_epoch * 8, lora=False)
    (tmp_path / f"checkpoint-{per_epoch * 10}-tmp").mkdir()
    (tmp_path / "cache").mkdir()
    (tmp_path / st.LORA_FILE).write_bytes(b"final")
    found = st.checkpoints(plan, tmp_path)
    assert [(c.step, c.epoch) for c in found] == [(per_epoch * 2, 2), (per_epoch * 4, 4)]
    assert all(c.lora == c.path / st.LORA_FILE for c in found)
    assert st.final_lora(plan, tmp_path) == tmp_path / st.LORA_FILE


def test_checkpoints_of_versions_without_the_guard(family_plans: dict[str, Plan], tmp_path: Path) -> None:
    plan = family_plans["sdxl"]
    write_checkpoint(tmp_path, 10, guard=False)
    write_checkpoint(tmp_path, 20, guard=False, lora=False)
    assert [c.step for c in st.checkpoints(plan, tmp_path)] == [10]


def test_prune_keeps_the_newest_and_clears_leftovers(family_plans: dict[str, Plan], tmp_path: Path) -> None:
    plan = family_plans["sdxl"]  # keep_last 2
    for step in (10, 20, 30, 40):
        write_checkpoint(tmp_path, step)
    write_checkpoint(tmp_path, 50, guard=False)
    (tmp_path / "checkpoint-60-tmp").mkdir()
    (tmp_path / "cache").mkdir()
    removed = st.prune_checkpoints(plan, tmp_path)
    assert sorted(p.name for p in removed) == ["checkpoint-10", "checkpoint-20", "checkpoint-50", "checkpoint-60-tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "checkpoint-30", "checkpoint-40"]


# --- reading its output ----------------------------------------------------------------------------

REAL_BAR = (
    "Epoch 38/65, Steps:  57%|████████▋      | 5750/10000 [18:09<12:43,  5.57it/s, grad_norm=0.00485, "
    "lr=1.04e-5, step_loss=0.434]"
)


def feed(lines: list[str]) -> list[Event]:
    reader = st.LogReader()
    return [event for line in lines for event in reader.feed(line)]


def test_the_progress_bar_is_a_step() -> None:
    (event,) = feed([REAL_BAR])
    assert event == Event(
        "step",
        {
            "step": 5750,
            "total_steps": 10000,
            "epoch": 38,
            "epochs": 65,
            "loss": 0.434,
            "lr": 1.04e-5,
            "step_seconds": 0.1795,
        },
    )
    slow = "Epoch 1/5, Steps:   2%|▏         | 1/60 [00:03<03:00,  3.05s/it, lr=0.0001, step_loss=0.12]"
    assert feed([slow])[0].data["step_seconds"] == 3.05
    # the bar drawn before the first step, or again at a resume point, carries no loss: no step
    assert feed(["Epoch 3/5 Steps:  40%|████      | 24/60 [00:00<?, ?it/s]"]) == []
    # a redraw of the same step counts once
    assert len(feed([REAL_BAR, REAL_BAR])) == 1


def test_epochs_end_when_the_next_starts_and_at_the_end() -> None:
    def bar(step: int, epoch: int, loss: float) -> str:
        return (
            f"Epoch {epoch}/2, Steps:  50%|█████     | {step}/4 [00:01<00:01,  2.00it/s, lr=0.0001, step_loss={loss}]"
        )

    events = feed(
        [
            "[RANK 0] 2026-08-22 10:00:00,123 [INFO] ***** Running training *****",
            "-  Num Epochs = 2",
            "-  Total optimization steps = 4",
            "-  Total optimization steps remaining = 4",
            bar(1, 1, 0.4),
            bar(2, 1, 0.2),
            bar(3, 2, 0.1),
            "[RANK 0] 2026-08-22 10:00:05,000 [INFO] Exiting training loop. Beginning model unwind at epoch 2, step 3",
            "[RANK 0] 2026-08-22 10:00:06,000 [INFO] Training has completed.",
            " -> global_step = 3, max_train_steps = 4, epoch = 2, num_train_epochs = 2",
        ]
    )
    kinds = [e.kind for e in events]
    assert kinds == ["model_loaded", "dataset", "step", "step", "epoch", "step", "epoch", "done"]
    assert events[1].data == {"total_steps": 4, "epochs": 2}
    assert events[4].data == {"epoch": 1, "epochs": 2, "step": 2, "mean_loss": pytest.approx(0.3)}
    assert events[6].data["epoch"] == 2


def test_start_up_resume_and_save_lines() -> None:
    calculated = (
        "[RANK 0] 2026-08-22 10:00:00,123 [INFO] Calculated our maximum training steps at 400 because we have "
        "10 epochs and 40 steps per epoch."
    )
    assert feed([calculated]) == [Event("dataset", {"total_steps": 400, "epochs": 10, "steps_per_epoch": 40})]
    resume = "[RANK 0] 2026-08-22 10:00:00,123 [INFO] Resuming from checkpoint checkpoint-80"
    assert feed([resume]) == [Event("resumed", {"step": 80, "checkpoint": "checkpoint-80"})]
    fresh = "[RANK 0] 2026-08-22 10:00:00,123 [INFO] Checkpoint 'latest' does not exist. Starting a new training run."
    assert feed([fresh]) == []
    # a log line written while the bar is drawn arrives on the bar's line
    events = feed([REAL_BAR + "[RANK 0] 2026-08-22 10:00:00,123 [INFO] Saving current state to /r/out/checkpoint-5750"])
    assert [e.kind for e in events] == ["step", "checkpoint"]
    assert events[1].data == {"path": "/r/out/checkpoint-5750", "step": 5750, "epoch": 38}
    assert feed(["Saving current state to /r/out/checkpoint-5750-tmp"]) == []
    warning = "\x1b[33m[RANK 0] 2026-08-22 10:00:00,123 [WARNING] The VAE model is not compatible.\x1b[0m"
    assert feed([warning]) == [Event("warning", {"message": "The VAE model is not compatible."})]


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.", "oom"),
        ("[RANK 0] 2026-08-22 10:00:00,123 [ERROR] GPU ran out of memory during quantisation. Use cpu", "oom"),
        ("RuntimeError: Non-finite training loss detected at step 3", "nan"),
        ("ValueError: Could not parse command line arguments:", "config"),
        ("error: unrecognized arguments: --lora_r=16", "config"),
        (
            "ValueError: When using --max_train_steps (MAX_NUM_STEPS), you must set --num_train_epochs (NUM_EPOC",
            "config",
        ),
        ("ValueError: Optimizer adamw8bit not found.", "config"),
        ("ValueError: Model is not using bf16 precision, but the optimizer adamw_bf16 requires it.", "config"),
        ("ValueError: JSON configuration file not found. Paths tried: ['/x/config.json']", "config"),
        ("ValueError: Dataset configuration will produce zero usable batches.", "dataset"),
        ("ValueError: (id=pictures) Dataset produced no usable samples.", "dataset"),
        ("[RANK 0] 2026-08-22 10:00:00,123 [ERROR] No images were discovered by the bucket manager", "dataset"),
        ("UnicodeDecodeError: 'utf-8' codec can't decode byte 0xe9 in position 13", "caption"),
        ("OSError: Error no file named model_index.json found in directory /models/flux1-dev.", "model_load"),
        ("RuntimeError: CUDA error: no kernel image is available for execution on the device", "cuda"),
        ("ModuleNotFoundError: No module named 'optimum'", "not_installed"),
        ("subprocess.CalledProcessError: died with <Signals.SIGKILL: 9>.", "internal"),
    ],
)
def test_failure_messages_are_errors(line: str, kind: str) -> None:
    (event,) = feed([line])
    assert event.kind == "error" and event.data["kind"] == kind
    assert line.split("] ")[-1][:40] in event.data["message"]  # the backend's own words, without the prefix


def test_the_first_non_finite_loss_is_an_error() -> None:
    bad = REAL_BAR.replace("step_loss=0.434", "step_loss=nan")
    worse = bad.replace("5750/10000", "5751/10000")
    events = feed([bad, worse])
    assert [e.kind for e in events] == ["step", "error", "step"]
    assert events[1].data["kind"] == "nan"


def test_the_module_reader_starts_over_at_each_run(family_plans: dict[str, Plan]) -> None:
    plan = family_plans["sdxl"]
    backends.parse_log_line(plan, REAL_BAR)
    assert backends.parse_log_line(plan, "[RANK 0] 2026-08-22 10:00:00,123 [INFO] ***** Running training *****")
    # the same step in a new run is a new step
    assert [e.kind for e in backends.parse_log_line(plan, REAL_BAR)] == ["step"]


def test_out_of_memory_text() -> None:
    assert st.is_out_of_memory("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    assert st.is_out_of_memory("RuntimeError: CUDA error: out of memory")
    assert not st.is_out_of_memory("RuntimeError: CUDA error: no kernel image is available")


def test_metrics_file_lines(family_plans: dict[str, Plan], tmp_path: Path) -> None:
    plan = family_plans["sdxl"]
    (path,) = st.metrics_files(plan, tmp_path)
    assert path == tmp_path / "training_metrics.jsonl"
    line = '{"metrics": {"train_loss": 0.12, "learning_rate": 0.0001, "epoch": 2}, "schema_version": 1, "step": 7}'
    assert st.parse_metrics_line(path, line) == [Event("step", {"step": 7, "loss": 0.12, "lr": 0.0001, "epoch": 2})]
    nan = st.parse_metrics_line(path, '{"metrics": {"train_loss": NaN}, "step": 8}')
    assert [e.kind for e in nan] == ["step", "error"]
    assert st.parse_metrics_line(path, "not json") == [] and st.parse_metrics_line(path, "[1]") == []


# --- installation and the environment probe ----------------------------------------------------------


def test_installation_finds_the_checkout_and_its_version(standin: tuple[Project, Path]) -> None:
    project, checkout = standin
    plan = context(project).plan
    found = st.installation(plan)
    assert found.ok and found.version == "4.8.0"
    assert found.entry_point == str(checkout / "simpletuner" / "train.py")
    missing = plan.model_copy(
        update={"backend": plan.backend.model_copy(update={"path": str(checkout.parent / "nope")})}
    )
    absent = st.installation(missing)
    assert not absent.ok and "was not found" in absent.message and "git clone" in absent.fix
    no_python = plan.model_copy(update={"backend": plan.backend.model_copy(update={"python": "/nowhere/bin/python"})})
    assert "Python was not found" in st.installation(no_python).message


def test_probe_runs_in_the_backends_python(standin: tuple[Project, Path]) -> None:
    project, checkout = standin
    plan = context(project).plan
    argv = st.probe_command(plan)
    assert argv[0] == str(checkout / ".venv" / "bin" / "python") and argv[3:] == [
        "simpletuner",
        "accelerate",
        "diffusers",
        "peft",
    ]
    flux_like = vary(plan, optimizer="adamw8bit", base_precision="fp8")
    assert st.probe_command(flux_like)[3:] == [
        "simpletuner",
        "accelerate",
        "diffusers",
        "peft",
        "bitsandbytes",
        "optimum.quanto",
    ]
    facts = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True, timeout=120).stdout)
    assert facts["executable"] == argv[0] and facts["modules"]["simpletuner"] == "4.8.0"


# --- runs of the stand-in through the gates ----------------------------------------------------------


def test_full_run_through_the_gates(standin: tuple[Project, Path]) -> None:
    """Gates 2, 4 and 10 against the stand-in; Gate 3 passes everything but the missing GPU."""
    project, _ = standin
    ctx = context(project)
    assert not ctx.plan.problems, ctx.plan.problems
    config_gate.run(ctx)
    run = project.run_dir()
    assert sorted(p.name for p in (run / "backend").iterdir()) == ["config.json", "multidatabackend.json"]
    assert "SimpleTuner" in (run / "config.md").read_text()

    checks, record = environment_gate.check_environment(ctx.plan, ctx.machine.gpus, project.grimoire)
    assert [c.name for c in checks if not c.ok] == ["gpu"]  # this machine has no NVIDIA GPU
    assert record["backend"]["version"] == "4.8.0" and record["backend"]["probe"]["modules"]["simpletuner"] == "4.8.0"

    dryrun_gate.run(ctx)
    assert json.loads((run / "dryrun.ok").read_text())["steps"] == 5
    assert not list(run.glob(".dryrun-*"))

    train_gate.run(ctx)
    lora = run / "t.safetensors"
    from safetensors.numpy import load_file

    assert set(load_file(str(lora))) == {
        "transformer.blocks.0.attn.to_q.lora_A.weight",
        "transformer.blocks.0.attn.to_q.lora_B.weight",
    }
    progress = json.loads((run / "progress.json").read_text())
    assert progress["status"] == "COMPLETE" and progress["step"] == 60
    assert [c.step for c in st.checkpoints(ctx.plan, run / "checkpoints")] == [48, 60]  # keep_last 2
    workspace = run / "checkpoints" / st.WORKSPACE
    launched = json.loads((workspace / "accelerate-launch.json").read_text())
    assert launched["options"]["--mixed_precision"] == "bf16" and (workspace / "debug.log").is_file()
    assert (run / "checkpoints" / "training_metrics.jsonl").read_text().count("\n") == 60
    log = (run / "train.log").read_text()
    assert "Training has completed." in log and "Saving current state to" in log


@pytest.mark.parametrize(
    ("name", "failure"),
    [
        ("oom", "ran out of memory"),
        ("nan", "NaN"),
        ("nodata", "dataset could not be read"),
        ("crash", "exit code 1"),
        ("exit0", "finished without writing the LoRA file"),
    ],
)
def test_failed_runs_fail_the_train_gate(standin: tuple[Project, Path], name: str, failure: str) -> None:
    project, checkout = standin
    ctx = context(project)
    config_gate.run(ctx)
    scenario(checkout, name)
    with pytest.raises(GateFailed) as failed:
        train_gate.run(ctx)
    assert failure in failed.value.message, failed.value.render()
    assert not (project.run_dir() / "t.safetensors").exists()
    assert json.loads((project.run_dir() / "progress.json").read_text())["status"] == "FAILED"


def test_failed_runs_are_read_as_their_kind(standin: tuple[Project, Path], tmp_path: Path) -> None:
    """The event stream of each scenario, and the train gate's rule: exit 0, no error, the LoRA."""
    from lorabuild.procs import Finished, run_streaming

    project, checkout = standin
    plan = context(project).plan

    def run(out: Path) -> tuple[Finished, list[Event]]:
        reader = st.LogReader()
        events: list[Event] = []
        with open(out.with_suffix(".log"), "w") as log:
            finished = run_streaming(
                st.launch(plan, tmp_path, out, max_steps=5),
                log=log,
                on_line=lambda line: events.extend(reader.feed(line)),
                pid_file=tmp_path / "pid",
            )
        return finished, events

    expected = {"normal": None, "oom": "oom", "nan": "nan", "nodata": "dataset", "crash": None, "exit0": None}
    for name, kind in expected.items():
        scenario(checkout, name)
        out = tmp_path / name
        finished, events = run(out)
        errors = [e.data["kind"] for e in events if e.kind == "error"]
        assert errors[:1] == ([kind] if kind else []), (name, errors)
        passed = finished.returncode == 0 and not errors and st.final_lora(plan, out).is_file()
        assert passed == (name == "normal"), (name, finished.returncode, finished.tail)
        kinds = [e.kind for e in events]
        if name in ("normal", "exit0"):
            assert finished.returncode == 0
            assert ("done" in kinds) == (name == "normal")
        else:
            assert finished.returncode == 1  # accelerate reports the failed script as exit 1
        if name != "nodata":
            assert "model_loaded" in kinds and "step" in kinds


def test_dry_run_retries_out_of_memory_at_half_the_batch(standin: tuple[Project, Path]) -> None:
    project, checkout = standin
    ctx = context(project)
    config_gate.run(ctx)
    scenario(checkout, "oom")
    with pytest.raises(GateFailed) as failed:
        dryrun_gate.run(ctx)
    log = (project.run_dir() / "dryrun.log").read_text()
    assert "reducing batch size from 2 to 1" in log and "CUDA out of memory" in log
    assert "out of memory" in failed.value.message


def test_a_stopped_training_resumes_from_its_newest_checkpoint(standin: tuple[Project, Path]) -> None:
    project, checkout = standin
    ctx = context(project)
    config_gate.run(ctx)
    scenario(checkout, "stop-after-30")
    with pytest.raises(GateFailed):
        train_gate.run(ctx)
    out = project.run_dir() / "checkpoints"
    assert [c.step for c in st.checkpoints(ctx.plan, out)] == [12, 24]

    scenario(checkout, "normal")
    train_gate.run(ctx)
    config = json.loads((out / st.WORKSPACE / "config.json").read_text())
    assert config["resume_from_checkpoint"] == str(out / "checkpoint-24")
    log = (project.run_dir() / "train.log").read_text()
    assert "Resuming from checkpoint checkpoint-24" in log
    progress = json.loads((project.run_dir() / "progress.json").read_text())
    assert progress["resumed_from_step"] == 24 and progress["status"] == "COMPLETE"
    assert (project.run_dir() / "t.safetensors").is_file()


# --- end to end, through the lorabuild command --------------------------------------------------------


def test_example_spec_renders_its_config(tmp_path: Path) -> None:
    (tmp_path / "specs").mkdir()
    shutil.copy(REPO / "specs" / "flux-simpletuner.yaml", tmp_path / "specs")
    shutil.copytree(EXAMPLE_DATA, tmp_path / "examples" / "shapes")

    def lorabuild(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "lorabuild", *args],
            cwd=tmp_path,
            env=lorabuild_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )

    spec = "specs/flux-simpletuner.yaml"
    assert (REPO / spec).read_text().startswith("# yaml-language-server: $schema=../schemas/training.schema.json\n")
    checked = lorabuild("validate", spec)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "flux1-dev was not found here" in checked.stdout  # only a warning: models live elsewhere
    model = make_model(tmp_path / "specs", "flux1-dev")  # Gate 2 needs the model on this machine
    checked = lorabuild("validate", spec)
    assert checked.returncode == 0 and "warning" not in checked.stdout, checked.stdout + checked.stderr
    done = lorabuild("run", spec, "--until", "config")
    assert done.returncode == 0, done.stdout + done.stderr
    run = tmp_path / "grimoire" / "training" / "shapes-flux"
    config = json.loads((run / "backend" / "config.json").read_text())
    assert config["model_family"] == "flux" and config["base_model_precision"] == "int8-quanto"
    assert config["pretrained_model_name_or_path"] == str(model)
    plan = json.loads((run / "plan.json").read_text())
    assert 50 <= plan["steps"]["total_steps"] <= 20000 and plan["estimates"]["fits"]


def test_lorabuild_run_with_the_standin_stops_only_at_the_missing_gpu(standin: tuple[Project, Path]) -> None:
    project, _ = standin
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has a GPU: Gate 3 would not stop here")
    done = project.lorabuild("run", "t.yaml", timeout=180)
    assert done.returncode == 1
    assert "Gate 2 — training config passed" in done.stdout + done.stderr
    record = json.loads((project.run_dir() / "environment.json").read_text())
    assert [c["name"] for c in record["checks"] if not c["ok"]] == ["gpu"]
    assert record["backend"]["entry_point"].endswith("simpletuner/train.py")


def test_module_imports_without_heavy_packages() -> None:
    code = (
        "import sys; import lorabuild.backends.simpletuner; "
        "print(sorted(m for m in ('torch', 'diffusers', 'accelerate', 'numpy') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=lorabuild_env(), check=True)
    assert done.stdout.strip() == "[]"


def test_steps_formula_matches_the_standin(standin: tuple[Project, Path]) -> None:
    project, _ = standin
    plan = context(project).plan
    # the stand-in counts as SimpleTuner does with one aspect bucket: ceil(pictures × (repeats+1) / batch)
    assert plan.steps.steps_per_epoch == math.ceil(len(plan.dataset.images) * plan.dataset.repeats / 2) == 12
    assert os.path.isabs(plan.backend.python)
