"""A Shard: decoder layers [start, end) of one model, with rotary tables and KV caches for them."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from shards.device import DeviceInfo, detect_device
from shards.errors import LayerRangeError
from shards.families import Family
from shards.families.base import head_dim
from shards.kv_cache import CacheSpec, KVCache
from shards.layers import DecoderBlock
from shards.rotary import RotaryEmbedding


# A long prompt runs through a session's cache in pieces of at most this many tokens: its working
# memory (the MLP's [T, intermediate] activations, attention scores where the math kernel runs)
# then stays that of a 512-token prompt however long the prompt is, while pieces this long still
# keep the matrix multiplications efficient.
PREFILL_CHUNK_TOKENS = 512


class Shard(nn.Module):
    """Runs hidden states through layers [start, end); holds no embeddings or head."""

    def __init__(self, config, family: Family, start: int, end: int, blocks: list[DecoderBlock],
                 rotary: RotaryEmbedding, dtype: torch.dtype, device_info: DeviceInfo | None = None,
                 quantization: str | None = None):
        super().__init__()
        self.config = config
        self.family = family
        self.start, self.end = start, end
        self.blocks = nn.ModuleList(blocks)
        self.rotary = rotary
        self.dtype = dtype  # compute dtype of activations and KV cache
        self.device_info = device_info or detect_device("cpu")
        self.quantization = quantization
        self.prefill_chunk_tokens = PREFILL_CHUNK_TOKENS

    @property
    def device(self) -> torch.device:
        return self.rotary.inv_freq.device

    @property
    def cache_spec(self) -> CacheSpec:
        return self.cache_spec_for(self.start, self.end)

    def cache_spec_for(self, start: int, end: int) -> CacheSpec:
        """The cache shape of a session that uses only layers [start, end) of this shard."""
        self._check_sub_range(start, end)
        return CacheSpec(end - start, self.blocks[0].self_attn.opts.num_kv_heads, head_dim(self.config), self.dtype)

    def new_cache(self, capacity: int, layers: tuple[int, int] | None = None) -> KVCache:
        """A cache for one session of up to `capacity` tokens (cache_spec.nbytes(capacity) bytes)."""
        start, end = layers or (self.start, self.end)
        return KVCache(self.cache_spec_for(start, end), capacity, self.device)

    def _check_sub_range(self, start: int, end: int) -> None:
        if not self.start <= start < end <= self.end:
            raise LayerRangeError(f"layers [{start}, {end}) are not within this shard's [{self.start}, {self.end})")

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    @torch.inference_mode()
    def forward(self, hidden: torch.Tensor, caches: list[KVCache] | None = None,
                layers: tuple[int, int] | None = None) -> torch.Tensor:
        """hidden: [B, T, D] -> [B, T, D].

        Without caches: B independent sequences at positions 0..T-1 (a whole-sequence pass).
        With caches: one cache per row; row b continues its session at position caches[b].length,
        so a decode step of sessions with different lengths runs as one batch. More tokens than
        `prefill_chunk_tokens` go through in pieces of that size, each extending the caches.
        `layers` runs only a sub-range [start, end) of this shard (caches made for that sub-range).
        """
        start, end = layers or (self.start, self.end)
        self._check_sub_range(start, end)
        blocks = self.blocks[start - self.start:end - self.start]
        # Inputs come from the wire (host memory) or from the layer before (any device, any dtype).
        hidden = hidden.to(device=self.device, dtype=self.dtype)
        batch, tokens, _ = hidden.shape
        if caches is None:
            positions = torch.arange(tokens, device=hidden.device).expand(batch, tokens)
        else:
            if len(caches) != batch:
                raise ValueError(f"got {len(caches)} caches for a batch of {batch}")
            for cache in caches:
                if cache.spec.num_layers != len(blocks):
                    raise ValueError(f"a cache for {cache.spec.num_layers} layers cannot serve layers [{start}, {end})")
                cache.check_room(tokens)
            if tokens > self.prefill_chunk_tokens:
                *_, output = self.in_pieces(hidden, caches, (start, end))
                return output
            offsets = torch.tensor([c.length for c in caches], device=hidden.device)
            positions = offsets[:, None] + torch.arange(tokens, device=hidden.device)
        cos, sin = self.rotary(positions, self.dtype)
        for layer, block in enumerate(blocks):
            hidden = block(hidden, cos, sin, caches, layer)
        for cache in caches or ():
            cache.advance(tokens)  # only after every layer succeeded
        return hidden

    def in_pieces(self, hidden: torch.Tensor, caches: list[KVCache], layers: tuple[int, int] | None = None,
                  piece_tokens: int | None = None) -> Iterator[torch.Tensor | None]:
        """forward() with caches, `piece_tokens` tokens at a time (at most `prefill_chunk_tokens`, the
        default), as a generator: it yields None after each piece but the last, then the whole
        output [B, T, D]. A caller can do other work between pieces (the donor runs other sessions'
        steps). If a piece fails, or the generator is closed before the end, the caches are rolled
        back to where they were: a prompt goes in whole or not at all."""
        for cache in caches:
            cache.check_room(hidden.shape[1])
        lengths = [cache.length for cache in caches]
        tokens, step = hidden.shape[1], min(piece_tokens or self.prefill_chunk_tokens, self.prefill_chunk_tokens)
        output = torch.empty(hidden.shape, dtype=self.dtype, device=hidden.device)
        complete = False
        try:
            for begin in range(0, tokens, step):
                output[:, begin:begin + step] = self.forward(hidden[:, begin:begin + step], caches, layers)
                if begin + step < tokens:
                    yield None
            complete = True
        finally:
            if not complete:
                for cache, length in zip(caches, lengths):
                    cache.truncate(length)
        yield output
