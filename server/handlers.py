"""Data-plane request handlers of a donor: validate, then hand compute to the BatchingExecutor.

Every request is checked before use (types, layer range, tensor count, dtype, shape, session,
reserved length); a failed check raises ProtocolError, which becomes an error reply to that
request only. Handlers are synchronous: they answer at once, or when their compute is done.
Compute lives in compute.py.
"""

from __future__ import annotations

import time

import torch

from mesh.protocol import Message, ProtocolError, WireTensor, error_header
from mesh.transport import Responder
from server.compute import BatchingExecutor, SessionEnded
from server.forwarding import MAX_CHAIN, Forwarder, parse_forward, tell_owner
from server.sessions import Session, SessionTable
from shards.errors import CacheOverflowError
from shards.shard import Shard

FLOAT_DTYPES = ("float32", "float16", "bfloat16")


class DonorHandlers:
    def __init__(self, shard: Shard, sessions: SessionTable, worker: BatchingExecutor, model_id: str,
                 fingerprint: str = "", max_forward_tokens: int = 8192, describe: dict | None = None, forwarder: Forwarder | None = None):
        self.shard, self.sessions, self.worker = shard, sessions, worker
        self.forwarder = forwarder or Forwarder(sessions)
        self.model_id = model_id
        self.fingerprint = fingerprint
        self.max_forward_tokens = max_forward_tokens
        self.describe = describe or {}
        self.weight_bytes = shard.weight_bytes()
        self.hidden_size = shard.config.hidden_size
        self.routes = {"ping": self.ping, "info": self.info, "open": self.open, "step": self.step,
                       "close": self.close, "forward": self.forward}

    def __call__(self, message: Message, connection, respond: Responder) -> None:
        handler = self.routes.get(message.type)
        if handler is None:
            raise ProtocolError("bad_request", f"unknown message type {message.type!r}; "
                                               f"known: {', '.join(sorted(self.routes))}")
        handler(message, connection, respond)

    def ping(self, message, connection, respond):
        respond.ok({"type": "pong"})

    def info(self, message, connection, respond):
        respond.ok({"type": "info", "model": self.model_id, "config": self.fingerprint, "start": self.shard.start, "end": self.shard.end,
                    "dtype": str(self.shard.dtype).removeprefix("torch."), "sessions": len(self.sessions.sessions),
                    "sessions_opened": self.sessions.opened_total, "free_cache_bytes": self.sessions.free_bytes,
                    "free_cache_tokens": self.sessions.free_tokens(),
                    "cache_budget_bytes": self.sessions.budget_bytes, "weight_bytes": self.weight_bytes,
                    "peak_rss_bytes": process_memory("VmHWM"), "rss_bytes": process_memory("VmRSS"),
                    "compute": {**self.worker.stats.as_dict(), **self.worker.pace.as_dict(self.shard.prefill_chunk_tokens)},
                    "forwarded_steps": self.forwarder.forwarded,
                    **self.describe})

    def open(self, message, connection, respond):
        header = message.header
        start, end = self._layers(header)
        max_length = _int_field(header, "max_length")
        session = self.sessions.open(start, end, max_length, owner=connection)
        connection.sessions.add(session.id)
        respond.ok({"type": "opened", "session": session.id, "reserved_bytes": session.reserved_bytes})

    def step(self, message, connection, respond):
        """One step of a session. A plain step is answered on its connection. A step with "forward"
        hands its output to the next donor instead, and a step handed on by another donor ("tag")
        answers the client that opened the session (forwarding.py)."""
        header = message.header
        trace = _trace_so_far(header)
        # A step handed on by another donor comes over that donor's link, not over the connection
        # that opened the session: its random id is what entitles it.
        handed_on = "tag" in header
        session = self.sessions.get(header.get("session"), owner=None if handed_on else connection)
        position = _int_field(header, "position")
        wire = self._hidden(message, batch=1)
        cache = session.cache
        if position > cache.length:
            raise ProtocolError("bad_request", f"position {position} is ahead of this session's {cache.length} tokens")
        if position + wire.shape[1] > cache.capacity:
            raise ProtocolError("cache_overflow", f"step of {wire.shape[1]} token(s) at position {position} "
                                                  f"exceeds the {cache.capacity} tokens reserved for this session")
        if session.busy:
            raise ProtocolError("bad_request", "this session's previous step has not finished; send steps one at a time")
        deliver = self._delivery(header, session, respond, trace)
        # A decode step goes through the session's reusable buffers, in and out: no torch call
        # between the request's bytes and the shard, one copy between the shard and the reply
        # (benchmarks/cold_path.py).
        decoding = wire.shape[1] == 1
        hidden = session.step_input.load(wire) if decoding else wire.to_torch()
        cache.truncate(position)  # a retried step overwrites what a lost reply had computed
        session.busy = True

        def release(output, error, seconds):
            session.busy = False
            if decoding and output is not None:
                output = session.step_output.store(output)
            deliver(output, error, seconds)

        self.worker.submit(hidden, (session.start, session.end), cache, release, submitter=session)

    def _delivery(self, header: dict, session: Session, respond: Responder, trace: list | None):
        """Where a step's outcome goes: back on its connection (a plain step), on to the next donor
        ("forward"), or to the client that opened the session (the last hop of a forwarded step)."""
        forward = parse_forward(header["forward"]) if "forward" in header else None
        tag = header.get("tag")  # the client's request id, carried along a forwarded step
        if forward is None and tag is None:
            return _reply_with_result(respond, trace)
        compute_ms = header.get("compute_ms", []) if tag is not None else []
        if not isinstance(compute_ms, list) or len(compute_ms) > MAX_CHAIN:
            raise ProtocolError("bad_request", f"'compute_ms' must be a list of at most {MAX_CHAIN} numbers")
        return self._deliver_forwarded(session, header.get("id") if tag is None else tag, compute_ms, forward, trace)

    def _deliver_forwarded(self, session: Session, tag, compute_ms: list, forward: list[dict] | None,
                           trace: list | None):
        """The outcome of a forwarded step: on to the next donor, or to the session's client."""
        def done(output, error, seconds):
            if error is not None:
                tell_owner(session, error_header(tag, *_error_reply(error)))
                return
            extra = {} if trace is None else {"trace": _traced(trace)}
            times = [*compute_ms, round(seconds * 1000, 4)]
            if forward:
                self.forwarder.push(session, tag, times, output, forward, extra)
            else:
                tell_owner(session, {"type": "result", "id": tag, "compute_ms": times, **extra}, [output])
        return done

    def close(self, message, connection, respond):
        session_id = message.header.get("session")
        session = self.sessions.close(session_id) if session_id in connection.sessions else None
        connection.sessions.discard(session_id)
        respond.ok({"type": "closed", "existed": session is not None})

    def forward(self, message, connection, respond):
        start, end = self._layers(message.header)
        wire = self._hidden(message, batch=None)
        if wire.shape[0] * wire.shape[1] > self.max_forward_tokens:
            raise ProtocolError("too_large", f"a forward pass takes at most {self.max_forward_tokens} tokens")
        self.worker.submit(wire.to_torch(), (start, end), None, _reply_with_result(respond))

    def _layers(self, header: dict) -> tuple[int, int]:
        if header.get("model", self.model_id) != self.model_id:
            raise ProtocolError("bad_request", f"this donor serves {self.model_id!r}, not {header.get('model')!r}")
        config = header.get("config")
        if config and self.fingerprint and config != self.fingerprint:
            raise ProtocolError("bad_request", f"this donor serves another model named {self.model_id!r}: its "
                                               f"config fingerprint is {self.fingerprint}, the caller's {config}")
        start = header.get("start", self.shard.start)
        end = header.get("end", self.shard.end)
        if not (isinstance(start, int) and isinstance(end, int) and self.shard.start <= start < end <= self.shard.end):
            raise ProtocolError("bad_request", f"layers [{start}, {end}) are not served here; this donor serves "
                                               f"[{self.shard.start}, {self.shard.end})")
        return start, end

    def _hidden(self, message: Message, batch: int | None) -> WireTensor:
        """The request's hidden states, checked from the header alone: [batch, tokens, hidden], a float dtype."""
        if len(message.wire) != 1:
            raise ProtocolError("bad_tensor", f"expected exactly one tensor (hidden states), got {len(message.wire)}")
        hidden = message.wire[0]
        if hidden.dtype not in FLOAT_DTYPES:
            raise ProtocolError("bad_tensor", f"hidden states must be float32, float16 or bfloat16, not {hidden.dtype}")
        shape = hidden.shape
        if len(shape) != 3 or shape[2] != self.hidden_size or shape[1] < 1 or shape[0] < 1 \
                or (batch is not None and shape[0] != batch):
            expected = f"[{batch if batch else 'batch'}, tokens, {self.hidden_size}]"
            raise ProtocolError("bad_tensor", f"hidden states must have shape {expected}, got {list(shape)}")
        return hidden


def process_memory(field: str) -> int | None:
    """This process's resident memory (VmRSS) or its peak (VmHWM) in bytes; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _trace_so_far(header: dict) -> list | None:
    """A traced step ("trace": true, or the hops so far when handed on) gets this donor's
    [received, sent] perf_counter timestamps appended; None when not traced. perf_counter is the
    system's monotonic clock on Linux, so timestamps of processes on one machine compare."""
    trace = header.get("trace")
    if trace is None or trace is False:
        return None
    if trace is not True and not (isinstance(trace, list) and len(trace) <= MAX_CHAIN):
        raise ProtocolError("bad_request", f"'trace' must be true or a list of at most {MAX_CHAIN} timestamp pairs")
    return [*([] if trace is True else trace), [time.perf_counter()]]


def _traced(trace: list) -> list:
    trace[-1].append(time.perf_counter())
    return trace


def _reply_with_result(respond: Responder, trace: list | None = None):
    def done(output, error, seconds):
        if error is None:
            extra = {} if trace is None else {"trace": _traced(trace)}
            respond.ok({"type": "result", "compute_ms": round(seconds * 1000, 4), **extra}, [output])
        else:
            respond.error(*_error_reply(error))
    return done


def _error_reply(error: Exception) -> tuple[str, str]:
    """(code, message) of the error reply for a compute that failed."""
    if isinstance(error, CacheOverflowError):
        return "cache_overflow", str(error)
    if isinstance(error, SessionEnded):
        return "unknown_session", str(error)
    return "internal", f"{type(error).__name__}: {error}"


def _int_field(header: dict, name: str) -> int:
    value = header.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProtocolError("bad_request", f"field {name!r} must be a non-negative integer, got {value!r}")
    return value
