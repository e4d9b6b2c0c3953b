"""Mistral: the Llama block with a sliding attention window on every layer when the config sets one."""

from shards.families.base import Family, attention_options, dense_mlp


def _attention(config, layer):
    return attention_options(config, sliding_window=getattr(config, "sliding_window", None))


def _mlp(config, layer):
    return dense_mlp(config)


FAMILIES = [Family("mistral", _attention, _mlp)]
