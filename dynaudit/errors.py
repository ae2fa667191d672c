"""Every error dynaudit raises on purpose derives from :class:`DynauditError`.

Each class carries structured fields (``path``, ``tensors``, ...) and the exit code the CLI
returns for it; the CLI turns them into one-line messages in ``dynaudit/cli/_errors.py``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = [
    "AccessDenied",
    "CheckpointNotFound",
    "CorruptCheckpoint",
    "DynauditError",
    "EmptyCheckpoint",
    "InputError",
    "NonFiniteWeights",
    "NothingToAudit",
    "PickleRefused",
    "PluginError",
    "RemoteNotFound",
    "SourceUnreachable",
    "UnknownFamily",
    "UsageError",
    "printable",
]

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: str) -> str:
    """``text`` on one line: control characters (line breaks included) shown as escapes, so a
    string from a checkpoint or a server (a crafted tensor name) can neither end a one-line
    message nor start a line of its own — a forged log line or a GitHub workflow command."""

    def escape(match: re.Match[str]) -> str:
        char = match.group()
        code = ord(char)
        return _NAMED.get(char) or (f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}")

    return _CONTROL.sub(escape, text)


class DynauditError(Exception):
    """Root of dynaudit's errors. Unexpected failures map to exit code 4."""

    exit_code = 4

    def __init__(self, message: str) -> None:
        message = printable(message)  # one line, whatever strings it quotes
        super().__init__(message)
        self.message = message


class UsageError(DynauditError, ValueError):
    """The call itself is wrong: bad flag values, incompatible settings (exit 2)."""

    exit_code = 2


class UnknownFamily(UsageError, LookupError):
    """``--family`` names no installed family plugin."""

    def __init__(self, name: str, suggestions: Sequence[str], available: Sequence[str]) -> None:
        self.name = name
        self.suggestions = list(suggestions)
        self.available = list(available)
        hint = f"did you mean {', '.join(map(repr, self.suggestions))}?" if suggestions else ""
        super().__init__(f"unknown model family {name!r}" + (f"; {hint}" if hint else ""))


class InputError(DynauditError):
    """The checkpoint (or baseline, or server) cannot be used as given (exit 3)."""

    exit_code = 3

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class CheckpointNotFound(InputError, FileNotFoundError):
    """No checkpoint at the given path or URI."""


class RemoteNotFound(CheckpointNotFound):
    """A Hub repo, revision or file, or an MLflow model, version or run, does not exist."""


class SourceUnreachable(InputError):
    """The Hugging Face endpoint or MLflow server cannot be reached (or offline, not cached)."""


class AccessDenied(InputError):
    """The server refused the credentials (401/403, gated or private repo)."""


class EmptyCheckpoint(InputError):
    """The path exists but holds no safetensors weights."""


class NothingToAudit(InputError):
    """The checkpoint holds weights, but no matrix its family would fit (only biases, norms,
    scalars)."""


class CorruptCheckpoint(InputError):
    """A safetensors file is truncated, malformed or inconsistent with its index."""


class PickleRefused(InputError):
    """Only pickle weights (``.bin``/``.pt``) were found; they can execute code when loaded."""


class PluginError(InputError):
    """A family plugin failed to load or does not implement the contract."""


class NonFiniteWeights(DynauditError):
    """NaN or Inf in the weights: the checkpoint is damaged (exit 1, like a failed gate)."""

    exit_code = 1

    def __init__(self, tensors: Sequence[str]) -> None:
        self.tensors = list(tensors)
        shown = ", ".join(self.tensors[:5]) + (
            f" and {len(self.tensors) - 5} more" if len(self.tensors) > 5 else ""
        )
        super().__init__(f"non-finite weights (NaN/Inf) in {len(self.tensors)} tensor(s): {shown}")
