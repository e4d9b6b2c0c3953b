"""A client waiting for an answer tells a frozen peer (it keeps its connections open but answers
nothing, not even a ping) from a busy one (it answers pings while it works): the first is given up
within `probe_after + answer_within`, the second is waited for as long as the request's timeout."""

from __future__ import annotations

import asyncio
import socket

import pytest

from mesh.transport import Connection, Liveness, Unresponsive, start_server, wait_for_first
from tests.unit.server_thread import ServerThread

QUICK = Liveness(probe_after=0.05, answer_within=0.3)
PATIENT_TIMEOUT = 20.0  # a request timeout far beyond what these tests should ever wait


class SlowServer(ServerThread):
    """Answers pings at once and a "work" request after `work_seconds`, on its own event loop."""

    def __init__(self, work_seconds: float):
        super().__init__(asyncio.new_event_loop())
        self.work_seconds = work_seconds
        self.pings = 0

    def stop(self):
        self.loop.call_soon_threadsafe(self.stopped.set)

    async def _main(self):
        def handle(message, connection, respond):
            if message.type == "ping":
                self.pings += 1
                respond.ok({"type": "pong"})
            else:
                self.loop.call_later(self.work_seconds, respond.ok, {"type": "done"})

        self.stopped = asyncio.Event()
        server = await start_server(handle, "127.0.0.1", 0, lambda connection: None)
        self.port = server.sockets[0].getsockname()[1]
        self.ready.set()
        await self.stopped.wait()
        server.close()


@pytest.fixture
def frozen_peer():
    """A port whose peer never reads or answers: the kernel completes connections and buffers what
    is sent, as it does for a process stopped with SIGSTOP."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


@pytest.mark.parametrize("timeout", [PATIENT_TIMEOUT, None])
def test_a_frozen_peer_is_given_up_after_an_unanswered_ping(frozen_peer, timeout):
    connection = Connection.open("127.0.0.1", frozen_peer)
    with pytest.raises(Unresponsive, match=r"answered no ping within 0.3s"):
        connection.request({"type": "work"}, timeout=timeout, liveness=QUICK)
    assert connection.is_closed  # a reply may still be owed on it: never reused


def test_a_busy_peer_that_answers_pings_is_waited_for():
    with SlowServer(work_seconds=4 * QUICK.answer_within) as server:
        connection = Connection.open("127.0.0.1", server.port)
        reply = connection.request({"type": "work"}, timeout=PATIENT_TIMEOUT, liveness=QUICK)
        assert reply.type == "done"
        assert server.pings >= 2  # it was asked, answered, and asked again
        assert connection.request({"type": "ping"}, timeout=5).type == "pong"  # pongs did not pile up
        connection.close()


def test_without_liveness_nothing_is_pinged():
    with SlowServer(work_seconds=0.3) as server:
        connection = Connection.open("127.0.0.1", server.port)
        assert connection.request({"type": "work"}, timeout=PATIENT_TIMEOUT).type == "done"
        assert server.pings == 0
        connection.close()


def test_the_frozen_donor_of_a_chain_is_named(frozen_peer):
    """A forwarded step: the request went to the first connection, the answer is owed by the last;
    the one in the middle froze."""
    with SlowServer(work_seconds=PATIENT_TIMEOUT) as first, SlowServer(work_seconds=PATIENT_TIMEOUT) as last:
        chain = [Connection.open("127.0.0.1", first.port), Connection.open("127.0.0.1", frozen_peer),
                 Connection.open("127.0.0.1", last.port)]
        tag = chain[0].send({"type": "work"})
        index, outcome = wait_for_first(chain, tag, PATIENT_TIMEOUT, QUICK)
        assert index == 1 and isinstance(outcome, Unresponsive)
        assert not chain[0].is_closed and not chain[2].is_closed  # the live ones stay usable
        for connection in chain:
            connection.close()
