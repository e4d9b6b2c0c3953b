"""Inference sessions of one donor: a KV cache per session, reserved against a byte budget.

A session's whole cache is reserved (and allocated) when it opens, so a donor never runs out of
memory halfway through someone's answer: it refuses new sessions instead, with the numbers.
Sessions close explicitly, when their connection closes, or after `idle_timeout` without use.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mesh.protocol import DTYPE_NAMES, ProtocolError, WireTensor
from shards.kv_cache import KVCache
from shards.shard import Shard


class StepBuffer:
    """One decode step's tensor of a session, allocated once and refilled at every step.

    Building a tensor over each request's bytes, or bytes over each output tensor, takes several
    torch and numpy calls, and each can cost 10-20 times its warm price when the donor's caches are
    cold (`python -m benchmarks.cold_path`); with these buffers a decode step takes none on the way
    in (a memory copy) and one on the way out (a torch copy, right after the shard ran). Steps of one
    session never overlap, so one buffer per direction and session is enough; batches copy their
    rows out with torch.cat.
    """

    def __init__(self):
        self.key: tuple | None = None
        self.data = bytearray()
        self.tensor: torch.Tensor | None = None

    def _fit(self, dtype: str, shape: tuple[int, ...], nbytes: int) -> None:
        if (dtype, shape) != self.key:
            self.key = (dtype, shape)
            self.data = bytearray(nbytes)
            with torch.inference_mode(False):  # a normal tensor, usable inside and outside inference mode
                self.tensor = WireTensor(dtype, shape, self.data).to_torch()

    def load(self, wire: WireTensor) -> torch.Tensor:
        """The request's bytes as this buffer's tensor (valid until the next load)."""
        self._fit(wire.dtype, wire.shape, len(wire.data))
        self.data[:] = wire.data
        return self.tensor

    def store(self, output: torch.Tensor) -> WireTensor:
        """A copy of `output` in wire form, over this buffer (valid until the next store)."""
        dtype = DTYPE_NAMES[output.dtype]
        self._fit(dtype, tuple(output.shape), output.numel() * output.element_size())
        self.tensor.copy_(output)
        return WireTensor(dtype, self.key[1], self.data)


@dataclass(eq=False)  # compared and hashed by identity: the batching executor keys on sessions
class Session:
    id: str
    start: int
    end: int
    cache: KVCache
    owner: object
    last_used: float = field(default_factory=time.monotonic)
    busy: bool = False  # a step is queued or running
    step_input: StepBuffer = field(default_factory=StepBuffer)
    step_output: StepBuffer = field(default_factory=StepBuffer)

    @property
    def reserved_bytes(self) -> int:
        return self.cache.nbytes


# Ids of sessions closed for idleness that a donor still recognises, so that their owners are told
# why (and reopen without blaming the donor) rather than "unknown session". Bounded: ids are 32 bytes.
REMEMBERED_EXPIRED = 4096


class SessionTable:
    def __init__(self, shard: Shard, budget_bytes: int, idle_timeout: float = 300.0,
                 max_session_tokens: int | None = None, clock: Callable[[], float] = time.monotonic,
                 on_close: Callable[[Session], None] | None = None):
        self.shard = shard
        self.on_close = on_close  # told of every session that ends: closed, its connection lost, or idle
        self.budget_bytes = budget_bytes
        self.idle_timeout = idle_timeout
        self.max_session_tokens = max_session_tokens or getattr(shard.config, "max_position_embeddings", 1 << 20)
        self.clock = clock
        self.sessions: dict[str, Session] = {}
        self.opened_total = 0
        self._expired: OrderedDict[str, None] = OrderedDict()

    @property
    def used_bytes(self) -> int:
        return sum(s.reserved_bytes for s in self.sessions.values())

    @property
    def free_bytes(self) -> int:
        return max(0, self.budget_bytes - self.used_bytes)

    def free_tokens(self) -> int:
        """Tokens a new session over the donor's whole range could still reserve."""
        return self.shard.cache_spec.tokens_for(self.free_bytes)

    def open(self, start: int, end: int, max_length: int, owner: object) -> Session:
        if not self.shard.start <= start < end <= self.shard.end:
            raise ProtocolError("bad_request", f"layers [{start}, {end}) are not served here; this donor serves "
                                               f"[{self.shard.start}, {self.shard.end})")
        if not 1 <= max_length <= self.max_session_tokens:
            raise ProtocolError("bad_request", f"max_length must be between 1 and {self.max_session_tokens}")
        needed = self.shard.cache_spec_for(start, end).nbytes(max_length)
        if needed > self.free_bytes:
            raise ProtocolError("cache_full", f"a session of {max_length} tokens over layers [{start}, {end}) needs "
                                              f"{needed} bytes of cache; {self.free_bytes} of {self.budget_bytes} are free")
        session = Session(uuid.uuid4().hex, start, end, self.shard.new_cache(max_length, (start, end)), owner,
                          self.clock())
        self.sessions[session.id] = session
        self.opened_total += 1
        return session

    def get(self, session_id, owner: object | None) -> Session:
        """The open session `session_id`, if `owner` opened it (None: whoever did)."""
        session = self.sessions.get(session_id) if isinstance(session_id, str) else None
        if session is None and session_id in self._expired:
            raise ProtocolError("session_expired", f"session {session_id} was closed after {self.idle_timeout:g} s "
                                                   "without a step (the donor's --idle-timeout); open a new one")
        if session is None or (owner is not None and session.owner is not owner):
            raise ProtocolError("unknown_session", f"no open session {session_id!r} on this connection "
                                                   "(it was closed, timed out, or never opened)")
        session.last_used = self.clock()
        return session

    def close(self, session_id: str) -> Session | None:
        """Forget a session; the one closed, or None if there was none."""
        session = self.sessions.get(session_id) if isinstance(session_id, str) else None
        if session is not None:
            self._end([session_id])
        return session

    def close_owned_by(self, owner: object) -> int:
        return len(self._end([sid for sid, s in self.sessions.items() if s.owner is owner]))

    def expire_idle(self) -> list[str]:
        cutoff = self.clock() - self.idle_timeout
        expired = self._end([sid for sid, s in self.sessions.items() if s.last_used < cutoff])
        for sid in expired:
            self._expired[sid] = None
        while len(self._expired) > REMEMBERED_EXPIRED:
            self._expired.popitem(last=False)
        return expired

    def _end(self, doomed: list[str]) -> list[str]:
        for sid in doomed:
            session = self.sessions.pop(sid)
            if self.on_close is not None:
                self.on_close(session)
        return doomed
