"""Which requests run: a FIFO queue, admitted into free slots between decode steps, their
prompts computed within a token budget per step.

Plain Python, no tensors, so it is testable alone. ``continuous`` admits waiting requests at every
step while slots are free; ``static`` admits a new batch only when the running one has finished
(what a static-batch server does, kept to measure against). Either way a step computes at most
``max_prefill_tokens`` prompt tokens while rows are running (``idle_prefill_tokens`` when none
is), and a longer prompt is computed in chunks over several steps while the running rows keep
decoding.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TypeVar

from .sequence import Sequence, Status

T = TypeVar("T")

POLICIES = ("continuous", "static")


class Scheduler:
    def __init__(
        self,
        max_batch_size: int,
        max_prefill_tokens: int,
        policy: str = "continuous",
        idle_prefill_tokens: int | None = None,
    ):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if max_prefill_tokens < 1:
            raise ValueError("max_prefill_tokens must be at least 1")
        if idle_prefill_tokens is not None and idle_prefill_tokens < 1:
            raise ValueError("idle_prefill_tokens must be at least 1")
        self.idle_prefill_tokens = max(max_prefill_tokens, idle_prefill_tokens or 0)
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, not {policy!r}")
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.policy = policy
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []
        """Admitted sequences whose prompt is not all computed yet (no slot yet)."""
        self.running: list[Sequence] = []
        """Running sequences; ``running[i]`` owns slot i of the KV cache."""

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    def plan(self, remaining: Callable[[Sequence], int | None]) -> list[tuple[Sequence, int]]:
        """This step's prefill: ``(request, prompt tokens to compute now)``.

        Requests part-way through their prompt go first, in arrival order, then waiting requests
        join while slots are free and the budget lasts. The budget is ``max_prefill_tokens``
        while rows are running (a step never holds their next token back for longer than that
        much prompt), ``idle_prefill_tokens`` when none is (nobody waits: many short prompts
        then join in one forward). A prompt longer than ``max_prefill_tokens``, or than what is
        left of the budget, is computed in chunks of at most that over the next steps: chunks
        against what the row already holds cost attention in proportion to the chunk, where one
        forward over a long prompt costs it in proportion to the prompt. One prompt at a time
        is computed in chunks: the next long one starts when it is done, so it finds the first's
        blocks in the prefix cache (the same system prompt or document is not computed twice
        side by side); short prompts still join meanwhile. ``remaining(seq)`` says
        how many of a request's prompt tokens are still to compute (None: the request failed to
        start and is finished).
        """
        self.prefilling = [s for s in self.prefilling if not s.finished]  # cancelled meanwhile
        budget = self.max_prefill_tokens if self.running else self.idle_prefill_tokens
        chunk = self.max_prefill_tokens
        work: list[tuple[Sequence, int]] = []
        for seq in self.prefilling:
            if budget <= 0:
                break
            left = remaining(seq)
            if left is None:
                continue
            take = min(left, chunk, budget)
            work.append((seq, take))
            budget -= take
        if self.policy == "static" and (self.running or self.prefilling):
            return work
        chunking = bool(self.prefilling)  # a prompt is under way in chunks
        while (
            self.waiting
            and budget > 0
            and len(self.running) + len(self.prefilling) < self.max_batch_size
        ):
            seq = self.waiting[0]
            if chunking and len(seq.prompt_ids) > min(chunk, budget):
                # One prompt in chunks at a time: the next starts once this one's keys are in
                # the prefix cache (looked up when it starts), reusing what they share.
                break
            self.waiting.popleft()
            left = remaining(seq)
            if left is None:
                continue
            seq.status = Status.RUNNING
            self.prefilling.append(seq)
            take = min(left, budget) if left <= chunk else min(chunk, budget)
            chunking = chunking or take < left
            work.append((seq, take))
            budget -= take
        return work

    def start(self, seqs: list[Sequence]) -> None:
        """Requests whose prompt is all in the cache now: they join the running rows (and take
        the next slots)."""
        for seq in seqs:
            self.prefilling.remove(seq)
            self.running.append(seq)

    def remove_finished(self) -> list[tuple[int, int]]:
        """Drop finished sequences from ``running``; returns the (from, to) slot moves to apply.

        A leaving row's slot is filled by the last running row, so running slots stay 0..B-1.
        """
        moves: list[tuple[int, int]] = []
        running = self.running
        slot = 0
        while True:
            while running and running[-1].finished:
                running.pop()
            while slot < len(running) and not running[slot].finished:
                slot += 1
            if slot >= len(running):
                break
            moves.append((len(running) - 1, slot))
            running[slot] = running.pop()
        return moves

    def drop_waiting(self, seq: Sequence) -> bool:
        """Take a request out of the queue (cancelled before it ran); False if it is not waiting."""
        try:
            self.waiting.remove(seq)
        except ValueError:
            return False
        return True


def length_groups(items: list[T], length: Callable[[T], int], max_padding: float) -> list[list[T]]:
    """``items`` split into prefill groups of similar length: longest first, a group takes the
    next item while the padding it would hold (positions past each row's own length, out of the
    group's rows x its longest) stays at most ``max_padding``. One prefill forward per group:
    fewer wasted positions for a few more, smaller forwards."""
    order = sorted(items, key=length, reverse=True)
    groups: list[list[T]] = []
    for item in order:
        if groups:
            group = groups[-1]
            longest = length(group[0])
            total = sum(length(x) for x in group) + length(item)
            if 1 - total / (longest * (len(group) + 1)) <= max_padding:
                group.append(item)
                continue
        groups.append([item])
    return groups
