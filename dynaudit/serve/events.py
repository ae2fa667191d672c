"""What a registry's webhook says happened, parsed from the body into a few small values.

Two senders, two shapes (facts: ``docs/registry.md``):

- MLflow wraps each event as ``{"entity", "action", "timestamp", "data"}`` (plus
  ``"workspace"`` when workspaces are on). We act on a new model version and on an alias set
  (which is also how a *moved* alias arrives) or deleted. Our own verdict tags fire
  ``model_version_tag.set``; like every other event it is :class:`Ignored`, not an error.
- The Hugging Face Hub sends ``{"event": {"action", "scope"}, "repo", "updatedRefs",
  "webhook"}``. A push is scope ``repo.content``, action ``update``; the pushed commit is the
  ``newSha`` of its ``refs/heads/<branch>`` entry. ``repo.headSha`` is always ``main``'s
  head, whatever was pushed, so it is not used. Our own report comments come back as
  ``discussion`` events and must be ignored, or each comment would start a check.

huggingface_hub's ``WebhookPayload`` is not used: it drops ``headSha`` and is experimental.

Parsing is strict about what we use and lenient about the rest (unknown fields pass), so a
sender adding fields breaks nothing while a body we cannot act on is an :class:`EventError`
with a one-line reason. Names come from users (model names, aliases, repo ids, branches) and
end up in job keys, logs and comments, so they must be non-empty, at most
:data:`MAX_NAME` characters and free of control and invisible format characters.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from dynaudit.errors import EventError

__all__ = [
    "MAX_NAME",
    "AliasDeleted",
    "AliasSet",
    "EventError",
    "HubPush",
    "Ignored",
    "MlflowEvent",
    "VersionCreated",
    "guard_key",
    "hub_key",
    "parse_hub",
    "parse_mlflow",
    "version_key",
]

MAX_NAME = 512


@dataclass(frozen=True)
class Ignored:
    """A well-formed event that asks nothing of us, and why (for the 200 answer and the log)."""

    reason: str


@dataclass(frozen=True)
class VersionCreated:
    """A new MLflow model version: check it. ``tags`` are those given at creation."""

    name: str
    version: str
    tags: dict[str, str]

    @property
    def key(self) -> str:
        return version_key(self.name, self.version)


@dataclass(frozen=True)
class AliasSet:
    """An alias now points at ``version`` (new or moved; the old target is not sent)."""

    name: str
    alias: str
    version: str


@dataclass(frozen=True)
class AliasDeleted:
    """An alias was removed from the model."""

    name: str
    alias: str


MlflowEvent = VersionCreated | AliasSet | AliasDeleted


@dataclass(frozen=True)
class HubPush:
    """A commit pushed to a watched branch of a Hub model repo: check ``sha``."""

    repo: str
    ref: str
    sha: str
    old_sha: str | None

    @property
    def key(self) -> str:
        return hub_key(self.repo, self.sha)


def version_key(name: str, version: str) -> str:
    """The job key of an MLflow version's check: one check per version, however often told."""
    return f"mlflow:{name}/{version}"


def hub_key(repo: str, sha: str) -> str:
    """The job key of a Hub commit's check: replays and re-pushes of a commit coalesce."""
    return f"hub:{repo}@{sha}"


def guard_key(name: str, alias: str, version: str, delivery_id: str) -> str:
    """The job key of one alias move; the delivery id keeps a move back and forth distinct."""
    return f"guard:{name}@{alias}->{version}#{delivery_id}"


# --- validated field types ---------------------------------------------------------------

# Cc control, Cf format (bidi overrides, zero-width), Cs lone surrogates (JSON "\ud800"),
# Zl/Zp line and paragraph separators: each can break a log line or disguise a name.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def _plain_name(value: str) -> str:
    if not value:
        raise ValueError("must not be empty")
    if len(value) > MAX_NAME:
        raise ValueError(f"longer than {MAX_NAME} characters")
    for char in value:
        if unicodedata.category(char) in _UNSAFE_CATEGORIES:
            raise ValueError(f"has a control or format character (U+{ord(char):04X})")
    return value


def _version_text(value: object) -> object:
    # MLflow sends versions as strings; accept an int too, but not a bool (an int to Python).
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


def _version_number(value: str) -> str:
    if not _DIGITS.fullmatch(value):
        raise ValueError("must be a positive integer")
    return value


def _lower_sha(value: str) -> str:
    if not _SHA.fullmatch(value):
        raise ValueError("must be a 40 or 64 digit hex commit id")
    return value.lower()


_DIGITS = re.compile(r"[1-9][0-9]{0,18}")
_SHA = re.compile(r"[0-9a-fA-F]{40}|[0-9a-fA-F]{64}")

Name = Annotated[str, AfterValidator(_plain_name)]
Version = Annotated[str, BeforeValidator(_version_text), AfterValidator(_version_number)]
Sha = Annotated[str, AfterValidator(_lower_sha)]


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


# --- MLflow --------------------------------------------------------------------------------


class _MlflowEnvelope(_Lenient):
    entity: Name
    action: Name
    timestamp: str
    data: dict[str, Any]


class _VersionData(_Lenient):
    name: Name
    version: Version
    tags: dict[str, str] | None = None


class _AliasData(_Lenient):
    name: Name
    alias: Name
    version: Version


class _AliasDeletedData(_Lenient):
    name: Name
    alias: Name


def parse_mlflow(body: bytes) -> MlflowEvent | Ignored:
    """The MLflow event in a webhook body; raises :class:`EventError` for a malformed one."""
    envelope = _validate(_MlflowEnvelope, _json_object(body, "mlflow"), "mlflow webhook")
    event = f"{envelope.entity}.{envelope.action}"
    where = f"mlflow {event}"
    if event == "model_version.created":
        created = _validate(_VersionData, envelope.data, where, "data")
        return VersionCreated(created.name, created.version, dict(created.tags or {}))
    if event == "model_version_alias.created":
        alias = _validate(_AliasData, envelope.data, where, "data")
        return AliasSet(alias.name, alias.alias, alias.version)
    if event == "model_version_alias.deleted":
        gone = _validate(_AliasDeletedData, envelope.data, where, "data")
        return AliasDeleted(gone.name, gone.alias)
    return Ignored(f"mlflow event {event} is not handled")


# --- Hugging Face Hub ----------------------------------------------------------------------


class _HubEventKind(_Lenient):
    action: Name
    scope: Name


class _HubHead(_Lenient):
    """Just the event kind: a discussion event must be ignored whatever else it carries."""

    event: _HubEventKind


class _HubRepo(_Lenient):
    type: Name
    name: Name


class _HubRef(_Lenient):
    ref: Name
    old_sha: Sha | None = Field(default=None, alias="oldSha")
    new_sha: Sha | None = Field(default=None, alias="newSha")


class _HubContent(_Lenient):
    repo: _HubRepo
    updated_refs: list[_HubRef] = Field(alias="updatedRefs")


def parse_hub(body: bytes, branches: Sequence[str] = ("main",)) -> list[HubPush] | Ignored:
    """The pushes to watched ``branches`` of a model repo in a Hub webhook body.

    One :class:`HubPush` per updated ``refs/heads/<branch>`` (a push can move several);
    deleted refs, tags, pull-request refs (``refs/pr/N``) and other branches are skipped, and
    when nothing is left the answer is :class:`Ignored`. Raises :class:`EventError` for a
    malformed body.
    """
    raw = _json_object(body, "hub")
    kind = _validate(_HubHead, raw, "hub webhook").event
    event = f"{kind.scope}.{kind.action}"
    if event != "repo.content.update":
        return Ignored(f"hub event {event} is not handled")
    content = _validate(_HubContent, raw, f"hub {event}")
    repo = content.repo
    if repo.type != "model":
        return Ignored(f"hub {repo.type} repo {repo.name} is not a model")
    watched = {f"refs/heads/{branch}" for branch in branches}
    pushes: list[HubPush] = []
    skipped: list[str] = []
    for ref in content.updated_refs:
        if ref.ref not in watched:
            skipped.append(f"{ref.ref} not watched")
        elif ref.new_sha is None:
            skipped.append(f"{ref.ref} deleted")
        else:
            push = HubPush(repo.name, ref.ref, ref.new_sha, ref.old_sha)
            if push not in pushes:
                pushes.append(push)
    if pushes:
        return pushes
    if not skipped:
        return Ignored(f"hub push to {repo.name} updated no refs")
    more = f"; {len(skipped) - 3} more" if len(skipped) > 3 else ""
    return Ignored(f"hub push to {repo.name} has nothing to check: {'; '.join(skipped[:3])}{more}")


# --- shared --------------------------------------------------------------------------------


def _json_object(body: bytes, source: str) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError
        raise EventError(f"{source} webhook body is not JSON ({type(exc).__name__})") from None
    if not isinstance(value, dict):
        raise EventError(f"{source} webhook body is a JSON {type(value).__name__}, not an object")
    return value


_Model = TypeVar("_Model", bound=BaseModel)
_MODEL_NAME = re.compile(r" or instance of \w+")


def _validate(model: type[_Model], value: object, where: str, prefix: str = "") -> _Model:
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        first = errors[0]
        field = ".".join(str(part) for part in (prefix, *first["loc"]) if part != "")
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        # Pydantic names the model class ("... or instance of _HubRepo"): ours are private.
        message = _MODEL_NAME.sub("", " ".join(str(first["msg"]).split()))
        raise EventError(f"{where}: {field or 'body'}: {message}{more}") from None
