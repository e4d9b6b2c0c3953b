"""Request bodies of /v1/chat/completions and /v1/completions. Unknown fields are ignored; values out
of range are rejected (the app turns pydantic's complaints into OpenAI-shaped 400s)."""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_N = 8
MAX_STOPS = 4
INT64 = (-2**63, 2**63 - 1)  # seeds: what OpenAI's API takes (choice i samples with seed + i)
DEFAULT_COMPLETION_TOKENS = 16  # /v1/completions without max_tokens, as OpenAI's


def finite(default: float, **bounds):
    """A float field within `bounds` that refuses NaN and infinities (which compare false to any bound)."""
    return Field(default, allow_inf_nan=False, **bounds)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ValueError(f"content parts of type {part.type!r} are not supported; send text parts")
            parts.append(part.text)
        return "".join(parts)


class SamplingFields(BaseModel):
    """What both endpoints accept."""

    model_config = ConfigDict(extra="ignore")
    model: str
    temperature: float = finite(1.0, ge=0, le=2)
    top_p: float = finite(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = Field(None, validate_default=True)
    seed: int | None = Field(None, ge=INT64[0], le=INT64[1])
    presence_penalty: float = finite(0.0, ge=-2, le=2)
    frequency_penalty: float = finite(0.0, ge=-2, le=2)
    max_tokens: int | None = Field(None, ge=1)
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences are allowed")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, value, info):
        # A field validator (logprobs is declared first) so that the error names top_logprobs.
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs to be true")
        return value

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    max_tokens: int | None = Field(DEFAULT_COMPLETION_TOKENS, ge=1)

    @field_validator("max_tokens", mode="before")
    @classmethod
    def _null_is_default(cls, value):
        return DEFAULT_COMPLETION_TOKENS if value is None else value  # null means "the default", as leaving it out

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be an empty list")
        return value
