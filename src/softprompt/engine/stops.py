"""Stop strings found in a growing completion, in time linear in the text added.

Each stop string gets a Knuth-Morris-Pratt automaton whose state (how much of the stop the text
ends with) is carried from token to token, so a new token costs its own characters, not the
length of the completion or the square of a stop's length. Only text that can no longer change
is folded into the saved state; the last few characters (an incomplete UTF-8 sequence shown as
U+FFFD) are scanned again with the next token.
"""

from __future__ import annotations


def _failure(stop: str) -> list[int]:
    """``table[i]``: the longest proper prefix of ``stop[: i + 1]`` that is also its suffix."""
    table = [0] * len(stop)
    k = 0
    for i in range(1, len(stop)):
        while k and stop[i] != stop[k]:
            k = table[k - 1]
        if stop[i] == stop[k]:
            k += 1
        table[i] = k
    return table


class StopMatcher:
    """One request's stop strings and how far its completion has been read against them."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self._tables = [_failure(s) for s in stops]
        self._states = [0] * len(stops)
        """Characters of each stop that text[:scanned] ends with."""
        self._scanned = 0

    def _run(self, states: list[int], text: str, start: int, end: int) -> int | None:
        """Advance ``states`` over ``text[start:end]``; the earliest start of a stop found."""
        found: int | None = None
        for j, (stop, table) in enumerate(zip(self.stops, self._tables, strict=True)):
            k = states[j]
            for i in range(start, end):
                ch = text[i]
                while k and ch != stop[k]:
                    k = table[k - 1]
                if ch == stop[k]:
                    k += 1
                if k == len(stop):
                    begin = i + 1 - k
                    found = begin if found is None else min(found, begin)
                    k = table[k - 1]
                    break  # this stop's first match is its earliest start
            states[j] = k
        return found

    def feed(self, text: str, stable: int) -> tuple[int | None, int]:
        """Read the completion ``text`` so far, of which the first ``stable`` characters will
        not change any more.

        Returns ``(cut, hold)``: where the first stop string starts (None: no stop yet), and how
        many characters at the end of ``text`` could be the start of one (not to hand out yet).
        """
        stable = max(self._scanned, min(stable, len(text)))
        found = self._run(self._states, text, self._scanned, stable)
        self._scanned = stable
        if found is not None:
            return found, 0
        states = list(self._states)
        found = self._run(states, text, stable, len(text))
        if found is not None:
            return found, 0
        return None, max(states, default=0)
