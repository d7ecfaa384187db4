"""A small TCP proxy on 127.0.0.1 in front of moto's S3 server, for tests: it counts the HTTP requests that
pass through it and injects network faults, so a test can say "this product cost 12 GETs" or "S3 was
unreachable for 3 seconds during mask" without touching the production code path.

    with moto_server() as upstream, S3Proxy(*upstream).running() as proxy:
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": proxy.endpoint_url})
        ...
        proxy.count("GET", "/bucket/key")

Bytes are forwarded unchanged in both directions. The client-to-server stream is parsed just enough to
split it into requests (request line, headers, then a body framed by Content-Length or chunked transfer
encoding), so every request on a keep-alive connection is counted. Faults:

- `refuse()`: the server is down: existing connections are closed and the listening socket is closed, so
  new connections are refused (ECONNREFUSED);
- `reset()`: in-flight and new connections are reset (RST);
- `heal()`: service again on the same port; `fail_for(seconds)`: refuse, then heal by itself.

A fault call returns once it holds: the connections it ends are gone and the listener is in its new state.
Every thread the proxy starts is joined by `stop()`.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import s3fs

POLL_SECONDS = 0.05
RECV_BYTES = 256 * 1024
MAX_HEAD_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Request:
    """One HTTP request seen by the proxy."""

    method: str
    path: str  # percent-decoded, without the query string
    query: str
    range: str | None  # the Range header, when there is one


class RequestParser:
    """Splits a client's byte stream into HTTP/1.x requests; bodies are skipped, not kept."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._state = "head"
        self._remaining = 0

    def feed(self, data: bytes) -> list[Request]:
        self._buffer += data
        found: list[Request] = []
        while self._step(found):
            pass
        return found

    def _step(self, found: list[Request]) -> bool:
        """Consume one piece of the stream in the current state; False when more bytes are needed."""
        if self._state == "head":
            return self._head(found)
        if self._state in ("body", "chunk-data"):
            return self._skip_data()
        return self._chunk_line()  # "chunk-size" or "trailers": one line at a time

    def _head(self, found: list[Request]) -> bool:
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_HEAD_BYTES:
                raise ValueError("HTTP request head larger than 64 KiB")
            return False
        head = bytes(self._buffer[:end]).decode("latin-1")
        del self._buffer[: end + 4]
        request, chunked, length = self._parse_head(head)
        found.append(request)
        if chunked:
            self._state = "chunk-size"
        elif length:
            self._state, self._remaining = "body", length
        return True

    def _skip_data(self) -> bool:
        taken = min(self._remaining, len(self._buffer))
        del self._buffer[:taken]
        self._remaining -= taken
        if self._remaining:
            return False
        self._state = "head" if self._state == "body" else "chunk-size"
        return True

    def _chunk_line(self) -> bool:
        end = self._buffer.find(b"\r\n")
        if end < 0:
            return False
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 2]
        if self._state == "trailers":
            if not line:
                self._state = "head"
            return True
        size = int(line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            self._state = "trailers"
        else:
            self._state, self._remaining = "chunk-data", size + 2  # data and its CRLF
        return True

    @staticmethod
    def _parse_head(head: str) -> tuple[Request, bool, int]:
        lines = head.split("\r\n")
        method, target, _version = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        path, _, query = target.partition("?")
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length = 0 if chunked else int(headers.get("content-length", "0") or 0)
        return Request(method.upper(), unquote(path), query, headers.get("range")), chunked, length


class _Connection:
    """One client connection and its upstream connection, served by one thread."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.end: str | None = None  # "close" or "reset": asked for by the proxy
        self.thread: threading.Thread | None = None


class S3Proxy:
    def __init__(self, upstream_host: str, upstream_port: int, port: int = 0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = port
        self._lock = threading.Condition()
        self._mode = "up"  # "up" | "refuse" | "reset"
        self._listening = False
        self._stopping = False
        self._bind_error: OSError | None = None
        self._accept_thread: threading.Thread | None = None
        self._connections: set[_Connection] = set()
        self._requests: list[Request] = []
        self._peak_connections = 0
        self._timer: threading.Timer | None = None

    # Life cycle -------------------------------------------------------------------------------------

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def endpoint(self) -> str:
        """`host:port`, as GDAL's AWS_S3_ENDPOINT wants it."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> S3Proxy:
        listener = self._bind()
        self.port = listener.getsockname()[1]
        self._accept_thread = threading.Thread(
            target=self._accept_loop, args=(listener,), name="s3-proxy-accept", daemon=True
        )
        with self._lock:
            self._listening = True
        self._accept_thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            timer, self._timer = self._timer, None
            connections = list(self._connections)
            for connection in connections:
                connection.end = connection.end or "close"
            self._lock.notify_all()
        if timer is not None:
            timer.cancel()
            if timer.is_alive():
                timer.join()
        if self._accept_thread is not None:
            self._accept_thread.join()
        self._join(connections)

    @contextlib.contextmanager
    def running(self) -> Iterator[S3Proxy]:
        self.start()
        try:
            yield self
        finally:
            self.stop()

    # Counting ---------------------------------------------------------------------------------------

    @property
    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._requests)

    def counts(self) -> Counter[tuple[str, str]]:
        return Counter((r.method, r.path) for r in self.requests)

    def count(self, method: str | None = None, path: str | None = None) -> int:
        """Requests seen with this method (any if None) on this path (any if None; a path ending in
        `/` counts everything under it)."""

        def matches(request: Request) -> bool:
            if method is not None and request.method != method.upper():
                return False
            if path is None:
                return True
            return request.path.startswith(path) if path.endswith("/") else request.path == path

        return sum(1 for r in self.requests if matches(r))

    @property
    def peak_connections(self) -> int:
        """The most client connections open at once since the last `clear_counts`."""
        with self._lock:
            return self._peak_connections

    def clear_counts(self) -> None:
        with self._lock:
            self._requests.clear()
            self._peak_connections = len(self._connections)

    # Faults -----------------------------------------------------------------------------------------

    def refuse(self) -> None:
        """The server goes away: open connections are closed, new ones refused."""
        self._set_mode("refuse", "close")

    def reset(self) -> None:
        """Open connections are reset (RST); new connections are accepted and reset at once."""
        self._set_mode("reset", "reset")

    def heal(self) -> None:
        """Service again, on the same port."""
        self._set_mode("up", None)

    def fail_for(self, seconds: float) -> None:
        """Refuse connections for `seconds`, then heal without being asked."""
        self.refuse()
        timer = threading.Timer(seconds, self._heal_unless_stopped)
        timer.name, timer.daemon = "s3-proxy-heal", True
        with self._lock:
            previous, self._timer = self._timer, timer
        if previous is not None:
            previous.cancel()
        timer.start()

    def _heal_unless_stopped(self) -> None:
        with self._lock:
            if self._stopping:
                return
        self.heal()

    def _set_mode(self, mode: str, end: str | None) -> None:
        with self._lock:
            if self._stopping:
                raise RuntimeError("the proxy is stopped")
            self._mode = mode
            ending = list(self._connections) if end else []
            for connection in ending:
                connection.end = end
            self._lock.notify_all()
            # The accept thread closes or re-opens the listener; wait until it has.
            listening = mode != "refuse"
            if not self._lock.wait_for(
                lambda: self._listening == listening or self._bind_error is not None, timeout=10
            ):
                raise RuntimeError("the proxy's listener did not change state within 10 s")
            if self._bind_error is not None:
                error, self._bind_error = self._bind_error, None
                raise RuntimeError(f"the proxy could not listen on port {self.port} again: {error}")
        self._join(ending)

    # Threads ----------------------------------------------------------------------------------------

    def _bind(self) -> socket.socket:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind(("127.0.0.1", self.port))
            listener.listen(64)
        except OSError:
            listener.close()
            raise
        return listener

    def _accept_loop(self, listener: socket.socket | None) -> None:
        """Owns the listening socket: closes it while refusing, re-opens it on heal."""
        try:
            while True:
                with self._lock:
                    if self._stopping:
                        return
                    want = self._mode != "refuse"
                    if want and listener is None and self._bind_error is None:
                        try:
                            listener = self._bind()
                        except OSError as exc:
                            self._bind_error = exc
                    elif not want and listener is not None:
                        listener.close()
                        listener = None
                    self._listening = listener is not None
                    self._lock.notify_all()
                    if listener is None:
                        self._lock.wait(POLL_SECONDS)
                        continue
                if not _readable(listener):
                    continue
                try:
                    client, _ = listener.accept()
                except OSError:
                    continue
                self._admit(client)
        finally:
            if listener is not None:
                listener.close()

    def _admit(self, client: socket.socket) -> None:
        with self._lock:
            mode, stopping = self._mode, self._stopping
        if mode == "reset" or stopping:
            _close(client, reset=True)
            return
        try:
            upstream = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            _close(client, reset=True)
            return
        connection = _Connection(client, upstream)
        thread = threading.Thread(target=self._serve, args=(connection,), name="s3-proxy-conn", daemon=True)
        connection.thread = thread
        with self._lock:
            self._connections.add(connection)
            self._peak_connections = max(self._peak_connections, len(self._connections))
        thread.start()

    def _serve(self, connection: _Connection) -> None:
        client, upstream = connection.client, connection.upstream
        parser = RequestParser()
        selector = selectors.DefaultSelector()
        selector.register(client, selectors.EVENT_READ)
        selector.register(upstream, selectors.EVENT_READ)
        reset = False
        try:
            while connection.end is None:
                for key, _ in selector.select(POLL_SECONDS):
                    source = key.fileobj
                    assert isinstance(source, socket.socket)  # only the two sockets are registered
                    data = source.recv(RECV_BYTES)
                    if not data:
                        return
                    if source is client:
                        seen = parser.feed(data)
                        with self._lock:
                            if connection.end is not None:
                                break
                            self._requests.extend(seen)
                        upstream.sendall(data)
                    else:
                        client.sendall(data)
            reset = connection.end == "reset"
        except (OSError, ValueError):
            reset = True
        finally:
            selector.close()
            _close(client, reset=reset)
            _close(upstream, reset=False)
            with self._lock:
                self._connections.discard(connection)
                self._lock.notify_all()

    def _join(self, connections: list[_Connection]) -> None:
        for connection in connections:
            if connection.thread is not None and connection.thread is not threading.current_thread():
                connection.thread.join(timeout=10)


def _readable(sock: socket.socket) -> bool:
    """Wait up to POLL_SECONDS for `sock` to have something to read (a connection to accept)."""
    with selectors.DefaultSelector() as selector:
        selector.register(sock, selectors.EVENT_READ)
        return bool(selector.select(POLL_SECONDS))


def _close(sock: socket.socket, reset: bool) -> None:
    """Close a socket; with `reset`, abortively (RST instead of FIN)."""
    with contextlib.suppress(OSError):
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            sock.shutdown(socket.SHUT_RDWR)
    sock.close()


@contextlib.contextmanager
def moto_server() -> Iterator[tuple[str, int]]:
    """moto's standalone S3 server in its own process on 127.0.0.1 (a thread in this process would
    deadlock: GDAL holds the GIL while it waits for the server's answer). Yields (host, port)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("moto's S3 server did not start") from None
                time.sleep(0.2)
        yield "127.0.0.1", port
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@contextlib.contextmanager
def products_behind_proxy(products: Path, scratch: Path) -> Iterator[tuple[S3Proxy, Any]]:
    """moto behind an S3Proxy, with the process environment of an S3 build (test credentials, the
    proxy as endpoint, `scratch` as scratch base), `products` uploaded to `s3://enmap-products/` and an
    empty `builds` bucket; yields the proxy and an s3fs file system through it. The environment is
    restored afterwards."""
    with (
        moto_server() as upstream,
        S3Proxy(*upstream).running() as proxy,
        pytest.MonkeyPatch.context() as env,
    ):
        for name, value in {
            "AWS_ACCESS_KEY_ID": "testing-key",
            "AWS_SECRET_ACCESS_KEY": "testing-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": proxy.endpoint_url,
            "SPECTRALEARTH_SCRATCH": str(scratch),
        }.items():
            env.setenv(name, value)
        env.delenv("AWS_PROFILE", raising=False)
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": proxy.endpoint_url})
        fs.mkdir("enmap-products")
        fs.put(str(products) + "/", "enmap-products/", recursive=True)
        fs.mkdir("builds")
        yield proxy, fs
