"""`mesh check`: load a model as a chain of shards on this device and compare it with transformers.

A donor runs it to see that its device computes the model exactly before joining a swarm; with no
model given it uses the embedded demo model, built on first use (nothing is downloaded).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from shards.demo_model import demo_model_dir
from shards.loading import even_splits, load_edges, load_shard, open_checkpoint
from shards.pipeline import LocalPipeline

@dataclass
class CheckReport:
    model: str
    device: str
    splits: list[str]
    max_logit_diff: float | None
    tokens: list[int]
    reference_tokens: list[int] | None
    load_seconds: float
    decode_tokens_per_second: float


def run_check(model: str | None, shards: int = 2, splits: list[str] | None = None, device: str | None = None,
              dtype: str | None = None, quant: str | None = None, prompt_tokens: int = 16,
              new_tokens: int = 16, compare: bool = True) -> CheckReport:
    source = str(model) if model else str(demo_model_dir())
    started = time.perf_counter()
    ckpt = open_checkpoint(source)
    config = ckpt.load_config()
    splits = splits or even_splits(config.num_hidden_layers, shards)
    edges = load_edges(ckpt, device=device, dtype=dtype)
    chain = [load_shard(ckpt, s, device=device, dtype=dtype, quant=quant) for s in splits]
    pipe = LocalPipeline(edges, chain)
    load_seconds = time.perf_counter() - started

    prompt = torch.randint(0, config.vocab_size, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    started = time.perf_counter()
    tokens = pipe.greedy(prompt[0].tolist(), new_tokens)
    decode_rate = new_tokens / (time.perf_counter() - started)

    max_diff = reference_tokens = None
    if compare:
        max_diff, reference_tokens = _compare_with_transformers(ckpt.directory, pipe, prompt, new_tokens, edges)
    return CheckReport(source, edges.device_info.describe(chain[0].dtype), splits, max_diff, tokens,
                       reference_tokens, load_seconds, decode_rate)


def _compare_with_transformers(path, pipe, prompt, new_tokens, edges):
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=edges.dtype).to(edges.device).eval()
    reference.generation_config.eos_token_id = None
    prompt = prompt.to(edges.device)
    with torch.no_grad():
        expected = reference(prompt).logits.float()
    max_diff = (pipe.forward(prompt) - expected).abs().max().item()
    generated = reference.generate(prompt, generation_config=GenerationConfig(
        max_new_tokens=new_tokens, do_sample=False, pad_token_id=0))
    return max_diff, generated[0, prompt.shape[1]:].tolist()


def format_report(report: CheckReport) -> str:
    lines = [f"model    {report.model}", f"device   {report.device}", f"shards   {' '.join(report.splits)}",
             f"loaded   in {report.load_seconds:.2f}s",
             f"decode   {report.decode_tokens_per_second:.1f} tokens/s (greedy, cached)",
             f"tokens   {report.tokens}"]
    if report.reference_tokens is not None:
        same = report.tokens == report.reference_tokens
        lines.append(f"logits   max |shards - transformers| = {report.max_logit_diff:.3g}")
        lines.append(f"greedy   {'identical to' if same else 'DIFFERENT from'} transformers generate")
    return "\n".join(lines)
