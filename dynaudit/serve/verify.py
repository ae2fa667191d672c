"""Is a webhook delivery from the registry we trust? Pure checks, one per source.

MLflow signs each delivery the Standard Webhooks way: ``v1,`` + base64 of
HMAC-SHA256(secret, ``"{delivery id}.{timestamp}."`` + body), sent with the delivery id and
the unix timestamp in headers. The signature covers the **raw body bytes**, so the caller
must pass what came off the wire, not a re-serialised parse. The timestamp bounds how long a
captured delivery can be replayed; MLflow's retries reuse it, and its retry schedule ends
well inside the default five minutes.

The Hugging Face Hub signs nothing: it sends the shared secret verbatim in
``X-Webhook-Secret``, so all we can do is compare it, in constant time.

Each check returns ``None`` for an authentic delivery or a short fixed reason for the
receiver's log and 401 answer. A reason never quotes the secret, a signature or the body:
whoever sent a forged request learns nothing from it, and the log holds nothing to leak.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from collections.abc import Mapping

__all__ = [
    "HUB_SECRET",
    "MLFLOW_DELIVERY_ID",
    "MLFLOW_SIGNATURE",
    "MLFLOW_TIMESTAMP",
    "hub_secret_problem",
    "mlflow_signature_problem",
    "sign_mlflow",
]

MLFLOW_DELIVERY_ID = "X-MLflow-Delivery-Id"
MLFLOW_TIMESTAMP = "X-MLflow-Timestamp"
MLFLOW_SIGNATURE = "X-MLflow-Signature"
HUB_SECRET = "X-Webhook-Secret"

# Unix seconds as MLflow writes them (``str(int(time.time()))``). The cap keeps int() cheap
# and far from Python's digit limit; 20 digits is beyond any real clock.
_UNIX_SECONDS = re.compile(r"[0-9]{1,20}")


def sign_mlflow(secret: str, delivery_id: str, timestamp: str | int, body: bytes) -> str:
    """The ``X-MLflow-Signature`` value MLflow sends for this delivery (tests, docs)."""
    signed = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def mlflow_signature_problem(
    secret: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    now: float | None = None,
    tolerance: float = 300.0,
) -> str | None:
    """Why this MLflow delivery is not authentic, or ``None`` when it is.

    ``headers`` is any mapping (names in any case); ``body`` the raw request bytes. The
    signature header may hold several space-separated entries (a sender rotating secrets
    signs with each); one matching ``v1,`` entry is enough.
    """
    _require_secret(secret)
    lower = _lower_keys(headers)
    for name in (MLFLOW_DELIVERY_ID, MLFLOW_TIMESTAMP, MLFLOW_SIGNATURE):
        if not lower.get(name.lower()):
            return f"missing {name} header"
    delivery_id = lower[MLFLOW_DELIVERY_ID.lower()]
    timestamp = lower[MLFLOW_TIMESTAMP.lower()]
    if not _UNIX_SECONDS.fullmatch(timestamp):
        return f"{MLFLOW_TIMESTAMP} is not unix seconds"
    offset = int(timestamp) - (time.time() if now is None else now)
    if abs(offset) > tolerance:
        return f"timestamp {abs(offset):.0f} s away from now (limit {tolerance:g} s)"
    offered = [e for e in lower[MLFLOW_SIGNATURE.lower()].split() if e.startswith("v1,")]
    if not offered:
        return f"no v1 signature in {MLFLOW_SIGNATURE}"
    expected = sign_mlflow(secret, delivery_id, timestamp, body).encode()
    # Compare every entry, even after a match, so the time taken says nothing about which.
    matches = [hmac.compare_digest(_utf8(entry), expected) for entry in offered]
    return None if any(matches) else "bad signature"


def hub_secret_problem(secret: str, headers: Mapping[str, str]) -> str | None:
    """Why this Hub delivery is not authentic, or ``None`` when it is."""
    _require_secret(secret)
    sent = _lower_keys(headers).get(HUB_SECRET.lower())
    if not sent:
        return f"missing {HUB_SECRET} header"
    if not hmac.compare_digest(_utf8(sent), secret.encode()):
        return f"wrong {HUB_SECRET}"
    return None


def _require_secret(secret: str) -> None:
    # An empty secret would make an empty or absent header "match": refuse the setup, loudly.
    if not secret:
        raise ValueError("a webhook secret must not be empty")


def _lower_keys(headers: Mapping[str, str]) -> dict[str, str]:
    return {key.lower(): value for key, value in headers.items()}


def _utf8(text: str) -> bytes:
    # Header values may carry anything (servers decode them as Latin-1); never raise on one.
    return text.encode("utf-8", "replace")
