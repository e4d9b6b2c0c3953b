"""The real `openai` SDK, with strict response validation, against the gateway over a loopback swarm.
Every text must equal what the Python client generates for the same request and seed."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import openai
import pytest

from mesh.transport import Connection
from tests.gateway.conftest import API_KEY, SERVED

CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "What is the capital"}, {"type": "text", "text": " of France?"}]}]


def reference_text(gateway, ids, max_tokens, stop=(), **sampling) -> tuple[str, list[int]]:
    """What the Python client generates for these ids and parameters, as the gateway would show it."""
    model = gateway.model
    tokens = model.generate(ids, max_new_tokens=max_tokens, **sampling)
    text = model.tokenizer.decode(tokens, skip_special_tokens=True)
    for s in stop:
        if s in text:
            text = text[:text.index(s)]
    return text, tokens


def chat_ids(gateway, messages) -> list[int]:
    flat = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str)
             else "".join(p["text"] for p in m["content"])} for m in messages]
    text = gateway.model.tokenizer.apply_chat_template(flat, add_generation_prompt=True, tokenize=False)
    return gateway.model.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_models(sdk):
    assert [m.id for m in sdk.models.list().data] == [SERVED]
    assert sdk.models.retrieve(SERVED).owned_by == "llm-mesh"
    with pytest.raises(openai.NotFoundError) as err:
        sdk.models.retrieve("gpt-9")
    assert err.value.status_code == 404 and err.value.code == "model_not_found"


def test_chat_matches_the_python_client(sdk, gateway):
    reply = sdk.chat.completions.create(model=SERVED, messages=CHAT, max_tokens=16, temperature=0.8, seed=7)
    expected, tokens = reference_text(gateway, chat_ids(gateway, CHAT), 16, temperature=0.8, seed=7)
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion"
    [choice] = reply.choices
    assert choice.message.content == expected and choice.message.role == "assistant"
    assert choice.message.refusal is None and choice.logprobs is None
    assert choice.finish_reason == ("stop" if len(tokens) < 16 else "length")
    assert reply.usage.prompt_tokens == len(chat_ids(gateway, CHAT))
    assert reply.usage.completion_tokens == len(tokens)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + len(tokens)


def test_chat_stream_with_usage(sdk, gateway):
    chunks = list(sdk.chat.completions.create(model=SERVED, messages=CHAT, max_tokens=16, temperature=0.8, seed=7,
                                              stream=True, stream_options={"include_usage": True}))
    expected, tokens = reference_text(gateway, chat_ids(gateway, CHAT), 16, temperature=0.8, seed=7)
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    content = [c for c in chunks[1:] if c.choices and c.choices[0].delta.content]
    assert len(content) >= 2, "tokens must arrive as separate chunks, not one buffered block"
    assert "".join(c.choices[0].delta.content for c in content) == expected
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason in ("stop", "length")
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == len(tokens)
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_with_a_list_prompt_and_n(sdk, gateway):
    prompts = ["The quick brown", "Once upon a time"]
    reply = sdk.completions.create(model=SERVED, prompt=prompts, max_tokens=8, n=2, temperature=0.9, seed=11)
    assert reply.id.startswith("cmpl-") and len(reply.choices) == 4
    tokenizer = gateway.model.tokenizer
    for choice in reply.choices:
        prompt_index, i = divmod(choice.index, 2)
        ids = tokenizer(prompts[prompt_index], add_special_tokens=False)["input_ids"]
        expected, _ = reference_text(gateway, ids, 8, temperature=0.9, seed=11 + i)  # choice i: seed + i
        assert choice.text == expected
    assert reply.choices[0].text != reply.choices[1].text  # different seeds, different samples
    assert reply.usage.prompt_tokens == sum(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)


def test_completions_echo_with_logprobs_and_token_prompts(sdk, gateway):
    ids = gateway.model.tokenizer("Hello! How are you", add_special_tokens=False)["input_ids"]
    reply = sdk.completions.create(model=SERVED, prompt=[ids], max_tokens=5, echo=True, logprobs=2, temperature=0)
    [choice] = reply.choices
    expected, tokens = reference_text(gateway, ids, 5)
    assert choice.text == "Hello! How are you" + expected
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(ids) + len(tokens) == len(logprobs.token_logprobs) == len(logprobs.text_offset)
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)
    # greedy: each generated token is the most likely one, so its logprob is the best alternative's
    for lp, top in zip(logprobs.token_logprobs[len(ids):], logprobs.top_logprobs[len(ids):]):
        assert lp == pytest.approx(max(top.values()), abs=1e-6)


def test_streamed_completion_logprobs_equal_the_whole_reply(sdk, gateway):
    ids = gateway.model.tokenizer("Hello! How are you", add_special_tokens=False)["input_ids"]
    request = dict(model=SERVED, prompt=[ids], max_tokens=6, echo=True, logprobs=2, temperature=0)
    whole = sdk.completions.create(**request).choices[0].logprobs
    # The SDK's strict mode types a completion chunk's finish_reason as never null, which OpenAI's own
    # streams send before the last chunk too: this one stream is read in the SDK's default mode.
    lenient = gateway.sdk(_strict_response_validation=False)
    parts = [choice.logprobs for chunk in lenient.completions.create(**request, stream=True)
             for choice in chunk.choices if choice.logprobs]
    assert len(parts) > 1  # the echoed prompt's, then the generated tokens' as they come
    for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [x for part in parts for x in getattr(part, field)] == getattr(whole, field)


def test_logprob_bytes_rebuild_text_split_inside_a_character(sdk, gateway):
    """Tokens that hold part of a UTF-8 character read as U+FFFD alone; their bytes are still exact."""
    reply = sdk.chat.completions.create(model=SERVED, messages=[{"role": "user", "content": "Say é and €"}],
                                        max_tokens=24, logprobs=True, top_logprobs=2, seed=7, temperature=1.0)
    entries = reply.choices[0].logprobs.content
    assert bytes(b for e in entries for b in e.bytes).decode("utf-8", "replace") == reply.choices[0].message.content
    tokenizer = gateway.model.tokenizer
    e_acute = tokenizer("é", add_special_tokens=False)["input_ids"]
    assert len(e_acute) == 2  # the demo vocabulary spells é in two byte tokens: each reads as U+FFFD
    from client.gateway.text import token_bytes, token_text
    assert [token_bytes(tokenizer, t, token_text(tokenizer, t)) for t in e_acute] == [[0xC3], [0xA9]]


def test_chat_logprobs(sdk):
    reply = sdk.chat.completions.create(model=SERVED, messages=CHAT, max_tokens=4, logprobs=True, top_logprobs=3,
                                        temperature=0)
    entries = reply.choices[0].logprobs.content
    assert len(entries) == reply.usage.completion_tokens
    assert all(len(e.top_logprobs) == 3 and e.logprob == pytest.approx(e.top_logprobs[0].logprob) for e in entries)
    # Streamed, the same entries arrive spread over the chunks.
    stream = sdk.chat.completions.create(model=SERVED, messages=CHAT, max_tokens=4, logprobs=True, top_logprobs=3,
                                         temperature=0, stream=True)
    streamed = [entry for chunk in stream for choice in chunk.choices if choice.logprobs
                for entry in choice.logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]


def test_stop_sequence(sdk, gateway):
    ids = gateway.model.tokenizer("The quick brown fox", add_special_tokens=False)["input_ids"]
    full, _ = reference_text(gateway, ids, 24, stop_tokens=[])
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop.strip(), f"need a visible stop string in {full!r}"
    reply = sdk.completions.create(model=SERVED, prompt="The quick brown fox", max_tokens=24, stop=[stop],
                                   temperature=0)
    assert reply.choices[0].text == full[:full.index(stop)]
    assert reply.choices[0].finish_reason == "stop"
    # Streamed legacy completions carry "finish_reason": null until the last chunk, as the API does;
    # the SDK's type for them admits no null, so this one call goes without strict validation.
    lenient = gateway.sdk(_strict_response_validation=False)
    chunks = list(lenient.completions.create(model=SERVED, prompt="The quick brown fox", max_tokens=24, stop=stop,
                                             stream=True, temperature=0))
    assert "".join(c.choices[0].text for c in chunks) == reply.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks][-1] == "stop"


def test_32_concurrent_streams(gateway):
    async def one(client, seed):
        stream = await client.chat.completions.create(model=SERVED, messages=CHAT, max_tokens=8, temperature=1.0,
                                                      seed=seed, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def all_of_them():
        client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key=API_KEY, _strict_response_validation=True,
                                    max_retries=0, timeout=300)
        try:
            return await asyncio.gather(*(one(client, seed) for seed in range(32)))
        finally:
            await client.close()

    texts = asyncio.run(all_of_them())  # any 5xx would raise here
    ids = chat_ids(gateway, CHAT)
    for seed, text in enumerate(texts):
        assert text == reference_text(gateway, ids, 8, temperature=1.0, seed=seed)[0]


def donor_sessions(swarm) -> int:
    total = 0
    for donor in swarm.donors:
        connection = Connection.open("127.0.0.1", donor.port)
        try:
            total += connection.request({"type": "info"}, timeout=10).header["sessions"]
        finally:
            connection.close()
    return total


def test_disconnect_mid_stream_frees_the_donor_sessions(gateway, demo_swarm):
    assert donor_sessions(demo_swarm) == 0
    with httpx.stream("POST", f"{gateway.base_url}/chat/completions", timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"model": SERVED, "messages": CHAT, "max_tokens": 1500, "stream": True}) as response:
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
        assert donor_sessions(demo_swarm) == 2  # one session per donor while the stream runs
    deadline = time.monotonic() + 15
    while donor_sessions(demo_swarm) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert donor_sessions(demo_swarm) == 0


def generated_tokens(gateway) -> float:
    text = httpx.get(gateway.base_url.removesuffix("/v1") + "/metrics").text
    return float(re.search(r"^mesh_generated_tokens_total (\S+)$", text, re.M).group(1))


def test_a_client_that_leaves_before_a_whole_answer_stops_its_generation(gateway, demo_swarm):
    """Not streamed, nothing is written until the end, so no failed write tells the gateway that the
    client left: it must notice the disconnect itself. Here the client leaves as soon as it has sent."""
    import socket

    body = json.dumps({"model": SERVED, "messages": CHAT, "max_tokens": 1500}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    assert donor_sessions(demo_swarm) == 0
    with socket.create_connection(("127.0.0.1", gateway.port)) as sock:
        sock.sendall(head + body)
    time.sleep(2.0)  # the whole answer takes over 10 s; had it gone on, its sessions would still be open
    assert donor_sessions(demo_swarm) == 0
    before = generated_tokens(gateway)
    time.sleep(1.0)
    assert generated_tokens(gateway) == before  # no token is generated for nobody


def test_metrics_after_requests(sdk, gateway):
    sdk.chat.completions.create(model=SERVED, messages=CHAT, max_tokens=6, stream=False)
    list(sdk.chat.completions.create(model=SERVED, messages=CHAT, max_tokens=6, stream=True))
    text = httpx.get(gateway.base_url.removesuffix("/v1") + "/metrics").text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values['mesh_requests_total{endpoint="/v1/chat/completions",status="200"}'] >= 2
    assert values["mesh_requests_in_flight"] >= 1  # this scrape itself
    for histogram in ("mesh_time_to_first_token_seconds", "mesh_inter_token_latency_seconds",
                      "mesh_request_duration_seconds", "mesh_hop_latency_seconds"):
        count, total = values[f"{histogram}_count"], values[f"{histogram}_sum"]
        assert count >= 1 and 0 < total / count < 60, histogram
    # Two donors: every decode step (one per generated token, the prefill counting as the first) is two hops.
    assert values["mesh_hop_latency_seconds_count"] >= 2 * values["mesh_generated_tokens_total"]
    assert values["mesh_prompt_tokens_total"] >= 2 * len(chat_ids(gateway, CHAT))
    assert values["mesh_generated_tokens_total"] >= 12
    assert "mesh_failovers_total" in values and "mesh_stream_errors_total" in values


def test_health(gateway):
    response = httpx.get(gateway.base_url.removesuffix("/v1") + "/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}
