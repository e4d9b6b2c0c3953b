"""The client's book of donors: a DHT read that comes back incomplete forgets nobody; a withdrawal
or an expiration does; a slow read does not hold up routing."""

from __future__ import annotations

import threading
import time

from client.swarm import Swarm
from mesh.dht import Announcement
from mesh.records import DonorRecord


def record(peer: str, start: int, end: int) -> DonorRecord:
    return DonorRecord(model="m", start=start, end=end, peer_id=peer, address=f"127.0.0.1:{1000 + start}")


class FakeDHT:
    def __init__(self, *reads: list[Announcement]):
        self.now = 100.0
        self.reads = list(reads)

    def fetch(self) -> list[Announcement]:
        return self.reads.pop(0)


def book(dht: FakeDHT, refresh_interval: float = 1e9) -> Swarm:
    return Swarm("m", 4, dht.fetch, refresh_interval=refresh_interval, route_timeout=0, clock=lambda: dht.now)


def test_an_incomplete_read_keeps_donors_until_their_announcements_expire():
    a, b = record("a", 0, 2), record("b", 2, 4)
    dht = FakeDHT([Announcement("a", a, 130.0), Announcement("b", b, 130.0)], [], [Announcement("a", a, 140.0)])
    swarm = book(dht)
    assert swarm.records(force=True) == [a, b]
    assert swarm.records(force=True) == [a, b]  # the read came back empty: a frozen DHT peer, not two dead donors
    assert [h.donor for h in swarm.route(0, 4)] == [a, b]
    assert swarm.records(force=True) == [a, b]
    dht.now = 135.0
    assert swarm.records() == [a]  # b's last announcement expired at 130; a refreshed its own


def test_a_withdrawal_removes_the_donor_at_once():
    a = record("a", 0, 4)
    dht = FakeDHT([Announcement("a", a, 130.0)], [Announcement("a", None, 160.0)], [Announcement("a", a, 130.0)])
    swarm = book(dht)
    assert swarm.records(force=True) == [a]
    assert swarm.records(force=True) == []  # the tombstone is newer than the record
    assert swarm.records(force=True) == []  # an older copy of the record, from a lagging peer, does not revive it


def test_a_due_read_runs_in_the_background():
    a, b = record("a", 0, 4), record("b", 0, 4)
    release = threading.Event()
    dht = FakeDHT([Announcement("a", a, 130.0)], [Announcement("b", b, 130.0)])

    def slow_fetch():
        if len(dht.reads) == 1:  # the second read waits, as one that waits for a frozen peer
            assert release.wait(10)
        return dht.fetch()

    swarm = Swarm("m", 4, slow_fetch, refresh_interval=0, route_timeout=0, clock=lambda: dht.now)
    assert swarm.records() == [a]  # the first read is waited for: nothing is known before it
    assert swarm.records() == [a]  # a read is due, and under way: answered from what is known
    assert [h.donor for h in swarm.route(0, 4)] == [a]
    release.set()
    deadline = time.monotonic() + 10
    while len(swarm.records()) < 2:
        assert time.monotonic() < deadline, "the background read never landed"
        time.sleep(0.01)
    assert set(swarm.records()) == {a, b}
