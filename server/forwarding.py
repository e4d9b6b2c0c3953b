"""Forwarded steps: a donor pushes its output straight to the next donor of the client's chain.

Without forwarding, every hop of a decode step is a round trip through the client: 2k network
traversals for k donors, and the client wakes up, parses and re-sends between every two of them.
With it, the client sends the step to the first donor with the rest of its chain attached
(`"forward": [{"address", "session", "position"}, ...]`), each donor sends its output to the
next one over a donor-to-donor link, and the last donor writes the result on the client's own
connection to it: k + 1 traversals, and the client wakes once.

Who tells the client what, all under the client's request id (the step's "tag"):
- the last donor: the result, with every donor's compute time ("compute_ms", one per hop);
- a donor whose own work failed: an error, on the client's connection to it;
- a donor that could not hand its output on (no link, or the next donor refused the step): an
  error marked "next_hop_failed", so the client knows which hop to replace.
A donor that dies says nothing, but the client sees its connection close.

A session id is a 128-bit random secret; a forwarded step names it, so whoever knows it (the
client, and the donors before this one in its chain) can step that session from another connection.
A donor dials whatever address a step names, within LINK_CONNECT_TIMEOUT, and sends it nothing but
mesh frames; a client that does not want its activations to pass between donors unseen (to check
each donor's output, say) relays its steps instead (`forwarding=False`).
"""

from __future__ import annotations

import asyncio
import logging

from mesh.protocol import DEFAULT_MAX_PAYLOAD_BYTES, Message, ProtocolError, encode, error_header
from mesh.transport import FrameProtocol, write_message
from server.sessions import Session, SessionTable

log = logging.getLogger("mesh.donor")

MAX_CHAIN = 64  # hops a forwarded step may still name (and the per-hop lists it carries)
LINK_CONNECT_TIMEOUT = 5.0  # seconds to reach the next donor before the client is told it failed


def parse_forward(value) -> list[dict]:
    """The rest of the chain a step names, checked: [{"address": "host:port", "session", "position"}]."""
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_CHAIN:
        raise ProtocolError("bad_request", f"'forward' must be a list of 1 to {MAX_CHAIN} hops")
    for hop in value:
        address = hop.get("address") if isinstance(hop, dict) else None
        host, _, port = address.rpartition(":") if isinstance(address, str) else ("", "", "")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ProtocolError("bad_request", f"each forward hop needs an 'address' host:port, got {address!r}")
        if not isinstance(hop.get("session"), str):
            raise ProtocolError("bad_request", "each forward hop needs its 'session' id")
        position = hop.get("position")
        if not isinstance(position, int) or isinstance(position, bool) or position < 0:
            raise ProtocolError("bad_request", "each forward hop needs a non-negative integer 'position'")
    return value


def tell_owner(session: Session, header: dict, tensors=()) -> None:
    """Write a message on the connection of the client that opened `session` (if still open)."""
    transport = getattr(getattr(session.owner, "protocol", None), "transport", None)
    if transport is not None:
        write_message(transport, header, tensors)


class Forwarder:
    """The donor's links to the donors after it in its clients' chains, one per address."""

    def __init__(self, sessions: SessionTable, max_payload: int = DEFAULT_MAX_PAYLOAD_BYTES):
        self.sessions = sessions
        self.max_payload = max_payload
        self.links: dict[str, _Link] = {}
        self.forwarded = 0  # steps handed on (statistics)

    def push(self, session: Session, tag, compute_ms: list, output, forward: list[dict], extra: dict) -> None:
        """Send `output` as the next hop's step. Its errors come back under [session id, tag]."""
        target, rest = forward[0], forward[1:]
        header = {"type": "step", "session": target["session"], "position": target["position"], "tag": tag,
                  "compute_ms": compute_ms, "id": [session.id, tag], **extra}
        if rest:
            header["forward"] = rest
        link = self.links.get(target["address"])
        if link is None or link.closed:
            link = self.links[target["address"]] = _Link(target["address"], self)
        link.send(header, [output])
        self.forwarded += 1

    def next_hop_failed(self, request_id, code: str, message: str) -> None:
        """The next donor refused a step we handed on, or could not be reached: tell that step's client."""
        if not (isinstance(request_id, list) and len(request_id) == 2):
            return
        session = self.sessions.sessions.get(request_id[0])
        if session is not None:
            tell_owner(session, {**error_header(request_id[1], code, message), "next_hop_failed": True})

    def close(self) -> None:
        for link in list(self.links.values()):
            link.close()
        self.links.clear()


class _Link:
    """One outgoing connection to another donor. Steps sent while it connects wait in order."""

    def __init__(self, address: str, forwarder: Forwarder):
        self.address = address
        self.forwarder = forwarder
        self.transport: asyncio.Transport | None = None
        self.waiting: list[tuple[dict, bytes]] = []
        self.closed = False
        asyncio.get_running_loop().create_task(self._connect())

    def send(self, header: dict, tensors) -> None:
        if self.transport is not None:
            write_message(self.transport, header, tensors)
        else:  # a copy: the output buffer is reused by the session's next step
            self.waiting.append((header, b"".join(encode(header, tensors))))

    async def _connect(self) -> None:
        host, _, port = self.address.rpartition(":")
        loop = asyncio.get_running_loop()
        protocol = FrameProtocol(self._on_message, self._on_fatal, self._on_closed, self.forwarder.max_payload)
        try:
            transport, _ = await asyncio.wait_for(
                loop.create_connection(lambda: protocol, host.strip("[]"), int(port)), LINK_CONNECT_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as err:
            self._fail(f"cannot reach the next donor {self.address}: {err or type(err).__name__}")
            return
        if self.closed:
            transport.close()
            return
        self.transport = transport
        waiting, self.waiting = self.waiting, []
        for _, frame in waiting:
            transport.write(frame)

    def _on_message(self, message: Message) -> None:
        if message.type == "error":  # the next donor refused a step: the client must hear of it
            self.forwarder.next_hop_failed(message.header.get("id"), message.header.get("code", "error"),
                                           f"{self.address}: {message.header.get('message', '')}")

    def _on_fatal(self, error: ProtocolError) -> None:
        log.warning("donor %s sent a malformed frame: %s", self.address, error.message)
        self.close()

    def _on_closed(self, exc) -> None:
        # Steps in flight are not reported here: if the next donor died, its own client connection
        # closed too, and the client sees that. The next push reconnects.
        self.closed = True
        self.transport = None

    def _fail(self, reason: str) -> None:
        self.closed = True
        waiting, self.waiting = self.waiting, []
        for header, _ in waiting:
            self.forwarder.next_hop_failed(header["id"], "unreachable", reason)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()
            self.transport = None
