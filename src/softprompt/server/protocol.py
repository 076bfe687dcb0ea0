"""The OpenAI request and response bodies the server speaks, as pydantic models.

Field names, defaults and shapes follow OpenAI's completions and chat completions APIs, so the
official clients work unchanged. A few extensions that vLLM also accepts (``repetition_penalty``,
``min_tokens``, ``ignore_eos``) map onto the engine's sampling parameters. Parameters OpenAI has
and this server does not (tools, logit_bias...) are refused by name rather than silently
ignored; unknown fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 8
"""Choices per prompt at most: each is one more row in the batch."""
MAX_STOP = 4
"""Stop strings per request at most, as OpenAI allows."""
MAX_LOGPROBS_LEGACY = 5
"""Alternatives per token at most on /v1/completions, as OpenAI's legacy API allows."""
MAX_LOGPROBS = 20
"""Alternatives per token at most on /v1/chat/completions (``top_logprobs``)."""


class _Strict(BaseModel):
    """A request part: types as declared (no "1" for 1, no 0 for false), unknown keys ignored."""

    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False
    """Send one more chunk before ``[DONE]`` with the whole request's token counts."""


class _Sampling(_Strict):
    """What completions and chat completions share."""

    model: str = Field(description="the base model's name or an adapter's (GET /v1/models)")
    max_tokens: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="new tokens at most (default: 16 for completions, 256 for chat)"
    )
    temperature: Annotated[float, Field(ge=0, le=2)] = Field(
        default=1.0, description="0 is greedy decoding"
    )
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    n: Annotated[int, Field(ge=1, le=MAX_N)] = Field(default=1, description="choices per prompt")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = Field(
        default=None, description="with temperature > 0: choice i samples from seed + i"
    )
    user: str | None = None
    repetition_penalty: Annotated[float, Field(ge=0.01, le=100)] = Field(
        default=1.0, description="extension: above 1 discourages repeating tokens"
    )
    min_tokens: Annotated[int, Field(ge=0)] = Field(
        default=0, description="extension: no end of sequence before this many new tokens"
    )
    ignore_eos: bool = Field(default=False, description="extension: run on to max_tokens")
    # OpenAI parameters this server does not implement; refused unless left at their defaults.
    logit_bias: dict[str, float] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    def unsupported(self) -> str | None:
        """The first parameter set to something this server cannot do, if any."""
        if self.logit_bias:
            return "logit_bias"
        if self.presence_penalty not in (None, 0):
            return "presence_penalty"
        if self.frequency_penalty not in (None, 0):
            return "frequency_penalty"
        return None

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="text, token ids, or a list of either (one completion each)"
    )
    max_tokens: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="new tokens at most (default 16); 0 only with echo (scoring)"
    )
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS_LEGACY)] | None = Field(
        default=None,
        description="each token's log-probability and this many most likely alternatives",
    )
    echo: bool = Field(
        default=False, description="the prompt before the completion (with logprobs: scored)"
    )
    suffix: str | None = None
    best_of: int | None = None

    def unsupported(self) -> str | None:
        if self.suffix:
            return "suffix"
        if self.best_of not in (None, 1, self.n):
            return "best_of"
        return super().unsupported()


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    logprobs: bool = Field(default=False, description="each new token's log-probability")
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = Field(
        default=None, description="with logprobs: this many most likely alternatives per token"
    )

    def unsupported(self) -> str | None:
        if self.tools:
            return "tools"
        if self.tool_choice not in (None, "none"):
            return "tool_choice"
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            return "response_format"
        return super().unsupported()


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class LegacyLogprobs(BaseModel):
    """OpenAI's completions ``logprobs``: per token, its text, log-probability (None for the
    first prompt token under echo), the alternatives, and where its text starts."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: LegacyLogprobs | None = None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "softprompt"
    parent: str | None = Field(default=None, description="the base model, for an adapter")
    virtual_tokens: int = Field(default=0, description="the adapter's virtual tokens")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
