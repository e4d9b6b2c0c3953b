"""Frames over plain TCP with asyncio: a zero-copy reader, a request/reply client, a server.

Why not gRPC (DESIGN.md's first choice)? Both were measured on this machine: a round trip of a
small message costs 0.07 ms over plain asyncio TCP against 0.14 ms on a gRPC stream, and the
per-hop budget is 0.3 ms. What gRPC would add (framing, size limits, deadlines) is a few lines here:
frames are length-prefixed (protocol.py), limits are checked before any allocation, and every
request has a deadline on the client side.
"""

from __future__ import annotations

import asyncio
import itertools
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from mesh.listener import Listener, listen
from mesh.protocol import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    PREFIX,
    Message,
    ProtocolError,
    decode_header,
    decode_tensors,
    encode,
    error_header,
    parse_prefix,
)


class ConnectionLost(ConnectionError):
    """The peer closed the connection or vanished."""


class Unresponsive(TimeoutError):
    """The peer answered nothing, not even a ping, for longer than a busy peer would: it is
    stopped, hung or cut off (a process that froze keeps its connections open)."""


@dataclass(frozen=True)
class Liveness:
    """How a client waiting for an answer tells a busy donor from a stuck one. A donor silent for
    `probe_after` seconds is pinged; one that has not answered the ping `answer_within` seconds
    later is stuck. A busy donor answers pings between two of its batches (server/compute.py hands
    its loop back between them), so a stuck one is found in seconds, not after the request's whole
    timeout, which must leave room for long prompts on slow donors."""

    probe_after: float = 1.0
    answer_within: float = 5.0


class RemoteError(Exception):
    """The peer answered with an error reply."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


# Request ids are unique across all of a process's connections: a message about a request can
# arrive on another connection than the one it was sent on (forwarded steps, see wait_for_first).
_REQUEST_IDS = itertools.count()

STAGING_BYTES = 1 << 16  # small frames are parsed from here; one recv usually holds a whole frame


class FrameProtocol(asyncio.BufferedProtocol):
    """Parses frames from the byte stream with as few copies and system calls as possible.

    Small frames land in a staging buffer, several per recv if they came together; a payload too
    big for it gets its own buffer, which the kernel then fills directly.
    """

    def __init__(self, on_message: Callable[[Message], None], on_fatal: Callable[[ProtocolError], None],
                 on_closed: Callable[[Exception | None], None], max_payload: int = DEFAULT_MAX_PAYLOAD_BYTES):
        self.on_message, self.on_fatal, self.on_closed = on_message, on_fatal, on_closed
        self.max_payload = max_payload
        self.transport: asyncio.Transport | None = None
        self._staging = bytearray(STAGING_BYTES)
        self._begin = self._end = 0  # unparsed bytes are _staging[_begin:_end]
        self._header_len: int | None = None  # set once a prefix is parsed
        self._payload_len = 0
        self._header: dict | None = None
        self._big: bytearray | None = None  # a large payload being received in place
        self._big_filled = 0
        self._broken = False

    def connection_made(self, transport):
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small frames must not wait for Nagle

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._broken:
            return memoryview(bytearray(max(sizehint, 4096)))  # discard whatever still arrives
        if self._big is not None:
            return memoryview(self._big)[self._big_filled:]
        if self._end == len(self._staging):
            self._compact()
        return memoryview(self._staging)[self._end:]

    def buffer_updated(self, nbytes: int) -> None:
        if self._broken:
            return
        try:
            if self._big is not None:
                self._big_filled += nbytes
                if self._big_filled == len(self._big):
                    payload, self._big = self._big, None
                    self._finish(payload)
                return
            self._end += nbytes
            self._parse()
        except ProtocolError as err:
            self._broken = True
            self.on_fatal(err)

    def _parse(self) -> None:
        while True:
            available = self._end - self._begin
            if available == 0:
                self._begin = self._end = 0  # everything consumed: reuse the buffer from its start
            if self._header_len is None:
                if available < PREFIX.size:
                    return
                self._header_len, self._payload_len = parse_prefix(self._staging, self._begin, self.max_payload)
                self._begin += PREFIX.size
            elif self._header is None:
                if available < self._header_len:
                    return self._make_room(self._header_len)
                self._header = decode_header(memoryview(self._staging)[self._begin:self._begin + self._header_len])
                self._begin += self._header_len
            elif available >= self._payload_len:
                payload = self._staging[self._begin:self._begin + self._payload_len]  # a copy: writable
                self._begin += self._payload_len
                self._finish(payload)
            elif self._payload_len > len(self._staging) // 2:
                self._big = bytearray(self._payload_len)
                self._big[:available] = self._staging[self._begin:self._end]
                self._big_filled = available
                self._begin = self._end = 0
                return
            else:
                return self._make_room(self._payload_len)

    def _make_room(self, needed: int) -> None:
        if len(self._staging) - self._begin < needed:
            self._compact()

    def _compact(self) -> None:
        remaining = self._end - self._begin
        self._staging[:remaining] = self._staging[self._begin:self._end]
        self._begin, self._end = 0, remaining

    def _finish(self, payload: bytearray) -> None:
        header = self._header
        self._header_len, self._header = None, None
        try:
            tensors = decode_tensors(header, memoryview(payload))
        except ProtocolError as err:
            # Framing is intact, so the stream stays usable: answer this message with the error.
            self.on_message(Message({**header, "_invalid": (err.code, err.message)}, []))
            return
        self.on_message(Message(header, tensors))

    def connection_lost(self, exc):
        self.on_closed(exc)


def _one_segment(buffers) -> bytes | None:
    """A small frame's buffers joined, to go out in one segment so that the peer wakes once per
    frame; None for a large frame, whose tensors are better written without that copy."""
    return b"".join(buffers) if sum(len(b) for b in buffers) <= STAGING_BYTES else None


def write_message(transport: asyncio.Transport, header: dict, tensors=()) -> None:
    if not transport.is_closing():
        buffers = encode(header, list(tensors))
        segment = _one_segment(buffers)
        if segment is not None:
            transport.write(segment)
        else:
            transport.writelines(buffers)


def install_fast_event_loop() -> None:
    """Use uvloop where it is installed (it comes with hivemind on Linux): cheaper wakeups and
    twice the loopback bandwidth of the default loop for large frames."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


class Connection:
    """The client side of one TCP connection: blocking request/reply, one request at a time.

    Blocking on purpose. Measured during development on the 2-core test machine (throwaway echo
    scripts; benchmarks/RESULTS.md), with the server computing 2 ms per request:
    an asyncio client added 0.49 ms per round trip on top of the donor's compute, a thread blocked
    in recv 0.27 ms. Waking an event loop after a few idle milliseconds (epoll, callbacks, a future,
    a task) costs more than the network itself. Concurrency comes from threads, one per session.
    """

    def __init__(self, sock: socket.socket, address: str, max_payload: int = DEFAULT_MAX_PAYLOAD_BYTES):
        self.sock = sock
        self.address = address
        self._replies: list[Message] = []
        self._timeout = sock.gettimeout()
        self._error: Exception | None = None
        self._parser = FrameProtocol(self._replies.append, self._on_fatal, lambda exc: None, max_payload)
        self.heard_at = time.monotonic()  # when the peer last sent a message
        self.probe_id: int | None = None  # a ping sent to see whether the peer still answers (Liveness)
        self.probe_sent_at = 0.0

    @classmethod
    def open(cls, host: str, port: int, timeout: float = 5.0,
             max_payload: int = DEFAULT_MAX_PAYLOAD_BYTES) -> "Connection":
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as err:
            raise ConnectionLost(f"cannot connect to {host}:{port}: {err}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(sock, f"{host}:{port}", max_payload)

    def request(self, header: dict, tensors=(), timeout: float | None = None,
                liveness: Liveness | None = None) -> Message:
        """Send a request and wait for its reply; raises RemoteError, ConnectionLost or TimeoutError
        (Unresponsive: the peer answered no ping while it was awaited, see Liveness)."""
        request_id = self.send(header, tensors, timeout)
        try:
            if liveness is None:
                reply = self._receive(request_id)
            else:
                reply = wait_for_first([self], request_id, 1e9 if timeout is None else timeout, liveness)[1]
                if isinstance(reply, Exception):
                    raise reply
        except TimeoutError as err:
            waited = "" if timeout is None else f" within {timeout:g}s"
            self._broken(ConnectionLost(f"no reply from {self.address}{waited}"))
            if isinstance(err, Unresponsive):
                raise
            raise TimeoutError(f"no reply from {self.address}{waited}") from None
        except OSError as err:
            raise self._broken(ConnectionLost(f"connection to {self.address} lost: {err}")) from None
        if reply.type == "error":
            raise RemoteError(reply.header.get("code", "error"), reply.header.get("message", ""))
        return reply

    def send(self, header: dict, tensors=(), timeout: float | None = None) -> int:
        """Send a request without waiting for an answer; its id. What comes back about it, on this
        or another connection, is read with `wait_for_first`."""
        if self._error is not None:
            raise self._error
        request_id = next(_REQUEST_IDS)
        self._set_timeout(timeout)
        try:
            self._send(encode({**header, "id": request_id}, list(tensors)))
        except TimeoutError:
            raise self._broken(ConnectionLost(f"{self.address} accepted no data within {timeout:g}s")) from None
        except OSError as err:
            raise self._broken(ConnectionLost(f"connection to {self.address} lost: {err}")) from None
        return request_id

    def _set_timeout(self, timeout: float | None) -> None:
        if timeout != self._timeout:  # settimeout is a system call; decode steps repeat the same value
            self.sock.settimeout(timeout)
            self._timeout = timeout

    def _send(self, buffers) -> None:
        segment = _one_segment(buffers)
        if segment is not None:
            self.sock.sendall(segment)
        else:
            for buffer in buffers:  # large tensors go out without being copied into one blob
                self.sock.sendall(buffer)

    def _receive(self, request_id) -> Message:
        while True:
            reply = self._take(request_id)
            if reply is not None:
                return reply
            self._read_some()

    def _take(self, request_id) -> Message | None:
        """The parsed message about `request_id`, if one came; drops older ones (answers nobody waits for)."""
        while self._replies:
            reply = self._replies.pop(0)
            self.heard_at = time.monotonic()
            about = reply.header.get("id")
            if about in (request_id, None):  # None: the peer could not parse us
                return reply
            if about == self.probe_id:
                self.probe_id = None  # alive
        if self._error is not None:
            raise self._error
        return None

    def _read_some(self) -> None:
        buffer = self._parser.get_buffer(-1)
        received = self.sock.recv_into(buffer)
        if received == 0:
            raise self._broken(ConnectionLost(f"connection to {self.address} closed by the peer"))
        self._parser.buffer_updated(received)

    def _on_fatal(self, error: ProtocolError) -> None:
        self._broken(ConnectionLost(f"{self.address} sent a malformed frame: {error.message}"))

    def _broken(self, error: Exception) -> Exception:
        # After a timeout or a framing error the stream's position is unknown: never reuse it.
        self._error = self._error or error
        self.close()
        return self._error

    @property
    def is_closed(self) -> bool:
        return self._error is not None or self.sock.fileno() < 0

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def wait_for_first(connections: list[Connection], request_id, timeout: float,
                   liveness: Liveness | None = None) -> tuple[int, Message | Exception]:
    """The first message about `request_id` on any of `connections`, and the index of the connection
    it came on; or the error of the first connection that broke (closed, malformed stream, or, with
    `liveness`, a peer that stopped answering pings: Unresponsive), with its index. Raises
    TimeoutError when nothing came within `timeout`; the connections stay usable then.

    For forwarded steps: the request goes to the first donor of a chain, the result comes from the
    last, and a donor on the way that fails says so on its own connection."""
    started = time.monotonic()
    deadline = started + timeout
    for connection in connections:  # a ping still unanswered from an earlier wait gets a fresh window
        connection.probe_sent_at = max(connection.probe_sent_at, started)
    while True:
        for index in range(len(connections) - 1, -1, -1):  # the last one is where results come from
            try:
                message = connections[index]._take(request_id)
            except OSError as err:  # ConnectionLost included
                return index, err
            if message is not None:
                return index, message
        now = time.monotonic()
        wait = deadline - now
        if wait <= 0:
            raise TimeoutError(f"no answer from {connections[-1].address} within {timeout:g}s")
        if liveness is not None:
            if _next_probe(connections, liveness, started, now) <= 0:
                stuck = _probe(connections, liveness, started, now)
                if stuck is not None:
                    return stuck
            wait = min(wait, max(0.0, _next_probe(connections, liveness, started, now)))
        try:
            ready, _, _ = select.select([c.sock for c in connections], [], [], wait)
        except (OSError, ValueError) as err:  # ValueError: a socket was closed under us
            broken = next((i for i, c in enumerate(connections) if c.is_closed), 0)
            return broken, ConnectionLost(f"connection to {connections[broken].address} lost: {err}")
        for sock in ready:
            index = next(i for i, c in enumerate(connections) if c.sock is sock)
            try:
                connections[index]._read_some()
            except TimeoutError:
                continue  # select saw data that was not there after all: wait again
            except OSError as err:
                return index, connections[index]._broken(ConnectionLost(
                    f"connection to {connections[index].address} lost: {err}"))


def _next_probe(connections: list[Connection], liveness: Liveness, started: float, now: float) -> float:
    """Seconds until some connection is due a ping, or its ping is overdue."""
    due = [c.probe_sent_at + liveness.answer_within if c.probe_id is not None
           else max(c.heard_at, started) + liveness.probe_after for c in connections]
    return min(due) - now


def _probe(connections: list[Connection], liveness: Liveness, started: float,
           now: float) -> tuple[int, Exception] | None:
    """Ping the connections silent for `probe_after`; (index, Unresponsive) of one whose ping is overdue."""
    for index, connection in enumerate(connections):
        if connection.probe_id is not None:
            if now - connection.probe_sent_at >= liveness.answer_within:
                return index, connection._broken(Unresponsive(
                    f"{connection.address} answered no ping within {liveness.answer_within:g}s "
                    "(stopped, hung or cut off)"))
        elif now - max(connection.heard_at, started) >= liveness.probe_after:
            try:
                connection.probe_id = connection.send({"type": "ping"}, timeout=liveness.answer_within)
            except OSError as err:  # ConnectionLost included
                return index, err
            connection.probe_sent_at = now
    return None


class Responder:
    """Answers one request, once: a result or an error, matched to the request by its id."""

    def __init__(self, transport: asyncio.Transport | None, request_id):
        self.transport, self.request_id = transport, request_id
        self.answered = False

    def ok(self, header: dict, tensors=()) -> None:
        self._send({**header, "id": self.request_id}, tensors)

    def error(self, code: str, message: str) -> None:
        self._send(error_header(self.request_id, code, message), ())

    def _send(self, header: dict, tensors) -> None:
        if not self.answered and self.transport is not None:
            self.answered = True
            write_message(self.transport, header, tensors)


# handler(message, connection, responder): validates at once, answers now or later through responder
Handler = Callable[[Message, "ServerConnection", Responder], None]


class ServerConnection:
    """The server side of one connection. Handlers run straight from the read callback (no task or
    queue per message: each loop hop costs tens of microseconds of the per-hop budget)."""

    def __init__(self, handler: Handler, on_close: Callable[["ServerConnection"], None], max_payload: int):
        self.handler = handler
        self.on_close = on_close
        self.protocol = FrameProtocol(self._on_message, self._on_fatal, self._on_closed, max_payload)
        self.sessions: set[str] = set()  # sessions opened over this connection, freed when it closes
        self.closed = False

    def _on_message(self, message: Message) -> None:
        responder = Responder(self.protocol.transport, message.header.get("id"))
        invalid = message.header.get("_invalid")
        if invalid:
            responder.error(*invalid)
            return
        try:
            self.handler(message, self, responder)
        except ProtocolError as err:
            responder.error(err.code, err.message)
        except Exception as err:  # a bug must not take the donor down; the client gets an error reply
            responder.error("internal", f"{type(err).__name__}: {err}")

    def _on_fatal(self, error: ProtocolError) -> None:
        Responder(self.protocol.transport, None).error(error.code, error.message)
        self.protocol.transport.close()  # the byte stream can no longer be parsed

    def _on_closed(self, exc) -> None:
        self.closed = True
        self.on_close(self)


async def start_server(handler: Handler, host: str, port: int, on_close: Callable[[ServerConnection], None],
                       max_payload: int = DEFAULT_MAX_PAYLOAD_BYTES) -> Listener:
    """Serve `handler` on host:port; every connection waiting is taken at each loop turn (listener.py)."""
    return listen(host, port, lambda: ServerConnection(handler, on_close, max_payload).protocol)
