"""Donor records in the DHT: announced on start, refreshed, withdrawn on SIGTERM, expired after SIGKILL."""

from __future__ import annotations

import os
import time

import pytest

from mesh.dht import dht_time, fetch_records, start_dht, wait_for
from mesh.records import model_key
from mesh.records import DonorRecord, model_id_for
from shards.checkpoint import config_fingerprint


@pytest.fixture(scope="module")
def swarm(local_swarm, model_dir):
    return local_swarm(model_dir("llama"), ["0:3", "3:6"])


@pytest.fixture(scope="module")
def reader(swarm):
    dht = start_dht(swarm.initial_peers, client_mode=True)
    yield dht
    dht.shutdown()


def addresses(dht, model) -> set[str]:
    return {r.address for r in fetch_records(dht, model)}


def test_records_appear_and_go_away(swarm, reader, model_dir):
    model = model_id_for(str(model_dir("llama")))
    graceful, crashed = swarm.donors
    assert wait_for(lambda: addresses(reader, model) == {graceful.address, crashed.address}, timeout=10)
    [record] = [r for r in fetch_records(reader, model) if r.address == graceful.address]
    assert (record.start, record.end, record.backend, record.dtype) == (0, 3, "cpu", "float32")
    assert record.throughput > 0 and record.free_cache_tokens == 4096
    assert record.config == config_fingerprint(model_dir("llama") / "config.json") and record.quant == ""

    graceful.process.stop()  # SIGTERM: the donor withdraws its record before exiting
    assert graceful.process.popen.returncode == 0
    assert graceful.address not in addresses(reader, model)

    crashed.process.kill()  # SIGKILL: the record stays until its last heartbeat expires (3 intervals + 10 s)
    started = time.monotonic()
    assert wait_for(lambda: crashed.address not in addresses(reader, model), timeout=25)
    print(f"\nrecord of a killed donor expired after {time.monotonic() - started:.1f}s")


def test_records_from_newer_versions_coexist(reader):
    """A record written by a newer donor, with fields this version does not know, is still used."""
    newer = {**DonorRecord("other-model", 0, 2, str(reader.peer_id), "127.0.0.1:1", version=9).to_dict(),
             "tensor_parallel": 2}
    reader.store(model_key("other-model"), subkey=newer["peer_id"], value=newer, expiration_time=dht_time() + 30)
    [record] = wait_for(lambda: fetch_records(reader, "other-model"), timeout=10)
    assert record.version == 9 and record.span == (0, 2)


def test_a_donor_whose_whole_process_group_is_signalled_still_exits(local_swarm, model_dir):
    """systemd and `timeout` signal the whole group: the donor's DHT process dies first, and the
    withdrawal that would go through it must not hang the donor's shutdown."""
    import os
    import signal
    import subprocess

    donor = local_swarm(model_dir("llama"), ["0:6"]).donors[0]
    os.killpg(donor.process.pid, signal.SIGTERM)
    try:
        assert donor.process.popen.wait(timeout=30) == 0
    except subprocess.TimeoutExpired:
        pytest.fail("the donor still runs 30 s after SIGTERM to its process group:\n" + donor.process.output())


def test_a_donor_killed_alone_takes_its_dht_process_and_daemon_along(local_swarm, model_dir):
    """SIGKILL (or the OOM killer) to the donor's process only: its DHT process and the libp2p
    daemon that one started must not run on, holding their ports."""
    import os
    import signal

    donor = local_swarm(model_dir("llama"), ["0:6"]).donors[0]
    group = donor.process.pid  # the donor leads its own process group (mesh/launcher.py)
    os.kill(donor.process.pid, signal.SIGKILL)
    donor.process.popen.wait(timeout=10)
    deadline = time.monotonic() + 20
    while group_members(group):
        assert time.monotonic() < deadline, f"still running 20 s after the donor died: {group_members(group)}"
        time.sleep(0.2)


def group_members(group: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == group and fields[0] != "Z":  # field 5 of stat: the process group
                members.append(int(entry))
    return members
