"""Reading specs: safe YAML with source locations, composition, and located validation errors.

Every problem is reported as ``path/spec.yaml:LINE:COL: dotted.key: message`` (1-based line and column),
all problems of a file at once. YAML is composed with PyYAML's safe loader (no object construction);
duplicate and unknown keys are errors. Composition: ``base: other.yaml`` (a path relative to the file, or
a shipped spec name) is deep-merged under the file (`merge_specs`: a section of another ``kind`` and the
other MoE form are replaced, not mixed), and ``--set key=value`` overrides go on top; all of it is
validated by the same schema, and each value keeps the location it came from.
"""

from __future__ import annotations

import difflib
import json
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
    """A place in a file (or in a ``<--set key=value>`` pseudo-file): 1-based line and column."""

    file: str
    line: int
    col: int


@dataclass(frozen=True)
class Problem:
    """One located problem: ``str()`` gives ``file:line:col: dotted.key: message``."""

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
"""Where each key and list item of a document was written, by its path in the data (``("moe", "top_k")``)."""


# ------------------------------------------------------------------------------------ shipped specs
def shipped_dir(kind: str = "models") -> Path:
    """The folder of shipped specs of a kind (``models`` or ``searches``)."""
    # `specs/` is installed (or, editable, lives) beside this package.
    return Path(__file__).resolve().parent.parent / "specs" / kind


def shipped_names(kind: str = "models") -> list[str]:
    """The names of the shipped specs of a kind, sorted."""
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
        what = "a directory" if candidates[0].is_dir() else "not a regular file"
        raise SpecError(
            [Problem(here, "", f"is {what}, not a spec file; give a .yaml file or a shipped spec name")]
        )
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


# Explicit tags a spec may use: plain data only. Everything else (``!!python/object/apply:...``, ``!!binary``,
# ``!!set``, local ``!tags``) is refused with a located problem; the safe loader would refuse python tags too.
_PLAIN_TAGS = {
    f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "map", "seq", "timestamp")
}
_MAX_NODES = 20_000  # aliases can expand a small file exponentially ("billion laughs")
_MAX_DEPTH = 64
_REFUSED = object()  # a value the reader refused (and reported); its key is dropped


def _tag(tag: str) -> str:
    return tag.replace("tag:yaml.org,2002:", "!!")


def _syntax_message(e: yaml.MarkedYAMLError) -> str:
    """PyYAML's error as one line, with where the enclosing construct began and a hint to fix it."""
    problem = e.problem or "invalid YAML"
    msg = f"YAML syntax error: {problem}"
    if e.context and e.context_mark is not None and e.context_mark != e.problem_mark:
        msg += f" ({e.context} at line {e.context_mark.line + 1}, column {e.context_mark.column + 1})"
    elif e.context:
        msg += f" ({e.context})"
    if "'\\t'" in problem:
        hint = "indent with spaces, not tabs"
    elif "another document" in problem:
        hint = "a spec is one YAML document; remove the `---` line"
    elif "expected ',' or" in problem:
        hint = "close the bracket, or separate items with commas"
    elif "quoted scalar" in (e.context or ""):
        hint = "close the quote"
    elif "mapping values are not allowed" in problem:
        hint = "put each `key: value` on its own line, or quote a value that contains ': '"
    elif "block end" in problem or "indentation" in problem:
        hint = "check the indentation: keys of one mapping must start in the same column"
    elif "undefined alias" in problem:
        hint = "define the anchor (&name) before using *name"
    else:
        hint = ""
    return f"{msg}; {hint}" if hint else msg


def parse_yaml(text: str, file: str, soft: list[Problem] | None = None) -> tuple[Any, Locs]:
    """Compose YAML safely and return plain data plus the location of every key and item.

    Problems that leave the document readable (duplicate keys: the first value is kept) go to `soft`
    when given, so they are reported together with the schema's problems; otherwise they raise.
    """
    try:
        loader = yaml.SafeLoader(text)
    except yaml.YAMLError as e:  # the reader checks for control characters up front
        return _reader_error(e, text, file)
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        loc = _mark(file, mark) if mark else Loc(file, 1, 1)
        raise SpecError([Problem(loc, "", _syntax_message(e))]) from None
    except yaml.YAMLError as e:  # reader errors: control characters, bad encoding
        return _reader_error(e, text, file)
    except RecursionError:
        raise SpecError([Problem(Loc(file, 1, 1), "", "YAML nested too deeply to be a spec")]) from None
    finally:
        loader.dispose()
    locs: Locs = {}
    problems: list[Problem] = []
    if node is None:
        return None, locs
    budget = [_MAX_NODES]
    active: set[int] = set()  # nodes being walked: an alias back to one of them is a cycle

    def refuse(n: yaml.Node, path: Path_, message: str) -> Any:
        problems.append(Problem(_mark(file, n.start_mark), _dotted(path), message))
        return _REFUSED

    def walk(n: yaml.Node, path: Path_) -> Any:
        budget[0] -= 1
        if budget[0] < 0:
            msg = f"the document expands to more than {_MAX_NODES} values (YAML aliases?)"
            raise SpecError([Problem(_mark(file, n.start_mark), _dotted(path), msg)])
        if id(n) in active:
            return refuse(
                n, path, "an alias refers to a value that contains it; specs are finite, plain data"
            )
        if len(path) > _MAX_DEPTH:
            return refuse(n, path, f"nested more than {_MAX_DEPTH} levels deep")
        if n.tag not in _PLAIN_TAGS:
            return refuse(
                n, path, f"YAML tag {_tag(n.tag)} is not allowed; specs are plain data (remove the tag)"
            )
        active.add(id(n))
        try:
            return walk_node(n, path)
        finally:
            active.discard(id(n))

    def walk_node(n: yaml.Node, path: Path_) -> Any:
        if isinstance(n, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for k_node, v_node in n.value:
                if k_node.tag == "tag:yaml.org,2002:merge":
                    refuse(k_node, path, "YAML merge keys (<<) are not supported; use `base:`")
                    continue
                key = walk(k_node, path)
                if key is _REFUSED:
                    continue
                if not isinstance(key, str | int | float | bool) or key is None:
                    refuse(k_node, path, f"key {_yaml_repr(key)} must be a plain name")
                    continue
                key = str(key) if not isinstance(key, str) else key
                sub = (*path, key)
                if key in out or sub in locs:
                    first = locs[sub].line
                    refuse(k_node, sub, f"duplicate key (first given at line {first}); keep one of them")
                    continue
                locs[sub] = _mark(file, k_node.start_mark)
                value = walk(v_node, sub)
                if (
                    value is not _REFUSED
                ):  # a refused value is dropped, so the schema does not report it twice
                    out[key] = value
            return out
        if isinstance(n, yaml.SequenceNode):
            items = []
            for i, item in enumerate(n.value):
                locs[(*path, i)] = _mark(file, item.start_mark)
                value = walk(item, (*path, i))
                items.append(None if value is _REFUSED else value)
            return items
        try:
            return loader.construct_object(n, deep=True)
        except (yaml.YAMLError, ValueError, OverflowError) as e:
            return refuse(n, path, f"cannot read value: {getattr(e, 'problem', e)}")

    data = walk(node, ())
    locs.setdefault((), _mark(file, node.start_mark))
    if problems and (soft is None or data is _REFUSED):
        raise SpecError(problems)
    if soft is not None:
        soft.extend(problems)
    return data, locs


def _reader_error(e: yaml.YAMLError, text: str, file: str) -> typing.NoReturn:
    pos = getattr(e, "position", None)
    line = text.count("\n", 0, pos) + 1 if isinstance(pos, int) else 1
    col = pos - (text.rfind("\n", 0, pos) + 1) + 1 if isinstance(pos, int) else 1
    char = getattr(e, "character", None)
    what = (
        f"control character {char!r}"
        if isinstance(char, str)
        else f"character #x{char:04x}"
        if isinstance(char, int)
        else "data"
    )
    raise SpecError(
        [Problem(Loc(file, line, col), "", f"not a YAML text file: unacceptable {what}; remove it")]
    ) from None


def read_yaml(path: Path, soft: list[Problem] | None = None) -> tuple[Any, Locs]:
    """Read and parse a YAML file (see `parse_yaml`): plain data and the location of every key and item.

    Raises:
        SpecError: the file is unreadable, binary or not valid YAML (one located problem).
    """
    file = str(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        hint = "; check its permissions" if isinstance(e, PermissionError) else ""
        raise SpecError(
            [Problem(Loc(file, 1, 1), "", f"cannot read file: {e.strerror or e}{hint}")]
        ) from None
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
# The fine-grained form of an MoE section; the paper form is `moe.paper`.
_FINE_MOE_KEYS = ("routed_experts", "shared_experts", "top_k", "expert_hidden")


def merge_specs(base: dict, base_locs: Locs, over: dict, over_locs: Locs) -> tuple[dict, Locs]:
    """A child model spec's data deep-merged over its base's (what ``base:`` does), with locations.

    Mappings merge key by key; anything else in `over` replaces the base's value, and so does a section
    with another ``kind`` (an ``mla`` attention replaces an ``mha`` one instead of mixing their keys).
    The two forms of an MoE section replace each other too: a child that sets ``moe.paper`` drops the
    base's fine-grained ``routed_experts``, ``shared_experts``, ``top_k`` and ``expert_hidden``, and a child
    that sets any of those drops the base's ``paper``; a child that sets both keeps both (they must agree).

    Returns:
        The merged data, and the location of each value: the child's own, else the base's; values the
        child replaced keep no location from the base.
    """
    merged = _merge(base, over)
    moe_over, moe = over.get("moe"), merged.get("moe")
    if isinstance(moe_over, dict) and isinstance(moe, dict) and isinstance(base.get("moe"), dict):
        # `paper: null` or `top_k: null` removes a key; it does not choose a form.
        sets_paper = moe_over.get("paper") is not None
        sets_fine = any(moe_over.get(k) is not None for k in _FINE_MOE_KEYS)
        if sets_paper != sets_fine:
            replaced = _FINE_MOE_KEYS if sets_paper else ("paper",)
            merged["moe"] = {k: v for k, v in moe.items() if k not in replaced}
    return merged, _prune({**base_locs, **over_locs}, merged)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        b = out.get(k)
        same_kind = not (
            isinstance(v, dict) and isinstance(b, dict) and "kind" in v and v.get("kind") != b.get("kind")
        )
        out[k] = _merge(b, v) if isinstance(b, dict) and isinstance(v, dict) and same_kind else v
    return out


def load_document(
    path: Path, kind: str = "models", soft: list[Problem] | None = None, _seen: tuple[Path, ...] = ()
) -> tuple[dict, Locs]:
    """A spec file as a mapping with locations, with its ``base:`` chain merged underneath (`merge_specs`).

    Raises:
        SpecError: the file or a base in its chain cannot be read, is not a mapping, or makes a cycle.
    """
    data, locs = read_yaml(path, soft)
    file = str(path)
    if data is None:
        raise SpecError([Problem(Loc(file, 1, 1), "", "empty spec; see `moeforge schema` for the keys")])
    if not isinstance(data, dict):
        raise SpecError(
            [
                Problem(
                    locs[()],
                    "",
                    f"the spec must be a mapping of keys (`name: ...`), not a {_kind_of(data)} ({_short(data)})",
                )
            ]
        )
    base_ref = data.pop("base", None)
    if base_ref is None:
        return data, locs
    base_loc = locs.pop(("base",))
    if not isinstance(base_ref, str):
        raise SpecError(
            [Problem(base_loc, "base", f"must be a file path or shipped spec name (got {_short(base_ref)})")]
        )
    try:
        base_path = resolve(base_ref, kind, relative_to=path.parent)
    except SpecError as e:
        raise SpecError([Problem(base_loc, "base", f"{base_ref!r}: {e.problems[0].message}")]) from None
    chain = (*_seen, path.resolve())
    if base_path.resolve() in chain:
        cycle = " -> ".join(p.name for p in (*chain[chain.index(base_path.resolve()) :], base_path))
        raise SpecError(
            [Problem(base_loc, "base", f"{base_ref!r} makes a cycle ({cycle}); remove one `base:`")]
        )
    base_data, base_locs = load_document(base_path, kind, soft, chain)
    # Locations: a key's own file wins; inherited keys point into the base file.
    return merge_specs(base_data, base_locs, data, locs)


def _prune(locs: Locs, data: Any) -> Locs:
    """The locations whose path still exists in `data`."""

    def exists(path: Path_) -> bool:
        node = data
        for p in path:
            if not _has(node, p):
                return False
            node = node[p]
        return True

    return {k: v for k, v in locs.items() if exists(k)}


def _has(node: Any, key: str | int) -> bool:
    """Whether `node[key]` is a value the YAML gave (a key of a mapping or an index of a list)."""
    if isinstance(node, dict):
        return key in node
    return isinstance(node, list) and isinstance(key, int) and 0 <= key < len(node)


def _kind_of(value: Any) -> str:
    return {
        list: "list",
        dict: "mapping",
        str: "string",
        bool: "boolean",
        int: "number",
        float: "number",
    }.get(type(value), type(value).__name__)


def apply_overrides(data: dict, locs: Locs, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply ``key.sub=value`` overrides (values parsed as YAML scalars or flow collections).

    Each override is located in a pseudo-file ``<--set key=value>`` whose column 1 is the key's first
    character, so problems with the value point into it. `locs` is updated in place.
    """
    data = _merge({}, data)
    problems = []
    for ov in overrides:
        where = f"<--set {ov}>"
        key, eq, raw = ov.partition("=")
        parts = key.strip().split(".")
        if not eq or not all(re.fullmatch(r"[A-Za-z_][\w-]*", p) for p in parts):
            problems.append(
                Problem(
                    Loc(where, 1, 1),
                    key.strip(),
                    "expected KEY=VALUE with a dotted key, e.g. --set moe.top_k=4",
                )
            )
            continue
        try:  # padded so that columns count from the start of "key=value"
            value, sub_locs = parse_yaml(" " * (len(key) + 1) + raw, where)
        except SpecError as e:  # name the overridden key in each problem
            dotted = key.strip()
            problems.extend(
                Problem(
                    q.loc, dotted + ("" if q.key.startswith("[") or not q.key else ".") + q.key, q.message
                )
                for q in e.problems
            )
            continue
        node = data
        for p in parts[:-1]:
            nxt = node.get(p)
            if not isinstance(nxt, dict):
                nxt = node[p] = {}
            node = nxt
        node[parts[-1]] = value
        path = tuple(parts)
        for stale in [k for k in locs if k[: len(path)] == path]:
            del locs[stale]
        for i in range(1, len(path)):
            locs.setdefault(path[:i], Loc(where, 1, 1))
        locs[path] = Loc(where, 1, 1)
        locs.update({(*path, *sub): loc for sub, loc in sub_locs.items() if sub})
    if problems:
        raise SpecError(problems)
    return data


# ---------------------------------------------------------------------------------------- validation
def model_classes(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic model classes a field annotation may hold (several for a union, none for a scalar).

    Args:
        annotation: a field's annotation, e.g. ``ModelSpec.model_fields["moe"].annotation``.
    """
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out: list[type[BaseModel]] = []
    for a in typing.get_args(annotation):
        out += model_classes(a)
    return out


def _kinds(options: list[type[BaseModel]]) -> list[str]:
    """The `kind` values a discriminated union accepts."""
    return [
        str(a)
        for m in options
        if "kind" in m.model_fields
        for a in typing.get_args(m.model_fields["kind"].annotation)
    ]


def _model_at(cls: type[BaseModel], data: Any, path: Path_) -> type[BaseModel] | None:
    """The pydantic model class that validates `data` at `path` (discriminated by `kind`)."""
    for key in path:
        if isinstance(key, int) or key not in cls.model_fields:
            return None
        data = data.get(key) if isinstance(data, dict) else None
        options = model_classes(cls.model_fields[key].annotation)
        if not options:
            return None
        kind = data.get("kind") if isinstance(data, dict) else None
        match = [m for m in options if kind in _kinds([m])]
        cls = (match or options)[0]
    return cls


def _options_at(cls: type[BaseModel], data: Any, path: Path_) -> list[type[BaseModel]]:
    """Every model class the value at `path` may be (several for a discriminated union)."""
    parent = _model_at(cls, data, path[:-1]) if path else None
    if parent is None or isinstance(path[-1], int) or path[-1] not in parent.model_fields:
        return []
    return model_classes(parent.model_fields[path[-1]].annotation)


def _field_at(cls: type[BaseModel], data: Any, path: Path_) -> Any:
    parent = _model_at(cls, data, path[:-1]) if path else None
    if parent is None or isinstance(path[-1], int):
        return None
    return parent.model_fields.get(path[-1])


def _data_path(cls: type[BaseModel], loc: tuple, root: Any) -> Path_:
    """Map a pydantic error location onto the data, dropping union tags and validator names."""
    out: list[str | int] = []
    data = root
    for p in loc:
        if _has(data, p):
            out.append(p)
            data = data[p]
        elif isinstance(data, dict) and isinstance(p, str):
            model = _model_at(cls, root, tuple(out))
            # A missing key is a field of the model there; anything else is a union tag or a validator name.
            known = (
                p in model.model_fields
                if model is not None
                else not re.search(r"[\[\]-]", p) and p not in _UNION_TAGS
            )
            if known and p != data.get("kind"):
                out.append(p)
                data = None
    return tuple(out)


# Union tags pydantic puts in error locations, for places where the model is not known (inside dicts).
_UNION_TAGS = {"int", "float", "str", "bool", "tuple", "list", "dict", "none"}


def locate(locs: Locs, path: Path_) -> Loc:
    """Where the value at `path` was written: its own location, else its nearest located parent's."""
    for i in range(len(path), -1, -1):
        if path[:i] in locs:
            return locs[path[:i]]
    return next(iter(locs.values()), Loc("<spec>", 1, 1))


_KEY_MSG = re.compile(r"^([A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)*): (.*)$", re.S)
_TYPE_MSG = {
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "bool_type": "must be true or false",
    "string_type": "must be a string (quote it)",
    "dict_type": "must be a mapping of keys (`key: value` lines or {key: value})",
    "model_type": "must be a mapping of keys (`key: value` lines or {key: value})",
    "model_attributes_type": "must be a mapping of keys (`key: value` lines or {key: value})",
    "tuple_type": "must be a list, e.g. [0, 2]",
    "list_type": "must be a list, e.g. [0, 2]",
    "finite_number": "must be a finite number",
}
_NUMBER_TEXT = re.compile(r"\s*[-+]?(\d[\d_]*)?\.?\d*([eE][-+]?\d+)?\s*")


def _explain(cls: type[BaseModel], data: Any, err: Any) -> tuple[Path_, str]:
    """A pydantic error as (path in the data, message that says what was given and how to fix it)."""
    kind, ctx = err["type"], err.get("ctx") or {}
    path = _data_path(cls, err["loc"], data)
    msg = err["msg"].removeprefix("Value error, ")
    given = "input" in err
    value = err.get("input")
    if kind == "value_error":
        m = _KEY_MSG.match(msg)
        if m:  # our validators name the key they complain about, relative to where they run
            path = (*path, *m.group(1).split("."))
            msg = m.group(2)
        return path, msg
    if kind == "extra_forbidden":
        parent = _model_at(cls, data, path[:-1])
        known = list(parent.model_fields) if parent else []
        key = str(path[-1])
        close = difflib.get_close_matches(key, known, n=1)
        msg = (
            f"unknown key; did you mean {close[0]!r}?"
            if close
            else f"unknown key; allowed: {', '.join(known)}"
        )
        owners = [
            k
            for m in _options_at(cls, data, path[:-1])
            if m is not parent and key in m.model_fields
            for k in _kinds([m])
        ]
        if owners and parent is not None and _kinds([parent]):
            msg = f"unknown key for kind {_kinds([parent])[0]!r}; {key!r} is a key of kind {owners[0]!r} (set `kind: {owners[0]}`)"
        return path, msg
    if kind == "missing":
        field = _field_at(cls, data, path)
        doc = (field.description or "").split("\n")[0].split("; ")[0].rstrip(".") if field else ""
        kinds = _kinds(_options_at(cls, data, path))
        what = f" (kind: {' | '.join(kinds)})" if kinds else (f" ({doc})" if doc else "")
        return path, f"required key is missing; add it{what}"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        kinds = _kinds(_options_at(cls, data, path))
        if kind == "union_tag_not_found":
            return path, f"missing `kind`; give one of: {', '.join(kinds)}"
        tag = str(ctx.get("tag"))
        close = difflib.get_close_matches(tag, kinds, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return (*path, "kind"), f"unknown kind {tag!r}; allowed kinds: {', '.join(kinds)}{hint}"
    if kind == "literal_error":
        allowed = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        close = difflib.get_close_matches(str(value), allowed, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return path, f"must be one of: {', '.join(allowed)} (got {_yaml_repr(value)}){hint}"
    if kind == "too_short":
        n = ctx.get("min_length", 1)
        return path, f"give at least {n} item{'s' if n != 1 else ''} (got {_yaml_repr(value)})"
    msg = _TYPE_MSG.get(kind, msg.replace("Input should be", "must be"))
    if given:
        msg += f" (got {_yaml_repr(value)})"
    if kind in ("int_type", "float_type"):
        msg += _number_hint(kind, value, _field_at(cls, data, path))
    return path, msg


def _number_hint(kind: str, value: Any, field: Any) -> str:
    if isinstance(value, bool):
        return "; true/false is not a number"
    if isinstance(value, str) and _NUMBER_TEXT.fullmatch(value) and any(c.isdigit() for c in value):
        if re.search(r"[eE]", value) and "." not in value:
            return f"; YAML reads {value} as text: write it with a dot, e.g. {value.replace('e', '.0e').replace('E', '.0E')}"
        return "; remove the quotes"
    bounds = _bounds(field)
    if kind == "int_type" and isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return f"; write {int(value)}"
    if kind == "int_type" and isinstance(value, float):
        return f"; write a whole number{f' {bounds}' if bounds else ''}"
    return ""


def _bounds(field: Any) -> str:
    """The numeric constraints of a field as text, e.g. '> 0 and <= 1048576'."""
    if field is None:
        return ""
    out = []
    for m in field.metadata:
        for attr, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            v = getattr(m, attr, None)
            if v is not None:
                out.append(f"{op} {v}")
    return " and ".join(out)


def _yaml_repr(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return _short(list(value) if isinstance(value, tuple) else value)


def validate(cls: type[M], data: dict, locs: Locs, soft: list[Problem] | None = None) -> M:
    """Validate `data` against `cls`, turning every pydantic error into a located Problem.

    Validation is strict (``true`` is not 1, ``"64"`` and ``64.0`` are not integers) and goes through
    JSON so that YAML lists fill tuple fields. `soft` problems found while reading (duplicate keys) are
    reported with the schema's.
    """
    try:
        result = cls.model_validate_json(json.dumps(data, default=str), strict=True)
    except ValidationError as e:
        problems = list(soft or [])
        errors = _one_per_value(_one_per_line(e.errors(include_url=False)))
        for err in errors:
            path, msg = _explain(cls, data, err)
            problems.append(Problem(locate(locs, path), _dotted(path), msg))
        problems += _checks_on_what_parsed(cls, data, locs, errors)
        problems = list(dict.fromkeys(problems))
        problems.sort(key=lambda p: (p.loc.file.startswith("<--set"), p.loc.file, p.loc.line, p.loc.col))
        raise SpecError(problems) from None
    if soft:
        raise SpecError(list(soft))
    return result


def _checks_on_what_parsed(cls: type[BaseModel], data: dict, locs: Locs, errors: list[Any]) -> list[Problem]:
    """The cross-field problems of `cls` that can be known although some values failed on their own.

    Pydantic runs a model's cross-field validator only when every field parsed, so a typo'd key would hide
    ``top_k > routed_experts`` until it is fixed. This drops each value that failed, validates again with
    the context ``{"recheck": True}`` (a section's validator skips what the first pass reported), and keeps
    the cross-field problems whose check reads none of the dropped keys (``cls.check_reads``: dotted problem
    key -> the keys its check reads). A section whose validator still fails is dropped in turn. A class
    without that table gets no second pass.
    """
    reads: dict[str, tuple[str, ...]] | None = getattr(cls, "check_reads", None)
    if reads is None or any(err["type"] == "value_error" and not err["loc"] for err in errors):
        return []  # no table, or the cross-field validator ran already
    parsed = json.loads(json.dumps(data, default=str))  # a deep copy of plain data
    unknown: set[str] = set()
    out: list[Problem] = []
    for n in range(_MAX_PASSES):
        for err in errors:
            if n == 0 and err["type"] == "value_error":
                # A section's own check: the second pass skips it (`recheck`) or it fails again; either
                # way the value it named is suspect, so no check that reads it is reported.
                unknown.add(_dotted(_explain(cls, data, err)[0]))
                continue
            path = _data_path(cls, err["loc"], parsed)
            path = path[
                : next((i for i, p in enumerate(path) if isinstance(p, int)), len(path))
            ]  # whole list
            if err["type"] == "extra_forbidden":  # the key was probably meant as its closest field
                parent = _model_at(cls, parsed, path[:-1])
                close = difflib.get_close_matches(
                    str(path[-1]), list(parent.model_fields) if parent else [], n=1
                )
                unknown.update(_dotted((*path[:-1], c)) for c in close)
            else:  # a bad value or a missing key; a section of an unknown kind goes whole
                if err["type"].startswith("union_tag") and path and path[-1] == "kind":
                    path = path[:-1]
                unknown.add(_dotted(path))
            _drop(parsed, path)
        try:
            cls.model_validate_json(json.dumps(parsed), strict=True, context={"recheck": True})
            return out
        except ValidationError as e:
            errors = [
                err for err in _one_per_line(e.errors(include_url=False)) if err["type"] == "value_error"
            ]
        # Other errors are values dropped above, now missing: already reported as what they were.
        for err in errors:
            path, msg = _explain(cls, parsed, err)
            key = _dotted(path)
            if key in reads and not any(_related(u, r) for u in unknown for r in reads[key]):
                out.append(Problem(locate(locs, path), key, msg))
        if not errors or any(not err["loc"] for err in errors):
            return out  # nothing left to drop, or the cross-field validator ran
        # A section whose own validator still fails (a form with no top_k) is dropped in the next pass.
    return out


_MAX_PASSES = 3


def _related(a: str, b: str) -> bool:
    """Whether dotted keys `a` and `b` are the same value or one holds the other."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _drop(data: Any, path: Path_) -> None:
    """Remove the value at `path` from nested plain data, if it is there."""
    if not path:
        return
    for p in path[:-1]:
        if not _has(data, p):
            return
        data = data[p]
    if isinstance(data, dict):
        data.pop(path[-1], None)


def _one_per_line(errors: list[Any]) -> list[Any]:
    """Our validators report several problems as one ValueError, a line each: split them."""
    out = []
    for err in errors:
        lines = err["msg"].removeprefix("Value error, ").split("\n")
        if err["type"] == "value_error" and len(lines) > 1:
            out += [{**err, "msg": line} for line in lines]
        else:
            out.append(err)
    return out


_TYPE_NOUN = {
    "bool_type": "true or false",
    "int_type": "an integer",
    "float_type": "a number",
    "string_type": "a string",
}


def _one_per_value(errors: list[Any]) -> list[Any]:
    """A value that fits none of a union's scalar types (``bool | int | float | str``) gets one error per
    type from pydantic, each ending in the type's tag: make them one error that names every type."""
    out: list[Any] = []
    merged: dict[tuple, list[str]] = {}
    for err in errors:
        loc = tuple(err["loc"])
        if not (loc and loc[-1] in _UNION_TAGS and err["type"] in _TYPE_NOUN):
            out.append(err)
            continue
        if loc[:-1] not in merged:
            merged[loc[:-1]] = []
            out.append({**err, "loc": loc[:-1], "type": "union_type"})
        merged[loc[:-1]].append(_TYPE_NOUN[err["type"]])
    for err in out:
        if err["type"] == "union_type":
            nouns = merged[err["loc"]]
            if "a number" in nouns and "an integer" in nouns:
                nouns.remove("an integer")
            err["msg"] = "must be " + (
                f"{', '.join(nouns[:-1])} or {nouns[-1]}" if len(nouns) > 1 else nouns[0]
            )
    return out


def _short(value: Any) -> str:
    s = repr(value)
    return s if len(s) <= 60 else s[:57] + "..."


def load_validated(
    cls: type[M], path_or_name: str | Path, kind: str, overrides: list[str] | tuple[str, ...] = ()
) -> M:
    """Resolve, read, compose, override and validate one spec file."""
    path = resolve(path_or_name, kind)
    soft: list[Problem] = []
    data, locs = load_document(path, kind, soft)
    if overrides:
        data = apply_overrides(data, locs, overrides)
    return validate(cls, data, locs, soft)
