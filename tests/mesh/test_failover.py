"""Donors vanish mid-generation: the client reroutes, replays, and the answer does not change."""

from __future__ import annotations

import os
import signal
import time

import pytest

from client import MeshModel
from mesh.routing import NoRouteError
from mesh.transport import Liveness
from tests.conftest import random_prompt


@pytest.fixture(scope="module")
def swarm(local_swarm, model_dir):
    # Layers 2:4, in the middle of the chain, are served five times: the four failover tests below
    # each kill or freeze one, and the last test kills the survivor.
    return local_swarm(model_dir("llama"), ["0:2", *["2:4"] * 5, "4:6"])


def generate_and_disturb(model, prompt: list[int], swarm, disturb) -> dict:
    """The greedy generation of 32 tokens, one step at a time, with `disturb(victim)` applied to the
    donor of layers 2:4 in use right after token 5 (so it lands exactly there)."""
    produced, gap, victim = [], None, None
    with model.inference_session(max_length=len(prompt) + 32) as session:
        logits = session.step(prompt)
        while len(produced) < 32:
            produced.append(int(logits.argmax()))
            if len(produced) == 5:
                in_use = {hop.donor.address for hop in session.route if hop.start == 2}
                victim = next(d for d in swarm.donors if d.address in in_use)
                disturb(victim)
                disturbed_at = time.monotonic()
                logits = session.step([produced[-1]])
                gap = time.monotonic() - disturbed_at
            elif len(produced) < 32:
                logits = session.step([produced[-1]])
        return {"tokens": produced, "gap": gap, "victim": victim, "failovers": session.remote.failovers,
                "route": {hop.donor.address for hop in session.route}, "forwarding": session.remote.forwarding}


# Forwarded: the donor after the victim's place in the chain must be rebuilt from inputs the client
# never saw (they went donor to donor); relayed: the client has them.
@pytest.mark.parametrize("forwarding", [True, False], ids=["forwarded", "relayed"])
def test_sigkill_mid_generation_changes_nothing(swarm, model_dir, forwarding):
    prompt = random_prompt(10, seed=3)[0].tolist()
    with MeshModel.from_pretrained(str(model_dir("llama")), initial_peers=swarm.initial_peers,
                                   route_timeout=30, request_timeout=10, forwarding=forwarding) as model:
        undisturbed = model.generate(prompt, max_new_tokens=32, stop_tokens=[])
        # SIGKILL: no goodbye; its DHT record stays until it expires
        run = generate_and_disturb(model, prompt, swarm, lambda victim: victim.process.kill())
    print(f"\ntime from SIGKILL to the next token: {run['gap']:.3f}s (failovers: {run['failovers']})")
    assert run["tokens"] == undisturbed
    assert run["forwarding"] is forwarding  # the failover did not switch the session to relaying
    assert run["failovers"] >= 1 and run["victim"].address not in run["route"]
    assert run["gap"] < 5.0


@pytest.mark.parametrize("forwarding", [True, False], ids=["forwarded", "relayed"])
def test_a_donor_frozen_mid_generation_is_replaced_long_before_the_request_timeout(swarm, model_dir, forwarding):
    """SIGSTOP: the donor's connections stay open and its kernel takes the step, but nothing
    answers. Only a ping that goes unanswered tells it from a donor that is busy."""
    prompt = random_prompt(10, seed=3)[0].tolist()
    liveness = Liveness(probe_after=0.5, answer_within=2.0)
    # The request timeout and the recovery deadline are those the gateway uses: waiting out the
    # first would leave no time for the second.
    with MeshModel.from_pretrained(str(model_dir("llama")), initial_peers=swarm.initial_peers, route_timeout=30,
                                   request_timeout=60, recovery_deadline=60, forwarding=forwarding,
                                   liveness=liveness) as model:
        undisturbed = model.generate(prompt, max_new_tokens=32, stop_tokens=[])
        frozen = []

        def freeze(victim):
            os.killpg(victim.process.pid, signal.SIGSTOP)  # the donor and its DHT helper, as a hung machine
            frozen.append(victim)

        try:
            run = generate_and_disturb(model, prompt, swarm, freeze)
        finally:
            for victim in frozen:
                victim.process.kill()  # SIGKILL ends a stopped process too
    print(f"\ntime from SIGSTOP to the next token: {run['gap']:.3f}s (failovers: {run['failovers']})")
    assert run["tokens"] == undisturbed
    assert run["failovers"] >= 1 and run["victim"].address not in run["route"]
    assert run["gap"] < 10.0  # probe_after + answer_within + a failover (2.6 s here); the request timeout is 60 s


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


def test_losing_the_last_donor_of_a_range_mid_generation_fails_within_the_route_timeout(local_swarm, model_dir):
    """Not after the whole recovery deadline of silence: a streamed answer ends with the error soon."""
    lone = local_swarm(model_dir("llama"), ["0:3", "3:6"])
    with MeshModel.from_pretrained(str(model_dir("llama")), initial_peers=lone.initial_peers, route_timeout=3,
                                   recovery_deadline=60) as model:
        tokens = model.stream([1, 2, 3], max_new_tokens=32, stop_tokens=[])
        next(tokens)
        lone.donors[1].process.kill()
        started = time.monotonic()
        with pytest.raises(NoRouteError) as err:
            list(tokens)
        elapsed = time.monotonic() - started
    print(f"\nerror {elapsed:.1f}s after the last donor of 3:6 died")
    assert err.value.missing == [(3, 6)]
    assert elapsed < 20  # the route timeout (3 s) and a failover; the recovery deadline is 60 s
