"""Settings from a file: ``[tool.dynaudit]`` of ./pyproject.toml, or ``--config FILE``.

A setting is looked up as flag > ``DYNAUDIT_*`` environment variable > the file > the default
(README, "Settings"). Click gives exactly that order when the file's values are its ``default_map``,
so this module checks every key and value type, and builds that map."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import typer

from dynaudit.config import read_table
from dynaudit.errors import UsageError

__all__ = ["SETTINGS", "apply_settings", "default_map", "ignored_keys"]

# The keys a file may set, as written in TOML, with the command parameter each one fills.
# `policy` is a table of its own, read by dynaudit.gate.load_policy.
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
        raw
        for raw in table
        if (key := raw.replace("_", "-")) in SETTINGS and SETTINGS[key][0] not in taken
    ]


def apply_settings(ctx: typer.Context, config: Path | None) -> None:
    """Read the settings file (``config``, else ./pyproject.toml when there is one) into
    click's default map, so that a flag or a ``DYNAUDIT_*`` variable wins over it; name the
    keys the invoked command does not use at ``-v``."""
    ctx.meta["dynaudit.config"] = config  # replaces ./pyproject.toml, policy and baseline too
    path = config if config is not None else Path("pyproject.toml")
    if config is None and not path.is_file():
        return
    table = read_table(path, explicit=config is not None)
    where = f"[tool.dynaudit] of {path}" if config is None else f"--config {path}"
    found: dict[str, Any] = getattr(ctx.command, "commands", {})  # click's or Typer's own copy
    commands = [(name, [p.name for p in cmd.params if p.name]) for name, cmd in found.items()]
    ctx.default_map = default_map(table, where, commands, relative_to=path.parent)
    ctx.meta["dynaudit.settings"] = where
    unused = ignored_keys(table, dict(commands).get(ctx.invoked_subcommand or "", []))
    if unused:
        logging.getLogger("dynaudit").info(
            "%s: %s not used by `dynaudit %s`", where, ", ".join(unused), ctx.invoked_subcommand
        )
