"""Donors on a CUDA or ROCm GPU behind a client on the CPU: the hidden states cross host memory
on both sides of every hop. Skipped where no GPU is present (tests/model/test_devices.py checks the
same paths on the CPU, with the meta device standing in for the GPU)."""

from __future__ import annotations

import pytest
import torch

from client import MeshModel
from shards import LocalPipeline, load_edges, load_shard
from tests.conftest import random_prompt

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA or ROCm GPU")]

RANGES = ["0:3", "3:6"]


def test_gpu_donors_generate_what_the_same_shards_generate_locally(local_swarm, model_dir):
    path = model_dir("llama")
    swarm = local_swarm(path, RANGES, "--device", "cuda", "--dtype", "bfloat16")
    prompt = random_prompt(10, seed=3)[0].tolist()
    local = LocalPipeline(load_edges(path, device="cpu"),
                          [load_shard(path, r, device="cuda", dtype="bfloat16") for r in RANGES])
    expected = local.greedy(prompt, 24)

    with MeshModel.from_pretrained(str(path), initial_peers=swarm.initial_peers, device="cpu",
                                   route_timeout=30) as model:
        got = model.generate(prompt, max_new_tokens=24, stop_tokens=[])

    assert len(set(got)) > 5 and got == expected
