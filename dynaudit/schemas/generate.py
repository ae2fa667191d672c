"""The JSON Schemas of dynaudit's formats, generated from the models that write them.

``python -m dynaudit.schemas [DIR]`` writes ``<format>.schema.json`` for every format of
:data:`dynaudit.schemas.FORMATS` into DIR (default: this package, where they ship from). A
model change is followed by a run of it; tests/test_schemas.py fails until then.

The schemas describe what this version writes, with one change from pydantic's output: no
object forbids extra properties, so a document of a newer minor version (which only adds
fields) still validates, as it still reads. A newer major version does not: each schema fixes
its major version with ``const``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from dynaudit.errors import ExitCode
from dynaudit.schemas import FORMATS

__all__ = ["json_schema", "main", "models", "render", "write"]

DIALECT = "https://json-schema.org/draft/2020-12/schema"


def models() -> dict[str, type[BaseModel]]:
    """The model that writes each format, by format name (imported here: some need torch)."""
    from dynaudit.schema import Baseline, CheckReport, Inspection, Report

    return {"measure": Report, "check": CheckReport, "inspect": Inspection, "baseline": Baseline}


def json_schema(name: str) -> dict[str, Any]:
    """The JSON Schema of format ``name``, as the shipped file holds it."""
    fmt = FORMATS[name]
    generated = _open_objects(models()[name].model_json_schema(mode="serialization"))
    generated.pop("title", None)
    generated.pop("description", None)
    return {
        "$schema": DIALECT,
        "title": f"dynaudit {fmt.what}, format {fmt.version}",
        "description": (
            f"The JSON of a dynaudit {fmt.what}, format {fmt.version} ({fmt.major_key} "
            f"{fmt.major}, {fmt.minor_key} {fmt.minor}). Objects accept properties they do not "
            "list: a newer minor version only adds some."
        ),
        **generated,
    }


def _open_objects(node: Any) -> Any:
    """``node`` without ``additionalProperties: false`` anywhere in it."""
    if isinstance(node, dict):
        return {
            key: _open_objects(value)
            for key, value in node.items()
            if not (key == "additionalProperties" and value is False)
        }
    if isinstance(node, list):
        return [_open_objects(value) for value in node]
    return node


def render(name: str) -> str:
    """The shipped file's text for format ``name``."""
    return json.dumps(json_schema(name), indent=2, ensure_ascii=False) + "\n"


def write(folder: Path) -> list[Path]:
    """Write every format's schema file into ``folder``; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name in FORMATS:
        path = folder / f"{name}.schema.json"
        path.write_text(render(name), encoding="utf-8")
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dynaudit.schemas [DIR]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) > 1 or any(arg.startswith("-") for arg in args):
        print("usage: python -m dynaudit.schemas [DIR]", file=sys.stderr)
        return ExitCode.USAGE
    folder = Path(args[0]) if args else Path(__file__).parent
    for path in write(folder):
        print(f"wrote {path}")
    return ExitCode.OK
