"""Qwen2-MoE and Qwen3-MoE: sparse MoE on every `decoder_sparse_step`-th layer not in `mlp_only_layers`.

Qwen2-MoE adds a shared expert behind a sigmoid gate and has q/k/v biases; Qwen3-MoE has per-head
q/k RMSNorm and no shared expert.
"""

from shards.families.base import Family, attention_options, dense_mlp, window_from_layer_types
from shards.moe import SparseMoE


def _is_sparse(config, layer) -> bool:
    return (layer not in (getattr(config, "mlp_only_layers", None) or [])
            and config.num_experts > 0 and (layer + 1) % config.decoder_sparse_step == 0)


def _moe_mlp(config, layer, shared_intermediate):
    if not _is_sparse(config, layer):
        return dense_mlp(config)
    return "mlp", SparseMoE(config.hidden_size, config.moe_intermediate_size, config.num_experts,
                            config.num_experts_per_tok, config.hidden_act,
                            normalize_top_k=bool(config.norm_topk_prob), shared_intermediate=shared_intermediate)


def _qwen2_attention(config, layer):
    return attention_options(config, qkv_bias=bool(getattr(config, "qkv_bias", True)),
                             sliding_window=window_from_layer_types(config, layer))


def _qwen2_mlp(config, layer):
    return _moe_mlp(config, layer, config.shared_expert_intermediate_size)


def _qwen3_attention(config, layer):
    bias = bool(getattr(config, "attention_bias", False))
    return attention_options(config, qkv_bias=bias, output_bias=bias, qk_norm=True,
                             sliding_window=getattr(config, "sliding_window", None))


def _qwen3_mlp(config, layer):
    return _moe_mlp(config, layer, None)


FAMILIES = [Family("qwen2_moe", _qwen2_attention, _qwen2_mlp),
            Family("qwen3_moe", _qwen3_attention, _qwen3_mlp)]
