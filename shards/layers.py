"""The transformer block the project owns: RMSNorm, gated MLP, attention, decoder block.

Module and parameter names match the checkpoints' tensor names (`self_attn.q_proj.weight`, ...), so a
block's state dict is its slice of the checkpoint with the `model.layers.{i}.` prefix removed.
Shapes: B = batch (sessions), T = new tokens, D = hidden size, H = heads, Dh = head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from shards.errors import UnsupportedModelError
from shards.kv_cache import KVCache
from shards.rotary import apply_rotary

ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu,
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise UnsupportedModelError(f"activation {name!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and cast back before the weight, as the reference models do.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)); `names` are the checkpoint's names for gate, up and down."""

    def __init__(self, hidden: int, intermediate: int, act: str, bias: bool = False,
                 names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")):
        super().__init__()
        self.names = names
        gate, up, down = names
        self.add_module(gate, nn.Linear(hidden, intermediate, bias=bias))
        self.add_module(up, nn.Linear(hidden, intermediate, bias=bias))
        self.add_module(down, nn.Linear(intermediate, hidden, bias=bias))
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act(gate(x)) * up(x))


@dataclass(frozen=True)
class AttentionOptions:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv_bias: bool = False
    output_bias: bool = False
    qk_norm: bool = False  # RMSNorm over each head's queries and keys before rope (Qwen3)
    sliding_window: int | None = None  # attend to at most this many most recent tokens
    rms_eps: float = 1e-6


class Attention(nn.Module):
    def __init__(self, opts: AttentionOptions):
        super().__init__()
        self.opts = opts
        h, dh = opts.hidden_size, opts.head_dim
        self.q_proj = nn.Linear(h, opts.num_heads * dh, bias=opts.qkv_bias)
        self.k_proj = nn.Linear(h, opts.num_kv_heads * dh, bias=opts.qkv_bias)
        self.v_proj = nn.Linear(h, opts.num_kv_heads * dh, bias=opts.qkv_bias)
        self.o_proj = nn.Linear(opts.num_heads * dh, h, bias=opts.output_bias)
        if opts.qk_norm:
            self.q_norm = RMSNorm(dh, opts.rms_eps)
            self.k_norm = RMSNorm(dh, opts.rms_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                caches: list[KVCache] | None, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        o = self.opts
        q = self.q_proj(x).view(B, T, o.num_heads, o.head_dim)
        k = self.k_proj(x).view(B, T, o.num_kv_heads, o.head_dim)
        v = self.v_proj(x).view(B, T, o.num_kv_heads, o.head_dim)
        if o.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rotary(q.transpose(1, 2), cos, sin)  # [B, H, T, Dh]
        k = apply_rotary(k.transpose(1, 2), cos, sin)  # [B, Hkv, T, Dh]
        v = v.transpose(1, 2)
        if caches is None:
            out = self._attend(q, k, v, query_start=0, key_start=0)
        else:
            # Each session attends to its own cache; the projections above and the MLP are batched.
            out = torch.cat([self._attend_cached(q[b:b + 1], k[b], v[b], cache, layer)
                             for b, cache in enumerate(caches)])
        return self.o_proj(out.transpose(1, 2).reshape(B, T, o.num_heads * o.head_dim))

    def _attend_cached(self, q, k, v, cache: KVCache, layer: int) -> torch.Tensor:
        query_start = cache.length
        keys, values = cache.write(layer, k, v)  # [Hkv, L, Dh], L = query_start + T
        key_start = 0
        if self.opts.sliding_window is not None:
            # No query here can see keys before this one, so skip them instead of masking them.
            key_start = max(0, query_start - self.opts.sliding_window + 1)
            keys, values = keys[:, key_start:], values[:, key_start:]
        return self._attend(q, keys[None], values[None], query_start, key_start)

    def _attend(self, q, k, v, query_start: int, key_start: int) -> torch.Tensor:
        """q: [B, H, T, Dh]; k, v: [B, Hkv, L, Dh] holding positions key_start .. key_start + L - 1."""
        mask = attention_mask(query_start, q.shape[2], key_start, k.shape[2], self.opts.sliding_window, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                              enable_gqa=self.opts.num_heads != self.opts.num_kv_heads)


def attention_mask(query_start: int, num_queries: int, key_start: int, num_keys: int,
                   window: int | None, device) -> torch.Tensor | None:
    """Boolean [T, L] mask (True = may attend): causal, and within the sliding window; None if all True."""
    last_query = query_start + num_queries - 1
    causal_needed = last_query - num_queries + 1 < key_start + num_keys - 1
    window_needed = window is not None and key_start <= last_query - window
    if not causal_needed and not window_needed:
        return None
    q_pos = torch.arange(query_start, query_start + num_queries, device=device)[:, None]
    k_pos = torch.arange(key_start, key_start + num_keys, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


class DecoderBlock(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x)). The MLP's name is the family's."""

    def __init__(self, attn: AttentionOptions, mlp: nn.Module, mlp_name: str = "mlp"):
        super().__init__()
        self.self_attn = Attention(attn)
        self.input_layernorm = RMSNorm(attn.hidden_size, attn.rms_eps)
        self.post_attention_layernorm = RMSNorm(attn.hidden_size, attn.rms_eps)
        self.mlp_name = mlp_name
        self.add_module(mlp_name, mlp)

    def forward(self, x, cos, sin, caches: list[KVCache] | None, layer: int) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, caches, layer)
        return x + getattr(self, self.mlp_name)(self.post_attention_layernorm(x))
