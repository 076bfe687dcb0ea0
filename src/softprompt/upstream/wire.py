"""What goes to a vLLM server and what comes back: a request's body for its OpenAI completions
API, and its server-sent events read back as token ids, text and log-probabilities.

A prompt-tuned request goes as ``prompt_embeds`` (the adapter's rows, then the prompt's token
embeddings); a base-model request as token ids, so the upstream's prefix cache still serves
repeated prompts. Either way the prompt was laid out here (chat templates included), so the
upstream sees exactly what softprompt's own engine would run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..engine.sampling import SamplingParams, TokenLogprobs

TOKEN_ID = "token_id:"
"""How vLLM names a token in log-probabilities under ``return_tokens_as_token_ids``."""


def completion_body(
    model: str, prompt_ids: list[int], params: SamplingParams, embeds: str | None
) -> dict[str, Any]:
    """The ``/v1/completions`` body for one sequence (one choice: ``n`` is 1 upstream, so each
    choice can go to another server and carry its own seed). ``embeds``: the base64 tensor for
    a prompt-tuned request; None sends the token ids."""
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "stream": True,
        "return_token_ids": True,
        "skip_special_tokens": True,
    }
    if embeds is not None:
        body["prompt_embeds"] = embeds
    else:
        body["prompt"] = prompt_ids
    if params.min_new_tokens:
        body["min_tokens"] = params.min_new_tokens
    if params.repetition_penalty != 1.0:
        body["repetition_penalty"] = params.repetition_penalty
    if params.stop:
        body["stop"] = list(params.stop)
    if params.ignore_eos:
        body["ignore_eos"] = True
    if params.seed is not None:
        body["seed"] = params.seed
    if params.logprobs is not None:
        body["logprobs"] = params.logprobs
        body["return_tokens_as_token_ids"] = True
    return body


@dataclass
class Chunk:
    """One streamed piece of one upstream completion."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None


def read_event(line: str, top: int = 0) -> Chunk | None:
    """The chunk a server-sent event line carries; None for other lines and ``[DONE]``.
    ``top``: the alternatives asked for per token."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if not data or data == "[DONE]":
        return None
    try:
        event = json.loads(data)
    except ValueError:
        return Chunk(error=f"the upstream sent an unreadable event: {data[:200]!r}")
    if not isinstance(event, dict):
        return Chunk(error="the upstream sent an event that is not an object")
    if "error" in event:
        return Chunk(error=error_message(event))
    choices = event.get("choices") or []
    if not choices:
        return None  # a usage-only event
    choice = choices[0]
    return Chunk(
        text=choice.get("text") or "",
        token_ids=list(choice.get("token_ids") or []),
        logprobs=read_logprobs(choice.get("logprobs"), top),
        finish_reason=choice.get("finish_reason"),
    )


def error_message(body: Any) -> str:
    """The message of an OpenAI-style error body (vLLM's), or the body itself, shortened."""
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
    return str(body)[:300]


def read_logprobs(legacy: Any, top: int) -> list[TokenLogprobs]:
    """OpenAI's legacy completions ``logprobs`` (tokens named ``token_id:N``) as entries with
    the ``top`` most likely alternatives (vLLM adds the chosen token to them when it is not
    among them; softprompt's engine does not)."""
    if not isinstance(legacy, dict):
        return []
    out = []
    tokens = legacy.get("tokens") or []
    values = legacy.get("token_logprobs") or []
    tops = legacy.get("top_logprobs") or [None] * len(tokens)
    for token, value, given in zip(tokens, values, tops, strict=False):
        alternatives = sorted(
            ((_token_id(name), float(v)) for name, v in (given or {}).items()),
            key=lambda pair: -pair[1],
        )
        out.append(TokenLogprobs(_token_id(token), float(value), alternatives[:top]))
    return out


def read_prompt_logprobs(
    answer: Any, ids: list[int], top: int
) -> list[TokenLogprobs | None] | None:
    """A whole answer's ``prompt_logprobs`` (per prompt token: ``{"id": {"logprob", "rank"}}``
    holding the token and the ``top`` most likely; None for the first) as entries for ``ids``."""
    try:
        given = answer["choices"][0]["prompt_logprobs"]
    except (KeyError, IndexError, TypeError):
        return None
    if not isinstance(given, list) or len(given) != len(ids):
        return None
    out: list[TokenLogprobs | None] = []
    for token, place in zip(ids, given, strict=True):
        if not place:
            out.append(None)
            continue
        ranked = sorted(
            (int(i), float(e["logprob"]), int(e.get("rank") or 0)) for i, e in place.items()
        )
        alternatives = sorted(((i, lp) for i, lp, r in ranked if 0 < r <= top), key=lambda p: -p[1])
        own = next((lp for i, lp, _ in ranked if i == token), float("nan"))
        out.append(TokenLogprobs(token, own, alternatives))
    return out


def _token_id(name: str) -> int:
    if not name.startswith(TOKEN_ID):
        raise ValueError(f"the upstream named a token {name!r}, not {TOKEN_ID}N")
    return int(name[len(TOKEN_ID) :])
