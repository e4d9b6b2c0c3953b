"""int8 and nf4 shards run on this CPU, and their error against the fp32 shard stays within stated bounds.

The error measured is relative to what the shard adds to the residual stream:
    |quantized(x) - fp32(x)| / |fp32(x) - x|
on real activations (embedded tokens) of a model with the usual 0.02 weight scale.
Bounds: int8 (LLM.int8 without outlier split) 0.04; nf4 (4-bit NormalFloat, blocks of 64) 0.30.
Measured when written: int8 about 0.016, nf4 about 0.15 over 6 layers.
"""

from __future__ import annotations

import pytest
import torch

from shards import load_edges, load_shard
from tests.conftest import random_prompt

ERROR_BOUND = {"int8": 0.04, "nf4": 0.30}
SIZE = dict(hidden_size=256, intermediate_size=512, initializer_range=0.02)


@pytest.fixture(scope="module")
def realistic_llama(model_dir):
    return model_dir("llama", **SIZE)


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_quantized_shard_error_is_bounded(realistic_llama, quant):
    x = load_edges(realistic_llama).embed(random_prompt(24, seed=3))
    full = load_shard(realistic_llama, "0:6")
    quantized = load_shard(realistic_llama, "0:6", quant=quant)
    expected = full(x)
    got = quantized(x)
    error = ((got - expected).norm() / (expected - x).norm()).item()
    print(f"{quant}: relative error of the shard's contribution {error:.4f} (bound {ERROR_BOUND[quant]})")
    assert error <= ERROR_BOUND[quant]
    assert error > 0, "a quantized shard identical to fp32 means quantization did not happen"
    assert quantized.weight_bytes() < full.weight_bytes() / (3 if quant == "int8" else 6)
    assert quantized.quantization == quant


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_quantized_moe_shard_keeps_router_in_full_precision(model_dir, quant):
    import bitsandbytes as bnb

    path = model_dir("qwen2_moe", hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                     shared_expert_intermediate_size=128, initializer_range=0.02)
    shard = load_shard(path, "0:2", quant=quant)
    moe = shard.blocks[1].mlp  # decoder_sparse_step=2: layer 1 is sparse
    assert type(moe.gate) is torch.nn.Linear and type(moe.shared_expert_gate) is torch.nn.Linear
    expected_type = bnb.nn.Linear8bitLt if quant == "int8" else bnb.nn.Linear4bit
    assert isinstance(moe.experts[0].up_proj, expected_type)
    x = load_edges(path).embed(random_prompt(10))
    full = load_shard(path, "0:2")
    error = ((shard(x) - full(x)).norm() / (full(x) - x).norm()).item()
    assert error <= ERROR_BOUND[quant]


def test_unknown_quantization_is_refused(realistic_llama):
    from shards import DtypeNotSupportedError

    with pytest.raises(DtypeNotSupportedError, match="unknown quantization 'int4'; choose one of int8, nf4"):
        load_shard(realistic_llama, "0:1", quant="int4")


def test_nf4_on_cpu_refuses_layer_sizes_its_kernel_cannot_pack(model_dir):
    from shards import DtypeNotSupportedError

    path = model_dir("qwen2_moe")  # experts of 48 rows
    with pytest.raises(DtypeNotSupportedError, match=r"model.layers.1.mlp.experts.0.gate_proj is 64 -> 48"):
        load_shard(path, "0:2", quant="nf4")
