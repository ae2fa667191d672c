"""Every error dynaudit raises on purpose derives from :class:`DynauditError`, and every exit
code is an :class:`ExitCode`.

Each class carries structured fields (``path``, ``uri``, ``tensors``, ...), the exit code the
CLI returns for it and its ``hint``: the next thing for the user to try. The CLI turns them
into one line, in one place: ``dynaudit/cli/_errors.py``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from enum import IntEnum
from typing import ClassVar

__all__ = [
    "AccessDenied",
    "AdapterRefused",
    "BaselineError",
    "CheckpointNotFound",
    "CorruptCheckpoint",
    "DynauditError",
    "EmptyCheckpoint",
    "EventError",
    "ExitCode",
    "InputError",
    "NoReader",
    "NonFiniteWeights",
    "NotARegularFile",
    "NothingToAudit",
    "OutputError",
    "OutputRefused",
    "PickleRefused",
    "PluginError",
    "QuantizedRefused",
    "RemoteNotFound",
    "SourceUnreachable",
    "StateDictKeyNotFound",
    "StructureError",
    "UnauditedWeights",
    "UnknownFamily",
    "UsageError",
    "listed",
    "printable",
]


class ExitCode(IntEnum):
    """The process exit codes of ``dynaudit`` and of the GitHub action's ``exit-code`` output
    (README's "Exit codes"): the gate's failure (1) is told apart from every way the tool
    itself could not decide (2, 3, 4), as pytest's ``ExitCode`` does."""

    OK = 0
    GATE_FAILED = 1
    USAGE = 2
    INPUT = 3
    INTERNAL = 4
    INTERRUPTED = 130

    def __str__(self) -> str:  # the number, on Python 3.10 too (IntEnum's own from 3.11)
        return str(self.value)

    @property
    def meaning(self) -> str:
        """One line for ``--help`` and the action's comment; its words before ``:`` name it."""
        return _MEANINGS[self]


_MEANINGS = {
    ExitCode.OK: "ok: measured, or the gate passed",
    ExitCode.GATE_FAILED: "gate failed: capacity loss, damage, or non-finite (NaN/Inf) weights",
    ExitCode.USAGE: "usage error: invalid flags or settings",
    ExitCode.INPUT: "input error: checkpoint missing, unreadable or corrupt; unreachable server",
    ExitCode.INTERNAL: (
        "internal error: a bug in dynaudit (re-run with DYNAUDIT_DEBUG=1 and report it)"
    ),
    ExitCode.INTERRUPTED: "interrupted: nothing half-written is left behind",
}


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


def listed(names: Sequence[str], most: int = 5) -> str:
    """The first ``most`` names, comma-separated, and how many more there are: a message names
    a few of a long list and counts the rest."""
    shown = ", ".join(list(names)[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


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
    """Root of dynaudit's errors: ``message`` (one line), the ``path`` or ``uri`` it concerns
    when there is one, and, per class, ``exit_code`` and ``hint``.

    ``hint`` is the next thing for the user to try, which the CLI adds to the message in
    parentheses. It is empty where every message of the class names its own next step,
    because that step depends on the case (which server, which flag, which file).
    Raised as itself, it is unexpected: exit 4, like a bug."""

    exit_code: ClassVar[ExitCode] = ExitCode.INTERNAL
    hint: ClassVar[str] = "re-run with DYNAUDIT_DEBUG=1 for the traceback, and report it"

    def __init__(self, message: str, *, path: str | None = None, uri: str | None = None) -> None:
        message = printable(message)  # one line, whatever strings it quotes
        super().__init__(message)
        self.message = message
        self.path = path  # a local file or directory, as dynaudit opened it
        self.uri = uri  # the SOURCE as the user gave it (hf://, mlflow://, a path)


class UsageError(DynauditError, ValueError):
    """The call itself is wrong: bad flag values, incompatible settings (exit 2)."""

    exit_code = ExitCode.USAGE
    hint = "see `dynaudit COMMAND --help`"


class UnknownFamily(UsageError, LookupError):
    """``--family`` names no installed family plugin."""

    hint = "`dynaudit plugins` lists the installed families"

    def __init__(self, name: str, suggestions: Sequence[str], available: Sequence[str]) -> None:
        self.name = name
        self.suggestions = list(suggestions)
        self.available = list(available)
        guess = f"did you mean {', '.join(map(repr, self.suggestions))}?" if suggestions else ""
        super().__init__(f"unknown model family {name!r}" + (f"; {guess}" if guess else ""))


class InputError(DynauditError):
    """The checkpoint (or baseline, or server) cannot be used as given (exit 3)."""

    exit_code = ExitCode.INPUT
    hint = ""  # each message says what is wrong with the input, and what to do when it can


class CheckpointNotFound(InputError, FileNotFoundError):
    """No checkpoint at the given path or URI."""

    hint = "check the path"


class RemoteNotFound(CheckpointNotFound):
    """A Hub repo, revision or file, or an MLflow model, version or run, does not exist."""

    hint = ""  # each message names what to check on that server


class SourceUnreachable(InputError):
    """The Hugging Face endpoint or MLflow server cannot be reached (or offline, not cached)."""

    hint = ""  # each message names the setting to check (endpoint, offline mode) or to retry


class AccessDenied(InputError):
    """The server refused the credentials (401/403, gated or private repo)."""

    hint = ""  # each message names the server's own token variables


class EmptyCheckpoint(InputError):
    """The path exists but holds no safetensors weights."""

    hint = "point at a .safetensors file or a directory that holds one"


class NothingToAudit(InputError):
    """The checkpoint holds weights, but no matrix its family would fit (only biases, norms,
    scalars)."""

    hint = "`dynaudit inspect` lists its tensors; `--family` picks another family"


class CorruptCheckpoint(InputError):
    """A safetensors file is truncated, malformed or inconsistent with its index."""

    hint = "re-download or re-save the checkpoint"


class PickleRefused(InputError):
    """Only pickle weights (``.bin``/``.pt``) were found; they can execute code when loaded."""

    hint = ""  # the message says how to convert them, or that --allow-pickle reads them


class StateDictKeyNotFound(InputError, LookupError):
    """``--state-dict-key`` names no state dict of the pickle training checkpoint."""

    hint = ""  # the message lists the keys the checkpoint has


class NotARegularFile(InputError):
    """A path that must be a regular file (weights, config, model card) is a FIFO, device,
    socket, directory or dangling link; never opened, since opening a FIFO blocks."""

    hint = "copy the checkpoint into regular files"


class UnauditedWeights(InputError):
    """The loader would read weight files that the audit did not."""

    hint = ""  # the message names the files and the two ways out


class StructureError(InputError):
    """The checkpoint contradicts its own config.json or its family's architecture (a layer
    whose tensor cannot be read as the matrices its kind needs, among others)."""

    hint = "`dynaudit inspect` lists its tensors; `--family` picks another family"


class AdapterRefused(InputError):
    """An adapter dynaudit cannot merge exactly (DoRA, unknown PEFT type, a malformed
    adapter_config.json, a base that is the adapter itself, ...)."""

    hint = ""  # each message says what to merge first, which base to name, or what is wrong


class QuantizedRefused(InputError):
    """Quantized weights dynaudit does not dequantize exactly: GPTQ/AWQ packed integers,
    bitsandbytes int8/nf4/fp4 state, packed FP4/FP6, or FP8 scales it cannot place (FP8 with
    its scales is read; docs/sources.md, "Quantized weights")."""

    hint = ""  # each message says what to audit instead, or how to dequantize first


class BaselineError(InputError):
    """A baseline that cannot be used: missing, tampered, or made with other settings."""

    hint = ""  # each message says whether to re-create the baseline or to pick another


class PluginError(InputError):
    """A family plugin failed to load or does not implement the contract."""

    hint = "reinstall or uninstall that plugin; `dynaudit plugins` lists them"


class OutputRefused(UsageError):
    """An output path that must not be written: an input of the run, the path of another
    output, or something other than a regular file (a directory, FIFO, device) (exit 2)."""

    hint = ""  # the message says why the path is refused, and most what to give instead


class OutputError(InputError):
    """An output could not be written: permission denied, read-only or full disk (exit 3)."""

    hint = "check the directory's permissions and free space"


class NoReader(OutputError):
    """A FIFO given as an output that no process reads (exit 3): writing would wait forever."""

    hint = ""  # the message says to start the reader first


class EventError(DynauditError, ValueError):
    """A webhook body that is not a registry event ``dynaudit serve`` can read (it answers
    400); the message never quotes the body."""

    exit_code = ExitCode.USAGE
    hint = ""


class NonFiniteWeights(DynauditError):
    """NaN or Inf in the weights: the checkpoint is damaged (exit 1, like a failed gate)."""

    exit_code = ExitCode.GATE_FAILED
    hint = "the checkpoint is damaged; the report lists every layer"

    def __init__(self, tensors: Sequence[str]) -> None:
        self.tensors = list(tensors)
        super().__init__(
            f"non-finite weights (NaN/Inf) in {len(self.tensors)} tensor(s): {listed(self.tensors)}"
        )
