"""`lorabuild validate`: check specs in CI and in editors, without a GPU, without torch.

Owns everything `validate` checks beyond the schema and how it reports it:

- which files a command line names (files, folders, globs);
- the dataset: the folder exists, holds pictures, each picture has a readable, non-empty caption
  with the spec's extension, and no caption is left without its picture (names and caption text
  only: pictures are never opened, Pillow is never imported);
- the base model, when it is on this machine: a plausible model of the declared family, judged
  from the safetensors header (tensor names and shapes), a diffusers folder's model_index.json,
  and the file size — never the weights. A missing model is only a warning: models usually live
  outside the repository of specs;
- the plan's own checks (safe ranges, what the backend supports, the memory estimate against the
  GPU the spec declares — the machine validating is usually not the one that trains);
- the three output formats (`text`, `json`, GitHub Actions annotations) and the exit codes.

Speed matters (a studio validates hundreds of specs per pull request): dataset folders and model
files are read once per run, however many specs share them (`Validator` caches them).
"""

from __future__ import annotations

import functools
import glob
import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorabuild import hardware
from lorabuild.dataset import IMAGE_EXTENSIONS, DatasetListing, list_dataset
from lorabuild.hardware import GpuModel
from lorabuild.modelfile import SINGLE_FILE_SUFFIXES, ModelListing, list_model, safetensors_header
from lorabuild.plan import Plan, locate_issue, make_plan, model_listing_path
from lorabuild.spec import LoadedSpec, file_problems, load_spec
from lorabuild.studio import Gpu, GpuReport, Machine
from lorabuild.yamlsource import FieldPath, Problem, SpecError

SPEC_SUFFIXES = (".yaml", ".yml")
FORMATS = ("text", "json", "github")
GB = 1e9

# Spec fields that name files or folders: checked before anything touches the file system.
PATH_FIELDS: tuple[FieldPath, ...] = (
    ("base_model", "path"),
    ("base_model", "vae"),
    ("dataset", "path"),
    ("backend", "path"),
    ("backend", "python"),
    ("compute", "identity_file"),
    ("grimoire",),
)
NAME_MAX = 255  # bytes in one file name on every file system lorabuild runs on
PATH_MAX = 4096

FAMILY_WORDS = {"sd15": "SD 1.5", "sdxl": "SDXL", "pony": "Pony (SDXL)", "flux": "Flux"}

# Rough sizes of a whole base model file, in GB: (usual low, usual high, plausible low, plausible
# high). Outside the plausible band the size alone is suspicious (a warning, since size is weak
# evidence): pruned fp16 SD 1.5 is 2.1 GB, full fp32 with EMA 7.7 GB; SDXL fp16 6.9 GB (fp8 ~3.5);
# Flux dev fp16 23.8 GB, fp8 ~12 GB, 4-bit GGUF/NF4 ~6.5 GB.
SIZE_BANDS: dict[str, tuple[float, float, float, float]] = {
    "sd15": (2.0, 4.3, 1.0, 8.5),
    "sdxl": (6.5, 7.0, 3.0, 14.0),
    "pony": (6.5, 7.0, 3.0, 14.0),
    "flux": (12.0, 24.0, 5.5, 35.0),
}

# Cross-attention width (the second dimension of any `attn2.to_k.weight`) identifies the UNet:
# 768 is SD 1.x's CLIP, 1024 SD 2.x's OpenCLIP (both are family sd15 here), 2048 is SDXL's.
CONTEXT_DIM_FAMILY = {768: "sd15", 1024: "sd15", 2048: "sdxl"}

DIFFUSERS_PIPELINES = {
    "StableDiffusionPipeline": "sd15",
    "StableDiffusionXLPipeline": "sdxl",
    "FluxPipeline": "flux",
}


class UsageError(Exception):
    """A command line that names no spec."""


@dataclass
class SpecReport:
    """Everything found wrong with one spec file."""

    path: str
    problems: list[Problem] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return not any(p.severity == "error" for p in self.problems)

    @property
    def errors(self) -> int:
        return sum(p.severity == "error" for p in self.problems)

    @property
    def warnings(self) -> int:
        return sum(p.severity == "warning" for p in self.problems)

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "valid": self.valid, "problems": [p.as_dict() for p in self.problems]}


# --- which files ----------------------------------------------------------------------------


def expand_paths(args: Iterable[str]) -> list[Path]:
    """Files, folders (their .yaml/.yml files, recursively) and globs, in a stable order, once each."""
    found: list[Path] = []
    seen: set[str] = set()

    def add(path: Path) -> None:
        key = os.path.normpath(path)
        if key not in seen:
            seen.add(key)
            found.append(path)

    for arg in args:
        matches = sorted(glob.glob(arg, recursive=True)) if glob.has_magic(arg) else [arg]
        if not matches:
            raise UsageError(f"{arg}: no file matches this pattern")
        for match in matches:
            path = Path(match)
            if path.is_dir():
                for root, dirs, files in os.walk(path):
                    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                    for name in sorted(files):
                        if name.endswith(SPEC_SUFFIXES):
                            add(Path(root) / name)
            elif path.exists():
                add(path)
            else:
                raise UsageError(f"{arg}: no such file or folder")
    return found


# --- the declared machine -------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def find_gpu(name: str | None) -> GpuModel | None:
    """The GPU catalogue's entry for a name; cached, since a catalogue of specs names few GPUs."""
    return hardware.find_gpu(name)


def declared_machine(loaded: LoadedSpec) -> Machine:
    """The machine the spec says it trains on; validation must not depend on the computer CI uses."""
    compute = loaded.spec.compute
    known = find_gpu(compute.gpu)
    vram = compute.vram_gb or (known.vram_gb if known else None)
    gpus = GpuReport(problem="not checked")
    if vram is not None:
        name = known.name if known else (compute.gpu or "declared GPU")
        gpus = GpuReport(gpus=(Gpu(0, name, vram, vram, known.capability if known else None),))
    return Machine(hostname="validate", system="any", cpus=1, ram_gb=1e6, gpus=gpus)


def empty_listing(folder: Path) -> DatasetListing:
    """A dataset listing for a folder not looked at (--schema-only, or a folder that is missing)."""
    return DatasetListing(folder, (), (), (), 0)


# --- dataset facts ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One problem with a file the spec points at, before it is located in a spec."""

    message: str
    fix: str
    severity: str = "error"


@dataclass(frozen=True)
class DatasetFacts:
    listing: DatasetListing | None  # None when the folder cannot be listed
    findings: tuple[Finding, ...]


def _names(items: Iterable[str], limit: int = 3) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def shown(path: Path) -> str:
    """A path as people read it: relative to the current folder when inside it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def check_dataset(folder: Path, caption_extension: str) -> DatasetFacts:
    """Pictures and captions of a dataset folder, by name and caption text (pictures never opened).

    Missing captions: a picture without one is trained with an empty caption, so the LoRA learns
    it as "anything" and leaks into every prompt — a warning, because training still works and an
    artist may mean it. When *no* picture has a caption, the caption extension is almost always
    wrong (or the captions were never written): an error, since nothing would tell the LoRA what
    it is learning. A caption that is not UTF-8 is an error: the dry run stops on it anyway.
    """
    try:
        listing = list_dataset(folder, caption_extension)
        entries = sorted(e.name for e in os.scandir(folder) if not e.name.startswith(".") and e.is_file())
    except OSError as exc:
        return DatasetFacts(
            None,
            (
                Finding(
                    f"the dataset folder {shown(folder)} cannot be read ({exc.strerror})",
                    "make it readable by your user",
                ),
            ),
        )
    findings: list[Finding] = []
    if not listing.images:
        fix = "put your .png, .jpg or .webp pictures (with their captions) in that folder"
        nested = _folders_with_pictures(folder)
        if nested:
            fix = f"your pictures are in {_names(nested)} inside it: point `dataset.path` at that folder"
        findings.append(Finding(f"the dataset folder {shown(folder)} has no pictures", fix))
        return DatasetFacts(listing, tuple(findings))

    missing = listing.missing_captions
    if len(missing) == len(listing.images):
        others = sorted(
            {Path(n).suffix for n in entries if Path(n).suffix and not n.lower().endswith(IMAGE_EXTENSIONS)}
        )
        hint = f" (the folder has {', '.join(others)} files)" if others else ""
        findings.append(
            Finding(
                f"none of the {len(listing.images)} pictures has a {caption_extension} caption{hint}",
                "write a caption for each picture (picture1.png → picture1"
                f"{caption_extension}), or set `dataset.caption_extension` to your captions' extension",
            )
        )
    elif missing:
        findings.append(
            Finding(
                f"{_plural(len(missing), 'picture')} of {len(listing.images)} "
                f"{'has' if len(missing) == 1 else 'have'} no {caption_extension} caption: {_names(missing)}",
                "a picture without a caption is learned as 'anything' and leaks into every prompt: "
                "write its caption, or remove the picture",
                "warning",
            )
        )

    empty: list[str] = []
    unreadable: list[str] = []
    for caption in listing.captions:
        try:
            raw = (folder / caption).read_bytes()
        except OSError:
            unreadable.append(caption)
            continue
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            unreadable.append(caption)
            continue
        if not text.strip():
            empty.append(caption)
    if unreadable:
        findings.append(
            Finding(
                f"{_plural(len(unreadable), 'caption')} cannot be read as UTF-8 text: {_names(unreadable)}",
                "save the caption files as UTF-8 in your editor (or convert them: iconv -f latin1 -t utf-8)",
            )
        )
    if empty:
        findings.append(
            Finding(
                f"{_plural(len(empty), 'caption')} {'is' if len(empty) == 1 else 'are'} empty: {_names(empty)}",
                "an empty caption teaches the picture as 'anything': describe what is in the picture",
                "warning",
            )
        )

    stems = {Path(n).stem for n in listing.images}
    orphans = [n for n in entries if n.endswith(caption_extension) and n[: -len(caption_extension)] not in stems]
    if orphans:
        findings.append(
            Finding(
                f"{_plural(len(orphans), 'caption')} {'has' if len(orphans) == 1 else 'have'} no picture: "
                f"{_names(orphans)}",
                "a picture was probably renamed or removed: rename the caption to match it, or delete the caption",
                "warning",
            )
        )
    return DatasetFacts(listing, tuple(findings))


def _folders_with_pictures(folder: Path) -> list[str]:
    """Subfolders holding pictures (kohya's `10_mychar` layout), to point the artist at them."""
    found = []
    try:
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.is_dir() and not entry.name.startswith("."):
                with os.scandir(entry.path) as inner:
                    if any(i.name.lower().endswith(IMAGE_EXTENSIONS) for i in inner):
                        found.append(entry.name)
    except OSError:
        return []
    return found


# --- model facts ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFacts:
    """What a base model on disk looks like, judged without loading its weights."""

    listing: ModelListing
    detected: str | None  # a family, "lora", "vae", "text_encoder", or None when unknown
    evidence: str  # why, in words ("its layers", "its model_index.json")
    damage: Finding | None  # a file that cannot be a usable model at all


def check_model(path: Path) -> ModelFacts:
    """Look at a base model's files: format, completeness, what it is (never the weights)."""
    listing = list_model(path)
    if listing.kind == "missing":
        return ModelFacts(listing, None, "", None)
    if listing.kind in ("diffusers", "folder"):
        return _check_model_folder(listing)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _check_safetensors(listing)
    if suffix == ".gguf":
        with open(path, "rb") as handle:
            magic = handle.read(4)
        if magic != b"GGUF":
            damage = Finding(
                "the file does not start like a GGUF model (the download may have saved something else)",
                "download the model again",
            )
            return ModelFacts(listing, None, "", damage)
    if suffix not in SINGLE_FILE_SUFFIXES:
        damage = Finding(
            f"a base model is a .safetensors file or a diffusers folder, not a {suffix or 'file without extension'}",
            "point `base_model.path` at the model's .safetensors file or its diffusers folder",
        )
        return ModelFacts(listing, None, "", damage)
    # .ckpt/.pt/.bin are Python pickles: reading their contents would mean running them. Size only.
    return ModelFacts(listing, None, "", None)


def _check_safetensors(listing: ModelListing) -> ModelFacts:
    path = listing.path
    try:
        with open(path, "rb") as handle:
            start = handle.read(16)
        header = safetensors_header(path)
    except ValueError as exc:
        message = str(exc)
        if start.lstrip()[:1] == b"<":
            message = "the file is a web page, not a model (the download saved an error or login page)"
        elif start[:2] == b"PK":
            message = "the file is a zip archive (a .ckpt saved by PyTorch?), not a safetensors model"
        return ModelFacts(listing, None, "", Finding(message, "download the model again from its original page"))
    (header_len,) = struct.unpack("<Q", start[:8])
    tensors = {k: v for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}
    end = 0
    for info in tensors.values():
        offsets = info.get("data_offsets")
        if isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets):
            end = max(end, offsets[1])
    expected = 8 + header_len + end
    if listing.bytes < expected:
        damage = Finding(
            f"the file is incomplete: {listing.bytes / GB:.2f} GB of the {expected / GB:.2f} GB its header "
            "announces (the download probably stopped early)",
            "download the model again",
        )
        return ModelFacts(listing, None, "", damage)
    metadata = header.get("__metadata__")
    detected = detect_family(tensors, metadata if isinstance(metadata, dict) else {})
    return ModelFacts(listing, detected, "its layers", None)


def detect_family(tensors: dict[str, Any], metadata: dict[str, Any]) -> str | None:
    """What a safetensors file holds, from its tensor names and shapes."""
    names = list(tensors)
    if any("ss_network_module" in str(k) for k in metadata) or any(
        part in name
        for name in names
        for part in ("lora_up.", "lora_down.", ".lora_A.", ".lora_B.", "lora_unet_", "lora_te", ".hada_w1", ".lokr_w1")
    ):
        return "lora"

    def has(*parts: str) -> bool:
        return any(any(p in n for p in parts) for n in names)

    if has("double_blocks.", "single_transformer_blocks."):
        return "flux"
    for name, info in tensors.items():
        shape = info.get("shape")
        if name.endswith("attn2.to_k.weight") and isinstance(shape, list) and len(shape) == 2:
            family = CONTEXT_DIM_FAMILY.get(shape[1])
            if family:
                return family
    if has("conditioner.embedders.1.", "label_emb.", "add_embedding.linear_1"):
        return "sdxl"
    if has("model.diffusion_model.input_blocks.", "cond_stage_model."):
        return "sd15"
    if has("encoder.down.", "decoder.up.", "encoder.down_blocks.", "decoder.up_blocks.") and not has(
        "diffusion_model", "down_blocks.0.attentions"
    ):
        return "vae"
    if has("text_model.encoder.", "encoder.block.", "shared.weight") and not has("diffusion_model"):
        return "text_encoder"
    return None


def _check_model_folder(listing: ModelListing) -> ModelFacts:
    index_file = listing.path / "model_index.json"
    if listing.kind == "folder":
        safetensors = [f.name for f in listing.files if f.suffix == ".safetensors"]
        fix = (
            f"point `base_model.path` at the model file inside it ({_names(safetensors)})"
            if safetensors
            else "point `base_model.path` at a diffusers model folder (one with a model_index.json) or a model file"
        )
        damage = Finding("the folder is not a diffusers model (it has no model_index.json)", fix)
        return ModelFacts(listing, None, "", damage)
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        index = None
    if not isinstance(index, dict):
        damage = Finding("the model's model_index.json cannot be read", "download or convert the model again")
        return ModelFacts(listing, None, "", damage)
    denoiser = "transformer" if "transformer" in index else "unet"
    if not (listing.path / denoiser).is_dir():
        damage = Finding(f"the model is incomplete: its {denoiser} folder is missing", "download the model again")
        return ModelFacts(listing, None, "", damage)
    detected = DIFFUSERS_PIPELINES.get(str(index.get("_class_name", "")))
    return ModelFacts(listing, detected, "its model_index.json", None)


def model_findings(facts: ModelFacts, family: str) -> list[tuple[FieldPath, Finding]]:
    """Problems of a model for a spec that declares `family`, with the field each is about."""
    path_field: FieldPath = ("base_model", "path")
    if facts.damage is not None:
        return [(path_field, facts.damage)]
    size = facts.listing.bytes
    detected = facts.detected
    words = FAMILY_WORDS[family]
    if detected == "lora":
        return [
            (
                path_field,
                Finding(
                    f"this file is a LoRA ({size / 1e6:.0f} MB), not a base model",
                    f"point `base_model.path` at the full {words} model your LoRA is trained on",
                ),
            )
        ]
    if detected in ("vae", "text_encoder"):
        part = "a VAE" if detected == "vae" else "a text encoder"
        fix = "put this file in `base_model.vae`, and point" if detected == "vae" else "point"
        return [
            (
                path_field,
                Finding(
                    f"this file is only {part}, not a whole base model",
                    f"{fix} `base_model.path` at the full {words} model",
                ),
            )
        ]
    declared = "sdxl" if family == "pony" else family
    if detected is not None and detected != declared:
        return [
            (
                ("base_model", "family"),
                Finding(
                    f"the model looks like {FAMILY_WORDS[detected]} ({facts.evidence} say so), "
                    f"but `family: {family}` says {words}",
                    f"set `family: {detected}`"
                    + (" (or pony for a Pony model)" if detected == "sdxl" else "")
                    + f", or point `base_model.path` at a {words} model",
                ),
            )
        ]
    if facts.listing.kind == "file":
        usual_low, usual_high, low, high = SIZE_BANDS[family]
        if not low * GB <= size <= high * GB:
            return [
                (
                    path_field,
                    Finding(
                        f"the file is {size / GB:.2f} GB; {words} models are usually {usual_low:g}–{usual_high:g} GB",
                        "check that this is the full base model, not a LoRA, a VAE or a partial download",
                        "warning",
                    ),
                )
            ]
    return []


# --- the validator ----------------------------------------------------------------------------


class Validator:
    """Validates specs, reading each dataset folder and model file once per run."""

    def __init__(self, *, schema_only: bool = False) -> None:
        self.schema_only = schema_only
        self._datasets: dict[tuple[Path, str], DatasetFacts] = {}
        self._models: dict[Path, ModelFacts] = {}

    def validate(self, path: Path) -> SpecReport:
        """Every problem of one spec file; never raises for anything the file holds."""
        report = SpecReport(str(path))
        try:
            loaded = load_spec(path, check_files=False)
        except SpecError as exc:
            report.problems.extend(exc.problems)
            return report
        try:
            report.problems.extend(self.problems(loaded))
        except Exception as exc:  # a bug must not hide the other specs' results behind a traceback
            report.problems.append(
                Problem(
                    loaded.source.file,
                    1,
                    1,
                    (),
                    f"lorabuild could not finish checking this spec ({type(exc).__name__}: {exc})",
                    "this is a bug in lorabuild: please report it with this spec",
                )
            )
        return report

    def problems(self, loaded: LoadedSpec) -> list[Problem]:
        """Problems of a spec that passed the schema: paths, dataset, model, plan."""
        return self.check(loaded)[0]

    def check(self, loaded: LoadedSpec) -> tuple[list[Problem], Plan | None]:
        """The problems, and the plan they were found with (None when a path made planning impossible)."""
        problems = path_problems(loaded)
        if problems:
            return problems, None  # a path that cannot exist cannot be looked at or planned
        spec = loaded.spec
        folder = loaded.resolve(spec.dataset.path)
        listing: DatasetListing | None = None
        model: ModelListing | None = None
        if not self.schema_only:
            missing_folder = file_problems(loaded)
            problems.extend(missing_folder)
            if not missing_folder:
                facts = self.dataset(folder, spec.dataset.caption_extension)
                listing = facts.listing
                problems.extend(_locate(loaded, ("dataset", "path"), f) for f in facts.findings)
            problems.extend(self._model_problems(loaded))
            model_path = model_listing_path(loaded)
            model = self.model(model_path).listing if model_path is not None else None
        plan = plan_for_validation(loaded, listing or empty_listing(folder), model)
        problems.extend(plan_problems(loaded, plan, dataset_known=bool(listing and listing.images)))
        return problems, plan

    def dataset(self, folder: Path, caption_extension: str) -> DatasetFacts:
        key = (folder, caption_extension)
        if key not in self._datasets:
            self._datasets[key] = check_dataset(folder, caption_extension)
        return self._datasets[key]

    def model(self, path: Path) -> ModelFacts:
        if path not in self._models:
            try:
                self._models[path] = check_model(path)
            except OSError as exc:
                listing = ModelListing(path, "file", (path,), 0)
                damage = Finding(f"the model cannot be read ({exc.strerror})", "make it readable by your user")
                self._models[path] = ModelFacts(listing, None, "", damage)
        return self._models[path]

    def _model_problems(self, loaded: LoadedSpec) -> list[Problem]:
        spec = loaded.spec
        path = model_listing_path(loaded)
        if path is None or spec.base_model.family is None:
            return []  # the demo model is created by lorabuild itself
        facts = self.model(path)
        if facts.listing.kind == "missing":
            if spec.compute.target != "local":
                return []  # the path is on the remote machine
            finding = Finding(
                f"the base model {shown(path)} was not found here",
                "fine if it lives on the training machine; otherwise check the path",
                "warning",
            )
            return [_locate(loaded, ("base_model", "path"), finding)]
        return [_locate(loaded, where, f) for where, f in model_findings(facts, spec.base_model.family)]


def _locate(loaded: LoadedSpec, where: FieldPath, finding: Finding) -> Problem:
    line, col = loaded.locate(where)
    return Problem(loaded.source.file, line, col, where, finding.message, finding.fix, finding.severity)


def path_problems(loaded: LoadedSpec) -> list[Problem]:
    """Paths no file system can hold (a NUL byte, a name too long): reported, never looked up."""
    problems = []
    for where in PATH_FIELDS:
        value: Any = loaded.spec
        for part in where:
            value = getattr(value, str(part), None)
        if not isinstance(value, str):
            continue
        if "\x00" in value:
            finding = Finding("the path holds a NUL character (\\0), which no file name can", "remove it from the path")
        elif len(value.encode()) > PATH_MAX or any(len(p.encode()) > NAME_MAX for p in value.split("/")):
            finding = Finding(
                f"the path is too long for a file system (a name over {NAME_MAX} bytes, or over {PATH_MAX} in all)",
                "use shorter folder and file names",
            )
        else:
            continue
        problems.append(_locate(loaded, where, finding))
    return problems


def plan_for_validation(loaded: LoadedSpec, listing: DatasetListing, model: ModelListing | None) -> Plan:
    """The plan for the machine the spec declares (see `declared_machine`)."""
    return make_plan(loaded, declared_machine(loaded), listing, model, grimoire=loaded.folder / "grimoire")


def plan_problems(loaded: LoadedSpec, plan: Plan, *, dataset_known: bool) -> list[Problem]:
    """The plan's range, backend and (declared) memory problems, located in the spec."""
    compute = loaded.spec.compute
    declared_gpu = bool(compute.vram_gb or find_gpu(compute.gpu))
    problems = []
    if compute.gpu and not declared_gpu:
        line, col = loaded.locate(("compute", "gpu"))
        problems.append(
            Problem(
                loaded.source.file,
                line,
                col,
                ("compute", "gpu"),
                f"lorabuild does not know how much memory a {compute.gpu!r} has, so the memory estimate "
                f"({plan.estimates.memory_needed_gb:g} GB with the safety margin) was not checked",
                "add `vram_gb:` to `compute` with the card's memory in GB",
                severity="warning",
            )
        )
    for issue in plan.problems:
        if issue.kind == "memory" and not declared_gpu:
            continue  # no GPU declared: nothing to compare the estimate with
        if issue.kind == "unavailable":
            continue  # a valid spec for something this version of lorabuild cannot run yet
        if issue.kind == "dataset":
            continue  # check_dataset reports the dataset's contents
        if not dataset_known and issue.field == ("training", "lr_warmup_steps"):
            continue  # compared with the number of steps, unknown without the pictures
        line, col = locate_issue(loaded, issue)
        problems.append(Problem(loaded.source.file, line, col, issue.field, issue.message, issue.fix))
    return problems


def validate_paths(paths: Iterable[Path], *, schema_only: bool = False) -> list[SpecReport]:
    validator = Validator(schema_only=schema_only)
    return [validator.validate(path) for path in paths]


def validate_spec(path: Path, *, schema_only: bool = False) -> SpecReport:
    return Validator(schema_only=schema_only).validate(path)


def exit_code(reports: list[SpecReport]) -> int:
    return 0 if all(r.valid for r in reports) else 1


# --- output -----------------------------------------------------------------------------------


def summary(reports: list[SpecReport]) -> dict[str, int]:
    return {
        "specs": len(reports),
        "valid": sum(r.valid for r in reports),
        "invalid": sum(not r.valid for r in reports),
        "errors": sum(r.errors for r in reports),
        "warnings": sum(r.warnings for r in reports),
    }


def summary_line(reports: list[SpecReport]) -> str:
    s = summary(reports)
    line = f"{_plural(s['specs'], 'spec')} checked: {s['valid']} valid, {s['invalid']} invalid"
    if s["warnings"]:
        line += f" ({_plural(s['warnings'], 'warning')})"
    return line


def render_text(reports: list[SpecReport]) -> list[str]:
    return [p.render() for r in reports for p in r.problems]


def render_json(reports: list[SpecReport]) -> str:
    return json.dumps({"specs": [r.as_dict() for r in reports], "summary": summary(reports)}, indent=2)


def github_data(text: str) -> str:
    """Escape a workflow command's message (GitHub's rules: %, CR and LF)."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def github_property(text: str) -> str:
    """Escape a workflow command's property value: the message's rules plus `:` and `,`."""
    return github_data(text).replace(":", "%3A").replace(",", "%2C")


def render_github(reports: list[SpecReport]) -> list[str]:
    """One `::error`/`::warning` workflow command per problem: annotations on the pull request."""
    lines = []
    for report in reports:
        for p in report.problems:
            props = ",".join(
                f"{key}={github_property(str(value))}"
                for key, value in (("file", p.file), ("line", p.line), ("col", p.col), ("title", p.dotted))
            )
            lines.append(f"::{p.severity} {props}::{github_data(f'{p.message} — {p.fix}')}")
    return lines
