"""How fast this donor runs its layers, measured at start-up: decode speed (announced for routing)
and prompt speed (the first estimate of how much prompt work a flush can take on, pacing.py)."""

from __future__ import annotations

import time

import torch

from shards.shard import Shard


def measure_throughput(shard: Shard, steps: int = 8, context: int = 32) -> float:
    """Layer-steps per second of a one-token decode step (batch 1) after a `context`-token prefill."""
    cache = shard.new_cache(context + steps + 1)
    hidden = torch.zeros(1, context, shard.config.hidden_size, dtype=shard.dtype, device=shard.device)
    shard(hidden, [cache])
    step = hidden[:, :1]
    shard(step, [cache])  # warm-up
    _synchronize(shard)
    started = time.perf_counter()
    for _ in range(steps):
        shard(step, [cache])
    _synchronize(shard)
    seconds_per_layer = (time.perf_counter() - started) / steps / (shard.end - shard.start)
    return 1.0 / max(seconds_per_layer, 1e-9)


def measure_prompt_speed(shard: Shard, tokens: int = 32) -> tuple[int, float]:
    """(tokens, seconds) of one prompt's compute, after a warm-up: a short prompt, so that a slow
    donor starts quickly; its per-call costs make the donor look slower than it is, which only
    makes the first pieces smaller than they need be until real prompts have been timed."""
    tokens = min(tokens, shard.prefill_chunk_tokens)
    hidden = torch.zeros(1, tokens, shard.config.hidden_size, dtype=shard.dtype, device=shard.device)
    cache = shard.new_cache(tokens)
    shard(hidden, [cache])  # warm-up: first calls at a new shape allocate and pick kernels
    cache.truncate(0)
    _synchronize(shard)
    started = time.perf_counter()
    shard(hidden, [cache])
    _synchronize(shard)
    return tokens, time.perf_counter() - started


def _synchronize(shard: Shard) -> None:
    if shard.device.type == "cuda":
        torch.cuda.synchronize(shard.device)
