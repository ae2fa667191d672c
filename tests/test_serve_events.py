"""The webhook receiver's pure parts: authenticity checks (dynaudit/serve/verify.py) and body
parsing (dynaudit/serve/events.py), as tables. The bodies in tests/golden/webhooks/ have the
shapes MLflow 3.17 and the Hub send (notes: docs/registry.md); the MLflow ones are byte for
byte what MLflow's ``json.dumps`` writes, so signatures are computed over them as they stand.
The HTTP receiver around these: tests/test_serve.py."""

from __future__ import annotations

import base64
import hmac
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dynaudit.serve.events import (
    AliasDeleted,
    AliasSet,
    EventError,
    HubPush,
    Ignored,
    VersionCreated,
    guard_key,
    hub_key,
    parse_hub,
    parse_mlflow,
    version_key,
)
from dynaudit.serve.verify import hub_secret_problem, mlflow_signature_problem, sign_mlflow

WEBHOOKS = Path(__file__).parent / "golden" / "webhooks"

# Made up for these tests; not a real secret anywhere.
SECRET = "test-only-webhook-secret-7f3a"
DELIVERY = "0b6c9a52-4c1e-4d4b-9a57-2f8e1d3c6b10"
NOW = 1_795_000_000
BODY = (WEBHOOKS / "mlflow_version_created.json").read_bytes()


def _golden(name: str) -> bytes:
    return (WEBHOOKS / name).read_bytes()


def _signature(secret: str, delivery: str, timestamp: str, body: bytes) -> str:
    """MLflow's signature, computed here from the definition rather than by sign_mlflow."""
    mac = hmac.new(secret.encode("utf-8"), f"{delivery}.{timestamp}.".encode() + body, "sha256")
    return "v1," + base64.b64encode(mac.digest()).decode()


def _headers(timestamp: str = str(NOW), secret: str = SECRET) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "X-MLflow-Delivery-Id": DELIVERY,
        "X-MLflow-Timestamp": timestamp,
        "X-MLflow-Signature": _signature(secret, DELIVERY, timestamp, BODY),
    }


# --- verify: MLflow ------------------------------------------------------------------------


def _same(h: dict[str, str]) -> dict[str, str]:
    return h


def _without(name: str) -> Callable[[dict[str, str]], dict[str, str]]:
    return lambda h: {k: v for k, v in h.items() if k != name}


def _with(name: str, value: str) -> Callable[[dict[str, str]], dict[str, str]]:
    return lambda h: {**h, name: value}


def _recased(change: Callable[[str], str]) -> Callable[[dict[str, str]], dict[str, str]]:
    return lambda h: {change(k): v for k, v in h.items()}


OTHER_SIGNATURE = _signature("another-made-up-secret", DELIVERY, str(NOW), BODY)
GOOD_SIGNATURE = _signature(SECRET, DELIVERY, str(NOW), BODY)
NOT_SECONDS = "X-MLflow-Timestamp is not unix seconds"


@pytest.mark.parametrize(
    ("edit", "body", "now", "reason"),
    [
        (_same, BODY, NOW, None),
        (_recased(str.lower), BODY, NOW, None),
        (_recased(str.upper), BODY, NOW, None),
        (_same, BODY.replace(b'"3"', b'"4"'), NOW, "bad signature"),  # tampered body
        (_same, BODY + b"\n", NOW, "bad signature"),  # the raw bytes are signed, not the JSON
        (lambda h: _headers(secret="another-made-up-secret"), BODY, NOW, "bad signature"),
        (_with("X-MLflow-Delivery-Id", "5d1f0c7e-0000-4000-8000-000000000000"), BODY, NOW,
         "bad signature"),  # signature moved to another delivery
        (_with("X-MLflow-Timestamp", str(NOW + 60)), BODY, NOW + 60, "bad signature"),  # re-dated
        (_same, BODY, NOW + 300, None),  # at the limit: still fresh
        (_same, BODY, NOW - 300, None),
        (_same, BODY, NOW + 412, "timestamp 412 s away from now (limit 300 s)"),  # stale
        (_same, BODY, NOW - 412, "timestamp 412 s away from now (limit 300 s)"),  # from the future
        (lambda h: _headers(timestamp=f"{NOW}.5"), BODY, NOW, NOT_SECONDS),
        (lambda h: _headers(timestamp="-5"), BODY, NOW, NOT_SECONDS),
        (lambda h: _headers(timestamp=" 1795000000"), BODY, NOW, NOT_SECONDS),
        (lambda h: _headers(timestamp="2026-11-26T14:03:44"), BODY, NOW, NOT_SECONDS),
        (lambda h: _headers(timestamp="9" * 400), BODY, NOW, NOT_SECONDS),
        (_without("X-MLflow-Delivery-Id"), BODY, NOW, "missing X-MLflow-Delivery-Id header"),
        (_without("X-MLflow-Timestamp"), BODY, NOW, "missing X-MLflow-Timestamp header"),
        (_without("X-MLflow-Signature"), BODY, NOW, "missing X-MLflow-Signature header"),
        (_with("X-MLflow-Signature", ""), BODY, NOW, "missing X-MLflow-Signature header"),
        (_with("X-MLflow-Signature", f"{OTHER_SIGNATURE} {GOOD_SIGNATURE}"), BODY, NOW, None),
        (_with("X-MLflow-Signature", f"v0,abc {GOOD_SIGNATURE}"), BODY, NOW, None),
        (_with("X-MLflow-Signature", f"{OTHER_SIGNATURE} v1,AAAA"), BODY, NOW, "bad signature"),
        (_with("X-MLflow-Signature", GOOD_SIGNATURE[3:]), BODY, NOW,
         "no v1 signature in X-MLflow-Signature"),
        (_with("X-MLflow-Signature", "v2," + GOOD_SIGNATURE[3:]), BODY, NOW,
         "no v1 signature in X-MLflow-Signature"),
        (_with("X-MLflow-Signature", "v1,\u00e9\u00e9"), BODY, NOW, "bad signature"),  # no raise
    ],
)  # fmt: skip
def test_mlflow_signature(
    edit: Callable[[dict[str, str]], dict[str, str]], body: bytes, now: int, reason: str | None
) -> None:
    headers = edit(_headers())
    problem = mlflow_signature_problem(SECRET, body, headers, now=now)
    assert problem == reason
    if problem is not None:
        assert "\n" not in problem
        assert SECRET not in problem
        assert GOOD_SIGNATURE[3:13] not in problem
        assert "tiny-gpt" not in problem  # nothing from the body
        for value in headers.values():
            assert len(value) < 8 or value not in problem


def test_sign_mlflow_matches_the_definition() -> None:
    assert sign_mlflow(SECRET, DELIVERY, NOW, BODY) == GOOD_SIGNATURE
    assert sign_mlflow(SECRET, DELIVERY, str(NOW), BODY) == GOOD_SIGNATURE


def test_mlflow_default_clock_and_tolerance() -> None:
    import time

    fresh = str(int(time.time()))
    headers = _headers(timestamp=fresh)
    assert mlflow_signature_problem(SECRET, BODY, headers) is None
    stale = str(int(time.time()) - 3600)
    problem = mlflow_signature_problem(SECRET, BODY, _headers(timestamp=stale), tolerance=60)
    assert problem is not None and problem.endswith("(limit 60 s)")


@pytest.mark.parametrize("check", ["mlflow", "hub"])
def test_empty_secret_is_refused(check: str) -> None:
    # Otherwise an absent Hub header, or an HMAC keyed with nothing, would pass.
    with pytest.raises(ValueError, match="must not be empty"):
        if check == "mlflow":
            mlflow_signature_problem("", BODY, _headers(secret=""), now=NOW)
        else:
            hub_secret_problem("", {"X-Webhook-Secret": ""})


# --- verify: Hub ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("secret", "headers", "reason"),
    [
        (SECRET, {"X-Webhook-Secret": SECRET}, None),
        (SECRET, {"x-webhook-secret": SECRET}, None),
        (SECRET, {"X-WEBHOOK-SECRET": SECRET}, None),
        (SECRET, {"X-Webhook-Secret": "another-made-up-secret"}, "wrong X-Webhook-Secret"),
        (SECRET, {"X-Webhook-Secret": SECRET[:-1]}, "wrong X-Webhook-Secret"),
        (SECRET, {"X-Webhook-Secret": SECRET + "0"}, "wrong X-Webhook-Secret"),
        (SECRET, {"X-Webhook-Secret": SECRET.upper()}, "wrong X-Webhook-Secret"),
        (SECRET, {"X-Webhook-Secret": "s\u00e9cret-\u2603"}, "wrong X-Webhook-Secret"),
        (SECRET, {}, "missing X-Webhook-Secret header"),
        (SECRET, {"X-Webhook-Secret": ""}, "missing X-Webhook-Secret header"),
        (SECRET, {"Authorization": f"Bearer {SECRET}"}, "missing X-Webhook-Secret header"),
        ("s\u00e9cret-\u2603-made-up", {"X-Webhook-Secret": "s\u00e9cret-\u2603-made-up"}, None),
    ],
)
def test_hub_secret(secret: str, headers: dict[str, str], reason: str | None) -> None:
    problem = hub_secret_problem(secret, headers)
    assert problem == reason
    if problem is not None:
        assert secret not in problem
        assert all(value not in problem for value in headers.values() if value)


# --- events: MLflow ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "mlflow_version_created.json",
            VersionCreated(
                "tiny-gpt",
                "3",
                {
                    "dynaudit.baseline": "runs:/5d0e8a1b2c3d4e5f6a7b8c9d0e1f2a3b/dynaudit-baseline",
                    "team": "r\u00e9seau",
                },
            ),
        ),
        ("mlflow_alias_created.json", AliasSet("tiny-gpt", "champion", "3")),
        ("mlflow_alias_deleted.json", AliasDeleted("tiny-gpt", "champion")),
        (
            "mlflow_tag_set.json",
            Ignored("mlflow event model_version_tag.set is not handled"),
        ),
    ],
)
def test_parse_mlflow_golden(name: str, expected: object) -> None:
    assert parse_mlflow(_golden(name)) == expected


def _mlflow(entity: str, action: str, data: Any, **extra: Any) -> bytes:
    envelope = {"entity": entity, "action": action, "timestamp": "2026-11-26T14:03:44+00:00"}
    return json.dumps({**envelope, "data": data, **extra}).encode()


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (_mlflow("model_version", "created", {"name": "m", "version": 7}),
         VersionCreated("m", "7", {})),
        (_mlflow("model_version", "created", {"name": "m", "version": "7", "tags": None}),
         VersionCreated("m", "7", {})),
        (_mlflow("model_version_alias", "created", {"name": "m", "alias": "a", "version": 2}),
         AliasSet("m", "a", "2")),
        (_mlflow("model_version", "created", {"name": "m", "version": "1"}, workspace="team-a",
                 future_field=[1, 2]), VersionCreated("m", "1", {})),
        (_mlflow("registered_model", "created", {"name": "m"}),
         Ignored("mlflow event registered_model.created is not handled")),
        (_mlflow("prompt_version", "created", {"name": "p", "version": "1", "template": "hi"}),
         Ignored("mlflow event prompt_version.created is not handled")),
        (_mlflow("model_version_alias", "updated", {}),
         Ignored("mlflow event model_version_alias.updated is not handled")),
    ],
)  # fmt: skip
def test_parse_mlflow_shapes(body: bytes, expected: object) -> None:
    assert parse_mlflow(body) == expected


CONTROL_NAMES = ["tiny\x07gpt", "tiny\ngpt", "tiny\x00", "\u202etpg-ynit", "a\u2028b", "a\x9bb"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "not JSON"),
        (b"not json", "not JSON"),
        (b"\xff\xfe{}", "not JSON"),
        (b"[" * 100_000, "not JSON"),
        (b'{"entity": "model_version",', "not JSON"),
        (b"[]", "a JSON list, not an object"),
        (b'"model_version.created"', "a JSON str, not an object"),
        (b"null", "a JSON NoneType, not an object"),
        (b"{}", "entity: Field required"),
        (json.dumps({"entity": "model_version", "action": "created", "timestamp": "t"}).encode(),
         "data: Field required"),
        (_mlflow("model_version", "created", ["m", "1"]),
         "data: Input should be a valid dictionary"),
        (_mlflow("model_version", "created", {"version": "1"}), "data.name: Field required"),
        (_mlflow("model_version", "created", {"name": "m"}), "data.version: Field required"),
        (_mlflow("model_version", "created", {"name": 5, "version": "1"}), "data.name:"),
        (_mlflow("model_version", "created", {"name": "m", "version": True}), "data.version:"),
        (_mlflow("model_version", "created", {"name": "m", "version": "1/../2"}), "data.version:"),
        (_mlflow("model_version", "created", {"name": "m", "version": "0"}), "data.version:"),
        (_mlflow("model_version", "created", {"name": "m", "version": "1", "tags": {"k": 1}}),
         "data.tags.k:"),
        (_mlflow("model_version_alias", "created", {"name": "m", "version": "1"}),
         "data.alias: Field required"),
        (_mlflow("model_version_alias", "created", {"name": "m", "alias": "a"}),
         "data.version: Field required"),
        (_mlflow("model_version_alias", "deleted", {"alias": "a"}), "data.name: Field required"),
        (_mlflow("model_version", "created", {"name": "", "version": "1"}), "must not be empty"),
        (_mlflow("model_version", "created", {"name": "m" * 513, "version": "1"}),
         "longer than 512 characters"),
        (_mlflow("model_version_alias", "created", {"name": "m", "alias": "a\tb", "version": "1"}),
         "data.alias: Value error, has a control or format character (U+0009)"),
        (_mlflow("model\x1b_version", "created", {}), "entity: Value error"),
        *[(_mlflow("model_version", "created", {"name": n, "version": "1"}),
           "data.name: Value error, has a control or format character") for n in CONTROL_NAMES],
    ],
)  # fmt: skip
def test_parse_mlflow_errors(body: bytes, message: str) -> None:
    with pytest.raises(EventError, match=r"^mlflow ") as caught:
        parse_mlflow(body)
    text = str(caught.value)
    assert message in text
    assert "\n" not in text and len(text) < 300


def test_long_names_within_the_limit_pass() -> None:
    name = "m" * 512
    body = _mlflow("model_version", "created", {"name": name, "version": "1"})
    assert parse_mlflow(body) == VersionCreated(name, "1", {})
    unicode = "mod\u00e8le-\u6a21\u578b-\U0001f680"  # ordinary non-ASCII letters are fine
    body = _mlflow("model_version_alias", "deleted", {"name": unicode, "alias": "prod"})
    assert parse_mlflow(body) == AliasDeleted(unicode, "prod")


# --- events: Hub ---------------------------------------------------------------------------

MAIN_OLD = "b0bd943fdeff95eb270517001b478d76c2ffd8f4"
MAIN_NEW = "dfbccd9f778eb9450a1a3c5a97817b26bd031096"
NOTHING = "hub push to acme/tiny-gpt has nothing to check"


def _hub(**changes: Any) -> dict[str, Any]:
    payload: dict[str, Any] = json.loads(_golden("hub_push_main.json"))
    payload.update(changes)
    return payload


def _refs(*refs: tuple[str, str | None, str | None]) -> bytes:
    updated = [{"ref": r, "oldSha": old, "newSha": new} for r, old, new in refs]
    return json.dumps(_hub(updatedRefs=updated)).encode()


@pytest.mark.parametrize(
    ("name", "branches", "expected"),
    [
        ("hub_push_main.json", ("main",),
         [HubPush("acme/tiny-gpt", "refs/heads/main", MAIN_NEW, MAIN_OLD)]),
        ("hub_push_branch.json", ("main",),
         Ignored(f"{NOTHING}: refs/heads/dev not watched")),
        ("hub_push_branch.json", ("main", "dev"),
         [HubPush("acme/tiny-gpt", "refs/heads/dev", "856621372c9ac735d2f1b2c7bcd28ede6e17c38e",
                  "d58b5e165f7d3f487c4e7ec8f7e831576ec5eb59")]),
        ("hub_deleted_ref.json", ("main", "v2-candidate"),
         Ignored(f"{NOTHING}: refs/heads/v2-candidate deleted")),
        ("hub_dataset_push.json", ("main",),
         Ignored("hub dataset repo acme/eval-prompts is not a model")),
        ("hub_discussion.json", ("main",),
         Ignored("hub event discussion.comment.create is not handled")),
    ],
)  # fmt: skip
def test_parse_hub_golden(name: str, branches: tuple[str, ...], expected: object) -> None:
    assert parse_hub(_golden(name), branches) == expected


def test_hub_branch_push_uses_the_ref_not_head_sha() -> None:
    payload = json.loads(_golden("hub_push_branch.json"))
    (push,) = parse_hub(_golden("hub_push_branch.json"), ("dev",))  # type: ignore[misc]
    assert push.sha == payload["updatedRefs"][0]["newSha"] != payload["repo"]["headSha"]


SHA_A, SHA_B = "a" * 40, "b" * 40


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (_refs(("refs/pr/3", None, SHA_A)),
         Ignored(f"{NOTHING}: refs/pr/3 not watched")),
        (_refs(("refs/tags/v1.0", None, SHA_A)),
         Ignored(f"{NOTHING}: refs/tags/v1.0 not watched")),
        (_refs(("refs/heads/main", MAIN_OLD, None)),
         Ignored(f"{NOTHING}: refs/heads/main deleted")),
        (_refs(("refs/heads/mainline", None, SHA_A)),
         Ignored(f"{NOTHING}: refs/heads/mainline not watched")),
        (_refs(("refs/pr/1", None, SHA_A), ("refs/pr/2", None, SHA_A), ("refs/pr/3", None, SHA_A),
               ("refs/pr/4", None, SHA_A), ("refs/pr/5", None, SHA_A)),
         Ignored(f"{NOTHING}: refs/pr/1 not watched; "
                 "refs/pr/2 not watched; refs/pr/3 not watched; 2 more")),
        (_refs(), Ignored("hub push to acme/tiny-gpt updated no refs")),
        (_refs(("refs/pr/3", None, SHA_A), ("refs/heads/main", None, SHA_B)),
         [HubPush("acme/tiny-gpt", "refs/heads/main", SHA_B, None)]),
        (_refs(("refs/heads/main", None, SHA_B.upper()), ("refs/heads/main", None, SHA_B)),
         [HubPush("acme/tiny-gpt", "refs/heads/main", SHA_B, None)]),  # one push, lower case
        (_refs(("refs/heads/main", None, "c" * 64)),
         [HubPush("acme/tiny-gpt", "refs/heads/main", "c" * 64, None)]),
        (json.dumps(_hub(event={"action": "create", "scope": "repo"})).encode(),
         Ignored("hub event repo.create is not handled")),
        (json.dumps(_hub(event={"action": "update", "scope": "discussion"})).encode(),
         Ignored("hub event discussion.update is not handled")),
        (json.dumps({"event": {"action": "create", "scope": "discussion.comment"},
                     "repo": {"name": 7}}).encode(),
         Ignored("hub event discussion.comment.create is not handled")),  # the rest is not read
        (json.dumps(_hub(event={"action": "delete", "scope": "repo.content"})).encode(),
         Ignored("hub event repo.content.delete is not handled")),
        (json.dumps(_hub(repo={"type": "space", "name": "acme/demo"})).encode(),
         Ignored("hub space repo acme/demo is not a model")),
    ],
)  # fmt: skip
def test_parse_hub_shapes(body: bytes, expected: object) -> None:
    assert parse_hub(body) == expected


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"<html>", "not JSON"),
        (b"[1]", "a JSON list, not an object"),
        (b"{}", "event: Field required"),
        (json.dumps({"event": {"scope": "repo.content"}}).encode(), "event.action: Field required"),
        (json.dumps(_hub(event="push")).encode(), "event: Input should be"),
        (json.dumps({k: v for k, v in _hub().items() if k != "updatedRefs"}).encode(),
         "updatedRefs: Field required"),
        (json.dumps({k: v for k, v in _hub().items() if k != "repo"}).encode(),
         "repo: Field required"),
        (json.dumps(_hub(updatedRefs={"ref": "refs/heads/main"})).encode(), "updatedRefs:"),
        (_refs(("refs/heads/main", None, "not-a-sha")), "updatedRefs.0.newSha:"),
        (_refs(("refs/heads/main", "abc", SHA_A)), "updatedRefs.0.oldSha:"),
        (_refs(("refs/heads/main\n", None, SHA_A)), "updatedRefs.0.ref: Value error"),
        (json.dumps(_hub(repo={"type": "model", "name": "acme/tiny\x1b[31mgpt"})).encode(),
         "repo.name: Value error, has a control or format character (U+001B)"),
        (json.dumps(_hub(repo={"type": "model", "name": ""})).encode(),
         "repo.name: Value error, must not be empty"),
        (json.dumps(_hub(repo={"type": "model"})).encode(), "repo.name: Field required"),
    ],
)  # fmt: skip
def test_parse_hub_errors(body: bytes, message: str) -> None:
    with pytest.raises(EventError, match=r"^hub ") as caught:
        parse_hub(body)
    text = str(caught.value)
    assert message in text
    assert "\n" not in text and len(text) < 300


# --- job keys ------------------------------------------------------------------------------


def test_job_keys() -> None:
    assert version_key("tiny-gpt", "3") == "mlflow:tiny-gpt/3"
    assert hub_key("acme/tiny-gpt", SHA_A) == f"hub:acme/tiny-gpt@{SHA_A}"
    guard = guard_key("tiny-gpt", "champion", "3", DELIVERY)
    assert guard == f"guard:tiny-gpt@champion->3#{DELIVERY}"
    created = parse_mlflow(_golden("mlflow_version_created.json"))
    assert isinstance(created, VersionCreated) and created.key == "mlflow:tiny-gpt/3"
    pushes = parse_hub(_golden("hub_push_main.json"))
    assert isinstance(pushes, list) and pushes[0].key == f"hub:acme/tiny-gpt@{MAIN_NEW}"
