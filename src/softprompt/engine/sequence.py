"""One request's state as it moves through the engine: waiting, running, finished."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .sampling import SamplingParams, TokenLogprobs

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Output:
    """What one engine step produced for one request: new tokens and the text they add."""

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str | None = None
    """``stop`` (end of sequence or a stop string), ``length``, ``cancelled`` or ``error``."""
    error: str | None = None
    unavailable: bool = False
    """An error because no server could take the request (every upstream down or failing
    before its first token): a retry later may succeed."""


@dataclass
class Completion:
    """A finished request: all its new tokens and text."""

    request_id: str
    adapter: str | None
    prompt_tokens: int
    token_ids: list[int]
    text: str
    finish_reason: str
    error: str | None = None
    time_to_first_token: float | None = None
    """Seconds from submission to the first new token."""
    logprobs: list[TokenLogprobs] | None = None
    """Per new token (``SamplingParams.logprobs``): its log-probability and alternatives."""
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    """Per prompt token (``SamplingParams.prompt_logprobs``); None for the first."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "adapter": self.adapter,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": len(self.token_ids),
            "text": self.text,
            "finish_reason": self.finish_reason,
            "error": self.error,
        }


@dataclass(eq=False)
class Sequence:
    """A request inside the engine. ``prompt_ids`` are text tokens only; the adapter is a prefix."""

    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    """Decoded output so far, cut before a stop string once one appears."""
    decoded: str = ""
    """Text of ``output_ids[:read_offset]`` (``Detokenizer``'s committed part)."""
    prefix_offset: int = 0
    read_offset: int = 0
    emitted: int = 0
    """Characters of ``text`` already handed out in outputs."""
    finish_reason: str | None = None
    error: str | None = None
    prefix_length: int = 0
    """The adapter's virtual tokens (their keys/values come first in the row's cache)."""
    context: Any = None
    """While the prompt is computed: the keys/values before the text still to compute (a
    ``Prefix``: the adapter's, then the prompt tokens reused from the prefix cache)."""
    prefilled: int = 0
    """Prompt tokens whose keys/values are computed or reused so far."""
    reused: int = 0
    """Prompt tokens whose keys/values came from the prefix cache."""
    staging: Any = None
    """A one-row cache the prompt is computed into chunk by chunk, when it takes several steps."""
    chunk_logits: list[torch.Tensor] = field(default_factory=list)
    """The logits of every prompt position so far, for rows that want the prompt's
    log-probabilities and are computed in chunks."""
    last_token_at: float | None = None
    longest_gap: float = 0.0
    """Seconds between two of its consecutive new tokens, at most."""
    generator: torch.Generator | None = None
    stops: Any = None
    """The request's ``StopMatcher`` (when it has stop strings): how far the text was read."""
    arrival: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] | None = None

    @property
    def length(self) -> int:
        """Tokens in this row's cache: prefix, prompt text and output fed back so far."""
        return self.prefix_length + len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def finish(self, reason: str, error: str | None = None) -> None:
        self.status = Status.FINISHED
        self.finished_at = time.perf_counter()
        self.finish_reason = reason
        self.error = error

    def completion(self) -> Completion:
        ttft = None if self.first_token_at is None else self.first_token_at - self.arrival
        return Completion(
            request_id=self.request_id,
            adapter=self.adapter,
            prompt_tokens=len(self.prompt_ids),
            token_ids=list(self.output_ids),
            text=self.text,
            finish_reason=self.finish_reason or "error",
            error=self.error,
            time_to_first_token=ttft,
            logprobs=list(self.logprobs) if self.params.logprobs is not None else None,
            prompt_logprobs=self.prompt_logprobs,
        )
