"""The contract of dynaudit's JSON formats (docs/formats.md) and their shipped JSON Schemas.

Every JSON document dynaudit writes carries a two-part version: an integer **major**
(``schema_version``; ``format_version`` in a baseline) and an integer **minor**
(``schema_minor``; ``format_minor``; absent means 0). A new minor only adds fields; anything
an older reader could misread (a field removed, renamed or given another meaning) is a new
major. So a reader of major M, minor m:

- reads a document of major M as it is when it knows every field in it;
- drops the fields it does not know (a newer minor's), with one warning naming them: a field
  dropped from many layers is named once, as ``layers[*].field``;
- refuses a document of a major above M in one line, before reading anything else in it.

Writing stays strict: the models forbid unknown fields, so no code path writes a field that
is not in the schema. The JSON Schema of each format ships beside this module
(``<format>.schema.json``), generated from the models by ``python -m dynaudit.schemas``;
tests/test_schemas.py fails when a file differs from what the models generate.
"""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass
from importlib import resources
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, Field, ValidationError
from pydantic.fields import FieldInfo

from dynaudit.errors import InputError, listed

__all__ = [
    "FORMATS",
    "Format",
    "minor_field",
    "read_versioned",
    "schema_text",
    "strip_unknown",
    "warn_ignored",
    "written_minor",
]

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)
# How many dropped fields a warning names before it says "and N more".
_NAMED_FIELDS = 12


@dataclass(frozen=True)
class Format:
    """One versioned JSON format: where its version lives and which version this code reads."""

    what: str  # how a message names a document of the format
    major_key: str
    minor_key: str
    major: int
    minor: int

    def version_of(self, data: dict[str, Any]) -> tuple[object, object]:
        """The document's (major, minor) as written: absent keys are major 1, minor 0."""
        return data.get(self.major_key, 1), data.get(self.minor_key, 0)

    @property
    def version(self) -> str:
        return f"{self.major}.{self.minor}"


# The formats dynaudit writes, by name (the stem of the schema file). The models' version
# fields default to these numbers (tests/test_schemas.py checks that they agree).
FORMATS: dict[str, Format] = {
    "measure": Format("measure report", "schema_version", "schema_minor", 1, 1),
    "check": Format("check report", "schema_version", "schema_minor", 1, 1),
    "inspect": Format("inspection", "schema_version", "schema_minor", 1, 1),
    "baseline": Format("baseline", "format_version", "format_minor", 1, 1),
}


def minor_field(name: str) -> Any:
    """The minor-version field of format ``name``'s model. A document states the lowest minor
    that reads it (:func:`written_minor`), up to ``FORMATS[name].minor``, and minor 0 is not
    written: a document of minor 0 is byte for byte what dynaudit wrote before minor versions
    existed, so the releases from before this contract (which refuse unknown fields) still
    read it — a report of a model without experts included."""
    return Field(
        0,
        ge=0,
        description="the format's minor version: fields added within the major (absent: 0)",
        exclude_if=lambda minor: minor == 0,
    )


def written_minor(model: BaseModel, name: str, needed: int) -> None:
    """Set the minor version of a document that dynaudit itself builds (not one it read, whose
    stated minor stays) to ``needed``, the newest minor whose fields it holds."""
    key = FORMATS[name].minor_key
    if key not in model.model_fields_set:
        assert 0 <= needed <= FORMATS[name].minor, (name, needed)
        object.__setattr__(model, key, needed)


def _newer_major(fmt: Format, data: dict[str, Any]) -> int | None:
    """The document's major version when it is above the one this code reads, else None."""
    major, _ = fmt.version_of(data)
    if isinstance(major, int) and not isinstance(major, bool) and major > fmt.major:
        return major
    return None


def read_versioned(
    model: type[M],
    data: object,
    fmt: Format,
    where: str,
    error: type[InputError] = InputError,
) -> M:
    """``data`` (parsed JSON) as ``model`` under the contract above: a newer major refused by
    ``error`` in one line, unknown fields dropped with one warning, then validated (an
    invalid document is ``error`` too, with pydantic's first complaint)."""
    if not isinstance(data, dict):
        raise error(f"{where}: not a dynaudit {fmt.what} (not a JSON object)", path=where)
    major = _newer_major(fmt, data)
    if major is not None:
        raise error(
            f"{where}: {fmt.what} schema {major} is newer than this dynaudit (reads "
            f"{fmt.major}.x); upgrade dynaudit",
            path=where,
        )
    clean, dropped = strip_unknown(model, data)
    try:
        read = model.model_validate(clean)
    except ValidationError as exc:
        first = exc.errors()[0]
        at = ".".join(map(str, first["loc"])) or "document"
        raise error(
            f"{where}: not a valid dynaudit {fmt.what} ({at}: {first['msg']})", path=where
        ) from exc
    warn_ignored(dropped, fmt, data, where)
    return read


def strip_unknown(model: type[BaseModel], data: dict[str, Any]) -> tuple[Any, list[str]]:
    """``data`` without the fields ``model`` does not know, at any depth, and their paths.
    Nothing else changes: what is left is validated as usual."""
    dropped: list[str] = []
    return _strip_model(model, data, "", dropped), dropped


def warn_ignored(dropped: list[str], fmt: Format, data: dict[str, Any], where: str) -> None:
    """One warning naming the fields dropped, once the rest was read: a document that is
    refused anyway gets its one error line, not a warning beside it."""
    if not dropped:
        return
    unique = list(dict.fromkeys(dropped))
    major, minor = fmt.version_of(data)
    log.warning(
        "%s: ignored fields this dynaudit does not know (%s %s.%s, reads %s): %s",
        where,
        fmt.what,
        major,
        minor,
        fmt.version,
        listed(unique, _NAMED_FIELDS),
    )


def _strip_model(
    model: type[BaseModel], data: dict[str, Any], path: str, dropped: list[str]
) -> dict[str, Any]:
    fields = _fields(model)
    clean: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        info = fields.get(key)
        if info is None:
            dropped.append(where)
        else:
            clean[key] = _strip(info.annotation, value, where, dropped)
    return clean


def _strip(annotation: Any, value: Any, path: str, dropped: list[str]) -> Any:
    """``value`` stripped against the type ``annotation``: models recursively, through lists,
    dicts, optionals and unions of models; anything else is left to validation."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _strip(get_args(annotation)[0], value, path, dropped)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return _strip_model(annotation, value, path, dropped) if isinstance(value, dict) else value
    if origin in (Union, types.UnionType):
        member = _union_member(get_args(annotation), value)
        return value if member is None else _strip(member, value, path, dropped)
    if origin is list and isinstance(value, list):
        (item,) = get_args(annotation) or (Any,)
        return [_strip(item, entry, f"{path}[*]", dropped) for entry in value]
    if origin is dict and isinstance(value, dict):
        _, item = get_args(annotation) or (Any, Any)
        return {key: _strip(item, entry, f"{path}[*]", dropped) for key, entry in value.items()}
    return value


def _union_member(members: tuple[Any, ...], value: Any) -> Any:
    """The member of a union that ``value`` is meant as: the only non-null one, or, among
    models, the one whose required fields ``value`` all has and that knows most of its keys
    (``{name, skipped}`` is a SkippedLayer, not a LayerResult). None: leave it to validation."""
    present = [m for m in members if m is not type(None)]
    if value is None or not present:
        return None
    if len(present) == 1:
        return present[0]
    if not isinstance(value, dict):
        return None
    models = [m for m in present if isinstance(m, type) and issubclass(m, BaseModel)]
    fitting = [
        m
        for m in models
        if all(key in value for key, info in _fields(m).items() if info.is_required())
    ]
    if not fitting:
        return None
    return max(fitting, key=lambda m: sum(key in _fields(m) for key in value))


def _fields(model: type[BaseModel]) -> dict[str, FieldInfo]:
    """A model's fields by the key they have in JSON."""
    return {info.alias or name: info for name, info in model.model_fields.items()}


def schema_text(name: str) -> str:
    """The shipped JSON Schema of format ``name`` (a key of :data:`FORMATS`), as text."""
    return (resources.files(__name__) / f"{name}.schema.json").read_text(encoding="utf-8")
