"""LocalSwarm (behind `mesh up`, the tests and the benchmarks) stops everything it started."""

from __future__ import annotations

import pytest

from mesh.launcher import LaunchError, LocalSwarm
from tests.mesh.conftest import DONOR_FLAGS


def test_a_failed_start_stops_the_donors_already_launched(model_dir):
    # Donors load side by side: when one fails, the others may still be loading, never ready.
    swarm = LocalSwarm(ready_timeout=180)
    try:
        swarm.start_dht()
        with pytest.raises(LaunchError):
            swarm.start_donors(str(model_dir("llama")), ["0:99", "0:2"], *DONOR_FLAGS)
        survivor = swarm.launched[1]
    finally:
        swarm.stop()
    assert not survivor.alive() and not swarm.launched
