"""One way to turn a pydantic ``ValidationError`` or a YAML file into one line a user can act on.

Every config of forgetless (experiment, train, adapter, strategy params, merge, mix, a task spec,
a server request) is a pydantic model with unknown keys forbidden; these helpers pick the problem
to report and say it the same way everywhere:

- ``first_problem``: the error to report and its location. An unknown key goes first (a misspelt
  required key is also reported as missing; the typo is the real problem), then the deepest
  location (for ``str | Model`` unions pydantic reports one error per branch, and the deepest is
  the branch the user meant: a mapping is a Model, not a mistyped string). Union branch tags
  (``str``, ``TaskSpec``...) are dropped from the location.
- ``explain``: the one line every config error becomes, in one format: ``SOURCE: unknown key 'a.b'.
  Did you mean 'c'? Valid keys here: ...`` with the keys of the model at that location (found by
  walking the root model's annotations), or ``SOURCE: a.b: message``. ``at`` puts the validated
  mapping's own place in front (``train`` for a run's train section).
- ``problem``: the same location and message for channels with their own envelope (the server's
  JSON errors).
- ``read_yaml_mapping`` / ``parse_yaml_mapping``: a YAML file (or text) that must hold a mapping; a
  syntax error names its line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from forgetless.errors import InputError
from forgetless.registry import did_you_mean

_BRANCH_TAGS = {"str", "int", "float", "bool", "list", "dict"}


def first_problem(error: ValidationError) -> tuple[dict[str, Any], tuple]:
    """The error to report and its location, union branch tags left out."""
    errors = error.errors()
    unknown = [e for e in errors if e["type"] == "extra_forbidden"]
    first = max(unknown or errors, key=lambda e: (len(e["loc"]), -errors.index(e)))
    location = tuple(
        part
        for part in first["loc"]
        if isinstance(part, int) or (part not in _BRANCH_TAGS and not str(part)[:1].isupper())
    )
    return first, location


def fields_at(root: type[BaseModel], location: Iterable[Any], hidden: Iterable[str] = ()) -> list[str]:
    """The keys a user may write at ``location`` of ``root`` (list indices skipped), or []."""
    model: Any = root
    for part in location:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(str(part)) if hasattr(model, "model_fields") else None
        if field is None:
            return []
        candidates = [field.annotation, *getattr(field.annotation, "__args__", ())]
        for inner in list(candidates):
            candidates.extend(getattr(inner, "__args__", ()))
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    if model is None:
        return []
    return sorted(name for name in model.model_fields if name not in set(hidden))


def problem(error: ValidationError, at: tuple = ()) -> tuple[str, str]:
    """``(dotted location, message)`` of the problem ``first_problem`` picks (pydantic's
    "Value error, " prefix dropped: the message is ours)."""
    first, location = first_problem(error)
    return _where(at, location), first["msg"].removeprefix("Value error, ")


def _where(at: tuple, location: tuple) -> str:
    return ".".join(str(part) for part in (*at, *location))


def explain(
    error: ValidationError,
    source: str,
    root: type[BaseModel],
    hidden: Iterable[str] = ("base_dir",),
    hint: Callable[[str, tuple], str | None] | None = None,
    at: tuple = (),
) -> str:
    """One line for ``error`` raised by validating ``root`` from ``source``.

    Args:
        hidden: fields the loader sets itself (never listed as keys to write).
        hint: ``hint(key, location)`` may return a better line for an unknown key.
        at: the location of the validated mapping inside ``source`` (prefixed to the field).
    """
    first, location = first_problem(error)
    where, message = _where(at, location), first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        key = str(location[-1])
        if hint is not None and (better := hint(key, location)):
            return f"{source}: {better}"
        valid = fields_at(root, location[:-1], hidden)
        listed = f" Valid keys here: {', '.join(valid)}" if valid else ""
        return f"{source}: unknown key '{where}'.{did_you_mean(key, valid)}{listed}"
    return f"{source}: {where or 'config'}: {message}"


def read_yaml_mapping(path: str | Path, what: str, expected: str) -> dict[str, Any]:
    """The mapping in the YAML file ``path`` (``what``: e.g. "merge config", named when missing;
    ``expected``: what the mapping holds, named when it is something else)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist")
    return parse_yaml_mapping(path.read_text(encoding="utf-8"), str(path), expected)


def parse_yaml_mapping(text: str, source: str, expected: str) -> dict[str, Any]:
    """The mapping in YAML ``text`` read from ``source`` (a file, a packaged resource); a syntax
    error names its line. The one YAML reader of configs: every loader comes through here."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise InputError(f"{source}{line}: invalid YAML ({getattr(error, 'problem', error)})") from None
    if not isinstance(data, dict):
        raise InputError(f"{source}: expected a mapping with {expected}")
    return data
