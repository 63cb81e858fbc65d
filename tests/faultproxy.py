"""A fault-injecting HTTP/1.1 reverse proxy on 127.0.0.1, for tests and benches.

Put it in front of a real S3 server (moto's ``ThreadedMotoServer``) and point
``AWS_ENDPOINT_URL`` at :attr:`FaultProxy.url`. Standard library only: an asyncio loop in a
daemon thread. Client connections are kept alive (several requests each, Content-Length or
chunked bodies); every request is buffered and forwarded on a fresh upstream connection, and
answers go back with a Content-Length.

Faults, switched at run time from any thread with :meth:`FaultProxy.set_fault`:

``ok``            pass through.
``http503``       answer ``503 SlowDown`` with an S3 XML error body (and ``Retry-After``).
``reset``         read the request head, then close the connection with a RST (SO_LINGER 0).
``slow``          forward, then hold the answer ``delay`` seconds (a ``100 Continue`` is
                  sent at once).
``stall``         read the request head, say nothing (not even ``100 Continue``) for
                  ``delay`` seconds, then reset: a server that hangs.
``drop_mid_body`` a request with a body (PUT, POST) is cut with a RST after half of it
                  arrived (nothing reaches the server); otherwise the request is forwarded and
                  the answer is cut after its headers and half its body (half its headers
                  when it has no body), with a plain close.
``outage``        stop listening (connections are refused) and reset every open connection.

A fault applies to ``share`` of the requests that match ``methods`` and ``path_prefix`` (the
request path, ``/bucket/key`` with path-style S3), for ``duration`` seconds or until changed.
``outage`` ignores the filters. Counters (:meth:`FaultProxy.stats`): requests seen per method,
faults injected per kind (an outage: once as it begins, plus each request caught on a connection
open at that moment), client connections accepted.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

FAULTS = ("ok", "http503", "reset", "slow", "stall", "drop_mid_body", "outage")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "expect"}
SLOWDOWN_XML = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>faultproxy</RequestId></Error>"
)


@dataclass(frozen=True)
class Fault:
    kind: str = "ok"
    share: float = 1.0
    methods: frozenset[str] | None = None
    path_prefix: str | None = None
    delay: float = 2.0
    retry_after: int | None = None
    until: float | None = None  # time.monotonic() deadline; then back to ok


class FaultProxy:
    """``with FaultProxy("http://127.0.0.1:5000") as proxy: ... proxy.url ...``"""

    def __init__(self, upstream: str, host: str = "127.0.0.1", port: int = 0, seed: int = 0):
        hostport = upstream.split("://", 1)[-1].rstrip("/")
        self.upstream = (hostport.rsplit(":", 1)[0], int(hostport.rsplit(":", 1)[1]))
        self.host, self.port = host, port
        self.on_request: Callable[[str, str], None] | None = None  # (method, path), loop thread
        self._fault = Fault()
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._requests: Counter[str] = Counter()
        self._faults: Counter[str] = Counter()
        self._connections = 0
        self._conns: set[asyncio.StreamWriter] = set()
        self._server: asyncio.base_events.Server | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # ---------------------------------------------------------------- control (any thread)

    def start(self) -> FaultProxy:
        self._thread.start()
        self._call(self._listen())
        return self

    def stop(self) -> None:
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def set_fault(
        self,
        kind: str = "ok",
        *,
        duration: float | None = None,
        share: float = 1.0,
        methods: Iterable[str] | None = None,
        path_prefix: str | None = None,
        delay: float = 2.0,
        retry_after: int | None = None,
    ) -> None:
        """Switch the fault (``ok`` clears it); ``duration`` seconds, or until changed."""
        if kind not in FAULTS:
            raise ValueError(f"unknown fault {kind!r}; one of {FAULTS}")
        until = None if duration is None else time.monotonic() + duration
        ms = None if methods is None else frozenset(m.upper() for m in methods)
        fault = Fault(kind, share, ms, path_prefix, delay, retry_after, until)
        with self._lock:
            self._fault = fault
        self._call(self._apply(fault))

    def clear(self) -> None:
        self.set_fault("ok")

    def stats(self) -> dict:
        with self._lock:
            return {
                "requests": dict(self._requests),
                "faults": dict(self._faults),
                "connections": self._connections,
            }

    def reset_counters(self) -> None:
        with self._lock:
            self._requests.clear()
            self._faults.clear()
            self._connections = 0

    def _call(self, coro) -> None:
        """Run ``coro`` on the loop; wait for it unless called from the loop thread."""
        if threading.current_thread() is self._thread:
            self._loop.create_task(coro)
        else:
            asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    # ---------------------------------------------------------------- listener (loop thread)

    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(
                self._handle, self.host, self.port, reuse_address=True
            )
            self.port = self._server.sockets[0].getsockname()[1]

    async def _close_all(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._conns):
            _rst(writer)

    async def _shutdown(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        await self._close_all()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _apply(self, fault: Fault) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if fault.kind != "outage":
            await self._listen()
            return
        with self._lock:
            self._faults["outage"] += 1
        await self._close_all()
        if fault.until is not None:
            delay = max(0.0, fault.until - time.monotonic())
            self._timer = self._loop.call_later(delay, self._end_outage, fault)

    def _end_outage(self, fault: Fault) -> None:
        with self._lock:
            if self._fault is fault:
                self._fault = Fault()
        self._loop.create_task(self._listen())

    def _pick(self, method: str, path: str) -> Fault | None:
        """The fault for this request, or None."""
        with self._lock:
            self._requests[method] += 1
            f = self._fault
            if f.until is not None and time.monotonic() >= f.until and f.kind != "outage":
                f = self._fault = Fault()
            if f.kind == "ok" or (f.methods is not None and method not in f.methods):
                return None
            if f.path_prefix is not None and not path.startswith(f.path_prefix):
                return None
            if f.share < 1.0 and self._rng.random() >= f.share:
                return None
            self._faults[f.kind] += 1
            return f

    # ---------------------------------------------------------------- one client connection

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.add(writer)
        with self._lock:
            self._connections += 1
        try:
            while await self._one_request(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:  # stop(): end quietly
            pass
        finally:
            self._conns.discard(writer)
            if not writer.transport.is_closing():
                writer.close()

    async def _one_request(self, reader: asyncio.StreamReader, writer) -> bool:
        """Serve one request; False when the connection is done."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False
        method, target, headers = _parse_head(head, request=True)
        if self.on_request is not None:
            self.on_request(method, target.split("?", 1)[0])
        fault = self._pick(method, target.split("?", 1)[0])
        kind = fault.kind if fault else "ok"
        if kind == "outage":  # the listener is closing; this connection goes too
            kind = "reset"
        if kind == "stall":
            await asyncio.sleep(fault.delay)
            kind = "reset"
        if kind == "reset":
            _rst(writer)
            return False
        if _get(headers, "expect").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        length, chunked = _framing(headers)
        if kind == "drop_mid_body" and (length or chunked):
            await reader.read(max(1, (length or 2) // 2))
            _rst(writer)
            return False
        body = await _read_body(reader, length, chunked)
        close = _get(headers, "connection").lower() == "close"
        if kind == "http503":
            extra = [("Retry-After", str(fault.retry_after))] if fault.retry_after else []
            extra.append(("Content-Type", "application/xml"))
            await _send(writer, "HTTP/1.1 503 Slow Down", extra, SLOWDOWN_XML, close, method)
            return not close
        try:
            status, resp_headers, resp_body = await self._forward(method, target, headers, body)
        except OSError as err:
            msg = f"upstream: {err}".encode()
            await _send(writer, "HTTP/1.1 502 Bad Gateway", [], msg, close, method)
            return not close
        if kind == "slow":
            await asyncio.sleep(fault.delay)
        no_body = method == "HEAD" or status.split()[1] in ("204", "304")
        if kind == "drop_mid_body":
            out = _head(status, resp_headers, None if no_body else len(resp_body))
            cut = out + resp_body[: len(resp_body) // 2] if resp_body else out[: len(out) // 2]
            writer.write(cut)
            await writer.drain()
            writer.close()
            return False
        await _send(writer, status, resp_headers, None if no_body else resp_body, close)
        return not close

    async def _forward(self, method: str, target: str, headers, body: bytes):
        reader, writer = await asyncio.open_connection(*self.upstream)
        try:
            length, chunked = _framing(headers)
            keep = [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP | {"content-length"}]
            if length is not None or chunked:
                keep.append(("Content-Length", str(len(body))))
            keep.append(("Connection", "close"))
            lines = [f"{method} {target} HTTP/1.1", *(f"{k}: {v}" for k, v in keep)]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
            await writer.drain()
            while True:
                status, _, resp_headers = _parse_head(await reader.readuntil(b"\r\n\r\n"))
                if not status.split()[1].startswith("1"):  # skip 100 Continue
                    break
            if method == "HEAD" or status.split()[1] in ("204", "304"):
                return status, resp_headers, b""
            length, chunked = _framing(resp_headers)
            if length is None and not chunked:
                return status, resp_headers, await reader.read()  # until the server closes
            return status, resp_headers, await _read_body(reader, length, chunked)
        finally:
            writer.close()


# -------------------------------------------------------------------- HTTP/1.1 helpers


def _parse_head(head: bytes, request: bool = False) -> tuple[str, str, list[tuple[str, str]]]:
    """Request head → (method, target, headers); response head → (status line, "", headers)."""
    lines = head.decode("latin-1").split("\r\n")
    headers = [tuple(s.strip() for s in line.split(":", 1)) for line in lines[1:] if ":" in line]
    if request:
        method, target, _ = lines[0].split(" ", 2)
        return method.upper(), target, headers
    return lines[0], "", headers


def _get(headers, name: str) -> str:
    return next((v for k, v in headers if k.lower() == name), "")


def _framing(headers) -> tuple[int | None, bool]:
    chunked = "chunked" in _get(headers, "transfer-encoding").lower()
    length = _get(headers, "content-length")
    return (int(length) if length and not chunked else None), chunked


async def _read_body(reader: asyncio.StreamReader, length: int | None, chunked: bool) -> bytes:
    if not chunked:
        return await reader.readexactly(length) if length else b""
    parts = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0].strip(), 16)
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                pass
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


def _head(status: str, headers, length: int | None, close: bool = False) -> bytes:
    """Response head; ``length`` None keeps the upstream's Content-Length (HEAD, 204, 304)."""
    drop = HOP_BY_HOP if length is None else HOP_BY_HOP | {"content-length"}
    keep = [(k, v) for k, v in headers if k.lower() not in drop]
    if length is not None:
        keep.append(("Content-Length", str(length)))
    if close:
        keep.append(("Connection", "close"))
    return ("\r\n".join([status, *(f"{k}: {v}" for k, v in keep)]) + "\r\n\r\n").encode("latin-1")


async def _send(writer, status: str, headers, body: bytes | None, close: bool, method="") -> None:
    """An answer of our own (``method`` HEAD: its headers only) or the server's."""
    if method == "HEAD" and body is not None:
        headers, body = [*headers, ("Content-Length", str(len(body)))], None
    writer.write(_head(status, headers, None if body is None else len(body), close) + (body or b""))
    await writer.drain()


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with a RST instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()
