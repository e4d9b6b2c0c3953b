"""An inference session over a chain of donors, with failover in the middle of a generation.

The client keeps, for every hop boundary, the hidden states it sent across it. When a donor dies,
times out or answers with an error, the session bans it, routes the layers it served to other
donors, replays the stored inputs there to rebuild their caches, and retries the step. Retries are
finite and bounded by a deadline; the last error names the layers that had no donor.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from client.remote import RemoteSpan
from client.swarm import Swarm
from mesh.protocol import WireTensor
from mesh.routing import Hop, NoRouteError
from mesh.transport import ConnectionLost, RemoteError

log = logging.getLogger("mesh.client")
RECOVERABLE = (ConnectionLost, RemoteError, TimeoutError, OSError)


@dataclass
class SessionConfig:
    max_length: int
    request_timeout: float = 30.0  # one request to one donor
    connect_timeout: float = 15.0  # a loaded donor answers a new connection between two batches
    max_failovers: int = 8  # per session
    recovery_deadline: float = 60.0  # to get one step through, failovers included


class MeshSessionError(RuntimeError):
    """A step could not be completed within the session's retries and deadline."""


class RemoteSession:
    """Hidden states in, hidden states out, through the whole chain of layers. One thread at a time."""

    def __init__(self, swarm: Swarm, config: SessionConfig, start: int = 0, end: int | None = None,
                 observer=None):
        self.swarm = swarm
        self.observer = observer
        self.config = config
        self.start = start
        self.end = swarm.num_layers if end is None else end
        self.spans: list[RemoteSpan] = []
        # boundary layer -> chunks sent across it (torch tensors or, between hops, wire tensors)
        self.inputs: dict[int, list[torch.Tensor | WireTensor]] = {}
        self.position = 0
        self.failovers = 0
        self.last_failover_seconds: float | None = None

    @property
    def route(self) -> list[Hop]:
        return [span.hop for span in self.spans]

    def open(self) -> None:
        self.spans = self._connect_chain(self.start, self.end)

    def step(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [1, T, D] at the session's next position -> output of the last layer, [1, T, D]."""
        if self.position + hidden.shape[1] > self.config.max_length:
            raise MeshSessionError(f"step of {hidden.shape[1]} token(s) at position {self.position} exceeds the "
                                   f"session's max_length {self.config.max_length}")
        deadline = time.monotonic() + self.config.recovery_deadline
        index = 0
        x = hidden
        while index < len(self.spans):
            span = self.spans[index]
            started = time.perf_counter()
            try:
                y = span.step(x, self.config.request_timeout)
            except RECOVERABLE as err:
                self._fail_over(index, err, deadline)
                continue  # retry the same step on the replacement hops
            if self.observer is not None:
                self.observer.hop(time.perf_counter() - started)
            self.inputs.setdefault(span.hop.start, []).append(x)
            x = y
            index += 1
        self.position += hidden.shape[1]
        return _as_torch(x)

    def close(self) -> None:
        spans, self.spans = self.spans, []
        _close_all(spans)

    def _fail_over(self, index: int, error: Exception, deadline: float) -> None:
        started = time.monotonic()
        failed = self.spans[index]
        self.failovers += 1
        if self.observer is not None:
            self.observer.failover()
        ban = self.swarm.failed(failed.hop.donor.peer_id)
        log.warning("donor %s failed on layers %d:%d (%s); banned for %.0fs, rerouting",
                    failed.hop.donor.address, failed.hop.start, failed.hop.end, error, ban)
        failed.close()
        if self.failovers > self.config.max_failovers or time.monotonic() > deadline:
            raise MeshSessionError(f"giving up after {self.failovers} failovers; last error from "
                                   f"{failed.hop.donor.address} on layers {failed.hop.start}:{failed.hop.end}: {error}")
        replacement = self._rebuild(failed.hop.start, failed.hop.end, deadline)
        self.spans[index:index + 1] = replacement
        self.last_failover_seconds = time.monotonic() - started

    def _rebuild(self, start: int, end: int, deadline: float) -> list[RemoteSpan]:
        """New hops for [start, end) whose caches hold every token sent so far."""
        while True:
            remaining = deadline - time.monotonic()
            try:
                spans = self._connect_chain(start, end, timeout=max(0.0, remaining))
                self._replay(spans, start)
                return spans
            except NoRouteError:
                raise
            except RECOVERABLE as err:
                self.failovers += 1
                if self.failovers > self.config.max_failovers or time.monotonic() > deadline:
                    raise MeshSessionError(f"could not rebuild layers {start}:{end}: {err}") from None

    def _replay(self, spans: list[RemoteSpan], start: int) -> None:
        if self.position == 0:
            return
        x = torch.cat([_as_torch(chunk) for chunk in self.inputs[start]], dim=1)  # [1, position, D]
        for span in spans:
            try:
                y = span.step(x, self.config.request_timeout)
            except RECOVERABLE:
                self.swarm.failed(span.hop.donor.peer_id)
                _close_all(spans)
                raise
            self.inputs[span.hop.start] = [x]
            x = y

    def _connect_chain(self, start: int, end: int, timeout: float | None = None) -> list[RemoteSpan]:
        """Route [start, end), connect to every hop and open a session on each; bans what fails."""
        deadline = time.monotonic() + (self.swarm.route_timeout if timeout is None else timeout)
        last_error: Exception | None = None
        while True:
            try:
                hops = self.swarm.route(start, end, min_free_tokens=self.config.max_length,
                                        timeout=max(0.0, deadline - time.monotonic()))
            except NoRouteError as err:
                if last_error is None:
                    raise
                raise err.with_note(f"The last donor tried answered: {last_error}") from None
            spans: list[RemoteSpan] = []
            try:
                for hop in hops:
                    span = RemoteSpan.connect(hop, self.config.connect_timeout)
                    spans.append(span)
                    span.open_session(self.config.max_length, self.config.request_timeout)
                    self.swarm.succeeded(hop.donor.peer_id, span.rtt)
                return spans
            except RECOVERABLE as err:
                bad = hops[len(spans) - 1] if spans and spans[-1].session is None else hops[len(spans)]
                self.swarm.failed(bad.donor.peer_id)
                log.warning("cannot use donor %s: %s", bad.donor.address, err)
                last_error = err
                _close_all(spans)
                if time.monotonic() > deadline:
                    raise MeshSessionError(f"no working donors for layers {start}:{end}: {err}") from None


def _as_torch(x: torch.Tensor | WireTensor) -> torch.Tensor:
    return x.to_torch() if isinstance(x, WireTensor) else x


def _close_all(spans: list[RemoteSpan]) -> None:
    for span in spans:
        span.close()
