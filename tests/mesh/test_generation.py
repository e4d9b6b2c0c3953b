"""A loopback swarm of three donors generates exactly what transformers generates locally."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig

from client import MeshModel, Sampler, SamplingParams
from mesh.transport import Connection
from shards import LocalPipeline, load_edges, load_shard
from tests.conftest import FP32_TOLERANCE, random_prompt, reference_model

ROOT = Path(__file__).resolve().parents[2]
RANGES = ["0:2", "2:4", "4:6"]


@pytest.fixture(scope="module")
def swarm(local_swarm, model_dir):
    return local_swarm(model_dir("llama"), RANGES)


@pytest.fixture(scope="module")
def mesh_model(swarm, model_dir):
    model = MeshModel.from_pretrained(str(model_dir("llama")), initial_peers=swarm.initial_peers, route_timeout=30)
    yield model
    model.close()


def test_greedy_generation_equals_transformers(mesh_model, model_dir):
    prompt = random_prompt(12)
    reference = reference_model(model_dir("llama"))
    reference.generation_config.eos_token_id = None
    expected = reference.generate(prompt, generation_config=GenerationConfig(
        max_new_tokens=32, do_sample=False, pad_token_id=0))[0, 12:].tolist()
    got = mesh_model.generate(prompt[0].tolist(), max_new_tokens=32, stop_tokens=[])
    assert len(got) == 32 and len(set(got)) > 5
    assert got == expected
    assert len(mesh_model.swarm.rtt) == 3  # a measured round trip per donor, used for routing


def test_seeded_sampling_equals_the_local_sampler(mesh_model, model_dir):
    path = model_dir("llama")
    prompt = random_prompt(9, seed=5)[0].tolist()
    params = SamplingParams(temperature=0.9, top_p=0.92, top_k=40, repetition_penalty=1.1, seed=1234)
    remote = mesh_model.generate(prompt, max_new_tokens=24, temperature=0.9, top_p=0.92, top_k=40,
                                 repetition_penalty=1.1, seed=1234, stop_tokens=[])

    pipe = LocalPipeline(load_edges(path), [load_shard(path, r) for r in RANGES])
    sampler = Sampler(params)
    session = pipe.new_session(64)
    logits = pipe.step([session], torch.tensor([prompt]))[0]
    history, local = list(prompt), []
    for _ in range(24):
        token = sampler(logits, history)
        local.append(token)
        history.append(token)
        logits = pipe.step([session], torch.tensor([[token]]))[0]
    assert remote == local
    other_seed = mesh_model.generate(prompt, max_new_tokens=24, temperature=0.9, top_p=0.92, top_k=40,
                                     repetition_penalty=1.1, seed=99, stop_tokens=[])
    assert other_seed != remote  # the seed matters


def test_bad_lengths_are_refused_before_any_donor_is_asked(mesh_model):
    import time

    from client import ContextLengthError

    with pytest.raises(ValueError, match="max_new_tokens must be a non-negative integer, got -3"):
        mesh_model.generate([1, 2, 3], max_new_tokens=-3)
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"max_length must be a positive number of tokens, got {bad}"):
            mesh_model.inference_session(max_length=bad)
    with pytest.raises(ContextLengthError, match="maximum context length"):
        mesh_model.inference_session(max_length=10**9)
    assert not mesh_model.swarm.bans.banned(time.monotonic())  # no donor paid for the caller's mistake


def test_bad_token_ids_are_refused_before_any_donor_is_asked(mesh_model, model_dir):
    import time

    from client import ContextLengthError, MeshSessionError

    vocab = mesh_model.config.vocab_size
    prompt = random_prompt(6)
    with torch.inference_mode():
        expected = reference_model(model_dir("llama"))(prompt).logits[0, -1]
    with mesh_model.inference_session(max_length=16) as session:
        for bad, error, message in [
                ([], ValueError, "no token ids were given"),
                ([[1, 2], [3, 4]], ValueError, r"expected one sequence of ids, got shape \[2, 2\]"),
                (torch.tensor([1.0, 2.0]), TypeError, "token ids must be integers, got a torch.float32 tensor"),
                ([1, 2.5], TypeError, "token ids must be integers"),
                ([1, vocab], ValueError, f"token id {vocab} is outside the vocabulary"),
                ([[1, 2], [3]], ValueError, "token ids must be a list of integers")]:
            with pytest.raises(error, match=message):
                session.step(bad)
        assert session.position == 0  # nothing reached the donors: the session goes on intact
        torch.testing.assert_close(session.step(prompt), expected, **FP32_TOLERANCE)  # a [1, T] tensor
    with pytest.raises(MeshSessionError, match="this session is closed"):
        session.step([1])
    with pytest.raises(ValueError, match="one sequence of ids, got shape \\[2, 3\\]"):
        mesh_model.generate(torch.tensor([[1, 2, 3], [4, 5, 6]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="no token ids were given"):
        mesh_model.forward([])
    with pytest.raises(ContextLengthError, match="maximum context length"):
        mesh_model.forward([1] * (mesh_model.context_length + 1))
    assert not mesh_model.swarm.bans.banned(time.monotonic())


def test_stop_tokens_end_generation(mesh_model):
    prompt = random_prompt(8)[0].tolist()
    full = mesh_model.generate(prompt, max_new_tokens=10, stop_tokens=[])
    stopped = mesh_model.generate(prompt, max_new_tokens=10, stop_tokens=[full[3]])
    assert stopped == full[:full.index(full[3]) + 1]


def test_forward_and_step_by_step_session(mesh_model, model_dir):
    prompt = random_prompt(10)
    with torch.no_grad():
        expected = reference_model(model_dir("llama"))(prompt).logits
    torch.testing.assert_close(mesh_model.forward(prompt), expected, **FP32_TOLERANCE)
    with mesh_model.inference_session(max_length=16) as session:
        first = session.step(prompt[0, :6].tolist())
        last = session.step(prompt[0, 6:].tolist())
        assert session.position == 10 and len(session.route) == 3
    torch.testing.assert_close(first, expected[0, 5], **FP32_TOLERANCE)
    torch.testing.assert_close(last, expected[0, 9], **FP32_TOLERANCE)


def test_concurrent_sessions_are_batched_and_exact(mesh_model, swarm):
    prompts = [random_prompt(4 + i, seed=10 + i)[0].tolist() for i in range(8)]
    alone = [mesh_model.generate(p, max_new_tokens=12, stop_tokens=[]) for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda p: mesh_model.generate(p, max_new_tokens=12, stop_tokens=[]), prompts))
    assert together == alone
    stats = [donor_info(d.port)["compute"] for d in swarm.donors]
    print("decode batch sizes per donor:", [s["batch_sizes"] for s in stats])
    assert max(s["max_batch"] for s in stats) > 1


def forwarded_steps(swarm) -> list[int]:
    counts = []
    for donor in swarm.donors:
        host, port = donor.address.rsplit(":", 1)
        connection = Connection.open(host, int(port))
        try:
            counts.append(connection.request({"type": "info"}).header["forwarded_steps"])
        finally:
            connection.close()
    return counts


def test_donors_forward_steps_and_relaying_gives_the_same_tokens(mesh_model, swarm):
    prompt = random_prompt(10, seed=8)[0].tolist()
    before = forwarded_steps(swarm)
    forwarded = mesh_model.generate(prompt, max_new_tokens=12, stop_tokens=[])
    middle = forwarded_steps(swarm)
    mesh_model.session_options["forwarding"] = False
    try:
        relayed = mesh_model.generate(prompt, max_new_tokens=12, stop_tokens=[])
    finally:
        del mesh_model.session_options["forwarding"]
    after = forwarded_steps(swarm)
    assert forwarded == relayed and len(forwarded) == 12
    # 12 steps (the prompt, then 11 tokens): the first two donors handed each on; the last answered
    assert [m - b for m, b in zip(middle, before)] == [12, 12, 0]
    assert after == middle


def test_status_shows_the_three_ranges(swarm):
    out = subprocess.run([sys.executable, "-m", "mesh.cli", "status", "--initial-peers", *swarm.initial_peers],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "6 layers, 3 donor(s), all layers served" in out.stdout
    for r in RANGES:
        assert f"\n  {r} " in out.stdout
    unknown = subprocess.run([sys.executable, "-m", "mesh.cli", "status", "--model", "no-such-model",
                              "--initial-peers", *swarm.initial_peers], capture_output=True, text=True, timeout=120,
                             cwd=ROOT)
    assert unknown.returncode == 1 and unknown.stdout == ""
    assert "mesh status: no donor announces 'no-such-model' in this swarm; announced: llama-model" in unknown.stderr


def donor_info(port: int) -> dict:
    connection = Connection.open("127.0.0.1", port)
    try:
        return connection.request({"type": "info"}, timeout=10).header
    finally:
        connection.close()
