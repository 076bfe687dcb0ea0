"""The server against clients that misbehave: out-of-range seeds, floods, clients that leave,
oversized chunked bodies, strange Host headers, unknown models asked for in a burst; and a
server that is shutting down or whose engine died."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from softprompt.engine import Engine, EngineConfig
from softprompt.server.app import ServerConfig, create_app
from softprompt.server.run import LOOPBACK_NAMES, ServerThread
from test_server import CHAT_TEMPLATE, _slow_decode, _write_adapter

CAP = 64  # below chat's default of 256
QUEUE = 4
BODY = 4096


@pytest.fixture(scope="module")
def small(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """(url, app, engine): batch of 2, a queue of 4, no API key, loopback hosts only."""
    from softprompt.models import load_base_model

    base = load_base_model(str(tiny_model_dir))
    base.tokenizer.chat_template = CHAT_TEMPLATE
    folder = tmp_path_factory.mktemp("adapters")
    _write_adapter(folder / "ad0", "ad0", base.model.config.hidden_size, seed=0)
    engine = Engine(
        base.model,
        base.tokenizer,
        EngineConfig(max_batch_size=2, max_new_tokens_cap=CAP, max_queue=QUEUE),
    )
    app = create_app(
        engine,
        ServerConfig(
            model_name="tiny",
            adapters_dir=folder,
            poll_seconds=0,
            max_body_bytes=BODY,
            allowed_hosts=LOOPBACK_NAMES,
        ),
    )
    with ServerThread(app) as url:
        yield url, app, engine


def _long(model: str = "tiny", **extra) -> dict:
    return {
        "model": model,
        "prompt": "be kind",
        "max_tokens": CAP,
        "temperature": 0,
        "ignore_eos": True,
        **extra,
    }


def _idle(engine: Engine, within: float = 10) -> None:
    deadline = time.monotonic() + within
    while engine.load() != {"running": 0, "waiting": 0}:
        assert time.monotonic() < deadline, engine.load()
        time.sleep(0.01)


def test_a_seed_beyond_64_bits_is_refused_and_nobody_else_fails(small):
    url, _, engine = small
    slow = _slow_decode(engine)
    try:
        with (
            httpx.Client(base_url=url, timeout=30) as http,
            http.stream("POST", "/v1/completions", json=_long(stream=True)) as running,
        ):
            lines = running.iter_lines()
            next(line for line in lines if line.startswith("data: {"))
            bad = http.post(
                "/v1/completions",
                json={"model": "tiny", "prompt": "hope", "temperature": 1, "seed": 2**64},
            )
            rest = [line for line in lines if line.startswith("data: ")]
    finally:
        slow.undo()
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "seed"
    assert rest[-1] == "data: [DONE]" and '"finish_reason":"length"' in rest[-2]


def test_a_flood_gets_429_with_retry_after_and_one_huge_request_400(small):
    url, _, engine = small
    with httpx.Client(base_url=url, timeout=30) as http:
        huge = http.post(
            "/v1/completions", json={"model": "tiny", "prompt": ["be kind"] * 200, "n": 8}
        )
        assert huge.status_code == 400 and huge.json()["error"]["param"] == "n"
        assert engine.load() == {"running": 0, "waiting": 0}  # nothing of it was queued
    slow = _slow_decode(engine)

    async def flood() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(
                *(client.post("/v1/completions", json=_long()) for _ in range(2 + QUEUE + 4))
            )

    try:
        answers = asyncio.run(flood())
    finally:
        slow.undo()
    codes = sorted(a.status_code for a in answers)
    # At least a queue's worth is served (more when the engine moved some to running slots
    # before the rest arrived); the others are told to come back.
    assert codes.count(200) >= QUEUE and 429 in codes, codes
    assert set(codes) == {200, 429}, codes
    for refused in (a for a in answers if a.status_code == 429):
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "queue_full"
    for served in (a for a in answers if a.status_code == 200):
        assert served.json()["usage"]["completion_tokens"] == CAP
    _idle(engine)


def test_a_non_streaming_client_that_leaves_is_cancelled_at_once(small):
    url, _, engine = small
    slow = _slow_decode(engine)  # 64 tokens take at least 1.3 s
    before = engine.stats.generated_tokens
    try:
        with httpx.Client(base_url=url, timeout=0.3) as http, pytest.raises(httpx.ReadTimeout):
            http.post("/v1/completions", json=_long())
        _idle(engine, within=2.0)  # a loaded machine; the token count below is the proof
    finally:
        slow.undo()
    assert engine.stats.generated_tokens - before < CAP // 2


def test_a_chunked_body_over_the_limit_gets_413(small):
    url, _, engine = small

    def chunks():
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(BODY // 512 + 2):
            yield b"x" * 512
        yield b'"}'

    with httpx.Client(base_url=url, timeout=30) as http:
        answer = http.post("/v1/completions", content=chunks())
        assert answer.status_code == 413
        assert answer.json()["error"]["code"] == "body_too_large"
        ok = http.post("/v1/completions", json={"model": "tiny", "prompt": "hope"})
        assert ok.status_code == 200


def test_chat_without_max_tokens_runs_under_a_lower_cap(small):
    url, _, _ = small
    with httpx.Client(base_url=url, timeout=30) as http:
        answer = http.post(
            "/v1/chat/completions",
            json={"model": "tiny", "messages": [{"role": "user", "content": "hope"}]},
        )
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] <= CAP


def test_only_loopback_host_names_are_answered_without_a_key(small):
    url, _, _ = small
    port = url.rsplit(":", 1)[1]
    with httpx.Client(base_url=url, timeout=30) as http:
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example"):
            refused = http.get("/v1/models", headers={"Host": host})
            assert refused.status_code == 400, host
            assert refused.json()["error"]["code"] == "host_not_allowed"
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "localhost"):
            assert http.get("/v1/models", headers={"Host": host}).status_code == 200, host


def test_unknown_models_in_a_burst_list_the_folder_at_most_once_a_second(small):
    url, app, _ = small
    folder = app.state.adapters
    listings = 0
    candidates = folder._candidates

    def counted():
        nonlocal listings
        listings += 1
        return candidates()

    folder._candidates = counted
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            started = time.monotonic()
            for i in range(40):
                answer = http.post("/v1/completions", json={"model": f"nope{i}", "prompt": "x"})
                assert answer.status_code == 404
            took = time.monotonic() - started
    finally:
        del folder._candidates
    assert listings <= 1 + int(took / ServerConfig.rescan_seconds), (listings, took)


@pytest.fixture()
def fresh(tiny_model_dir: Path):
    """(url, engine): a server of its own, to shut down or break."""
    from softprompt.models import load_base_model

    base = load_base_model(str(tiny_model_dir))
    engine = Engine(base.model, base.tokenizer, EngineConfig(max_batch_size=2))
    app = create_app(engine, ServerConfig(model_name="tiny"))
    with ServerThread(app) as url:
        yield url, engine


def test_while_draining_health_and_new_requests_get_503(fresh):
    url, engine = fresh
    with httpx.Client(base_url=url, timeout=30) as http:
        assert http.get("/health").status_code == 200
        engine.drain(0)
        assert http.get("/health").status_code == 503
        refused = http.post("/v1/completions", json={"model": "tiny", "prompt": "hope"})
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "shutting_down"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_engine_answers_503_on_health(fresh):
    url, engine = fresh

    def broken() -> bool:
        raise MemoryError("no memory left")

    engine.has_work = broken  # type: ignore[method-assign]
    engine._wake.set()
    deadline = time.monotonic() + 5
    while engine.failure is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with httpx.Client(base_url=url, timeout=30) as http:
        health = http.get("/health")
    assert health.status_code == 503 and "MemoryError" in health.json()["error"]["message"]
