"""Secrets the user gave dynaudit, scrubbed from every message it prints.

The secrets are the values of the token variables the user set (``HF_TOKEN``,
``HUGGING_FACE_HUB_TOKEN``, ``MLFLOW_TRACKING_TOKEN``, ``MLFLOW_TRACKING_PASSWORD``), the
``MLFLOW_TRACKING_USERNAME:PASSWORD`` pair, the password of a tracking URI
(``http://user:password@host``, from ``MLFLOW_TRACKING_URI`` or ``--mlflow-uri``), and the
values given as flags (``--hf-token``), which :func:`remember` records. A server or proxy that
reflects the request's ``Authorization`` header quotes them back — as sent (``Bearer
<token>``), base64-encoded (``Basic base64(user:password)``) or URL-encoded — so each secret is
scrubbed in all those forms, including base64 *inside* a longer base64 text (the three byte
alignments of the secret within it).

Short values: a secret of fewer than :data:`MIN_LENGTH` (4) characters is not scrubbed, since
replacing every "ab" would mangle every message while such a value protects nothing; one of
fewer than :data:`MIN_ANYWHERE` (6) characters is scrubbed only where it stands alone (not
inside a longer word or number) and not in encoded forms, which would match by chance.
Longer ones are scrubbed wherever they appear.

Messages become one line in :mod:`dynaudit.cli._errors` (wrapped by :func:`scrubbed_output`),
MLflow errors are scrubbed where they are quoted (:mod:`dynaudit.sources.mlflow`), and log
records by :class:`ScrubFilter` (:func:`scrub_logging`).
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from functools import lru_cache
from urllib.parse import quote, quote_plus, unquote, urlsplit

__all__ = [
    "MIN_ANYWHERE",
    "MIN_LENGTH",
    "REDACTED",
    "TOKEN_VARIABLES",
    "ScrubFilter",
    "remember",
    "scrub",
    "scrub_logging",
    "scrubbed_output",
]

TOKEN_VARIABLES = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
)
URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
MIN_LENGTH = 4
MIN_ANYWHERE = 6
REDACTED = "***"
_MIN_FRAGMENT = 8  # a base64 fragment shorter than this could match by chance

_given: set[str] = set()  # tokens from flags
_given_uris: set[str] = set()  # URIs from flags, whose passwords are secrets


def remember(token: str | None = None, uri: str | None = None) -> None:
    """Record a secret given other than through the environment: a token flag's value, or a
    URI that may carry a password. Never stored anywhere but in this process's memory."""
    if token:
        _given.add(token)
    if uri:
        _given_uris.add(uri)


def _uri_secrets(uri: str) -> set[str]:
    try:
        parts = urlsplit(uri)
        user, password = parts.username, parts.password
    except ValueError:
        return set()
    if not password:
        return set()
    found = {password, unquote(password)}
    if user:  # sent as Basic auth: base64 of the decoded pair
        found.add(f"{unquote(user)}:{unquote(password)}")
    return found


def secret_values(environ: Mapping[str, str] | None = None) -> frozenset[str]:
    """Every secret in effect now (environment and remembered flags)."""
    env = os.environ if environ is None else environ
    found = {env[name] for name in TOKEN_VARIABLES if env.get(name)}
    found |= _given
    user, password = env.get("MLFLOW_TRACKING_USERNAME"), env.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        found.add(f"{user}:{password}")
    for uri in [*(env.get(name, "") for name in URI_VARIABLES), *_given_uris]:
        found |= _uri_secrets(uri)
    return frozenset(v for v in found if len(v) >= MIN_LENGTH)


def _base64_forms(value: bytes) -> set[str]:
    """``value`` base64-encoded (standard and URL-safe, with and without padding), and the
    characters that encode only its bytes when it sits at any offset in a longer text."""
    forms: set[str] = set()
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        whole = encode(value).decode()
        forms |= {whole, whole.rstrip("=")}
        for pad in (0, 1, 2):
            encoded = encode(b"\0" * pad + value).decode()
            start = -(-pad * 8 // 6)  # first character with no bit of the padding
            stop = (pad + len(value)) * 8 // 6  # last character with every bit from value
            fragment = encoded[start:stop]
            if len(fragment) >= _MIN_FRAGMENT:
                forms.add(fragment)
    return forms


def _url_forms(value: str) -> set[str]:
    """``value`` URL-encoded, as regular expressions: percent-escapes in either case."""

    def either_case(escape: str) -> str:
        return "%" + "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else c for c in escape[1:])

    forms = {quote(value, safe=""), quote(value), quote_plus(value)}
    return {
        "".join(
            either_case(part) if re.fullmatch(r"%[0-9A-F]{2}", part) else re.escape(part)
            for part in re.split(r"(%[0-9A-F]{2})", form)
        )
        for form in forms
    }


@lru_cache(maxsize=32)
def _pattern(secrets: frozenset[str]) -> re.Pattern[str] | None:
    anywhere: set[str] = set()  # regular expressions
    alone: set[str] = set()
    for value in secrets:
        if len(value) < MIN_ANYWHERE:
            alone.add(value)
            continue
        literal = {value, *_base64_forms(value.encode())}
        anywhere |= {re.escape(form) for form in literal} | _url_forms(value)
    # Longest first, so that a whole form wins over a fragment of it.
    alternatives = sorted(anywhere, key=len, reverse=True)
    alternatives += [
        rf"(?<![A-Za-z0-9]){re.escape(v)}(?![A-Za-z0-9])"
        for v in sorted(alone, key=len, reverse=True)
    ]
    return re.compile("|".join(alternatives)) if alternatives else None


def scrub(text: str, secrets: Iterable[str] | None = None) -> str:
    """``text`` with every secret (see the module docstring), in every form, replaced by
    :data:`REDACTED`."""
    values = secret_values() if secrets is None else frozenset(secrets)
    pattern = _pattern(frozenset(v for v in values if len(v) >= MIN_LENGTH))
    return text if pattern is None else pattern.sub(REDACTED, text)


@contextlib.contextmanager
def scrubbed_output() -> Iterator[None]:
    """For the duration, what is written to stdout and stderr is held back, then written
    scrubbed: a whole message (or a ``DYNAUDIT_DEBUG`` traceback) at once, so no secret is
    split between two writes."""
    real_out, real_err = sys.stdout, sys.stderr
    held_out, held_err = io.StringIO(), io.StringIO()
    sys.stdout, sys.stderr = held_out, held_err
    try:
        yield
    finally:
        sys.stdout, sys.stderr = real_out, real_err
        for held, real in ((held_out, real_out), (held_err, real_err)):
            if held.getvalue():
                real.write(scrub(held.getvalue()))
                real.flush()


class ScrubFilter(logging.Filter):
    """A handler filter that scrubs each record's message (and its exception text)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = scrub(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        return True


_FILTER = ScrubFilter()
_LOGGERS = ("", "dynaudit", "mlflow", "huggingface_hub", "urllib3")


def scrub_logging() -> None:
    """Scrub what the handlers that print log records write: Python's last-resort handler
    (dynaudit's warnings, when nothing is configured) and those of the root, dynaudit, MLflow,
    huggingface_hub and urllib3 loggers. Idempotent; call again after a library configured
    its handlers (MLflow does when first imported)."""
    handlers = [logging.lastResort] if logging.lastResort is not None else []
    for name in _LOGGERS:
        handlers += logging.getLogger(name).handlers
    for handler in handlers:
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)
