"""Typed YAML configuration shared by every user-facing config (curation, recipes, plans).

It lives in ``catalog`` because that is the package every other one may import (imports flow
orchestration -> curation/training -> catalog).

- Configs are pydantic models deriving from ``StrictModel``: unknown keys are errors.
- ``load_config(Model, path, overrides)`` reads YAML with ``yaml.safe_load``, applies
  ``--set a.b=c`` overrides (values parsed as YAML scalars: ``true``, ``3``, ``[1, 2]``), then
  validates. Every problem is reported at once as ``ConfigError``: field path, bad value and
  what is allowed.
- A setting that has no effect in its context is reported with ``warn_ineffective`` (a
  ``ConfigWarning``), never silently ignored.
"""

from __future__ import annotations

import hashlib
import json
import types
import typing
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for config sections: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class ConfigError(ValueError):
    """A configuration problem a user can fix; ``problems`` holds one line per issue."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        self.source = source
        where = f" in {source}" if source else ""
        super().__init__(f"invalid configuration{where}:\n  - " + "\n  - ".join(problems))


class ConfigProblems(ValueError):
    """Several problems found by one validator (cross-field checks), each with its field path
    relative to the model the validator belongs to; ``format_errors`` gives each its own line,
    so a recipe with three mistakes reports three lines, not the first one."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems  # (path relative to the validated model, message)
        super().__init__("; ".join(f"{p}: {m}" if p else m for p, m in problems))


def raise_problems(problems: list[tuple[str, str]]) -> None:
    """Raise ``ConfigProblems`` when there are any (for a model validator's collected list)."""
    if problems:
        raise ConfigProblems(problems)


class ConfigWarning(UserWarning):
    """A setting that is valid but has no effect in this context."""


def warn_ineffective(path: str, why: str) -> None:
    warnings.warn(f"setting {path!r} has no effect: {why}", ConfigWarning, stacklevel=3)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping (a local file or an object-store URI); errors name the file and
    the line."""
    from core import storage

    remote = storage.is_remote(path)
    path = str(path) if remote else Path(path)
    if not (storage.exists(path) if remote else path.is_file()):
        raise ConfigError([f"config file not found: {path}"], str(path))
    try:
        text = storage.read_text(path) if remote else path.read_text(encoding="utf-8")
        data = yaml.safe_load(text)
    except UnicodeDecodeError as e:
        raise ConfigError([f"not UTF-8 text: {e}"], str(path)) from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError([f"YAML syntax error{at}: {problem}"], str(path)) from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"top level must be a mapping, got {type(data).__name__}"], str(path))
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=3"`` -> (["a", "b"], 3). The value is parsed as YAML (so ``a=[1,2]`` is a list)."""
    if "=" not in text:
        raise ConfigError([f"override {text!r} must look like key.path=value"])
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError([f"override {text!r} has an empty key segment"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``key.path=value`` set (numeric segments index lists)."""
    data = json.loads(json.dumps(data, default=str)) if data else {}
    for text in overrides:
        parts, value = parse_override(text)
        node: Any = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            where = ".".join(parts[: i + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(
                        [f"override {text!r}: {where!r} is not an index of a list of {len(node)}"]
                    )
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if node.get(part) is None:
                        node[part] = {}
                    node = node[part]
            else:
                raise ConfigError([f"override {text!r}: {'.'.join(parts[:i])!r} is not a mapping"])
    return data


def load_config(
    model: type[M],
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    base: Mapping[str, Any] | None = None,
) -> M:
    """Build ``model`` from ``base`` (e.g. a built-in profile), then the YAML file, then overrides.

    The file replaces ``base`` keys recursively (mappings merge, everything else replaces).
    """
    data: dict[str, Any] = json.loads(json.dumps(dict(base))) if base else {}
    source = None
    if path is not None:
        source = str(path)
        data = deep_merge(data, load_yaml(path))
    overrides = list(overrides)
    if overrides:
        data = apply_overrides(data, overrides)
        source = f"{source} with --set overrides" if source else "--set overrides"
    return validate(model, data, source)


def validate(model: type[M], data: Mapping[str, Any], source: str | None = None) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_errors(model, e), source) from None


def deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def format_errors(model: type[BaseModel], error: ValidationError) -> list[str]:
    """One readable line per pydantic error: field path, the bad value, what is allowed.

    A bad mapping key (pydantic's ``[key]`` location) is named by the key's own path
    (``stages.2.tasks.i2i_edt``), and a validator's ``ConfigProblems`` becomes one line per
    problem, under the validator's path."""
    lines = []
    for err in error.errors(include_url=False):
        loc = [str(p) for p in err["loc"]]
        kind = err["type"]
        bad_key = bool(loc) and loc[-1] == "[key]"
        if bad_key:
            loc = loc[:-1]
        path = ".".join(loc) or "(top level)"
        inner = (err.get("ctx") or {}).get("error")
        if isinstance(inner, ConfigProblems):
            for sub, message in inner.problems:
                lines.append(f"{'.'.join([*loc, sub]) if sub else path}: {message}")
        elif kind == "extra_forbidden":
            allowed = _allowed_keys(model, err["loc"][:-1])
            hint = f"; allowed keys here: {', '.join(allowed)}" if allowed else ""
            lines.append(f"{path}: unknown key{hint}")
        elif kind == "missing":
            lines.append(f"{path}: required setting is missing")
        else:
            msg = err["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, ") :]
            if bad_key:
                lines.append(f"{path}: {err['input']!r} is not an allowed key here: {msg}")
                continue
            if err["loc"] and "input" in err and not isinstance(err["input"], (dict, list)):
                msg = f"{msg} (got {err['input']!r})"
            lines.append(f"{path}: {msg}")
    return lines


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the model found by walking ``loc`` (skips dict keys and list indices)."""
    current: Any = model
    for part in loc:
        current = _unwrap_model(current)
        if current is None:
            return []
        if isinstance(current, tuple):  # container: this loc part is a key or index
            current = current[1]
            continue
        field = current.model_fields.get(str(part))
        if field is None:
            return []
        current = field.annotation
    current = _unwrap_model(current)
    if isinstance(current, tuple):
        current = _unwrap_model(current[1])
    if isinstance(current, type) and issubclass(current, BaseModel):
        return sorted(current.model_fields)
    return []


def _unwrap_model(tp: Any) -> Any:
    """A BaseModel subclass, ("container", element type) for dict/list, or None."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (list, tuple, set, frozenset) and args:
        return ("container", args[0])
    if origin in (dict, Mapping) and len(args) == 2:
        return ("container", args[1])
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            inner = _unwrap_model(arg)
            if inner is not None:
                return inner
    if origin is typing.Annotated:
        return _unwrap_model(args[0])
    return None


def to_plain(model: BaseModel) -> dict[str, Any]:
    """JSON-ready dict of a config (paths become strings)."""
    return model.model_dump(mode="json")


def config_hash(model: BaseModel) -> str:
    """sha256 of the canonical JSON of a config: equal configs hash equal."""
    text = json.dumps(to_plain(model), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def flatten(data: Mapping[str, Any] | BaseModel, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "l": [{"x": 2}]}`` -> ``{"a.b": 1, "l.0.x": 2}`` (for MLflow params)."""
    if isinstance(data, BaseModel):
        data = to_plain(data)
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            for i, item in enumerate(value):
                out.update(flatten(item, f"{name}.{i}."))
        else:
            out[name] = value
    return out


def dump_yaml(model: BaseModel) -> str:
    return yaml.safe_dump(to_plain(model), sort_keys=False)
