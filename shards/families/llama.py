"""Llama: the plain pre-norm block with optional attention and MLP biases."""

from shards.families.base import Family, attention_options, dense_mlp


def _attention(config, layer):
    bias = bool(getattr(config, "attention_bias", False))
    return attention_options(config, qkv_bias=bias, output_bias=bias)


def _mlp(config, layer):
    return dense_mlp(config, bias=bool(getattr(config, "mlp_bias", False)))


FAMILIES = [Family("llama", _attention, _mlp)]
