"""An example third-party dynaudit family plugin (used by dynaudit's own tests)."""

from __future__ import annotations

from dynaudit_example_plugin.family import DenseKernelsFamily

__all__ = ["DenseKernelsFamily"]
