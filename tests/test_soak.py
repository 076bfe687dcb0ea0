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

from conftest import pinned
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
    deadline = time.monotonic() + 10
    while engine.load() != {"running": 0, "waiting": 0}:
        assert time.monotonic() < deadline, engine.load()
        time.sleep(0.05)
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
