"""A small Hugging Face Hub–compatible HTTP server over local folders, for tests.

It speaks the part of the Hub's protocol that ``huggingface_hub`` uses to find and download
model files: ``/api/models/{repo}/revision/{rev}`` (repo info, with ``?blobs=true`` file
metadata), ``/api/models/{repo}/tree/{rev}`` (listing) and ``/{repo}/resolve/{rev}/{path}``
(HEAD and GET with ``X-Repo-Commit``, ``ETag``, ``Content-Length`` and clamped ``Range``).
Errors carry the Hub's ``X-Error-Code`` so the real client raises its real exceptions. Every
request is recorded, with the bytes of file content sent, so tests can prove what was fetched.

It also speaks what ``HfApi`` uses to write back, kept in memory for tests to read:
``/api/whoami-v2``; discussions and pull requests (``/api/models/{repo}/discussions`` to list,
paged, and to open one; ``…/discussions/{num}`` for its details and events;
``…/{num}/comment`` and ``…/{num}/comment/{id}/edit``), where only a comment's author may
edit it; and commits of regular (non-LFS) files: ``/api/validate-yaml``,
``/api/models/{repo}/preupload/{rev}`` and ``/api/models/{repo}/commit/{rev}``, which with
``create_pr=1`` opens a pull request whose commit is ``refs/pr/N``, as the Hub does. Writes need
the token of a user added with :meth:`LocalHub.add_user`; :meth:`LocalHub.fail` makes chosen
routes answer an error.

It also sends the Hub's webhooks: :meth:`LocalHub.deliver` POSTs one ``repo.content`` payload
as the Hub documents it, with the secret in ``X-Webhook-Secret``, and after
:meth:`LocalHub.notify` every commit that moves a ref (through ``HfApi`` or :meth:`LocalHub.add`)
is delivered in the background once it is stored, in commit order, and kept in
:attr:`LocalHub.deliveries`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import queue
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


@dataclass(frozen=True)
class Blob:
    path: Path
    size: int
    sha256: str
    git_oid: str
    lfs: bool


@dataclass
class Comment:
    id: str
    author: str
    content: str
    created_at: str
    edits: int = 0


@dataclass
class Discussion:
    """A discussion or pull request: its comments in order (the first is its description),
    and for a pull request the commits pushed to ``refs/pr/{num}``."""

    num: int
    title: str
    author: str
    is_pull_request: bool
    created_at: str
    status: str = "open"
    comments: list[Comment] = field(default_factory=list)
    commits: list[tuple[str, str, str]] = field(default_factory=list)  # (sha, summary, when)

    def comment(self, comment_id: str) -> Comment | None:
        return next((c for c in self.comments if c.id == comment_id), None)


@dataclass
class Repo:
    commits: dict[str, dict[str, Blob]] = field(default_factory=dict)  # sha → file → blob
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag → commit sha
    token: str | None = None  # required bearer token (private or gated repos)
    gated: bool = False
    discussions: list[Discussion] = field(default_factory=list)  # pull requests too


@dataclass(frozen=True)
class Webhook:
    """A webhook registered with :meth:`LocalHub.notify`: where, and the secret it sends."""

    id: str
    url: str
    secret: str


class Delivery(NamedTuple):
    """One webhook POST: the receiver's status (0: it could not be reached) and the payload."""

    status: int
    payload: dict[str, object]


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    status: int
    body_bytes: int


class LocalHub:
    """``hub.add("org/name", folder, revisions=("main", "v1"))``, then point the client at
    ``hub.url``."""

    def __init__(self, storage: Path) -> None:
        self.storage = storage
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.users: dict[str, str] = {}  # token → user name: who may write
        self.faults: dict[str, tuple[int, float]] = {}  # regex on the path → (status, delay)
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.webhooks: list[Webhook] = []
        self.deliveries: list[Delivery] = []
        self._delivered = threading.Condition(self._lock)
        self._outbox: queue.Queue[tuple[Webhook, dict[str, object]]] = queue.Queue()
        self._sender: threading.Thread | None = None
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> LocalHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add(
        self,
        repo_id: str,
        folder: Path,
        *,
        revisions: tuple[str, ...] = ("main",),
        token: str | None = None,
        gated: bool = False,
    ) -> str:
        """Publish ``folder``'s files as a new commit of ``repo_id``; returns the commit sha."""
        files: dict[str, Blob] = {}
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            name = file.relative_to(folder).as_posix()
            files[name] = self.store(name, file.read_bytes())
        commit = hashlib.sha1(
            json.dumps([repo_id, sorted((n, b.sha256) for n, b in files.items())]).encode()
        ).hexdigest()
        repo = self.repos.setdefault(repo_id, Repo())
        with self._lock:
            before = dict(repo.refs)
            repo.commits[commit] = files
            repo.refs.update(dict.fromkeys(revisions, commit))
            repo.token, repo.gated = token, gated
        self.pushed(repo_id, before)
        return commit

    def store(self, name: str, data: bytes) -> Blob:
        """``data`` kept in the storage folder, as the blob of a file called ``name``."""
        sha256 = hashlib.sha256(data).hexdigest()
        stored = self.storage / sha256
        if not stored.exists():
            stored.write_bytes(data)
        git_oid = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        return Blob(stored, len(data), sha256, git_oid, name.endswith(LFS_SUFFIXES))

    # -- webhooks ------------------------------------------------------------------------------
    def payload(
        self,
        repo_id: str,
        sha: str | None,
        *,
        ref: str = "refs/heads/main",
        old: str | None = None,
        scope: str = "repo.content",
        action: str = "update",
        repo_type: str = "model",
        webhook_id: str = "0" * 24,
        refs: Mapping[str, tuple[str | None, str | None]] | None = None,
    ) -> dict[str, object]:
        """The JSON the Hub posts (hub-docs ``webhooks.md``, version 3) for ``ref`` moving from
        ``old`` to ``sha`` (None: a deleted ref); ``refs`` gives several at once. ``headSha``
        is main's head, whatever ref moved, as on the Hub."""
        repo = self.repos.get(repo_id)
        owner = repo_id.split("/")[0]
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        moved = refs if refs is not None else {ref: (old, sha)}
        return {
            "event": {"action": action, "scope": scope},
            "repo": {
                "type": repo_type, "name": repo_id,
                "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
                "private": repo is not None and repo.token is not None,
                "url": {
                    "web": f"{self.url}/{prefix}{repo_id}",
                    "api": f"{self.url}/api/{repo_type}s/{repo_id}",
                },
                "headSha": repo.refs.get("main", sha) if repo is not None else sha,
                "tags": [], "owner": {"id": hashlib.sha1(owner.encode()).hexdigest()[:24]},
            },
            "updatedRefs": [{"ref": r, "oldSha": o, "newSha": n} for r, (o, n) in moved.items()],
            "webhook": {"id": webhook_id, "version": 3},
        }  # fmt: skip

    def deliver(
        self,
        url: str,
        secret: str | None,
        repo_id: str,
        sha: str | None,
        *,
        ref: str = "refs/heads/main",
        old: str | None = None,
        scope: str = "repo.content",
        action: str = "update",
        repo_type: str = "model",
    ) -> int:
        """POST one Hub webhook payload to ``url`` now, with ``X-Webhook-Secret: secret``
        (None: no header); returns the HTTP status (0: not reachable). Recorded in
        :attr:`deliveries` like the ones :meth:`notify` sends."""
        payload = self.payload(
            repo_id, sha, ref=ref, old=old, scope=scope, action=action, repo_type=repo_type
        )
        return self._post(Webhook("0" * 24, url, secret or ""), payload, secret is not None)

    def notify(self, url: str, secret: str) -> Webhook:
        """Register a webhook: from now on each commit that moves refs of a repo is POSTed to
        ``url`` in the background (the commit's answer does not wait), one payload per commit
        with every ref it moved: a branch ``refs/heads/NAME`` or a pull request's
        ``refs/pr/N``, as the Hub does. Returns it, for :meth:`forget`."""
        webhook = Webhook(self.next_id(), url, secret)
        with self._lock:
            self.webhooks.append(webhook)
            if self._sender is None:
                self._sender = threading.Thread(target=self._send_forever, daemon=True)
                self._sender.start()
        return webhook

    def forget(self, webhook: Webhook | None = None) -> None:
        """Unregister ``webhook`` (None: all of them); the fixture's hub outlives a test."""
        with self._lock:
            self.webhooks = [w for w in self.webhooks if webhook is not None and w != webhook]

    def wait_deliveries(self, n: int, timeout: float = 30) -> list[Delivery]:
        """All deliveries so far, once there are at least ``n``; TimeoutError after
        ``timeout`` seconds."""
        with self._delivered:
            if not self._delivered.wait_for(lambda: len(self.deliveries) >= n, timeout):
                raise TimeoutError(f"{len(self.deliveries)} webhook deliveries, not {n}")
            return list(self.deliveries)

    def pushed(self, repo_id: str, before: Mapping[str, str]) -> None:
        """Queue a delivery to every webhook for the refs of ``repo_id`` that differ from
        ``before`` (a no-op push, the same commit again, sends nothing)."""
        repo = self.repos[repo_id]
        with self._lock:
            moved = {
                _ref_name(name): (before.get(name), sha)
                for name, sha in repo.refs.items() if before.get(name) != sha
            }  # fmt: skip
            webhooks = list(self.webhooks)
        if not moved:
            return
        for webhook in webhooks:
            payload = self.payload(repo_id, None, refs=moved, webhook_id=webhook.id)
            self._outbox.put((webhook, payload))

    def _send_forever(self) -> None:
        while True:
            webhook, payload = self._outbox.get()
            self._post(webhook, payload, send_secret=True)

    def _post(self, webhook: Webhook, payload: dict[str, object], send_secret: bool) -> int:
        headers = {"Content-Type": "application/json", "User-Agent": "huggingface-hub-webhooks"}
        if send_secret:
            headers["X-Webhook-Secret"] = webhook.secret
        request = urllib.request.Request(
            webhook.url, data=json.dumps(payload).encode(), headers=headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status = int(response.status)
        except urllib.error.HTTPError as error:
            status = error.code
            error.close()
        except OSError:
            status = 0
        with self._delivered:
            self.deliveries.append(Delivery(status, payload))
            self._delivered.notify_all()
        return status

    def add_user(self, name: str, token: str) -> None:
        """A user whose bearer ``token`` may write (open discussions, comment, commit)."""
        self.users[token] = name

    @contextlib.contextmanager
    def fail(self, pattern: str, status: int = 500, delay: float = 0.0) -> Iterator[None]:
        """For the duration, every request whose path matches ``pattern`` is answered
        ``status``, after ``delay`` seconds (a server that stalls)."""
        self.faults[pattern] = (status, delay)
        try:
            yield
        finally:
            del self.faults[pattern]

    def file(self, repo_id: str, revision: str, name: str) -> str | None:
        """The text of file ``name`` at ``revision`` (None: no such file)."""
        repo = self.repos[repo_id]
        blob = repo.commits[repo.refs.get(revision, revision)].get(name)
        return None if blob is None else blob.path.read_text(encoding="utf-8")

    def discussions(self, repo_id: str) -> list[Discussion]:
        """The discussions and pull requests of ``repo_id``, oldest first."""
        with self._lock:
            return list(self.repos[repo_id].discussions)

    def next_id(self) -> str:
        """A comment id, 24 hex digits like the Hub's."""
        return f"{next(self._ids):024x}"

    def served(self, suffix: str = "") -> int:
        """Bytes of file content sent so far, for files whose path ends with ``suffix``."""
        with self._lock:
            return sum(r.body_bytes for r in self.requests if r.path.endswith(suffix))

    def record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)


_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/(?P<kind>revision|tree)/(?P<rest>.+))?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_DISCUSSIONS = re.compile(
    r"^/api/models/(?P<repo>[^/]+/[^/]+)/discussions"
    r"(?:/(?P<num>\d+)(?:/(?P<action>comment)(?:/(?P<comment>[0-9a-fA-F]+)/edit)?)?)?$"
)
_WRITE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<kind>preupload|commit)/(?P<rev>.+)$")
_PAGE = 50  # discussions per page of the listing


def _ref_name(revision: str) -> str:
    """A ref's full name as a webhook gives it: ``main`` is ``refs/heads/main``."""
    return revision if revision.startswith("refs/") else f"refs/heads/{revision}"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _comment_event(comment: Comment) -> dict[str, object]:
    return {
        "id": comment.id, "type": "comment", "createdAt": comment.created_at,
        "author": {"name": comment.author},
        "data": {
            "edited": comment.edits > 0, "hidden": False, "numEdits": comment.edits,
            "latest": {
                "raw": comment.content, "html": "", "updatedAt": comment.created_at,
                "author": {"name": comment.author},
            },
        },
    }  # fmt: skip


def _discussion_json(repo_id: str, discussion: Discussion) -> dict[str, object]:
    return {
        "num": discussion.num, "title": discussion.title, "status": discussion.status,
        "author": {"name": discussion.author}, "createdAt": discussion.created_at,
        "repo": {"name": repo_id, "type": "model"},
        "isPullRequest": discussion.is_pull_request,
    }  # fmt: skip


def _handler_for(hub: LocalHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass  # quiet: tests read hub.requests instead

        def do_HEAD(self) -> None:
            self._route(head=True)

        def do_GET(self) -> None:
            self._route(head=False)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            path = urlsplit(self.path).path
            if self._faulty(path):
                return
            if path == "/api/validate-yaml":
                self._json({"errors": [], "warnings": []})
            elif match := _DISCUSSIONS.match(path):
                self._discussions_post(match, body)
            elif match := _WRITE.match(path):
                self._write(match["repo"], unquote(match["rev"]), match["kind"], body)
            else:
                self._error(404, "EntryNotFound", "no such route")

        # -- routing -------------------------------------------------------------------
        def _faulty(self, path: str) -> bool:
            for pattern, (status, delay) in list(hub.faults.items()):
                if re.search(pattern, path):
                    time.sleep(delay)
                    self._error(status, "", "Internal Error - We're working hard to fix this")
                    return True
            return False

        def _route(self, head: bool) -> None:
            path = urlsplit(self.path).path
            if self._faulty(path):
                return
            if path == "/api/whoami-v2":
                self._whoami()
            elif match := _DISCUSSIONS.match(path):
                if match["action"]:
                    self._error(405, "", "method not allowed")
                elif match["num"]:
                    self._discussion(match["repo"], int(match["num"]))
                else:
                    self._list_discussions(match["repo"])
            elif match := _RESOLVE.match(path):
                self._resolve(match["repo"], unquote(match["rev"]), unquote(match["file"]), head)
            elif match := _API.match(path):
                if match["kind"] == "tree":
                    rev, _, sub = match["rest"].partition("/")
                    self._tree(match["repo"], unquote(rev), unquote(sub))
                else:
                    self._info(match["repo"], unquote(match["rest"] or "main"))
            else:
                self._error(404, "EntryNotFound", "no such route")

        def _repo_and_commit(self, repo_id: str, revision: str) -> tuple[Repo, str] | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(401, "RepoNotFound", "Repository not found")
                return None
            auth = self.headers.get("Authorization", "")
            if repo.token is not None and auth != f"Bearer {repo.token}":
                code = "GatedRepo" if repo.gated else "RepoNotFound"
                self._error(401, code, "Access to this repository is restricted")
                return None
            commit = repo.refs.get(revision, revision)
            if commit not in repo.commits:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                return None
            return repo, commit

        def _info(self, repo_id: str, revision: str) -> None:
            found = self._repo_and_commit(repo_id, revision)
            if found is None:
                return
            repo, commit = found
            blobs = "blobs=true" in (urlsplit(self.path).query or "").lower()
            siblings = []
            for name, blob in repo.commits[commit].items():
                entry: dict[str, object] = {"rfilename": name}
                if blobs:
                    entry |= {"size": blob.size, "blobId": blob.git_oid}
                    if blob.lfs:
                        entry["lfs"] = {
                            "sha256": blob.sha256,
                            "size": blob.size,
                            "pointerSize": 134,
                        }
                siblings.append(entry)
            self._json(
                {
                    "id": repo_id, "modelId": repo_id, "sha": commit, "tags": [],
                    "private": repo.token is not None, "gated": "auto" if repo.gated else False,
                    "disabled": False, "siblings": siblings,
                }
            )  # fmt: skip

        def _tree(self, repo_id: str, revision: str, sub: str) -> None:
            found = self._repo_and_commit(repo_id, revision)
            if found is None:
                return
            repo, commit = found
            entries = []
            for name, blob in repo.commits[commit].items():
                if sub and not name.startswith(sub.rstrip("/") + "/"):
                    continue
                entry: dict[str, object] = {
                    "type": "file", "oid": blob.git_oid, "size": blob.size, "path": name
                }  # fmt: skip
                if blob.lfs:
                    entry["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": 134}
                entries.append(entry)
            self._json(entries)

        def _resolve(self, repo_id: str, revision: str, name: str, head: bool) -> None:
            found = self._repo_and_commit(repo_id, revision)
            if found is None:
                return
            repo, commit = found
            blob = repo.commits[commit].get(name)
            if blob is None:
                self._error(404, "EntryNotFound", f"{name} does not exist on {revision}")
                return
            etag = blob.sha256 if blob.lfs else blob.git_oid
            start, end, status = 0, blob.size - 1, 200
            requested = self.headers.get("Range")
            if requested and (match := _RANGE.match(requested.strip())):
                first, last = match.groups()
                if first:
                    start = int(first)
                    end = min(int(last), blob.size - 1) if last else blob.size - 1  # clamp
                elif last:  # suffix range: the last N bytes
                    start = max(0, blob.size - int(last))
                if start >= blob.size and blob.size:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{blob.size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    hub.record(Request(self.command, self.path, requested, 416, 0))
                    return
                status = 206
            length = max(0, end - start + 1)
            self.send_response(status)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{etag}"')
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(length))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{blob.size}")
            self.end_headers()
            # recorded before the body goes out: a client that has read it may look at once
            hub.record(Request(self.command, self.path, requested, status, 0 if head else length))
            if not head:
                with blob.path.open("rb") as fh:
                    fh.seek(start)
                    self.wfile.write(fh.read(length))

        # -- writing back: who, discussions, commits -----------------------------------------
        def _user(self) -> str | None:
            """The user the bearer token belongs to; None (answered 401) for anyone else."""
            auth = self.headers.get("Authorization", "")
            user = (
                hub.users.get(auth.removeprefix("Bearer ")) if auth.startswith("Bearer ") else None
            )
            if user is None:
                self._error(401, "", "Invalid credentials in Authorization header")
            return user

        def _readable(self, repo_id: str) -> Repo | None:
            """The repository, if this request may read it (else answered, as downloads are)."""
            repo = hub.repos.get(repo_id)
            auth = self.headers.get("Authorization", "")
            if repo is None or (repo.token is not None and auth != f"Bearer {repo.token}"):
                self._error(401 if repo is None else 403, "RepoNotFound", "Repository not found")
                return None
            return repo

        def _whoami(self) -> None:
            if (user := self._user()) is not None:
                self._json({"type": "user", "name": user, "fullname": user, "auth": {}})

        def _list_discussions(self, repo_id: str) -> None:
            if (repo := self._readable(repo_id)) is None:
                return
            query = {k: v[0] for k, v in parse_qs(urlsplit(self.path).query).items()}
            kind, status = query.get("type", "all"), query.get("status", "all")
            chosen = [
                d for d in reversed(repo.discussions)  # newest first, as the Hub lists them
                if (kind == "all" or d.is_pull_request == (kind == "pull_request"))
                and (status == "all" or d.status == status)
                and query.get("author") in (None, d.author)
            ]  # fmt: skip
            start = int(query.get("p", "0")) * _PAGE
            page = [_discussion_json(repo_id, d) for d in chosen[start : start + _PAGE]]
            self._json({"discussions": page, "count": len(chosen), "start": start})

        def _find(self, repo_id: str, num: int) -> tuple[Repo, Discussion] | None:
            if (repo := self._readable(repo_id)) is None:
                return None
            found = next((d for d in repo.discussions if d.num == num), None)
            if found is None:
                self._error(404, "", "Discussion not found")
                return None
            return repo, found

        def _discussion(self, repo_id: str, num: int) -> None:
            if (found := self._find(repo_id, num)) is None:
                return
            _, discussion = found
            events: list[dict[str, object]] = [_comment_event(c) for c in discussion.comments]
            for sha, summary, when in discussion.commits:
                events.append({
                    "id": hub.next_id(), "type": "commit", "createdAt": when,
                    "author": {"name": discussion.author}, "data": {"subject": summary, "oid": sha},
                })  # fmt: skip
            details = _discussion_json(repo_id, discussion) | {"events": events}
            if discussion.is_pull_request:
                details |= {
                    "changes": {"base": "refs/heads/main"}, "filesWithConflicts": [], "diff": "",
                }  # fmt: skip
            self._json(details)

        def _discussions_post(self, match: re.Match[str], body: bytes) -> None:
            if (user := self._user()) is None:
                return
            data = json.loads(body or b"{}")
            repo_id = match["repo"]
            if not match["num"]:  # open one
                if (repo := self._readable(repo_id)) is None:
                    return
                with hub._lock:
                    discussion = Discussion(
                        num=len(repo.discussions) + 1, title=data["title"], author=user,
                        is_pull_request=bool(data.get("pullRequest")), created_at=_now(),
                        status="draft" if data.get("pullRequest") else "open",
                    )  # fmt: skip
                    discussion.comments.append(
                        Comment(hub.next_id(), user, data.get("description", ""), _now())
                    )
                    repo.discussions.append(discussion)
                self._json({"num": discussion.num, "url": f"{hub.url}/{repo_id}/discussions"})
                return
            if (found := self._find(repo_id, int(match["num"]))) is None:
                return
            _, discussion = found
            if match["comment"] is None:  # a new comment
                comment = Comment(hub.next_id(), user, data["comment"], _now())
                with hub._lock:
                    discussion.comments.append(comment)
                self._json({"newMessage": _comment_event(comment)})
                return
            edited = discussion.comment(match["comment"].lower())
            if edited is None:
                self._error(404, "", "Comment not found")
            elif edited.author != user:
                self._error(403, "", "You can only edit your own comments")
            else:
                with hub._lock:
                    edited.content, edited.edits = data["content"], edited.edits + 1
                self._json({"updatedComment": _comment_event(edited)})

        def _write(self, repo_id: str, revision: str, kind: str, body: bytes) -> None:
            if (user := self._user()) is None:
                return
            found = self._repo_and_commit(repo_id, revision)
            if found is None:
                return
            repo, parent = found
            if kind == "preupload":
                files = repo.commits[parent]
                self._json({"files": [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                     "oid": files[f["path"]].git_oid if f["path"] in files else None}
                    for f in json.loads(body)["files"]
                ]})  # fmt: skip
                return
            self._commit(repo_id, repo, user, revision, parent, body)

        def _commit(
            self, repo_id: str, repo: Repo, user: str, revision: str, parent: str, body: bytes
        ) -> None:
            """Regular files only (as :meth:`_write`'s preupload asked for); a pull request
            with ``create_pr=1``, else the commit moves the branch or ``refs/pr/N`` named."""
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            header = next(item["value"] for item in lines if item["key"] == "header")
            files = dict(repo.commits[parent])
            for item in lines:
                value = item["value"]
                if item["key"] == "file":
                    files[value["path"]] = hub.store(
                        value["path"], base64.b64decode(value["content"])
                    )
                elif item["key"] == "deletedFile":
                    files.pop(value["path"], None)
                elif item["key"] != "header":
                    self._error(400, "", f"unsupported in this test server: {item['key']}")
                    return
            create_pr = parse_qs(urlsplit(self.path).query).get("create_pr") == ["1"]
            if not create_pr and revision not in repo.refs:
                self._error(400, "", f"{revision} is not a branch")
                return
            with hub._lock:
                before = dict(repo.refs)
                sha = hashlib.sha1(f"{parent} {hub.next_id()}".encode()).hexdigest()
                repo.commits[sha] = files
                pr_url = None
                if create_pr:
                    pull = Discussion(
                        num=len(repo.discussions) + 1, title=header["summary"], author=user,
                        is_pull_request=True, created_at=_now(),
                    )  # fmt: skip
                    pull.comments.append(
                        Comment(hub.next_id(), user, header.get("description", ""), _now())
                    )
                    repo.discussions.append(pull)
                    revision = f"refs/pr/{pull.num}"
                    pr_url = f"{hub.url}/{repo_id}/discussions/{pull.num}"
                repo.refs[revision] = sha
                if match := re.fullmatch(r"refs/pr/(\d+)", revision):
                    pulls = [d for d in repo.discussions if d.num == int(match[1])]
                    for pull in pulls:
                        pull.commits.append((sha, header["summary"], _now()))
            hub.pushed(repo_id, before)
            self._json({
                "commitUrl": f"{hub.url}/{repo_id}/commit/{sha}", "commitOid": sha,
                "pullRequestUrl": pr_url,
            })  # fmt: skip

        def _json(self, data: object) -> None:
            body = json.dumps(data).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            hub.record(Request(self.command, self.path, None, 200, 0))  # before the body
            if self.command != "HEAD":
                self.wfile.write(body)

        def _error(self, status: int, code: str, message: str) -> None:
            body = json.dumps({"error": message}).encode()
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            hub.record(Request(self.command, self.path, self.headers.get("Range"), status, 0))
            if self.command != "HEAD":
                self.wfile.write(body)

    return Handler
