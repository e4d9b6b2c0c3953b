"""The embedded default model: a small Llama with random weights and a real tokenizer and chat
template, built offline and deterministically, so a swarm and a chat request work on a fresh
machine without downloading anything.

The tokenizer is a byte-level BPE trained here on the short text below (any UTF-8 text encodes;
frequent English pieces get their own tokens); the chat template is ChatML. The weights are random:
the answers are gibberish, but every layer, every hop and every API is real.
"""

from __future__ import annotations

import os
from pathlib import Path

CORPUS = """\
A peer-to-peer inference mesh lets people who own graphics cards each host a slice of a large
language model. A routing client chains the slices into full forward passes, and a gateway puts the
whole swarm behind one endpoint that speaks the same protocol as the OpenAI API. When a donor
vanishes in the middle of an answer, the client finds another donor for the missing layers, replays
what it sent before, and the answer continues as if nothing had happened.
Hello! How are you today? I am fine, thank you. What is the capital of France? Paris is the capital
of France. Tell me a story about a robot who learns to paint. Once upon a time there was a small
robot. It liked the colours of the sky at sunset, so it tried to paint them every evening.
The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 10 100 1000.
def add(a, b):
    return a + b
"""
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VOCAB_SIZE = 512
DEMO_MODEL_NAME = "mesh-demo-llama"


def build_tokenizer():
    """A PreTrainedTokenizerFast: byte-level BPE trained on CORPUS, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=None, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", unk_token=None)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_demo_model(path: str | Path, seed: int = 0, **overrides) -> Path:
    """Write the demo model (weights, config, tokenizer, chat template) to `path`."""
    from shards.random_model import save_random_model

    path = Path(path)
    tokenizer = build_tokenizer()
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    settings = dict(vocab_size=len(tokenizer), num_hidden_layers=8, hidden_size=128, intermediate_size=256,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                    bos_token_id=None, eos_token_id=eos, pad_token_id=pad, tie_word_embeddings=False)
    settings.update(overrides)
    save_random_model("llama", path, seed=seed, **settings)
    tokenizer.save_pretrained(path)
    return path


def demo_model_dir() -> Path:
    """The demo model in the local cache, created on first use (atomically, so concurrent starts agree)."""
    cache = Path(os.environ.get("MESH_CACHE_DIR", Path.home() / ".cache" / "llm-mesh"))
    path = cache / "models" / DEMO_MODEL_NAME
    if not (path / "tokenizer.json").exists():
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        save_demo_model(tmp)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp.rename(path)
        except OSError:  # another process finished first: keep its copy
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return path
