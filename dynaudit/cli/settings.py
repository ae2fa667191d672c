"""Settings from a file: ``[tool.dynaudit]`` of ./pyproject.toml, or ``--config FILE``.

A setting is looked up as flag > ``DYNAUDIT_*`` environment variable > the file > the default
(SPEC §8). Click gives exactly that order when the file's values are its ``default_map``, so
this module only reads the file, checks every key and value type, and builds that map."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dynaudit.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["SETTINGS", "default_map", "ignored_keys", "read_table"]

# The keys a file may set, as written in TOML, with the command parameter each one fills.
# `policy` is a table of its own, read by dynaudit.policy.load_policy.
SETTINGS: dict[str, tuple[str, type]] = {
    "family": ("family", str),
    "device": ("device", str),
    "q-dim": ("q_dim", int),
    "pieces": ("pieces", int),
    "steps": ("steps", int),
    "max-entries": ("max_entries", int),
    "seed": ("seed", int),
    "seeds": ("seeds", int),
    "threads": ("threads", int),
    "cache-dir": ("cache_dir", str),
    "hf-endpoint": ("hf_endpoint", str),
    "mlflow-uri": ("mlflow_uri", str),
    "baseline": ("baseline_ref", str),
}
_TABLES = {"policy"}


def read_table(path: Path, *, explicit: bool) -> dict[str, Any]:
    """The dynaudit table of ``path``: ``[tool.dynaudit]`` when the file has one, else (for a
    file named with ``--config``) its top level. An implicit ./pyproject.toml without the
    table gives nothing; a file that cannot be read or parsed is a usage error."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"{path}: cannot read the settings ({exc})") from exc
    tool = data.get("tool")
    if isinstance(tool, dict) and isinstance(tool.get("dynaudit"), dict):
        return dict(tool["dynaudit"])
    return dict(data) if explicit else {}


def default_map(
    table: dict[str, Any],
    where: str,
    commands: Iterable[tuple[str, Iterable[str]]],
    relative_to: Path = Path(),
) -> dict[str, dict[str, Any]]:
    """Click's ``default_map``: for each command, the file's value of each parameter that the
    command has. Keys are written with dashes or underscores; an unknown key, or a value of
    the wrong type, is refused, naming the key and the file. Paths are relative to the file:
    ``cache-dir`` always, ``baseline`` when it names something there (else it is a SOURCE
    such as ``org/base``)."""
    values: dict[str, Any] = {}
    for raw, value in table.items():
        key = raw.replace("_", "-")
        if key in _TABLES:
            if not isinstance(value, dict):
                raise UsageError(
                    f"{where}: {raw} must be a table ([...{raw}]); a policy file is given "
                    "with --policy FILE or DYNAUDIT_POLICY"
                )
            continue
        if key not in SETTINGS:
            known = ", ".join(sorted([*SETTINGS, *_TABLES]))
            raise UsageError(f"{where}: unknown setting {raw!r} (known: {known})")
        param, kind = SETTINGS[key]
        if type(value) is not kind:  # TOML's own types: a bool is not an int here
            wanted = "an integer" if kind is int else "a string"
            raise UsageError(f"{where}: {raw} = {value!r} must be {wanted}")
        values[param] = _relative(key, value, relative_to)
    return {
        name: {param: values[param] for param in params if param in values}
        for name, params in commands
    }


def _relative(key: str, value: Any, folder: Path) -> Any:
    if key == "cache-dir":
        return str(folder / Path(value).expanduser())
    if key == "baseline" and not Path(value).is_absolute() and (folder / value).exists():
        return str(folder / value)
    return value


def ignored_keys(table: dict[str, Any], params: Iterable[str]) -> list[str]:
    """The file's keys that the command does not take (``check`` has no fit settings: it
    uses the baseline's), for a ``-v`` line; nothing is silently dropped."""
    taken = set(params)
    return [
        raw for raw in table
        if (key := raw.replace("_", "-")) in SETTINGS and SETTINGS[key][0] not in taken
    ]  # fmt: skip
