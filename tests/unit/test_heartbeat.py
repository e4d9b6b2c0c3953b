"""The donor's heartbeat: on its interval, and sooner when a donor announced (nearly) full frees cache."""

from __future__ import annotations

import threading
import time

from server.donor import Donor, DonorSettings, Heartbeat
from shards import load_shard


class RecordingDHT:
    peer_id = "peer-under-test"

    def __init__(self):
        self.free: list[int] = []  # free cache tokens of each donor record stored, in order
        self.stored = threading.Condition()

    def store(self, key, subkey, value, expiration_time):
        with self.stored:
            if isinstance(value, dict) and "free_cache_tokens" in value:
                self.free.append(value["free_cache_tokens"])
                self.stored.notify_all()
        return True

    def wait_for(self, count: int, timeout: float) -> bool:
        with self.stored:
            return self.stored.wait_for(lambda: len(self.free) >= count, timeout)


def test_freed_cache_is_announced_at_once_only_after_a_nearly_full_announcement(model_dir):
    shard = load_shard(model_dir("llama"), "0:2")
    donor = Donor(shard, DonorSettings("m", cache_budget_bytes=shard.cache_spec.nbytes(100)), throughput=1.0)
    dht = RecordingDHT()
    heartbeat = Heartbeat(dht, donor, num_layers=6, interval=60.0)  # no regular beat during the test
    heartbeat.start()
    try:
        assert dht.free == [100]
        session = donor.sessions.open(0, 2, 90, owner=None)
        donor.sessions.close(session.id)  # the last announcement showed plenty of room: nothing to tell
        assert not dht.wait_for(2, timeout=1.5)

        session = donor.sessions.open(0, 2, 90, owner=None)
        heartbeat.beat()  # announces 10 free tokens: nearly full
        started = time.monotonic()
        donor.sessions.close(session.id)
        assert dht.wait_for(3, timeout=5)
        assert dht.free == [100, 10, 100]
        assert time.monotonic() - started < 1.0 + Heartbeat.MIN_GAP  # not the 60 s interval
    finally:
        stopping = time.monotonic()
        heartbeat.stop()
        assert time.monotonic() - stopping < 2.0
