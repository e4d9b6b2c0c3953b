"""The client's view of the swarm: donor records (from the DHT), measured round
trips, bans, and routes that wait a bounded time for missing layers to appear."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from mesh.bans import BanList
from mesh.dht import Announcement
from mesh.records import DonorRecord
from mesh.routing import Hop, NoRouteError, find_chain

log = logging.getLogger("mesh.client")


class Swarm:
    """Shared by every session of a client; safe to use from several threads."""

    def __init__(self, model_id: str, num_layers: int, fetch: Callable[[], list[Announcement]],
                 refresh_interval: float = 2.0, route_timeout: float = 10.0, bans: BanList | None = None,
                 clock: Callable[[], float] = time.time, fingerprint: str = ""):
        self.model_id = model_id
        self.fingerprint = fingerprint  # of the client's config.json; "" routes to any donor of the name
        self.num_layers = num_layers
        self._fetch = fetch
        self._clock = clock  # the DHT's clock, which announcements' expiration times are on
        self.refresh_interval = refresh_interval
        self.route_timeout = route_timeout
        self.bans = bans or BanList()
        self.rtt: dict[str, float] = {}
        self._known: dict[str, Announcement] = {}  # peer id -> its latest announcement seen
        self._fetched_at = float("-inf")
        self._refreshing = False  # a background read of the DHT is under way
        self._lock = threading.Lock()

    @classmethod
    def from_dht(cls, dht, model_id: str, num_layers: int, **kwargs) -> "Swarm":
        from mesh.dht import dht_time, fetch_announcements

        return cls(model_id, num_layers, lambda: fetch_announcements(dht, model_id), clock=dht_time, **kwargs)

    def records(self, force: bool = False) -> list[DonorRecord]:
        """Donors whose latest announcement seen has not expired or been withdrawn. `force`: read the
        DHT first. Otherwise a read that is due runs in the background and this answers at once from
        what is known: a DHT read waits seconds for a frozen peer, and a failover must not."""
        if force or self._fetched_at == float("-inf"):
            self._refresh()
        elif time.monotonic() - self._fetched_at > self.refresh_interval:
            with self._lock:
                start = not self._refreshing
                self._refreshing = True
            if start:
                threading.Thread(target=self._refresh, name="mesh-swarm-refresh", daemon=True).start()
        with self._lock:
            now = self._clock()
            return [a.record for a in self._known.values() if a.record is not None and a.expires_at > now]

    def _refresh(self) -> None:
        try:
            announcements = self._fetch()
        except Exception as err:  # noqa: BLE001 - a DHT being shut down, or a hiccup: keep what is known
            log.debug("reading the DHT failed: %s", err)
            announcements = []
        with self._lock:
            self._remember(announcements)
            self._fetched_at = time.monotonic()
            self._refreshing = False

    def _remember(self, announcements: list[Announcement]) -> None:
        """Merge a DHT read into what is known. A donor missing from one read stays until its last
        announcement expires: reads come back incomplete, even empty, while some DHT peer is frozen
        (mesh/dht.py), and forgetting every donor then would fail every route for nothing."""
        for announcement in announcements:
            known = self._known.get(announcement.peer_id)
            if known is None or announcement.expires_at >= known.expires_at:
                self._known[announcement.peer_id] = announcement
        now = self._clock()
        for peer_id in [p for p, a in self._known.items() if a.expires_at <= now]:
            del self._known[peer_id]

    def route(self, start: int, end: int, min_free_tokens: int = 0, timeout: float | None = None,
              avoid: set[str] = frozenset()) -> list[Hop]:
        """The fastest chain over [start, end) now; waits up to `timeout` for donors to appear.
        Donors in `avoid` (peer ids that just failed this caller) are used only if nothing else routes."""
        deadline = time.monotonic() + (self.route_timeout if timeout is None else timeout)
        force = False
        while True:
            records, strangers = self._split_by_config(self.records(force=force))
            with self._lock:
                banned = self.bans.banned(time.monotonic())
                rtt = dict(self.rtt)
            try:
                try:
                    return find_chain(self.model_id, records, start, end, rtt=rtt, banned=banned | avoid,
                                      min_free_tokens=min_free_tokens)
                except NoRouteError:
                    if not avoid:
                        raise
                    return find_chain(self.model_id, records, start, end, rtt=rtt, banned=banned,
                                      min_free_tokens=min_free_tokens)
            except NoRouteError as err:
                if time.monotonic() >= deadline:
                    raise self._explain_strangers(err, strangers) from None
            force = True
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))

    def _split_by_config(self, records: list[DonorRecord]) -> tuple[list[DonorRecord], list[DonorRecord]]:
        """(donors of the client's model, donors of another model announced under the same name).
        Records of older donors carry no fingerprint and are trusted."""
        if not self.fingerprint:
            return records, []
        ours = [r for r in records if r.config in ("", self.fingerprint)]
        return ours, [r for r in records if r.config not in ("", self.fingerprint)]

    def _explain_strangers(self, err: NoRouteError, strangers: list[DonorRecord]) -> NoRouteError:
        relevant = [r for r in strangers if any(r.start < b and r.end > a for a, b in err.missing)]
        if not relevant:
            return err
        ranges = ", ".join(sorted({f"{r.start}:{r.end}" for r in relevant}))
        configs = ", ".join(sorted({r.config for r in relevant}))
        return err.with_note(f"{len(relevant)} donor(s) announce layers {ranges} under the name {self.model_id!r} "
                             f"but serve a different model (config fingerprint {configs}; this client's is "
                             f"{self.fingerprint}); give each model its own swarm name with --model-name")

    def failed(self, peer_id: str) -> float:
        with self._lock:
            return self.bans.ban(peer_id, time.monotonic())

    def succeeded(self, peer_id: str, rtt: float | None = None) -> None:
        with self._lock:
            self.bans.succeeded(peer_id)
            if rtt is not None:
                self.rtt[peer_id] = rtt
