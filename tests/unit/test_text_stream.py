"""The gateway's incremental detokenizer: what a streaming client sees, token by token, must add up
to exactly the tokenizer's own decoding, stop sequences must cut where they begin, and each new
token must cost a few tokens' decoding, not the whole answer's."""

from __future__ import annotations

import pytest

from client.gateway.text import DECODE_CONTEXT, TextStream

TEXTS = [
    "Hello, mesh! The swarm answers: don't panic.",
    "naïve café, 東京 and 🙂🚀 in one line\nand a second line with   spaces.",
    "Zürich → 😀 ü 你好世界 ¿qué? «ça» 123,456.78",
]


def byte_level_tokenizer():
    from shards.demo_model import build_tokenizer

    return build_tokenizer()


def metaspace_tokenizer():
    """Sentencepiece-style: words start with '▁', and a decoded text drops its first space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"], show_progress=False)
    core.train_from_iterator(TEXTS * 3, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", unk_token="<unk>")


TOKENIZERS = {"byte-level BPE": byte_level_tokenizer, "metaspace": metaspace_tokenizer}


@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def tokenizer(request):
    return TOKENIZERS[request.param]()


class CountingTokenizer:
    """Passes decode through, remembering how many ids each call decoded."""

    def __init__(self, tokenizer):
        self.tokenizer, self.lengths = tokenizer, []

    def decode(self, ids, **kwargs):
        self.lengths.append(len(ids))
        return self.tokenizer.decode(ids, **kwargs)


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_add_up_to_the_tokenizers_decoding(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    stream = TextStream(tokenizer, stops=[])
    shown = ""
    for count, token in enumerate(ids, 1):
        shown += stream.push(token)
        expected = tokenizer.decode(ids[:count], skip_special_tokens=True)
        assert expected.startswith(shown)
        if not expected.endswith("\ufffd"):
            assert shown == expected  # nothing held back without a stop sequence
    shown += stream.finish()
    assert shown == tokenizer.decode(ids, skip_special_tokens=True)


def test_a_half_character_is_held_back_until_it_is_whole():
    tokenizer = byte_level_tokenizer()
    ids = tokenizer.encode("🙂", add_special_tokens=False)
    assert len(ids) > 1  # the emoji's four bytes are several tokens
    stream = TextStream(tokenizer, stops=[])
    deltas = [stream.push(token) for token in ids]
    assert deltas[:-1] == [""] * (len(ids) - 1) and deltas[-1].endswith("🙂")


def test_a_stop_sequence_cuts_the_text_where_it_begins(tokenizer):
    text = "Hello, mesh! The swarm answers: don't panic."
    ids = tokenizer.encode(text, add_special_tokens=False)
    stream = TextStream(tokenizer, stops=["answers"])
    shown = ""
    for token in ids:
        shown += stream.push(token)
        assert "answer" not in shown  # a stop's beginning is held back, never shown
        if stream.stopped:
            break
    shown += stream.finish()
    assert stream.stopped
    assert shown == tokenizer.decode(ids, skip_special_tokens=True)[:text.index("answers")]


def test_each_token_decodes_a_few_tokens_not_the_whole_answer(tokenizer):
    ids = tokenizer.encode(" ".join(TEXTS) * 8, add_special_tokens=False)
    counting = CountingTokenizer(tokenizer)
    stream = TextStream(counting, stops=["never appears"])
    shown = "".join(stream.push(token) for token in ids) + stream.finish()
    assert shown == tokenizer.decode(ids, skip_special_tokens=True)
    per_push = counting.lengths[:-1]  # the last call is finish's one full decode
    assert len(ids) > 200
    # a character split over several tokens widens the window by those tokens, no more
    assert max(per_push) <= DECODE_CONTEXT + 4
    assert sum(per_push) < 2 * (DECODE_CONTEXT + 2) * len(ids)
