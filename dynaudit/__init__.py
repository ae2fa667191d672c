"""dynaudit: audit neural-network checkpoints without data.

Public API::

    import dynaudit
    report = dynaudit.measure("path/to/checkpoint")   # -> dynaudit.Report
    print(report.summary.all.mean_distance)

Heavy modules (torch) are imported on first use, so ``import dynaudit`` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dynaudit._version import __version__

__all__ = [
    "PROTOCOL_VERSION",
    "Baseline",
    "CheckReport",
    "DynauditError",
    "FitSettings",
    "Inspection",
    "Policy",
    "Report",
    "SourceOptions",
    "__version__",
    "baseline",
    "check",
    "compare",
    "inspect",
    "measure",
]

if TYPE_CHECKING:
    from dynaudit.api import baseline, check, compare, inspect, measure
    from dynaudit.config import PROTOCOL_VERSION, FitSettings
    from dynaudit.errors import DynauditError
    from dynaudit.schema import Baseline, CheckReport, Inspection, Policy, Report
    from dynaudit.sources.base import SourceOptions

# name -> the module that defines it; __all__ and the TYPE_CHECKING imports above say the same
# (tests/test_architecture.py checks that they agree).
_LAZY = {
    "measure": "dynaudit.api",
    "inspect": "dynaudit.api",
    "baseline": "dynaudit.api",
    "check": "dynaudit.api",
    "compare": "dynaudit.api",
    "Baseline": "dynaudit.schema",
    "CheckReport": "dynaudit.schema",
    "Inspection": "dynaudit.schema",
    "Policy": "dynaudit.schema",
    "FitSettings": "dynaudit.config",
    "PROTOCOL_VERSION": "dynaudit.config",
    "DynauditError": "dynaudit.errors",
    "Report": "dynaudit.schema",
    "SourceOptions": "dynaudit.sources.base",
}


def __getattr__(name: str) -> Any:
    """A public name, imported from its module on first use (torch only with the entry
    points)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dynaudit' has no attribute {name!r}")
