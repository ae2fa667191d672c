"""Where checkpoints come from. Each source yields a local checkpoint path and its URI."""

from dynaudit.sources.local import ResolvedSource, resolve

__all__ = ["ResolvedSource", "resolve"]
