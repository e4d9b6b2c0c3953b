"""Model families, found by the checkpoint's `model_type`.

Map:
  base.py     the Family record and helpers shared by every family (head dim, attention options)
  llama.py    Llama (the plain block)
  mistral.py  Mistral (sliding window on every layer)
  qwen2.py    Qwen2 (q/k/v bias, sliding window on the layers the config names)
  qwen3.py    Qwen3 (RMSNorm on queries and keys per head)
  mixtral.py  Mixtral (sparse MoE, experts named w1/w3/w2)
  qwen_moe.py Qwen2-MoE and Qwen3-MoE (sparse MoE, Qwen2's shared expert)
"""

from __future__ import annotations

from shards.errors import UnsupportedModelError
from shards.families import llama, mistral, mixtral, qwen2, qwen3, qwen_moe
from shards.families.base import Family

FAMILIES: dict[str, Family] = {}
for _module in (llama, mistral, qwen2, qwen3, mixtral, qwen_moe):
    for _family in _module.FAMILIES:
        FAMILIES[_family.model_type] = _family


def supported_model_types() -> list[str]:
    return sorted(FAMILIES)


def family_for(config) -> Family:
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported model types: {', '.join(supported_model_types())}"
        )
    return FAMILIES[model_type]


__all__ = ["FAMILIES", "Family", "family_for", "supported_model_types"]
