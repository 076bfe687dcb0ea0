"""No request may stall the server: what a limit refuses is refused before any work, the work a
request does need (chat templates, tokenizing, detokenizing logprobs, reading adapter files) runs
off the event loop, the loop's lag is measured, and a stream whose client leaves before its first
byte is cancelled."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from softprompt.engine import Engine, EngineConfig
from softprompt.server import jobs as jobs_module
from softprompt.server.app import ServerConfig, create_app
from softprompt.server.run import ServerThread
from test_server import CHAT_TEMPLATE, _slow_decode, _write_adapter

QUEUE = 16
MESSAGES = 8


@pytest.fixture(scope="module")
def limited(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """(url, app, engine): a queue of 16, at most 8 messages a chat."""
    from softprompt.models import load_base_model

    base = load_base_model(str(tiny_model_dir))
    base.tokenizer.chat_template = CHAT_TEMPLATE
    folder = tmp_path_factory.mktemp("adapters")
    _write_adapter(folder / "ad0", "ad0", base.model.config.hidden_size, seed=0)
    engine = Engine(
        base.model,
        base.tokenizer,
        EngineConfig(max_batch_size=4, max_new_tokens_cap=64, max_queue=QUEUE),
    )
    config = ServerConfig(
        model_name="tiny", adapters_dir=folder, poll_seconds=0, max_messages=MESSAGES
    )
    app = create_app(engine, config)
    with ServerThread(app) as url:
        yield url, app, engine


class _Calls:
    """Wraps ``owner.name``: counts its calls and records those made on an event loop's thread."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> None:
        self.count, self.on_loop = 0, 0
        real = getattr(owner, name)

        def wrapped(*args, **kwargs):
            self.count += 1
            try:
                asyncio.get_running_loop()
                self.on_loop += 1
            except RuntimeError:
                pass
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapped)


def _chat(count: int, model: str = "tiny", **extra) -> dict:
    roles = ["user", "assistant"]
    messages = [{"role": roles[i % 2], "content": "be kind"} for i in range(count - 1)]
    messages.append({"role": "user", "content": "hope"})
    return {"model": model, "messages": messages, "max_tokens": 4, "temperature": 0, **extra}


def test_a_chat_over_the_message_limit_is_refused_before_the_template_runs(limited, monkeypatch):
    url, _, _ = limited
    layouts = _Calls(monkeypatch, jobs_module, "chat_layout")
    with httpx.Client(base_url=url, timeout=30) as http:
        refused = http.post("/v1/chat/completions", json=_chat(MESSAGES + 1))
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error["param"] == "messages" and "--max-messages" in error["message"]
        assert layouts.count == 0
        fine = http.post("/v1/chat/completions", json=_chat(MESSAGES))
        assert fine.status_code == 200, fine.text
    assert layouts.count == 1


def test_templates_tokenizing_and_logprobs_run_off_the_event_loop(limited, monkeypatch):
    url, _, engine = limited
    layouts = _Calls(monkeypatch, jobs_module, "chat_layout")
    pieces = _Calls(monkeypatch, jobs_module, "token_pieces")
    tokenized = _Calls(monkeypatch, engine, "_prompt_ids")
    with httpx.Client(base_url=url, timeout=30) as http:
        chat = http.post("/v1/chat/completions", json=_chat(3, logprobs=True, top_logprobs=2))
        assert chat.status_code == 200, chat.text
        body = {"model": "ad0", "prompt": ["be kind", "hope"], "max_tokens": 3, "logprobs": 2}
        plain = http.post("/v1/completions", json={**body, "echo": True})
        assert plain.status_code == 200, plain.text
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as streamed:
            assert streamed.status_code == 200
            events = [line for line in streamed.iter_lines() if line.startswith("data: {")]
        assert events
    assert layouts.count >= 1 and pieces.count >= 3 and tokenized.count >= 4
    assert (layouts.on_loop, pieces.on_loop, tokenized.on_loop) == (0, 0, 0)


def test_prompts_times_n_over_the_queue_are_refused_from_the_counts(limited, monkeypatch):
    url, _, engine = limited
    tokenized = _Calls(monkeypatch, engine, "_prompt_ids")
    with httpx.Client(base_url=url, timeout=30) as http:
        body = {"model": "tiny", "prompt": ["a"] * 20000, "n": 8, "max_tokens": 1}
        refused = http.post("/v1/completions", json=body)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["param"] == "n"
        many = http.post("/v1/completions", json={**body, "prompt": ["a"] * (QUEUE + 1), "n": 1})
        assert many.status_code == 400 and many.json()["error"]["param"] == "prompt"
    assert tokenized.count == 0


def test_a_full_queue_refuses_a_request_before_tokenizing_it(limited, monkeypatch):
    url, _, engine = limited
    # The engine's decode steps wait until the test lets them go, so the queue stays full.
    go = threading.Event()
    runner = engine.runner
    original = runner.decode

    def held(*args, **kwargs):
        go.wait(30)
        return original(*args, **kwargs)

    runner.decode = held
    long = {"model": "tiny", "prompt": "be kind", "max_tokens": 8, "ignore_eos": True}
    answered: list[int] = []

    def post() -> None:
        answered.append(httpx.post(f"{url}/v1/completions", json=long, timeout=60).status_code)

    threads = [threading.Thread(target=post) for _ in range(QUEUE + 4)]
    try:
        for t in threads:
            t.start()
        # Every request of these is settled (in the engine, or answered) before counting: one
        # still being tokenized when the queue filled would otherwise be counted.
        deadline = time.monotonic() + 10
        while True:
            load = engine.load()
            settled = load["running"] + load["waiting"] + len(answered) == len(threads)
            if load["waiting"] >= QUEUE and settled:
                break
            assert time.monotonic() < deadline, (load, answered)
            time.sleep(0.01)
        tokenized = _Calls(monkeypatch, engine, "_prompt_ids")
        with httpx.Client(base_url=url, timeout=30) as http:
            full = http.post("/v1/completions", json={**long, "prompt": "hope"})
        assert full.status_code == 429, full.text
        assert tokenized.count == 0
    finally:
        go.set()
        del runner.decode
        for t in threads:
            t.join()


def test_the_event_loop_lag_is_a_metric(limited):
    url, _, _ = limited
    with httpx.Client(base_url=url, timeout=30) as http:
        http.get("/health")
        time.sleep(0.3)
        text = http.get("/metrics").text
    count = next(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("softprompt_event_loop_lag_seconds_count")
    )
    assert count >= 3, text


def test_a_stream_whose_client_leaves_before_its_first_byte_is_cancelled(limited):
    _, app, engine = limited
    slow = _slow_decode(engine)
    body = json.dumps(
        {"model": "tiny", "prompt": "be kind", "max_tokens": 64, "ignore_eos": True, "stream": True}
    ).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"127.0.0.1"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    sent: list[dict] = []

    async def run() -> None:
        given = False

        async def receive() -> dict:
            nonlocal given
            if not given:
                given = True
                return {"type": "http.request", "body": body, "more_body": False}
            return {"type": "http.disconnect"}  # the client has gone at once

        async def send(message: dict) -> None:
            sent.append(message)
            await asyncio.sleep(0.2)  # a slow network: the disconnect is seen first

        await app(scope, receive, send)

    made = engine.stats.generated_tokens
    try:
        asyncio.run(run())
        deadline = time.monotonic() + 10
        while engine.load() != {"running": 0, "waiting": 0}:
            assert time.monotonic() < deadline, engine.load()
            time.sleep(0.01)
        assert not engine._handles
        assert sent and engine.stats.generated_tokens - made < 64  # cancelled, not run out
    finally:
        slow.undo()


def test_unsupported_parameters_are_refused_by_name(limited):
    url, _, _ = limited
    with httpx.Client(base_url=url, timeout=30) as http:
        bias = {"model": "tiny", "prompt": "hope", "logit_bias": {str(i): 1.0 for i in range(5000)}}
        refused = http.post("/v1/completions", json=bias)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["param"] == "logit_bias"
        tools = _chat(2, tools=[{"type": "function", "function": {"name": "f"}}])
        refused = http.post("/v1/chat/completions", json=tools)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "tools"
