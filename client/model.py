"""The Python entry point: a model whose layers run on the swarm, used like a local one.

    from client import MeshModel
    model = MeshModel.from_pretrained("org/model", initial_peers=["/ip4/.../p2p/..."])
    tokens = model.generate([1, 2, 3], max_new_tokens=32)

Only the embeddings, final norm and LM head are loaded here; every layer runs on donors.
Calls block the calling thread (network waits release the GIL); run several generations at once
from several threads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from client.remote import RemoteSpan
from client.sampling import Sampler, SamplingParams, top_logprobs
from client.session import RemoteSession, SessionConfig
from client.swarm import Swarm
from mesh.records import model_id_for
from shards.edges import ModelEdges
from shards.loading import load_edges, open_checkpoint


class ContextLengthError(ValueError):
    """The prompt plus the tokens asked for do not fit in the model's context."""


@dataclass
class TokenEvent:
    token: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (a stop token), "length" (max tokens) or None


def _prompt_logprobs(logits: torch.Tensor, ids: list[int], k: int) -> list[tuple[float, list[tuple[int, float]]] | None]:
    """(log P(ids[i] | ids[:i]), its k best alternatives) for every prompt position; None for the
    first token, which has no context."""
    return [None] + [top_logprobs(logits[i - 1], ids[i], k) for i in range(1, len(ids))]


def token_ids(value, vocab_size: int, *, batch: bool = False) -> torch.Tensor:
    """Token ids as a [B, T] long tensor, checked before any donor sees them: a list of ints, a 1-D
    integer tensor, or (with `batch`) a list of equal-length lists or a 2-D integer tensor. Without
    `batch` a [1, T] tensor is accepted too. A wrong input is the caller's mistake, and sent on, it
    would make donors fail, be banned and be replaced for nothing."""
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"token ids must be integers, got a {value.dtype} tensor")
        ids = value.to(torch.long)
    else:
        try:
            ids = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"token ids must be a list of integers{' or of equal-length lists' if batch else ''}: "
                             f"{err}") from None
        if ids.numel() and (ids.dtype.is_floating_point or ids.dtype == torch.bool):
            raise TypeError(f"token ids must be integers, got {value!r:.60}")
        ids = ids.to(torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or (not batch and ids.shape[0] != 1):
        what = "a list of ids or a [batch, tokens] tensor" if batch else "one sequence of ids"
        raise ValueError(f"expected {what}, got shape {list(ids.shape)}" + (
            "; a session or a generation holds one sequence: run several from several threads" if not batch else ""))
    if ids.shape[1] == 0 or ids.shape[0] == 0:
        raise ValueError("no token ids were given")
    outside = ids[(ids < 0) | (ids >= vocab_size)]
    if outside.numel():
        raise ValueError(f"token id {outside[0].item()} is outside the vocabulary (0..{vocab_size - 1})")
    return ids


class InferenceSession:
    """Step-by-step use: feed token ids, get the logits of the last one. Caches live on the donors."""

    def __init__(self, model: "MeshModel", max_length: int):
        self.model = model
        self.max_length = max_length
        self.remote = RemoteSession(model.swarm, SessionConfig(max_length, **model.session_options))
        self.remote.open()

    def step(self, input_ids: list[int] | torch.Tensor) -> torch.Tensor:
        """Append `input_ids` to the session; returns logits [vocab] for the next token (float32)."""
        ids = token_ids(input_ids, self.model.config.vocab_size)
        hidden = self.remote.step(self.model.edges.embed(ids))
        return self.model.edges.logits(hidden[:, -1:])[0, 0]

    @property
    def position(self) -> int:
        return self.remote.position

    @property
    def route(self):
        return self.remote.route

    def close(self) -> None:
        self.remote.close()

    def __enter__(self) -> "InferenceSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class MeshModel:
    def __init__(self, edges: ModelEdges, swarm: Swarm, dht=None, tokenizer=None, **session_options):
        self.edges = edges
        self.config = edges.config
        self.swarm = swarm
        self.tokenizer = tokenizer
        self.session_options = session_options
        self.observer = None  # optional: .hop(seconds) per hop and step, .failover() (metrics)
        self._dht = dht

    @classmethod
    def from_pretrained(cls, model: str, initial_peers: list[str], *, model_name: str | None = None,
                        device: str | None = None, dtype: str | None = None, revision: str | None = None,
                        route_timeout: float = 10.0, **session_options) -> "MeshModel":
        """`model`: hub id or local directory (only config, tokenizer and the edge tensors are read).
        `session_options`: request_timeout, connect_timeout, max_failovers, recovery_deadline,
        forwarding (donors hand steps to each other; False: through the client), trace."""
        from mesh.dht import start_dht

        ckpt = open_checkpoint(model, revision)
        edges = load_edges(ckpt, device=device, dtype=dtype)
        dht = start_dht(initial_peers, client_mode=True)
        swarm = Swarm.from_dht(dht, model_name or model_id_for(model), edges.config.num_hidden_layers,
                               route_timeout=route_timeout, fingerprint=ckpt.fingerprint())
        return cls(edges, swarm, dht, _try_tokenizer(ckpt.directory), **session_options)

    def inference_session(self, max_length: int) -> InferenceSession:
        """A session for step-by-step use, with room for `max_length` tokens on every donor."""
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive number of tokens, got {max_length!r}")
        self._check_context([], max_length)
        return InferenceSession(self, max_length)

    def stream(self, prompt: str | list[int], max_new_tokens: int = 32, *, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0, seed: int | None = None,
               stop_tokens: list[int] | None = None,
               on_session: Callable[[RemoteSession], None] | None = None) -> Iterator[int]:
        """Yield generated token ids one by one (greedy when temperature is 0). Closing the iterator
        early closes the donors' sessions. `on_session` sees the live session (for tests, metrics)."""
        params = SamplingParams(temperature, top_p, top_k, repetition_penalty, seed)
        for event in self.stream_events(self._encode(prompt), max_new_tokens, params, stop_tokens,
                                        on_session=on_session):
            yield event.token

    def stream_events(self, ids: list[int], max_new_tokens: int, params: SamplingParams = SamplingParams(),
                      stop_tokens: list[int] | None = None, *, logprobs: int | None = None,
                      on_session: Callable[[RemoteSession], None] | None = None,
                      on_prompt_logprobs: Callable[[list], None] | None = None) -> Iterator[TokenEvent]:
        """The generation loop behind stream() and the gateway: one TokenEvent per new token.

        logprobs: also report each token's log-probability and this many alternatives.
        on_prompt_logprobs: called once with (log-probability, alternatives) of each prompt token
        (None for the first), alternatives as many as `logprobs` asks.
        Closing the iterator (a client that went away) closes the donors' sessions at once.
        """
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
        self._check_context(ids, max_new_tokens)
        sampler = Sampler(params)
        stops = set(self._default_stops() if stop_tokens is None else stop_tokens)
        session = RemoteSession(self.swarm, SessionConfig(len(ids) + max_new_tokens, **self.session_options),
                                observer=self.observer)
        try:
            session.open()
            if on_session is not None:
                on_session(session)
            hidden = session.step(self.edges.embed(torch.tensor([ids])))
            if on_prompt_logprobs is not None:
                on_prompt_logprobs(_prompt_logprobs(self.edges.logits(hidden)[0], ids, logprobs or 0))
            history, generated = list(ids), []
            for produced in range(max_new_tokens):
                logits = self.edges.logits(hidden[:, -1:])[0, 0]
                token = sampler(logits, history, generated)
                event = TokenEvent(token)
                if logprobs is not None:
                    event.logprob, event.top_logprobs = top_logprobs(logits, token, logprobs)
                event.finish_reason = ("stop" if token in stops else
                                       "length" if produced + 1 == max_new_tokens else None)
                yield event
                if event.finish_reason is not None:
                    return
                history.append(token)
                generated.append(token)
                hidden = session.step(self.edges.embed(torch.tensor([[token]])))
        finally:
            session.close()

    def _check_context(self, ids: list[int], max_new_tokens: int) -> None:
        """Before any donor is asked: a request beyond the context would be refused by every donor,
        and each refusal would ban a healthy donor for the client's mistake."""
        limit = self.context_length
        if limit and len(ids) + max_new_tokens > limit:
            raise ContextLengthError(f"this model's maximum context length is {limit} tokens; the prompt has "
                                     f"{len(ids)} and {max_new_tokens} more were requested")

    @property
    def context_length(self) -> int | None:
        return getattr(self.config, "max_position_embeddings", None)

    def generate(self, prompt: str | list[int], max_new_tokens: int = 32, **options) -> list[int]:
        """The generated token ids (the prompt excluded). Options as for `stream`."""
        return list(self.stream(prompt, max_new_tokens, **options))

    def forward(self, input_ids: list[int] | torch.Tensor) -> torch.Tensor:
        """Logits [B, T, vocab] for whole sequences, through the swarm without sessions."""
        ids = token_ids(input_ids, self.config.vocab_size, batch=True)
        self._check_context(ids[0].tolist(), 0)
        options = SessionConfig(max_length=1, **self.session_options)
        last_error: Exception | None = None
        for _ in range(options.max_failovers + 1):
            hidden = self.edges.embed(ids)
            for hop in self.swarm.route(0, self.swarm.num_layers):
                try:
                    span = RemoteSpan.connect(hop, options.connect_timeout, options.liveness)
                    try:
                        hidden = span.forward(hidden, options.request_timeout, options.liveness)
                    finally:
                        span.connection.close()
                except Exception as err:  # noqa: BLE001 - ban the donor and reroute the whole pass
                    self.swarm.failed(hop.donor.peer_id)
                    last_error = err
                    break
            else:
                return self.edges.logits(hidden)
        raise RuntimeError(f"forward pass failed after {options.max_failovers} reroutes: {last_error}")

    def _encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer; pass token ids instead of text")
            ids = self.tokenizer(prompt)["input_ids"]
            if not ids:
                raise ValueError("the prompt is empty")
            return ids
        return token_ids(prompt, self.config.vocab_size)[0].tolist()

    def _default_stops(self) -> list[int]:
        eos = getattr(self.config, "eos_token_id", None)
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    def close(self) -> None:
        if self._dht is not None:
            self._dht.shutdown()
            self._dht = None

    def __enter__(self) -> "MeshModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _try_tokenizer(directory):
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(directory)
    except Exception:  # random test models have none; token ids still work
        return None
