"""Where checkpoints come from. Each source yields a local checkpoint path and its URI."""

from dynaudit.sources.local import ResolvedSource, open_checkpoint, resolve

__all__ = ["ResolvedSource", "open_checkpoint", "resolve"]
