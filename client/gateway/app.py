"""The FastAPI app: OpenAI's /v1 chat and completions over the mesh, plus /health and /metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from client.gateway.engine import Engine, Generation, GenerationRequest
from client.gateway.errors import APIError, error_body, invalid, model_not_found, unavailable
from client.gateway.metrics import GatewayMetrics
from client.gateway.schemas import ChatRequest, CompletionRequest
from client.gateway.text import TextStream, chat_logprob_entry, longest_token_characters, token_text
from client import ContextLengthError, MeshSessionError, NoRouteError, SamplingParams

log = logging.getLogger("mesh.gateway")
DEFAULT_MAX_TOKENS = 512  # chat requests that name no limit: at most this, or what the context allows
MAX_BODY_BYTES = 32 * 2**20  # larger request bodies are refused (413) before they are read


@dataclass
class GatewaySettings:
    served_model_name: str
    api_keys: list[str] = field(default_factory=list)
    created: int = field(default_factory=lambda: int(time.time()))


def create_app(engine: Engine, settings: GatewaySettings, metrics: GatewayMetrics | None = None) -> FastAPI:
    metrics = metrics or GatewayMetrics()
    engine.model.observer = metrics
    app = FastAPI(title="llm-mesh gateway", docs_url=None, redoc_url=None)
    app.state.engine, app.state.settings, app.state.metrics = engine, settings, metrics
    _install_error_handlers(app)
    _install_accounting(app, settings, metrics)
    api = _Handlers(engine, settings, metrics)
    app.get("/v1/models")(api.list_models)
    app.get("/v1/models/{model_id:path}")(api.get_model)
    app.post("/v1/chat/completions")(api.chat)
    app.post("/v1/completions")(api.completions)
    app.get("/health")(api.health)
    app.get("/metrics")(api.metrics_page)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, err: RequestValidationError):
        return JSONResponse(validation_error_body(err.errors()), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, err: StarletteHTTPException):
        code = "not_found" if err.status_code == 404 else None
        return JSONResponse(error_body(str(err.detail), "invalid_request_error", None, code),
                            status_code=err.status_code)



def validation_error_body(errors) -> dict:
    """pydantic's first complaint as an OpenAI error: the parameter's path, and for a field that
    takes several types (a union), the types it takes instead of the first one's complaint."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return error_body("The request body is not valid JSON: send a JSON object (Content-Type: application/json).",
                          "invalid_request_error", None, "invalid_json")
    path, tag = _field_path(first.get("loc", ()))
    param = ".".join(path) or None
    message = first.get("msg", "invalid request").removeprefix("Value error, ")
    if tag is not None:  # every member of the union failed: say what the field takes
        tried = (_field_path(e.get("loc", ())) for e in errors)
        message = "expected " + " or ".join(dict.fromkeys(t for p, t in tried if p == path and t))
    return error_body(f"Invalid value for {param or 'request'}: {message}", "invalid_request_error", param,
                      "invalid_value")


def _field_path(location) -> tuple[list[str], str | None]:
    """(the path of the field that failed, the union member pydantic tried there, if any). A union's
    members appear in the location as type names: str, list[TextPart], function-after[...]."""
    path: list[str] = []
    for part in location:
        part = str(part)
        if not path and part == "body":
            continue
        if part in ("str", "int", "float", "bool", "dict", "none") or "[" in part or "-" in part or part[:1].isupper():
            return path, part
        path.append(part)
    return path, None


def _endpoint(path: str) -> str:
    """The metrics label of a request path: known endpoints as they are, everything else as 'other'
    (a label per raw path would let any client grow the metrics without bound)."""
    if path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"):
        return path
    return "/v1/models/{id}" if path.startswith("/v1/models/") else "other"


def _install_accounting(app: FastAPI, settings: GatewaySettings, metrics: GatewayMetrics) -> None:
    @app.middleware("http")
    async def account(request: Request, call_next):
        path = request.url.path
        endpoint = _endpoint(path)
        if settings.api_keys and path.startswith("/v1/"):
            given = _bearer_token(request.headers.get("authorization", ""))
            if given not in settings.api_keys:
                err = APIError(401, "Incorrect API key provided." if given else "Missing API key: send "
                               "'Authorization: Bearer <key>'.", "invalid_request_error", None, "invalid_api_key")
                metrics.requests.labels(endpoint, "401").inc()
                return JSONResponse(err.body(), status_code=401)
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > MAX_BODY_BYTES:
            metrics.requests.labels(endpoint, "413").inc()
            return JSONResponse(error_body(f"The request body is larger than {MAX_BODY_BYTES // 2**20} MiB.",
                                           "invalid_request_error", None, "request_too_large"), status_code=413)
        metrics.in_flight.inc()
        try:
            response = await call_next(request)
        except Exception as err:  # answered here: Starlette's last-resort handler would also drop the connection
            metrics.in_flight.dec()
            log.exception("internal error serving %s", path)
            response = JSONResponse(error_body(f"internal error: {type(err).__name__}: {err}", "server_error", None,
                                               "internal_error"), status_code=500)
        else:
            # call_next returns when the headers are ready; a stream is in flight until its body ends.
            response.body_iterator = _counted(response.body_iterator, metrics)
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        return response


def _bearer_token(authorization: str) -> str:
    """The key of an 'Authorization: Bearer <key>' header (the scheme in any case); '' otherwise."""
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


async def _counted(body, metrics: GatewayMetrics):
    try:
        async for chunk in body:
            yield chunk
    finally:
        metrics.in_flight.dec()


class _Handlers:
    def __init__(self, engine: Engine, settings: GatewaySettings, metrics: GatewayMetrics):
        self.engine, self.settings, self.metrics = engine, settings, metrics
        self.tokenizer = engine.tokenizer
        self.context = engine.model.context_length or 1 << 30
        # Text longer than this cannot fit the context however it tokenizes (twice the longest token,
        # for normalizers that drop characters): refused before tokenizing, which takes seconds per megabyte.
        self.max_prompt_characters = self.context * 2 * longest_token_characters(self.tokenizer)

    # -- models and health ----------------------------------------------------------------------------

    def _model_card(self) -> dict:
        return {"id": self.settings.served_model_name, "object": "model", "created": self.settings.created,
                "owned_by": "llm-mesh"}

    async def list_models(self):
        return {"object": "list", "data": [self._model_card()]}

    async def get_model(self, model_id: str):
        self._check_model(model_id)
        return self._model_card()

    async def health(self):
        # Routing may ask the DHT (a blocking call): off the event loop, so streams keep flowing.
        if await asyncio.to_thread(self.engine.has_route):
            return {"status": "ok"}
        return JSONResponse({"status": "unavailable", "detail": "no full route through the mesh"}, status_code=503)

    async def metrics_page(self):
        return Response(self.metrics.exposition(), media_type="text/plain; version=0.0.4")

    def _check_model(self, model: str) -> None:
        if model != self.settings.served_model_name:
            raise model_not_found(model)

    # -- chat -----------------------------------------------------------------------------------------

    async def chat(self, body: ChatRequest, request: Request):
        self._check_model(body.model)
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise invalid("this model has no chat template; use /v1/completions with a plain prompt", "messages",
                          "chat_template_missing")
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        except ValueError as err:
            raise invalid(str(err), "messages") from None
        self._check_text_length(sum(len(m["content"]) for m in messages), "messages")
        ids = await asyncio.to_thread(self._chat_ids, messages)  # seconds for a long prompt: off the event loop
        max_tokens = self._budget(len(ids), body.token_limit, "messages")
        top = (body.top_logprobs or 0) if body.logprobs else None
        return await self._run("chat", body, [ids], max_tokens, top, echo=False, http_request=request)

    def _chat_ids(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _check_text_length(self, characters: int, param: str) -> None:
        """Refuse, without tokenizing it, text too long to fit the context however it tokenizes."""
        if characters > self.max_prompt_characters:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens, and the {param} "
                                f"hold {characters} characters: far more than fit. Please shorten the {param}.",
                           "invalid_request_error", param, "context_length_exceeded")

    # -- completions ----------------------------------------------------------------------------------

    async def completions(self, body: CompletionRequest, request: Request):
        self._check_model(body.model)
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        self._check_text_length(sum(len(p) for p in texts if isinstance(p, str)), "prompt")
        prompts = await asyncio.to_thread(self._prompt_ids, body.prompt)
        max_tokens = min(self._budget(len(p), body.max_tokens, "prompt") for p in prompts)
        return await self._run("text", body, prompts, max_tokens, body.logprobs, echo=body.echo, http_request=request)

    def _prompt_ids(self, prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            prompt = [prompt]
        if all(isinstance(p, int) for p in prompt):
            prompt = [prompt]
        prompts = []
        vocab = self.engine.model.config.vocab_size
        for item in prompt:
            if isinstance(item, str):
                if self.tokenizer is None:
                    raise invalid("this model has no tokenizer: send the prompt as token ids", "prompt")
                item = self.tokenizer(item, add_special_tokens=False)["input_ids"]
            if not item:
                raise invalid("prompt must not be empty", "prompt")
            if any(not 0 <= t < vocab for t in item):
                raise invalid(f"token ids must be between 0 and {vocab - 1}", "prompt")
            prompts.append(list(item))
        return prompts

    def _budget(self, prompt_tokens: int, asked: int | None, param: str) -> int:
        if asked is None:
            asked = min(DEFAULT_MAX_TOKENS, self.context - prompt_tokens)
        if prompt_tokens + asked > self.context or asked < 1:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens. However, you "
                                f"requested {prompt_tokens + max(asked, 1)} tokens ({prompt_tokens} in the {param}, "
                                f"{max(asked, 1)} in the completion). Please reduce the length of the {param} or "
                                "completion.", "invalid_request_error", param, "context_length_exceeded")
        return asked

    # -- shared: start the generations, then answer whole or streamed -------------------------------------

    async def _run(self, kind: str, body, prompts: list[list[int]], max_tokens: int, logprobs: int | None,
                   echo: bool, http_request: Request):
        started = time.perf_counter()
        generations = []
        for prompt_index, ids in enumerate(prompts):
            for i in range(body.n):
                seed = None if body.seed is None else body.seed + i  # choice i: seed + i
                params = SamplingParams(temperature=body.temperature, top_p=body.top_p, seed=seed,
                                        presence_penalty=body.presence_penalty,
                                        frequency_penalty=body.frequency_penalty)
                request = GenerationRequest(ids, max_tokens, params, logprobs, prompt_logprobs=echo and logprobs is not None)
                generations.append((ids, self.engine.generate(request)))
        try:
            for _, generation in generations:
                await generation.started()
        except BaseException as err:
            for _, generation in generations:
                generation.cancel()
            raise _as_api_error(err) from None
        self.metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
        try:
            reply = _Reply(kind, self, body, generations, echo, started)
            if body.stream:
                return StreamingResponse(reply.stream(), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            return await _unless_the_client_leaves(http_request, reply.whole())
        except BaseException as err:
            for _, generation in generations:
                generation.cancel()
            raise _as_api_error(err) from None


CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left first; only metrics and logs see it


async def _unless_the_client_leaves(request: Request, work):
    """`work`'s result; or, if the client disconnects first, `work` cancelled (which stops its
    generations and frees the donors' caches) and a 499 that nobody reads. A streamed reply learns
    of a disconnect when a write fails; a whole reply writes nothing until the end, so it listens."""
    answer = asyncio.ensure_future(work)
    left = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({answer, left}, return_when=asyncio.FIRST_COMPLETED)
        if not answer.done() and left.exception() is not None:
            log.warning("cannot watch for the client's disconnect: %s", left.exception())
            await asyncio.wait({answer})
    finally:
        left.cancel()
        if not answer.done():
            answer.cancel()
            await asyncio.gather(answer, return_exceptions=True)  # its cleanup cancels the generations
    if answer.cancelled():
        log.info("client disconnected before its answer; generation stopped")
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return answer.result()


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone. The body was read before the handler ran, so what comes
    from the server now can only be the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.5)  # not expected; a server that repeats empty bodies must not make this spin


def _as_api_error(err: BaseException) -> BaseException:
    if isinstance(err, APIError):
        return err
    if isinstance(err, NoRouteError):
        return unavailable(f"the mesh cannot serve this model right now: {err}", "no_route")
    if isinstance(err, MeshSessionError):
        return unavailable(f"the mesh has no free capacity or working route right now: {err}", "no_capacity")
    if isinstance(err, ContextLengthError):
        return APIError(400, str(err), "invalid_request_error", None, "context_length_exceeded")
    return err


class _Choice:
    """One generated sequence's text, logprobs and finish reason, built token by token."""

    def __init__(self, index: int, tokenizer, stops: list[str], prompt_ids: list[int]):
        self.index = index
        self.text = TextStream(tokenizer, stops)
        self.prompt_ids = prompt_ids
        self.tokens = 0
        self.finish_reason: str | None = None
        self.logprobs: list = []  # token events, when logprobs were asked for
        self.logprobs_streamed = 0  # how many of them went out in stream chunks
        self.text_offset = 0  # completions logprobs: where the next token's text starts
        self.prompt_logprobs_sent = False  # an echoed prompt's logprobs went out in a stream chunk
        self.last_token_at: float | None = None

    def add(self, event) -> str:
        self.tokens += 1
        delta = self.text.push(event.token)
        if event.logprob is not None:
            self.logprobs.append(event)
        if self.text.stopped:
            self.finish_reason = "stop"
        elif event.finish_reason is not None:
            self.finish_reason = event.finish_reason
            delta += self.text.finish()
        return delta


class _Reply:
    def __init__(self, kind: str, handlers: _Handlers, body, generations: list[tuple[list[int], Generation]],
                 echo: bool, started: float):
        self.kind, self.h, self.body, self.generations, self.echo = kind, handlers, body, generations, echo
        self.started = started
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = handlers.settings.served_model_name
        self.choices = [_Choice(i, handlers.tokenizer, body.stop, ids) for i, (ids, _) in enumerate(generations)]

    def _observe_token(self, choice: _Choice) -> None:
        now = time.perf_counter()
        if choice.last_token_at is None:
            self.h.metrics.time_to_first_token.observe(now - self.started)
        else:
            self.h.metrics.inter_token.observe(now - choice.last_token_at)
        choice.last_token_at = now
        self.h.metrics.generated_tokens.inc()

    async def _events(self):
        """(choice, text delta) for every token of every choice, as they come, choices interleaved."""
        import asyncio

        queue: asyncio.Queue = asyncio.Queue()

        async def pump(choice: _Choice, generation: Generation):
            try:
                async for event in generation.events():
                    await queue.put((choice, event))
                    if choice.finish_reason is not None:
                        break
            except BaseException as err:  # noqa: BLE001
                await queue.put((choice, err))
            finally:
                await queue.put((choice, None))

        tasks = [asyncio.ensure_future(pump(c, g)) for c, (_, g) in zip(self.choices, self.generations)]
        try:
            remaining = len(tasks)
            while remaining:
                choice, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                elif choice.finish_reason is None:
                    self._observe_token(choice)
                    delta = choice.add(item)
                    if choice.finish_reason is not None:
                        self.generations[choice.index][1].cancel()  # a stop sequence: no more tokens needed
                    yield choice, delta
        finally:
            for _, generation in self.generations:
                generation.cancel()
            for task in tasks:
                task.cancel()

    def _usage(self) -> dict:
        prompt = sum(len(ids) for ids in {id(ids): ids for ids, _ in self.generations}.values())
        completion = sum(c.tokens for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _finish_reason(self, choice: _Choice) -> str:
        return choice.finish_reason or "stop"

    async def whole(self):
        texts = {c.index: "" for c in self.choices}
        async for choice, delta in self._events():
            texts[choice.index] += delta
        self.h.metrics.duration.observe(time.perf_counter() - self.started)
        choices = [self._whole_choice(c, texts[c.index]) for c in self.choices]
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices, "usage": self._usage()}

    def _whole_choice(self, choice: _Choice, text: str) -> dict:
        if self.kind == "chat":
            return {"index": choice.index, "finish_reason": self._finish_reason(choice),
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": self._chat_logprobs(choice.logprobs) if self.body.logprobs else None}
        prefix = self.h.tokenizer.decode(choice.prompt_ids, skip_special_tokens=True) if self.echo else ""
        return {"index": choice.index, "text": prefix + text, "finish_reason": self._finish_reason(choice),
                "logprobs": self._text_logprobs(choice) if self.body.logprobs is not None else None}

    def _chat_logprobs(self, events) -> dict:
        tokenizer = self.h.tokenizer
        return {"content": [chat_logprob_entry(tokenizer, e.token, e.logprob, e.top_logprobs) for e in events],
                "refusal": None}

    def _text_logprobs(self, choice: _Choice, events=None, prompt: bool | None = None) -> dict:
        """Completions-style logprobs of `events` (default: all of the choice's), after the prompt's
        tokens when `prompt` (default: when echoing). Offsets go on from where the choice's last
        logprobs ended, so that streamed chunks continue each other."""
        tokenizer = self.h.tokenizer
        rows = []  # (token, its logprob, its alternatives)
        if self.echo if prompt is None else prompt:
            generation = self.generations[choice.index][1]
            prompt_lps = generation.prompt_logprobs or [None] * len(choice.prompt_ids)
            for token, scored in zip(choice.prompt_ids, prompt_lps):
                # The first prompt token has no context to be scored in. The API reports null there,
                # but the official SDK's strict types take only numbers: 0.0 and no alternatives.
                rows.append((token, *(scored if scored is not None else (0.0, []))))
        rows += [(e.token, e.logprob, e.top_logprobs) for e in (choice.logprobs if events is None else events)]
        tokens, logprobs, tops, offsets = [], [], [], []
        for token, logprob, top in rows:
            text = token_text(tokenizer, token)
            tokens.append(text)
            logprobs.append(logprob)
            tops.append({token_text(tokenizer, t): lp for t, lp in top})
            offsets.append(choice.text_offset)
            choice.text_offset += len(text)
        return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}

    # -- streaming --------------------------------------------------------------------------------------

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        payload = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                   "system_fingerprint": None, "choices": choices}
        if usage is not None or self.body.include_usage:
            payload["usage"] = usage
        return f"data: {json.dumps(payload)}\n\n"

    def _stream_choice(self, choice: _Choice, text: str | None, opening: bool = False, finish: bool = False) -> dict:
        """A choice's entry in a chunk; `opening`: the chunk that opens the choice (the role of a chat
        answer, the echoed prompt of a completion)."""
        if self.kind == "chat":
            delta = {"role": "assistant", "content": "", "refusal": None} if opening else (
                {} if text is None else {"content": text})
            return {"index": choice.index, "delta": delta, "logprobs": None if opening else self._unsent_logprobs(choice),
                    "finish_reason": self._finish_reason(choice) if finish else None}
        return {"index": choice.index, "text": text or "", "logprobs": self._unsent_logprobs(choice),
                "finish_reason": self._finish_reason(choice) if finish else None}

    def _unsent_logprobs(self, choice: _Choice) -> dict | None:
        """Logprobs of the tokens generated since the choice's last chunk (text may lag tokens while
        a stop sequence could still match, so a chunk can carry several or none). An echoed prompt's
        come first, with the first chunk after the prompt was scored (completions only)."""
        wanted = self.body.logprobs if self.kind == "chat" else self.body.logprobs is not None  # 0 asks too
        fresh = choice.logprobs[choice.logprobs_streamed:]
        prompt = (self.kind == "text" and self.echo and not choice.prompt_logprobs_sent
                  and self.generations[choice.index][1].prompt_logprobs is not None)
        if not wanted or not (fresh or prompt):
            return None
        choice.logprobs_streamed = len(choice.logprobs)
        if self.kind == "chat":
            return self._chat_logprobs(fresh)
        choice.prompt_logprobs_sent = choice.prompt_logprobs_sent or prompt
        return self._text_logprobs(choice, fresh, prompt=prompt)

    async def stream(self):
        try:
            if self.kind == "chat":
                for choice in self.choices:
                    yield self._chunk([self._stream_choice(choice, None, opening=True)])
            elif self.echo:
                for choice in self.choices:
                    yield self._chunk([self._stream_choice(
                        choice, self.h.tokenizer.decode(choice.prompt_ids, skip_special_tokens=True), opening=True)])
            async for choice, delta in self._events():
                if delta:
                    yield self._chunk([self._stream_choice(choice, delta)])
                if choice.finish_reason is not None:
                    yield self._chunk([self._stream_choice(choice, None, finish=True)])
            for choice in self.choices:
                if choice.finish_reason is None:  # ended without a last token (cannot normally happen)
                    yield self._chunk([self._stream_choice(choice, None, finish=True)])
            if self.body.include_usage:
                yield self._chunk([], usage=self._usage())
            yield "data: [DONE]\n\n"
        except Exception as err:  # after the 200 went out: say so in the stream, never cut it silently
            self.h.metrics.stream_errors.inc()
            api_error = _as_api_error(err)
            message = api_error.message if isinstance(api_error, APIError) else f"{type(err).__name__}: {err}"
            code = api_error.code if isinstance(api_error, APIError) else "internal_error"
            yield f"data: {json.dumps(error_body(message, 'server_error', None, code))}\n\n"
        finally:
            self.h.metrics.duration.observe(time.perf_counter() - self.started)
