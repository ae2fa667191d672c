"""Every error dynaudit raises on purpose derives from :class:`DynauditError`.

Each class carries structured fields (``path``, ``tensors``, ...) and the exit code the CLI
returns for it; the CLI turns them into one-line messages in ``dynaudit/cli/_errors.py``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = [
    "AccessDenied",
    "AdapterRefused",
    "BaselineError",
    "CheckpointNotFound",
    "CorruptCheckpoint",
    "DynauditError",
    "EmptyCheckpoint",
    "InputError",
    "NoReader",
    "NonFiniteWeights",
    "NotARegularFile",
    "NothingToAudit",
    "OutputError",
    "OutputRefused",
    "PickleRefused",
    "PluginError",
    "RemoteNotFound",
    "SourceUnreachable",
    "StructureError",
    "UnauditedWeights",
    "UnknownFamily",
    "UsageError",
    "printable",
]

# What no rendering may pass through raw: C0 and C1 controls (line breaks, ESC, BEL), the
# line and paragraph separators, every invisible format character that reorders or hides
# text (BiDi embeddings, overrides, isolates and marks, zero-width characters, Unicode tags),
# lone surrogates (they cannot be encoded) and the noncharacters XML 1.0 forbids.
_CONTROL = re.compile(
    "[\x00-\x1f\x7f-\x9f\xad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f"
    "\ufeff\ufff9-\ufffb\ufffe\uffff\ud800-\udfff\U000e0000-\U000e007f]"
)
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    if char in _NAMED:
        return _NAMED[char]
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def printable(text: str) -> str:
    """``text`` on one line of visible characters: controls (line breaks, ESC, BEL), BiDi
    overrides and other invisible format characters shown as Python-style escapes, so a
    string from a checkpoint or a server (a crafted tensor name) can neither end a one-line
    message, start a line of its own (a forged log line or GitHub workflow command), drive
    the terminal (erase a line, ring the bell) nor read differently from what it is.

    The base of every escaping function of :mod:`dynaudit.reports.escape`; this one is the
    terminal's and the error messages'."""
    return _CONTROL.sub(_escape, text)


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


class NotARegularFile(InputError):
    """A path that must be a regular file (weights, config, model card) is a FIFO, device,
    socket, directory or dangling link; never opened, since opening a FIFO blocks."""


class UnauditedWeights(InputError):
    """The loader would read weight files that the audit did not."""


class StructureError(InputError):
    """The checkpoint contradicts its own config.json or its family's architecture (a layer
    whose tensor cannot be read as the matrices its kind needs, among others)."""


class AdapterRefused(InputError):
    """An adapter dynaudit cannot merge exactly (DoRA, unknown PEFT type, a malformed
    adapter_config.json, a base that is the adapter itself, ...)."""


class BaselineError(InputError):
    """A baseline that cannot be used: missing, tampered, or made with other settings."""


class PluginError(InputError):
    """A family plugin failed to load or does not implement the contract."""


class OutputRefused(UsageError):
    """An output path that must not be written: an input of the run, the path of another
    output, or something other than a regular file (a directory, FIFO, device) (exit 2)."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class OutputError(InputError):
    """An output could not be written: permission denied, read-only or full disk (exit 3)."""


class NoReader(OutputError):
    """A FIFO given as an output that no process reads (exit 3): writing would wait forever."""


class NonFiniteWeights(DynauditError):
    """NaN or Inf in the weights: the checkpoint is damaged (exit 1, like a failed gate)."""

    exit_code = 1

    def __init__(self, tensors: Sequence[str]) -> None:
        self.tensors = list(tensors)
        shown = ", ".join(self.tensors[:5]) + (
            f" and {len(self.tensors) - 5} more" if len(self.tensors) > 5 else ""
        )
        super().__init__(f"non-finite weights (NaN/Inf) in {len(self.tensors)} tensor(s): {shown}")
