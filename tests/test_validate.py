"""`lorabuild validate` for CI and editors: the bad-spec corpus, formats, exit codes, dataset and
model checks, speed, and the ready-made integrations (pre-commit hook, GitHub workflow, schema)."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from lorabuild import validate as checks
from lorabuild.cli import cli
from lorabuild.spec import SCHEMA_PATH
from tests.conftest import EXAMPLE_DATA, REPO, Project, lorabuild_env

CORPUS = Path(__file__).parent / "bad_specs"
EXPECTED: dict[str, dict[str, Any]] = {
    k: v for k, v in json.loads((CORPUS / "expected.json").read_text()).items() if not k.startswith("_")
}
GOOD = "version: 1\nname: x\nbase_model: {demo: tiny-sd}\ndataset: {path: data}\n"
GB = 10**9


# --- synthetic models: a real safetensors header, then zeros (a sparse file) ----------------------

SD15 = {
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": [320, 768],
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": [49408, 768],
    "first_stage_model.decoder.conv_out.weight": [3, 128, 3, 3],
}
SDXL = {
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": [640, 2048],
    "model.diffusion_model.label_emb.0.0.weight": [1280, 2816],
    "conditioner.embedders.1.model.token_embedding.weight": [49408, 1280],
    "first_stage_model.decoder.conv_out.weight": [3, 128, 3, 3],
}
FLUX = {
    "double_blocks.0.img_attn.qkv.weight": [9216, 3072],
    "single_blocks.0.linear1.weight": [21504, 3072],
    "final_layer.linear.weight": [64, 3072],
}
LORA = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": [16, 2048],
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": [640, 16],
}
VAE = {
    "encoder.down.0.block.0.conv1.weight": [128, 128, 3, 3],
    "decoder.up.0.block.0.conv1.weight": [128, 128, 3, 3],
}


def write_safetensors(
    path: Path,
    tensors: dict[str, list[int]],
    *,
    size: int | None = None,
    cut_to: int | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """A .safetensors file with these fp16 tensors; one more (`…zeros`) fills it up to `size` bytes.

    The data is zeros written as a sparse file, so a "6.9 GB" model uses no disk: validate reads
    the header and the size, as it would of a real model. `cut_to` truncates it (a broken download).
    """
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, shape in tensors.items():
        n = math.prod(shape) * 2
        header[name] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    end = offset
    if size is not None:
        for _ in range(3):  # the header's length depends on the filler's numbers: settle it
            raw = json.dumps(header).encode()
            filler = size - 8 - len(raw) - offset - 120
            header["model.zeros"] = {"dtype": "F16", "shape": [filler // 2], "data_offsets": [offset, offset + filler]}
        end = header["model.zeros"]["data_offsets"][1]
    raw = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        handle.truncate(cut_to if cut_to is not None else 8 + len(raw) + end)
    return path


def build_corpus(folder: Path) -> Path:
    """The corpus with everything its specs point at (see expected.json's `_about`)."""
    shutil.copytree(CORPUS, folder)
    shutil.copytree(EXAMPLE_DATA, folder / "data")
    (folder / "data-empty").mkdir()
    shutil.copytree(EXAMPLE_DATA, folder / "data-nested" / "10_x")
    for variant in ("nocaptions", "somecaptions", "emptycaption", "orphan", "latin1"):
        shutil.copytree(EXAMPLE_DATA, folder / f"data-{variant}")
    for caption in (folder / "data-nocaptions").glob("*.txt"):
        caption.unlink()
    for caption in sorted((folder / "data-somecaptions").glob("*.txt"))[:2]:
        caption.unlink()
    (folder / "data-emptycaption" / "red-circle.txt").write_text("  \n")
    (folder / "data-orphan" / "purple-star.txt").write_text("a purple star")
    (folder / "data-latin1" / "red-circle.txt").write_bytes("un cercle rouge, très rond".encode("latin-1"))
    models = folder / "models"
    write_safetensors(models / "sd15.safetensors", SD15, size=int(2.13 * GB))
    write_safetensors(models / "sdxl.safetensors", SDXL, size=int(6.94 * GB))
    write_safetensors(models / "small-sd15.safetensors", SD15, size=300 * 10**6)
    write_safetensors(
        models / "lora.safetensors", LORA, size=144 * 10**6, metadata={"ss_network_module": "networks.lora"}
    )
    write_safetensors(models / "truncated.safetensors", SDXL, size=int(6.94 * GB), cut_to=int(1.2 * GB))
    write_safetensors(models / "vae.safetensors", VAE, size=int(0.33 * GB))
    (models / "webpage.safetensors").write_text("<!DOCTYPE html><html><body>Please log in</body></html>\n")
    (models / "loose-folder").mkdir()
    write_safetensors(models / "loose-folder" / "unet.safetensors", SDXL)
    for name, case in EXPECTED.items():
        kind = case.get("generated")
        if kind == "over-1mb":
            (folder / name).write_text(GOOD + "# padding\n" * 120_000)
        elif kind == "binary":
            (folder / name).write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
        elif kind == "latin-1":
            (folder / name).write_bytes((GOOD + "# écrit à la main\n").encode("latin-1"))
        elif kind == "utf-16":
            (folder / name).write_bytes(GOOD.encode("utf-16"))
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_corpus(tmp_path_factory.mktemp("corpus") / "bad_specs")


@pytest.fixture(scope="module")
def corpus_reports(corpus: Path) -> dict[str, checks.SpecReport]:
    validator = checks.Validator()
    return {name: validator.validate(corpus / name) for name in EXPECTED}


# --- the corpus ---------------------------------------------------------------------------------


def test_corpus_lists_every_file_and_has_at_least_40_broken_specs() -> None:
    committed = {p.name for p in CORPUS.iterdir() if p.name != "expected.json"}
    generated = {name for name, case in EXPECTED.items() if case.get("generated")}
    assert committed == set(EXPECTED) - generated
    broken = [name for name, case in EXPECTED.items() if not case.get("valid", False)]
    assert len(broken) >= 40, len(broken)
    wanted = {"over-1mb", "binary", "latin-1"}
    assert wanted <= {case.get("generated") for case in EXPECTED.values()}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_corpus_case_is_reported_where_expected(name: str, corpus_reports: dict[str, checks.SpecReport]) -> None:
    case = EXPECTED[name]
    report = corpus_reports[name]
    rendered = [p.render() for p in report.problems]
    line, col = (int(n) for n in case["at"].split(":"))
    matching = [
        p
        for p in report.problems
        if (p.line, p.col) == (line, col)
        and p.dotted == case.get("field", "(spec)")
        and case["message"] in f"{p.message} — {p.fix}"
        and p.severity == case.get("severity", "error")
    ]
    assert matching, "\n".join(rendered)
    assert report.valid == case.get("valid", False), "\n".join(rendered)
    assert all(p.file.endswith(name) for p in report.problems)


def test_corpus_through_the_command_line_never_shows_a_traceback(corpus: Path) -> None:
    for fmt in ("text", "json", "github"):
        done = subprocess.run(
            [sys.executable, "-m", "lorabuild", "validate", "--format", fmt, "."],
            cwd=corpus,
            env=lorabuild_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 1, done.stderr
        assert "Traceback" not in done.stdout + done.stderr
        if fmt == "json":
            data = json.loads(done.stdout)
            assert {Path(s["path"]).name for s in data["specs"]} == {n for n in EXPECTED if n.endswith(".yaml")}
    runner = CliRunner()
    for name in EXPECTED:
        result = runner.invoke(cli, ["explain", str(corpus / name)])
        assert result.exit_code in (0, 2), (name, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit), (name, result.exception)


# --- exit codes and formats -------------------------------------------------------------------


def _invoke(*args: str) -> Any:
    return CliRunner().invoke(cli, ["validate", *args])


def test_exit_codes(bare_project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(bare_project.root)
    (bare_project.root / "good.yaml").write_text(GOOD)
    (bare_project.root / "warn.yaml").write_text(GOOD + "compute: {gpu: Voodoo 5}\n")
    (bare_project.root / "bad.yaml").write_text(GOOD + "training: {epochs: 0}\n")
    (bare_project.root / "empty-folder").mkdir()
    assert _invoke("good.yaml").exit_code == 0
    warned = _invoke("warn.yaml")
    assert warned.exit_code == 0 and "warning:" in warned.output
    assert _invoke("good.yaml", "bad.yaml").exit_code == 1
    assert _invoke().exit_code == 2  # no paths
    assert _invoke("--bogus", "good.yaml").exit_code == 2
    assert _invoke("--format", "xml", "good.yaml").exit_code == 2
    assert _invoke("nothing-*.yaml").exit_code == 2
    assert _invoke("missing.yaml").exit_code == 2
    assert _invoke("empty-folder").exit_code == 2


def test_json_format_is_one_document(bare_project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(bare_project.root)
    (bare_project.root / "good.yaml").write_text(GOOD)
    (bare_project.root / "bad.yaml").write_text(GOOD + "training:\n  rank: sixteen\n")
    result = _invoke("--format", "json", "good.yaml", "bad.yaml")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["summary"] == {"specs": 2, "valid": 1, "invalid": 1, "errors": 1, "warnings": 0}
    good, bad = data["specs"]
    assert good == {"path": "good.yaml", "valid": True, "problems": []}
    assert bad["valid"] is False
    assert bad["problems"] == [
        {
            "file": "bad.yaml",
            "line": 6,
            "col": 9,
            "field": "training.rank",
            "message": "should be a whole number, got 'sixteen'",
            "fix": "write a whole number without quotes, e.g. 15",
            "severity": "error",
        }
    ]


def test_github_format_annotates_and_escapes(bare_project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(bare_project.root)
    (bare_project.root / "a,b:c.yaml").write_text(GOOD + "training:\n  rank: sixteen\n")
    (bare_project.root / "warn.yaml").write_text(GOOD + "compute: {gpu: Voodoo 5}\n")
    result = _invoke("--format", "github", "a,b:c.yaml", "warn.yaml")
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert lines[0] == (
        "::error file=a%2Cb%3Ac.yaml,line=6,col=9,title=training.rank::"
        "should be a whole number, got 'sixteen' — write a whole number without quotes, e.g. 15"
    )
    assert lines[1].startswith("::warning file=warn.yaml,line=5,col=16,title=compute.gpu::lorabuild does not know")
    assert checks.github_data("100% sure\r\nnext") == "100%25 sure%0D%0Anext"
    assert checks.github_property("a:b,c%\n") == "a%3Ab%2Cc%25%0A"


def test_text_format_and_summary(bare_project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(bare_project.root)
    (bare_project.root / "bad.yaml").write_text(GOOD + "training:\n  rank: sixteen\n")
    result = _invoke("bad.yaml")
    assert result.stdout == (
        "bad.yaml:6:9: training.rank: should be a whole number, got 'sixteen' — "
        "write a whole number without quotes, e.g. 15\n"
    )
    assert "1 spec checked: 0 valid, 1 invalid" in result.stderr


def test_schema_only_skips_data_but_not_ranges(bare_project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(bare_project.root)
    spec = (
        "version: 1\nname: x\nbase_model: {path: models/gone.safetensors, family: sdxl}\ndataset: {path: gone}\n"
        "backend: kohya\n"
    )
    (bare_project.root / "nodata.yaml").write_text(spec)
    (bare_project.root / "range.yaml").write_text(spec + "training: {rank: 512, lr_warmup_steps: 10}\n")
    full = _invoke("nodata.yaml")
    assert full.exit_code == 1 and "does not exist" in full.stdout
    schema_only = _invoke("--schema-only", "nodata.yaml")
    assert schema_only.exit_code == 0 and schema_only.stdout == ""
    ranges = _invoke("--schema-only", "range.yaml")
    assert ranges.exit_code == 1
    assert "range.yaml:6:18: training.rank: rank 512 is outside the safe range 1 to 128" in ranges.stdout
    assert "lr_warmup_steps" not in ranges.stdout  # needs the number of pictures


def test_memory_is_checked_against_the_declared_gpu_only(tmp_path: Path) -> None:
    shutil.copytree(EXAMPLE_DATA, tmp_path / "data")
    base = "version: 1\nname: x\nbase_model: {path: m.safetensors, family: flux}\ndataset: {path: data}\n"
    heavy = "training: {resolution: 2048, batch_size: 16, gradient_checkpointing: false, base_precision: bf16}\n"
    (tmp_path / "nogpu.yaml").write_text(base + "backend: kohya\n" + heavy)
    (tmp_path / "small.yaml").write_text(base + "backend: kohya\n" + heavy + "compute: {gpu: RTX 3060}\n")
    (tmp_path / "vram.yaml").write_text(base + "backend: kohya\n" + heavy + "compute: {vram_gb: 2048}\n")
    validator = checks.Validator(schema_only=True)
    assert validator.validate(tmp_path / "nogpu.yaml").valid
    small = validator.validate(tmp_path / "small.yaml")
    assert [p.dotted for p in small.problems] == ["training.batch_size"]
    assert "RTX 3060 has 12 GB VRAM" in small.problems[0].message
    assert validator.validate(tmp_path / "vram.yaml").valid


# --- dataset and model checks --------------------------------------------------------------------


def test_dataset_facts_are_read_once_per_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(EXAMPLE_DATA, tmp_path / "data")
    write_safetensors(tmp_path / "m.safetensors", SD15, size=int(2.13 * GB))
    paths = []
    for i in range(30):
        path = tmp_path / f"s{i}.yaml"
        path.write_text(
            f"version: 1\nname: s{i}\nbase_model: {{path: m.safetensors, family: sd15}}\ndataset: {{path: data}}\n"
            "backend: kohya\n"
        )
        paths.append(path)
    calls: dict[str, int] = {"dataset": 0, "model": 0}

    def counted(name: str, real: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(checks, "check_dataset", counted("dataset", checks.check_dataset))
    monkeypatch.setattr(checks, "check_model", counted("model", checks.check_model))
    reports = checks.validate_paths(paths)
    assert all(r.valid and not r.problems for r in reports), [p.render() for r in reports for p in r.problems]
    assert calls == {"dataset": 1, "model": 1}


def test_captions_with_another_extension_are_pointed_out(tmp_path: Path) -> None:
    shutil.copytree(EXAMPLE_DATA, tmp_path / "data")
    for caption in (tmp_path / "data").glob("*.txt"):
        caption.rename(caption.with_suffix(".caption"))
    (finding,) = checks.check_dataset(tmp_path / "data", ".txt").findings
    assert finding.severity == "error"
    assert finding.message == "none of the 8 pictures has a .txt caption (the folder has .caption files)"
    assert checks.check_dataset(tmp_path / "data", ".caption").findings == ()


@pytest.mark.parametrize(
    ("tensors", "size", "declared", "expected"),
    [
        (SD15, 2.13, "sd15", None),
        (SDXL, 6.94, "sdxl", None),
        (SDXL, 6.94, "pony", None),
        (FLUX, 23.8, "flux", None),
        (FLUX, 11.9, "flux", None),
        (SDXL, 6.94, "flux", "looks like SDXL"),
        (FLUX, 23.8, "sdxl", "looks like Flux"),
        (SD15, 2.13, "sdxl", "looks like SD 1.5"),
        (SD15, 0.3, "sd15", "SD 1.5 models are usually 2–4.3 GB"),
        (SDXL, 20.0, "sdxl", "SDXL models are usually 6.5–7 GB"),
    ],
)
def test_model_family_and_size(
    tmp_path: Path, tensors: dict[str, list[int]], size: float, declared: str, expected: str | None
) -> None:
    path = write_safetensors(tmp_path / "m.safetensors", tensors, size=int(size * GB))
    findings = checks.model_findings(checks.check_model(path), declared)
    if expected is None:
        assert findings == []
    else:
        assert len(findings) == 1 and expected in findings[0][1].message, findings


def test_model_that_is_not_a_base_model(tmp_path: Path) -> None:
    lora = write_safetensors(tmp_path / "lora.safetensors", LORA, metadata={"ss_network_module": "networks.lora"})
    peft = write_safetensors(tmp_path / "peft.safetensors", {"unet.down_blocks.0.attn1.to_q.lora_A.weight": [4, 320]})
    zip_file = tmp_path / "zip.safetensors"
    zip_file.write_bytes(b"PK\x03\x04" + bytes(64))
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x02")
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(bytes(1000))
    text = tmp_path / "notes.txt"
    text.write_text("hello")

    def message(path: Path) -> str:
        findings = checks.model_findings(checks.check_model(path), "sdxl")
        return " / ".join(f.message for _, f in findings)

    assert "is a LoRA" in message(lora)
    assert "is a LoRA" in message(peft)
    assert "zip archive" in message(zip_file)
    assert "too short" in message(short)
    assert "usually 6.5–7 GB" in message(ckpt)  # a pickle: only its size is looked at
    assert "not a .txt" in message(text)


def test_diffusers_folders(tmp_path: Path) -> None:
    folder = tmp_path / "sdxl-diffusers"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    assert checks.model_findings(checks.check_model(folder), "sdxl") == []
    (mismatch,) = checks.model_findings(checks.check_model(folder), "sd15")
    assert mismatch[0] == ("base_model", "family") and "its model_index.json say so" in mismatch[1].message
    shutil.rmtree(folder / "unet")
    (missing,) = checks.model_findings(checks.check_model(folder), "sdxl")
    assert "its unet folder is missing" in missing[1].message


def test_validate_never_imports_heavy_modules_with_models_and_data(corpus: Path) -> None:
    code = (
        "import sys\n"
        "from lorabuild.cli import cli\n"
        "try:\n    cli(['validate', '.'])\nexcept SystemExit:\n    pass\n"
        "heavy = ('torch', 'diffusers', 'transformers', 'fabric', 'PIL')\n"
        "print('HEAVY', sorted(m for m in heavy if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=corpus, env=lorabuild_env(), capture_output=True, text=True, timeout=120
    )
    assert "HEAVY []" in done.stdout, done.stdout[-2000:] + done.stderr


# --- speed --------------------------------------------------------------------------------------


def make_many_specs(root: Path, count: int) -> Path:
    """`count` varied specs sharing a few datasets and models, like a studio's catalogue."""
    folder = root / "catalogue"
    for i in range(4):
        shutil.copytree(EXAMPLE_DATA, folder / f"data{i}")
    write_safetensors(folder / "models" / "sd15.safetensors", SD15, size=int(2.13 * GB))
    write_safetensors(folder / "models" / "sdxl.safetensors", SDXL, size=int(6.94 * GB))
    write_safetensors(folder / "models" / "flux.safetensors", FLUX, size=int(23.8 * GB))
    models = [
        ("{demo: tiny-sd}", "builtin"),
        ("{path: models/sd15.safetensors, family: sd15}", "kohya"),
        ("{path: models/sdxl.safetensors, family: sdxl}", "kohya"),
        ("{path: models/flux.safetensors, family: flux}", "kohya"),
    ]
    for i in range(count):
        model, backend = models[i % 4]
        (folder / f"lora{i:03}.yaml").write_text(
            f"version: 1\nname: lora{i:03}\nbase_model: {model}\ndataset: {{path: data{i % 4}, repeats: 5}}\n"
            f"backend: {backend}\npreset: {('quick', 'standard', 'thorough')[i % 3]}\n"
            f"training: {{rank: {4 * (1 + i % 4)}, alpha: 2, seed: {i}}}\n"
            + ("compute: {target: runpod, gpu: RTX 4090}\n" if i % 2 else "")
        )
    return folder


def test_500_specs_validate_in_under_2_seconds(tmp_path: Path) -> None:
    folder = make_many_specs(tmp_path, 500)
    best = math.inf
    for _ in range(2):  # the machine is shared: take the better of two fresh processes
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "lorabuild", "validate", "--format", "json", "."],
            cwd=folder,
            env=lorabuild_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        best = min(best, time.perf_counter() - start)
        data = json.loads(done.stdout)
        assert data["summary"]["specs"] == 500
        assert done.returncode == 0, [p for s in data["specs"] for p in s["problems"]][:3]
    print(f"500 specs validated in {best:.2f} s ({500 / best:.0f} specs per second)")
    assert best < 2.0


def test_bench_prints_specs_per_second() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "validate.py"), "50", "1"],
        env=lorabuild_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert re.search(r"50 specs .* \d+ specs per second", done.stdout), done.stdout


# --- integrations ---------------------------------------------------------------------------------


def _hook_files(hook: dict[str, Any], tracked: list[str]) -> list[str]:
    """The files pre-commit would pass to the hook: `files`/`exclude` regexes and `types: [yaml]`."""
    files = re.compile(hook.get("files", ""))
    exclude = re.compile(hook["exclude"]) if hook.get("exclude") else None
    yaml_types = {".yaml", ".yml"} if "yaml" in hook.get("types", []) else None
    return [
        f
        for f in tracked
        if files.search(f)
        and not (exclude and exclude.search(f))
        and (yaml_types is None or Path(f).suffix in yaml_types)
    ]


def test_pre_commit_hook_entry_point_on_a_temporary_repository(tmp_path: Path) -> None:
    hooks = yaml.safe_load((REPO / ".pre-commit-hooks.yaml").read_text())
    by_id = {hook["id"]: hook for hook in hooks}
    assert {"lorabuild-validate", "lorabuild-validate-schema-only"} <= set(by_id)
    repo = tmp_path / "studio"
    shutil.copytree(REPO / "specs", repo / "specs")
    shutil.copytree(REPO / "examples", repo / "examples")
    (repo / ".github" / "workflows").mkdir(parents=True)
    (repo / ".github" / "workflows" / "ci.yml").write_text("on: push\njobs: {}\n")  # YAML, but not a spec
    (repo / ".pre-commit-config.yaml").write_text("repos: []\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    env = lorabuild_env()
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")

    def run_hook(hook_id: str) -> subprocess.CompletedProcess[str]:
        subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
        tracked = subprocess.run(
            ["git", "ls-files"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.split()
        hook = by_id[hook_id]
        files = _hook_files(hook, tracked)
        assert ".github/workflows/ci.yml" not in files and ".pre-commit-config.yaml" not in files
        argv = [*shlex.split(hook["entry"]), *hook.get("args", []), *files]
        return subprocess.run(argv, cwd=repo, env=env, capture_output=True, text=True, timeout=120)

    specs = len(list((repo / "specs").glob("*.yaml")))
    for hook_id in by_id:
        passed = run_hook(hook_id)
        assert passed.returncode == 0, passed.stdout + passed.stderr
        assert f"checked: {specs} valid, 0 invalid" in passed.stderr
    (repo / "specs" / "broken.yaml").write_text(GOOD.replace("data", "../examples/shapes") + "training: {rank: 0}\n")
    failed = run_hook("lorabuild-validate")
    assert failed.returncode == 1
    assert "specs/broken.yaml:5:18: training.rank: 0 is out of range" in failed.stdout


def _fenced_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def test_docs_ci_workflow_and_editor_setup() -> None:
    doc = (REPO / "docs" / "ci.md").read_text()
    workflows = [yaml.safe_load(block) for block in _fenced_blocks(doc, "yaml") if "jobs:" in block]
    assert workflows, "docs/ci.md has no GitHub Actions workflow"
    steps = [step for job in workflows[0]["jobs"].values() for step in job["steps"]]
    assert any("lorabuild validate --format github" in step.get("run", "") for step in steps)
    assert "# yaml-language-server: $schema=" in doc
    settings = [json.loads(block) for block in _fenced_blocks(doc, "json") if "yaml.schemas" in block]
    assert settings, "docs/ci.md has no VS Code `yaml.schemas` setting"
    (schema_path,) = settings[0]["yaml.schemas"]
    assert Path(schema_path).name == SCHEMA_PATH.name
    hooks = [yaml.safe_load(block) for block in _fenced_blocks(doc, "yaml") if "repos:" in block]
    assert hooks and hooks[0]["repos"][0]["hooks"][0]["id"] == "lorabuild-validate"


def test_specs_written_for_editors_match_the_schema(tmp_path: Path) -> None:
    """What the editor checks (the JSON Schema) accepts the example spec and rejects a typo."""
    import jsonschema

    schema = json.loads(SCHEMA_PATH.read_text())
    editor = jsonschema.Draft202012Validator(schema)
    example = yaml.safe_load((REPO / "specs" / "example.yaml").read_text())
    assert list(editor.iter_errors(example)) == []
    assert list(editor.iter_errors({**example, "trainning": {}}))
    first_line = (REPO / "specs" / "example.yaml").read_text().splitlines()[0]
    reference = first_line.split("$schema=", 1)[1]
    assert ((REPO / "specs") / reference).resolve() == SCHEMA_PATH.resolve()
