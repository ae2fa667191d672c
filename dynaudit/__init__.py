"""dynaudit: audit neural-network checkpoints without data.

Public API::

    import dynaudit
    report = dynaudit.measure("path/to/checkpoint")   # -> dynaudit.Report
    print(report.summary.all.mean_distance)

Heavy modules (torch) are imported on first use, so ``import dynaudit`` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "PROTOCOL_VERSION",
    "CheckReport",
    "DynauditError",
    "FitSettings",
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
    from dynaudit.schema import CheckReport, Policy, Report
    from dynaudit.sources.base import SourceOptions

_LAZY = {
    "measure": "dynaudit.api",
    "inspect": "dynaudit.api",
    "baseline": "dynaudit.api",
    "check": "dynaudit.api",
    "compare": "dynaudit.api",
    "Policy": "dynaudit.schema",
    "CheckReport": "dynaudit.schema",
    "FitSettings": "dynaudit.config",
    "PROTOCOL_VERSION": "dynaudit.config",
    "DynauditError": "dynaudit.errors",
    "Report": "dynaudit.schema",
    "SourceOptions": "dynaudit.sources.base",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dynaudit' has no attribute {name!r}")
