"""The client's view of the swarm: donor records (from the DHT or a fixed list), measured round
trips, bans, and routes that wait a bounded time for missing layers to appear."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from mesh.bans import BanList
from mesh.records import DonorRecord
from mesh.routing import Hop, NoRouteError, find_chain


class Swarm:
    """Shared by every session of a client; safe to use from several threads."""

    def __init__(self, model_id: str, num_layers: int, fetch: Callable[[], list[DonorRecord]],
                 refresh_interval: float = 2.0, route_timeout: float = 10.0, bans: BanList | None = None):
        self.model_id = model_id
        self.num_layers = num_layers
        self._fetch = fetch
        self.refresh_interval = refresh_interval
        self.route_timeout = route_timeout
        self.bans = bans or BanList()
        self.rtt: dict[str, float] = {}
        self._records: list[DonorRecord] = []
        self._fetched_at = float("-inf")
        self._lock = threading.Lock()

    @classmethod
    def from_dht(cls, dht, model_id: str, num_layers: int, **kwargs) -> "Swarm":
        from mesh.dht import fetch_records

        return cls(model_id, num_layers, lambda: fetch_records(dht, model_id), **kwargs)

    def records(self, force: bool = False) -> list[DonorRecord]:
        with self._lock:
            if force or time.monotonic() - self._fetched_at > self.refresh_interval:
                self._records = self._fetch()
                self._fetched_at = time.monotonic()
            return self._records

    def route(self, start: int, end: int, min_free_tokens: int = 0, timeout: float | None = None) -> list[Hop]:
        """The fastest chain over [start, end) now; waits up to `timeout` for donors to appear."""
        deadline = time.monotonic() + (self.route_timeout if timeout is None else timeout)
        force = False
        while True:
            records = self.records(force=force)
            with self._lock:
                banned = self.bans.banned(time.monotonic())
                rtt = dict(self.rtt)
            try:
                return find_chain(self.model_id, records, start, end, rtt=rtt, banned=banned,
                                  min_free_tokens=min_free_tokens)
            except NoRouteError:
                if time.monotonic() >= deadline:
                    raise
            force = True
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))

    def failed(self, peer_id: str) -> float:
        with self._lock:
            return self.bans.ban(peer_id, time.monotonic())

    def succeeded(self, peer_id: str, rtt: float | None = None) -> None:
        with self._lock:
            self.bans.succeeded(peer_id)
            if rtt is not None:
                self.rtt[peer_id] = rtt
