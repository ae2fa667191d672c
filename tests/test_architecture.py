"""The package's architecture, checked: its import graph and its public surface.

The import graph of dynaudit/ and plugins/ is read from the source with :mod:`ast`, never by
importing it. Every import statement counts wherever it stands: at the top of a module, inside a
function (a lazy import is still a dependency, and a cycle hidden in one breaks as soon as the
order of first use changes) and under ``if TYPE_CHECKING:`` (mypy follows those, and a type-only
import that later has to run must not turn out to close a cycle).

What an import depends on: ``import a.b`` and ``from a.b import name`` depend on the module
``a.b``; when ``name`` is itself a submodule (``from dynaudit.sources import hub``), on that
submodule. A name re-exported by a package is not traced to the module that defines it:
importing it runs the package's ``__init__`` and everything that imports, so the package is
what is depended on. A package's ``__init__`` importing its own submodules is therefore an edge
like any other, and a submodule that imports its parent package to reach a sibling closes a
cycle. Python's implicit import of the parent packages of a module is not an edge (it would make
every package a cycle with its submodules).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import dynaudit
from dynaudit.api import CheckOptions, FitOptions, check
from dynaudit.config import FitSettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the backport
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"dynaudit": Path("dynaudit"), "dynaudit_plugins": Path("plugins/dynaudit_plugins")}

# The layering contract, lowest layer first: a module may import modules of its own layer or of
# any layer below it, never one above. A name is a module under ``dynaudit.`` (or, when it starts
# with ``dynaudit``, an absolute one); ``pkg.*`` is a package and every module in it. Each module
# of the tree matches exactly one name.
LAYERS = """
foundation  _version errors config secrets console runtime distributed schemas
kernel      dynamics.*
schema      schema schemas.generate schemas.__main__
gate        gate
tensors     quantized tensors
storage     files outputs cache
inputs      sources.* families.*
plugins     dynaudit_plugins.*
baselines   baseline_store
engine      engine.*
structure   structure
renderers   reports.*
facade      api dynaudit
tracking    tracking hub_comments
service     serve.*
cli         cli.* __main__ demo
"""
# Why this order. The kernel (the method's mathematics) and the gate (the pure policy) sit
# as low as they can: they may read the settings and the schemas they fill, never a checkpoint,
# a cache or a source. Sources and families turn a SOURCE into a planned checkpoint; the
# plugins are families. The engine measures and compares a planned checkpoint and reads the
# stored baselines (on disk or in MLflow); structure (inspect) reuses the engine's plan. The
# renderers turn a finished report into text. The facade (dynaudit.api, and the package's lazy
# table of it) is the one entry point; above it only its users: tracking (a report logged to an
# MLflow run or posted to the Hub repository it checked, and the training callback, which
# measures through the facade), the registry receiver (`dynaudit serve`, which writes verdicts
# back through tracking) and the CLI.


Graph = dict[str, set[str]]


def modules(root: Path) -> dict[str, tuple[Path, bool]]:
    """Every module of the packages under ``root``: name -> (file, is a package)."""
    found: dict[str, tuple[Path, bool]] = {}
    for package, folder in PACKAGES.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = [package, *path.relative_to(root / folder).with_suffix("").parts]
            is_package = parts[-1] == "__init__"
            found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def import_graph(root: Path) -> Graph:
    """Module -> the modules of the tree it imports (see the module docstring)."""
    known = modules(root)
    graph: Graph = {}
    for name, (path, is_package) in known.items():
        package = name if is_package else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(), str(path))
        targets = {
            _owner(n, known) for node in ast.walk(tree) for n in _imported(node, package, known)
        }
        graph[name] = {t for t in targets if t is not None and t != name}
    return graph


def _imported(node: ast.AST, package: str, known: dict[str, tuple[Path, bool]]) -> list[str]:
    """The dotted names an import statement depends on: for ``from module import name``,
    ``module.name`` when that is a submodule, else ``module``."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    module = node.module or ""
    if node.level:  # relative: from the package, one level up per dot after the first
        base = package.split(".")[: len(package.split(".")) - node.level + 1]
        module = ".".join([*base, module] if module else base)
    return [
        f"{module}.{alias.name}" if f"{module}.{alias.name}" in known else module
        for alias in node.names
    ]


def _owner(name: str, known: dict[str, tuple[Path, bool]]) -> str | None:
    """The module of the tree ``name`` is or lies in (None: outside the tree)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def cycles(graph: Graph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in sorted(graph[module]):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while not component or component[-1] != module:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def layer_table() -> list[tuple[str, list[str]]]:
    """:data:`LAYERS` as (layer, absolute names), lowest first."""
    table = []
    for line in LAYERS.strip().splitlines():
        layer, *names = line.split()
        table.append((layer, [n if n.startswith("dynaudit") else f"dynaudit.{n}" for n in names]))
    return table


def _matches(module: str, name: str) -> bool:
    if name.endswith(".*"):
        return module == name[:-2] or module.startswith(name[:-1])
    return module == name


def layers_of(graph: Graph) -> dict[str, int]:
    """Each module's layer (its index in the table); a module that no name or several names
    match is an error, so that a new module is placed on purpose."""
    table = layer_table()
    level: dict[str, int] = {}
    for module in graph:
        hits = [i for i, (_, names) in enumerate(table) for n in names if _matches(module, n)]
        assert len(hits) == 1, f"{module} matches {len(hits)} names of LAYERS: place it once"
        level[module] = hits[0]
    return level


def upward_imports(graph: Graph) -> list[str]:
    """Every import of a module from a layer above the importer's, as readable lines."""
    table = layer_table()
    level = layers_of(graph)
    return [
        f"{module} ({table[level[module]][0]}) imports {target} ({table[level[target]][0]})"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        if level[target] > level[module]
    ]


def test_the_package_has_no_import_cycle() -> None:
    assert cycles(import_graph(ROOT)) == []


def test_no_module_imports_from_a_layer_above_its_own() -> None:
    assert upward_imports(import_graph(ROOT)) == []


def test_every_name_of_the_layer_table_names_a_module() -> None:
    """A stale name (a module moved or removed) would hide where its successor belongs."""
    graph = import_graph(ROOT)
    stale = [
        name
        for _, names in layer_table()
        for name in names
        if not any(_matches(module, name) for module in graph)
    ]
    assert stale == []


def test_the_checker_catches_an_upward_import_and_a_cycle(tmp_path: Path) -> None:
    """A copy of the tree with two injected imports: a function-level import of the facade
    in the kernel (upward, and a cycle through the engine), and a TYPE_CHECKING import of the
    engine in tensors (upward only)."""
    for folder in PACKAGES.values():
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("*.pyc"))
    kernel = tmp_path / "dynaudit/dynamics/kernel.py"
    kernel.write_text(kernel.read_text() + "\n\ndef _late():\n    from dynaudit import api\n")
    tensors = tmp_path / "dynaudit/tensors.py"
    tensors.write_text(
        tensors.read_text() + "\nif TYPE_CHECKING:\n    from dynaudit.engine import measure\n"
    )
    graph = import_graph(tmp_path)
    before = import_graph(ROOT)
    assert sorted(set(upward_imports(graph)) - set(upward_imports(before))) == [
        "dynaudit.dynamics.kernel (kernel) imports dynaudit.api (facade)",
        "dynaudit.tensors (tensors) imports dynaudit.engine.measure (engine)",
    ]
    (cycle,) = [c for c in cycles(graph) if c not in cycles(before)]
    assert {"dynaudit.api", "dynaudit.dynamics.kernel", "dynaudit.engine.measure"} <= set(cycle)


def test_a_submodule_importing_its_parent_package_closes_a_cycle() -> None:
    """The rule for re-exported names, on a synthetic graph: local reaching a sibling through
    ``from dynaudit.sources import ...`` depends on the package, which imports local."""
    graph: Graph = {"dynaudit.sources": {"dynaudit.sources.local"}, "dynaudit.sources.local": set()}
    assert cycles(graph) == []
    graph["dynaudit.sources.local"].add("dynaudit.sources")
    assert cycles(graph) == [["dynaudit.sources", "dynaudit.sources.local"]]


# -- public surface ------------------------------------------------------------------------


def _type_checking_mirror() -> dict[str, str]:
    """name -> module of the ``if TYPE_CHECKING:`` imports of dynaudit/__init__.py."""
    tree = ast.parse((ROOT / "dynaudit/__init__.py").read_text())
    mirror: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for statement in node.body:
                assert isinstance(statement, ast.ImportFrom) and statement.module
                mirror.update((alias.name, statement.module) for alias in statement.names)
    return mirror


def test_all_the_lazy_table_and_the_type_checking_mirror_agree() -> None:
    lazy = dynaudit._LAZY
    assert sorted(dynaudit.__all__) == sorted([*lazy, "__version__"])
    assert _type_checking_mirror() == lazy
    for name, module in lazy.items():
        assert getattr(dynaudit, name) is getattr(importlib.import_module(module), name)
    assert {"Baseline", "Inspection"} <= set(dynaudit.__all__)


def test_importing_dynaudit_leaves_torch_unloaded() -> None:
    """``import dynaudit`` and its light names cost no torch import (a CLI's --help, a type
    annotation); the entry points load it on first use."""
    code = (
        "import sys, dynaudit\n"
        "dynaudit.__version__, dynaudit.FitSettings, dynaudit.DynauditError, dynaudit.Policy\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "dynaudit.measure\n"
        "assert 'torch' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_one_version_string() -> None:
    """pyproject.toml reads the version from dynaudit/_version.py, which every report, cache
    key and ``--version`` uses through dynaudit.__version__."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    declared = project["tool"]["setuptools"]["dynamic"]["version"]
    assert declared == {"attr": "dynaudit._version.__version__"}
    from dynaudit import _version

    assert dynaudit.__version__ is _version.__version__


def test_the_typed_settings_name_every_fit_setting() -> None:
    """``**settings: Unpack[FitOptions]`` of the api: a field added to FitSettings must be
    added there too, or mypy would refuse it at every call."""
    assert set(FitOptions.__annotations__) == set(FitSettings.model_fields)


def test_compare_passes_on_exactly_the_keywords_of_check() -> None:
    """``compare(a, b, **kwargs: Unpack[CheckOptions])``: CheckOptions is check's keyword
    parameters, its fit settings spelt out."""
    parameters = inspect.signature(check).parameters.values()
    keywords = {p.name for p in parameters if p.kind is p.KEYWORD_ONLY}
    assert set(CheckOptions.__annotations__) == keywords | set(FitOptions.__annotations__)


@pytest.mark.parametrize("name", ["Baseline", "Inspection"])
def test_the_result_models_are_exported(name: str) -> None:
    from dynaudit import schema

    assert getattr(dynaudit, name) is getattr(schema, name)
