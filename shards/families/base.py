"""The Family record: how one model_type builds its decoder blocks and names its tensors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from shards.layers import AttentionOptions, DecoderBlock, GatedMLP


@dataclass(frozen=True)
class Family:
    model_type: str
    attention: Callable[[object, int], AttentionOptions]  # (config, layer index) -> options
    mlp: Callable[[object, int], tuple[str, nn.Module]]  # (config, layer index) -> (name, module)
    layer_prefix: str = "model.layers.{}."
    embed_name: str = "model.embed_tokens.weight"
    norm_name: str = "model.norm.weight"
    head_name: str = "lm_head.weight"

    def build_block(self, config, layer: int) -> DecoderBlock:
        name, mlp = self.mlp(config, layer)
        return DecoderBlock(self.attention(config, layer), mlp, mlp_name=name)


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def attention_options(config, **switches) -> AttentionOptions:
    """The attention options every family shares, plus the family's own switches."""
    return AttentionOptions(
        hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=head_dim(config),
        rms_eps=config.rms_norm_eps,
        **switches,
    )


def dense_mlp(config, intermediate: int | None = None, bias: bool = False) -> tuple[str, nn.Module]:
    return "mlp", GatedMLP(config.hidden_size, intermediate or config.intermediate_size, config.hidden_act, bias)


def window_from_layer_types(config, layer: int) -> int | None:
    """Sliding window for configs that list each layer's attention type (Qwen2, Qwen3, Qwen2-MoE)."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types and layer_types[layer] == "sliding_attention":
        return config.sliding_window
    return None
