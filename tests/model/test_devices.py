"""A shard and the client's edges accept inputs from host memory whatever device they run on.

On a GPU donor the hidden states of a request arrive from the wire in host memory, and on a GPU
client a donor's reply does too. Here the meta device stands in for the GPU: it checks devices
and shapes without computing, and mixing it with CPU tensors fails the way CUDA does.
"""

from __future__ import annotations

import torch

from shards import load_edges, load_shard


def on_meta(module):
    module = module.to("meta")
    if hasattr(module, "rotary"):
        module.rotary.to("meta")  # the rotary tables are plain tensors, not buffers
    return module


def test_shard_on_another_device_takes_host_inputs(model_dir):
    path = model_dir("llama")
    shard = on_meta(load_shard(path, "0:3", device="cpu"))
    hidden_size = shard.config.hidden_size
    cache = shard.new_cache(16)
    assert cache.keys.device.type == "meta"

    prompt = shard(torch.randn(1, 5, hidden_size), [cache])  # a prompt from the wire
    step = shard(torch.randn(1, 1, hidden_size), [cache])  # a decode step
    whole = shard(torch.randn(2, 4, hidden_size))  # a forward without a session

    assert [t.device.type for t in (prompt, step, whole)] == ["meta"] * 3
    assert (prompt.shape, step.shape, whole.shape) == ((1, 5, hidden_size), (1, 1, hidden_size), (2, 4, hidden_size))
    assert cache.length == 6


def test_long_prompt_in_pieces_on_another_device(model_dir):
    shard = on_meta(load_shard(model_dir("llama"), "0:2", device="cpu"))
    shard.prefill_chunk_tokens = 4
    cache = shard.new_cache(16)
    output = shard(torch.randn(1, 10, shard.config.hidden_size), [cache])
    assert output.shape == (1, 10, shard.config.hidden_size) and cache.length == 10


def test_edges_on_another_device_take_host_hidden_states(model_dir):
    edges = on_meta(load_edges(model_dir("llama")))
    logits = edges.logits(torch.randn(1, 3, edges.config.hidden_size))
    assert logits.device.type == "meta" and logits.shape == (1, 3, edges.config.vocab_size)
