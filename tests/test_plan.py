"""The plan: defaults and where they came from, steps, safe ranges, memory fitting, per-gate inputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lorabuild.dataset import list_dataset
from lorabuild.plan import Plan, make_plan, steps_for
from lorabuild.spec import load_spec
from lorabuild.studio import Gpu, GpuReport, Machine
from tests.conftest import Project

CPU = Machine("host", "Linux x86_64", 2, 16.0, GpuReport(problem="no NVIDIA GPU found"))


def gpu_machine(name: str = "NVIDIA GeForce RTX 4090", gb: float = 24.0) -> Machine:
    return Machine("host", "Linux x86_64", 16, 64.0, GpuReport((Gpu(0, name, gb, gb, (8, 9)),), "570.86.15", "12.8"))


def plan_for(project: Project, machine: Machine = CPU, **sections: object) -> Plan:
    loaded = load_spec(project.write_spec(**sections))
    dataset = list_dataset(project.dataset, ".txt")
    return make_plan(loaded, machine, dataset, None, grimoire=project.grimoire)


def test_defaults_come_from_spec_preset_demo_and_general_in_that_order(bare_project: Project) -> None:
    plan = plan_for(bare_project, preset="thorough", training={"epochs": None, "rank": 8})
    assert plan.training.epochs == 25 and plan.sources["training.epochs"] == "preset thorough"
    assert plan.training.rank == 8 and plan.sources["training.rank"] == "spec"
    assert plan.training.resolution == 64 and plan.sources["training.resolution"] == "demo model tiny-sd"
    assert plan.training.lr_scheduler == "constant" and plan.sources["training.lr_scheduler"] == "lorabuild default"
    assert plan.checkpoints.every_n_epochs == 1 and plan.sources["checkpoints.every_n_epochs"] == "spec"


def test_family_and_optimizer_defaults_for_a_real_model(bare_project: Project) -> None:
    (bare_project.root / "sdxl").mkdir()
    plan = plan_for(
        bare_project,
        gpu_machine(),
        base_model={"path": "sdxl", "family": "sdxl"},
        training={"optimizer": "prodigy", "learning_rate": None, "rank": None, "alpha": None, "epochs": None},
        preset="standard",
        dataset={"repeats": 10},
    )
    assert plan.training.resolution == 1024 and plan.sources["training.resolution"] == "sdxl default"
    assert plan.training.learning_rate == 1.0 and plan.sources["training.learning_rate"] == "optimizer prodigy"
    assert plan.training.epochs == 15
    assert plan.training.gradient_checkpointing is True


def test_steps_follow_the_shared_formula() -> None:
    s = steps_for(images=9, repeats=3, batch_size=2, accumulation=2, epochs=4, max_steps=None)
    assert (s.samples_per_epoch, s.steps_per_epoch, s.total_steps, s.effective_batch) == (27, 7, 28, 4)
    capped = steps_for(images=9, repeats=3, batch_size=2, accumulation=2, epochs=4, max_steps=10)
    assert (capped.total_steps, capped.epochs) == (10, 2)
    # halving the batch and doubling accumulation keeps the optimizer steps (OOM recovery relies on it)
    for samples in range(1, 40):
        a = steps_for(samples, 1, 4, 1, 1, None).steps_per_epoch
        b = steps_for(samples, 1, 2, 2, 1, None).steps_per_epoch
        assert a == b


def test_processor_runs_use_full_precision_and_say_so(bare_project: Project) -> None:
    plan = plan_for(bare_project, training={"mixed_precision": "bf16"})
    assert plan.training.mixed_precision == "no"
    assert any("mixed precision bf16" in a for a in plan.adjustments)
    assert plan.device.kind == "cpu" and "RAM" in plan.device.source


@pytest.mark.parametrize(
    ("training", "field", "words"),
    [
        ({"learning_rate": 0.01}, "learning_rate", "safe range 1e-06 to 0.001"),
        ({"optimizer": "prodigy", "learning_rate": 1e-4}, "learning_rate", "Prodigy finds its own step size"),
        ({"resolution": 96}, "resolution", "not a multiple of 64"),
        ({"rank": 64}, "rank", "rank 32 already covers them"),
        ({"alpha": 20}, "alpha", "above 2× rank"),
        ({"batch_size": 32}, "batch_size", "larger batches"),
    ],
)
def test_out_of_range_values_are_issues_with_range_and_reason(
    bare_project: Project, training: dict[str, object], field: str, words: str
) -> None:
    plan = plan_for(bare_project, training=training)
    issues = [i for i in plan.problems if i.field == ("training", field)]
    assert issues, plan.problems
    assert words in issues[0].message + issues[0].fix


def test_too_few_steps_is_an_issue_for_real_models(bare_project: Project) -> None:
    (bare_project.root / "sd").mkdir()
    plan = plan_for(
        bare_project,
        gpu_machine(),
        base_model={"path": "sd", "family": "sd15"},
        training={"epochs": 1, "learning_rate": 1e-4, "rank": 16, "alpha": 8},
    )
    assert any("total steps" in i.message and "under 50 steps" in i.fix for i in plan.problems)


def test_builtin_refuses_what_it_cannot_do(bare_project: Project) -> None:
    (bare_project.root / "flux.safetensors").write_bytes(b"x")
    plan = plan_for(
        bare_project,
        gpu_machine(),
        base_model={"path": "flux.safetensors", "family": "flux"},
        training={"optimizer": "adamw8bit", "clip_skip": 2},
    )
    messages = " ".join(i.message + " " + i.fix for i in plan.problems)
    assert "cannot train flux models" in messages and "kohya" in messages
    assert "no adamw8bit optimizer" in messages
    assert "does not use `clip_skip`" in messages


def test_a_backend_missing_from_this_installation_is_said_plainly(
    bare_project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lorabuild import backends

    monkeypatch.setattr(backends, "IMPLEMENTED", {"builtin": backends.MODULES["builtin"]})
    plan = plan_for(bare_project, backend="kohya")
    (issue,) = [i for i in plan.problems if i.kind == "unavailable"]
    assert "cannot run the kohya backend yet" in issue.message and "builtin" in issue.message


def test_tight_memory_halves_the_batch_keeping_the_effective_batch(bare_project: Project) -> None:
    (bare_project.root / "sdxl").mkdir()
    spec = {
        "base_model": {"path": "sdxl", "family": "sdxl"},
        "preset": "standard",
        "dataset": {"repeats": 10},
        "training": {"batch_size": 8, "rank": 16, "alpha": 8, "learning_rate": 1e-4, "epochs": 10},
    }
    roomy = plan_for(bare_project, gpu_machine("NVIDIA H100 80GB HBM3", 80.0), **spec)
    tight = plan_for(bare_project, gpu_machine("NVIDIA GeForce RTX 3060", 12.0), **spec)
    assert roomy.training.batch_size == 8 and roomy.training.gradient_accumulation == 1
    assert tight.training.batch_size < 8
    assert tight.training.batch_size * tight.training.gradient_accumulation == 8
    assert tight.steps.total_steps == roomy.steps.total_steps
    assert tight.estimates.memory_needed_gb <= 12.0
    assert any("batch size goes from 8" in a for a in tight.adjustments)


def test_memory_that_cannot_fit_says_what_would(bare_project: Project) -> None:
    (bare_project.root / "flux").mkdir()
    plan = plan_for(
        bare_project,
        gpu_machine("NVIDIA GeForce RTX 3060", 12.0),
        base_model={"path": "flux", "family": "flux"},
        backend="kohya",
        preset="standard",
        dataset={"repeats": 10},
        training={
            "base_precision": "bf16",
            "resolution": 1024,
            "rank": 16,
            "alpha": 16,
            "learning_rate": 1e-4,
            "epochs": 10,
        },
    )
    (issue,) = [i for i in plan.problems if i.kind == "memory"]
    assert "even at batch size 1" in issue.message
    assert "fp8" in issue.fix and "a GPU with more memory" in issue.fix


def test_remote_targets_plan_for_the_declared_gpu(bare_project: Project) -> None:
    plan = plan_for(bare_project, compute={"target": "runpod", "gpu": "RTX 4090"})
    assert plan.device.kind == "gpu" and plan.device.memory_gb == 24
    hinted = plan_for(bare_project, compute={"target": "ssh", "host": "box", "vram_gb": 48})
    assert hinted.device.memory_gb == 48 and "compute.vram_gb" in hinted.device.source


def test_resume_key_ignores_the_batch_split_but_not_the_result(bare_project: Project) -> None:
    base = plan_for(bare_project)
    split = plan_for(bare_project, training={"batch_size": 1, "gradient_accumulation": 2})
    other = plan_for(bare_project, training={"rank": 8})
    assert base.resume_key == split.resume_key
    assert base.resume_key != other.resume_key


def test_pick_reads_dotted_paths(bare_project: Project) -> None:
    plan = plan_for(bare_project)
    picked = plan.pick(("training.epochs", "model.demo"))
    assert picked == {"training.epochs": 2, "model.demo": "tiny-sd"}


def test_dataset_listing_pairs_pictures_and_captions(tmp_path: Path) -> None:
    for name in ("a.png", "a.txt", "b.JPG", "c.webp", "c.txt", ".hidden.png", "notes.md"):
        (tmp_path / name).write_bytes(b"x")
    listing = list_dataset(tmp_path, ".txt")
    assert listing.images == ("a.png", "b.JPG", "c.webp")
    assert listing.captions == ("a.txt", "c.txt")
    assert listing.missing_captions == ("b.JPG",)


def test_cloud_targets_get_a_dated_cost_estimate(bare_project: Project) -> None:
    plan = plan_for(bare_project, compute={"target": "runpod", "gpu": "RTX 4090"})
    e = plan.estimates
    assert e.cost_per_hour == 0.69 and e.cost_source == "RunPod price table of 2026-11"
    assert e.cost_usd is not None and e.cost_usd > 0
    local = plan_for(bare_project)
    assert local.estimates.cost_usd is None


def test_time_comes_from_the_gpu_table_and_says_so(bare_project: Project) -> None:
    (bare_project.root / "sdxl").mkdir()
    spec = {
        "base_model": {"path": "sdxl", "family": "sdxl"},
        "backend": "kohya",
        "dataset": {"repeats": 10},
        "training": {"epochs": 10, "batch_size": 1, "rank": 16, "alpha": 8, "learning_rate": 1e-4},
    }
    on_4090 = plan_for(bare_project, gpu_machine(), **spec)
    on_h100 = plan_for(bare_project, gpu_machine("NVIDIA H100 80GB HBM3", 80.0), **spec)
    assert on_4090.estimates.step_seconds == pytest.approx(1.05, rel=0.01)  # the table's 0.7–1.4 s/it
    assert "planning table for the RTX 4090" in on_4090.estimates.time_source
    assert on_h100.estimates.time_seconds < on_4090.estimates.time_seconds


def test_a_gpu_backend_planned_on_a_machine_without_gpu_uses_the_declared_gpu(bare_project: Project) -> None:
    (bare_project.root / "sdxl").mkdir()
    plan = plan_for(
        bare_project,
        CPU,
        base_model={"path": "sdxl", "family": "sdxl"},
        backend="kohya",
        compute={"target": "local", "gpu": "RTX 4090"},
    )
    assert plan.device.kind == "gpu" and plan.device.memory_gb == 24
    builtin = plan_for(bare_project, CPU, compute={"target": "local", "gpu": "RTX 4090"})
    assert builtin.device.kind == "cpu"  # the builtin trainer really runs on this processor


def test_the_builtin_trainer_gets_this_machines_pythonpath_only_here(
    bare_project: Project, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from lorabuild.backends import builtin

    monkeypatch.setenv("PYTHONPATH", "/only/on/this/machine")
    here = builtin.launch(plan_for(bare_project), tmp_path, tmp_path)
    assert here.env["PYTHONPATH"].split(os.pathsep)[1:] == ["/only/on/this/machine"]
    remote = plan_for(bare_project, compute={"target": "ssh", "host": "box"})
    there = builtin.launch(remote, tmp_path, tmp_path)
    assert "/only/on/this/machine" not in there.env["PYTHONPATH"]
