"""Loopback swarms: a bootstrap DHT node and donors as subprocesses on 127.0.0.1, stopped by PID."""

from __future__ import annotations

import pytest

from mesh.launcher import LocalSwarm

DONOR_FLAGS = ("--torch-threads", "1", "--announce-interval", "1", "--cache-tokens", "4096")


@pytest.fixture(scope="module")
def local_swarm():
    """A factory of swarms; every process started through it is stopped when the module ends."""
    swarms: list[LocalSwarm] = []

    def start(model_dir, ranges: list[str], *extra: str) -> LocalSwarm:
        swarm = LocalSwarm(ready_timeout=180)
        swarms.append(swarm)
        swarm.start_dht()
        swarm.start_donors(str(model_dir), ranges, *DONOR_FLAGS, *extra)
        return swarm

    yield start
    for swarm in swarms:
        swarm.stop()
