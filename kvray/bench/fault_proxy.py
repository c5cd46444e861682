"""A fault-injecting HTTP proxy on loopback, in front of an S3 server (the tests' and `kvray bench soak`'s).

One proxy injects one kind of fault into a share (`fault_rate`) of the requests, decided by a seeded
random stream (one draw per request, in arrival order), or into every `every`-th one (the first, then
every `every`); `methods` limits the faults to some HTTP methods. The other requests are forwarded unchanged:

- `slowdown`: `503 SlowDown`, as S3 answers under load; the request never reaches the server;
- `internal`: `500 InternalError`; the request never reaches the server;
- `reset`: the connection is reset (RST) without an answer; with `after_upstream=True` the request
  reached the server first (a PUT that happened, whose answer was lost);
- `truncate`: the server's answer with its full Content-Length but only half of its body, then the
  connection closes (answers without a body pass unchanged);
- `stall`: the request is read and never answered; with `stall_s`, it is forwarded after that delay;
- `gone`: the first `gone_after` requests pass; then the endpoint disappears: the listening socket
  closes (connections are refused) and open connections are dropped without an answer.

Bounded: it serves only loopback, and stops with the test (stalled requests are released then).
"""

from __future__ import annotations

import contextlib
import http.client
import random
import socket
import struct
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self
from urllib.parse import urlsplit

FAULTS = ("slowdown", "internal", "reset", "truncate", "stall", "gone")


def _s3_error(code: str, message: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>{message}</Message></Error>").encode()


SLOW_DOWN = _s3_error("SlowDown", "Please reduce your request rate.")
INTERNAL_ERROR = _s3_error("InternalError", "We encountered an internal error. Please try again.")
ERROR_ANSWERS = {"slowdown": (503, SLOW_DOWN), "internal": (500, INTERNAL_ERROR)}


class FaultyProxy:
    def __init__(self, upstream: str, fault_rate: float = 1.0, seed: int = 0, *, fault: str = "slowdown",
                 stall_s: float | None = None, gone_after: int | None = None, after_upstream: bool = False,
                 methods: tuple[str, ...] | None = None, every: int | None = None):
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; one of {', '.join(FAULTS)}")
        if (fault == "gone") != (gone_after is not None):
            raise ValueError("gone_after goes with fault='gone', and only with it")
        self.upstream = urlsplit(upstream)
        self.fault, self.fault_rate = fault, fault_rate
        self.stall_s, self.gone_after, self.after_upstream = stall_s, gone_after, after_upstream
        self.methods = methods  # None: every method may be faulted
        self.every, self.eligible = every, 0
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.closing = threading.Event()
        self.requests = self.faults = 0
        self.faulted: Counter[str] = Counter()  # faults per HTTP method
        self.gone = False
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.closing.set()  # releases stalled requests
        self._close_listener()

    def _close_listener(self) -> None:
        with self.lock:
            if self.server is None:
                return
            server, self.server = self.server, None
        server.shutdown()
        server.server_close()

    def _decide(self, method: str) -> bool:
        """Whether this request is faulted; for `gone`, whether the endpoint is gone by now."""
        with self.lock:
            self.requests += 1
            if self.fault == "gone":
                if self.requests > self.gone_after and not self.gone:
                    self.gone = True
                    # Not from this handler's thread: shutdown() waits for the serving loop.
                    threading.Thread(target=self._close_listener, daemon=True).start()
                fail = self.gone
            else:
                draw = self.random.random()
                eligible = self.methods is None or method in self.methods
                if self.every is not None:
                    fail = eligible and self.eligible % self.every == 0
                else:
                    fail = eligible and draw < self.fault_rate
                self.eligible += eligible
            self.faults += fail
            if fail:
                self.faulted[method] += 1
            return fail

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        return type("Handler", (_FaultHandler,), {"proxy": self})


class _FaultHandler(BaseHTTPRequestHandler):
    """Forwards each request to the proxy's upstream, or answers it with the proxy's fault when it decides so."""

    protocol_version = "HTTP/1.1"
    proxy: FaultyProxy  # set per proxy by FaultyProxy._handler

    def log_message(self, *args):
        pass

    def _drop(self, reset: bool) -> None:
        """Ends the connection without an answer: RST when `reset`, else an orderly close."""
        self.close_connection = True
        if reset:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _upstream(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(self.proxy.upstream.hostname, self.proxy.upstream.port, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
            headers["Host"] = self.proxy.upstream.netloc
            conn.request(self.command, self.path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            conn.close()

    def _answer(self, status: int, headers: list[tuple[str, str]], data: bytes, cut: bool = False) -> None:
        self.send_response(status)
        # A HEAD answer's length is the object's, not its (empty) body's.
        keep_length = self.command == "HEAD"
        for key, value in headers:
            if key.lower() in ("transfer-encoding", "connection"):
                continue
            if key.lower() == "content-length" and not keep_length:
                continue
            self.send_header(key, value)
        if not keep_length:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data[: len(data) // 2] if cut else data)
        self.wfile.flush()
        if cut:
            self._drop(reset=False)

    def _forward(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if not self.proxy._decide(self.command):
            self._answer(*self._upstream(body))
            return
        fault = self.proxy.fault
        if fault in ERROR_ANSWERS:
            status, data = ERROR_ANSWERS[fault]
            self._answer(status, [("Content-Type", "application/xml")], data)
        elif fault == "reset":
            if self.proxy.after_upstream:
                self._upstream(body)
            self._drop(reset=True)
        elif fault == "truncate":
            status, headers, data = self._upstream(body)
            self._answer(status, headers, data, cut=self.command != "HEAD" and len(data) > 1)
        elif fault == "stall":
            if self.proxy.closing.wait(self.proxy.stall_s) or self.proxy.stall_s is None:
                self._drop(reset=False)
            else:
                self._answer(*self._upstream(body))
        else:  # gone
            self._drop(reset=True)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward
