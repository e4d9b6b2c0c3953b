"""Rotary position embeddings: cos/sin tables for any positions, per token.

Positions are given per token ([batch, tokens]) so that sessions at different lengths can share
one batched step. The default rope is computed here; scaled variants whose frequencies do not
depend on the sequence length (linear, llama3, yarn) take their frequencies from transformers,
which owns those formulas as part of each model's config semantics.
"""

from __future__ import annotations

import torch

from shards.errors import UnsupportedModelError

# Rope types whose inverse frequencies are fixed once the config is known.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_parameters(config) -> dict:
    params = getattr(config, "rope_parameters", None) or {}
    if not params and getattr(config, "rope_theta", None) is not None:
        params = {"rope_type": "default", "rope_theta": config.rope_theta}
    return dict(params)


class RotaryEmbedding:
    """cos/sin for rotary embeddings; holds no weights, only the inverse frequencies."""

    def __init__(self, config, head_dim: int, device: torch.device | str = "cpu"):
        params = rope_parameters(config)
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in STATIC_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope_type {rope_type!r} is not supported; supported rope types: {', '.join(STATIC_ROPE_TYPES)}"
            )
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise UnsupportedModelError("partial rotary embeddings (partial_rotary_factor < 1) are not supported")
        if rope_type == "default":
            theta = params.get("rope_theta", 10000.0)
            exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
            self.inv_freq = (1.0 / (theta**exponents)).to(device)  # [head_dim / 2]
            self.attention_scaling = 1.0
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            inv_freq, self.attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device(device))
            self.inv_freq = inv_freq.to(device=device, dtype=torch.float32)

    def to(self, device: torch.device | str) -> "RotaryEmbedding":
        self.inv_freq = self.inv_freq.to(device)
        return self

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [batch, tokens] -> cos, sin: [batch, tokens, head_dim] in `dtype`."""
        freqs = positions[..., None].float() * self.inv_freq  # [B, T, head_dim / 2], float32 on purpose
        angles = torch.cat((freqs, freqs), dim=-1)
        cos = angles.cos() * self.attention_scaling
        sin = angles.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, T, head_dim]; cos/sin: [B, T, head_dim]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin
