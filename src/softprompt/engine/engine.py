"""The engine: requests in, tokens out, many adapters and the base model in one running batch.

Each ``step`` admits waiting requests into free slots and computes a budget's worth of their
prompts (only their text after their adapter's cached prefix and what the prefix cache holds of
it; a long prompt in chunks over several steps), runs one decode step for every running row,
hands each request its new tokens, and lets finished rows leave. ``start`` runs steps on a
background thread so requests can arrive at any time (the server's mode); without it, whoever
waits on a request drives the steps.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapters import Adapter, hidden_size_mismatch
from ..errors import UserError
from .batch import Batch, EngineStats, check_context
from .config import EngineConfig
from .detokenize import Detokenizer
from .prefix_cache import PrefixCache
from .registry import AdapterRegistry
from .runner import ModelRunner
from .sampling import RequestError, SamplingParams, prompt_ids
from .scheduler import Scheduler
from .sequence import Completion, Output, Sequence, Status
from .stops import StopMatcher

if TYPE_CHECKING:
    from ..prompt import SoftPromptModel

log = logging.getLogger(__name__)

Sink = Callable[[Output], None]
"""Where a request's outputs go, called from the engine's thread."""


class QueueFull(RequestError):
    """The engine's queue has no room for the request now; it may be retried later."""


class ShuttingDown(RequestError):
    """The engine is draining or stopped and takes no new requests."""


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Token ids that end a completion: the tokenizer's EOS and the model's configured ones."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    return sorted(ids)


class RequestHandle:
    """A submitted request: iterate it for its outputs as they come, or wait for ``result()``."""

    def __init__(
        self, engine: Engine, seq: Sequence, sink: Callable[[Output], None] | None = None
    ) -> None:
        self.engine = engine
        self.seq = seq
        self._sink = sink
        """Where outputs go instead of this handle's queue, when given."""
        self._outputs: queue.Queue[Output] = queue.Queue()
        self._consumed = False
        """Whether the final output has been handed to the caller already."""

    @property
    def request_id(self) -> str:
        return self.seq.request_id

    def cancel(self) -> None:
        self.engine.cancel(self.request_id)

    def deliver(self, out: Output) -> None:
        """Hand ``out`` to the sink, or queue it for iteration (called from the engine)."""
        if self._sink is None:
            self._outputs.put(out)
            return
        try:
            self._sink(out)
        except Exception:  # noqa: BLE001 - a consumer's failure is not the engine's
            log.exception("an output consumer failed for %s", self.request_id)

    def __iter__(self) -> Iterator[Output]:
        if self._sink is not None:
            raise RuntimeError("this request's outputs go to its sink")
        while not self._consumed:
            try:
                out = self._outputs.get_nowait()
            except queue.Empty:
                if self.engine.background:
                    out = self._outputs.get()
                else:
                    self.engine.step()
                    continue
            if out.finished:
                self._consumed = True
            yield out

    def result(self) -> Completion:
        """Wait until the request finishes and return all of it."""
        for _ in self:
            pass
        return self.seq.completion()


class Engine:
    """Serve the base model and any number of adapters from one model in memory.

    Args:
        model: a causal LM from transformers, frozen; it runs where it is, in its dtype.
        tokenizer: its tokenizer.
        config: batch and memory limits.
    """

    def __init__(self, model: Any, tokenizer: Any, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self.tokenizer = tokenizer
        self.runner = ModelRunner(model, self.config.switches(), self.config.max_batch_size)
        self.registry = AdapterRegistry(
            self.runner.prefixes, self._check_adapter, self.config.max_resident_adapters
        )
        self.batch = Batch(
            self.runner,
            self.registry,
            Scheduler(
                self.config.max_batch_size,
                self.config.max_prefill_tokens,
                self.config.policy,
                self.config.idle_prefill_tokens,
            ),
            self.config.prefill_padding,
            eos_ids(model, tokenizer),
            Detokenizer(tokenizer),
            self._deliver,
            lambda seq: self._leases.get(seq.request_id, (seq, None))[1],
            PrefixCache(
                self.config.prefix_cache_block, int(self.config.prefix_cache_mb * (1 << 20))
            ),
        )
        self._leases: dict[str, tuple[Sequence, Any]] = {}
        """Each unfinished request's hold on its adapter, taken at submission."""
        self._handles: dict[str, RequestHandle] = {}
        self._incoming: list[Sequence] = []
        self._cancels: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._step_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._looping = False
        self._drain_until: float | None = None
        self.failure: str | None = None
        """Why the step loop died, if it did (the server's health check reads it)."""

    # The batch's parts, under the names benchmarks, tests and the server read.

    @property
    def scheduler(self) -> Scheduler:
        return self.batch.scheduler

    @property
    def cache(self) -> Any:
        return self.batch.cache

    @property
    def prefix_cache(self) -> PrefixCache:
        return self.batch.prefix_cache

    @property
    def stats(self) -> EngineStats:
        return self.batch.stats

    @property
    def detokenizer(self) -> Detokenizer:
        return self.batch.detokenizer

    @property
    def eos(self) -> list[int]:
        """Token ids that end a completion (``eos_ids``; settable)."""
        return self.batch.eos

    @eos.setter
    def eos(self, ids: list[int]) -> None:
        self.batch.eos = ids

    @classmethod
    def from_softprompt(cls, spm: SoftPromptModel, config: EngineConfig | None = None) -> Engine:
        """An engine over ``spm``'s base model serving every adapter loaded in it (live rows)."""
        engine = cls(spm.model, spm.tokenizer, config)
        for name, adapter in spm.adapters.items():
            engine.add_adapter(name, adapter)
        return engine

    # Adapters ------------------------------------------------------------------------------

    def add_adapter(self, name: str, source: Adapter | str | Path) -> None:
        """Serve ``source`` (an adapter folder or an ``Adapter``) as ``name`` from now on."""
        self.registry.add(name, source)

    def remove_adapter(self, name: str) -> None:
        """Stop serving ``name``; requests already running with it finish."""
        self.registry.remove(name)

    def adapters(self) -> list[str]:
        return self.registry.names()

    def _check_adapter(self, adapter: Adapter) -> None:
        if adapter.method == "prefix":
            try:
                mismatch = self.runner.prefix_shape.mismatch(adapter.config, adapter.token_dim)
            except UserError as exc:
                raise RequestError(str(exc)) from exc
        else:
            mismatch = hidden_size_mismatch(adapter, self.runner.hidden_size)
        if mismatch:
            raise RequestError(mismatch)
        if adapter.num_virtual_tokens >= self.runner.max_length:
            raise RequestError(f"adapter {adapter.name!r} is longer than the model's context")

    # Requests ------------------------------------------------------------------------------

    def submit(
        self,
        prompt: str | list[int],
        adapter: str | None = None,
        params: SamplingParams | None = None,
        sink: Callable[[Output], None] | None = None,
    ) -> RequestHandle:
        """Queue one request; it joins the running batch at the next step.

        ``prompt`` is text or token ids (the adapter's virtual tokens are not part of it).
        ``sink``, if given, receives every ``Output`` (from the engine's thread) instead of the
        handle's iterator.

        Raises:
            RequestError: the request cannot run (unknown adapter, empty or too long prompt,
                too many new tokens, a token id outside the vocabulary).
        """
        return self.submit_many([(prompt, adapter, params, sink)])[0]

    def submit_many(
        self,
        requests: list[tuple[str | list[int], str | None, SamplingParams | None, Sink | None]],
    ) -> list[RequestHandle]:
        """Queue several requests ``(prompt, adapter, params, sink)`` together, or none of them.

        Raises:
            RequestError: one request cannot run (nothing is queued).
            QueueFull: the queue has no room for all of them now.
            ShuttingDown: the engine takes no new requests.
        """
        seqs = [self._check_request(p, a, s or SamplingParams()) for p, a, s, _ in requests]
        max_queue = self.config.max_queue
        if max_queue is not None and len(seqs) > max_queue:
            raise RequestError(
                f"{len(seqs)} sequences in one request is above this engine's queue of {max_queue}",
                field="n",
            )
        leases: list[Any] = []
        try:
            for seq in seqs:
                # The adapter is held from now on: removing it lets its queued requests finish.
                lease = self.registry.claim(seq.adapter) if seq.adapter else None
                leases.append(lease)
                if lease is not None:  # its rows as read now, which are what will run
                    rows = lease.adapter
                    virtual = rows.num_virtual_tokens if rows is not None else lease.length
                    check_context(self.runner.max_length, len(seq.prompt_ids), virtual)
            with self._lock:
                if self._stopping or self._drain_until is not None:
                    raise ShuttingDown("the server is shutting down and takes no new requests")
                waiting = self._waiting()
                if max_queue is not None and waiting + len(seqs) > max_queue:
                    raise QueueFull(
                        f"the queue is full ({waiting} of {max_queue} places taken); retry later"
                    )
                handles = self._enqueue(seqs, leases, [r[3] for r in requests])
        except BaseException:
            for lease in leases:
                if lease is not None:
                    self.registry.release(lease)
            raise
        self._wake.set()
        return handles

    def _enqueue(
        self,
        seqs: list[Sequence],
        leases: list[Any],
        sinks: list[Sink | None],
    ) -> list[RequestHandle]:
        """Hand checked requests to the step loop (the lock held)."""
        handles = []
        for seq, lease, sink in zip(seqs, leases, sinks, strict=True):
            handle = RequestHandle(self, seq, sink)
            handles.append(handle)
            if lease is not None:
                self._leases[seq.request_id] = (seq, lease)
            self._handles[seq.request_id] = handle
            self._incoming.append(seq)
            self.stats.requests += 1
        return handles

    def _check_request(
        self, prompt: str | list[int], adapter: str | None, params: SamplingParams
    ) -> Sequence:
        """The request as a sequence, or ``RequestError`` saying why it cannot run."""
        ids = self._prompt_ids(prompt)
        virtual = 0
        if adapter is not None:
            if adapter not in self.registry:
                known = ", ".join(self.registry.names()) or "none"
                raise RequestError(
                    f"unknown adapter {adapter!r} (adapters: {known})", field="adapter"
                )
            virtual = self.registry.length(adapter)
        if params.max_new_tokens > self.config.max_new_tokens_cap:
            raise RequestError(
                f"max new tokens {params.max_new_tokens} is above this engine's cap of "
                f"{self.config.max_new_tokens_cap}",
                field="max_new_tokens",
            )
        check_context(self.runner.max_length, len(ids), virtual)
        seq = Sequence(ids, adapter, params)
        if params.stop:
            seq.stops = StopMatcher(params.stop)
        return seq

    def generate(
        self,
        prompts: list[str | list[int]],
        adapters: list[str | None] | None = None,
        params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[Completion]:
        """Run every request to the end (all submitted at once); completions in input order."""
        adapters = adapters if adapters is not None else [None] * len(prompts)
        if isinstance(params, list):
            per_request = params
        else:
            per_request = [params or SamplingParams()] * len(prompts)
        handles = [
            self.submit(p, a, s) for p, a, s in zip(prompts, adapters, per_request, strict=True)
        ]
        return [h.result() for h in handles]

    def stream(
        self,
        prompt: str | list[int],
        adapter: str | None = None,
        params: SamplingParams | None = None,
    ) -> Iterator[Output]:
        """The request's outputs as they are produced."""
        return iter(self.submit(prompt, adapter, params))

    async def astream(
        self,
        prompt: str | list[int],
        adapter: str | None = None,
        params: SamplingParams | None = None,
    ) -> AsyncIterator[Output]:
        """The request's outputs as they are produced, for asyncio code; starts the engine thread.

        Leaving the loop early (or being cancelled) cancels the request.
        """
        self.start()
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[Output] = asyncio.Queue()
        handle = self.submit(
            prompt,
            adapter,
            params,
            sink=lambda out: _post(loop, outputs, out),
        )
        finished = False
        try:
            while not finished:
                out = await outputs.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                handle.cancel()

    def cancel(self, request_id: str) -> None:
        """Stop a request; it finishes with reason ``cancelled`` at the next step."""
        with self._lock:
            if request_id in self._handles:
                self._cancels.add(request_id)
        self._wake.set()

    def room(self) -> int | None:
        """Places free in the queue now (None: the queue is not bounded)."""
        if self.config.max_queue is None:
            return None
        with self._lock:
            waiting = self._waiting()
        return max(0, self.config.max_queue - waiting)

    def _waiting(self) -> int:
        """Requests queued, not yet running (the lock held)."""
        return len(self._incoming) + len(self.scheduler.waiting)

    def load(self) -> dict[str, int]:
        """Requests in the running batch, and waiting for a place in it."""
        with self._lock:
            incoming = len(self._incoming)
        return {
            "running": len(self.scheduler.running) + len(self.scheduler.prefilling),
            "waiting": len(self.scheduler.waiting) + incoming,
        }

    def has_work(self) -> bool:
        with self._lock:
            pending = bool(self._incoming or self._cancels)
        return pending or self.scheduler.has_work()

    # The background loop ---------------------------------------------------------------------

    @property
    def background(self) -> bool:
        """Whether a loop runs steps on its own (``start`` or ``run``), so callers only wait."""
        return self._looping

    def start(self) -> None:
        """Run steps on a background thread whenever there is work (idempotent)."""
        if self.background:
            return
        self._stopping = False
        self._looping = True
        self._thread = threading.Thread(target=self._loop, name="softprompt-engine", daemon=True)
        self._thread.start()

    def run(self) -> None:
        """Run steps in the calling thread whenever there is work, until ``stop()``.

        The server calls this from the main thread and serves HTTP from another: on the CPU,
        torch's small operations run slower from a secondary thread (OpenMP; figures in
        docs/benchmarks/engine.md).
        """
        if self.background:
            raise RuntimeError("the engine is already running")
        self._stopping = False
        self._looping = True
        self._loop()

    def drain(self, seconds: float) -> None:
        """Take no new requests; let the loop finish the accepted ones for up to ``seconds``,
        then end the rest with reason ``abort`` and stop.

        Safe in a signal handler: it takes no lock, not even the wake-up event's (the
        interrupted thread may hold one); an idle loop notices within its 0.5 s wait."""
        if self._drain_until is None:
            self._drain_until = time.monotonic() + max(0.0, seconds)

    @property
    def draining(self) -> bool:
        return self._drain_until is not None

    def stop(self) -> None:
        """Stop the loop after its current step (and join the background thread)."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        try:
            self._steps_until_stopped()
        except BaseException as exc:
            # The loop itself died (not one step: those are caught below). Nothing will step
            # again: say so to whoever checks health, and end every request instead of leaving
            # its client waiting.
            self.failure = f"the engine's step loop died: {exc!r}"
            log.exception("the engine's step loop died")
            with self._lock:
                self._stopping = True
            try:
                self._abort_all("error", "the engine stopped (see the server log)")
            except Exception:  # noqa: BLE001 - the original failure is what matters
                log.exception("could not end the requests after the loop died")
            raise
        finally:
            self._looping = False

    def _steps_until_stopped(self) -> None:
        while not self._stopping:
            self._wake.clear()  # before looking: a submit from now on is not missed
            if self._drain_until is not None:
                if not self.has_work():
                    break
                if time.monotonic() >= self._drain_until:
                    self._abort_all("abort", "the server shut down before this request finished")
                    break
            if not self.has_work():
                self._wake.wait(timeout=0.5)
                continue
            try:
                self.step()
            except Exception:  # a bug: fail what is running rather than hang every client
                log.exception("engine step failed; failing the running requests")
                self._abort_all("error", "internal engine error (see the server log)")

    # One step -----------------------------------------------------------------------------

    def step(self) -> None:
        """Admit, prefill, decode one token for every running row, hand out outputs."""
        with self._step_lock:
            self._take_incoming()
            self.batch.step()
            self._release_finished()

    def _take_incoming(self) -> None:
        with self._lock:
            incoming, self._incoming = self._incoming, []
            cancels, self._cancels = self._cancels, set()
        for seq in incoming:
            self.scheduler.add(seq)
        for request_id in cancels:
            handle = self._handles.get(request_id)
            if handle is None or handle.seq.finished:
                continue
            seq = handle.seq
            if seq.status is Status.WAITING:
                self.scheduler.drop_waiting(seq)
            self.batch.finish(seq, "cancelled")

    def _abort_all(self, reason: str, message: str) -> None:
        """End every request the engine holds (running, waiting, just submitted)."""
        with self._step_lock:
            self._take_incoming()
            scheduler = self.scheduler
            for seq in [*scheduler.running, *scheduler.prefilling, *scheduler.waiting]:
                if not seq.finished:
                    self.batch.finish(seq, reason, message)
            self.scheduler.waiting.clear()
            self.batch.leave()
            self._release_finished()

    def _deliver(self, seq: Sequence, out: Output) -> None:
        """Hand ``out`` to the request's handle (dropped with the final output)."""
        with self._lock:
            if out.finished:
                handle = self._handles.pop(seq.request_id, None)
            else:
                handle = self._handles.get(seq.request_id)
        if handle is not None:
            handle.deliver(out)

    def _release_finished(self) -> None:
        """Give finished requests' adapter leases back to the registry."""
        with self._lock:  # submissions add leases from other threads
            ended = [r for r, (seq, _) in self._leases.items() if seq.finished]
            done = [self._leases.pop(r) for r in ended]
        for _, lease in done:
            self.registry.release(lease)

    def memory(self) -> dict[str, int]:
        """Bytes held: the model's parameters (shared with the caller's model), the packed copy
        of its linear weights, the KV cache and the resident adapters."""
        params = self.runner.model.parameters()
        return {
            "model": sum(p.numel() * p.element_size() for p in params),
            "packed": self.runner.packed_nbytes(),
            "kv_cache": self.cache.nbytes(),
            "adapters": self.registry.nbytes(),
            "prefix_cache": self.prefix_cache.nbytes,
        }

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        return prompt_ids(self.tokenizer, prompt, self.runner.vocab_size)


def _post(loop: asyncio.AbstractEventLoop, outputs: asyncio.Queue[Output], out: Output) -> None:
    """Hand ``out`` to an asyncio queue from the engine's thread."""
    loop.call_soon_threadsafe(outputs.put_nowait, out)
