"""Qwen2: biases on q/k/v (not on the output), sliding window on the layers `layer_types` marks."""

from shards.families.base import Family, attention_options, dense_mlp, window_from_layer_types


def _attention(config, layer):
    return attention_options(config, qkv_bias=True, sliding_window=window_from_layer_types(config, layer))


def _mlp(config, layer):
    return dense_mlp(config)


FAMILIES = [Family("qwen2", _attention, _mlp)]
