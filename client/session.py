"""An inference session over a chain of donors, with failover in the middle of a generation.

A step goes through the chain in one of two ways:
- forwarded (the default with two hops or more): the client sends the step to the first donor with
  the rest of the chain attached, each donor hands its output to the next, and the last one answers
  (server/forwarding.py): k + 1 network traversals for k hops, and the client wakes up once;
- relayed: the client sends the step to each donor in turn and carries the output to the next
  one: 2k traversals. Used for one hop, when a donor cannot forward, and to find out which donor is
  slow when a forwarded step timed out.

For failover, the client keeps the hidden states it sent across each hop boundary, as far as it saw
them: relayed steps show it every boundary, forwarded steps only the first. When a donor dies,
times out or answers with an error, the session bans it, routes the layers it served to other
donors, replays the inputs of that boundary there (recomputing them through the hops before it when
forwarded steps skipped it) to rebuild their caches, and retries the step. Retries are finite and
bounded by a deadline; the last error names the layers that had no donor.
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
from mesh.transport import ConnectionLost, Liveness, RemoteError, wait_for_first

log = logging.getLogger("mesh.client")
RECOVERABLE = (ConnectionLost, RemoteError, TimeoutError, OSError)


@dataclass
class SessionConfig:
    max_length: int
    request_timeout: float = 30.0  # one request to one donor (or one forwarded step through all)
    connect_timeout: float = 15.0  # a loaded donor answers a new connection between two batches
    max_failovers: int = 8  # per step: replacing donors that failed (or reopening expired sessions)
    recovery_deadline: float = 60.0  # to get one step through, failovers included
    forwarding: bool = True  # donors hand steps on to each other instead of through the client
    trace: bool = False  # donors time-stamp each step (RemoteSpan.last_trace; benchmarks/hop_latency.py)
    liveness: Liveness = Liveness()  # how soon a donor that froze mid-step is given up (mesh/transport.py)


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
        # boundary layer -> every chunk sent across it (torch tensors or, between hops, wire
        # tensors). Only complete histories are kept: the first boundary's always is.
        self.inputs: dict[int, list[torch.Tensor | WireTensor]] = {}
        self.position = 0
        self.forwarding = config.forwarding
        self._unreachable = False  # a donor could not reach the next one during this step
        self.failovers = 0  # in the session's whole life (statistics)
        self._step_failovers = 0  # in the current step, held against max_failovers
        self.last_failover_seconds: float | None = None
        self.closed = False

    @property
    def route(self) -> list[Hop]:
        return [span.hop for span in self.spans]

    def open(self) -> None:
        self.spans = self._connect_chain(self.start, self.end)

    def step(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [1, T, D] at the session's next position -> output of the last layer, [1, T, D]."""
        if self.closed:
            raise MeshSessionError("this session is closed; open a new one")
        if hidden.shape[1] == 0:
            raise ValueError("a step needs at least one token")
        if self.position + hidden.shape[1] > self.config.max_length:
            raise MeshSessionError(f"step of {hidden.shape[1]} token(s) at position {self.position} exceeds the "
                                   f"session's max_length {self.config.max_length}")
        deadline = time.monotonic() + self.config.recovery_deadline
        self._step_failovers = 0
        output = self._forwarded_step(hidden, deadline) if self.forwarding else None
        if output is None:
            failovers = self.failovers
            output = self._relayed_step(hidden, deadline)
            if self._unreachable and self.failovers == failovers:
                # Relaying went through the hop a donor could not reach: the donors cannot reach
                # each other (firewalls, addresses only the client can dial). Relay from now on.
                log.warning("donors of this chain cannot reach each other; relaying its steps")
                self.forwarding = False
            self._unreachable = False
        self.position += hidden.shape[1]
        return _as_torch(output)

    def close(self) -> None:
        self.closed = True
        spans, self.spans = self.spans, []
        _close_all(spans)

    def _relayed_step(self, hidden: torch.Tensor, deadline: float) -> WireTensor | torch.Tensor:
        index, x, sent = 0, hidden, {}
        while index < len(self.spans):
            span = self.spans[index]
            started = time.perf_counter()
            try:
                y = span.step(x, self.config.request_timeout, self.config.trace, self.config.liveness)
            except RECOVERABLE as err:
                self._fail_over(span, err, deadline)
                # Again from the first hop: a failover may have rebuilt the caches before this one.
                index, x, sent = 0, hidden, {}
                for hop in self.spans:
                    hop.position = self.position
                continue
            if self.observer is not None:
                self.observer.hop(time.perf_counter() - started)
            sent[span.hop.start] = x
            x = y
            index += 1
        for boundary, chunk in sent.items():
            if boundary in self.inputs:
                self.inputs[boundary].append(chunk)
            elif self.position == 0:
                self.inputs[boundary] = [chunk]
        return x

    def _forwarded_step(self, hidden: torch.Tensor, deadline: float) -> WireTensor | None:
        """The step through the chain with donors handing it on; None: relay it instead."""
        while len(self.spans) > 1:
            spans = self.spans
            timeout = self.config.request_timeout
            started = time.perf_counter()
            try:
                tag = spans[0].send_forwarded_step(hidden, spans[1:], timeout, self.config.trace)
                index, outcome = wait_for_first([span.connection for span in spans], tag, timeout,
                                                self.config.liveness)
            except TimeoutError as err:  # someone on the chain is slow (yet answers pings): relaying finds out who
                log.warning("forwarded step timed out (%s); relaying it", err)
                return None
            except RECOVERABLE as err:  # the first donor is gone
                self._fail_over(spans[0], err, deadline)
                continue
            if isinstance(outcome, Exception):  # that donor's connection broke, or the donor froze
                self._fail_over(spans[index], outcome, deadline)
                continue
            header = outcome.header
            if outcome.type == "error":
                if header.get("next_hop_failed") and header.get("code") == "unreachable":
                    # The next donor is dead, or fine but out of this donor's reach: relaying the
                    # step tells which (step()).
                    log.warning("%s; relaying the step", header.get("message"))
                    self._unreachable = True
                    return None
                culprit = spans[min(index + 1, len(spans) - 1)] if header.get("next_hop_failed") else spans[index]
                self._fail_over(culprit, RemoteError(header.get("code", "error"), header.get("message", "")), deadline)
                continue
            if index != len(spans) - 1:  # that donor answered itself: it does not forward steps
                log.warning("donor %s does not forward steps; relaying them", spans[index].hop.donor.address)
                self.forwarding = False
                return None
            try:
                output = spans[-1].check_output(outcome, hidden.shape)
            except RemoteError as err:
                self._fail_over(spans[-1], err, deadline)
                continue
            self._forwarded_step_done(hidden, header, time.perf_counter() - started)
            return output
        return None

    def _forwarded_step_done(self, hidden: torch.Tensor, header: dict, elapsed: float) -> None:
        compute_ms, trace = header.get("compute_ms"), header.get("trace")
        if not (isinstance(compute_ms, list) and len(compute_ms) == len(self.spans)):
            compute_ms = [0.0] * len(self.spans)
        if not (isinstance(trace, list) and len(trace) == len(self.spans)):
            trace = [None] * len(self.spans)
        for span, ms, stamps in zip(self.spans, compute_ms, trace):
            span.position += hidden.shape[1]
            span.last_compute_seconds = ms / 1000 if isinstance(ms, (int, float)) else 0.0
            span.last_trace = stamps
            if self.observer is not None:
                self.observer.hop(elapsed / len(self.spans))  # one time for the whole chain, split evenly
        if self.position == 0:
            self.inputs = {self.start: [hidden]}
        else:
            self.inputs[self.start].append(hidden)
            for boundary in [b for b in self.inputs if b != self.start]:
                del self.inputs[boundary]  # this step did not pass through the client there

    def _out_of_retries(self, deadline: float) -> bool:
        self.failovers += 1
        self._step_failovers += 1
        return self._step_failovers > self.config.max_failovers or time.monotonic() > deadline

    def _fail_over(self, failed: RemoteSpan, error: Exception, deadline: float) -> None:
        started = time.monotonic()
        if self.observer is not None:
            self.observer.failover()
        expired = isinstance(error, RemoteError) and error.code == "session_expired"
        if expired:  # the donor is fine: the session sat idle past its timeout. Reopen, maybe there.
            log.info("session on %s (layers %d:%d) expired while idle; reopening it",
                     failed.hop.donor.address, failed.hop.start, failed.hop.end)
        else:
            ban = self.swarm.failed(failed.hop.donor.peer_id)
            log.warning("donor %s failed on layers %d:%d (%s); banned for %.0fs, rerouting",
                        failed.hop.donor.address, failed.hop.start, failed.hop.end, error, ban)
        failed.close()
        if self._out_of_retries(deadline):
            raise MeshSessionError(f"giving up after {self._step_failovers} failovers in one step; last error from "
                                   f"{failed.hop.donor.address} on layers {failed.hop.start}:{failed.hop.end}: {error}")
        avoid = set() if expired else {failed.hop.donor.peer_id}
        replacement = self._rebuild(failed.hop.start, failed.hop.end, deadline, avoid=avoid)
        index = self.spans.index(failed)  # found again: a nested failover may have changed the chain
        self.spans[index:index + 1] = replacement
        self.last_failover_seconds = time.monotonic() - started

    def _rebuild(self, start: int, end: int, deadline: float, avoid: set[str]) -> list[RemoteSpan]:
        """New hops for [start, end) whose caches hold every token sent so far. Donors that failed
        during this recovery (`avoid`, which grows) are tried again only when no other donor routes:
        their bans start short, and a frozen one costs seconds to find out again."""
        history = self._history_at(start, deadline) if self.position else None
        while True:
            # As long as a new session waits for a route: a stream whose layers lost their last donor
            # ends with that error then, not after the whole recovery deadline of silence.
            remaining = min(deadline - time.monotonic(), self.swarm.route_timeout)
            spans = self._connect_chain(start, end, timeout=max(0.0, remaining), avoid=avoid)
            try:
                self._replay(spans, history, avoid)
                return spans
            except RECOVERABLE as err:
                if self._out_of_retries(deadline):
                    raise MeshSessionError(f"could not rebuild layers {start}:{end}: {err}") from None

    def _history_at(self, boundary: int, deadline: float) -> torch.Tensor:
        """Everything sent across `boundary` so far, [1, position, D]. Where forwarded steps skipped
        the client, it is recomputed from the first boundary through the hops before this one,
        which rebuilds their caches on the way."""
        chunks = self.inputs.get(boundary)
        if chunks is not None:
            return torch.cat([_as_torch(chunk) for chunk in chunks], dim=1)
        x = torch.cat([_as_torch(chunk) for chunk in self.inputs[self.start]], dim=1)
        for span in list(self.spans):
            if span.hop.start >= boundary:
                break
            span.position = 0
            try:
                x = span.step(x, self.config.request_timeout, liveness=self.config.liveness)
            except RECOVERABLE as err:
                self._fail_over(span, err, deadline)  # bounded: each failover counts against the limit
                return self._history_at(boundary, deadline)
            self.inputs[span.hop.end] = [x]
        return _as_torch(x)

    def _replay(self, spans: list[RemoteSpan], history: torch.Tensor | None, avoid: set[str]) -> None:
        """Run the session's past inputs through new hops; bans and closes them if one fails."""
        if history is None:
            return
        x = history
        for span in spans:
            try:
                y = span.step(x, self.config.request_timeout, liveness=self.config.liveness)
            except RECOVERABLE:
                self.swarm.failed(span.hop.donor.peer_id)
                avoid.add(span.hop.donor.peer_id)
                _close_all(spans)
                raise
            self.inputs[span.hop.start] = [x]
            x = y

    def _connect_chain(self, start: int, end: int, timeout: float | None = None,
                       avoid: set[str] | None = None) -> list[RemoteSpan]:
        """Route [start, end), connect to every hop and open a session on each; bans what fails
        (and adds it to `avoid`, see _rebuild)."""
        deadline = time.monotonic() + (self.swarm.route_timeout if timeout is None else timeout)
        avoid = set() if avoid is None else avoid
        last_error: Exception | None = None
        while True:
            try:
                hops = self.swarm.route(start, end, min_free_tokens=self.config.max_length,
                                        timeout=max(0.0, deadline - time.monotonic()), avoid=avoid)
            except NoRouteError as err:
                if last_error is None:
                    raise
                raise err.with_note(f"The last donor tried answered: {last_error}") from None
            spans: list[RemoteSpan] = []
            try:
                for hop in hops:
                    span = RemoteSpan.connect(hop, self.config.connect_timeout, self.config.liveness)
                    spans.append(span)
                    span.open_session(self.config.max_length, self.config.request_timeout, self.config.liveness)
                    self.swarm.succeeded(hop.donor.peer_id, span.rtt)
                return spans
            except RECOVERABLE as err:
                bad = hops[len(spans) - 1] if spans and spans[-1].session is None else hops[len(spans)]
                self.swarm.failed(bad.donor.peer_id)
                avoid.add(bad.donor.peer_id)
                log.warning("cannot use donor %s: %s", bad.donor.address, err)
                last_error = err
                _close_all(spans)
                if time.monotonic() > deadline:
                    # Donors are announced for these layers, yet none answered: to the user, as good as
                    # none serving them (the same error and advice as when none is announced).
                    raise NoRouteError(self.swarm.model_id, [(bad.start, bad.end)],
                                       " that answers (the donors announced for them failed)",
                                       f". The last one tried answered: {err}") from None


def _as_torch(x: torch.Tensor | WireTensor) -> torch.Tensor:
    return x.to_torch() if isinstance(x, WireTensor) else x


def _close_all(spans: list[RemoteSpan]) -> None:
    for span in spans:
        span.close()
