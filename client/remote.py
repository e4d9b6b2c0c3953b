"""One hop of a chain: a connection to a donor and, optionally, an open inference session on it."""

from __future__ import annotations

import time

import torch

from mesh.protocol import WireTensor
from mesh.routing import Hop
from mesh.transport import Connection, RemoteError


class RemoteSpan:
    """Layers [hop.start, hop.end) on hop.donor, reached over a direct connection."""

    def __init__(self, hop: Hop, connection: Connection, rtt: float):
        self.hop = hop
        self.connection = connection
        self.rtt = rtt
        self.session: str | None = None
        self.position = 0  # tokens this hop's session holds
        self.last_compute_seconds = 0.0  # the donor's own compute time for the last request

    @classmethod
    def connect(cls, hop: Hop, timeout: float) -> "RemoteSpan":
        host, port = hop.donor.host_port
        connection = Connection.open(host, port, timeout=timeout)
        started = time.perf_counter()
        connection.request({"type": "ping"}, timeout=timeout)
        return cls(hop, connection, time.perf_counter() - started)

    def open_session(self, max_length: int, timeout: float) -> None:
        reply = self.connection.request(
            {"type": "open", "model": self.hop.donor.model, "start": self.hop.start, "end": self.hop.end,
             "max_length": max_length}, timeout=timeout)
        self.session = reply.header["session"]
        self.position = 0

    def step(self, hidden: torch.Tensor | WireTensor, timeout: float) -> WireTensor:
        """Run hidden [1, T, D] through this hop's session; its cache grows by T.

        The result stays in wire form: the next hop takes it as it is, and only the last one is
        turned into a torch tensor (by the caller)."""
        reply = self.connection.request(
            {"type": "step", "session": self.session, "position": self.position}, [hidden], timeout=timeout)
        if len(reply.wire) != 1 or reply.wire[0].shape != tuple(hidden.shape):
            raise RemoteError("bad_reply", f"{self.hop.donor.address} answered a step of shape "
                                           f"{list(hidden.shape)} with {[w.spec for w in reply.wire]}")
        self.position += hidden.shape[1]
        self.last_compute_seconds = reply.header.get("compute_ms", 0.0) / 1000
        return reply.wire[0]

    def forward(self, hidden: torch.Tensor, timeout: float) -> torch.Tensor:
        reply = self.connection.request(
            {"type": "forward", "model": self.hop.donor.model, "start": self.hop.start, "end": self.hop.end},
            [hidden], timeout=timeout)
        return reply.tensors[0]

    def close(self) -> None:
        if self.session is not None and not self.connection.is_closed:
            try:
                self.connection.request({"type": "close", "session": self.session}, timeout=2.0)
            except Exception:
                pass  # closing the connection frees the session on the donor anyway
        self.connection.close()
