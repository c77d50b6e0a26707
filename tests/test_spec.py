"""The spec format: models, the checked-in schema, YAML loading and located, plain-language errors."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from pydantic import ValidationError

from lorabuild.spec import SCHEMA_PATH, Spec, load_spec, schema_text
from lorabuild.yamlsource import MAX_EXPANDED_NODES, SpecError

REPO = Path(__file__).resolve().parents[1]
MODELINE = "# yaml-language-server: $schema=../schemas/training.schema.json"

MINIMAL = "version: 1\nname: x\nbase_model: {demo: tiny-sd}\ndataset: {path: data}\n"


def write(tmp_path: Path, text: str | bytes, name: str = "s.yaml") -> Path:
    (tmp_path / "data").mkdir(exist_ok=True)
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def problems(tmp_path: Path, text: str | bytes) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, text))
    return [p.render() for p in info.value.problems]


def test_checked_in_schema_matches_the_models() -> None:
    assert SCHEMA_PATH.read_text() == schema_text(), (
        "schemas/training.schema.json is out of date; regenerate it with:\n"
        "  lorabuild schema > schemas/training.schema.json"
    )


def test_schema_is_draft_2020_12_with_id() -> None:
    schema = json.loads(SCHEMA_PATH.read_text())
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"].endswith("training.schema.json")
    jsonschema.Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize("spec_file", sorted((REPO / "specs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_spec_has_the_modeline_and_passes_schema_and_models(spec_file: Path) -> None:
    assert spec_file.read_text().splitlines()[0] == MODELINE
    data = yaml.safe_load(spec_file.read_text())
    schema = json.loads(SCHEMA_PATH.read_text())
    assert list(jsonschema.Draft202012Validator(schema).iter_errors(data)) == []
    load_spec(spec_file)


def test_schema_and_models_agree_on_short_backend_form(tmp_path: Path) -> None:
    loaded = load_spec(write(tmp_path, MINIMAL + "backend: kohya\n"))
    assert loaded.spec.backend.name == "kohya"
    schema = json.loads(SCHEMA_PATH.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    assert not list(validator.iter_errors({**yaml.safe_load(MINIMAL), "backend": "kohya"}))
    assert list(validator.iter_errors({**yaml.safe_load(MINIMAL), "backend": "mystery"}))


def test_relative_paths_resolve_against_the_spec_folder(tmp_path: Path) -> None:
    nested = tmp_path / "specs"
    nested.mkdir()
    (tmp_path / "data").mkdir()
    spec = nested / "s.yaml"
    spec.write_text(MINIMAL.replace("path: data", "path: ../data"))
    loaded = load_spec(spec)
    assert loaded.resolve(loaded.spec.dataset.path) == (tmp_path / "data").resolve()


def test_yaml_no_means_no_mixed_precision(tmp_path: Path) -> None:
    loaded = load_spec(write(tmp_path, MINIMAL + "training:\n  mixed_precision: no\n"))
    assert loaded.spec.training.mixed_precision == "no"


def test_duplicate_key_is_an_error_with_both_lines(tmp_path: Path) -> None:
    (msg,) = problems(tmp_path, MINIMAL + "training:\n  epochs: 3\n  epochs: 4\n")
    assert ":7:3:" in msg and "`epochs` appears twice" in msg and "first on line 6" in msg


def test_unknown_key_suggests_the_close_one(tmp_path: Path) -> None:
    (msg,) = problems(tmp_path, MINIMAL + "training:\n  learning_rat: 0.001\n")
    assert ":6:3: training.learning_rat:" in msg and "did you mean `learning_rate`?" in msg


def test_wrong_type_points_at_the_value(tmp_path: Path) -> None:
    (msg,) = problems(tmp_path, MINIMAL + "training:\n  epochs: many\n")
    assert ":6:11: training.epochs: should be a whole number, got 'many'" in msg


def test_missing_required_field_is_named(tmp_path: Path) -> None:
    (msg,) = problems(tmp_path, "version: 1\nname: x\nbase_model: {demo: tiny-sd}\n")
    assert "dataset: the required setting `dataset` is missing" in msg


def test_several_problems_are_all_reported(tmp_path: Path) -> None:
    found = problems(tmp_path, MINIMAL + "training:\n  epochs: -1\n  rank: big\npreset: fast\n")
    assert len(found) == 3
    assert any("training.epochs" in m and "at least 1" in m for m in found)
    assert any("preset" in m and "quick, standard or thorough" in m for m in found)


def test_name_cannot_escape_the_run_folder(tmp_path: Path) -> None:
    for name in ("../x", "/etc", "a/b", "..", "X Y"):
        (msg,) = problems(tmp_path, MINIMAL.replace("name: x", f"name: '{name}'"))
        assert ":2:7: name:" in msg and "becomes a folder name" in msg


def test_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    lines = ['a0: &a0 ["x","x","x","x","x","x","x","x","x","x"]']
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [*a{i - 1},*a{i - 1},*a{i - 1},*a{i - 1},*a{i - 1},*a{i - 1},*a{i - 1}]")
    (msg,) = problems(tmp_path, MINIMAL + "\n".join(lines) + "\n")
    assert f"more than {MAX_EXPANDED_NODES} values" in msg


def test_recursive_alias_is_refused(tmp_path: Path) -> None:
    (msg,) = problems(tmp_path, MINIMAL + "loop: &l [*l]\n")
    assert "refers to itself" in msg


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", "the spec is empty"),
        ("# only a comment\n", "the spec is empty"),
        (b"\x7fELF\x02\x01\x01\x00\x00", "binary file"),
        (b"name: caf\xe9\n", "not UTF-8"),
        ("- a\n- b\n", "holds a list"),
        ("just text\n", "a single piece of text"),
        (MINIMAL + "---\nversion: 1\n", "more than one YAML document"),
        ("version: 1\nname: [unclosed\n", "YAML syntax error"),
        (MINIMAL.replace("version: 1", "version: 2"), "newer lorabuild"),
    ],
)
def test_unusable_files_get_one_clear_problem(tmp_path: Path, content: str | bytes, expected: str) -> None:
    found = problems(tmp_path, content)
    assert len(found) == 1 and expected in found[0], found


def test_huge_file_is_refused_without_parsing(tmp_path: Path) -> None:
    (msg,) = problems(tmp_path, "# " + "x" * (2 * 1024 * 1024))
    assert "KB; a spec is a short text file" in msg


def test_missing_dataset_folder_points_at_the_path(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(MINIMAL.replace("path: data", "path: nowhere"))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    (problem,) = info.value.problems
    assert (problem.line, problem.col) == (4, 17)
    assert "does not exist" in problem.message


def test_model_rules(tmp_path: Path) -> None:
    assert "exactly" not in " ".join(problems(tmp_path, MINIMAL.replace("{demo: tiny-sd}", "{}")))
    both = problems(tmp_path, MINIMAL.replace("{demo: tiny-sd}", "{demo: tiny-sd, path: m.safetensors}"))
    assert "keep only one" in both[0]
    family = problems(tmp_path, MINIMAL.replace("{demo: tiny-sd}", "{path: m.safetensors}"))
    assert "`family` is missing" in family[0]


def test_ssh_target_needs_a_host(tmp_path: Path) -> None:
    (msg,) = problems(tmp_path, MINIMAL + "compute: {target: ssh}\n")
    assert "add `host:`" in msg


def test_spec_is_immutable(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, MINIMAL)).spec
    with pytest.raises(ValidationError):
        spec.name = "y"  # type: ignore[misc]
    assert isinstance(spec, Spec)
