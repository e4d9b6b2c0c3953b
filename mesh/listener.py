"""A listening socket that takes every waiting connection at each turn of the event loop.

Why not `loop.create_server`: under uvloop (the donor's loop, transport.install_fast_event_loop),
libuv accepts one connection per turn of the loop (libuv pull request 3696, 2022). A donor's turn
can last a whole decode batch, hundreds of milliseconds on a CPU, so the k-th of many clients
that connect together waits about k turns for its first reply. With 64 clients against a mid-size
float32 donor, some sessions waited past the client's 15 s connect timeout and failed (2 of about
12 runs of `benchmarks.concurrency --size mid --sessions 64`). Taking every waiting connection in
the same turn makes each one wait a few turns, however many arrive together:
`benchmarks.connect_burst` measures both side by side (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable

log = logging.getLogger(__name__)

BACKLOG = 1024  # connections the kernel holds for us while a long turn runs
ACCEPT_RETRY_SECONDS = 0.5  # after accept failed for lack of resources (file descriptors, memory)


class Listener:
    """Accepts on `sock` and gives each connection a transport and a protocol from `protocol_factory`.

    `sockets` and `close()` mirror asyncio.Server, the two things its callers use."""

    def __init__(self, sock: socket.socket, protocol_factory: Callable[[], asyncio.BaseProtocol],
                 loop: asyncio.AbstractEventLoop):
        self._sock = sock
        self._protocol_factory = protocol_factory
        self._loop = loop
        self._starting: set[asyncio.Task] = set()  # connections whose transport is being set up
        self._closed = False
        self._resume: asyncio.TimerHandle | None = None
        loop.add_reader(sock.fileno(), self._accept_waiting)

    @property
    def sockets(self) -> list[socket.socket]:
        return [self._sock]

    def _accept_waiting(self) -> None:
        for _ in range(BACKLOG):
            try:
                connection, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return  # none left
            except ConnectionAbortedError:
                continue  # the client gave up while it waited; take the next one
            except OSError as err:
                # Out of file descriptors, most likely. The socket stays readable, so retrying at
                # once would spin; pause, and serve the connections we have meanwhile.
                log.warning("cannot accept connections (%s); trying again in %gs", err, ACCEPT_RETRY_SECONDS)
                self._pause()
                return
            self._adopt(connection)

    def _adopt(self, connection: socket.socket) -> None:
        connection.setblocking(False)
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # one-token steps are small
        task = self._loop.create_task(self._loop.connect_accepted_socket(self._protocol_factory, connection))
        self._starting.add(task)
        task.add_done_callback(lambda done: self._started(done, connection))

    def _started(self, task: asyncio.Task, connection: socket.socket) -> None:
        self._starting.discard(task)
        if task.cancelled():
            connection.close()
        elif task.exception() is not None:
            log.warning("could not set up an accepted connection: %s", task.exception())
            connection.close()

    def _pause(self) -> None:
        self._loop.remove_reader(self._sock.fileno())
        self._resume = self._loop.call_later(ACCEPT_RETRY_SECONDS, self._listen_again)

    def _listen_again(self) -> None:
        self._resume = None
        if not self._closed:
            self._loop.add_reader(self._sock.fileno(), self._accept_waiting)

    def close(self) -> None:
        """Stop accepting; connections already set up stay open (as with asyncio.Server.close)."""
        if self._closed:
            return
        self._closed = True
        if self._resume is not None:
            self._resume.cancel()
        else:
            self._loop.remove_reader(self._sock.fileno())
        for task in list(self._starting):
            task.cancel()
        self._sock.close()


def listen(host: str, port: int, protocol_factory: Callable[[], asyncio.BaseProtocol]) -> Listener:
    """Listen on host:port (port 0: any free one) from the running loop. A name with both IPv4 and
    IPv6 addresses ("localhost") listens on its IPv4 one, the address the donor announces."""
    addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = min(addresses, key=lambda info: info[0] != socket.AF_INET)
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart at once on the same port
        sock.bind(address)
        sock.listen(BACKLOG)
        sock.setblocking(False)
        return Listener(sock, protocol_factory, asyncio.get_running_loop())
    except BaseException:
        sock.close()
        raise


def ensure_port_free(host: str, port: int, what: str) -> None:
    """Raise OSError(EADDRINUSE) with a message for people if something listens on host:port already.
    Checked before slow work (loading a model), and for the DHT, whose libp2p daemon would share
    the port with another (it sets SO_REUSEPORT) and split the peers that join between the two."""
    if not port:
        return
    for family, kind, proto, _, address in socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE):
        with socket.socket(family, kind, proto) as probe:
            # As the listener itself will: connections of a previous run still in TIME_WAIT (a donor
            # killed and restarted) do not hold the port; a live listener still does.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as err:
                if err.errno == errno.EADDRINUSE:
                    raise OSError(errno.EADDRINUSE, f"{what} port {port} is already in use on {host}: "
                                                    "stop what uses it, or choose another port (0 picks a free one)")
                raise
