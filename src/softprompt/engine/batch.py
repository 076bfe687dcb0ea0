"""One engine step over the running batch: admit waiting requests, compute this step's share of
their prompts after their adapter's cached prefix and whatever text the prefix cache holds,
decode one token for every running row, choose each row's next token, hand out what it adds,
and let finished rows leave.

The ``Engine`` (``engine.py``) owns the requests' lifecycle (submit, cancel, run, drain, stop)
and calls ``Batch.step``; a batched call that fails is retried row by row (``one_by_one``), so
only the requests that fail alone fail.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from ..device import out_of_memory
from .detokenize import Detokenizer
from .kv_cache import SlotCache
from .prefix_cache import PrefixCache, joined
from .registry import AdapterRegistry, Prefix
from .runner import ModelRunner
from .sampling import (
    FAILED,
    RequestError,
    TokenLogprobs,
    make_generator,
    pick_tokens,
    prompt_logprobs,
    seen_mask,
)
from .scheduler import Scheduler, length_groups
from .sequence import Output, Sequence

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


LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class Histogram:
    """Counts of observations at or below each bucket's bound (Prometheus' layout), their sum."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.bounds)

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.count += 1


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
    time_to_first_token: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    """Seconds from a request's arrival to its first new token, per request."""
    longest_gap: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    """Per finished request with two new tokens or more: the longest wait between two of them
    (what a reader of its stream sees stall)."""


def check_context(max_length: int, tokens: int, virtual: int) -> None:
    """Refuse a prompt that, after its adapter's virtual tokens, leaves no room to generate in
    a context of ``max_length`` tokens."""
    if virtual + tokens >= max_length:
        raise RequestError(
            f"the prompt has {tokens} tokens (plus {virtual} virtual); the model's context "
            f"is {max_length} tokens",
            field="prompt",
        )


class Batch:
    """The running batch and its step: the scheduler's queue and rows, the KV cache's slots, the
    repetition-penalty masks, and the counters.

    Args:
        runner: the model runner (``runner.py``).
        registry: the adapters; a request's lease (from ``lease_of``) gives its prefix.
        scheduler: who waits and who runs.
        prefill_padding: see ``EngineConfig.prefill_padding``.
        eos: token ids that end a completion.
        detokenizer: turns each row's tokens into text.
        emit: hands a request's output to whoever waits on it.
        lease_of: the adapter lease a request holds (None for the base model).
    """

    def __init__(
        self,
        runner: ModelRunner,
        registry: AdapterRegistry,
        scheduler: Scheduler,
        prefill_padding: float,
        eos: list[int],
        detokenizer: Detokenizer,
        emit: Callable[[Sequence, Output], None],
        lease_of: Callable[[Sequence], Any],
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        self.runner = runner
        self.registry = registry
        self.scheduler = scheduler
        self.prefill_padding = prefill_padding
        self.eos = eos
        self.detokenizer = detokenizer
        self.emit = emit
        self.lease_of = lease_of
        self.prefix_cache = prefix_cache or PrefixCache(32, 0)
        self.cache = runner.new_cache(scheduler.max_batch_size, 64)
        self.seen = torch.zeros(
            scheduler.max_batch_size, runner.vocab_size, dtype=torch.bool, device=runner.device
        )
        """Per slot, the tokens its row has seen (read by rows with a repetition penalty)."""
        self.stats = EngineStats()

    def step(self) -> None:
        """Compute this step's share of joining prompts, decode one token for every running
        row, hand out outputs."""
        scheduler = self.scheduler
        free = scheduler.max_batch_size - len(scheduler.running) - len(scheduler.prefilling)
        if scheduler.waiting and free > 0:  # new adapters' prefixes in one forward
            leases = (self.lease_of(s) for s in list(scheduler.waiting)[:free])
            self.registry.warm(lease for lease in leases if lease is not None)
        work = scheduler.plan(self._remaining)
        if work:
            self.prefill(work)
        if any(s.finished for s in scheduler.running):
            self.leave()  # rows that failed or finished at prefill (or were cancelled)
        if scheduler.running:
            self.decode()
        self.leave()

    def _remaining(self, seq: Sequence) -> int | None:
        """Prompt tokens of ``seq`` still to compute; on its first call, the request's start:
        its adapter's prefix, the context check, and the prompt tokens the prefix cache holds.
        None when the request cannot start (it is finished with its error)."""
        if seq.context is not None or seq.prefilled:
            return len(seq.prompt_ids) - seq.prefilled
        lease = self.lease_of(seq)
        try:
            prefix = None
            if lease is not None:
                self.registry.prepare(lease)
                prefix = lease.prefix
                seq.prefix_length = prefix.length if prefix is not None else 0
                check_context(self.runner.max_length, len(seq.prompt_ids), seq.prefix_length)
            if seq.params.temperature > 0:
                seq.generator = make_generator(seq.params.seed, self.runner.device)
            seq.context = self._context(seq, prefix)
        except Exception as exc:  # noqa: BLE001 - this request's alone
            message = str(exc) if isinstance(exc, RequestError) else self.failure(exc)
            self.finish(seq, "error", message)
            return None
        return len(seq.prompt_ids) - seq.prefilled

    def _context(self, seq: Sequence, prefix: Prefix | None) -> Prefix:
        """What comes before the text ``seq`` computes: its adapter's prefix, then the blocks of
        its prompt the prefix cache holds (never the last token: its logits are needed; never
        for rows that want every prompt position's log-probabilities)."""
        owner = prefix.owner if prefix is not None else b""
        blocks = []
        if not seq.params.prompt_logprobs:
            blocks = self.prefix_cache.lookup(owner, seq.prompt_ids, len(seq.prompt_ids) - 1)
        if not blocks:
            return prefix if prefix is not None else Prefix([], [], owner)
        keys, values = joined(blocks)
        seq.reused = seq.prefilled = len(blocks) * self.prefix_cache.block
        if prefix is not None and prefix.length:
            keys = [torch.cat(pair, dim=1) for pair in zip(prefix.keys, keys, strict=True)]
            values = [torch.cat(pair, dim=1) for pair in zip(prefix.values, values, strict=True)]
        return Prefix(keys, values, owner)

    def prefill(self, work: list[tuple[Sequence, int]]) -> None:
        """Compute this step's prompt tokens: requests whose whole prompt fits run together
        (in groups of similar length), the others one chunk each into their own staging
        cache; every request whose prompt is done takes a slot and its first token."""
        started = time.perf_counter()
        whole = [
            seq
            for seq, take in work
            if seq.staging is None and take == len(seq.prompt_ids) - seq.prefilled
        ]
        chunks = [(seq, take) for seq, take in work if seq not in whole]
        # Rows that want their prompt's log-probabilities run apart, with the logits of every
        # position (the others keep the last position's only).
        echo = [seq for seq in whole if seq.params.prompt_logprobs]
        plain = [seq for seq in whole if not seq.params.prompt_logprobs]
        groups = length_groups(
            plain, lambda s: len(s.prompt_ids) - s.prefilled, self.prefill_padding
        )
        if echo:
            groups.append(echo)
        for group in groups:
            try:
                self._prefill_group(group)
            except Exception:  # noqa: BLE001 - find the request that fails and fail it alone
                one_by_one(group, lambda seq: self._prefill_group([seq]), self._failed_prefill)
        for seq, take in chunks:
            try:
                self._prefill_chunk(seq, take)
            except Exception as exc:  # noqa: BLE001 - this request's alone
                self._failed_prefill(seq, exc)
        self.stats.prefill_seconds += time.perf_counter() - started

    def _failed_prefill(self, seq: Sequence, exc: Exception) -> None:
        log.warning("request %s failed in prefill: %s", seq.request_id, exc)
        seq.staging = seq.context = None
        self.finish(seq, "error", self.failure(exc))

    def _prefill_group(self, seqs: list[Sequence]) -> None:
        every = any(s.params.prompt_logprobs for s in seqs)
        texts = [s.prompt_ids[s.prefilled :] for s in seqs]
        staged, logits = self.runner.prefill(texts, [s.context for s in seqs], every)
        longest_text = max(len(t) for t in texts)
        if every:
            for j, seq in enumerate(seqs):
                seq.prompt_logprobs = prompt_logprobs(
                    logits[j, longest_text - len(texts[j]) :],
                    seq.prompt_ids,
                    seq.params.logprobs or 0,
                )
            logits = logits[:, -1]
        for j, seq in enumerate(seqs):
            column = staged.end - len(seq.prompt_ids)  # where its prompt's first token would be
            self._keep(seq, staged, j, column)
        spans = [s.context.length + longest_text for s in seqs]
        running = self.scheduler.running
        self.cache.make_room_before(max(spans), len(running))
        self.scheduler.start(seqs)
        slots = [running.index(s) for s in seqs]
        if slots == list(range(slots[0], slots[0] + len(slots))):
            self.cache.place_block(slots[0], staged, max(spans))
        else:
            for j, slot in enumerate(slots):
                self.cache.place(slot, staged, j, spans[j])
        self._started(seqs, slots, logits)

    def _prefill_chunk(self, seq: Sequence, take: int) -> None:
        """The next ``take`` prompt tokens of ``seq`` into its staging cache; once its prompt
        is all there, it takes a slot and its first token."""
        every = bool(seq.params.prompt_logprobs)
        if seq.staging is None:
            seq.staging = self.runner.staging(seq.context, len(seq.prompt_ids) - seq.prefilled)
        ids = seq.prompt_ids[seq.prefilled : seq.prefilled + take]
        logits = self.runner.extend(seq.staging, ids, seq.prefix_length + seq.prefilled, every)
        seq.prefilled += take
        if every:
            seq.chunk_logits.append(logits[0])
            logits = logits[:, -1]
        if seq.prefilled < len(seq.prompt_ids):
            # The blocks done so far go to the prefix cache now: a prompt starting later
            # reuses them even while this one is still under way.
            self._keep(seq, seq.staging, 0, seq.prefix_length, seq.prefilled)
            return
        staged, seq.staging = seq.staging, None
        if every:
            seq.prompt_logprobs = prompt_logprobs(
                torch.cat(seq.chunk_logits), seq.prompt_ids, seq.params.logprobs or 0
            )
            seq.chunk_logits = []
        self._keep(seq, staged, 0, seq.prefix_length)
        running = self.scheduler.running
        self.cache.make_room_before(staged.end, len(running))
        self.scheduler.start([seq])
        slot = len(running) - 1
        self.cache.place(slot, staged, 0, staged.end)
        self._started([seq], [slot], logits)

    def _keep(
        self, seq: Sequence, staged: SlotCache, row: int, column: int, done: int | None = None
    ) -> None:
        """Offer the prefix cache the prompt blocks ``seq`` computed (row ``row`` of ``staged``,
        its prompt's token i at column ``column + i``; its first ``done`` tokens, or all)."""
        if seq.params.prompt_logprobs or not self.prefix_cache.enabled:
            return
        keys = [k[row] for k in staged.keys]
        values = [v[row] for v in staged.values]
        owner = seq.context.owner if seq.context is not None else b""
        ids = seq.prompt_ids if done is None else seq.prompt_ids[:done]
        self.prefix_cache.store(owner, ids, seq.reused, keys, values, column)

    def _started(self, seqs: list[Sequence], slots: list[int], logits: torch.Tensor) -> None:
        """Requests whose prompt is in their slots now: their first token."""
        for seq in seqs:
            seq.context = None  # the slot holds it now
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

    def decode(self) -> None:
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
                self.finish(running[i], "error", self.failure(exc))

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
                self.stats.time_to_first_token.observe(now - seq.arrival)
            else:
                assert seq.last_token_at is not None
                seq.longest_gap = max(seq.longest_gap, now - seq.last_token_at)
            seq.last_token_at = now
            if token == FAILED:
                self.finish(
                    seq,
                    "error",
                    "sampling failed: this request's next-token probabilities are not finite",
                )
            elif token in self.eos and not seq.params.ignore_eos:
                self.finish(seq, "stop")
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
                self.finish(seq, "error", f"cannot decode the output: {exc}")
                return ""

            texts = one_by_one(going, lambda seq: self.detokenizer.texts([seq])[0], undecodable)
        for seq, text in zip(going, texts, strict=True):
            if seq.finished:
                continue
            try:
                self._advance(seq, text)
            except Exception as exc:  # noqa: BLE001 - this request's alone
                log.exception("request %s failed after sampling", seq.request_id)
                self.finish(seq, "error", f"internal error on this request: {exc}")

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
            self.finish(seq, reason, new_ids=[token])
            return
        safe = len(text) - max(hold, len(text) - len(text.rstrip("\ufffd")))
        delta = text[seq.emitted : safe] if safe > seq.emitted else ""
        seq.emitted = max(seq.emitted, safe)
        self.emit(seq, Output(seq.request_id, [token], delta))

    def finish(
        self, seq: Sequence, reason: str, error: str | None = None, new_ids: list[int] | None = None
    ) -> None:
        seq.finish(reason, error)
        if seq.first_token_at is not None and seq.last_token_at != seq.first_token_at:
            self.stats.longest_gap.observe(seq.longest_gap)
        seq.staging = seq.context = None
        delta = seq.text[seq.emitted :]
        seq.emitted = len(seq.text)
        self.emit(seq, Output(seq.request_id, new_ids or [], delta, True, reason, error))

    def leave(self) -> None:
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
        if not self.scheduler.running:
            self.cache.reset()
            if give_back:
                self.cache.fit(0)

    def failure(self, exc: BaseException) -> str:
        """What to tell the one request the model failed on."""
        if out_of_memory(exc):
            if self.runner.device.type == "cuda":
                torch.cuda.empty_cache()
            return (
                f"out of memory on {self.runner.device} for this request beside the running "
                "batch; retry it later, or with a shorter prompt or fewer new tokens"
            )
        return f"the model failed on this request: {exc}"
