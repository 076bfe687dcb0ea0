"""The engine: requests in, tokens out, many adapters and the base model in one running batch.

Each ``step`` admits waiting requests into free slots (prefilling only their text after their
adapter's cached prefix), runs one decode step for every running row, hands each request its new
tokens, and lets finished rows leave. ``start`` runs steps on a background thread so requests can
arrive at any time (the server's mode); without it, whoever waits on a request drives the steps.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from ..adapters import Adapter, hidden_size_mismatch
from ..device import out_of_memory
from ..errors import UserError
from .detokenize import Detokenizer
from .registry import AdapterRegistry
from .runner import ModelRunner
from .sampling import (
    FAILED,
    RequestError,
    SamplingParams,
    TokenLogprobs,
    make_generator,
    pick_tokens,
    prompt_logprobs,
    seen_mask,
)
from .scheduler import Scheduler, length_groups
from .sequence import Completion, Output, Sequence, Status
from .stops import StopMatcher

if TYPE_CHECKING:
    from ..prompt import SoftPromptModel

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


def one_by_one(
    items: list[T], run: Callable[[T], R], failed: Callable[[T, Exception], R]
) -> list[R]:
    """``run`` on each item alone, after a batched run of them all failed: only the items that
    fail again fail, each with ``failed(item, exc)`` as its result."""
    results = []
    for item in items:
        try:
            results.append(run(item))
        except Exception as exc:  # noqa: BLE001 - this item's alone
            results.append(failed(item, exc))
    return results


Sink = Callable[[Output], None]
"""Where a request's outputs go, called from the engine's thread."""


class QueueFull(RequestError):
    """The engine's queue has no room for the request now; it may be retried later."""


class ShuttingDown(RequestError):
    """The engine is draining or stopped and takes no new requests."""


@dataclass
class EngineConfig:
    """Limits of one engine."""

    max_batch_size: int = 32
    """Requests decoded together at most (slots of the KV cache)."""
    max_prefill_tokens: int = 2048
    """Prompt tokens admitted in one step at most (one long prompt always gets in)."""
    max_new_tokens_cap: int = 4096
    """Requests asking for more new tokens are refused."""
    max_resident_adapters: int = 64
    """Adapter prefixes kept in memory at most; the least recently used idle one goes first."""
    max_queue: int | None = None
    """Requests waiting for a slot at most (None: no bound, for offline batches; the server sets
    one); a submission beyond it is refused with ``QueueFull``. A waiting request holds at most
    the model's context in token ids and its capped stop strings, so this bounds the queue's
    memory."""
    prefill_padding: float = 1.0
    """Joining requests are prefilled in groups of similar length, a new group whenever padding
    would exceed this share of a group's positions (1.0: one group; 0.2: at most a fifth
    padding, a few more forwards). One group is the default: grouping was not measured to pay
    (docs/benchmarks/engine.md, ``benchmarks/bench_prefill.py``)."""
    policy: str = "continuous"
    """``continuous`` (join between steps) or ``static`` (a new batch when the last one ends)."""
    packed_weights: bool | None = None
    """The CPU fast path: linear layers on weights packed for oneDNN, and a lean forward for
    Llama-family models (CPU float32; None: when that applies)."""
    graphs: bool | None = None
    """Decode steps of fixed shape recorded as CUDA graphs and replayed (``graphs.py``; None:
    on a GPU, for Llama-family models). On the CPU, True runs the same step eagerly."""
    full_batch_pack: bool | None = None
    """With packed weights, a second copy packed for MKL at ``max_batch_size`` rows for full
    decode batches (a loaded server's); faster on some CPUs, slower on others
    (docs/benchmarks/engine.md). None: measured on this machine at start-up, the decision cached
    (``autotune.py``; ``$SOFTPROMPT_FULL_BATCH_PACK`` 0 or 1 forces it)."""
    cpu_kernels: bool | None = None
    """With the lean forward on the CPU, decode steps run the fused C kernels of
    ``cpu_kernels.py`` (attention over the slot cache, RMSNorm, SwiGLU), compiled on first use
    (None: when a C compiler is found, ``$SOFTPROMPT_CPU_KERNELS`` is not 0 and they are
    measured faster)."""
    panel_linear: bool | None = None
    """With the fused CPU kernels, linear layers on the C kernel's panel layout instead of
    oneDNN/MKL (written for AVX2; None: if measured faster at start-up,
    ``$SOFTPROMPT_PANEL_LINEAR`` 0 or 1 forces it; figures in docs/benchmarks/engine.md).
    Only the chosen layout's copy of the weights is kept."""
    tune: bool = True
    """Measure the undecided CPU decode switches above at start-up (a few decode steps per
    combination, once per machine, torch version and model shape; ``autotune.py``). False:
    MKL off, the kernels on where they build."""
    retune: bool = False
    """Measure those switches again even when this machine has a decision cached, and cache the
    new one (``$SOFTPROMPT_RETUNE=1`` does the same): for a decision measured on a busy machine."""

    def __post_init__(self) -> None:
        for name in (
            "max_batch_size",
            "max_prefill_tokens",
            "max_new_tokens_cap",
            "max_resident_adapters",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_queue is not None and self.max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        if not 0 <= self.prefill_padding <= 1:
            raise ValueError("prefill_padding must be between 0 and 1")


@dataclass
class EngineStats:
    """Counters since the engine started (read by benchmarks and the server's metrics)."""

    requests: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decoded_rows: int = 0
    """Rows over all decode steps (their mean batch is decoded_rows / steps)."""
    largest_batch: int = 0


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
        full_batch = None if self.config.full_batch_pack is False else self.config.max_batch_size
        self.runner = ModelRunner(
            model,
            self.config.packed_weights,
            full_batch,
            graphs=self.config.graphs,
            max_batch=self.config.max_batch_size,
            cpu_kernels=self.config.cpu_kernels,
            full_batch_pack=self.config.full_batch_pack,
            tune=self.config.tune,
            panel_linear=self.config.panel_linear,
            retune=self.config.retune,
        )
        self.registry = AdapterRegistry(
            self.runner.prefixes, self._check_adapter, self.config.max_resident_adapters
        )
        self.scheduler = Scheduler(
            self.config.max_batch_size, self.config.max_prefill_tokens, self.config.policy
        )
        self.cache = self.runner.new_cache(self.config.max_batch_size, 64)
        self.seen = torch.zeros(
            self.config.max_batch_size,
            self.runner.vocab_size,
            dtype=torch.bool,
            device=self.runner.device,
        )
        self.eos = eos_ids(model, tokenizer)
        self.detokenizer = Detokenizer(tokenizer)
        self.stats = EngineStats()
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
                    self._check_context(len(seq.prompt_ids), virtual)
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
        self._check_context(len(ids), virtual)
        seq = Sequence(ids, adapter, params)
        if params.stop:
            seq.stops = StopMatcher(params.stop)
        return seq

    def _check_context(self, tokens: int, virtual: int) -> None:
        if virtual + tokens >= self.runner.max_length:
            raise RequestError(
                f"the prompt has {tokens} tokens (plus {virtual} virtual); the model's context "
                f"is {self.runner.max_length} tokens",
                field="prompt",
            )

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
            "running": len(self.scheduler.running),
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
            scheduler = self.scheduler
            joined = scheduler.admit()
            if joined:
                self._prefill(joined)
            if any(s.finished for s in scheduler.running):
                self._leave()  # rows that failed or finished at prefill (or were cancelled)
            if scheduler.running:
                self._decode()
            self._leave()

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
            self._finish(seq, "cancelled")

    def _prefill(self, joined: list[Sequence]) -> None:
        started = time.perf_counter()
        ready: list[tuple[Sequence, Any]] = []
        held = [self._leases.get(seq.request_id, (seq, None))[1] for seq in joined]
        self.registry.warm(lease for lease in held if lease is not None)
        for seq, lease in zip(joined, held, strict=True):
            try:
                if lease is not None:
                    self.registry.prepare(lease)
                    seq.prefix_length = lease.prefix.length if lease.prefix is not None else 0
                    self._check_context(len(seq.prompt_ids), seq.prefix_length)
                if seq.params.temperature > 0:
                    seq.generator = make_generator(seq.params.seed, self.runner.device)
            except Exception as exc:  # noqa: BLE001 - this request's alone
                message = str(exc) if isinstance(exc, RequestError) else self._failure(exc)
                self._finish(seq, "error", message)
                continue
            ready.append((seq, lease))
        # Rows that want their prompt's log-probabilities run apart, with the logits of every
        # position (the others keep the last position's only).
        echo = [item for item in ready if item[0].params.prompt_logprobs]
        plain = [item for item in ready if not item[0].params.prompt_logprobs]
        groups = length_groups(
            plain, lambda item: len(item[0].prompt_ids), self.config.prefill_padding
        )
        if echo:
            groups.append(echo)
        for group in groups:
            try:
                self._prefill_group(group)
            except Exception:  # noqa: BLE001 - find the request that fails and fail it alone
                one_by_one(group, lambda item: self._prefill_group([item]), self._failed_prefill)
        self.stats.prefill_seconds += time.perf_counter() - started

    def _failed_prefill(self, item: tuple[Sequence, Any], exc: Exception) -> None:
        log.warning("request %s failed in prefill: %s", item[0].request_id, exc)
        self._finish(item[0], "error", self._failure(exc))

    def _prefill_group(self, group: list[tuple[Sequence, Any]]) -> None:
        seqs = [seq for seq, _ in group]
        prefixes = [lease.prefix if lease is not None else None for _, lease in group]
        every = any(s.params.prompt_logprobs for s in seqs)
        staged, logits = self.runner.prefill([s.prompt_ids for s in seqs], prefixes, every)
        longest_text = max(len(s.prompt_ids) for s in seqs)
        if every:
            for j, seq in enumerate(seqs):
                seq.prompt_logprobs = prompt_logprobs(
                    logits[j, longest_text - len(seq.prompt_ids) :],
                    seq.prompt_ids,
                    seq.params.logprobs or 0,
                )
            logits = logits[:, -1]
        spans = [s.prefix_length + longest_text for s in seqs]
        running = self.scheduler.running
        slots = [running.index(s) for s in seqs]
        self.cache.make_room_before(max(spans), len(running))
        if slots == list(range(slots[0], slots[0] + len(slots))):
            self.cache.place_block(slots[0], staged, max(spans))
        else:
            for j, slot in enumerate(slots):
                self.cache.place(slot, staged, j, spans[j])
        # Only rows with a repetition penalty read their row of ``seen``; the others leave it
        # stale (a row taking the slot later writes all of its own).
        penalised = [j for j, s in enumerate(seqs) if s.params.repetition_penalty != 1]
        if penalised:
            seen = seen_mask(
                [seqs[j].prompt_ids for j in penalised], self.runner.vocab_size, self.runner.device
            )
            self.seen[[slots[j] for j in penalised]] = seen
        self.stats.prompt_tokens += sum(len(s.prompt_ids) for s in seqs)
        self._accept(seqs, slots, logits)

    def _decode(self) -> None:
        running = self.scheduler.running
        batch = len(running)
        started = time.perf_counter()
        self.cache.reserve(1, batch)
        inputs = [[s.output_ids[-1] for s in running], [s.length - 1 for s in running]]
        tokens, positions = torch.tensor(inputs).to(self.runner.device)  # one copy to the device
        try:
            logits = self.runner.decode(self.cache, slice(0, batch), tokens, positions)
            ok = list(range(batch))
        except Exception:  # noqa: BLE001 - run rows one by one to fail only the bad ones
            log.exception("a decode step of %d rows failed; running its rows one by one", batch)

            def alone(i: int) -> torch.Tensor | None:
                rows = slice(i, i + 1)
                return self.runner.decode(self.cache, rows, tokens[rows], positions[rows])

            def failed(i: int, exc: Exception) -> None:
                log.warning("request %s failed in decode: %s", running[i].request_id, exc)
                self._finish(running[i], "error", self._failure(exc))

            each = one_by_one(list(range(batch)), alone, failed)
            ok = [i for i, row in enumerate(each) if row is not None]
            rows = [row for row in each if row is not None]
            logits = torch.cat(rows) if rows else tokens.new_zeros(0)
        self.cache.advance(1)
        self.stats.steps += 1
        self.stats.decoded_rows += batch
        self.stats.largest_batch = max(self.stats.largest_batch, batch)
        if ok:
            self._accept([running[i] for i in ok], ok, logits)
        self.stats.decode_seconds += time.perf_counter() - started

    def _accept(self, seqs: list[Sequence], slots: list[int], logits: torch.Tensor) -> None:
        """Choose each row's next token and hand out what it adds."""
        index = torch.tensor(slots).to(logits.device)
        logprobs: dict[int, TokenLogprobs] = {}
        try:
            tokens = pick_tokens(
                logits,
                [s.params for s in seqs],
                lambda: self.seen[index],
                [len(s.output_ids) for s in seqs],
                self.eos,
                [s.generator for s in seqs],  # type: ignore[misc]
                logprobs,
            )
        except Exception:  # noqa: BLE001 - row by row, failing only the rows that fail
            log.exception("choosing the next tokens of %d rows failed; row by row", len(seqs))
            logprobs.clear()
            tokens = self._pick_one_by_one(seqs, index, logits, logprobs)
        penalised = [j for j, s in enumerate(seqs) if s.params.repetition_penalty != 1]
        if len(penalised) == len(seqs):
            self.seen[index, tokens] = True
        elif penalised:
            rows = torch.tensor(penalised).to(logits.device)
            self.seen[index[rows], tokens[rows]] = True
        now = time.perf_counter()
        going = []
        for j, (seq, token) in enumerate(zip(seqs, tokens.tolist(), strict=True)):
            if seq.first_token_at is None:
                seq.first_token_at = now
            if token == FAILED:
                self._finish(
                    seq,
                    "error",
                    "sampling failed: this request's next-token probabilities are not finite",
                )
            elif token in self.eos and not seq.params.ignore_eos:
                self._finish(seq, "stop")
            else:
                seq.output_ids.append(token)
                if j in logprobs:
                    seq.logprobs.append(logprobs[j])
                going.append(seq)
        self.stats.generated_tokens += len(going)
        try:
            texts = self.detokenizer.texts(going)
        except Exception:  # noqa: BLE001 - detokenize row by row to fail only the bad rows

            def undecodable(seq: Sequence, exc: Exception) -> str:
                self._finish(seq, "error", f"cannot decode the output: {exc}")
                return ""

            texts = one_by_one(going, lambda seq: self.detokenizer.texts([seq])[0], undecodable)
        for seq, text in zip(going, texts, strict=True):
            if seq.finished:
                continue
            try:
                self._advance(seq, text)
            except Exception as exc:  # noqa: BLE001 - this request's alone
                log.exception("request %s failed after sampling", seq.request_id)
                self._finish(seq, "error", f"internal error on this request: {exc}")

    def _pick_one_by_one(
        self,
        seqs: list[Sequence],
        index: torch.Tensor,
        logits: torch.Tensor,
        logprobs: dict[int, TokenLogprobs],
    ) -> torch.Tensor:
        """``pick_tokens`` row by row; a row that raises gets ``FAILED``."""

        def alone(j: int) -> int:
            own: dict[int, TokenLogprobs] = {}
            token = pick_tokens(
                logits[j : j + 1],
                [seqs[j].params],
                lambda: self.seen[index[j : j + 1]],
                [len(seqs[j].output_ids)],
                self.eos,
                [seqs[j].generator],  # type: ignore[list-item]
                own,
            )[0]
            if 0 in own:
                logprobs[j] = own[0]
            return int(token)

        def failed(j: int, exc: Exception) -> int:
            log.error("request %s failed choosing its next token: %s", seqs[j].request_id, exc)
            return FAILED

        return torch.tensor(one_by_one(list(range(len(seqs))), alone, failed))

    def _advance(self, seq: Sequence, text: str) -> None:
        """Hand out what the newest token of ``seq`` adds to its ``text``, or finish it."""
        params = seq.params
        token = seq.output_ids[-1]
        reason = None
        hold = 0
        if seq.stops is not None:
            # Only the text before a trailing incomplete character is final.
            cut, hold = seq.stops.feed(text, len(text.rstrip("\ufffd")))
            if cut is not None:
                text, reason = text[:cut], "stop"
        if reason is None and (
            len(seq.output_ids) >= params.max_new_tokens or seq.length >= self.runner.max_length
        ):
            reason = "length"
        seq.text = text
        if reason is not None:
            self._finish(seq, reason, new_ids=[token])
            return
        safe = len(text) - max(hold, len(text) - len(text.rstrip("\ufffd")))
        delta = text[seq.emitted : safe] if safe > seq.emitted else ""
        seq.emitted = max(seq.emitted, safe)
        self._emit(seq, Output(seq.request_id, [token], delta))

    def _finish(
        self, seq: Sequence, reason: str, error: str | None = None, new_ids: list[int] | None = None
    ) -> None:
        seq.finish(reason, error)
        delta = seq.text[seq.emitted :]
        seq.emitted = len(seq.text)
        self._emit(seq, Output(seq.request_id, new_ids or [], delta, True, reason, error))

    def _emit(self, seq: Sequence, out: Output) -> None:
        with self._lock:
            if out.finished:
                handle = self._handles.pop(seq.request_id, None)
            else:
                handle = self._handles.get(seq.request_id)
        if handle is not None:
            handle.deliver(out)

    def _leave(self) -> None:
        before = len(self.scheduler.running)
        for source, target in self.scheduler.remove_finished():
            self.cache.move(source, target)
            self.seen[target] = self.seen[source]
        # A captured decode step attends over the cache's whole capacity: what a long row grew
        # is given back when rows leave. Other paths attend up to ``end`` and keep the buffers
        # (growing them again for every burst would cost more than they save).
        give_back = self.runner.graphed is not None
        if give_back and 0 < len(self.scheduler.running) < before:
            self.cache.fit(len(self.scheduler.running))
        with self._lock:  # submissions add leases from other threads
            ended = [r for r, (seq, _) in self._leases.items() if seq.finished]
            done = [self._leases.pop(r) for r in ended]
        for _, lease in done:
            self.registry.release(lease)
        if not self.scheduler.running:
            self.cache.reset()
            if give_back:
                self.cache.fit(0)

    def _failure(self, exc: BaseException) -> str:
        """What to tell the one request the model failed on."""
        if out_of_memory(exc):
            if self.runner.device.type == "cuda":
                torch.cuda.empty_cache()
            return (
                f"out of memory on {self.runner.device} for this request beside the running "
                "batch; retry it later, or with a shorter prompt or fewer new tokens"
            )
        return f"the model failed on this request: {exc}"

    def _abort_all(self, reason: str, message: str) -> None:
        """End every request the engine holds (running, waiting, just submitted)."""
        with self._step_lock:
            self._take_incoming()
            for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
                if not seq.finished:
                    self._finish(seq, reason, message)
            self.scheduler.waiting.clear()
            self._leave()

    def memory(self) -> dict[str, int]:
        """Bytes held: the model's parameters (shared with the caller's model), the packed copy
        of its linear weights, the KV cache and the resident adapters."""
        params = self.runner.model.parameters()
        return {
            "model": sum(p.numel() * p.element_size() for p in params),
            "packed": self.runner.packed_nbytes(),
            "kv_cache": self.cache.nbytes(),
            "adapters": self.registry.nbytes(),
        }

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = list(self.tokenizer(prompt)["input_ids"])
        elif isinstance(prompt, list) and all(
            isinstance(i, int) and not isinstance(i, bool) for i in prompt
        ):
            ids = list(prompt)
            vocab = self.runner.vocab_size
            bad = [i for i in ids if not 0 <= i < vocab]
            if bad:
                raise RequestError(
                    f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", field="prompt"
                )
        else:
            raise RequestError("a prompt is text or a list of token ids", field="prompt")
        if not ids:
            raise RequestError(
                "a prompt with no tokens cannot be completed; give some text", field="prompt"
            )
        return ids


def _post(loop: asyncio.AbstractEventLoop, outputs: asyncio.Queue[Output], out: Output) -> None:
    """Hand ``out`` to an asyncio queue from the engine's thread."""
    loop.call_soon_threadsafe(outputs.put_nowait, out)
