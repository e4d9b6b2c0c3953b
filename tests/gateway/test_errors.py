"""Every error the gateway promises, checked through the SDK's exception type, status code and `code`."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from client import MeshSessionError, TokenEvent
from client.gateway.serve import GatewayOptions
from tests.gateway.conftest import API_KEY, SERVED

HELLO = [{"role": "user", "content": "Hello!"}]


@pytest.mark.parametrize("change, param", [
    ({"temperature": 5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 20}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),  # a union: no member's name
    ({"stop": 5}, "stop"),
    ({"seed": 2**64}, "seed"),  # beyond int64: a 400, not a 500 from the sampler
])
def test_invalid_values_are_400(sdk, change, param):
    request = {"model": SERVED, "messages": HELLO, "max_tokens": 2, **change}
    with pytest.raises(openai.BadRequestError) as err:
        sdk.chat.completions.create(**request)
    assert err.value.status_code == 400 and err.value.code == "invalid_value"
    assert err.value.body["type"] == "invalid_request_error"
    assert err.value.param == param


def test_union_fields_say_what_they_take(gateway):
    reply = httpx.post(gateway.base_url + "/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                       json={"model": SERVED, "messages": [{"role": "user", "content": 5}]})
    assert reply.status_code == 400
    assert reply.json()["error"]["message"] == "Invalid value for messages.0.content: expected str or list[TextPart]"


def test_nan_is_refused(gateway):
    """NaN compares false to every bound; the SDK cannot send it, but raw JSON clients can."""
    reply = httpx.post(gateway.base_url + "/chat/completions",
                       content=f'{{"model": "{SERVED}", "messages": {json.dumps(HELLO)}, "temperature": NaN}}',
                       headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "temperature"
    assert "finite" in reply.json()["error"]["message"]


def test_malformed_json_body(gateway):
    reply = httpx.post(gateway.base_url + "/chat/completions", content=b'{"model": "x", "messages": [}',
                       headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert reply.status_code == 400
    assert reply.json()["error"] == {"message": "The request body is not valid JSON: send a JSON object "
                                                "(Content-Type: application/json).",
                                     "type": "invalid_request_error", "param": None, "code": "invalid_json"}


def test_oversized_body_is_413_and_a_hopeless_prompt_is_refused_untokenized(gateway, monkeypatch):
    from client.gateway import app as app_module

    headers = {"Authorization": f"Bearer {API_KEY}"}
    monkeypatch.setattr(app_module, "MAX_BODY_BYTES", 4096)
    big = httpx.post(gateway.base_url + "/completions", headers=headers, json={"model": SERVED, "prompt": "x" * 5000})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    monkeypatch.undo()

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("a prompt that cannot fit was tokenized")

    handlers_tokenizer = gateway.app.state.engine.tokenizer
    monkeypatch.setattr(handlers_tokenizer, "apply_chat_template", no_tokenizing)
    long = "x" * 2_000_000  # the demo's 2048 tokens of at most 13 characters each: far fewer
    for path, body in (("/chat/completions", {"messages": [{"role": "user", "content": long}]}),
                       ("/completions", {"prompt": long})):
        reply = httpx.post(gateway.base_url + path, headers=headers, json={"model": SERVED, **body}, timeout=60)
        assert reply.status_code == 400 and reply.json()["error"]["code"] == "context_length_exceeded"


def test_completions_max_tokens_null_means_the_default(sdk):
    request = dict(model=SERVED, prompt="Once upon", temperature=0)
    assert sdk.completions.create(**request, max_tokens=None).usage == sdk.completions.create(**request).usage


def test_unknown_fields_are_ignored(sdk):
    reply = sdk.chat.completions.create(model=SERVED, messages=HELLO, max_tokens=2,
                                        extra_body={"some_future_option": {"x": 1}, "logit_bias": None})
    assert reply.usage.completion_tokens >= 1


def test_api_keys(gateway):
    with pytest.raises(openai.AuthenticationError) as err:
        gateway.sdk(api_key="wrong").models.list()
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    missing = httpx.get(gateway.base_url + "/models")  # the SDK refuses to send no key at all
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    for authorization, status in ((f"bearer {API_KEY}", 200), (API_KEY, 401), (f"Basic {API_KEY}", 401)):
        reply = httpx.get(gateway.base_url + "/models", headers={"Authorization": authorization})
        assert reply.status_code == status, authorization  # the scheme in any case, and only Bearer
    assert httpx.get(gateway.base_url.removesuffix("/v1") + "/health").status_code == 200  # health needs no key


def test_unknown_model_is_404(sdk):
    with pytest.raises(openai.NotFoundError) as err:
        sdk.chat.completions.create(model="gpt-9", messages=HELLO)
    assert err.value.status_code == 404 and err.value.code == "model_not_found" and err.value.param == "model"


def test_context_length_exceeded(sdk):
    with pytest.raises(openai.BadRequestError) as err:
        sdk.chat.completions.create(model=SERVED, messages=HELLO, max_tokens=5000)
    assert err.value.status_code == 400 and err.value.code == "context_length_exceeded"
    assert "maximum context length is 2048 tokens" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        sdk.completions.create(model=SERVED, prompt="word " * 3000, max_tokens=1)
    assert err.value.code == "context_length_exceeded" and err.value.param == "prompt"


def test_chat_without_a_template_is_400_but_completions_work(sdk, gateway):
    tokenizer = gateway.model.tokenizer
    template, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        with pytest.raises(openai.BadRequestError) as err:
            sdk.chat.completions.create(model=SERVED, messages=HELLO, max_tokens=2)
        assert err.value.code == "chat_template_missing"
        assert sdk.completions.create(model=SERVED, prompt="Hello", max_tokens=2).choices[0].text is not None
    finally:
        tokenizer.chat_template = template


def test_no_route_is_503_with_retry_after(demo_swarm, demo_model, start_gateway):
    lonely = start_gateway(GatewayOptions(model=str(demo_model), initial_peers=demo_swarm.initial_peers,
                                          model_name="nobody-serves-this", served_model_name=SERVED,
                                          route_timeout=1))
    with pytest.raises(openai.InternalServerError) as err:
        lonely.sdk().chat.completions.create(model=SERVED, messages=HELLO, max_tokens=2)
    assert err.value.status_code == 503 and err.value.code == "no_route"
    assert err.value.response.headers["Retry-After"] == "5"
    assert "no donor serves layers 0:8" in err.value.message
    health = httpx.get(lonely.base_url.removesuffix("/v1") + "/health")
    assert health.status_code == 503 and health.json()["status"] == "unavailable"


def test_internal_errors_are_json_500(gateway, sdk, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")
        yield  # pragma: no cover - makes this a generator, as the real one is

    monkeypatch.setattr(gateway.model, "stream_events", broken)
    with pytest.raises(openai.InternalServerError) as err:
        sdk.chat.completions.create(model=SERVED, messages=HELLO, max_tokens=2)
    assert err.value.status_code == 500 and err.value.code == "internal_error"
    assert err.value.body["type"] == "server_error" and "a bug" in err.value.message
    assert sdk.models.list().data  # and the gateway keeps serving


def test_failure_mid_stream_ends_with_an_error_event(gateway, sdk, monkeypatch):
    def fails_after_two_tokens(ids, max_new_tokens, params, stop_tokens=None, *, on_session=None, **kwargs):
        on_session(None)
        yield TokenEvent(70)
        yield TokenEvent(71)
        raise MeshSessionError("giving up after 8 failovers; last error from 127.0.0.1:1 on layers 4:8")

    monkeypatch.setattr(gateway.model, "stream_events", fails_after_two_tokens)
    received = []
    with pytest.raises(openai.APIError) as err:
        for chunk in sdk.chat.completions.create(model=SERVED, messages=HELLO, max_tokens=10, stream=True):
            received.append(chunk)
    assert "giving up after 8 failovers" in err.value.message
    assert received and received[0].choices[0].delta.role == "assistant"  # the stream had started
    metrics = httpx.get(gateway.base_url.removesuffix("/v1") + "/metrics").text
    assert "mesh_stream_errors_total 1.0" in metrics
