"""OpenAI's wire format beyond the request and response models (``protocol``): errors in its
shape, the documented error responses, and log-probabilities as its two APIs spell them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel

from ..engine import RequestError
from ..engine.sampling import TokenLogprobs
from .protocol import ErrorResponse, LegacyLogprobs, TokenLogprob, TopLogprob

# Engine parameter names as a client knows them.
PARAM_NAMES = {
    "max_new_tokens": "max_tokens",
    "min_new_tokens": "min_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "repetition_penalty": "repetition_penalty",
    "stop": "stop",
    "seed": "seed",
    "prompt": "prompt",
    "adapter": "model",
}


class APIError(Exception):
    """An error answered in OpenAI's format."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = (
            status,
            message,
            kind,
            param,
            code,
        )
        self.retry_after = retry_after

    def response(self, headers: Mapping[str, str] | None = None) -> JSONResponse:
        if self.retry_after is not None:
            headers = {**(headers or {}), "Retry-After": str(self.retry_after)}
        body = {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }
        return JSONResponse(body, status_code=self.status, headers=headers)


STREAMED: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the completion; with stream: true, server-sent events ending with "
        "data: [DONE]",
        "content": {
            "text/event-stream": {
                "schema": {
                    "description": "one event: a JSON chunk, or [DONE]",
                    "type": "object",
                    "properties": {"data": {"type": "string"}},
                    "required": ["data"],
                }
            }
        },
    }
}

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in (
        (400, "invalid request"),
        (401, "missing or wrong API key"),
        (404, "unknown model"),
        (413, "request body too large"),
        (429, "the queue is full; retry after Retry-After seconds"),
        (503, "the server is shutting down"),
    )
}


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI entry of a JSON body that a route reads itself (``_Context.parse``)."""
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def token_pieces(tokenizer: Any, ids: list[int], window: int = 6) -> list[str]:
    """The text each token adds after the ones before it (a few tokens of context decide
    spacing and merged characters), so the pieces join into the decoded text."""
    pieces = []
    for i in range(len(ids)):
        start = max(0, i - window)
        before = tokenizer.decode(ids[start:i]) if i > start else ""
        pieces.append(tokenizer.decode(ids[start : i + 1])[len(before) :])
    return pieces


def chat_entry(tokenizer: Any, piece: str, entry: TokenLogprobs) -> TokenLogprob:
    """One token of the chat format's ``logprobs.content``: its text, and its alternatives."""
    top = [
        TopLogprob(token=t, logprob=v, bytes=list(t.encode()))
        for t, v in ((tokenizer.decode([i]), v) for i, v in entry.top)
    ]
    return TokenLogprob(
        token=piece, logprob=entry.logprob, bytes=list(piece.encode()), top_logprobs=top
    )


def legacy_logprobs(
    tokenizer: Any, tokens: list[str], entries: list[TokenLogprobs | None], at: int = 0
) -> LegacyLogprobs:
    """OpenAI's legacy ``logprobs`` object for tokens whose text pieces are ``tokens`` (each
    with its entry, or None where there is no log-probability: the first prompt token), the
    first of them at ``at`` in the choice's text."""
    offsets = []
    for token in tokens:
        offsets.append(at)
        at += len(token)
    return LegacyLogprobs(
        tokens=tokens,
        token_logprobs=[None if e is None else e.logprob for e in entries],
        top_logprobs=[
            None if e is None else {tokenizer.decode([i]): v for i, v in e.top} for e in entries
        ],
        text_offset=offsets,
    )


def bad_request(exc: RequestError) -> APIError:
    param = PARAM_NAMES.get(exc.field or "", exc.field)
    return APIError(400, exc.renamed(param) if param else str(exc), param=param)
