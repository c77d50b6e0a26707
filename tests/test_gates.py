"""Gates that fail say what happened, why, and the fix; a failed gate is `failed` until fixed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import Project


def states(project: Project, spec: str = "t.yaml") -> dict[str, dict[str, object]]:
    done = project.lorabuild("status", spec, "--json", check=True)
    return {g["name"]: g for g in json.loads(done.stdout)["gates"]}


def test_config_gate_failure_writes_nothing_and_is_remembered(bare_project: Project) -> None:
    bare_project.write_spec(training={"learning_rate": 0.05})
    predicted = states(bare_project)
    assert any("will fail: learning rate for adamw 0.05" in r for r in predicted["config"]["reasons"])  # type: ignore[union-attr]

    done = bare_project.lorabuild("run", "t.yaml")
    assert done.returncode == 1
    assert "Gate 2 — training config failed" in done.stderr
    assert "t.yaml:" in done.stderr and "training.learning_rate: learning rate for adamw 0.05" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    run_dir = bare_project.run_dir()
    assert not (run_dir / "config.md").exists() and not (run_dir / "plan.json").exists()
    after = states(bare_project)
    assert after["config"]["state"] == "failed"
    assert any("runs after config (failed)" in r for r in after["environment"]["reasons"])  # type: ignore[union-attr]

    bare_project.write_spec(training={"learning_rate": 0.0005})
    fixed = states(bare_project)
    assert fixed["config"]["state"] == "missing"
    done = bare_project.lorabuild("run", "t.yaml", "--until", "config", check=True)
    assert (run_dir / "config.md").is_file()
    assert states(bare_project)["config"]["state"] == "up-to-date"


def test_a_missing_backend_module_fails_gate_2_plainly(bare_project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    from lorabuild import backends
    from lorabuild.gates import GateFailed, config
    from lorabuild.pipeline import build_context

    monkeypatch.setattr(backends, "IMPLEMENTED", {"builtin": backends.MODULES["builtin"]})
    spec = bare_project.write_spec(backend={"name": "kohya", "path": "sd-scripts"})
    ctx = build_context(spec, root=bare_project.grimoire)
    with pytest.raises(GateFailed) as failed:
        config.run(ctx)
    assert "cannot run the kohya backend yet" in failed.value.render()
    assert "use `backend: builtin`" in failed.value.render()


def test_missing_model_passes_gate_2_and_fails_gate_3(bare_project: Project) -> None:
    # models usually live outside the spec's repository: Gate 2 plans without it, Gate 3 needs it
    bare_project.write_spec(
        base_model={"path": "models/nothing-here", "family": "sd15"},
        dataset={"repeats": 7},
        training={"resolution": 256},
    )
    done = bare_project.lorabuild("run", "t.yaml")
    assert done.returncode == 1
    assert "Gate 2 — training config passed" in done.stdout
    assert "Gate 3 — environment failed" in done.stderr
    assert "the base model" in done.stderr and "was not found" in done.stderr


def test_dataset_preflight_stops_an_unreadable_caption_before_the_backend(project: Project) -> None:
    (project.dataset / "red-circle.txt").write_bytes(b"shapestyle, caf\xe9 au lait\n")
    project.write_spec()
    done = project.lorabuild("run", "t.yaml")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Dataset check failed" in done.stderr
    assert "red-circle.txt is not UTF-8 text (byte 0xe9 at position 15)" in done.stderr
    assert "lorabuild dry run:" not in (project.run_dir() / "dryrun.log").read_text()  # no backend started
    run_dir = project.run_dir()
    assert (run_dir / "dryrun.log").is_file() and not (run_dir / "dryrun.ok").exists()
    assert states(project)["dryrun"]["state"] == "failed"
    assert not (run_dir / "t.safetensors").exists()


def test_dry_run_diagnoses_a_broken_model(project: Project) -> None:
    model = project.root / "broken-model"
    model.mkdir()
    (model / "model_index.json").write_text("{not json")
    # in the safe ranges of a real SD 1.5 model: 8 pictures × 7 repeats ÷ 2 × 2 epochs = 56 steps
    project.write_spec(
        base_model={"path": "broken-model", "family": "sd15"}, dataset={"repeats": 7}, training={"resolution": 256}
    )
    done = project.lorabuild("run", "t.yaml")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Dry run failed — the base model could not be loaded" in done.stderr
    assert "Fix: check `base_model.path`" in done.stderr


def test_environment_report_is_plain_and_complete(project: Project) -> None:
    project.write_spec()
    project.lorabuild("run", "t.yaml", "--until", "environment", check=True)
    run_dir = project.run_dir()
    record = json.loads((run_dir / "environment.json").read_text())
    assert record["passed"] is True
    assert record["backend"]["probe"]["torch"].startswith("2.")
    assert record["disk"]["free_bytes"] > record["disk"]["needed_bytes"] > 0
    md = (run_dir / "environment.md").read_text()
    assert "PyTorch" in md and "free disk" in md
    if not record["gpus"]:
        assert "no NVIDIA GPU found" in md


def test_gate_2_explains_terms_once(project: Project) -> None:
    project.write_spec()
    project.lorabuild("run", "t.yaml", "--until", "config", check=True)
    md = (project.run_dir() / "config.md").read_text()
    assert md.count("how big a step the model takes each time it learns") == 1
    assert "| learning_rate | 0.0005 | spec |" in md
    assert "| epochs | 2 | spec |" in md
    assert "clip_skip" not in md  # the builtin trainer does not use it, so it is not shown
    plan = json.loads((project.run_dir() / "plan.json").read_text())
    assert plan["steps"]["total_steps"] == 8 and plan["sources"]["training.resolution"] == "demo model tiny-sd"


def test_status_of_a_spec_never_run(bare_project: Project, tmp_path: Path) -> None:
    bare_project.write_spec()
    found = states(bare_project)
    assert [g["state"] for g in found.values()] == ["missing"] * 4
    assert not (bare_project.root / "grimoire" / ".lorabuild").exists()  # status writes nothing


def test_final_confirmation_before_gpu_time(bare_project: Project, capsys: pytest.CaptureFixture[str]) -> None:
    from lorabuild.gates import GateFailed, RunOptions
    from lorabuild.gates.train import confirm
    from lorabuild.pipeline import build_context
    from lorabuild.studio import Gpu, GpuReport, Machine

    spec = bare_project.write_spec()
    gpu = Machine(
        "ws",
        "Linux",
        16,
        64.0,
        GpuReport((Gpu(0, "NVIDIA GeForce RTX 4090", 24.0, 23.0, (8, 9)),), "570.86.15", "12.8"),
    )
    unattended = build_context(spec, root=bare_project.grimoire, machine=gpu, options=RunOptions(interactive=False))
    with pytest.raises(GateFailed) as refused:
        confirm(unattended)
    assert "--yes" in refused.value.fix
    assert "Ready to train t: 8 pictures × 1 repeats" in capsys.readouterr().out

    scripted = build_context(spec, root=bare_project.grimoire, machine=gpu, options=RunOptions(yes=True))
    confirm(scripted)
    said = capsys.readouterr().out
    assert "This will take approximately" in said and "on your NVIDIA GeForce RTX 4090." in said

    on_cpu = build_context(spec, root=bare_project.grimoire, options=RunOptions(interactive=False))
    if on_cpu.plan.device.kind == "cpu":
        confirm(on_cpu)  # nothing is spent on a processor: no question asked


def test_out_of_memory_in_the_dry_run_halves_the_batch_and_is_remembered(project: Project) -> None:
    """A real memory cap on the trainer (RLIMIT_AS, docs/trainer.md): batch 16 at 256 px does not fit."""
    project.write_spec(dataset={"repeats": 4}, training={"batch_size": 16, "resolution": 256, "epochs": 1})
    env_cap = {"LORABUILD_MEMORY_HEADROOM_MB": "200"}
    done = project.lorabuild("run", "t.yaml", "--until", "dryrun", env=env_cap)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Hit memory limit — reducing batch size from 16 to 8 and retrying" in done.stdout
    ok = json.loads((project.run_dir() / "dryrun.ok").read_text())
    assert ok["batch_size"] < 16 and ok["batch_size"] * ok["gradient_accumulation"] == 16
    limits = json.loads((project.root / "grimoire" / ".lorabuild" / "runs" / "t" / "limits.json").read_text())
    (limit,) = limits.values()
    assert limit["batch_size"] == ok["batch_size"] and limit["failed_at"] == 16 and limit["where"] == "the dry run"

    # the next plan starts at the batch that fits, and says why
    project.lorabuild("run", "t.yaml", "--until", "config", env=env_cap, check=True)
    md = (project.run_dir() / "config.md").read_text()
    assert "this machine ran out of memory at batch size 16 (the dry run" in md
    plan = json.loads((project.run_dir() / "plan.json").read_text())
    assert plan["training"]["batch_size"] == ok["batch_size"] and plan["steps"]["effective_batch"] == 16


def test_out_of_memory_during_training_is_recovered_and_remembered(project: Project) -> None:
    project.write_spec(dataset={"repeats": 4}, training={"batch_size": 16, "resolution": 256, "epochs": 2})
    project.lorabuild("run", "t.yaml", "--until", "dryrun", check=True)  # no cap: batch 16 passes here
    done = project.lorabuild("run", "t.yaml", env={"LORABUILD_MEMORY_HEADROOM_MB": "200"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Hit memory limit — reducing batch size from 16 to 8 and retrying" in done.stdout
    progress = json.loads((project.run_dir() / "progress.json").read_text())
    assert progress["status"] == "COMPLETE" and progress["oom_recoveries"] >= 1
    assert progress["step"] == progress["total_steps"]  # the effective batch was kept: same steps
    assert any("Hit memory limit" in note for note in progress["notes"])
    assert "OOM recoveries**: " in (project.run_dir() / "progress.md").read_text()

    # the next plan starts at the batch that fitted; the finished training does not run again
    project.lorabuild("run", "t.yaml", "--until", "config", check=True)
    plan = json.loads((project.run_dir() / "plan.json").read_text())
    assert plan["training"]["batch_size"] < 16 and plan["steps"]["effective_batch"] == 16
    assert "ran out of memory at batch size" in (project.run_dir() / "config.md").read_text()
    states_now = states(project)
    assert states_now["train"]["state"] == "up-to-date", states_now["train"]


def test_switching_the_backend_reruns_from_the_config_gate(bare_project: Project) -> None:
    """One line (`backend:`) switches trainers; every gate from Gate 2 on reads it, so all rerun."""
    (bare_project.root / "sd").mkdir()
    (bare_project.root / "sd" / "model_index.json").write_text("{}")
    sd = {"base_model": {"path": "sd", "family": "sd15"}, "dataset": {"repeats": 7}, "training": {"resolution": 256}}
    bare_project.write_spec(**sd)
    bare_project.lorabuild("run", "t.yaml", "--until", "environment", check=True)
    assert states(bare_project)["config"]["state"] == "up-to-date"
    bare_project.write_spec(**sd, backend={"name": "kohya", "path": "sd-scripts"})
    after = states(bare_project)
    assert after["config"]["state"] == "stale" and after["environment"]["state"] == "stale"
    for gate in ("config", "environment"):
        assert any("backend.name changed: builtin → kohya" in r for r in after[gate]["reasons"]), after[gate]
    assert {after["dryrun"]["state"], after["train"]["state"]} == {"missing"}
