"""The built wheel as a user installs it: its license, its declared requirements, and the
README's install commands. scripts/compat.sh installs the same wheel beside real training
stacks; these are the fast checks of what it is built from."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import shutil
import subprocess
import sys
import zipfile
from email.message import Message
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
# Imported only where a feature needs them, each behind an ImportError with a hint.
# matplotlib for plots; the `serve` extra (docs/registry.md): starlette, uvicorn, sqlalchemy
OPTIONAL_IMPORTS = {
    "matplotlib",
    "sklearn",
    "pandas",
    "transformers",
    "starlette",
    "uvicorn",
    "sqlalchemy",
}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """The wheel built from a copy of the sources (the checkout gets no build/ folder), with
    the installed setuptools: no network."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(ROOT / "dynaudit", src / "dynaudit", ignore=ignore)
    shutil.copytree(ROOT / "plugins", src / "plugins", ignore=ignore)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(tmp / "dist"), str(src)],
        check=True, capture_output=True,
    )  # fmt: skip
    (built,) = (tmp / "dist").glob("dynaudit-*.whl")
    return zipfile.ZipFile(built)


def _metadata(wheel: zipfile.ZipFile) -> Message:
    name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    return Parser().parsestr(wheel.read(name).decode())


def _runtime(wheel: zipfile.ZipFile) -> dict[str, Requirement]:
    """The requirements an install without extras gets."""
    found = (Requirement(r) for r in _metadata(wheel).get_all("Requires-Dist") or [])
    return {r.name: r for r in found if r.marker is None or "extra" not in str(r.marker)}


def test_license_is_an_spdx_expression_with_its_file_shipped(wheel: zipfile.ZipFile) -> None:
    meta = _metadata(wheel)
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta.get_all("License-File") == ["LICENSE"]
    # An SPDX expression replaces the license classifiers; setuptools refuses both together.
    assert not [c for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
    shipped = next(n for n in wheel.namelist() if n.endswith(".dist-info/licenses/LICENSE"))
    text = wheel.read(shipped).decode()
    assert text == (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_classifiers_name_every_supported_python(wheel: zipfile.ZipFile) -> None:
    """requires-python's floor and the classifiers agree with what CI tests (3.10, 3.13)."""
    meta = _metadata(wheel)
    assert meta["Requires-Python"] == ">=3.10"
    classifiers = meta.get_all("Classifier") or []
    for minor in (10, 11, 12, 13):
        assert f"Programming Language :: Python :: 3.{minor}" in classifiers
    assert "Operating System :: OS Independent" in classifiers


def test_tomli_is_required_where_tomllib_is_missing(wheel: zipfile.ZipFile) -> None:
    tomli = _runtime(wheel)["tomli"]
    assert tomli.marker is not None
    assert tomli.marker.evaluate({"python_version": "3.10"})
    assert not tomli.marker.evaluate({"python_version": "3.11"})


@pytest.mark.parametrize(
    ("name", "refused", "admitted"),
    [
        # 0.12-0.17 with click >= 8.2: a missing argument reaches the command as None (exit 4)
        # and 0.12-0.15 crash on `COMMAND --help`; 0.18.0 passes scripts/compat.sh's floor job.
        ("typer", ["0.12.0", "0.15.1", "0.17.5"], ["0.18.0", "0.29.1"]),
        ("click", ["7.1.2"], ["8.0.0", "8.5.1"]),
        # transformers 4.57 asks for >=0.34,<1; the 1.x and 2.x clients work too.
        ("huggingface-hub", ["0.33.5", "3.0.0"], ["0.34.0", "0.36.2", "1.0.0", "2.4.0"]),
        # the last MLflow 2.x client beside a version 3 server, and 3.x.
        ("mlflow-skinny", ["2.15.1", "4.0.0"], ["2.16.0", "2.22.5", "3.17.2"]),
    ],
)
def test_ranges_admit_the_stacks_users_have(
    wheel: zipfile.ZipFile, name: str, refused: list[str], admitted: list[str]
) -> None:
    spec = _runtime(wheel)[name].specifier
    assert [v for v in refused if spec.contains(Version(v), prereleases=True)] == []
    assert [v for v in admitted if not spec.contains(Version(v))] == []


def _third_party_imports() -> set[str]:
    """Top-level names of every module the shipped packages import at run time (not under
    ``if TYPE_CHECKING:``), the standard library and dynaudit's own packages left out."""
    found: set[str] = set()
    for path in [*(ROOT / "dynaudit").rglob("*.py"), *(ROOT / "plugins").rglob("*.py")]:
        found |= _imports(ast.parse(path.read_text(), str(path)))
    return found - set(sys.stdlib_module_names) - {"dynaudit", "dynaudit_plugins"}


def _imports(node: ast.AST) -> set[str]:
    if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
        return set().union(*map(_imports, node.orelse))
    if isinstance(node, ast.Import):
        return {alias.name.split(".")[0] for alias in node.names}
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return {node.module.split(".")[0]}
    return set().union(*map(_imports, ast.iter_child_nodes(node)))


def test_every_imported_package_is_declared(wheel: zipfile.ZipFile) -> None:
    """An import a dependency happens to bring along (click through old typer, tomli through
    a test tool) breaks as soon as that dependency changes: each must be declared."""
    declared = set(_runtime(wheel))
    providers = importlib.metadata.packages_distributions()
    # A module this interpreter lacks (tomli on 3.11+) is named like its distribution.
    undeclared = {
        module: providers.get(module, [module])
        for module in _third_party_imports() - OPTIONAL_IMPORTS
        if not {_canonical(d) for d in providers.get(module, [module])} & declared
    }
    assert undeclared == {}


def _canonical(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def test_readme_installs_from_a_checkout_or_a_wheel() -> None:
    """dynaudit is not on a package index (SPEC §8): a `pip install dynaudit` would fetch
    someone else's package, or nothing."""
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"pip install[^\n`]*", readme)
    assert commands
    from_index = [c for c in commands if re.search(r"(?<![-\w./'\"\[])dynaudit(?![-\w./\]])", c)]
    assert from_index == []
    local = [c for c in commands if re.search(r"(\s-e)?\s(\.|\S+\.whl|\S*dist/\S*)(\s|$)", c)]
    assert local, commands


def test_the_json_schemas_ship_in_the_wheel(wheel: zipfile.ZipFile) -> None:
    """Regression: the schema files were package data nobody declared, so a wheel lacked them."""
    shipped = {n for n in wheel.namelist() if n.startswith("dynaudit/schemas/")}
    for name in ("measure", "check", "inspect", "baseline"):
        assert f"dynaudit/schemas/{name}.schema.json" in shipped
