"""An HTTP forwarder that can refuse chosen routes, for tests of a server going away.

``FaultProxy(mlflow.url)`` sits between a client and a real server and passes every request
through unchanged. :meth:`FaultProxy.arm` makes requests whose path contains one of the given
patterns answer an error at once, without reaching the server. A test can so take "the MLflow
server is down while tagging" (``arm(["/model-versions/set-tag"])``) exactly at the step it
means, with no race against a process being stopped and started.
"""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import urlsplit

__all__ = ["FaultProxy", "Forwarded"]

# RFC 9110 §7.6.1: these describe one connection, not the message, so a proxy drops them.
HOP_BY_HOP = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
        "trailer", "transfer-encoding", "upgrade", "proxy-connection",
    }
)  # fmt: skip

TARGET_TIMEOUT = 120  # seconds a forwarded request may take (artifact uploads)


@dataclass(frozen=True)
class Forwarded:
    """One request the proxy answered: ``refused`` when an armed pattern answered it."""

    method: str
    path: str
    status: int
    refused: bool


class FaultProxy:
    """``with FaultProxy(server.url) as proxy:`` then point the client at ``proxy.url``."""

    def __init__(self, target_url: str) -> None:
        parts = urlsplit(target_url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"FaultProxy forwards to http://host:port only, not {target_url!r}")
        self.target_host = parts.hostname
        self.target_port = parts.port or 80
        self.requests: list[Forwarded] = []
        self._patterns: tuple[str, ...] = ()
        self._status = 503
        self._left: int | None = None  # refusals left before it disarms itself (None: no end)
        self._refused = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def refused(self) -> int:
        """Requests answered by an armed pattern so far (never reset by :meth:`disarm`)."""
        with self._lock:
            return self._refused

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def arm(self, patterns: Sequence[str], status: int = 503, times: int | None = None) -> None:
        """From now on, a request whose path contains any of ``patterns`` gets ``status``
        and is not forwarded. With ``times``, only that many are refused and later ones pass,
        so "down for the first N tries, then back" needs no timing."""
        if isinstance(patterns, str):
            raise TypeError("arm() takes a sequence of patterns, not one string")
        with self._lock:
            self._patterns, self._status, self._left = tuple(patterns), status, times

    def disarm(self) -> None:
        """Forward everything again."""
        with self._lock:
            self._patterns, self._left = (), None

    def _refusal(self, path: str) -> int | None:
        """The status to refuse ``path`` with, counted; None to forward it."""
        with self._lock:
            if not any(pattern in path for pattern in self._patterns):
                return None
            if self._left is not None:
                if self._left <= 0:
                    return None
                self._left -= 1
            self._refused += 1
            return self._status

    def _record(self, entry: Forwarded) -> None:
        with self._lock:
            self.requests.append(entry)


def _handler_for(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass  # quiet: tests read proxy.requests instead

        def do_GET(self) -> None:
            self._forward()

        do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_GET

        def _body(self) -> bytes:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()  # the CRLF after each chunk
                while self.rfile.readline().strip():
                    pass  # trailers, up to the empty line
                return b"".join(chunks)
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _forward(self) -> None:
            body = self._body()  # read even when refused, so the connection stays usable
            path = urlsplit(self.path).path
            if (status := proxy._refusal(path)) is not None:
                message = {"error_code": "TEMPORARILY_UNAVAILABLE", "message": "refused by test"}
                self._answer(status, [("Content-Type", "application/json")], json.dumps(message))
                proxy._record(Forwarded(self.command, path, status, refused=True))
                return
            headers = {
                k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP | {"host"}
            }
            connection = http.client.HTTPConnection(
                proxy.target_host, proxy.target_port, timeout=TARGET_TIMEOUT
            )
            try:
                # A body is sent, with its length, whenever the client sent one (or a length).
                sent = body if body or "Content-Length" in self.headers else None
                connection.request(self.command, self.path, body=sent, headers=headers)
                response = connection.getresponse()
                data = response.read()
                kept = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP]
                status = response.status
            except OSError as error:
                status, data = 502, f"proxy: cannot reach the target: {error}".encode()
                kept = [("Content-Type", "text/plain")]
            finally:
                connection.close()
            self._answer(status, kept, data)
            proxy._record(Forwarded(self.command, path, status, refused=False))

        def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes | str) -> None:
            data = body.encode() if isinstance(body, str) else body
            self.send_response_only(status)  # the target's own Date and Server pass through
            length_sent = False
            for key, value in headers:
                if key.lower() == "content-length":
                    # A HEAD answer keeps the target's length (of the body it did not send).
                    if self.command != "HEAD":
                        value = str(len(data))
                    length_sent = True
                self.send_header(key, value)
            if not length_sent:
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

    return Handler
