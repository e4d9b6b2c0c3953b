"""Donors vanish mid-generation: the client reroutes, replays, and the answer does not change."""

from __future__ import annotations

import time

import pytest

from client import MeshModel
from mesh.routing import NoRouteError
from tests.conftest import random_prompt


@pytest.fixture(scope="module")
def swarm(local_swarm, model_dir):
    # Layers 2:4, in the middle of the chain, are served three times: each test below kills one.
    return local_swarm(model_dir("llama"), ["0:2", "2:4", "2:4", "2:4", "4:6"])


# Forwarded: the donor after the victim's place in the chain must be rebuilt from inputs the client
# never saw (they went donor to donor); relayed: the client has them.
@pytest.mark.parametrize("forwarding", [True, False], ids=["forwarded", "relayed"])
def test_sigkill_mid_generation_changes_nothing(swarm, model_dir, forwarding):
    prompt = random_prompt(10, seed=3)[0].tolist()
    with MeshModel.from_pretrained(str(model_dir("llama")), initial_peers=swarm.initial_peers,
                                   route_timeout=30, request_timeout=10, forwarding=forwarding) as model:
        undisturbed = model.generate(prompt, max_new_tokens=32, stop_tokens=[])

        # The same greedy generation, one step at a time, so the kill lands exactly after token 5.
        produced, gap = [], None
        with model.inference_session(max_length=len(prompt) + 32) as session:
            logits = session.step(prompt)
            while len(produced) < 32:
                produced.append(int(logits.argmax()))
                if len(produced) == 5:
                    in_use = {hop.donor.address for hop in session.route if hop.start == 2}
                    victim = next(d for d in swarm.donors if d.address in in_use)
                    victim.process.kill()  # SIGKILL: no goodbye; its DHT record stays until it expires
                    killed_at = time.monotonic()
                    logits = session.step([produced[-1]])
                    gap = time.monotonic() - killed_at
                elif len(produced) < 32:
                    logits = session.step([produced[-1]])
            failovers = session.remote.failovers
            route_after = {hop.donor.address for hop in session.route}
            still_forwarding = session.remote.forwarding
        print(f"\ntime from SIGKILL to the next token: {gap:.3f}s (failovers: {failovers})")
        assert produced == undisturbed
        assert still_forwarding is forwarding  # the failover did not switch the session to relaying
        assert failovers >= 1 and victim.address not in route_after
        assert gap < 5.0


def test_missing_layers_fail_fast_with_their_names(swarm, model_dir):
    survivors = [d for d in swarm.donors if d.start == 2 and d.process.alive()]
    for donor in survivors:
        donor.process.kill()
    with MeshModel.from_pretrained(str(model_dir("llama")), initial_peers=swarm.initial_peers,
                                   route_timeout=3, connect_timeout=2) as model:
        started = time.monotonic()
        with pytest.raises(NoRouteError) as err:
            model.generate([1, 2, 3], max_new_tokens=4)
        elapsed = time.monotonic() - started
    assert err.value.missing == [(2, 4)]
    assert "no donor serves layers 2:4 of" in str(err.value)
    assert "mesh serve --model" in str(err.value) and "--layers 2:4" in str(err.value)
    assert elapsed < 20
