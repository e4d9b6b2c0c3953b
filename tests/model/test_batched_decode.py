"""One batched decode step over sessions of different lengths equals stepping each session alone."""

from __future__ import annotations

import copy

import pytest
import torch

from shards import CacheOverflowError, LocalPipeline, load_edges, load_shard
from tests.conftest import assert_hidden_close, fail_on_call, random_prompt

PROMPT_LENGTHS = [3, 11, 6, 17]  # different lengths; 11 and 17 exceed the random configs' windows


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2_moe"])
def test_batched_step_equals_each_session_alone(model_dir, model_type):
    path = model_dir(model_type)
    shard = load_shard(path, "1:5", device="cpu")
    embed = load_edges(path).embed  # real activations: what the layer before this shard would send
    caches = []
    for length in PROMPT_LENGTHS:
        cache = shard.new_cache(32)
        shard(embed(random_prompt(length, seed=length)), [cache])
        caches.append(cache)
    step_input = embed(torch.tensor([[7], [99], [123], [250]]))

    alone_caches = [copy.deepcopy(c) for c in caches]
    alone = torch.cat([shard(step_input[i:i + 1], [alone_caches[i]]) for i in range(len(caches))])
    batched = shard(step_input, caches)

    assert_hidden_close(batched, alone)
    assert [c.length for c in caches] == [n + 1 for n in PROMPT_LENGTHS]
    for mine, theirs in zip(caches, alone_caches):  # the caches the two paths left behind agree too
        assert_hidden_close(mine.keys[:, :, :mine.length], theirs.keys[:, :, :theirs.length])


def test_step_beyond_reserved_length_is_refused_and_changes_nothing(model_dir):
    shard = load_shard(model_dir("llama"), "0:2", device="cpu")
    cache = shard.new_cache(8)
    shard(torch.randn(1, 6, shard.config.hidden_size), [cache])
    before = cache.keys.clone()
    with pytest.raises(CacheOverflowError, match="exceeds the 8 tokens reserved"):
        shard(torch.randn(1, 3, shard.config.hidden_size), [cache])
    assert cache.length == 6
    # Compare bit patterns: the slots after `length` are uninitialised memory and may hold NaNs.
    assert torch.equal(cache.keys.view(torch.int32), before.view(torch.int32))


def test_cache_size_is_known_before_allocation(model_dir):
    shard = load_shard(model_dir("qwen3"), "2:5", device="cpu")
    spec = shard.cache_spec
    predicted = spec.nbytes(100)
    # 3 layers x (keys + values) x 2 kv heads x 100 tokens x head_dim 24 x 4 bytes
    assert predicted == 3 * 2 * 2 * 100 * 24 * 4
    cache = shard.new_cache(100)
    allocated = sum(t.numel() * t.element_size() for t in (cache.keys, cache.values))
    assert allocated == predicted == cache.nbytes
    assert spec.tokens_for(predicted) == 100


def test_batched_greedy_sessions_match_their_own_runs(model_dir):
    """A whole generation: 3 sessions decoded together give each session's own greedy tokens."""
    path = model_dir("qwen3_moe")
    pipe = LocalPipeline(load_edges(path), [load_shard(path, "0:3"), load_shard(path, "3:6")])
    prompts = [random_prompt(n, seed=n)[0].tolist() for n in (4, 9, 14)]
    alone = [pipe.greedy(p, 8) for p in prompts]
    sessions = [pipe.new_session(32) for _ in prompts]
    last = [pipe.step([s], torch.tensor([p]))[0] for s, p in zip(sessions, prompts)]
    together = [[] for _ in prompts]
    for _ in range(8):
        tokens = [int(l.argmax()) for l in last]
        for out, token in zip(together, tokens):
            out.append(token)
        last = pipe.step(sessions, torch.tensor([[t] for t in tokens]))
    assert together == alone


@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_a_long_prompt_in_chunks_equals_it_in_one_piece(model_dir, model_type):
    path = model_dir(model_type)  # mistral: a sliding window shorter than the chunks
    shard = load_shard(path, "0:4", device="cpu")
    prompt = load_edges(path).embed(random_prompt(23, seed=5))
    whole, pieces = shard.new_cache(40), shard.new_cache(40)
    expected = shard(prompt, [whole])
    shard.prefill_chunk_tokens = 5  # 23 tokens: four pieces of 5 and one of 3
    got = shard(prompt, [pieces])

    assert_hidden_close(got, expected)
    assert pieces.length == whole.length == 23
    assert_hidden_close(pieces.keys[:, :, :23], whole.keys[:, :, :23])
    step = load_edges(path).embed(torch.tensor([[42]]))  # and the sessions go on alike
    assert_hidden_close(shard(step, [pieces]), shard(step, [whole]))


def test_a_chunked_prompt_that_fails_midway_leaves_the_session_as_it_was(model_dir, monkeypatch):
    shard = load_shard(model_dir("llama"), "0:2", device="cpu")
    cache = shard.new_cache(32)
    shard(torch.randn(1, 4, shard.config.hidden_size), [cache])
    shard.prefill_chunk_tokens = 4
    calls = fail_on_call(monkeypatch, shard.blocks[1], call=3)
    with pytest.raises(RuntimeError, match="out of memory"):
        shard(torch.randn(1, 12, shard.config.hidden_size), [cache])
    assert len(calls) == 3 and cache.length == 4  # two pieces had gone through: rolled back


def test_a_prompt_abandoned_between_pieces_leaves_the_session_as_it_was(model_dir):
    shard = load_shard(model_dir("llama"), "0:2", device="cpu")
    cache = shard.new_cache(32)
    shard(torch.randn(1, 4, shard.config.hidden_size), [cache])
    shard.prefill_chunk_tokens = 4
    pieces = shard.in_pieces(torch.randn(1, 12, shard.config.hidden_size), [cache])
    assert next(pieces) is None and next(pieces) is None and cache.length == 12  # two pieces in
    pieces.close()  # the donor drops a prompt whose session ended
    assert cache.length == 4
