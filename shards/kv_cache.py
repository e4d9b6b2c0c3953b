"""An explicit per-session KV cache for one shard, sized in bytes before it is allocated.

A cache holds keys and values of every layer of the shard for up to `capacity` tokens:
keys/values: [layers, kv_heads, capacity, head_dim]. `length` counts the tokens already stored.
A forward pass writes the new tokens' entries after `length` and advances `length` only when the
whole pass succeeded, so a failed step leaves the session as it was.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shards.errors import CacheOverflowError


@dataclass(frozen=True)
class CacheSpec:
    """The shape of one token's cache entry in a shard."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element

    def nbytes(self, capacity: int) -> int:
        """Bytes a cache of `capacity` tokens will take, known before allocating it."""
        return self.bytes_per_token * capacity

    def tokens_for(self, budget_bytes: int) -> int:
        """How many tokens fit in a byte budget."""
        return budget_bytes // self.bytes_per_token if self.bytes_per_token else 0


class KVCache:
    """Keys and values of one session in one shard."""

    def __init__(self, spec: CacheSpec, capacity: int, device: torch.device | str = "cpu"):
        if capacity <= 0:
            raise ValueError(f"a KV cache needs a positive capacity, got {capacity}")
        self.spec = spec
        self.capacity = capacity
        self.length = 0
        shape = (spec.num_layers, spec.num_kv_heads, capacity, spec.head_dim)
        self.keys = torch.empty(shape, dtype=spec.dtype, device=device)
        self.values = torch.empty(shape, dtype=spec.dtype, device=device)

    @property
    def nbytes(self) -> int:
        return self.spec.nbytes(self.capacity)

    def check_room(self, new_tokens: int) -> None:
        if self.length + new_tokens > self.capacity:
            raise CacheOverflowError(
                f"step of {new_tokens} token(s) at position {self.length} exceeds the "
                f"{self.capacity} tokens reserved for this session"
            )

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new keys/values ([kv_heads, T, head_dim]) after `length`; return all stored so far."""
        end = self.length + keys.shape[1]
        self.keys[layer, :, self.length:end] = keys
        self.values[layer, :, self.length:end] = values
        return self.keys[layer, :, :end], self.values[layer, :, :end]

    def advance(self, tokens: int) -> None:
        self.length += tokens

    def truncate(self, length: int) -> None:
        """Forget tokens after `length` (to rewind a session, e.g. before a replay)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {length}")
        self.length = length
