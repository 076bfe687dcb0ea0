"""The vLLM servers behind ``serve --upstream``: which one takes the next request, which answer,
and whether they all serve the base model the front end was loaded from.

A request goes to the healthy upstream with the fewest requests in flight. Each upstream's
``/health`` is polled; one that refuses a connection is marked down at once and comes back when
its health answers again. ``check_upstreams`` runs once at start-up and refuses a fleet whose
servers differ from each other or from the front end (see ``_check_embeddings`` for why the
same text given as embeddings and as token ids must score the same).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..embeds import to_base64
from ..errors import UserError
from ..frontend import FrontEnd
from .wire import error_message, read_logprobs

log = logging.getLogger(__name__)

PROBE = "The quick brown fox jumps over the lazy dog. Soft prompts steer a frozen model."
"""The text the start-up check sends each upstream, as token ids and as embeddings."""

EMBEDDING_TOLERANCE = 1e-2
"""How far (in log-probability) the two ways of sending the probe may score its next token
apart. Measured on vLLM 0.32 CPU, float32, the embedded model: 0 to within 1e-5; any other
model's table moves them by far more (a different model, fine-tune or revision)."""


_USERINFO = re.compile(r"(https?://)[^/@\s]*@")


def redact(text: str) -> str:
    """``text`` with the user and password of every address in it replaced by ``***``: an
    upstream given as ``http://user:pass@host`` is named without them wherever it is shown."""
    return _USERINFO.sub(r"\1***@", text)


@dataclass
class Upstream:
    """One vLLM server: its address, what it serves, and how it is doing now."""

    url: str
    """Where requests go, credentials included; ``name`` is what is shown."""
    model: str = ""
    """The name it serves the base model under (sent in every request)."""
    max_model_len: int = 0
    in_flight: int = 0
    healthy: bool = True
    error: str | None = None
    """Why it was last marked down."""
    requests: int = 0
    failures: int = 0
    since: float = field(default_factory=time.monotonic)

    @property
    def name(self) -> str:
        """The address as shown (logs, errors, ``/health``, metrics): without credentials."""
        return redact(self.url)

    def down(self, why: str) -> None:
        why = redact(why)
        if self.healthy:
            log.warning("upstream %s is down: %s", self.name, why)
        self.healthy, self.error, self.since = False, why, time.monotonic()

    def up(self) -> None:
        if not self.healthy:
            log.warning("upstream %s answers again", self.name)
        self.healthy, self.error, self.since = True, None, time.monotonic()

    def report(self) -> dict[str, Any]:
        return {
            "url": self.name,
            "healthy": self.healthy,
            "in_flight": self.in_flight,
            "requests": self.requests,
            "failures": self.failures,
            **({"error": self.error} if self.error else {}),
        }


class Pool:
    """The upstreams, and the choice of one for each request (thread-safe)."""

    def __init__(self, upstreams: list[Upstream]) -> None:
        if not upstreams:
            raise ValueError("at least one upstream")
        self.upstreams = upstreams
        self._lock = threading.Lock()

    def pick(self, tried: set[str]) -> Upstream | None:
        """The healthy upstream not in ``tried`` with the fewest in flight, counted as taken;
        when none is healthy, one that is down (its health may be stale); None when every one
        has been tried."""
        with self._lock:
            left = [u for u in self.upstreams if u.url not in tried]
            if not left:
                return None
            healthy = [u for u in left if u.healthy]
            chosen = min(healthy or left, key=lambda u: u.in_flight)
            chosen.in_flight += 1
            chosen.requests += 1
            return chosen

    def done(self, upstream: Upstream) -> None:
        with self._lock:
            upstream.in_flight -= 1

    def healthy(self) -> int:
        return sum(u.healthy for u in self.upstreams)


def normalise(url: str) -> str:
    """An upstream's base address: ``http://host:port`` without a trailing ``/v1``.

    Raises:
        UserError: not an http(s) address.
    """
    url = url.strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[:-3]
    if not url.startswith(("http://", "https://")) or len(url.split("://", 1)[1]) == 0:
        raise UserError(
            f"--upstream {redact(url)!r}: give the vLLM server's address, http://HOST:PORT"
        )
    return url


def check_upstreams(
    front: FrontEnd, urls: list[str], timeout: float = 30.0, api_key: str | None = None
) -> list[Upstream]:
    """Ask each upstream what it serves; refuse (``UserError``, one line) a fleet that does not
    serve one model, the front end's.

    Checked, per upstream: it answers ``/v1/models`` with one model; every upstream serves it
    under the same name with the same context length; it tokenizes a probe text as the front
    end does (the same vocabulary); and the probe scores the same sent as embeddings from the
    front end's table and as token ids (the same input embedding table, which is what serving
    a soft prompt as ``prompt_embeds`` relies on).
    """
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    normalised = [normalise(url) for url in urls]
    for i, url in enumerate(normalised):
        if url in normalised[:i]:
            raise UserError(f"upstream {redact(url)} is given twice: give each server once")
    upstreams = []
    with httpx.Client(timeout=timeout, headers=headers) as client:
        for url in normalised:
            upstream = Upstream(url)
            try:
                _describe(client, upstream)
                _check_tokenizer(client, upstream, front)
                _check_embeddings(client, upstream, front)
            except httpx.HTTPError as exc:
                said = redact(str(exc) or type(exc).__name__)
                raise UserError(f"upstream {upstream.name} does not answer: {said}") from exc
            upstreams.append(upstream)
    first = upstreams[0]
    for other in upstreams[1:]:
        if (other.model, other.max_model_len) != (first.model, first.max_model_len):
            raise UserError(
                f"upstreams serve different models: {first.name} serves {first.model!r} "
                f"({first.max_model_len} tokens), {other.name} serves {other.model!r} "
                f"({other.max_model_len} tokens)"
            )
    return upstreams


def _json(response: Any, what: str, upstream: Upstream) -> Any:
    """The JSON of a 200 answer; otherwise ``UserError`` saying what came instead (a web UI or
    another server on that port answers HTML, or another status)."""
    try:
        body = response.json()
    except ValueError:
        body = None
        said = " ".join(response.text[:120].split()) or "an empty body"
    else:
        said = error_message(body)
    if response.status_code != 200:
        raise UserError(
            f"upstream {upstream.name}: {what} answered {response.status_code}: {redact(said)}"
        )
    if body is None:
        raise UserError(
            f"upstream {upstream.name}: {what} answered something other than JSON ({said!r}): "
            "is a vLLM OpenAI server listening there?"
        )
    return body


def _missing(upstream: Upstream, what: str, field: str) -> UserError:
    return UserError(
        f"upstream {upstream.name}: {what} answered without {field}, as vLLM's OpenAI server "
        "gives it: is a vLLM OpenAI server listening there?"
    )


def _describe(client: Any, upstream: Upstream) -> None:
    models = _json(client.get(f"{upstream.url}/v1/models"), "/v1/models", upstream)
    data = models.get("data") if isinstance(models, dict) else None
    if data is not None and not isinstance(data, list):
        raise _missing(upstream, "/v1/models", "a list of models")
    if not data:
        raise UserError(f"upstream {upstream.name} serves no model")
    if not all(isinstance(m, dict) for m in data):
        raise _missing(upstream, "/v1/models", "a list of models")
    if len(data) > 1:
        names = ", ".join(str(m.get("id")) for m in data)
        raise UserError(f"upstream {upstream.name} serves several models ({names}); give it one")
    upstream.model = str(data[0].get("id"))
    try:
        upstream.max_model_len = int(data[0].get("max_model_len") or 0)
    except (TypeError, ValueError):
        upstream.max_model_len = 0
    if upstream.max_model_len <= 0:
        raise UserError(f"upstream {upstream.name} does not say its context length")


def _check_tokenizer(client: Any, upstream: Upstream, front: FrontEnd) -> None:
    ours = list(front.tokenizer(PROBE)["input_ids"])
    said = _json(
        client.post(
            f"{upstream.url}/tokenize",
            json={"model": upstream.model, "prompt": PROBE, "add_special_tokens": True},
        ),
        "/tokenize",
        upstream,
    )
    if not isinstance(said, dict) or not isinstance(said.get("tokens"), list):
        raise _missing(upstream, "/tokenize", "its tokens")
    if list(said["tokens"]) != ours:
        raise UserError(
            f"upstream {upstream.name} ({upstream.model}) tokenizes differently from {front.name}:"
            " it serves another model (start it with the same model as serve --model)"
        )


def _check_embeddings(client: Any, upstream: Upstream, front: FrontEnd) -> None:
    """The probe's next-token log-probabilities, sent as token ids and as the front end's
    embeddings of the same ids, must agree: if the upstream's input embedding table were not
    the front end's, every soft prompt served through it would be fed the wrong vectors."""
    ids = list(front.tokenizer(PROBE)["input_ids"])
    with torch.no_grad():
        table = front.embedding(torch.tensor(ids))
    common = {
        "model": upstream.model,
        "max_tokens": 1,
        "temperature": 0,
        "logprobs": 5,
        "return_tokens_as_token_ids": True,
    }
    scored = []
    for prompt in ({"prompt": ids}, {"prompt_embeds": to_base64(table)}):
        what = "/v1/completions" + (" with prompt_embeds" if "prompt_embeds" in prompt else "")
        body = _json(
            client.post(f"{upstream.url}/v1/completions", json={**common, **prompt}),
            what,
            upstream,
        )
        try:
            entries = read_logprobs(body["choices"][0].get("logprobs"), 5)
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
            raise _missing(upstream, what, "choices and their log-probabilities") from exc
        if not entries:
            raise UserError(f"upstream {upstream.name} sent no log-probabilities")
        scored.append(dict(entries[0].top))
    by_ids, by_embeds = scored
    gap = max(
        (abs(by_ids[t] - by_embeds.get(t, float("-inf"))) for t in by_ids), default=float("inf")
    )
    if not gap <= EMBEDDING_TOLERANCE:
        raise UserError(
            f"upstream {upstream.name} ({upstream.model}) does not use {front.name}'s input "
            f"embeddings (the same text scores {gap:.3g} apart as embeddings and as tokens): "
            "start it with the same model as serve --model"
        )
