"""Donors computing in bfloat16 (what GPU donors run by default) behind a float32 client."""

from __future__ import annotations

import torch

from client import MeshModel
from client.session import RemoteSession, SessionConfig
from shards import LocalPipeline, load_edges, load_shard
from tests.conftest import random_prompt

RANGES = ["0:3", "3:6"]


def test_bf16_donors_compute_exactly_what_the_same_shards_compute_locally(local_swarm, model_dir):
    path = model_dir("llama")
    swarm = local_swarm(path, RANGES, "--dtype", "bfloat16")
    prompt = random_prompt(10, seed=3)
    # The mesh's path in one process: the client's float32 edges around bf16 shards.
    local = LocalPipeline(load_edges(path), [load_shard(path, r, device="cpu", dtype="bfloat16") for r in RANGES])
    expected_tokens = local.greedy(prompt[0].tolist(), 24)

    with MeshModel.from_pretrained(str(path), initial_peers=swarm.initial_peers, route_timeout=30) as model:
        session = RemoteSession(model.swarm, SessionConfig(max_length=32))
        session.open()
        try:
            got_hidden = session.step(model.edges.embed(prompt))
        finally:
            session.close()
        got_tokens = model.generate(prompt[0].tolist(), max_new_tokens=24, stop_tokens=[])

    hidden = local.edges.embed(prompt)
    for shard in local.shards:
        hidden = shard(hidden)
    assert got_hidden.dtype == torch.bfloat16  # the donors' own dtype travels back as it is
    assert torch.equal(got_hidden, hidden)
    assert len(set(got_tokens)) > 5 and got_tokens == expected_tokens
