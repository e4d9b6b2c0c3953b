"""Two different models announced under one swarm name are never chained together: each client
routes only to donors whose config fingerprint equals its own, and says why when that leaves a gap."""

from __future__ import annotations

import pytest
from transformers import GenerationConfig

from client import MeshModel
from mesh.routing import NoRouteError
from mesh.transport import Connection, RemoteError
from tests.conftest import random_prompt, reference_model
from tests.mesh.conftest import DONOR_FLAGS

NAME = ("--model-name", "shared")


@pytest.fixture(scope="module")
def two_models(local_swarm, model_dir):
    """`shared` layers 0:6 of a 6-layer llama, then layers 2:8 of an 8-layer llama under the same name."""
    six, eight = model_dir("llama"), model_dir("llama", num_hidden_layers=8)
    swarm = local_swarm(six, ["0:6"], *NAME)
    [donor_of_eight] = swarm.start_donors(str(eight), ["2:8"], *DONOR_FLAGS, *NAME)
    return swarm, six, eight, donor_of_eight


def test_a_client_never_chains_in_a_donor_of_another_model(two_models):
    swarm, _, eight, _ = two_models
    # Layers 0:2 of the 8-layer model are served only by the 6-layer model's donor: no route, and why.
    with MeshModel.from_pretrained(str(eight), swarm.initial_peers, model_name="shared", route_timeout=2) as model:
        with pytest.raises(NoRouteError) as caught:
            model.generate([1, 2, 3], max_new_tokens=2)
    message = str(caught.value)
    assert "layers 0:2 of shared" in message
    assert "1 donor(s) announce layers 0:6 under the name 'shared' but serve a different model" in message
    assert "--model-name" in message


def test_the_other_model_still_generates_exactly(two_models):
    swarm, six, _, _ = two_models
    prompt = random_prompt(8)
    reference = reference_model(six)
    reference.generation_config.eos_token_id = None
    expected = reference.generate(prompt, generation_config=GenerationConfig(
        max_new_tokens=12, do_sample=False, pad_token_id=0))[0, 8:].tolist()
    with MeshModel.from_pretrained(str(six), swarm.initial_peers, model_name="shared", route_timeout=30) as model:
        assert model.generate(prompt[0].tolist(), max_new_tokens=12, stop_tokens=[]) == expected


def test_the_second_donor_was_warned_and_refuses_foreign_requests(two_models):
    swarm, _, _, donor_of_eight = two_models
    assert "already serves a different model under the name 'shared'" in donor_of_eight.process.output(last=1000)
    host, port = donor_of_eight.address.rsplit(":", 1)
    connection = Connection.open(host, int(port), timeout=5)
    try:
        with pytest.raises(RemoteError) as caught:
            connection.request({"type": "open", "model": "shared", "config": "0123456789abcdef", "start": 2,
                                "end": 8, "max_length": 16}, timeout=5)
    finally:
        connection.close()
    assert caught.value.code == "bad_request"
    assert "serves another model named 'shared'" in caught.value.message
