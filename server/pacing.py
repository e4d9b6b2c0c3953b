"""How much prompt work a donor takes on at once: no more than computes in about PROMPT_SECONDS.

A donor computes on its event loop's thread (compute.py), so while a prompt runs it answers
nobody, not even a ping. A client that hears nothing for a while pings, and gives the donor up
when the ping is not answered within a few seconds (mesh/transport.py, Liveness). A fixed piece
of 512 tokens is a second or two of a mid-size model on a laptop's CPU, but 9 s of the same model
in bfloat16 on a CPU without bf16 matrix units (benchmarks/RESULTS.md), and more on a large
shard: long enough for every client of the donor to take it for dead. So the donor times its
prompt work and sizes the next pieces by what it measured, within the configured
`prefill_chunk_tokens`; the same bound keeps the decode steps of other sessions from waiting much
longer than PROMPT_SECONDS for a prompt.
"""

from __future__ import annotations

# Seconds of compute one flush's new prompts (or one piece of a long prompt) should take at most:
# well within a client's liveness window (a ping unanswered 5 s after 1 s of silence), yet long
# enough for pieces of hundreds of tokens on a CPU, where shorter ones waste matrix throughput.
PROMPT_SECONDS = 2.0
MIN_PROMPT_TOKENS = 16  # the smallest piece, however slow the donor: below it, per-call costs dominate
SMOOTHING = 0.5  # weight of the newest measurement: one noisy piece moves the estimate only halfway


class PromptPace:
    """The donor's prompt speed (tokens per second of compute), learned from the prompts it ran."""

    def __init__(self, seconds: float = PROMPT_SECONDS):
        self.seconds = seconds
        self.tokens_per_second: float | None = None  # unknown until a prompt of MIN_PROMPT_TOKENS ran

    def observe(self, tokens: int, seconds: float) -> None:
        """A prompt compute of `tokens` tokens (all rows of a batch together) took `seconds`. Shorter
        ones are ignored: their fixed per-call cost would make the donor look slower than it is."""
        if tokens < MIN_PROMPT_TOKENS or seconds <= 0:
            return
        rate = tokens / seconds
        previous = self.tokens_per_second
        self.tokens_per_second = rate if previous is None else previous + SMOOTHING * (rate - previous)

    def budget(self, configured: int) -> int:
        """Prompt tokens to take on in one go: `configured` (the shard's prefill_chunk_tokens) where
        the donor is fast enough or its speed is still unknown, fewer where it is slow."""
        if self.tokens_per_second is None:
            return configured
        fits = int(self.tokens_per_second * self.seconds)
        return max(min(configured, MIN_PROMPT_TOKENS), min(configured, fits))

    def as_dict(self, configured: int) -> dict:
        rate = self.tokens_per_second
        return {"prompt_tokens_per_second": None if rate is None else round(rate, 1),
                "prompt_piece_tokens": self.budget(configured)}
