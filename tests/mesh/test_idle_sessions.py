"""A session that sits idle past the donors' --idle-timeout is reopened and replayed on its next
step: same logits, no donor banned, and however many pauses, it never runs out of retries."""

from __future__ import annotations

import time

import pytest
import torch

from client import MeshModel
from tests.conftest import FP32_TOLERANCE, random_prompt, reference_model

PAUSES = 6  # two donors: twelve expired sessions, more than a session's max_failovers (8)


@pytest.fixture(scope="module")
def swarm(local_swarm, model_dir):
    return local_swarm(model_dir("llama"), ["0:3", "3:6"], "--idle-timeout", "1")


@pytest.mark.parametrize("forwarding", [True, False], ids=["forwarded", "relayed"])
def test_pauses_longer_than_the_idle_timeout_change_nothing(swarm, model_dir, forwarding):
    ids = random_prompt(5 + PAUSES)[0].tolist()
    with torch.inference_mode():
        expected = reference_model(model_dir("llama"))(torch.tensor([ids])).logits[0]
    with MeshModel.from_pretrained(str(model_dir("llama")), swarm.initial_peers, route_timeout=30,
                                   forwarding=forwarding) as model:
        with model.inference_session(max_length=len(ids)) as session:
            got = [session.step(ids[:5])]
            for token in ids[5:]:
                time.sleep(2.0)  # the donors' sweep (every 0.5 s here) closes both sessions meanwhile
                got.append(session.step([token]))
            reopened = session.remote.failovers
        assert not model.swarm.bans.banned(time.monotonic())  # an idle timeout is nobody's failure
    assert reopened >= PAUSES  # the sessions really expired (about twice per pause)
    torch.testing.assert_close(torch.stack(got), expected[4:], **FP32_TOLERANCE)
    # The donors' operators see it too: the CLI logs the project's info lines to stderr.
    assert any(" INFO mesh.donor: closed 1 idle session(s)" in line for line in swarm.donors[0].process.lines)
