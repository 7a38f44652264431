"""Reading specs: safe YAML with source locations, composition, and located validation errors.

Every problem is reported as ``path/spec.yaml:LINE:COL: dotted.key: message`` (1-based line and column),
all problems of a file at once. YAML is composed with PyYAML's safe loader (no object construction);
duplicate and unknown keys are errors. Composition: ``base: other.yaml`` (a path relative to the file, or
a shipped spec name) is deep-merged under the file, and ``--set key=value`` overrides go on top; all of it
is validated by the same schema, and each value keeps the location it came from.
"""

from __future__ import annotations

import difflib
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class Loc:
    file: str
    line: int
    col: int


@dataclass(frozen=True)
class Problem:
    loc: Loc
    key: str
    message: str

    def __str__(self) -> str:
        key = f"{self.key}: " if self.key else ""
        return f"{self.loc.file}:{self.loc.line}:{self.loc.col}: {key}{self.message}"


class SpecError(Exception):
    """One or more located problems in a spec; ``str()`` gives one line per problem."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


Path_ = tuple[str | int, ...]
Locs = dict[Path_, Loc]


# ------------------------------------------------------------------------------------ shipped specs
def shipped_dir(kind: str = "models") -> Path:
    """The folder of shipped specs of a kind (``models`` or ``searches``)."""
    # `specs/` is installed (or, editable, lives) beside this package.
    return Path(__file__).resolve().parent.parent / "specs" / kind


def shipped_names(kind: str = "models") -> list[str]:
    return sorted(p.stem for p in shipped_dir(kind).glob("*.yaml"))


def resolve(path_or_name: str | Path, kind: str = "models", relative_to: Path | None = None) -> Path:
    """A spec file: an existing path, else a path relative to `relative_to`, else a shipped spec name."""
    p = Path(path_or_name)
    candidates = [p] if p.is_absolute() else ([relative_to / p] if relative_to else []) + [p]
    for c in candidates:
        if c.is_file():
            return c
    name = p.name.removesuffix(".yaml")
    shipped = shipped_dir(kind) / f"{name}.yaml"
    if shipped.is_file() and (p.parent == Path(".") or not p.parent.exists()):
        return shipped
    here = Loc(str(path_or_name), 1, 1)
    if candidates[0].exists():
        raise SpecError([Problem(here, "", "is not a file")])
    names = shipped_names(kind)
    hint = difflib.get_close_matches(name, names, n=1)
    hint_s = f"; did you mean {hint[0]!r}?" if hint else f"; shipped {kind} specs: {', '.join(names)}"
    raise SpecError([Problem(here, "", f"no such file or shipped spec{hint_s}")])


# ------------------------------------------------------------------------------------------ parsing
def _mark(file: str, mark: Any) -> Loc:
    return Loc(file, mark.line + 1, mark.column + 1)


def _dotted(path: Path_) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def parse_yaml(text: str, file: str, soft: list[Problem] | None = None) -> tuple[Any, Locs]:
    """Compose YAML safely and return plain data plus the location of every key and item.

    Problems that leave the document readable (duplicate keys: the first value is kept) go to `soft`
    when given, so they are reported together with the schema's problems; otherwise they raise.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        loc = _mark(file, mark) if mark else Loc(file, 1, 1)
        what = " ".join(s for s in (e.context, e.problem) if s)
        raise SpecError([Problem(loc, "", f"YAML syntax error: {what}")]) from None
    except yaml.YAMLError as e:  # reader errors: control characters, bad encoding
        mark = getattr(e, "position", None)
        line = text.count("\n", 0, mark) + 1 if isinstance(mark, int) else 1
        raise SpecError([Problem(Loc(file, line, 1), "", f"not a YAML text file ({e})")]) from None
    finally:
        loader.dispose()
    locs: Locs = {}
    problems: list[Problem] = []
    if node is None:
        return None, locs

    def walk(n: yaml.Node, path: Path_) -> Any:
        if isinstance(n, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for k_node, v_node in n.value:
                if k_node.tag == "tag:yaml.org,2002:merge":
                    problems.append(
                        Problem(_mark(file, k_node.start_mark), _dotted(path), "YAML merge keys (<<) are not supported; use `base:`")
                    )
                    continue
                key = walk(k_node, path)
                if not isinstance(key, str | int | float | bool) or key is None:
                    problems.append(Problem(_mark(file, k_node.start_mark), _dotted(path), f"key {key!r} must be a string"))
                    continue
                key = str(key) if not isinstance(key, str) else key
                sub = (*path, key)
                if key in out:
                    first = locs[sub]
                    problems.append(
                        Problem(_mark(file, k_node.start_mark), _dotted(sub), f"duplicate key (first given at line {first.line})")
                    )
                    continue
                locs[sub] = _mark(file, k_node.start_mark)
                out[key] = walk(v_node, sub)
            return out
        if isinstance(n, yaml.SequenceNode):
            items = []
            for i, item in enumerate(n.value):
                locs[(*path, i)] = _mark(file, item.start_mark)
                items.append(walk(item, (*path, i)))
            return items
        try:
            return loader.construct_object(n, deep=True)
        except yaml.YAMLError as e:
            problems.append(Problem(_mark(file, n.start_mark), _dotted(path), f"cannot read value: {getattr(e, 'problem', e)}"))
            return None

    data = walk(node, ())
    locs.setdefault((), _mark(file, node.start_mark))
    if problems and soft is None:
        raise SpecError(problems)
    if soft is not None:
        soft.extend(problems)
    return data, locs


def read_yaml(path: Path, soft: list[Problem] | None = None) -> tuple[Any, Locs]:
    """Read and parse a YAML file; unreadable or binary files give one located problem."""
    file = str(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise SpecError([Problem(Loc(file, 1, 1), "", f"cannot read file: {e.strerror or e}")]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise SpecError([Problem(Loc(file, line, 1), "", "not a UTF-8 text file (binary data?)")]) from None
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise SpecError([Problem(Loc(file, line, 1), "", "not a text file (contains NUL bytes)")])
    return parse_yaml(text, file, soft)


# -------------------------------------------------------------------------------------- composition
def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        b = out.get(k)
        same_kind = not (isinstance(v, dict) and isinstance(b, dict) and "kind" in v and v.get("kind") != b.get("kind"))
        out[k] = _merge(b, v) if isinstance(b, dict) and isinstance(v, dict) and same_kind else v
    return out


def load_document(
    path: Path, kind: str = "models", soft: list[Problem] | None = None, _seen: tuple[Path, ...] = ()
) -> tuple[dict, Locs]:
    """A spec file as a mapping with locations, with its ``base:`` chain merged underneath."""
    data, locs = read_yaml(path, soft)
    file = str(path)
    if data is None:
        raise SpecError([Problem(Loc(file, 1, 1), "", "empty spec; see `moeforge schema` for the keys")])
    if not isinstance(data, dict):
        raise SpecError([Problem(locs[()], "", f"the spec must be a mapping of keys, not a {type(data).__name__}")])
    base_ref = data.pop("base", None)
    if base_ref is None:
        return data, locs
    base_loc = locs.pop(("base",))
    if not isinstance(base_ref, str):
        raise SpecError([Problem(base_loc, "base", "must be a file path or shipped spec name")])
    try:
        base_path = resolve(base_ref, kind, relative_to=path.parent)
    except SpecError as e:
        raise SpecError([Problem(base_loc, "base", f"{base_ref!r}: {e.problems[0].message}")]) from None
    if base_path.resolve() in _seen or base_path.resolve() == path.resolve():
        raise SpecError([Problem(base_loc, "base", f"{base_ref!r} inherits from itself (a cycle)")])
    base_data, base_locs = load_document(base_path, kind, soft, (*_seen, path.resolve()))
    merged = _merge(base_data, data)
    # Locations: a key's own file wins; inherited keys point into the base file.
    all_locs = {**base_locs, **locs}
    return merged, all_locs


def apply_overrides(data: dict, locs: Locs, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply ``key.sub=value`` overrides (values parsed as YAML scalars or flow collections)."""
    data = _merge({}, data)
    problems = []
    for ov in overrides:
        where = f"<--set {ov}>"
        key, eq, raw = ov.partition("=")
        if not eq or not key.strip():
            problems.append(Problem(Loc(where, 1, 1), "", "expected key=value, e.g. --set moe.top_k=4"))
            continue
        try:
            value, _ = parse_yaml(raw, where)
        except SpecError as e:
            problems.extend(e.problems)
            continue
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            nxt = node.get(p)
            if not isinstance(nxt, dict):
                nxt = node[p] = {}
            node = nxt
        node[parts[-1]] = value
        path = tuple(parts)
        for i in range(1, len(path) + 1):
            locs.setdefault(path[:i], Loc(where, 1, len(key) + 2))
        locs[path] = Loc(where, 1, len(key) + 2)
    if problems:
        raise SpecError(problems)
    return data


# ---------------------------------------------------------------------------------------- validation
def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out: list[type[BaseModel]] = []
    for a in typing.get_args(annotation):
        out += _models_in(a)
    return out


def _model_at(cls: type[BaseModel], data: Any, path: Path_) -> type[BaseModel] | None:
    """The pydantic model class that validates `data` at `path` (discriminated by `kind`)."""
    for key in path:
        if isinstance(key, int) or key not in cls.model_fields:
            return None
        data = data.get(key) if isinstance(data, dict) else None
        options = _models_in(cls.model_fields[key].annotation)
        if not options:
            return None
        kind = data.get("kind") if isinstance(data, dict) else None
        match = [m for m in options if "kind" in m.model_fields and kind in typing.get_args(m.model_fields["kind"].annotation)]
        cls = (match or options)[0]
    return cls


def _data_path(loc: tuple, data: Any) -> Path_:
    """Map a pydantic error location onto the data, dropping union tags and validator names."""
    out: list[str | int] = []
    for p in loc:
        if isinstance(data, dict) and p in data:
            out.append(p)
            data = data[p]
        elif isinstance(data, list) and isinstance(p, int) and p < len(data):
            out.append(p)
            data = data[p]
        elif isinstance(data, dict) and isinstance(p, str) and not re.search(r"[\[\]-]", p) and p not in _UNION_TAGS:
            out.append(p)  # a missing or unknown key: keep it for the message
            data = None
    return tuple(out)


_UNION_TAGS = {"mha", "gqa", "mla", "rope", "learned", "none", "int", "float", "str", "bool", "tuple", "list"}


def _locate(locs: Locs, path: Path_) -> Loc:
    for i in range(len(path), -1, -1):
        if path[:i] in locs:
            return locs[path[:i]]
    return next(iter(locs.values()), Loc("<spec>", 1, 1))


_KEY_MSG = re.compile(r"^([A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)*): (.*)$", re.S)


def validate(cls: type[M], data: dict, locs: Locs, soft: list[Problem] | None = None) -> M:
    """Validate `data` against `cls`, turning every pydantic error into a located Problem.

    `soft` problems found while reading (duplicate keys) are reported with the schema's.
    """
    try:
        result = cls.model_validate(data)
    except ValidationError as e:
        problems = list(soft or [])
        for err in e.errors(include_url=False):
            path = _data_path(err["loc"], data)
            msg = err["msg"].removeprefix("Value error, ")
            m = _KEY_MSG.match(msg)
            if err["type"] == "value_error" and m:
                # Our validators name the key they complain about, relative to where they run.
                path = (*path, *m.group(1).split("."))
                msg = m.group(2)
            elif err["type"] == "extra_forbidden":
                parent = _model_at(cls, data, path[:-1])
                known = list(parent.model_fields) if parent else []
                close = difflib.get_close_matches(str(path[-1]), known, n=1)
                msg = f"unknown key; did you mean {close[0]!r}?" if close else f"unknown key; allowed: {', '.join(known)}"
            elif err["type"] == "missing":
                msg = "required key is missing"
            elif "input" in err and err["type"] not in ("union_tag_invalid", "model_attributes_type"):
                msg = f"{msg} (got {_short(err['input'])})"
            problems.append(Problem(_locate(locs, path), _dotted(path), msg))
        problems.sort(key=lambda p: (p.loc.file, p.loc.line, p.loc.col))
        raise SpecError(problems) from None
    if soft:
        raise SpecError(list(soft))
    return result


def _short(value: Any) -> str:
    s = repr(value)
    return s if len(s) <= 60 else s[:57] + "..."


def load_validated(cls: type[M], path_or_name: str | Path, kind: str, overrides: list[str] | tuple[str, ...] = ()) -> M:
    """Resolve, read, compose, override and validate one spec file."""
    path = resolve(path_or_name, kind)
    soft: list[Problem] = []
    data, locs = load_document(path, kind, soft)
    if overrides:
        data = apply_overrides(data, locs, overrides)
    return validate(cls, data, locs, soft)

