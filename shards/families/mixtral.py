"""Mixtral: Mistral attention with a sparse MoE MLP (`block_sparse_moe`, experts w1=gate, w3=up, w2=down)."""

from shards.families.base import Family, attention_options
from shards.moe import SparseMoE


def _attention(config, layer):
    return attention_options(config, sliding_window=getattr(config, "sliding_window", None))


def _mlp(config, layer):
    moe = SparseMoE(config.hidden_size, config.intermediate_size, config.num_local_experts,
                    config.num_experts_per_tok, config.hidden_act, normalize_top_k=True,
                    expert_names=("w1", "w3", "w2"))
    return "block_sparse_moe", moe


FAMILIES = [Family("mixtral", _attention, _mlp)]
