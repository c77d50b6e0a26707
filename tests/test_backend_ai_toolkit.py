"""The ai-toolkit backend: its job file, rules, command, log reading, checkpoints and resume.

ai-toolkit itself is not installed here, so the runs use a stand-in (tests/standins/ai_toolkit):
a fake checkout whose run.py replays ai-toolkit's real console lines and writes its real files,
and a fake venv whose `python` is this interpreter. Gate 3 needs an NVIDIA GPU for ai-toolkit,
so the full run is driven gate by gate; `lorabuild run` itself is shown to stop only there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from lorabuild import backends
from lorabuild.backends import Event
from lorabuild.backends import ai_toolkit as aitk
from lorabuild.gates import GateFailed, RunOptions
from lorabuild.gates import config as config_gate
from lorabuild.gates import dryrun as dryrun_gate
from lorabuild.gates import environment as environment_gate
from lorabuild.gates import train as train_gate
from lorabuild.pipeline import build_context
from lorabuild.plan import Plan, steps_for
from lorabuild.studio import GpuReport, Machine
from tests.conftest import EXAMPLE_DATA, REPO, Project, lorabuild_env

STANDIN = REPO / "tests" / "standins" / "ai_toolkit"
CPU = Machine("host", "Linux x86_64", 2, 32.0, GpuReport(problem="no NVIDIA GPU found"))
COMMIT = "27a03a91" + "5" * 32


# --- the stand-in installation ---------------------------------------------------------------------


def make_standin(root: Path) -> Path:
    """An ai-toolkit checkout with its venv, as its README's `git clone` + `pip install` leave it."""
    checkout = root / "ai-toolkit"
    (checkout / "toolkit").mkdir(parents=True)
    (checkout / "toolkit" / "job.py").write_text("# stand-in\n")
    shutil.copy(STANDIN / "run.py", checkout / "run.py")
    heads = checkout / ".git" / "refs" / "heads"
    heads.mkdir(parents=True)
    (checkout / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (heads / "main").write_text(COMMIT + "\n")
    venv = checkout / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    # a real venv of this interpreter: its own site-packages (python-dotenv, as run.py needs) + ours
    shutil.copy(Path(sys.prefix) / "pyvenv.cfg", venv / "pyvenv.cfg")
    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    (site / "dotenv").mkdir(parents=True)
    (site / "dotenv" / "__init__.py").write_text(
        '__version__ = "1.0.1"\n\n\ndef load_dotenv(*a, **k):\n    return False\n'
    )
    (site / "standin.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return checkout


def make_model(root: Path, name: str = "sd_xl_base_1.0.safetensors") -> Path:
    """A (tiny) single-file model, as far as lorabuild and the stand-in look at it."""
    import numpy as np
    from safetensors.numpy import save_file

    path = root / "models" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"conditioner.embedders.1.model.ln_final.weight": np.zeros(4, np.float16)}, str(path))
    return path


def scenario(checkout: Path, name: str) -> None:
    (checkout / "standin-scenario").write_text(name + "\n")


# 8 pictures × 5 repeats ÷ batch 2 = 20 steps per epoch; 3 epochs = 60 steps; a checkpoint per epoch
STANDIN_SPEC: dict[str, Any] = {
    "base_model": {"path": "models/sd_xl_base_1.0.safetensors", "family": "sdxl"},
    "backend": {"name": "ai-toolkit", "path": "ai-toolkit"},
    "dataset": {"repeats": 5},
    "training": {"epochs": 3, "batch_size": 2, "rank": 4, "alpha": 2, "learning_rate": 1e-4, "resolution": 1024},
    "checkpoints": {"every_n_epochs": 1, "keep_last": 1},
    "compute": {"target": "local", "gpu": "RTX 4090", "vram_gb": 24},
}


@pytest.fixture
def standin(bare_project: Project) -> tuple[Project, Path]:
    checkout = make_standin(bare_project.root)
    make_model(bare_project.root)
    bare_project.write_spec(**STANDIN_SPEC)
    return bare_project, checkout


def context(project: Project, spec: str = "t.yaml") -> Any:
    return build_context(project.root / spec, root=project.grimoire, options=RunOptions(yes=True), machine=CPU)


@pytest.fixture(autouse=True)
def fresh_reader() -> Iterator[None]:
    """Each test reads its own run (the module's reader keeps what it saw in a run)."""
    aitk._reader.reset()
    yield
    aitk._reader.reset()


# --- plans for the config matrix -------------------------------------------------------------------


@pytest.fixture(scope="module")
def family_plans(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Plan]:
    """One real plan per family, for an 80 GB GPU; variations are made with model_copy."""
    root = tmp_path_factory.mktemp("plans")
    project = Project(root, None)
    plans = {}
    for family in aitk.FAMILIES:
        project.write_spec(
            name=family,
            base_model={"path": f"models/{family}.safetensors", "family": family},
            backend={"name": "ai-toolkit", "path": "ai-toolkit"},
            dataset={"repeats": 10},
            training={"resolution": 512 if family == "sd15" else 1024, "rank": 16, "alpha": 8, "epochs": 4},
            checkpoints={"every_n_epochs": 2, "keep_last": 2},
            compute={"target": "local", "gpu": "H100", "vram_gb": 80},
        )
        plans[family] = context(project, spec=f"{family}.yaml").plan
    return plans


def vary(plan: Plan, **training: Any) -> Plan:
    return plan.model_copy(update={"training": plan.training.model_copy(update=training)})


def with_max_steps(plan: Plan, steps: int) -> Plan:
    t = plan.training
    plan = vary(plan, max_train_steps=steps)
    counted = steps_for(len(plan.dataset.images), plan.dataset.repeats, t.batch_size, t.gradient_accumulation, 1, steps)
    return plan.model_copy(update={"steps": counted})


def job_of(plan: Plan) -> dict[str, Any]:
    files = aitk.render_config(plan)
    assert sorted(files) == ["job.yaml"]
    job: dict[str, Any] = yaml.safe_load(files["job.yaml"])
    return job


def process_of(plan: Plan) -> dict[str, Any]:
    process: dict[str, Any] = job_of(plan)["config"]["process"][0]
    return process


KEYS: dict[str, Any] = json.loads(aitk.KEYS_FILE.read_text())


def problems_in(value: Any, spec: dict[str, Any], where: str) -> list[str]:
    """What is wrong with `value` against its entry in the key list (independent of the module)."""
    kind = spec["type"]
    if kind == "section":
        if not isinstance(value, dict):
            return [f"{where}: not a mapping"]
        section = KEYS["sections"][spec["section"]]
        found = [f"{where}.{k}: ai-toolkit has no such key" for k in value if k not in section]
        found += [f"{where}.{k}: required" for k, s in section.items() if s.get("required") and k not in value]
        for k, v in value.items():
            if k in section:
                found += problems_in(v, section[k], f"{where}.{k}")
        return found
    if kind == "list":
        if not isinstance(value, list):
            return [f"{where}: not a list"]
        return [p for i, item in enumerate(value) for p in problems_in(item, spec["items"], f"{where}[{i}]")]
    if kind == "dict":
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            return [f"{where}: not a mapping"]
        allowed = spec.get("keys")
        found = [f"{where}.{k}: no such key" for k in value if allowed is not None and k not in allowed]
        scalar = (str, int, float, bool)
        found += [f"{where}.{k}: not a plain value" for k, v in value.items() if not isinstance(v, scalar)]
        if allowed:
            for k, v in value.items():
                if k in allowed:
                    found += problems_in(v, allowed[k], f"{where}.{k}")
        return found
    if kind == "select":
        choices = spec.get("choices") or KEYS[spec["choices_from"]]
        return [] if value in choices else [f"{where}: {value!r} is not one of {choices}"]
    ok = {
        "str": isinstance(value, str),
        "path": isinstance(value, str) and os.path.isabs(value),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, float),
        "bool": isinstance(value, bool),
        "int_or_list": (isinstance(value, int) and not isinstance(value, bool))
        or (isinstance(value, list) and all(isinstance(v, int) for v in value)),
    }[kind]
    return [] if ok else [f"{where}: {value!r} is not a valid {kind}"]


def key_problems(job: dict[str, Any]) -> list[str]:
    return problems_in(job, {"type": "section", "section": "top"}, "job")


def named_leaves(value: dict[str, Any], section: str = "top") -> list[str]:
    """`section.key` of every setting in a job (the names config.md shows)."""
    names = []
    for key, item in value.items():
        spec = KEYS["sections"][section][key]
        if spec["type"] == "section":
            names += named_leaves(item, spec["section"])
        elif spec["type"] == "list" and spec["items"]["type"] == "section":
            names += [n for entry in item for n in named_leaves(entry, spec["items"]["section"])]
        else:
            names.append(key if section == "top" else f"{section}.{key}")
    return names


PRECISIONS = [("bf16", "bf16"), ("fp16", "fp16"), ("no", "fp32"), ("bf16", "fp8")]


@pytest.mark.parametrize("family", aitk.FAMILIES)
def test_every_emitted_key_is_accepted_with_its_type(family_plans: dict[str, Plan], family: str) -> None:
    base = family_plans[family]
    for optimizer in ("adamw", "adamw8bit", "lion", "prodigy", "adafactor"):
        for mixed, precision in PRECISIONS:
            if precision == "fp8" and family != "flux":
                continue
            for max_steps in (None, 123):
                plan = vary(
                    base,
                    optimizer=optimizer,
                    learning_rate=1.0 if optimizer == "prodigy" else 1e-4,
                    mixed_precision=mixed,
                    base_precision=precision,
                    optimizer_args={"weight_decay": 0.01, "betas_fixed": True} if optimizer == "adamw" else {},
                )
                if max_steps:
                    plan = with_max_steps(plan, max_steps)
                assert not aitk.check_plan(plan), aitk.check_plan(plan)
                job = job_of(plan)
                assert key_problems(job) == [], (optimizer, mixed, precision, max_steps)
                assert job["config"]["process"][0]["train"]["steps"] == (max_steps or plan.steps.total_steps)
    for scheduler, warmup in (("constant", 0), ("constant_with_warmup", 20), ("linear", 0), ("cosine", 0)):
        plan = vary(base, lr_scheduler=scheduler, lr_warmup_steps=warmup, train_text_encoder=True)
        assert key_problems(job_of(plan)) == [], scheduler
    sampled = base.model_copy(update={"samples": base.samples.model_copy(update={"prompts": ["a", "b"]})})
    assert key_problems(job_of(sampled)) == []
    assert key_problems(aitk.build_job(base, folder=Path("/tmp/x"), max_steps=5, batch_size=1)) == []


def test_the_key_list_has_the_optimizers_and_no_duplicates() -> None:
    assert set(aitk.OPTIMIZERS.values()) <= set(KEYS["optimizers"])
    assert set(aitk.SCHEDULERS.values()) <= set(KEYS["lr_schedulers"])
    for section in KEYS["sections"].values():
        for spec in section.values():
            assert spec["type"] in {"str", "path", "int", "float", "bool", "select", "int_or_list", "dict"} | {
                "section",
                "list",
            }


def test_every_emitted_key_is_explained(family_plans: dict[str, Plan]) -> None:
    sdxl, flux = family_plans["sdxl"], family_plans["flux"]
    sampled = sdxl.model_copy(update={"samples": sdxl.samples.model_copy(update={"prompts": ["a shapestyle cat"]})})
    for plan in (
        sdxl,
        flux,
        sampled,
        vary(sdxl, lr_scheduler="constant_with_warmup", lr_warmup_steps=10),
        vary(family_plans["pony"], lr_scheduler="linear"),
    ):
        lines = aitk.describe_config(plan)
        assert {line.key for line in lines if line.file == "job.yaml"} == set(named_leaves(job_of(plan)))
        assert all(line.meaning and "\n" not in line.meaning for line in lines)
        assert len({line.key for line in lines}) == len(lines)
    seed = [line for line in aitk.describe_config(sdxl) if line.key == "SEED"]
    assert seed and seed[0].value == str(sdxl.training.seed)


def test_the_gate_2_file_is_the_real_training_with_absolute_paths(family_plans: dict[str, Plan]) -> None:
    plan = family_plans["sdxl"]
    text = aitk.render_config(plan)["job.yaml"]
    assert text.startswith("# ai-toolkit job written by lorabuild")
    job = yaml.safe_load(text)
    process = job["config"]["process"][0]
    assert job["job"] == "extension" and job["config"]["name"] == plan.name and process["type"] == "sd_trainer"
    assert process["training_folder"] == str(Path(plan.run_dir) / "checkpoints")
    assert process["datasets"][0]["folder_path"] == plan.dataset.path and os.path.isabs(plan.dataset.path)
    assert process["model"] == {"name_or_path": plan.model.path, "arch": "sdxl", "is_xl": True, "quantize": False}
    # §4: every default that surprises is set
    network, train, save = process["network"], process["train"], process["save"]
    assert network == {"type": "lora", "linear": 16, "linear_alpha": 8.0, "dropout": 0.0}
    assert train["lr"] == plan.training.learning_rate and train["dtype"] == "bf16"
    assert train["noise_scheduler"] == "ddpm" and save["dtype"] == "float16"
    assert process["datasets"][0]["resolution"] == 1024 and process["datasets"][0]["caption_ext"] == "txt"
    assert train["disable_sampling"] is True and "sample" not in process  # no prompts in the spec
    assert "gradient_accumulation_steps" not in train and train["gradient_accumulation"] == 1
    assert job["meta"]["lorabuild_resume_key"] == plan.resume_key
    assert aitk.render_config(plan) == aitk.render_config(plan)  # pure


def test_steps_and_checkpoints_are_counted_in_steps(family_plans: dict[str, Plan]) -> None:
    plan = family_plans["sdxl"]  # 8 pictures × 10 repeats ÷ batch 2 = 40 steps per epoch, 4 epochs
    assert plan.steps.steps_per_epoch == 40 and plan.steps.total_steps == 160
    process = process_of(plan)
    assert process["train"]["steps"] == 160
    assert process["save"]["save_every"] == 80 and process["save"]["max_step_saves_to_keep"] == 2
    assert process["datasets"][0]["num_repeats"] == 10
    capped = with_max_steps(plan, 100)
    assert process_of(capped)["train"]["steps"] == 100
    # accumulation: ai-toolkit's step is one optimizer update over `gradient_accumulation` batches
    train = process_of(vary(plan, batch_size=1, gradient_accumulation=2))["train"]
    assert (train["batch_size"], train["gradient_accumulation"]) == (1, 2)


def test_sample_prompts_become_samples_in_steps(family_plans: dict[str, Plan]) -> None:
    plan = family_plans["flux"]
    samples = plan.samples.model_copy(update={"prompts": ["shapestyle, a cat"], "every_n_epochs": 2, "seed": 5})
    process = process_of(plan.model_copy(update={"samples": samples}))
    assert process["train"]["disable_sampling"] is False and process["train"]["skip_first_sample"] is True
    sample = process["sample"]
    assert sample["sample_every"] == 80 and sample["prompts"] == ["shapestyle, a cat"] and sample["seed"] == 5
    assert sample["sampler"] == process["train"]["noise_scheduler"] == "flowmatch"
    assert sample["neg"] == "" and sample["width"] == sample["height"] == 1024
    once = plan.model_copy(update={"samples": samples.model_copy(update={"every_n_epochs": None})})
    assert process_of(once)["sample"]["sample_every"] == plan.steps.total_steps  # only the final pictures


# --- one test per cross-field rule -----------------------------------------------------------------


def training_dict(plan: Plan, **changes: Any) -> dict[str, Any]:
    return {**plan.training.model_dump(), **changes}


def test_constant_schedule_has_no_warmup(family_plans: dict[str, Plan]) -> None:
    plan = family_plans["sdxl"]
    changes = aitk.adjust_settings(training_dict(plan, lr_scheduler="constant", lr_warmup_steps=50), on_cpu=False)
    assert [(s, v) for s, v, _ in changes] == [("lr_warmup_steps", 0)]
    assert "lr_scheduler_params" not in process_of(plan)["train"]


def test_warmup_length_is_always_written(family_plans: dict[str, Plan]) -> None:
    # left out, ai-toolkit's constant_with_warmup warms up for 1000 steps
    for warmup in (0, 25):
        train = process_of(vary(family_plans["sdxl"], lr_scheduler="constant_with_warmup", lr_warmup_steps=warmup))
        assert train["train"]["lr_scheduler_params"] == {"num_warmup_steps": warmup}


def test_linear_schedule_decays_to_zero(family_plans: dict[str, Plan]) -> None:
    train = process_of(vary(family_plans["sdxl"], lr_scheduler="linear"))["train"]
    assert train["lr_scheduler"] == "linear"
    assert train["lr_scheduler_params"] == {"start_factor": 1.0, "end_factor": 0.0}


def test_warmup_before_a_decaying_schedule_is_for_the_artist_to_choose(family_plans: dict[str, Plan]) -> None:
    for scheduler in ("linear", "cosine"):
        issues = aitk.check_plan(vary(family_plans["sdxl"], lr_scheduler=scheduler, lr_warmup_steps=30))
        assert [i.field for i in issues] == [("training", "lr_warmup_steps")]
        assert "constant_with_warmup" in issues[0].fix


def test_base_model_follows_the_training_precision(family_plans: dict[str, Plan]) -> None:
    plan = family_plans["sdxl"]
    changes = aitk.adjust_settings(training_dict(plan, mixed_precision="fp16", base_precision="bf16"), on_cpu=False)
    assert [(s, v) for s, v, _ in changes] == [("base_precision", "fp16")]
    assert not aitk.adjust_settings(training_dict(plan, base_precision="fp8"), on_cpu=False)
    quantised = process_of(vary(family_plans["flux"], base_precision="fp8"))["model"]
    assert quantised["quantize"] is True and quantised["qtype"] == quantised["qtype_te"] == "qfloat8"
    assert process_of(vary(family_plans["flux"], base_precision="bf16"))["model"]["quantize"] is False


def test_precisions_ai_toolkit_cannot_keep(family_plans: dict[str, Plan]) -> None:
    nf4 = aitk.check_plan(vary(family_plans["flux"], base_precision="nf4"))
    assert [i.field for i in nf4] == [("training", "base_precision")] and "4-bit" in nf4[0].message
    fp8 = aitk.check_plan(vary(family_plans["sdxl"], base_precision="fp8"))
    assert [i.field for i in fp8] == [("training", "base_precision")] and "only Flux" in fp8[0].message


def test_caption_reader_output_is_not_cached_when_it_changes(family_plans: dict[str, Plan]) -> None:
    plan = family_plans["sdxl"]
    for change in ({"train_text_encoder": True}, {"shuffle_caption": True}):
        changes = aitk.adjust_settings(training_dict(plan, cache_text_encoder_outputs=True, **change), on_cpu=False)
        assert [(s, v) for s, v, _ in changes] == [("cache_text_encoder_outputs", False)]
    process = process_of(plan)
    assert process["train"]["cache_text_embeddings"] is process["datasets"][0]["cache_text_embeddings"] is True


def test_flux_trains_with_flow_matching(family_plans: dict[str, Plan]) -> None:
    process = process_of(family_plans["flux"])
    assert process["train"]["noise_scheduler"] == "flowmatch" and process["model"]["arch"] == "flux"
    assert process["model"]["is_flux"] is True and process["save"]["save_format"] == "diffusers"
    assert "min_snr_gamma" not in process["train"]
    issues = aitk.check_plan(vary(family_plans["flux"], min_snr_gamma=5.0))
    assert [i.field for i in issues] == [("training", "min_snr_gamma")]
    assert process_of(vary(family_plans["sdxl"], min_snr_gamma=5.0))["train"]["min_snr_gamma"] == 5.0


def test_sd15_and_pony_architectures(family_plans: dict[str, Plan]) -> None:
    sd15 = process_of(family_plans["sd15"])["model"]
    assert sd15["arch"] == "sd1" and "is_xl" not in sd15
    pony = process_of(family_plans["pony"])["model"]
    assert pony["arch"] == "sdxl" and pony["is_xl"] is True


def test_plans_ai_toolkit_cannot_run(family_plans: dict[str, Plan]) -> None:
    plan = family_plans["sdxl"]
    bmp = plan.model_copy(update={"dataset": plan.dataset.model_copy(update={"images": ["a.png", "b.bmp"]})})
    assert [i.message for i in aitk.check_plan(bmp)] == [
        "ai-toolkit reads only .jpg, .jpeg, .png and .webp pictures, so it would skip b.bmp"
    ]
    vae = plan.model_copy(update={"model": plan.model.model_copy(update={"vae": "/models/vae.safetensors"})})
    assert [i.field for i in aitk.check_plan(vae)] == [("base_model", "vae")]
    folder = plan.model_copy(update={"model": plan.model.model_copy(update={"kind": "folder"})})
    assert [i.field for i in aitk.check_plan(folder)] == [("base_model", "path")]
    dollar = plan.model_copy(update={"dataset": plan.dataset.model_copy(update={"path": "/data/${HOME}"})})
    assert [i.field for i in aitk.check_plan(dollar)] == [("dataset", "path")]
    two = plan.model_copy(update={"compute": plan.compute.model_copy(update={"gpu_count": 2})})
    assert [i.field for i in aitk.check_plan(two)] == [("compute", "gpu_count")]
    remote = plan.model_copy(update={"compute": plan.compute.model_copy(update={"target": "runpod"})})
    assert "unavailable" not in [i.kind for i in aitk.check_plan(remote)]  # targets are not a backend's business
    other = plan.model_copy(update={"model": plan.model.model_copy(update={"family": "sd3"})})
    issues = aitk.check_plan(other)
    assert issues[0].field == ("base_model", "family") and "ai-toolkit cannot train sd3" in issues[0].message
    assert not aitk.check_plan(plan)


def test_settings_it_does_not_take_are_reported(bare_project: Project) -> None:
    bare_project.write_spec(
        base_model={"path": "model.safetensors", "family": "sdxl"},
        backend={"name": "ai-toolkit", "path": "ai-toolkit"},
        dataset={"repeats": 10},
        training={"clip_skip": 2, "lr_scheduler": "constant", "lr_warmup_steps": 10, "resolution": 1024},
        compute={"target": "local", "gpu": "RTX 4090", "vram_gb": 24},
    )
    plan = context(bare_project).plan
    assert [i.message for i in plan.problems] == ["the ai-toolkit backend does not use `clip_skip`"]
    assert plan.training.lr_warmup_steps == 0 and plan.sources["training.lr_warmup_steps"] == (
        "set by the ai-toolkit backend"
    )
    assert any("no warm-up in ai-toolkit" in note for note in plan.adjustments)
    assert set(aitk.settings(plan)) <= set(plan.training.model_dump())


# --- launching -------------------------------------------------------------------------------------


def test_launch_runs_run_py_with_an_absolute_job(standin: tuple[Project, Path]) -> None:
    project, checkout = standin
    plan = context(project).plan
    run = project.run_dir()
    launch = aitk.launch(plan, run / "backend", run / "checkpoints")
    python = checkout / "venv" / "bin" / "python"
    assert launch.argv == [str(python), str(checkout / "run.py"), str(run / "backend" / "job.yaml")]
    assert launch.cwd == checkout.resolve() and launch.files == {}  # Gate 2's file is the long run
    assert launch.env["PYTHONUNBUFFERED"] == "1" and launch.env["SEED"] == str(plan.training.seed)
    assert all(isinstance(a, str) for a in launch.argv)


def test_dry_run_and_out_of_memory_variants(standin: tuple[Project, Path], tmp_path: Path) -> None:
    project, _ = standin
    plan = context(project).plan
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    launch = aitk.launch(plan, project.run_dir() / "backend", scratch, max_steps=5, resume=False)
    assert launch.argv[-1] == str(scratch.resolve() / "job.yaml")
    job = yaml.safe_load(launch.files[scratch.resolve() / "job.yaml"])
    process = job["config"]["process"][0]
    assert process["training_folder"] == str(scratch.resolve())  # a fresh folder: nothing to resume
    assert process["train"]["steps"] == 5 and process["train"]["disable_sampling"] is True
    assert process["save"]["save_every"] == 5 and process["save"]["max_step_saves_to_keep"] == 1
    assert key_problems(job) == []

    retry = aitk.launch(
        plan, project.run_dir() / "backend", scratch, max_steps=5, batch_size=1, gradient_accumulation=2
    )
    train = yaml.safe_load(next(iter(retry.files.values())))["config"]["process"][0]["train"]
    assert (train["batch_size"], train["gradient_accumulation"]) == (1, 2)

    elsewhere = aitk.launch(plan, project.run_dir() / "backend", tmp_path / "other")
    job = yaml.safe_load(elsewhere.files[(tmp_path / "other").resolve() / "job.yaml"])
    assert job["config"]["process"][0]["training_folder"] == str((tmp_path / "other").resolve())
    assert job["config"]["process"][0]["train"]["steps"] == plan.steps.total_steps


def write_save(path: Path, step: int, *, resume_key: str | None = None, cut: bool = False) -> Path:
    import numpy as np
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"training_info": json.dumps({"step": step, "epoch": 0})}
    if resume_key:
        meta["lorabuild_resume_key"] = resume_key
    save_file({"w": np.ones((16, 16), np.float32)}, str(path), metadata=meta)
    if cut:
        path.write_bytes(path.read_bytes()[:-100])  # killed while writing
    return path


def test_resume_needs_no_argument_but_a_cut_save_is_moved_away(standin: tuple[Project, Path]) -> None:
    project, _ = standin
    plan = context(project).plan
    out = project.run_dir() / "checkpoints"
    root = out / plan.name
    write_save(root / "t_000000020.safetensors", 20)
    cut = write_save(root / "t_000000040.safetensors", 40, cut=True)
    launch = aitk.launch(plan, project.run_dir() / "backend", out)
    assert launch.argv[-1].endswith("backend/job.yaml")  # ai-toolkit finds its newest save itself
    assert not cut.exists() and (out / aitk.INCOMPLETE_FOLDER / cut.name).is_file()
    assert [c.step for c in aitk.checkpoints(plan, out)] == [20]
    with pytest.raises(ValueError, match="always continues from the saves"):
        aitk.launch(plan, project.run_dir() / "backend", out, resume=False)


# --- reading its output ----------------------------------------------------------------------------

REAL_BAR = "my_lora_v1:  17%|#7   | 340/2000 [11:20<55:20,  2.00s/it, lr: 1.0e-04 loss: 3.9e-01]"


def feed(lines: list[str]) -> list[Event]:
    return [event for line in lines for event in aitk.parse_log_line(line)]


def test_the_progress_bar_is_a_step() -> None:
    [event] = aitk.parse_log_line(REAL_BAR)
    # the bar stands at the index of the step just done, counted from 0
    assert event == Event("step", {"step": 341, "total_steps": 2000, "loss": 0.39, "lr": 1e-4, "step_seconds": 2.0})
    fast = aitk.parse_log_line("style:  50%|#####     | 300/600 [02:00<02:00,  2.50it/s, lr: 6.3e-05 loss: 1.234e-01]")
    assert fast[0].data["step_seconds"] == 0.4 and fast[0].data["loss"] == 0.1234
    last = aitk.parse_log_line("style: 100%|##########| 600/600 [04:00<00:00,  2.50it/s, lr: 0.0e+00 loss: 1.1e-01]")
    assert last[0].data["step"] == 600  # never past the end
    # not steps: the bar before the first step, and the sample pictures' bars
    assert aitk.parse_log_line("my_lora_v1:   0%|          | 0/2000 [00:00<?, ?it/s]") == []
    assert aitk.parse_log_line("Generating Images:  50%|#####     | 1/2 [00:01<00:01,  1.02s/it]") == []


def test_start_up_save_and_resume_lines() -> None:
    root = "/runs/t/checkpoints/my_lora_v1"
    events = feed(
        [
            "Running 1 job",
            "Dataset: /data/shapes",
            "-  Preprocessing image dimensions",
            "-  Found 8 images",
            f"#### IMPORTANT RESUMING FROM {root}/my_lora_v1_000000250.safetensors ####",
            f"Loading from {root}/my_lora_v1_000000250.safetensors",
            "Found step 250 in metadata, starting from there",
            f"Loading optimizer state from {root}/optimizer.pt",
            "Skipping first sample due to config setting",
            "Saving at step 500",
            f"Saved checkpoint to {root}/my_lora_v1_000000500.safetensors",
            f"Saved optimizer to {root}/optimizer.pt",
            f"Removing old save: {root}/my_lora_v1_000000250.safetensors",
            f"Saved checkpoint to {root}/my_lora_v1.safetensors",
            "========================================",
            "Result:",
            "- 1 completed job",
        ]
    )
    assert [(e.kind, e.data) for e in events] == [
        ("dataset", {"images": 8}),
        ("resumed", {"step": 250}),
        ("model_loaded", {}),
        ("checkpoint", {"path": f"{root}/my_lora_v1_000000500.safetensors", "step": 500}),
        ("checkpoint_removed", {"path": f"{root}/my_lora_v1_000000250.safetensors"}),
        ("saved", {"path": f"{root}/my_lora_v1.safetensors"}),
        ("done", {}),
    ]


def test_a_save_line_carries_the_epoch_ai_toolkit_wrote(tmp_path: Path) -> None:
    path = write_save(tmp_path / "t" / "t_000000040.safetensors", 40)
    meta = json.dumps({"step": 40, "epoch": 2})
    from safetensors.numpy import load_file, save_file

    save_file(load_file(str(path)), str(path), metadata={"training_info": meta})
    [event] = aitk.parse_log_line(f"Saved checkpoint to {path}")
    assert event == Event("checkpoint", {"path": str(path), "step": 40, "epoch": 2})


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        ("Error running job: no images found in /data/shapes", "dataset"),
        ("Error running job: OOM during training step 3 times in a row, aborting training", "oom"),
        ("Error running job: CUDA out of memory. Tried to allocate 20.00 MiB", "oom"),
        ("Error running job: CUDA error: out of memory", "oom"),
        ("Error running job: name_or_path must be specified", "model_load"),
        (
            "Error running job: 401 Client Error. Cannot access gated repo for url "
            "https://huggingface.co/black-forest-labs/FLUX.1-dev/resolve/main/model_index.json.",
            "model_load",
        ),
        ("Error running job: [Errno 2] No such file or directory: '/models/sdxl.safetensors'", "model_load"),
        ("Error running job: Unknown optimizer type adamw9bit", "config"),
        ("Error running job: gradient_accumulation and gradient_accumulation_steps are mutually exclusive", "config"),
        ("Error running job: Environment variable HF_TOKEN not set. Please set it in your .env file", "config"),
        ("Error running job: CUDA error: no kernel image is available for execution on the device", "cuda"),
        ("Error running job: 'utf-8' codec can't decode byte 0xff in position 0: invalid start byte", "caption"),
        ("Error running job: No module named 'prodigyopt'", "not_installed"),
        ("Error running job: something nobody expected", "internal"),
        ("ModuleNotFoundError: No module named 'dotenv'", "not_installed"),
        ("Job stopped", "interrupted"),
    ],
)
def test_failure_lines_are_errors_of_their_kind(line: str, kind: str) -> None:
    [event] = aitk.parse_log_line(line)
    assert event.kind == "error" and event.data["kind"] == kind
    assert event.data["message"]


def test_a_traceback_repeating_the_job_error_is_not_a_second_error() -> None:
    events = feed(
        ["Error running job: No module named 'prodigyopt'", "ModuleNotFoundError: No module named 'prodigyopt'"]
    )
    assert [e.data["kind"] for e in events] == ["not_installed"]
    assert feed(["- 0 completed jobs", "- 1 failure"]) == []


def test_only_the_first_nan_of_a_run_is_an_error() -> None:
    events = feed(["Running 1 job", "loss is nan", REAL_BAR.replace("3.9e-01", "0.000e+00"), "loss is nan"])
    assert [(e.kind, e.data.get("kind")) for e in events] == [("error", "nan"), ("step", None)]
    bad = aitk.parse_log_line("Running 1 job") + aitk.parse_log_line(REAL_BAR.replace("3.9e-01", "nan"))
    assert [e.kind for e in bad] == ["step", "error"] and bad[1].data["kind"] == "nan"


def test_a_line_printed_after_the_bar_is_read_too() -> None:
    events = feed([REAL_BAR + "Error running job: no images found in /data", REAL_BAR + "loss is nan"])
    assert [(e.kind, e.data.get("kind")) for e in events] == [
        ("step", None),
        ("error", "dataset"),
        ("step", None),
        ("error", "nan"),
    ]


def test_a_completed_job_without_its_lora_is_an_error() -> None:
    events = feed(["Running 1 job", "- 1 completed job"])
    assert [e.data.get("kind") for e in events] == ["internal"]


def test_warnings() -> None:
    [skip] = aitk.parse_log_line("# OOM during training step, skipping batch 1/3 #")
    assert skip.kind == "warning" and skip.data["kind"] == "oom" and "skipped" in skip.data["message"]
    [note] = aitk.parse_log_line("WARNING: num_warmup_steps not in kwargs. Using default value of 1000")
    assert note == Event("warning", {"message": "num_warmup_steps not in kwargs. Using default value of 1000"})


def test_out_of_memory_text(family_plans: dict[str, Plan], tmp_path: Path) -> None:
    assert aitk.is_out_of_memory("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    assert aitk.is_out_of_memory("RuntimeError: OOM during training step 3 times in a row, aborting training")
    assert not aitk.is_out_of_memory("# OOM during training step, skipping batch 1/3 #")  # only a warning
    assert aitk.metrics_files(family_plans["sdxl"], tmp_path) == []


# --- outputs ---------------------------------------------------------------------------------------


def test_checkpoints_are_complete_ones_oldest_first(family_plans: dict[str, Plan], tmp_path: Path) -> None:
    plan = family_plans["sdxl"].model_copy(update={"name": "t"})
    root = tmp_path / "t"
    write_save(root / "t_000000160.safetensors", 160, resume_key="abc")
    write_save(root / "t_000000080.safetensors", 80)
    write_save(root / "t_000000120.safetensors", 120, cut=True)
    write_save(root / "t.safetensors", 200)  # the final LoRA is not a checkpoint
    (root / "optimizer.pt").write_bytes(b"x")
    found = aitk.checkpoints(plan, tmp_path)
    assert [(c.step, c.epoch, c.resume_key) for c in found] == [(80, 2, None), (160, 4, "abc")]
    assert found[0].lora == found[0].path == root / "t_000000080.safetensors"
    assert aitk.final_lora(plan, tmp_path) == root / "t.safetensors"


def test_prune_keeps_the_newest_and_clears_cut_saves(family_plans: dict[str, Plan], tmp_path: Path) -> None:
    plan = family_plans["sdxl"].model_copy(update={"name": "t"})  # keep_last 2
    root = tmp_path / "t"
    for step in (40, 80, 120):
        write_save(root / f"t_{step:09d}.safetensors", step)
    write_save(root / "t_000000160.safetensors", 160, cut=True)
    write_save(tmp_path / aitk.INCOMPLETE_FOLDER / "t_000000020.safetensors", 20, cut=True)
    removed = aitk.prune_checkpoints(plan, tmp_path)
    names = ["t_000000020.safetensors", "t_000000040.safetensors", "t_000000160.safetensors"]
    assert sorted(p.name for p in removed) == names
    assert [c.step for c in aitk.checkpoints(plan, tmp_path)] == [80, 120]
    assert not (tmp_path / aitk.INCOMPLETE_FOLDER).exists()


# --- installation ----------------------------------------------------------------------------------


def test_installation_finds_the_checkout_and_its_commit(standin: tuple[Project, Path], tmp_path: Path) -> None:
    project, checkout = standin
    plan = context(project).plan
    found = aitk.installation(plan)
    assert found.ok and found.version == COMMIT[:8] and found.entry_point == str(checkout / "run.py")
    assert found.message == f"ai-toolkit (commit 27a03a91) at {checkout}"
    # packed refs (after `git gc`)
    (checkout / ".git" / "refs" / "heads" / "main").unlink()
    (checkout / ".git" / "packed-refs").write_text(f"# pack-refs\n{'a' * 40} refs/heads/main\n")
    assert aitk.installation(plan).version == "a" * 8

    def at(path: str | None) -> Plan:
        return plan.model_copy(update={"backend": plan.backend.model_copy(update={"path": path})})

    missing = aitk.installation(at(str(tmp_path / "nowhere")))
    assert not missing.ok and "was not found" in missing.message and "git clone" in missing.fix
    (tmp_path / "empty").mkdir()
    assert "not an ai-toolkit checkout" in aitk.installation(at(str(tmp_path / "empty"))).message
    unset = aitk.installation(at(None))
    assert not unset.ok and "backend.path" in unset.message
    assert aitk.probe_command(plan)[3:] == list(aitk.BASE_MODULES)
    assert aitk.probe_command(vary(plan, optimizer="adamw8bit"))[-1] == "bitsandbytes"


# --- through the gates, with the stand-in ----------------------------------------------------------


def test_full_run_through_the_gates(standin: tuple[Project, Path]) -> None:
    """Gates 2, 4 and 10 against the stand-in; Gate 3 passes everything but the missing GPU."""
    project, checkout = standin
    ctx = context(project)
    assert not ctx.plan.problems, ctx.plan.problems
    assert ctx.plan.backend.python == str(checkout / "venv" / "bin" / "python")
    config_gate.run(ctx)
    run = project.run_dir()
    assert sorted(p.name for p in (run / "backend").iterdir()) == ["job.yaml"]
    assert key_problems(yaml.safe_load((run / "backend" / "job.yaml").read_text())) == []

    checks, record = environment_gate.check_environment(ctx.plan, ctx.machine.gpus, project.grimoire)
    assert [c.name for c in checks if not c.ok] == ["gpu"]  # this machine has no NVIDIA GPU
    assert record["backend"]["version"] == COMMIT[:8]
    assert record["backend"]["probe"]["modules"]["dotenv"] == "1.0.1"

    dryrun_gate.run(ctx)
    ok = json.loads((run / "dryrun.ok").read_text())
    assert ok["steps"] == 5 and ok["images"] == 8
    assert not list(run.glob(".dryrun-*"))

    train_gate.run(ctx)
    from safetensors.numpy import load_file

    assert set(load_file(str(run / "t.safetensors"))) == {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight",
    }
    assert not aitk.final_lora(ctx.plan, run / "checkpoints").exists()  # moved: never a resume candidate
    progress = json.loads((run / "progress.json").read_text())
    assert progress["status"] == "COMPLETE" and progress["step"] == 60 and progress["total_steps"] == 60
    assert progress["checkpoints"] == ["t_000000040.safetensors"]  # ai-toolkit removed step 20 (keep 1)
    assert [c.step for c in aitk.checkpoints(ctx.plan, run / "checkpoints")] == [40]
    log = (run / "train.log").read_bytes()
    assert b"Removing old save:" in log and b"- 1 completed job" in log and b"\r" in log  # tqdm's redraws
    # ai-toolkit's side effects in the dataset folder do not change what lorabuild planned with
    assert (project.dataset / ".aitk_size.json").is_file() and (project.dataset / "_latent_cache").is_dir()
    assert context(project).plan.dataset == ctx.plan.dataset


@pytest.mark.parametrize(
    ("name", "kind", "said"),
    [
        ("oom", "oom", "ran out of memory"),
        ("nan", "nan", "NaN"),
        ("nodata", "dataset", "dataset could not be read"),
        ("crash", "internal", "stand-in: an internal error in the trainer"),
        ("stopped", "interrupted", "ai-toolkit was stopped before it finished"),
        ("silent", "internal", "never saved the finished LoRA"),
    ],
)
def test_failed_runs_fail_the_train_gate(standin: tuple[Project, Path], name: str, kind: str, said: str) -> None:
    """The train gate's rule — exit 0, no error event and the final file — catches every one."""
    project, checkout = standin
    ctx = context(project)
    config_gate.run(ctx)
    scenario(checkout, name)
    seen: list[Event] = []
    real = aitk.parse_log_line

    def spy(line: str) -> list[Event]:
        events = real(line)
        seen.extend(events)
        return events

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(aitk, "parse_log_line", spy)
        with pytest.raises(GateFailed) as failed:
            train_gate.run(ctx)
    # a NaN loss is stopped by lorabuild's monitor (ai-toolkit would train on with the loss set to 0)
    assert failed.value.message.startswith("Training stopped" if kind == "nan" else "Training failed")
    assert said in failed.value.render(), failed.value.render()
    assert [e.data["kind"] for e in seen if e.kind == "error"][:1] == [kind]
    assert not (project.run_dir() / "t.safetensors").exists()
    progress = json.loads((project.run_dir() / "progress.json").read_text())
    assert progress["status"] == "FAILED"


def test_dry_run_retries_out_of_memory_at_half_the_batch(standin: tuple[Project, Path]) -> None:
    project, checkout = standin
    scenario(checkout, "oom_above_batch_1")
    ctx = context(project)
    config_gate.run(ctx)
    dryrun_gate.run(ctx)
    ok = json.loads((project.run_dir() / "dryrun.ok").read_text())
    assert (ok["batch_size"], ok["gradient_accumulation"]) == (1, 2)
    assert "Hit memory limit" in (project.run_dir() / "dryrun.log").read_text()


def test_a_stopped_training_resumes_from_its_newest_save(standin: tuple[Project, Path]) -> None:
    project, checkout = standin
    ctx = context(project)
    config_gate.run(ctx)
    scenario(checkout, "crash_after_save")
    with pytest.raises(GateFailed):
        train_gate.run(ctx)
    out = project.run_dir() / "checkpoints"
    assert [c.step for c in aitk.checkpoints(ctx.plan, out)] == [20]
    argv = aitk.launch(ctx.plan, project.run_dir() / "backend", out).argv

    scenario(checkout, "normal")
    train_gate.run(ctx)
    assert aitk.launch(ctx.plan, project.run_dir() / "backend", out).argv == argv  # resuming takes no argument
    progress = json.loads((project.run_dir() / "progress.json").read_text())
    assert progress["status"] == "COMPLETE" and progress["resumed_from_step"] == 20
    log = (project.run_dir() / "train.log").read_text()
    assert f"#### IMPORTANT RESUMING FROM {out / 't' / 't_000000020.safetensors'} ####" in log
    assert "Found step 20 in metadata, starting from there" in log and "Loading optimizer state from" in log


# --- end to end through lorabuild itself -----------------------------------------------------------


def test_example_spec_validates_and_renders_its_config(tmp_path: Path) -> None:
    (tmp_path / "specs").mkdir()
    shutil.copy(REPO / "specs" / "style-aitoolkit.yaml", tmp_path / "specs")
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

    spec = "specs/style-aitoolkit.yaml"
    assert (REPO / spec).read_text().startswith("# yaml-language-server: $schema=../schemas/training.schema.json\n")
    checked = lorabuild("validate", spec)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "sd_xl_base_1.0.safetensors was not found here" in checked.stdout  # only a warning
    done = lorabuild("run", spec, "--until", "config")
    assert done.returncode == 0, done.stdout + done.stderr
    run = tmp_path / "grimoire" / "training" / "style-aitoolkit"
    job = yaml.safe_load((run / "backend" / "job.yaml").read_text())
    assert key_problems(job) == []
    process = job["config"]["process"][0]
    assert process["model"]["name_or_path"] == str(tmp_path / "specs" / "models" / "sd_xl_base_1.0.safetensors")
    assert process["train"]["optimizer"] == "adamw8bit" and process["sample"]["sample_every"] == 200
    plan = json.loads((run / "plan.json").read_text())
    assert 50 <= plan["steps"]["total_steps"] <= 20000 and plan["estimates"]["fits"]
    # planned for the declared RTX 4090 although this machine has no GPU
    assert plan["device"]["kind"] == "gpu" and plan["device"]["memory_gb"] == 24


def test_lorabuild_run_with_the_standin_stops_only_at_the_missing_gpu(standin: tuple[Project, Path]) -> None:
    project, _ = standin
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has a GPU: Gate 3 would not stop here")
    done = project.lorabuild("run", "t.yaml", timeout=180)
    assert done.returncode == 1
    assert "Gate 2 — training config passed" in done.stdout + done.stderr
    assert "needs an NVIDIA GPU" in done.stdout + done.stderr
    record = json.loads((project.run_dir() / "environment.json").read_text())
    assert [c["name"] for c in record["checks"] if not c["ok"]] == ["gpu"]
    assert record["backend"]["entry_point"].endswith("ai-toolkit/run.py")


def test_module_imports_without_heavy_packages() -> None:
    code = (
        "import sys; import lorabuild.backends.ai_toolkit; "
        "print(sorted(m for m in ('torch', 'diffusers', 'accelerate', 'numpy', 'safetensors') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=lorabuild_env(), check=True)
    assert done.stdout.strip() == "[]"


def test_the_dispatcher_finds_the_module(family_plans: dict[str, Plan]) -> None:
    assert "ai-toolkit" in backends.IMPLEMENTED and backends.families("ai-toolkit") == aitk.FAMILIES
    assert "ai-toolkit" in backends.supporting("flux")


def test_sample_pictures_are_collected_into_the_run_folder(standin: tuple[Project, Path]) -> None:
    project, _checkout = standin
    project.write_spec(**{**STANDIN_SPEC, "samples": {"prompts": ["a red square", "a blue circle"]}})
    ctx = context(project)
    config_gate.run(ctx)
    train_gate.run(ctx)
    every = yaml.safe_load((project.run_dir() / "backend" / "job.yaml").read_text())["config"]["process"][0]["sample"][
        "sample_every"
    ]
    steps = ctx.plan.steps.total_steps
    # ai-toolkit's own names (<ms>__<step:09d>_<idx>.jpg) become step-NNNNNNNNN-K.jpg; the last at the end
    expected = sorted({f"step-{s:09d}-{k}.jpg" for s in [*range(every, steps, every), steps] for k in (1, 2)})
    assert sorted(p.name for p in ctx.run.samples.iterdir()) == expected
