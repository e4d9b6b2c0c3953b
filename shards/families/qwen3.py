"""Qwen3: per-head RMSNorm of queries and keys before rope; optional attention bias."""

from shards.families.base import Family, attention_options, dense_mlp, window_from_layer_types


def _attention(config, layer):
    bias = bool(getattr(config, "attention_bias", False))
    return attention_options(config, qkv_bias=bias, output_bias=bias, qk_norm=True,
                             sliding_window=window_from_layer_types(config, layer))


def _mlp(config, layer):
    return dense_mlp(config)


FAMILIES = [Family("qwen3", _attention, _mlp)]
