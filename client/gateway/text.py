"""From token ids to the text a client sees: incremental decoding, stop sequences, logprob entries."""

from __future__ import annotations

import re


# Tokens decoded again before the new ones: how a token reads can depend on the ones before it
# (a word-start marker, a space the tokenizer's clean-up removes before punctuation).
DECODE_CONTEXT = 4


class TextStream:
    """Turns a growing list of token ids into text deltas, holding back what a stop sequence or an
    unfinished UTF-8 character might still change.

    Each new token decodes only itself and a few tokens before it, not the whole answer again (that
    grew quadratically with the answer's length); `finish` decodes everything once, so the final
    text is exactly the tokenizer's."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.ids: list[int] = []
        self.emitted = 0  # characters of `text` already handed out
        self.text = ""
        self.stopped = False
        self._settled = 0  # ids[:_settled] decode to text that later tokens no longer change

    def push(self, token: int) -> str:
        """Add one token; return the new text that is safe to show (possibly empty)."""
        self.ids.append(token)
        text = self._decode_new()
        if text.endswith("\ufffd"):
            return ""  # the rest of a multi-byte character is still to come
        self.text, self._settled = text, len(self.ids)
        for stop in self.stops:
            found = text.find(stop, max(0, self.emitted - len(stop)))
            if found != -1:
                self.text = text = text[:found]
                self.stopped = True
        if self.stopped:
            return self._emit(len(text))
        return self._emit(len(text) - self._held_back(text))

    def _decode_new(self) -> str:
        """The whole text so far: the settled text, plus what the tokens after it add when decoded
        with a few tokens of context before them."""
        start = max(0, self._settled - DECODE_CONTEXT)
        before = self._decode(self.ids[start:self._settled])
        after = self._decode(self.ids[start:])
        if not after.startswith(before):
            return self._decode(self.ids)  # the new token changed how its context reads: decode it all
        return self.text + after[len(before):]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def finish(self) -> str:
        """The rest of the text once generation ended."""
        if not self.stopped:
            self.text = self._decode(self.ids)
        return self._emit(len(self.text))

    def _held_back(self, text: str) -> int:
        """Length of the longest end of `text` that begins some stop sequence."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def _emit(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        delta, self.emitted = self.text[self.emitted:upto], upto
        return delta


def longest_token_characters(tokenizer) -> int:
    """An upper bound on the characters of text one token stands for: its longest entry in the
    vocabulary as written there (byte-level and byte-fallback spellings are at least as long as the
    text they stand for). 1 << 20 when there is no tokenizer to ask."""
    if tokenizer is None:
        return 1 << 20
    spellings = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return max((len(s) for s in spellings if s), default=1)


def token_text(tokenizer, token: int) -> str:
    return tokenizer.decode([token], skip_special_tokens=False)


def token_bytes(tokenizer, token: int, text: str) -> list[int]:
    """The bytes a token stands for. Usually its text's UTF-8; but a token holding part of a
    multi-byte character decodes alone to U+FFFD, and then its bytes come from its vocabulary
    spelling: <0xE2> (byte fallback) or the byte-level alphabet (GPT-2 style BPE)."""
    if "\ufffd" not in text:
        return list(text.encode("utf-8"))
    spelling = tokenizer.convert_ids_to_tokens(token)
    fallback = BYTE_FALLBACK.fullmatch(spelling or "")
    if fallback:
        return [int(fallback[1], 16)]
    if spelling and all(c in BYTE_LEVEL_ALPHABET for c in spelling):
        return [BYTE_LEVEL_ALPHABET[c] for c in spelling]
    return list(text.encode("utf-8"))


BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_alphabet() -> dict[str, int]:
    """Character -> byte of byte-level BPE vocabularies: printable bytes stand for themselves, the
    others (controls, space, DEL, no-break space, soft hyphen) for characters from U+0100 on, in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    alphabet = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in alphabet.values()]
    alphabet.update({chr(256 + n): b for n, b in enumerate(others)})
    return alphabet


BYTE_LEVEL_ALPHABET = _byte_level_alphabet()


def chat_logprob_entry(tokenizer, token: int, logprob: float, top: list[tuple[int, float]]) -> dict:
    def entry(t: int, lp: float) -> dict:
        text = token_text(tokenizer, t)
        return {"token": text, "logprob": lp, "bytes": token_bytes(tokenizer, t, text)}

    return {**entry(token, logprob), "top_logprobs": [entry(t, lp) for t, lp in top]}
