"""One hop of a chain: a connection to a donor and, optionally, an open inference session on it."""

from __future__ import annotations

import time

import torch

from mesh.protocol import Message, WireTensor
from mesh.routing import Hop
from mesh.transport import Connection, Liveness, RemoteError


class RemoteSpan:
    """Layers [hop.start, hop.end) on hop.donor, reached over a direct connection."""

    def __init__(self, hop: Hop, connection: Connection, rtt: float):
        self.hop = hop
        self.connection = connection
        self.rtt = rtt
        self.session: str | None = None
        self.position = 0  # tokens this hop's session holds
        self.last_compute_seconds = 0.0  # the donor's own compute time for the last request
        self.last_trace: list | None = None  # [received, sent] on the donor's clock, for traced steps

    @classmethod
    def connect(cls, hop: Hop, timeout: float, liveness: Liveness | None = None) -> "RemoteSpan":
        """Connect and ping. A frozen donor's kernel still completes the connection: only `liveness`
        tells it from a loaded donor, which answers within a few of its batches."""
        host, port = hop.donor.host_port
        connection = Connection.open(host, port, timeout=timeout)
        started = time.perf_counter()
        connection.request({"type": "ping"}, timeout=timeout, liveness=liveness)
        return cls(hop, connection, time.perf_counter() - started)

    def _target(self) -> dict:
        """Which model and layers a request is for. The swarm routes only to records whose config
        fingerprint is the client's own; sending it lets a donor that restarted with another model
        behind the same address (its old record not yet expired) refuse instead of computing."""
        donor = self.hop.donor
        return {"model": donor.model, "config": donor.config, "start": self.hop.start, "end": self.hop.end}

    def open_session(self, max_length: int, timeout: float, liveness: Liveness | None = None) -> None:
        reply = self.connection.request({"type": "open", **self._target(), "max_length": max_length},
                                        timeout=timeout, liveness=liveness)
        self.session = reply.header["session"]
        self.position = 0

    def step(self, hidden: torch.Tensor | WireTensor, timeout: float, trace: bool = False,
             liveness: Liveness | None = None) -> WireTensor:
        """Run hidden [1, T, D] through this hop's session; its cache grows by T.

        The result stays in wire form: the next hop takes it as it is, and only the last one is
        turned into a torch tensor (by the caller). `trace`: have the donor report when it
        received the step and sent the answer (`last_trace`)."""
        header = {"type": "step", "session": self.session, "position": self.position}
        if trace:
            header["trace"] = True
        reply = self.connection.request(header, [hidden], timeout=timeout, liveness=liveness)
        output = self.check_output(reply, hidden.shape)
        self.position += hidden.shape[1]
        compute_ms = reply.header.get("compute_ms", 0.0)
        self.last_compute_seconds = compute_ms / 1000 if isinstance(compute_ms, (int, float)) else 0.0
        if trace:
            self.last_trace = (reply.header.get("trace") or [None])[-1]
        return output

    def send_forwarded_step(self, hidden: torch.Tensor | WireTensor, rest: list["RemoteSpan"], timeout: float,
                            trace: bool = False) -> int:
        """Send a step that this donor hands on through `rest` (server/forwarding.py); its request id,
        under which the last of `rest` answers."""
        forward = [{"address": span.hop.donor.address, "session": span.session, "position": span.position}
                   for span in rest]
        header = {"type": "step", "session": self.session, "position": self.position, "forward": forward}
        if trace:
            header["trace"] = True
        return self.connection.send(header, [hidden], timeout=timeout)

    def check_output(self, reply: Message, shape) -> WireTensor:
        """A step's result: one tensor of the input's shape, or RemoteError."""
        if len(reply.wire) != 1 or reply.wire[0].shape != tuple(shape):
            raise RemoteError("bad_reply", f"{self.hop.donor.address} answered a step of shape "
                                           f"{list(shape)} with {[w.spec for w in reply.wire]}")
        return reply.wire[0]

    def forward(self, hidden: torch.Tensor, timeout: float, liveness: Liveness | None = None) -> torch.Tensor:
        reply = self.connection.request({"type": "forward", **self._target()}, [hidden], timeout=timeout,
                                        liveness=liveness)
        return reply.tensors[0]

    def close(self) -> None:
        if self.session is not None and not self.connection.is_closed:
            try:
                self.connection.request({"type": "close", "session": self.session}, timeout=2.0)
            except Exception:
                pass  # closing the connection frees the session on the donor anyway
        self.connection.close()
