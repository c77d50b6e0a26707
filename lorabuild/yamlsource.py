"""Reading YAML safely, with a line and column for every value, and plain-language problems.

Owns everything between the bytes of a spec file and a Python mapping: size and encoding
checks, duplicate keys, alias bombs, a single document, and the map from a field path such as
`training.epochs` back to `file:line:col`. It also turns pydantic's validation errors into
`Problem`s that say what is wrong and how to fix it.
"""

from __future__ import annotations

import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MAX_SPEC_BYTES = 1024 * 1024  # a spec is a few hundred bytes; anything this big is a wrong file
MAX_EXPANDED_NODES = 20_000  # YAML aliases can make a tiny file expand to billions of values

FieldPath = tuple[str | int, ...]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a spec, located in its file."""

    file: str
    line: int
    col: int
    field_path: FieldPath
    message: str
    fix: str
    severity: str = "error"  # or "warning"

    @property
    def dotted(self) -> str:
        return dotted(self.field_path)

    def render(self) -> str:
        where = f"{self.file}:{self.line}:{self.col}"
        prefix = "warning: " if self.severity == "warning" else ""
        return f"{where}: {self.dotted}: {prefix}{self.message} — {self.fix}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "line": self.line,
            "col": self.col,
            "field": self.dotted,
            "message": self.message,
            "fix": self.fix,
            "severity": self.severity,
        }


class SpecError(Exception):
    """A spec that cannot be used; carries every problem found."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(p.render() for p in problems))


def dotted(path: FieldPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(spec)"


@dataclass
class SourceMap:
    """Where each value of a parsed YAML document sits in its file."""

    file: str
    root: yaml.Node | None
    _cache: dict[FieldPath, tuple[int, int]] = field(default_factory=dict)

    def node_at(self, path: FieldPath) -> tuple[yaml.Node | None, int]:
        """The deepest node along `path`, and how many parts of the path it consumed."""
        node = self.root
        used = 0
        for part in path:
            child = _child(node, part)
            if child is None:
                break
            node = child
            used += 1
        return node, used

    def locate(self, path: FieldPath) -> tuple[int, int]:
        """1-based (line, col) of the value at `path`, or of the nearest enclosing value."""
        if path in self._cache:
            return self._cache[path]
        node, used = self.node_at(path)
        if node is None:
            return (1, 1)
        pos = (node.start_mark.line + 1, node.start_mark.column + 1)
        if used < len(path) and isinstance(node, yaml.MappingNode) and node.value:
            # the missing or unknown key: point at the mapping's first key, where keys go
            first = node.value[0][0]
            pos = (first.start_mark.line + 1, first.start_mark.column + 1)
        self._cache[path] = pos
        return pos

    def locate_key(self, path: FieldPath) -> tuple[int, int]:
        """Position of the key (not the value) of the last part of `path`."""
        parent, used = self.node_at(path[:-1])
        if used == len(path) - 1 and isinstance(parent, yaml.MappingNode):
            for key, _ in parent.value:
                if isinstance(key, yaml.ScalarNode) and key.value == path[-1]:
                    return (key.start_mark.line + 1, key.start_mark.column + 1)
        return self.locate(path)

    def problem(self, path: FieldPath, message: str, fix: str, *, at_key: bool = False) -> Problem:
        line, col = self.locate_key(path) if at_key else self.locate(path)
        return Problem(self.file, line, col, path, message, fix)

    def problem_from_pydantic(self, error: Any, model: type) -> Problem:
        """A plain-language `Problem` for one entry of `ValidationError.errors()`."""
        path = tuple(p for p in error["loc"] if isinstance(p, (str, int)))
        message, fix, at_key = _translate(error, path, model)
        return self.problem(path, message, fix, at_key=at_key)

    def problems_from_pydantic(self, errors: list[Any], model: type) -> list[Problem]:
        """Every error as a `Problem`, a union's per-member complaints merged into one."""
        merged: dict[tuple[Any, ...], list[Any]] = {}
        for error in errors:
            loc = tuple(error["loc"])
            if len(loc) > 1 and loc[-1] in _UNION_MEMBERS:
                merged.setdefault(loc[:-1], []).append(error)
            else:
                merged.setdefault(loc, []).append(error)
        problems = []
        for loc, group in merged.items():
            if len(group) > 1 and all(tuple(e["loc"])[-1] in _UNION_MEMBERS for e in group):
                path = tuple(p for p in loc if isinstance(p, (str, int)))
                kinds = [_UNION_MEMBERS[tuple(e["loc"])[-1]] for e in group]
                shown = _show(group[0].get("input"))
                problems.append(
                    self.problem(
                        path, f"should be {_either(kinds)}, got {shown}", f"write {_either(kinds)}", at_key=False
                    )
                )
            else:
                problems.extend(self.problem_from_pydantic(e, model) for e in group)
        return problems


def _child(node: yaml.Node | None, part: str | int) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode) and isinstance(part, str):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value == part:
                return value
    if isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
        return node.value[part]
    return None


def read_yaml(file: Path) -> tuple[Any, SourceMap]:
    """Parse one YAML document from `file` safely; raise `SpecError` on anything unusable."""
    name = str(file)

    def fail(message: str, fix: str, line: int = 1, col: int = 1) -> SpecError:
        return SpecError([Problem(name, line, col, (), message, fix)])

    try:
        if file.is_dir():
            raise fail("this is a folder, not a spec file", "give the path of a .yaml file")
        size = file.stat().st_size
        if size > MAX_SPEC_BYTES:
            raise fail(
                f"the file is {size // 1024} KB; a spec is a short text file",
                "check that this is the right file (a training.yaml is usually under 2 KB)",
            )
        raw = file.read_bytes()
    except FileNotFoundError:
        raise fail("file not found", "check the path (it is read from the current folder)") from None
    except PermissionError:
        raise fail("permission denied", "make the file readable by your user") from None
    except OSError as exc:
        raise fail(f"cannot read the file ({exc.strerror})", "check the path and the disk") from None

    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise fail("the file is UTF-16 text, which YAML tools here do not read", "save it as UTF-8 in your editor")
    if b"\x00" in raw:
        raise fail("this is a binary file, not a text spec", "give the path of your training .yaml file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise fail(
            f"the file is not UTF-8 text (byte 0x{raw[exc.start]:02x} cannot be read)",
            "save the file as UTF-8 in your editor",
            line,
            col,
        ) from None
    text = text.removeprefix("\ufeff")

    loader = yaml.CSafeLoader(text) if hasattr(yaml, "CSafeLoader") else yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            raise fail("the spec is empty", "start from specs/example.yaml or run `lorabuild init` (see the README)")
        _check_structure(root, name)
        data = loader.construct_document(root)
    except yaml.constructor.ConstructorError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise fail(
            f"YAML tag not allowed: {exc.problem or 'a tag lorabuild does not read'}",
            "remove the `!!` or `!` tag: a spec holds plain values",
            line,
            col,
        ) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        what = exc.problem or "the YAML cannot be read"
        if "expected a single document" in str(exc):
            what = "the file holds more than one YAML document (a second '---')"
        raise fail(
            f"YAML syntax error: {what}",
            "check indentation (spaces, not tabs) and that every `key: value` has a space after the colon",
            line,
            col,
        ) from None
    except yaml.YAMLError as exc:
        raise fail(f"YAML syntax error: {exc}", "check the file's syntax") from None
    finally:
        loader.dispose()

    source = SourceMap(name, root)
    if not isinstance(data, dict):
        kinds: dict[type, str] = {
            list: "a list",
            str: "a single piece of text",
            int: "a number",
            float: "a number",
            bool: "true or false",
        }
        kind = kinds.get(type(data), f"a {type(data).__name__}")
        raise SpecError(
            [
                Problem(
                    name,
                    root.start_mark.line + 1,
                    root.start_mark.column + 1,
                    (),
                    f"a spec is a set of `key: value` settings, but this file holds {kind}",
                    "start from specs/example.yaml (version:, name:, base_model:, dataset: …)",
                )
            ]
        )
    return data, source


def _check_structure(root: yaml.Node, name: str) -> None:
    """Reject duplicate keys, non-text keys, cycles and alias expansion beyond a sane size."""
    sizes: dict[int, int] = {}
    active: set[int] = set()
    problems: list[Problem] = []

    def size(node: yaml.Node) -> int:
        ident = id(node)
        if ident in sizes:
            return sizes[ident]
        if ident in active:
            raise SpecError(
                [_at(name, node, "a YAML alias refers to itself", "remove the recursive anchor (&) / alias (*)")]
            )
        active.add(ident)
        total = 1
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, yaml.Node] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    if key.value in seen and key.tag != "tag:yaml.org,2002:merge":
                        first = seen[key.value]
                        problems.append(
                            _at(
                                name,
                                key,
                                f"`{key.value}` appears twice in the same section "
                                f"(first on line {first.start_mark.line + 1})",
                                "keep one of them; YAML would silently use only the last",
                            )
                        )
                    seen.setdefault(key.value, key)
                else:
                    problems.append(_at(name, key, "a key must be plain text", "write the key as a word"))
                total += size(key) + size(value)
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                total += size(item)
        active.discard(ident)
        sizes[ident] = total
        if total > MAX_EXPANDED_NODES:
            raise SpecError(
                [
                    _at(
                        name,
                        root,
                        f"the spec expands to more than {MAX_EXPANDED_NODES} values (YAML aliases "
                        "repeated inside each other)",
                        "write the settings out plainly without nested & anchors and * aliases",
                    )
                ]
            )
        return total

    size(root)
    if problems:
        raise SpecError(problems)


def _at(name: str, node: yaml.Node, message: str, fix: str) -> Problem:
    return Problem(name, node.start_mark.line + 1, node.start_mark.column + 1, (), message, fix)


# --- pydantic errors in plain language ------------------------------------------------------

# pydantic names the members of a `str | int | float | bool` union in the error location
_UNION_MEMBERS = {"str": "text", "int": "a number", "float": "a number", "bool": "true or false"}


def _either(kinds: list[str]) -> str:
    unique = list(dict.fromkeys(kinds))
    return ", ".join(unique[:-1]) + " or " + unique[-1] if len(unique) > 1 else unique[0]


_FIELD_HINTS: dict[str, str] = {
    "name": "use a short name of lowercase letters, digits, - and _ (it becomes a folder name), e.g. mychar",
    "caption_extension": "use the extension of your caption files, starting with a dot, e.g. .txt",
}


def _translate(error: Any, path: FieldPath, model: type) -> tuple[str, str, bool]:
    """(message, fix, point-at-key) for one pydantic error."""
    kind = error["type"]
    ctx = error.get("ctx") or {}
    value = error.get("input")
    leaf = str(path[-1]) if path else ""
    shown = _show(value)
    if kind == "missing":
        return (f"the required setting `{leaf}` is missing", f"add `{leaf}:` here (see specs/example.yaml)", False)
    if kind == "extra_forbidden":
        known = _known_keys(model, path[:-1])
        close = difflib.get_close_matches(leaf, known, n=1, cutoff=0.6)
        fix = f"did you mean `{close[0]}`?" if close else "remove it, or check the spelling"
        if known and not close:
            fix += f" (settings here: {', '.join(sorted(known))})"
        return (f"`{leaf}` is not a setting lorabuild knows", fix, True)
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return (f"should be a whole number, got {shown}", "write a whole number without quotes, e.g. 15", False)
    if kind in ("float_type", "float_parsing", "finite_number"):
        return (f"should be a number, got {shown}", "write a number without quotes, e.g. 0.0001 or 1.0e-4", False)
    if kind in ("bool_type", "bool_parsing"):
        return (f"should be true or false, got {shown}", "write true or false", False)
    if kind in ("string_type",):
        return (f"should be text, got {shown}", "write it as text, e.g. in quotes", False)
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return (
            f"should be a section of `key: value` settings, got {shown}",
            "indent the settings below this key",
            False,
        )
    if kind in ("list_type", "tuple_type"):
        return (f"should be a list, got {shown}", "write one `- item` per line", False)
    if kind in ("literal_error", "enum"):
        expected = str(ctx.get("expected", "")).replace("'", "")
        return (f"{shown} is not one of the choices", f"use one of: {expected}", False)
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        bound = ctx.get("gt", ctx.get("ge", ctx.get("lt", ctx.get("le"))))
        words = {
            "greater_than": "more than",
            "greater_than_equal": "at least",
            "less_than": "less than",
            "less_than_equal": "at most",
        }[kind]
        return (f"{shown} is out of range: it must be {words} {bound}", f"use a value of {words} {bound}", False)
    if kind == "string_pattern_mismatch":
        return (f"{shown} is not allowed here", _FIELD_HINTS.get(leaf, "check the value's format"), False)
    if kind in ("too_long", "too_short"):
        return (f"{error['msg'].lower()}", "shorten or extend the list", False)
    if kind == "value_error":
        # our own validators phrase their errors as "problem — fix"
        text = str(ctx.get("error", error["msg"]))
        problem, _, fix = text.partition(" — ")
        return (problem, fix or "check this value against specs/example.yaml", False)
    return (error["msg"], "check this value against specs/example.yaml", False)


def _show(value: object) -> str:
    if isinstance(value, dict):
        return "a section"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _known_keys(model: type, path: FieldPath) -> list[str]:
    """Field names of the section at `path` of `model` (for "did you mean")."""
    current: Any = model
    for part in path:
        fields = getattr(current, "model_fields", None)
        if not fields or not isinstance(part, str) or part not in fields:
            return []
        current = _model_in(fields[part].annotation)
    fields = getattr(current, "model_fields", None)
    return list(fields) if fields else []


def _model_in(annotation: Any) -> Any:
    if hasattr(annotation, "model_fields"):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None
