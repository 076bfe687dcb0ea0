"""Per-request sampling parameters, and choosing every running row's next token at once.

Each row keeps its own parameters and its own ``torch.Generator``, so a sampled completion
depends only on its request and seed, never on what it runs beside. The repetition penalty looks
only at the row's real tokens (prompt text and output; never an adapter's virtual tokens, never
padding), which is what keeps a row's greedy output the same alone or in any batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import UserError

SEED_RANGE = (-(2**63), 2**63 - 1)
"""Seeds a request may give: a signed 64-bit integer, what ``torch.Generator`` takes."""
MAX_STOP_CHARS = 256
"""Characters in one stop string at most."""
FAILED = -1
"""``pick_tokens``' token for a row whose sampling failed (NaN probabilities, say)."""
MAX_LOGPROBS = 20
"""Alternatives per token at most (``SamplingParams.logprobs``), as OpenAI's chat API allows."""


class RequestError(UserError):
    """A request that cannot run as given (it fails alone; the engine serves everyone else).

    ``field`` names the sampling parameter at fault, when one is.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field

    def renamed(self, name: str) -> str:
        """The message with the parameter at fault called ``name`` (a flag, an API field)."""
        message = str(self)
        if self.field is None:
            return message
        for spelled in (self.field, self.field.replace("_", " ")):
            if spelled in message:
                return message.replace(spelled, name, 1)
        return message


@dataclass
class SamplingParams:
    """How one request is decoded."""

    max_new_tokens: int = 64
    min_new_tokens: int = 0
    """End-of-sequence is not allowed before this many new tokens."""
    temperature: float = 0.0
    """0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    repetition_penalty: float = 1.0
    """Above 1 discourages tokens already in the prompt or output (CTRL-style, as transformers);
    0.01 to 100."""
    stop: list[str] = field(default_factory=list)
    """Strings that end the completion; the completion stops before the first one."""
    ignore_eos: bool = False
    """Keep going past end-of-sequence until max_new_tokens (benchmarks use it)."""
    seed: int | None = None
    """Seed of this request's own generator; None draws a fresh one (sampling only)."""
    logprobs: int | None = None
    """Record each new token's log-probability and the ``logprobs`` most likely alternatives
    (0 to 20; None: nothing recorded, nothing computed). They are of the distribution the token
    was drawn from: after the repetition penalty, end-of-sequence blocking, temperature and
    top-p (a greedy row: temperature 1)."""
    prompt_logprobs: bool = False
    """Also record the log-probability of each prompt token after the ones before it (the
    model's own distribution, nothing applied), and ``logprobs`` alternatives; the first text
    token has none (OpenAI's ``echo``)."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        checks = [
            (
                "max_new_tokens",
                _is_int(self.max_new_tokens) and self.max_new_tokens >= 1,
                "must be at least 1",
            ),
            (
                "min_new_tokens",
                _is_int(self.min_new_tokens) and 0 <= self.min_new_tokens <= self.max_new_tokens,
                "must be between 0 and max_new_tokens",
            ),
            (
                "temperature",
                _is_real(self.temperature) and self.temperature >= 0,
                "must be 0 (greedy) or positive",
            ),
            ("top_p", _is_real(self.top_p) and 0 < self.top_p <= 1, "must be in (0, 1]"),
            (
                "repetition_penalty",
                _is_real(self.repetition_penalty) and 0.01 <= self.repetition_penalty <= 100,
                "must be between 0.01 and 100 (1 is none)",
            ),
            (
                "stop",
                all(isinstance(s, str) and s for s in self.stop),
                "strings must be non-empty text",
            ),
            (
                "stop",
                all(len(s) <= MAX_STOP_CHARS for s in self.stop),
                f"strings must be at most {MAX_STOP_CHARS} characters",
            ),
            (
                "logprobs",
                self.logprobs is None
                or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
                f"must be from 0 to {MAX_LOGPROBS}",
            ),
            (
                "seed",
                self.seed is None
                or (_is_int(self.seed) and SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]),
                f"must be an integer from {SEED_RANGE[0]} to {SEED_RANGE[1]}",
            ),
        ]
        for name, ok, problem in checks:
            if not ok:
                raise RequestError(f"{name} {problem}", field=name)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return _is_int(value) or (
        isinstance(value, float) and value == value and abs(value) != float("inf")
    )


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A request's own generator: seeded from its seed, or freshly from the OS when it has none."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def seen_mask(token_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """(B, V) bool: which real tokens each row holds (ids at or beyond ``vocab`` left out)."""
    seen = torch.zeros(len(token_lists), vocab + 1, dtype=torch.bool, device=device)
    rows = [i for i, ids in enumerate(token_lists) for _ in ids]
    columns = [min(max(t, 0), vocab) for ids in token_lists for t in ids]
    if rows:
        index = torch.tensor([rows, columns]).to(device)  # one copy to the device
        seen[index[0], index[1]] = True
    return seen[:, :vocab]


GREEDY_CHUNK = 256
"""Columns per chunk of ``greedy_tokens`` on the CPU."""


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(dim=-1)`` for (B, V), the same index in every case (the first of tied
    maxima, the first NaN).

    On the CPU ``argmax`` over vocabulary-wide rows is slow (docs/benchmarks/engine.md), so the
    maximum of each chunk of columns is taken first,
    then ``argmax`` runs over the chunk maxima and within the one chunk holding the first
    maximum. Elsewhere (a GPU) plain ``argmax``.
    """
    batch, vocab = logits.shape
    chunk = GREEDY_CHUNK
    whole = vocab // chunk * chunk
    if logits.device.type != "cpu" or whole < 2 * chunk:
        return logits.argmax(dim=-1)
    peaks = logits[:, :whole].reshape(batch, -1, chunk).amax(dim=-1)
    if whole < vocab:
        peaks = torch.cat((peaks, logits[:, whole:].amax(dim=-1, keepdim=True)), dim=1)
    # amax and argmax both put NaN above every number, so the first chunk holding the row's
    # first maximum (or first NaN) is the argmax of the chunk maxima.
    starts = peaks.argmax(dim=-1) * chunk  # (B,)
    columns = (starts[:, None] + torch.arange(chunk, device=logits.device)).clamp_max_(vocab - 1)
    # Past the last column the clamp repeats it, after its first place: argmax keeps the first.
    return starts + logits.gather(1, columns).argmax(dim=-1)


def pick_tokens(
    logits: torch.Tensor,
    params: list[SamplingParams],
    seen: Callable[[], torch.Tensor],
    produced: list[int],
    eos: list[int],
    generators: list[torch.Generator],
    logprobs: dict[int, TokenLogprobs] | None = None,
) -> torch.Tensor:
    """Next token per row from ``logits`` (B, V) float32, which it may write into (the caller's
    scratch); returns (B,) on the logits' device.

    Args:
        seen: gives (B, V) bool, the real tokens of each row so far (for the repetition
            penalty; called only when a row has one).
        produced: new tokens each row has made so far (for ``min_new_tokens``).
        eos: token ids that end a completion.
        generators: one per row; only sampled rows draw from theirs.
        logprobs: filled for each row whose ``params.logprobs`` is set: row -> its token's
            log-probability and the top alternatives, under the distribution drawn from.

    A sampled row whose probabilities cannot be sampled (NaN or infinite logits) gets
    ``FAILED`` instead of a token: it fails alone, the other rows go on.
    """
    device = logits.device
    if any(p.repetition_penalty != 1 for p in params):
        penalty = torch.tensor([p.repetition_penalty for p in params], device=device)[:, None]
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen() & (penalty != 1), penalised, logits)
    blocked = [i for i, p in enumerate(params) if produced[i] < p.min_new_tokens or p.ignore_eos]
    if blocked and eos:
        rows = torch.tensor(blocked, device=device)[:, None]
        logits[rows, torch.tensor(eos, device=device)[None, :]] = float("-inf")
    tokens = greedy_tokens(logits)
    sampled = [i for i, p in enumerate(params) if p.temperature > 0]
    wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
    if logprobs is not None and wanted:
        greedy = [i for i in wanted if params[i].temperature <= 0]
        if greedy:
            rows = torch.tensor(greedy, device=device)
            _record(logprobs, greedy, logits[rows].log_softmax(dim=-1), tokens[rows], params)
    if not sampled:
        return tokens
    index = torch.tensor(sampled, device=device)
    temperature = torch.tensor([params[i].temperature for i in sampled], device=device)[:, None]
    top_p = torch.tensor([params[i].top_p for i in sampled], device=device)[:, None]
    # Shifted so the best logit is 0 before dividing, and the temperature kept above float32's
    # smallest normal number: a tiny temperature then gives the others -inf, never NaN.
    chosen = logits[index]
    chosen = chosen - chosen.max(dim=-1, keepdim=True).values
    temperature = temperature.clamp_min(torch.finfo(chosen.dtype).tiny)
    probs = (chosen / temperature).softmax(dim=-1)  # (S, V)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # Drop a token when the tokens ranked above it already reach top_p; the first always stays.
    drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
    drop[:, 0] = False  # even when top_p is 0 in float32
    sorted_probs = sorted_probs.masked_fill(drop, 0)
    for j, i in enumerate(sampled):
        try:
            choice = torch.multinomial(sorted_probs[j], 1, generator=generators[i])
        except RuntimeError:  # "probability tensor contains either inf, nan or element < 0"
            tokens[i] = FAILED
            continue
        tokens[i] = order[j, choice[0]]
    if logprobs is not None and (keep := [j for j, i in enumerate(sampled) if i in wanted]):
        # The distribution drawn from: top-p's survivors, renormalised; the rest -inf.
        kept = sorted_probs[keep]
        kept = (kept / kept.sum(dim=-1, keepdim=True)).log()
        full = torch.full_like(kept, float("-inf")).scatter_(1, order[keep], kept)
        drawn = [sampled[j] for j in keep]
        _record(logprobs, drawn, full, tokens[torch.tensor(drawn, device=device)], params)
    return tokens


@dataclass
class TokenLogprobs:
    """One token's log-probability and the most likely alternatives at its place."""

    token: int
    logprob: float
    top: list[tuple[int, float]]
    """``(token id, log-probability)``, most likely first."""


def _record(
    out: dict[int, TokenLogprobs],
    rows: list[int],
    logp: torch.Tensor,
    tokens: torch.Tensor,
    params: list[SamplingParams],
) -> None:
    """``out[row]`` for each of ``rows`` from their log-distributions ``logp`` (R, V) and the
    tokens picked (a ``FAILED`` token records nothing)."""
    k = max(params[i].logprobs or 0 for i in rows)
    picked = tokens.clamp_min(0)
    own = logp.gather(1, picked[:, None])[:, 0].tolist()
    top_values, top_ids = logp.topk(k, dim=-1) if k else (logp[:, :0], picked[:, None][:, :0])
    for j, row in enumerate(rows):
        if int(tokens[j]) == FAILED:
            continue
        n = params[row].logprobs or 0
        out[row] = TokenLogprobs(
            token=int(tokens[j]),
            logprob=float(own[j]),
            top=list(zip(top_ids[j, :n].tolist(), top_values[j, :n].tolist(), strict=True)),
        )


def prompt_logprobs(logits: torch.Tensor, ids: list[int], k: int) -> list[TokenLogprobs | None]:
    """Each prompt token's log-probability after the tokens before it, and the ``k`` most
    likely alternatives there, from the logits (L, V) at the prompt's L positions (the model's
    own distribution: no penalty, no temperature). The first token has none."""
    if len(ids) < 2:
        return [None] * len(ids)
    logp = logits[:-1].float().log_softmax(dim=-1)  # position t predicts token t + 1
    following = torch.tensor(ids[1:], device=logits.device)
    own = logp.gather(1, following[:, None])[:, 0].tolist()
    values, top = logp.topk(k, dim=-1) if k else (logp[:, :0], following[:, None][:, :0])
    out: list[TokenLogprobs | None] = [None]
    for t, token in enumerate(ids[1:]):
        pairs = zip(top[t].tolist(), values[t].tolist(), strict=True)
        out.append(TokenLogprobs(token=token, logprob=float(own[t]), top=list(pairs)))
    return out


def prompt_ids(tokenizer: Any, prompt: str | list[int], vocab: int) -> list[int]:
    """A request's prompt as token ids: text tokenized, ids checked against the vocabulary.

    Raises:
        RequestError: neither text nor ids, an id outside ``0..vocab-1``, or no tokens.
    """
    if isinstance(prompt, str):
        ids = list(tokenizer(prompt)["input_ids"])
    elif isinstance(prompt, list) and all(
        isinstance(i, int) and not isinstance(i, bool) for i in prompt
    ):
        ids = list(prompt)
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
