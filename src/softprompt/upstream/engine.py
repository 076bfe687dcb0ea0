"""``UpstreamEngine``: the engine surface the server uses (submit, cancel, limits, adapters,
counters, drain), with the generation done by vLLM servers fed ``prompt_embeds``.

The server lays each request out as for the local engine (``Job``: text or chat template to
token ids); this engine turns a prompt-tuned one into the adapter's rows followed by the token
embeddings from the front end's table (``FrontEnd``: no model loaded here), sends it to an
upstream (``pool``) and hands each streamed piece back as an ``Output``. Its requests run as
tasks on one asyncio loop, on its own thread (``start``) or the caller's (``run``).

A request whose upstream fails before any of its tokens arrived is sent to another upstream;
one that fails later ends with ``finish_reason`` "error" (a stream's client has the first part
of the answer already, and a resumed answer would not be the one it started).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..adapters import Adapter, hidden_size_mismatch
from ..embeds import to_base64
from ..engine.batch import EngineStats, check_context
from ..engine.config import EngineConfig
from ..engine.engine import QueueFull, RequestHandle, ShuttingDown, prompt_ids
from ..engine.registry import AdapterRegistry, Prefix
from ..engine.sampling import RequestError, SamplingParams
from ..engine.sequence import Output, Sequence, Status
from ..frontend import FrontEnd
from .pool import Pool, Upstream, redact
from .wire import completion_body, error_message, read_event, read_prompt_logprobs

log = logging.getLogger(__name__)

Sink = Callable[[Output], None]

DEEP = (
    "adapter {name!r} is a prefix (deep prompt) adapter: keys and values at every layer, which "
    "vLLM's prompt_embeds (input rows only) cannot carry; serve it with softprompt's own engine "
    "(softprompt serve without --upstream), or train a prompt (train --method prompt)"
)
PENALTY = (
    "repetition_penalty is not available for an adapter with --upstream: vLLM penalises the "
    "tokens it was given, and a prompt sent as prompt_embeds has none, so the answer would not "
    "be the one softprompt's engine gives; serve it with softprompt's own engine"
)
NO_UPSTREAM = "no upstream answers now; retry later"
ECHO = (
    "echo with logprobs (prompt log-probabilities) is not available for an adapter with "
    "--upstream: vLLM scores no prompt given as prompt_embeds (the base model's prompts it "
    "scores); serve it with softprompt's own engine"
)


class Unavailable(RequestError):
    """No upstream answers now; a retry later may succeed (the server answers 503)."""


@dataclass
class UpstreamSettings:
    """How the engine talks to its upstreams."""

    timeout: float = 120.0
    """Seconds without a byte from an upstream before its request is given up (a stalled
    server); connecting has 5 s."""
    health_seconds: float = 1.0
    """How often each upstream's ``/health`` is polled."""
    embeds_dtype: torch.dtype = torch.float32
    """The dtype ``prompt_embeds`` are sent in (bfloat16 halves the bytes for a large model
    served in bfloat16; float32 is exact whatever the upstream runs in)."""
    api_key: str | None = None
    """Sent to the upstreams as ``Authorization: Bearer`` (vLLM's ``--api-key``)."""


class UpstreamEngine:
    """Serve a base model and its prompt-tuned adapters through vLLM servers.

    Args:
        front: the base model's tokenizer and input embedding table.
        upstreams: the servers, checked already (``check_upstreams``).
        config: the limits the server reads (``max_queue``: sequences in flight at most;
            ``max_new_tokens_cap``; ``max_resident_adapters``).
    """

    def __init__(
        self,
        front: FrontEnd,
        upstreams: list[Upstream],
        config: EngineConfig | None = None,
        settings: UpstreamSettings | None = None,
    ) -> None:
        logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per upstream request
        self.front = front
        self.tokenizer = front.tokenizer
        self.config = config or EngineConfig()
        self.settings = settings or UpstreamSettings()
        self.pool = Pool(upstreams)
        self.model = upstreams[0].model
        self.max_length = min(u.max_model_len for u in upstreams)
        """The context, as the upstreams run it (``check_context`` reads it)."""
        self.registry = AdapterRegistry(
            lambda adapters: [Prefix([], []) for _ in adapters],  # rows are all vLLM needs
            self._check_adapter,
            self.config.max_resident_adapters,
        )
        self.stats = EngineStats()
        self.eos = _eos_ids(front)
        self.failure: str | None = None
        self.background = True
        self.fails_over = True
        """A request may start again on another upstream (``submit_many``'s ``held``)."""
        """Outputs always come from the loop (``RequestHandle`` only waits)."""
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._client: Any = None
        self._tasks: dict[str, asyncio.Task] = {}
        self._held: set[str] = set()
        """Requests whose outputs are delivered whole, at their end (``submit_many``)."""
        self._in_flight = 0
        self._lock = threading.Lock()
        self._drain_until: float | None = None
        self._stopped = asyncio.Event()

    # Adapters -------------------------------------------------------------------------------

    def add_adapter(self, name: str, source: Adapter | str | Path) -> None:
        self.registry.add(name, source)

    def remove_adapter(self, name: str) -> None:
        self.registry.remove(name)

    def adapters(self) -> list[str]:
        return self.registry.names()

    def _check_adapter(self, adapter: Adapter) -> None:
        # Prefix adapters are listed (a request for one is refused, saying why); a prompt's rows
        # must fit the model's embeddings.
        if adapter.method != "prefix":
            mismatch = hidden_size_mismatch(adapter, self.front.hidden_size)
            if mismatch:
                raise RequestError(mismatch)

    # Requests -------------------------------------------------------------------------------

    def submit_many(
        self,
        requests: list[tuple[str | list[int], str | None, SamplingParams | None, Any]],
        held: bool = False,
    ) -> list[RequestHandle]:
        """Send several requests ``(prompt, adapter, params, sink)`` upstream, or none.

        ``held``: the caller sends nothing of an answer before its end (a response that is not
        streamed). Its outputs then come as one, at the end, and an upstream that fails
        mid-answer costs nothing but time: the answer starts again on another.

        Raises:
            RequestError: one cannot run (nothing is sent), QueueFull, ShuttingDown,
                Unavailable (no upstream answers now).
        """
        made: dict[tuple[int, str | None], tuple[list[int], str | None]] = {}
        prepared = [self._prepare(p, a, s or SamplingParams(), made) for p, a, s, _ in requests]
        limit = self.config.max_queue
        with self._lock:
            if self._drain_until is not None or self._stopped.is_set() or self._loop.is_closed():
                raise ShuttingDown("the server is shutting down and takes no new requests")
            if not self.pool.healthy():
                raise Unavailable(NO_UPSTREAM)
            if limit is not None and self._in_flight + len(prepared) > limit:
                raise QueueFull(
                    f"the queue is full ({self._in_flight} of {limit} places taken); retry later"
                )
            self._in_flight += len(prepared)
            self.stats.requests += len(prepared)
            if held:
                self._held.update(seq.request_id for seq, _ in prepared)
            handles = []
            for (seq, body), (_, _, _, sink) in zip(prepared, requests, strict=True):
                handle = RequestHandle(self, seq, sink)  # type: ignore[arg-type]
                handles.append(handle)
                # under the lock: the loop is closed under it too, so this cannot meet it closed
                self._loop.call_soon_threadsafe(self._launch, seq, body, handle)
        return handles

    def _prepare(
        self,
        prompt: str | list[int],
        adapter: str | None,
        params: SamplingParams,
        made: dict[tuple[int, str | None], tuple[list[int], str | None]],
    ) -> tuple[Sequence, dict[str, Any]]:
        """The request as a sequence and its upstream body, or ``RequestError`` saying why not.
        ``made``: the inputs already made in this submission, by prompt object and adapter (the
        ``n`` choices of one prompt share one tokenizing and one encoded tensor)."""
        if params.max_new_tokens > self.config.max_new_tokens_cap:
            raise RequestError(
                f"max new tokens {params.max_new_tokens} is above this server's cap of "
                f"{self.config.max_new_tokens_cap}",
                field="max_new_tokens",
            )
        key = (id(prompt), adapter)  # the objects live through the submission: ids are unique
        if key not in made:
            made[key] = self._inputs(prompt, adapter)
        ids, embeds = made[key]
        if adapter is not None:
            if params.prompt_logprobs:
                raise RequestError(ECHO, field="echo")
            if params.repetition_penalty != 1.0:
                raise RequestError(PENALTY, field="repetition_penalty")
        body = completion_body(self.model, ids, params, embeds)
        if params.prompt_logprobs:  # echo with logprobs, for the base model (token ids)
            body["prompt_logprobs"] = params.logprobs or 0
            body["stream"] = False  # vLLM gives prompt log-probabilities whole only
        return Sequence(ids, adapter, params), body

    def _inputs(self, prompt: str | list[int], adapter: str | None) -> tuple[list[int], str | None]:
        """The prompt's token ids and, for an adapter, the base64 ``prompt_embeds``: its rows,
        then the prompt's token embeddings."""
        ids = prompt_ids(self.tokenizer, prompt, self.front.vocab_size)
        rows = None if adapter is None else self._rows(adapter)
        check_context(self.max_length, len(ids), 0 if rows is None else int(rows.shape[0]))
        if rows is None:
            return ids, None
        with torch.no_grad():
            text = self.front.embedding(torch.tensor(ids))
        tensor = torch.cat([rows.to(text.dtype), text]).to(self.settings.embeds_dtype)
        return ids, to_base64(tensor)

    def _rows(self, name: str) -> torch.Tensor:
        """The adapter's rows as read now (a later change serves later requests)."""
        if name not in self.registry:
            known = ", ".join(self.registry.names()) or "none"
            raise RequestError(f"unknown adapter {name!r} (adapters: {known})", field="adapter")
        lease = self.registry.claim(name)
        try:
            adapter = lease.adapter
            assert adapter is not None
            if adapter.method == "prefix":
                raise RequestError(DEEP.format(name=name), field="model")
            self.registry.prepare(lease)  # counted as resident, least recently used last
            return adapter.weights.detach().float().clone()
        finally:
            self.registry.release(lease)

    def cancel(self, request_id: str) -> None:
        """Stop a request: its upstream call is closed, so the upstream stops too."""

        def cancel() -> None:
            task = self._tasks.get(request_id)
            if task is not None:
                task.cancel()

        with contextlib.suppress(RuntimeError):  # a closed loop has nothing left to cancel
            self._loop.call_soon_threadsafe(cancel)

    def room(self) -> int | None:
        if self.config.max_queue is None:
            return None
        with self._lock:
            return max(0, self.config.max_queue - self._in_flight)

    def load(self) -> dict[str, int]:
        with self._lock:
            return {"running": self._in_flight, "waiting": 0}

    def health(self) -> list[dict[str, Any]]:
        """Each upstream: address, health, requests in flight and served, failures."""
        return [u.report() for u in self.pool.upstreams]

    # The loop -------------------------------------------------------------------------------

    def _launch(self, seq: Sequence, body: dict[str, Any], handle: RequestHandle) -> None:
        task = self._loop.create_task(self._serve(seq, body, handle))
        self._tasks[seq.request_id] = task
        # The request's end, wherever it ends: a task cancelled before its first step never
        # runs its coroutine's body (so no ``finally`` of it), but its done callbacks run.
        task.add_done_callback(lambda _: self._ended(seq, handle))

    def _ended(self, seq: Sequence, handle: RequestHandle) -> None:
        """Give a finished request's place back; one that ended without its last output (it was
        cancelled, or cancelled before it started) gets it now."""
        self._tasks.pop(seq.request_id, None)
        if not seq.finished:
            reason = "abort" if self._drain_until is not None else "cancelled"
            self._finish(seq, handle, reason, None)
        with self._lock:
            self._in_flight -= 1
            self._held.discard(seq.request_id)

    async def _serve(self, seq: Sequence, body: dict[str, Any], handle: RequestHandle) -> None:
        """Run one sequence upstream to its end; its last output says how (``_ended`` sends it
        for a cancelled one)."""
        tried: set[str] = set()
        try:
            while True:
                upstream = self.pool.pick(tried)
                if upstream is None:
                    said = "every upstream failed before the answer's first token; retry later"
                    self._finish(seq, handle, "error", said, unavailable=True)
                    return
                tried.add(upstream.url)
                try:
                    retry = await self._stream(upstream, seq, body, handle)
                finally:
                    self.pool.done(upstream)
                if not retry:
                    return
        except Exception as exc:  # noqa: BLE001 - one request's failure is its own
            log.exception("request %s failed", seq.request_id)
            self._finish(seq, handle, "error", redact(str(exc) or type(exc).__name__))

    async def _stream(
        self, upstream: Upstream, seq: Sequence, body: dict[str, Any], handle: RequestHandle
    ) -> bool:
        """One try on ``upstream``; True when it failed before any token and another may try."""
        import httpx

        top = seq.params.logprobs or 0
        try:
            async with self._client.stream(
                "POST", f"{upstream.url}/v1/completions", json=body
            ) as response:
                if response.status_code != 200:
                    said = error_message(_parsed(await response.aread()))
                    if response.status_code >= 500 and self._restartable(seq):
                        upstream.failures += 1
                        return True
                    said = redact(f"upstream {upstream.name}: {said}")
                    self._finish(seq, handle, "error", said)
                    return False
                if not body["stream"]:  # prompt log-probabilities: vLLM sends them whole
                    answer = json.loads(await response.aread())
                    seq.prompt_logprobs = read_prompt_logprobs(answer, seq.prompt_ids, top)
                    lines = [f"data: {json.dumps(answer)}"]
                else:
                    lines = response.aiter_lines()  # type: ignore[assignment]
                async for line in _lines(lines):
                    chunk = read_event(line, top)
                    if chunk is None:
                        continue
                    if chunk.error is not None:
                        said = redact(f"upstream {upstream.name}: {chunk.error}")
                        self._finish(seq, handle, "error", said)
                        return False
                    self._record(seq, handle, chunk)
                    if seq.finished:
                        return False
        except (httpx.TransportError, httpx.DecodingError) as exc:
            upstream.failures += 1
            if isinstance(exc, (httpx.ConnectError, httpx.RemoteProtocolError)):
                upstream.down(f"{type(exc).__name__}: {exc}")
            if self._restartable(seq):
                return True
            said = redact(f"upstream {upstream.name} failed mid-answer: {exc!r}")
            self._finish(seq, handle, "error", said)
            return False
        if not seq.finished:  # the stream ended without a finish reason
            self._finish(seq, handle, "error", f"upstream {upstream.name} ended the answer early")
        return False

    def _restartable(self, seq: Sequence) -> bool:
        """Whether ``seq`` can start again on another upstream (nothing of it has reached its
        caller), made ready to."""
        if seq.output_ids and seq.request_id not in self._held:
            return False
        self.stats.generated_tokens -= len(seq.output_ids)  # thrown away: not generated for it
        seq.output_ids.clear()
        seq.logprobs.clear()
        seq.text, seq.first_token_at = "", None
        return True

    def _record(self, seq: Sequence, handle: RequestHandle, chunk: Any) -> None:
        if chunk.finish_reason == "stop" and chunk.token_ids and chunk.token_ids[-1] in self.eos:
            # vLLM counts the end-of-sequence token as generated; softprompt's engine does not
            chunk.token_ids = chunk.token_ids[:-1]
            chunk.logprobs = chunk.logprobs[: len(chunk.token_ids)]
        now = time.perf_counter()
        if chunk.token_ids and seq.first_token_at is None:
            seq.first_token_at = now
            seq.status = Status.RUNNING
            self.stats.time_to_first_token.observe(now - seq.arrival)
        elif chunk.token_ids and seq.last_token_at is not None:
            seq.longest_gap = max(seq.longest_gap, now - seq.last_token_at)
        if chunk.token_ids:
            seq.last_token_at = now
        seq.output_ids.extend(chunk.token_ids)
        seq.logprobs.extend(chunk.logprobs)
        seq.text += chunk.text
        self.stats.generated_tokens += len(chunk.token_ids)
        finished = chunk.finish_reason is not None
        if finished:
            seq.finish(chunk.finish_reason)
            self.stats.prompt_tokens += len(seq.prompt_ids)
            if len(seq.output_ids) > 1:
                self.stats.longest_gap.observe(seq.longest_gap)
        if seq.request_id in self._held:
            if finished:
                ids, reason = list(seq.output_ids), seq.finish_reason
                handle.deliver(Output(seq.request_id, ids, seq.text, True, reason))
        elif chunk.text or chunk.token_ids or finished:
            handle.deliver(
                Output(seq.request_id, chunk.token_ids, chunk.text, finished, seq.finish_reason)
            )

    def _finish(
        self,
        seq: Sequence,
        handle: RequestHandle,
        reason: str,
        error: str | None,
        unavailable: bool = False,
    ) -> None:
        if seq.finished:
            return
        seq.finish(reason, error)
        if error:
            log.warning("request %s: %s", seq.request_id, error)
        if seq.request_id in self._held:  # what it made so far, as the local engine hands out
            ids, text = list(seq.output_ids), seq.text
        else:
            ids, text = [], ""
        handle.deliver(Output(seq.request_id, ids, text, True, reason, error, unavailable))

    async def _main(self) -> None:
        import httpx

        headers = {}
        if self.settings.api_key:
            headers["Authorization"] = f"Bearer {self.settings.api_key}"
        timeout = httpx.Timeout(self.settings.timeout, connect=5.0)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
        async with httpx.AsyncClient(timeout=timeout, limits=limits, headers=headers) as client:
            self._client = client
            health = asyncio.create_task(self._poll(client))
            try:
                while not self._stopped.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopped.wait(), 0.2)
                    self._check_drain()
            finally:
                health.cancel()
                for task in list(self._tasks.values()):
                    task.cancel()
                if self._tasks:
                    await asyncio.wait(list(self._tasks.values()), timeout=5)

    def _check_drain(self) -> None:
        if self._drain_until is None:
            return
        if not self._tasks or time.monotonic() >= self._drain_until:
            for task in list(self._tasks.values()):
                task.cancel()  # ends with "abort"
            if not self._tasks:
                self._stopped.set()

    async def _poll(self, client: Any) -> None:
        """Mark each upstream up or down by its ``/health``, every ``health_seconds``."""
        while True:
            for upstream in self.pool.upstreams:
                try:
                    answer = await client.get(f"{upstream.url}/health", timeout=2.0)
                    ok = answer.status_code == 200
                    why = f"/health answered {answer.status_code}"
                except Exception as exc:  # noqa: BLE001 - any failure means down
                    ok, why = False, redact(f"{type(exc).__name__}: {exc}")
                if ok:
                    upstream.up()
                else:
                    upstream.down(why)
            await asyncio.sleep(self.settings.health_seconds)

    # Lifecycle ------------------------------------------------------------------------------

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as exc:
            self.failure = redact(f"the upstream loop died: {exc!r}")
            log.exception("the upstream loop died")
            raise
        finally:
            with contextlib.suppress(Exception):
                self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            with self._lock:  # submit_many checks it under the lock before queueing on it
                self._loop.close()

    def start(self) -> None:
        """Run the requests' loop on a background thread (idempotent)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(
            target=self._run_loop, name="softprompt-upstream", daemon=True
        )
        self._thread.start()

    def run(self) -> None:
        """Run the requests' loop in the calling thread until ``stop`` or a drain ends."""
        self._run_loop()

    def drain(self, seconds: float) -> None:
        """Take no new requests; give running ones ``seconds``, then end them with "abort"."""
        if self._drain_until is None:
            self._drain_until = time.monotonic() + max(0.0, seconds)

    @property
    def draining(self) -> bool:
        return self._drain_until is not None

    def stop(self) -> None:
        """End every request and the loop (joins the background thread)."""
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._stopped.set)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
            self._thread = None


async def _lines(lines: Any) -> Any:
    """The lines of an answer, streamed (an async iterator) or whole (a list)."""
    if isinstance(lines, list):
        for line in lines:
            yield line
    else:
        async for line in lines:
            yield line


def _parsed(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")[:300]


def _eos_ids(front: FrontEnd) -> set[int]:
    """The ids that end an answer: the tokenizer's and the config's end-of-sequence tokens."""
    ids = {front.tokenizer.eos_token_id}
    configured = getattr(front.config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return {int(i) for i in ids if i is not None}
