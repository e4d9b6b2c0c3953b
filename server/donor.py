"""A running donor: the data-plane server, the session sweeper and the DHT heartbeat, around one shard."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from mesh.listener import Listener
from mesh.protocol import DEFAULT_MAX_PAYLOAD_BYTES
from mesh.records import DonorRecord
from mesh.transport import ServerConnection, start_server
from server.compute import BatchingExecutor
from server.forwarding import Forwarder
from server.handlers import DonorHandlers
from server.sessions import SessionTable
from shards.shard import Shard

log = logging.getLogger("mesh.donor")


@dataclass
class DonorSettings:
    model_id: str
    host: str = "127.0.0.1"
    port: int = 0
    public_host: str | None = None  # what others should dial, when it differs from `host`
    cache_budget_bytes: int = 1 << 30
    idle_timeout: float = 300.0
    announce_interval: float = 10.0
    max_batch: int = 64
    max_payload: int = DEFAULT_MAX_PAYLOAD_BYTES
    revision: str = "main"
    fingerprint: str = ""  # of the model's config.json: clients route only to donors of their own model


class Donor:
    def __init__(self, shard: Shard, settings: DonorSettings, throughput: float, device: str = ""):
        self.shard = shard
        self.settings = settings
        self.throughput = throughput
        self.device = device
        self.worker = BatchingExecutor(shard, settings.max_batch)
        # A session that ends drops its queued work too: no compute for a cache nobody owns.
        self.sessions = SessionTable(shard, settings.cache_budget_bytes, settings.idle_timeout,
                                     on_close=self._session_ended)
        self.on_cache_freed: Callable[[], None] | None = None  # the heartbeat's nudge, once it runs
        self.forwarder = Forwarder(self.sessions, settings.max_payload)
        self.handlers = DonorHandlers(shard, self.sessions, self.worker, settings.model_id, settings.fingerprint,
                                      describe={"backend": shard.device_info.backend, "device": device},
                                      forwarder=self.forwarder)
        self.server: Listener | None = None
        self._sweeper: asyncio.Task | None = None
        self.address = ""

    async def start(self) -> str:
        self.server = await start_server(self.handlers, self.settings.host, self.settings.port,
                                         self._connection_closed, self.settings.max_payload)
        port = self.server.sockets[0].getsockname()[1]
        self.address = f"{self.settings.public_host or self.settings.host}:{port}"
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_idle_sessions())
        return self.address

    def _session_ended(self, session) -> None:
        self.worker.forget(session)
        if self.on_cache_freed is not None:
            self.on_cache_freed()

    def _connection_closed(self, connection: ServerConnection) -> None:
        freed = self.sessions.close_owned_by(connection)
        if freed:
            log.info("connection closed; freed %d session(s)", freed)

    async def _sweep_idle_sessions(self) -> None:
        interval = max(0.5, min(30.0, self.settings.idle_timeout / 4))
        while True:
            await asyncio.sleep(interval)
            expired = self.sessions.expire_idle()
            if expired:
                log.info("closed %d idle session(s)", len(expired))

    def record(self, peer_id: str) -> DonorRecord:
        return DonorRecord(model=self.settings.model_id, start=self.shard.start, end=self.shard.end,
                           peer_id=peer_id, address=self.address, backend=self.shard.device_info.backend,
                           dtype=str(self.shard.dtype).removeprefix("torch."), throughput=round(self.throughput, 3),
                           free_cache_tokens=self.sessions.free_tokens(), revision=self.settings.revision,
                           device=self.device, config=self.settings.fingerprint, quant=self.shard.quantization or "")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        self.forwarder.close()
        if self.server is not None:
            self.server.close()


# How much longer than three heartbeats a record lives: while some peer of the DHT is frozen, each
# store waits for it (about 3 s per call, two calls per beat), and a record must not lapse meanwhile
# (seen while a peer was frozen, with 1 s beats and a 3 s lifetime: healthy donors vanished from reads;
# tests/mesh/test_failover.py freezes one).
SLOW_STORE_ALLOWANCE = 10.0
WITHDRAW_TIMEOUT = 5.0  # a DHT that stopped answering (its process killed with ours) must not hang shutdown


class Heartbeat:
    """Announces the donor's record every `interval` seconds from a thread (DHT calls block), and
    sooner when a donor that announced itself (nearly) full frees cache: clients skip donors without
    room for their session, and would otherwise wait a whole interval to see the room."""

    NEARLY_FULL = 0.25  # announced free cache below this share of the budget counts as nearly full
    MIN_GAP = 1.0  # seconds between two announcements, however many sessions end

    def __init__(self, dht, donor: Donor, num_layers: int, interval: float):
        self.dht, self.donor, self.num_layers, self.interval = dht, donor, num_layers, interval
        self._stop = threading.Event()
        self._nudged = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mesh-heartbeat", daemon=True)
        self.peer_id = str(dht.peer_id)
        self._announced_free = 0
        self._full_budget = donor.sessions.shard.cache_spec.tokens_for(donor.sessions.budget_bytes)

    def start(self) -> None:
        self.beat()
        self.donor.on_cache_freed = self.nudge
        self._thread.start()

    def nudge(self) -> None:
        """Cache was freed: announce soon if the last announcement looked (nearly) full."""
        if self._announced_free < self.NEARLY_FULL * self._full_budget:
            self._nudged.set()

    def beat(self) -> None:
        from mesh.dht import announce

        record = self.donor.record(self.peer_id)
        try:
            announce(self.dht, record, self.num_layers, ttl=3 * self.interval + SLOW_STORE_ALLOWANCE)
            self._announced_free = record.free_cache_tokens
        except Exception as err:  # a DHT hiccup must not kill a donor; the next beat retries
            log.warning("announcement failed: %s", err)

    def _run(self) -> None:
        last = time.monotonic()
        while True:
            self._nudged.wait(max(0.0, last + self.interval - time.monotonic()))
            if self._stop.wait(max(0.0, last + self.MIN_GAP - time.monotonic())):
                return
            self._nudged.clear()
            self.beat()
            last = time.monotonic()

    def stop(self) -> None:
        self._stop.set()
        self._nudged.set()
        self._thread.join(timeout=WITHDRAW_TIMEOUT)
        # In a thread of its own, waited for a bounded time: when a signal went to the whole process
        # group (systemd, `timeout`), the DHT's process is gone and a call into it never returns.
        withdrawing = threading.Thread(target=self._withdraw, name="mesh-withdraw", daemon=True)
        withdrawing.start()
        withdrawing.join(WITHDRAW_TIMEOUT)
        if withdrawing.is_alive():
            log.warning("the DHT did not answer within %.0fs; the announcement will expire by itself",
                        WITHDRAW_TIMEOUT)

    def _withdraw(self) -> None:
        from mesh.dht import withdraw

        try:
            withdraw(self.dht, self.donor.record(self.peer_id))
        except Exception as err:
            log.warning("could not withdraw the announcement: %s", err)


def ready_line(donor: Donor, peer_id: str) -> str:
    """One machine-readable line printed when the donor serves (tests and `mesh up` wait for it)."""
    record = donor.record(peer_id)
    return "MESH_READY " + json.dumps({"address": record.address, "peer_id": peer_id, "start": record.start,
                                       "end": record.end, "model": record.model})
