"""A bounded soak: well-behaved streaming clients beside clients that misbehave, on loopback.

For about 20 seconds, well-behaved clients stream greedy completions (retrying after a 429 as
its Retry-After says) while others leave mid-request, send oversized or invalid bodies, ask for
a huge ``n``, send over-long stop strings and name unknown models. Afterwards every
well-behaved request has its whole, correct answer, nothing is left queued, running or held,
and the process's memory grew by less than a stated bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import pinned, start_serve, with_chat_template
from softprompt.engine import Engine, EngineConfig, SamplingParams
from softprompt.server.app import ServerConfig, create_app
from softprompt.server.run import ServerThread
from test_server import _write_adapter

pytestmark = pytest.mark.slow

SECONDS = 20.0
"""How long the misbehaving load runs (the test ends within about a minute)."""
MEMORY_BOUND = 150 * 2**20
"""Resident memory the soak may add to the process (the engine's caches are warm before)."""
ADAPTERS = ["ad0", "ad1", "ad2", "ad3"]
MODELS = ["tiny", *ADAPTERS]
PROMPTS = ["be kind", "hope is", "i want you to act as a poet", "there are two nice things"]
LENGTHS = [6, 20]
QUEUE = 16


@pytest.fixture(scope="module")
def soak_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from softprompt.models import load_base_model

    base = load_base_model(str(tiny_model_dir))
    folder = tmp_path_factory.mktemp("soak-adapters")
    for i, name in enumerate(ADAPTERS):
        _write_adapter(folder / name, name, base.model.config.hidden_size, seed=10 + i)
    engine = Engine(
        base.model,
        base.tokenizer,
        EngineConfig(max_batch_size=8, max_new_tokens_cap=64, max_queue=QUEUE),
    )
    app = create_app(
        engine,
        ServerConfig(model_name="tiny", adapters_dir=folder, poll_seconds=0, max_body_bytes=8192),
    )
    with ServerThread(app) as url:
        yield url, engine


async def _good(client: httpx.AsyncClient, rng: random.Random, answers: list) -> None:
    """One well-behaved streamed request, retried after a 429 as the server asks."""
    model, prompt, length = rng.choice(MODELS), rng.choice(PROMPTS), rng.choice(LENGTHS)
    body = {"model": model, "prompt": prompt, "max_tokens": length, "temperature": 0}
    while True:
        async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            if r.status_code == 429:
                await asyncio.sleep(float(r.headers["retry-after"]) * rng.random())
                continue
            assert r.status_code == 200, await r.aread()
            text, reason = "", None
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    choice = json.loads(line[6:])["choices"][0]
                    text += choice["text"]
                    reason = choice["finish_reason"] or reason
            answers.append(((model, prompt, length), text, reason))
            return


async def _bad(client: httpx.AsyncClient, rng: random.Random, kinds: dict) -> None:
    """One misbehaving request, of a random kind; each gets its own refusal."""
    kind = rng.choice(["leave", "leave_plain", "huge_body", "not_json", "huge_n", "stop", "model"])
    kinds[kind] = kinds.get(kind, 0) + 1
    long_run = {"model": "ad1", "prompt": "hope", "max_tokens": 64, "ignore_eos": True}
    if kind == "leave":  # reads a chunk, then goes
        async with client.stream("POST", "/v1/completions", json={**long_run, "stream": True}) as r:
            async for _ in r.aiter_lines():
                break
        return
    if kind == "leave_plain":  # a non-streaming client that gives up
        with contextlib.suppress(httpx.TimeoutException):
            await client.post("/v1/completions", json=long_run, timeout=0.05)
        return
    expected = {"huge_body": 413, "not_json": 400, "huge_n": 400, "stop": 400, "model": 404}
    if kind == "huge_body":
        r = await client.post("/v1/completions", content=b'{"prompt": "' + b"x" * 20000 + b'"}')
    elif kind == "not_json":
        r = await client.post("/v1/completions", content=b'{"model": "tiny", "prompt": ')
    elif kind == "huge_n":
        body = {"model": "tiny", "prompt": ["be kind"] * 100, "n": 8}
        r = await client.post("/v1/completions", json=body)
    elif kind == "stop":
        r = await client.post(
            "/v1/completions", json={"model": "tiny", "prompt": "hope", "stop": ["y" * 300]}
        )
    else:
        r = await client.post(
            "/v1/completions", json={"model": f"nope{rng.random()}", "prompt": "x"}
        )
    assert r.status_code in (expected[kind], 429), (kind, r.status_code, r.text)


async def _soak(url: str) -> tuple[list, dict]:
    answers: list = []
    kinds: dict = {}
    deadline = time.monotonic() + SECONDS
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:

        async def well_behaved(seed: int) -> None:
            rng = random.Random(seed)
            while time.monotonic() < deadline:
                await _good(client, rng, answers)

        async def misbehaving(seed: int) -> None:
            rng = random.Random(seed)
            while time.monotonic() < deadline:
                await _bad(client, rng, kinds)

        await asyncio.gather(
            *(well_behaved(i) for i in range(6)), *(misbehaving(100 + i) for i in range(6))
        )
    return answers, kinds


def test_well_behaved_clients_get_their_answers_beside_misbehaving_ones(soak_server):
    url, engine = soak_server
    expected = {
        (model, prompt, length): engine.generate(
            [prompt], [None if model == "tiny" else model], SamplingParams(max_new_tokens=length)
        )[0]
        for model in MODELS
        for prompt in PROMPTS
        for length in LENGTHS
    }
    asyncio.run(_soak_briefly(url))  # warm every path before memory is measured
    process = psutil.Process()
    before = process.memory_info().rss
    answers, kinds = asyncio.run(_soak(url))
    deadline = time.monotonic() + 10  # nothing is left queued or running
    while "softprompt_batch_size 0.0" not in (text := httpx.get(url + "/metrics").text):
        assert time.monotonic() < deadline, text
        time.sleep(0.05)
    assert "softprompt_queue_length 0.0" in text
    grown = process.memory_info().rss - before

    assert len(answers) > 50 and len(kinds) == 7, (len(answers), kinds)
    for key, text, reason in answers:
        want = expected[key]
        assert (text, reason) == (want.text, "length" if want.finish_reason == "length" else "stop")
    # Nothing is left behind: no queued or running request, no output handle, no adapter hold.
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert not engine._handles and not engine._leases and not engine._incoming
    assert all(pinned(engine.registry, name) == 0 for name in ADAPTERS)
    assert grown < MEMORY_BOUND, f"resident memory grew by {grown / 2**20:.0f} MiB"


async def _soak_briefly(url: str) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        rng = random.Random(0)
        for _ in range(20):
            await _good(client, rng, [])
            await _bad(client, rng, {})


# The worst body each limit allows, sent over and over beside well-behaved streaming clients.
WORST_QUEUE = 16
WORST_MESSAGES = 128  # the server's default --max-messages
LAG_BOUND = 0.5
"""Seconds the event loop may lag at a reading while the worst bodies arrive (measured on a
2-core AMD EPYC alone: one reading of about 230 between 0.25 and 0.5 s, the rest under 0.25 s).
Under the full suite, with pytest-xdist's workers on the same two cores, the OS sometimes
holds the server back once past it (one reading of about 300, in one fresh-clone run of
several): LATE_SHARE readings may pass it, none STALL_BOUND."""
LATE_SHARE = 0.01
"""The share of lag readings that may pass LAG_BOUND (scheduling noise, not the server)."""
STALL_BOUND = 2.5
"""Seconds no lag reading may reach: the stall this test exists for (one body that held every
client for seconds to minutes) passes it at once."""
GAP_BOUND = 1.0
"""Seconds a well-behaved stream may wait between two of its events meanwhile (measured on
the same machine: at most 0.48 s; before this test existed, one such body stalled every
client for seconds to minutes). The engine shares its process's interpreter lock with the
threads that prepare requests, so their Python work slows its steps: docs/reliability.md.
As for the lag: LATE_SHARE of the gaps may pass it (the OS holding the server back under
the full suite), none STALL_BOUND."""


@pytest.fixture(scope="module")
def worst_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """``softprompt serve`` in its own process, as users run it (the engine in its main thread),
    at the default body and message limits, with a queue of 16: (url, process)."""
    import os
    import signal

    from test_server import CHAT_TEMPLATE

    assert ServerConfig(model_name="x").max_messages == WORST_MESSAGES  # the default
    model = with_chat_template(
        tiny_model_dir, tmp_path_factory.mktemp("worst-model") / "tiny", CHAT_TEMPLATE
    )
    folder = tmp_path_factory.mktemp("worst-adapters")
    _write_adapter(folder / "ad0", "ad0", 16, seed=3)
    env = {k: v for k, v in os.environ.items() if k != "SOFTPROMPT_API_KEY"}
    proc, url, _ = start_serve(
        ["--model", str(model), "--adapters", str(folder), "--port", "0", "--poll-seconds", "0"]
        + ["--max-batch-size", "8", "--max-tokens-cap", "64", "--max-queue", str(WORST_QUEUE)],
        env,
    )
    try:
        yield url, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def _worst_bodies() -> dict[str, tuple[str, dict, tuple[int, ...]]]:
    """Per limit, the largest request it admits (or the first it refuses): endpoint, body and
    the statuses it may get (429 whenever the queue is full)."""
    from softprompt.server.protocol import MAX_LOGPROBS_LEGACY, MAX_N, MAX_STOP

    def chat(count: int) -> list[dict]:
        return [
            {"role": ("user", "assistant")[i % 2], "content": "be kind"} for i in range(count - 1)
        ] + [{"role": "user", "content": "hope"}]

    body_room = (1 << 20) - 200
    per_message = len(json.dumps(chat(2)[0])) + 2
    return {
        # most messages the limit admits: laid out in full, then too long for the context
        "most_messages": (
            "/v1/chat/completions",
            {"messages": chat(WORST_MESSAGES)},
            (400, 429),
        ),
        # as many messages as the body limit allows: refused from the count alone
        "body_of_messages": (
            "/v1/chat/completions",
            {"messages": chat(body_room // per_message)},
            (400,),
        ),
        # prompts x n at the queue, n and logprobs at their caps, the prompt echoed and scored
        "most_choices": (
            "/v1/completions",
            {
                "prompt": ["be kind every day"] * (WORST_QUEUE // MAX_N),
                "n": MAX_N,
                "logprobs": MAX_LOGPROBS_LEGACY,
                "echo": True,
                "max_tokens": 64,
                "ignore_eos": True,
                "temperature": 1.0,
                "seed": 1,
            },
            (200, 429),
        ),
        # as many prompts as the body allows, times n: refused from the counts alone
        "most_prompts": (
            "/v1/completions",
            {"prompt": ["a"] * (body_room // 4), "n": MAX_N},
            (400,),
        ),
        "longest_stops": (
            "/v1/completions",
            {"prompt": "hope", "stop": ["y" * 256] * MAX_STOP, "max_tokens": 64},
            (200, 429),
        ),
        # the longest prompt the body allows: tokenized, then too long for the context
        "longest_prompt": (
            "/v1/completions",
            {"prompt": "be " * (body_room // 3)},
            (400, 429),
        ),
        "top_logprobs_chat": (
            "/v1/chat/completions",
            {
                "messages": chat(3),
                "logprobs": True,
                "top_logprobs": 20,
                "n": MAX_N,
                "max_tokens": 64,
                "stream": True,
            },
            (200, 429),
        ),
    }


async def _worst_soak(url: str) -> tuple[list[float], dict[str, list[int]], int]:
    """Well-behaved streams beside the worst bodies: every gap between a stream's events, the
    statuses each worst body got, and the well-behaved answers completed."""
    gaps: list[float] = []
    statuses: dict[str, list[int]] = {}
    answered = 0
    worst = _worst_bodies()
    deadline = time.monotonic() + 15
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def well_behaved(seed: int) -> None:
            nonlocal answered
            rng = random.Random(seed)
            while time.monotonic() < deadline:
                body = {"model": "tiny", "prompt": rng.choice(PROMPTS), "max_tokens": 20}
                body |= {"temperature": 0, "ignore_eos": True, "stream": True}
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    if r.status_code == 429:
                        await asyncio.sleep(0.2 * rng.random())
                        continue
                    assert r.status_code == 200, await r.aread()
                    last = None
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            now = time.monotonic()
                            if last is not None:
                                gaps.append(now - last)
                            last = now
                    answered += 1

        async def attacker(name: str) -> None:
            path, body, allowed = worst[name]
            # made once: the client's own JSON work would otherwise stall the streams it times
            content = json.dumps({"model": "tiny", **body}, separators=(",", ":")).encode()
            headers = {"Content-Type": "application/json"}
            while time.monotonic() < deadline:
                if body.get("stream"):
                    async with client.stream("POST", path, content=content, headers=headers) as r:
                        await r.aread()
                else:
                    r = await client.post(path, content=content, headers=headers)
                assert r.status_code in allowed, (name, r.status_code, r.text[:300])
                statuses.setdefault(name, []).append(r.status_code)

        await asyncio.gather(*(well_behaved(i) for i in range(4)), *(attacker(n) for n in worst))
    return gaps, statuses, answered


def _lag_histogram(url: str) -> tuple[float, float, float]:
    """The event loop's lag readings: (how many, how many at or under LAG_BOUND, how many at
    or under STALL_BOUND)."""
    text = httpx.get(url + "/metrics").text
    values = {}
    for line in text.splitlines():
        if line.startswith("softprompt_event_loop_lag_seconds_"):
            key, value = line.rsplit(" ", 1)
            values[key] = float(value)
    bucket = 'softprompt_event_loop_lag_seconds_bucket{{le="{}"}}'
    return (
        values["softprompt_event_loop_lag_seconds_count"],
        values[bucket.format(LAG_BOUND)],
        values[bucket.format(STALL_BOUND)],
    )


def _lag_problem(before: tuple[float, ...], after: tuple[float, ...]) -> str | None:
    """What is wrong with the loop's lag between two _lag_histogram readings, or None."""
    count, under, unstalled = (b - a for a, b in zip(before, after, strict=True))
    if count <= 100:
        return f"the loop was read {count:.0f} times, not throughout"
    if count - unstalled:
        return f"the event loop lagged over {STALL_BOUND} s {count - unstalled:.0f} times"
    if count - under > LATE_SHARE * count:
        return f"the event loop lagged over {LAG_BOUND} s {count - under:.0f} times in {count:.0f}"
    return None


def _gap_problem(gaps: list[float]) -> str | None:
    """What is wrong with the well-behaved streams' gaps between events, or None."""
    if len(gaps) <= 50:
        return f"only {len(gaps)} gaps between events: the streams did not run throughout"
    if max(gaps) >= STALL_BOUND:
        return f"a well-behaved stream waited {max(gaps):.3f} s"
    late = sum(g > GAP_BOUND for g in gaps)
    if late > LATE_SHARE * len(gaps):
        return f"well-behaved streams waited over {GAP_BOUND} s {late} times in {len(gaps)} gaps"
    return None


def test_the_gap_check_lets_one_late_gap_pass_and_no_stall():
    even = [0.05] * 300
    assert _gap_problem(even) is None
    assert _gap_problem([*even[:-1], 1.2]) is None  # once past 1 s: scheduling noise
    assert "4 times in 300" in str(_gap_problem([*even[:-4], 1.2, 1.2, 1.2, 1.2]))
    assert "waited 3.000 s" in str(_gap_problem([*even[:-1], 3.0]))  # one stall fails
    assert "only 40 gaps" in str(_gap_problem(even[:40]))


def test_the_lag_check_lets_one_late_reading_pass_and_no_stall():
    start = (10.0, 10.0, 10.0)  # readings, at or under LAG_BOUND, at or under STALL_BOUND
    assert _lag_problem(start, (310, 310, 310)) is None
    assert _lag_problem(start, (310, 309, 310)) is None  # once past 0.5 s: scheduling noise
    assert "over 0.5 s 4 times in 300" in str(_lag_problem(start, (310, 306, 310)))
    assert "over 2.5 s 1 times" in str(_lag_problem(start, (310, 309, 309)))  # one stall fails
    assert "read 50 times" in str(_lag_problem(start, (60, 60, 60)))


def test_the_worst_body_each_limit_allows_stalls_no_one(worst_server):
    url, _ = worst_server
    before = _lag_histogram(url)
    gaps, statuses, answered = asyncio.run(_worst_soak(url))
    lag_problem = _lag_problem(before, _lag_histogram(url))
    assert set(statuses) == set(_worst_bodies()), statuses  # every worst body was sent
    # The queue is first come, first served: the worst bodies take most of it; the
    # well-behaved clients still get through, and their streams never stall.
    assert answered >= 3, answered
    gap_problem = _gap_problem(gaps)
    assert gap_problem is None, gap_problem
    assert lag_problem is None, lag_problem
    deadline = time.monotonic() + 10  # nothing is left queued or running
    while "softprompt_batch_size 0.0" not in (text := httpx.get(url + "/metrics").text):
        assert time.monotonic() < deadline, text
        time.sleep(0.05)
    assert "softprompt_queue_length 0.0" in text
