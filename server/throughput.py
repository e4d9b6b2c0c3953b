"""How fast this donor runs its layers, measured at start-up and announced for routing."""

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


def _synchronize(shard: Shard) -> None:
    if shard.device.type == "cuda":
        torch.cuda.synchronize(shard.device)
