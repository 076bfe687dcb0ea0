"""A request's life in the server: its prompts made and queued with the engine off the event
loop, the engine's outputs carried back to the loop, and its answer, whole or streamed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..engine import Engine, RequestError, SamplingParams
from ..engine.engine import QueueFull, ShuttingDown
from ..engine.sampling import TokenLogprobs
from ..engine.sequence import Output
from ..errors import UserError
from ..layout import chat_layout
from ..upstream.engine import Unavailable
from .metrics import Metrics
from .protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatLogprobs,
    CompletionChoice,
    Usage,
)
from .wire import APIError, bad_request, chat_entry, legacy_logprobs, token_pieces


def engine_prompts(prompt: Any) -> list[str | list[int]]:
    """One engine prompt per completion: text or token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return list(prompt)


def chat_prompt(engine: Engine, body: ChatCompletionRequest) -> list[int]:
    tokenizer = engine.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(
            400,
            "this model has no chat template; use /v1/completions",
            param="messages",
        )
    # The same layout a prompt trained on conversations was trained on (``layout``).
    messages = [(m.role, m.text()) for m in body.messages]
    try:
        return chat_layout(tokenizer, messages, add_generation_prompt=True).ids
    except UserError as exc:
        raise APIError(400, str(exc), param="messages") from exc


class EventStream(StreamingResponse):
    """A job's server-sent events. Whatever ends the response (the last event, or a client that
    left before its first byte, when the events' generator never ran and so never cleans up),
    the job ends with it."""

    def __init__(self, job: Job, events: AsyncIterator[str]) -> None:
        super().__init__(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.job = job

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.close()


class Outputs:
    """Carries engine outputs from the engine's thread to the event loop, a step at a time.

    The engine hands out each request's output as it goes; waking the event loop once per output
    costs a system call each. Outputs are collected under a lock instead, and one wake-up per
    engine step moves them all to their requests' queues.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._items: list[tuple[asyncio.Queue, int, Output]] = []
        self._lock = threading.Lock()
        self._scheduled = False

    def sink(self, queue: asyncio.Queue, index: int) -> Callable[[Output], None]:
        def put(out: Output) -> None:
            with self._lock:
                self._items.append((queue, index, out))
                if self._scheduled:
                    return
                self._scheduled = True
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is left to read
                self.loop.call_soon_threadsafe(self._drain)

        return put

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, []
            self._scheduled = False
        for queue, index, out in items:
            queue.put_nowait((index, out))


def outputs_for(app_state: Any) -> Outputs:
    loop = asyncio.get_running_loop()
    outputs = getattr(app_state, "outputs", None)
    if outputs is None or outputs.loop is not loop:
        outputs = app_state.outputs = Outputs(loop)
    return outputs


@dataclass
class Choice:
    text: str = ""
    tokens: int = 0
    reason: str | None = None
    error: str | None = None
    unavailable: bool = False


class Job:
    """One HTTP request: its engine submissions (prompts x n) and what came back."""

    def __init__(
        self,
        engine: Engine,
        metrics: Metrics,
        endpoint: str,
        body: Any,
        adapter: str | None,
        prompt_count: int,
        default_max_tokens: int,
        outputs: Outputs,
    ) -> None:
        bad = body.unsupported()
        if bad is not None:
            raise APIError(400, f"{bad} is not supported by this server", param=bad)
        self.engine, self.metrics, self.endpoint = engine, metrics, endpoint
        self.outputs = outputs
        self.body, self.adapter = body, adapter
        self.prompts: list[str | list[int]] = []
        """One engine prompt per prompt of the request (text or token ids), set by ``submit``."""
        self.max_tokens = default_max_tokens if body.max_tokens is None else body.max_tokens
        self.echo = bool(getattr(body, "echo", False))
        self.top: int | None = None
        """Alternatives per token when log-probabilities are asked for (None: not asked)."""
        if endpoint == "chat":
            if body.top_logprobs is not None and not body.logprobs:
                raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
            self.top = (body.top_logprobs or 0) if body.logprobs else None
        else:
            self.top = body.logprobs
        if self.max_tokens == 0 and not self.echo:
            raise APIError(400, "max_tokens 0 needs echo (to score the prompt)", param="max_tokens")
        self.id = f"{'chatcmpl' if endpoint == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.choices = [Choice() for _ in range(prompt_count * body.n)]
        self.sent = [0] * len(self.choices)
        """Per choice, how many of its tokens (the echoed prompt's included) have been streamed,
        and the length of their text pieces (where the next piece's ``text_offset`` starts)."""
        self.sent_chars = [0] * len(self.choices)
        self.handles: list[Any] = []
        self.queue: asyncio.Queue[tuple[int, Output | None]] = asyncio.Queue()
        """Each choice's outputs; ``(-1, None)`` when the client has gone."""
        self.prompt_tokens = 0
        self.submitted = 0.0
        self.retry_after = 1
        """Seconds a 503 for no upstream asks the client to wait (the server's setting)."""
        self.first_token = False
        self.open = len(self.choices)
        self.counted = False
        """Whether the request's outcome is in the metrics."""

    def _params(self, choice: int) -> SamplingParams:
        body = self.body
        seed = None if body.seed is None else body.seed + choice % body.n
        try:
            return SamplingParams(
                # max_tokens 0 (echo alone: score the prompt) runs one token and drops it
                max_new_tokens=max(1, self.max_tokens),
                min_new_tokens=body.min_tokens,
                logprobs=self.top,
                prompt_logprobs=self.echo and self.top is not None,
                temperature=body.temperature,
                top_p=body.top_p,
                repetition_penalty=body.repetition_penalty,
                stop=body.stops(),
                ignore_eos=body.ignore_eos,
                seed=seed,
            )
        except RequestError as exc:
            raise bad_request(exc) from exc

    async def submit(self, retry_after: int, prompts: Callable[[], list[str | list[int]]]) -> None:
        """Make the request's prompts (``prompts``: chat templates, tokenizing) and queue every
        choice with the engine, or none of them, on a worker thread, never on the event loop:
        400 when one cannot run, 429 when the queue has no room for all of them, 503 while
        shutting down."""
        self.submitted = time.perf_counter()
        self.retry_after = retry_after
        try:
            await run_in_threadpool(self._submit, retry_after, prompts)
        except asyncio.CancelledError:  # the thread has finished: what it queued is cancelled
            self.cancel()
            raise

    def _submit(self, retry_after: int, prompts: Callable[[], list[str | list[int]]]) -> None:
        self.prompts = prompts()
        n = self.body.n
        requests: list[tuple[Any, str | None, SamplingParams | None, Any]] = [
            (
                self.prompts[index // n],
                self.adapter,
                self._params(index),
                self.outputs.sink(self.queue, index),
            )
            for index in range(len(self.choices))
        ]
        # An engine that fails over (UpstreamEngine) may start a whole answer again elsewhere
        # when nothing of it has been sent: so for a response that is not streamed.
        fails_over = getattr(self.engine, "fails_over", False)
        held = {"held": True} if fails_over and not self.body.stream else {}
        try:
            self.handles = self.engine.submit_many(requests, **held)
        except QueueFull as exc:
            self.count(429)
            raise APIError(
                429, str(exc), "rate_limit_error", code="queue_full", retry_after=retry_after
            ) from exc
        except ShuttingDown as exc:
            self.count(503)
            raise APIError(503, str(exc), "server_error", code="shutting_down") from exc
        except Unavailable as exc:
            self.count(503)
            raise unavailable(str(exc), retry_after) from exc
        except RequestError as exc:
            self.count(400)
            raise bad_request(exc) from exc
        self.prompt_tokens = sum(len(h.seq.prompt_ids) for h in self.handles[::n])

    def cancel(self) -> None:
        for handle in self.handles:
            if not handle.seq.finished:
                handle.cancel()

    def count(self, status: int) -> None:
        """Record the request's outcome in the metrics, once."""
        if not self.counted:
            self.counted = True
            self.metrics.request(self.endpoint, status)

    def close(self) -> None:
        """End the request: nothing of it keeps running (a client that left: 499)."""
        self.cancel()
        if self.open:
            self.count(499)

    async def _next(self, request: Request | None) -> list[tuple[int, Output]] | None:
        """The outputs that have arrived (waiting for one); None once the client has gone."""
        while True:
            try:
                items = [await asyncio.wait_for(self.queue.get(), timeout=1.0)]
            except TimeoutError:
                if request is not None and await request.is_disconnected():
                    self.cancel()
                    return None
                continue
            while not self.queue.empty():
                items.append(self.queue.get_nowait())
            got = [(index, out) for index, out in items if out is not None]
            if len(got) < len(items):  # _watch: the client has gone
                self.cancel()
                return None
            for index, out in got:
                self._record(index, out)
            return got

    async def _watch(self, request: Request) -> None:
        """Wait for the client to leave (its body is read already, so the next message is the
        disconnect), then wake ``_next`` at once, between two engine steps."""
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                self.queue.put_nowait((-1, None))
                return

    def _record(self, index: int, out: Output) -> None:
        choice = self.choices[index]
        choice.text += out.text
        choice.tokens += len(out.token_ids)
        if out.token_ids and not self.first_token:
            self.first_token = True
            self.metrics.first_token(time.perf_counter() - self.submitted)
        if out.finished:
            # "abort": the server shut down first (what vLLM says); "error": generation failed
            # (a stream says so in its last chunk); the rest are ends of text.
            reason = out.finish_reason
            choice.reason = reason if reason in ("length", "abort", "error") else "stop"
            choice.error = out.error if out.finish_reason == "error" else None
            choice.unavailable = out.unavailable
            self.open -= 1

    async def wait(self, request: Request) -> None:
        """Collect every choice to its end; a client that leaves cancels them at once."""
        watcher = asyncio.create_task(self._watch(request))
        try:
            while self.open:
                if await self._next(None) is None:
                    self.count(499)
                    return
        except asyncio.CancelledError:
            self.cancel()
            raise
        finally:
            watcher.cancel()
        self._fail_on_error()
        self.count(200)

    def _fail_on_error(self) -> None:
        failed = [c.error for c in self.choices if c.error]
        if failed and all(c.unavailable for c in self.choices if c.error):
            # no server could take it (every upstream down or failing before its first token)
            self.count(503)
            raise unavailable(f"generation failed: {failed[0]}", self.retry_after)
        if failed:
            self.count(500)
            raise APIError(500, f"generation failed: {failed[0]}", "server_error")

    def completion_choices(self) -> list[CompletionChoice]:
        """The finished choices of a completions request, with the prompt first under echo and
        OpenAI's legacy ``logprobs`` when asked for."""
        tokenizer = self.engine.tokenizer
        out = []
        for i, choice in enumerate(self.choices):
            text = choice.text if self.max_tokens else ""
            head = self._echoed_prompt(i) if self.echo else ""
            logprobs = None
            if self.top is not None:
                ids, entries = self._scored(i)
                logprobs = legacy_logprobs(tokenizer, token_pieces(tokenizer, ids), entries)
            out.append(
                CompletionChoice(
                    index=i, text=head + text, logprobs=logprobs, finish_reason=choice.reason
                )
            )
        return out

    def _echoed_prompt(self, index: int) -> str:
        """The text ``echo`` puts before choice ``index``'s completion: its prompt."""
        prompt = self.prompts[index // self.body.n]
        return prompt if isinstance(prompt, str) else self.engine.tokenizer.decode(prompt)

    def chat_choices(self) -> list[ChatChoice]:
        """The finished choices of a chat request, with their ``logprobs`` when asked for."""
        return [
            ChatChoice(
                index=i,
                message=AssistantMessage(content=c.text),
                logprobs=self.chat_logprobs(i),
                finish_reason=c.reason,
            )
            for i, c in enumerate(self.choices)
        ]

    def chat_logprobs(self, index: int) -> ChatLogprobs | None:
        """A finished chat choice's ``logprobs`` (None when not asked for)."""
        if self.top is None:
            return None
        tokenizer = self.engine.tokenizer
        entries = self.handles[index].seq.logprobs
        pieces = token_pieces(tokenizer, [e.token for e in entries])
        return ChatLogprobs(
            content=[chat_entry(tokenizer, p, e) for p, e in zip(pieces, entries, strict=True)]
        )

    def usage(self) -> Usage:
        if self.max_tokens == 0:  # echo alone: the one token made is not part of the answer
            return Usage(
                prompt_tokens=self.prompt_tokens,
                completion_tokens=0,
                total_tokens=self.prompt_tokens,
            )
        completion = sum(c.tokens for c in self.choices)
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion,
            total_tokens=self.prompt_tokens + completion,
        )

    def _chunk(self, kind: str, choices: list[dict], usage: Usage | None = None) -> str:
        data: dict[str, Any] = {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.body.model,
            "choices": choices,
        }
        if self.body.stream_options and self.body.stream_options.include_usage:
            data["usage"] = usage.model_dump() if usage is not None else None
        return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"

    async def _stream(
        self, request: Request, kind: str, piece: Callable[[int, Output], dict]
    ) -> AsyncIterator[str]:
        status = 200
        try:
            while self.open:
                items = await self._next(request)
                if items is None:
                    status = 499
                    return
                # What arrived while the client was being served goes out as one chunk per
                # choice: under load, fewer and larger events for server and client alike.
                joined = merged(items)
                if self.top is None and not self.echo:
                    events, failed = self._events(kind, joined, piece)
                else:  # logprobs and echo detokenize: off the event loop
                    events, failed = await run_in_threadpool(self._events, kind, joined, piece)
                status = 500 if failed else status
                for event in events:
                    yield event
            if self.body.stream_options and self.body.stream_options.include_usage:
                yield self._chunk(kind, [], self.usage())
            yield "data: [DONE]\n\n"
        finally:
            # The client went away (the response was cancelled) or the stream ended: nothing
            # of this request keeps running.
            if self.open:
                status = 499
            self.cancel()
            self.count(status)

    def _events(
        self, kind: str, outs: list[tuple[int, Output]], piece: Callable[[int, Output], dict]
    ) -> tuple[list[str], bool]:
        """The server-sent events for outputs that arrived, and whether one is an error."""
        events, failed = [], False
        for index, out in outs:
            if out.finish_reason == "error":
                # The choice ends with finish_reason "error" (after what it had made), then
                # the error itself: a client reading either knows the answer is cut short.
                failed = True
                events.append(self._chunk(kind, [piece(index, out)]))
                message = f"generation failed: {out.error}"
                error = {"error": {"message": message, "type": "server_error"}}
                events.append(f"data: {json.dumps(error)}\n\n")
            elif out.text or out.finished:
                events.append(self._chunk(kind, [piece(index, out)]))
        return events, failed

    def _scored(self, index: int) -> tuple[list[int], list[TokenLogprobs | None]]:
        """Choice ``index``'s tokens so far (the prompt's first under echo) with their entries:
        the whole answer's once it has finished, as far as the stream has come before."""
        seq = self.handles[index].seq
        upto = self.choices[index].tokens if self.max_tokens else 0
        ids: list[int] = list(seq.output_ids[:upto])
        entries: list[TokenLogprobs | None] = list(seq.logprobs[:upto])
        if self.echo:
            ids = list(seq.prompt_ids) + ids
            entries = list(seq.prompt_logprobs or [None] * len(seq.prompt_ids)) + entries
        return ids, entries

    def _unsent(self, index: int) -> tuple[list[str], list[TokenLogprobs | None], int]:
        """The tokens of choice ``index`` not streamed yet: their text pieces (spaced as in
        the whole answer), entries, and where the first piece starts in the choice's text."""
        ids, entries = self._scored(index)
        sent, self.sent[index] = self.sent[index], len(ids)
        context = min(sent, 6)  # token_pieces' window: the same pieces as over the whole answer
        pieces = token_pieces(self.engine.tokenizer, ids[sent - context :])[context:]
        at = self.sent_chars[index]
        self.sent_chars[index] += sum(len(t) for t in pieces)
        return pieces, entries[sent:], at

    def completion_chunks(self, request: Request) -> AsyncIterator[str]:
        tokenizer = self.engine.tokenizer
        echoed = [False] * len(self.choices)

        def piece(index: int, out: Output) -> dict:
            reason = self.choices[index].reason if out.finished else None
            text = out.text if self.max_tokens else ""  # max_tokens 0: the token made is dropped
            if self.echo and not echoed[index]:
                echoed[index] = True
                text = self._echoed_prompt(index) + text
            logprobs = None
            if self.top is not None:
                pieces, entries, at = self._unsent(index)
                logprobs = legacy_logprobs(tokenizer, pieces, entries, at).model_dump()
            return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}

        return self._stream(request, "text_completion", piece)

    async def chat_chunks(self, request: Request) -> AsyncIterator[str]:
        first = [
            {
                "index": i,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
            for i in range(len(self.choices))
        ]
        yield self._chunk("chat.completion.chunk", first)

        def piece(index: int, out: Output) -> dict:
            if out.finished:
                delta = {"content": out.text} if out.text else {}
                reason = self.choices[index].reason
            else:
                delta, reason = {"content": out.text}, None
            logprobs = None
            if self.top is not None:
                pieces, entries, _ = self._unsent(index)
                content = [
                    chat_entry(self.engine.tokenizer, p, e)
                    for p, e in zip(pieces, entries, strict=True)
                    if e is not None
                ]
                logprobs = ChatLogprobs(content=content).model_dump()
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}

        async for event in self._stream(request, "chat.completion.chunk", piece):
            yield event


def unavailable(message: str, retry_after: int) -> APIError:
    """503 for a request no upstream could take, with when to retry (as ``/health`` says it)."""
    return APIError(503, message, "server_error", code="upstreams_down", retry_after=retry_after)


def merged(items: list[tuple[int, Output]]) -> list[tuple[int, Output]]:
    """Consecutive outputs of each choice joined into one, in order of first arrival."""
    joined: dict[int, Output] = {}
    for index, out in items:
        before = joined.get(index)
        if before is None:
            joined[index] = out
            continue
        joined[index] = Output(
            out.request_id,
            before.token_ids + out.token_ids,
            before.text + out.text,
            out.finished,
            out.finish_reason,
            out.error,
        )
    return list(joined.items())
