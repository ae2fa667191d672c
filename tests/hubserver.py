"""A small Hugging Face Hub–compatible HTTP server over local folders, for tests.

It speaks the part of the Hub's protocol that ``huggingface_hub`` uses to find and download
model files: ``/api/models/{repo}/revision/{rev}`` (repo info, with ``?blobs=true`` file
metadata), ``/api/models/{repo}/tree/{rev}`` (listing) and ``/{repo}/resolve/{rev}/{path}``
(HEAD and GET with ``X-Repo-Commit``, ``ETag``, ``Content-Length`` and clamped ``Range``).
Errors carry the Hub's ``X-Error-Code`` so the real client raises its real exceptions. Every
request is recorded, with the bytes of file content sent, so tests can prove what was fetched.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


@dataclass(frozen=True)
class Blob:
    path: Path
    size: int
    sha256: str
    git_oid: str
    lfs: bool


@dataclass
class Repo:
    commits: dict[str, dict[str, Blob]] = field(default_factory=dict)  # sha → file → blob
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag → commit sha
    token: str | None = None  # required bearer token (private or gated repos)
    gated: bool = False


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
        self._lock = threading.Lock()
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
            data = file.read_bytes()
            sha256 = hashlib.sha256(data).hexdigest()
            stored = self.storage / sha256
            if not stored.exists():
                shutil.copyfile(file, stored)
            git_oid = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            name = file.relative_to(folder).as_posix()
            files[name] = Blob(stored, len(data), sha256, git_oid, name.endswith(LFS_SUFFIXES))
        commit = hashlib.sha1(
            json.dumps([repo_id, sorted((n, b.sha256) for n, b in files.items())]).encode()
        ).hexdigest()
        repo = self.repos.setdefault(repo_id, Repo())
        repo.commits[commit] = files
        repo.refs.update(dict.fromkeys(revisions, commit))
        repo.token, repo.gated = token, gated
        return commit

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


def _handler_for(hub: LocalHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass  # quiet: tests read hub.requests instead

        def do_HEAD(self) -> None:
            self._route(head=True)

        def do_GET(self) -> None:
            self._route(head=False)

        # -- routing -------------------------------------------------------------------
        def _route(self, head: bool) -> None:
            path = urlsplit(self.path).path
            if match := _RESOLVE.match(path):
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
            sent = 0
            if not head:
                with blob.path.open("rb") as fh:
                    fh.seek(start)
                    self.wfile.write(fh.read(length))
                sent = length
            hub.record(Request(self.command, self.path, requested, status, sent))

        def _json(self, data: object) -> None:
            body = json.dumps(data).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            hub.record(Request(self.command, self.path, None, 200, 0))

        def _error(self, status: int, code: str, message: str) -> None:
            body = json.dumps({"error": message}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            hub.record(Request(self.command, self.path, self.headers.get("Range"), status, 0))

    return Handler
