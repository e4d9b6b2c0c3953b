"""bf16 exactness on a CUDA or ROCm GPU, against transformers in bf16 on the same device.

Skipped where no GPU is present. Tolerance (stated): logits within 5e-2 absolute + 2e-2 relative
(bf16 has 8 bits of mantissa, and the two implementations may split GEMMs differently), and
identical greedy tokens on the dense families, where neither side has data-dependent expert routing.
"""

from __future__ import annotations

import pytest
import torch

from shards import LocalPipeline, load_edges, load_shard
from tests.conftest import random_prompt

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA or ROCm GPU")]


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe"])
def test_bf16_chain_matches_transformers_bf16(model_dir, model_type):
    from transformers import AutoModelForCausalLM, GenerationConfig

    path = model_dir(model_type)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to("cuda").eval()
    reference.generation_config.eos_token_id = None
    pipe = LocalPipeline(load_edges(path, device="cuda", dtype="bf16"),
                         [load_shard(path, s, device="cuda", dtype="bf16") for s in ("0:2", "2:4", "4:6")])
    prompt = random_prompt(20).to("cuda")
    with torch.no_grad():
        expected = reference(prompt).logits.float()
    got = pipe.forward(prompt)
    print(model_type, "max |logit diff| in bf16:", (got - expected).abs().max().item())
    torch.testing.assert_close(got, expected, atol=5e-2, rtol=2e-2)
    if model_type in ("llama", "mistral", "qwen2", "qwen3"):
        config = GenerationConfig(max_new_tokens=16, do_sample=False, pad_token_id=0)
        want = reference.generate(prompt, generation_config=config)[0, 20:].tolist()
        assert pipe.greedy(prompt[0].tolist(), 16) == want
