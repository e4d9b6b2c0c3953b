"""Small checkpoints with random weights, for tests, demos and benchmarks (nothing is downloaded).

`save_random_model("llama", path)` builds the family's transformers model from a small config with a
fixed seed and writes it with `save_pretrained`, so it has exactly the files and tensor names of a
real hub checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Small but complete: grouped-query attention, several layers, every family switch exercised.
BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=512,
            initializer_range=0.15)
# Embeddings wider than the other weights: with the default scale greedy decoding of a random model
# repeats one token, and a test that compares such outputs proves little.
EMBEDDING_STD = 0.3

FAMILY_OVERRIDES: dict[str, dict] = {
    "llama": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 64}),
    "mistral": dict(sliding_window=7, head_dim=16),
    "qwen2": dict(use_sliding_window=True, sliding_window=5, max_window_layers=3, tie_word_embeddings=True),
    "qwen3": dict(head_dim=24),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                      shared_expert_intermediate_size=96, decoder_sparse_step=2, norm_topk_prob=False),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True,
                      mlp_only_layers=[1]),
}


def random_config(model_type: str, **overrides):
    from transformers import AutoConfig

    if model_type not in FAMILY_OVERRIDES:
        raise ValueError(f"no random config for {model_type!r}; known: {', '.join(FAMILY_OVERRIDES)}")
    kwargs = {**BASE, **FAMILY_OVERRIDES[model_type], **overrides}
    return AutoConfig.for_model(model_type, **kwargs)


def save_random_model(model_type: str, path: str | Path, seed: int = 0, max_shard_size: str | None = None,
                      **overrides) -> Path:
    """Write a random `model_type` checkpoint to `path` (created if needed) and return the path."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a tiny model does not need a progress bar on every save
    config = random_config(model_type, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, EMBEDDING_STD)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return path
