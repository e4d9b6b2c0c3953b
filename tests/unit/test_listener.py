"""The donor's listening socket: connections that arrive together are all answered within a few
turns of a busy event loop, whichever loop runs it; errors while accepting do not stop it."""

import asyncio
import errno
import logging
import threading

import pytest

from mesh.transport import Connection, ConnectionLost, start_server
from tests.unit.server_thread import ServerThread

CLIENTS = 48
ROOM_IN_TURNS = 4  # accept, set the transport up, read: a few turns, however many clients came


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


class TurnCountingServer(ServerThread):
    """A server whose loop counts its turns (a callback that reschedules itself, as the donor's
    batches do) and answers each ping with the turn it was handled in. The first turn blocks until
    `open_gate()`, so that clients can queue up in the kernel meanwhile, as they do behind a batch."""

    def __init__(self, kind: str):
        super().__init__(new_loop(kind))
        self.turn = 0
        self.gate = threading.Event()
        self.gate_turn: int | None = None
        self.stopping = False

    def stop(self):
        self.gate.set()
        self.stopping = True

    async def _main(self):
        def ping(message, connection, respond):
            respond.ok({"type": "pong", "turn": self.turn})

        self.server = await start_server(ping, "127.0.0.1", 0, lambda connection: None)
        self.port = self.server.sockets[0].getsockname()[1]
        self.loop.call_soon(self._next_turn)
        self.ready.set()
        while not self.stopping:
            await asyncio.sleep(0.01)
        self.server.close()

    def _next_turn(self):
        self.turn += 1
        if self.gate_turn is None:
            self.gate.wait(30)  # bounded: the test opens it within seconds
            self.gate_turn = self.turn
        if not self.stopping:
            self.loop.call_soon(self._next_turn)

    def open_gate(self):
        self.gate.set()


@pytest.mark.parametrize("kind", ["uvloop", "asyncio"])
def test_connections_that_arrive_together_are_answered_within_a_few_turns(kind):
    with TurnCountingServer(kind) as server:
        connections = [Connection.open("127.0.0.1", server.port, timeout=10) for _ in range(CLIENTS)]
        try:
            requests = [c.send({"type": "ping"}, timeout=10) for c in connections]
            server.open_gate()
            turns = []
            for connection, request_id in zip(connections, requests):
                connection._set_timeout(30)
                turns.append(connection._receive(request_id).header["turn"] - server.gate_turn)
        finally:
            for connection in connections:
                connection.close()
    # Before the listener, under uvloop, the last of 48 clients waited 48 turns (one accept per turn).
    assert max(turns) <= ROOM_IN_TURNS, sorted(turns)


def test_a_failed_accept_pauses_instead_of_stopping_the_server(monkeypatch, caplog):
    from mesh import listener

    monkeypatch.setattr(listener, "ACCEPT_RETRY_SECONDS", 0.05)
    with TurnCountingServer("uvloop") as server:
        server.open_gate()
        failures = []

        class OutOfDescriptorsOnce:
            """The listening socket, except that its first accept fails as when no descriptor is left."""

            def __init__(self, sock):
                self.sock = sock

            def accept(self):
                if not failures:
                    failures.append(errno.EMFILE)
                    raise OSError(errno.EMFILE, "Too many open files")
                return self.sock.accept()

            def __getattr__(self, name):
                return getattr(self.sock, name)

        server.server._sock = OutOfDescriptorsOnce(server.server._sock)
        with caplog.at_level(logging.WARNING, logger="mesh.listener"):
            connection = Connection.open("127.0.0.1", server.port, timeout=10)
            try:
                reply = connection.request({"type": "ping"}, timeout=10)
            finally:
                connection.close()
        assert reply.header["type"] == "pong"
        assert failures == [errno.EMFILE]
        assert "cannot accept connections" in caplog.text and "Too many open files" in caplog.text


def test_a_closed_server_refuses_new_connections():
    with TurnCountingServer("asyncio") as server:
        server.open_gate()
        port = server.port
        server.loop.call_soon_threadsafe(server.server.close)
        closed = threading.Event()
        server.loop.call_soon_threadsafe(closed.set)
        assert closed.wait(10)
        with pytest.raises(ConnectionLost, match="cannot connect"):
            Connection.open("127.0.0.1", port, timeout=5)


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "0.0.0.0"])
def test_a_donor_host_name_listens_where_clients_on_this_machine_reach_it(host):
    async def serve_one_ping():
        def ping(message, connection, respond):
            respond.ok({"type": "pong"})

        server = await start_server(ping, host, 0, lambda connection: None)
        port = server.sockets[0].getsockname()[1]
        try:
            connection = await asyncio.to_thread(Connection.open, "127.0.0.1", port, 5)
            reply = await asyncio.to_thread(connection.request, {"type": "ping"}, (), 5)
            connection.close()
            return reply.header["type"]
        finally:
            server.close()

    assert asyncio.run(serve_one_ping()) == "pong"
