"""The OpenAI-compatible server: a real uvicorn server on a loopback port, driven by the official
``openai`` client, raw HTTP, headless Chromium and schemathesis, on the tiny model."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from conftest import docs_screenshot
from softprompt.adapters import Adapter, adapter_config, write_adapter_files
from softprompt.engine import Engine, EngineConfig, SamplingParams
from softprompt.server.app import ServerConfig, create_app
from softprompt.server.run import ServerThread

KEY = "test-key"
ADAPTERS = [f"ad{i}" for i in range(8)]
PROMPTS = ["i want you to act as a poet", "be kind", "there are two nice things", "hope is"]
CAP = 64
# Applied to the tiny tokenizer, which has none: the chat endpoint needs a template.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


def _write_adapter(folder: Path, name: str, hidden: int, seed: int, rows: int = 4) -> None:
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(rows, hidden, generator=generator) * 4  # large: visibly changes output
    folder.mkdir(parents=True)
    write_adapter_files(folder, weights, adapter_config(Adapter(name, weights), "tiny"))


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """(url, app, adapters folder, engine): a server with 8 adapters and an API key."""
    from softprompt.models import load_base_model

    base = load_base_model(str(tiny_model_dir))
    base.tokenizer.chat_template = CHAT_TEMPLATE
    hidden = base.model.config.hidden_size
    folder = tmp_path_factory.mktemp("adapters")
    for i, name in enumerate(ADAPTERS):
        _write_adapter(folder / name, name, hidden, seed=i, rows=3 + i % 3)
    engine = Engine(
        base.model, base.tokenizer, EngineConfig(max_batch_size=16, max_new_tokens_cap=CAP)
    )
    app = create_app(
        engine,
        ServerConfig(model_name="tiny", adapters_dir=folder, api_key=KEY, poll_seconds=0.2),
    )
    with ServerThread(app) as url:
        yield url, app, folder, engine


@pytest.fixture()
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _solo(engine: Engine, prompt: str | list[int], model: str, **params) -> str:
    """The same greedy request, run alone through the engine."""
    adapter = None if model == "tiny" else model
    return engine.generate([prompt], [adapter], SamplingParams(**params))[0].text


def test_models_lists_the_base_model_and_every_adapter(client):
    listed = {m.id: m for m in client.models.list().data}
    assert set(listed) == {"tiny", *ADAPTERS}
    assert listed["ad1"].parent == "tiny" and listed["ad1"].virtual_tokens == 4


def test_completions_plain_and_streamed_equal_the_engine_alone(served, client):
    engine = served[3]
    for model in ("tiny", "ad3"):
        plain = client.completions.create(
            model=model, prompt=PROMPTS[0], max_tokens=10, temperature=0
        )
        expected = _solo(engine, PROMPTS[0], model, max_new_tokens=10)
        assert plain.choices[0].text == expected
        assert plain.object == "text_completion" and plain.model == model
        prompt_tokens = len(engine.tokenizer(PROMPTS[0])["input_ids"])
        assert plain.usage.prompt_tokens == prompt_tokens
        assert plain.usage.total_tokens == prompt_tokens + plain.usage.completion_tokens == 18
        chunks = list(
            client.completions.create(
                model=model,
                prompt=PROMPTS[0],
                max_tokens=10,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == expected
        assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
        assert chunks[-2].choices[0].finish_reason == plain.choices[0].finish_reason
    assert len({_solo(engine, PROMPTS[0], m, max_new_tokens=10) for m in ADAPTERS}) > 3


def test_a_list_of_prompts_with_n_choices_and_seeds(served, client):
    engine = served[3]
    out = client.completions.create(
        model="ad1", prompt=PROMPTS[:2], max_tokens=6, temperature=0, n=2
    )
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    texts = [c.text for c in out.choices]
    assert texts[0] == texts[1] == _solo(engine, PROMPTS[0], "ad1", max_new_tokens=6)
    assert texts[2] == texts[3] == _solo(engine, PROMPTS[1], "ad1", max_new_tokens=6)
    sampled = [
        client.completions.create(
            model="ad1", prompt=PROMPTS[0], max_tokens=8, temperature=1.5, seed=7, n=2
        )
        for _ in range(2)
    ]
    assert [c.text for c in sampled[0].choices] == [c.text for c in sampled[1].choices]
    one = [
        _solo(engine, PROMPTS[0], "ad1", max_new_tokens=8, temperature=1.5, seed=s) for s in (7, 8)
    ]
    assert [c.text for c in sampled[0].choices] == one  # choice i samples from seed + i


def test_chat_completions_plain_and_streamed(served, client):
    engine = served[3]
    messages = [{"role": "user", "content": "be kind"}]
    ids = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    plain = client.chat.completions.create(
        model="ad2", messages=messages, max_tokens=8, temperature=0
    )
    assert plain.choices[0].message.role == "assistant"
    assert plain.choices[0].message.content == _solo(engine, list(ids), "ad2", max_new_tokens=8)
    assert plain.usage.prompt_tokens == len(ids)
    chunks = list(
        client.chat.completions.create(
            model="ad2", messages=messages, max_tokens=8, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == (
        plain.choices[0].message.content
    )
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason


def test_adapters_added_and_removed_without_a_restart(served, client):
    url, _, folder, engine = served
    hidden = engine.runner.hidden_size
    _write_adapter(folder / "fresh", "fresh", hidden, seed=99)
    # Listed (and served) at the next scan: the watcher's, or a request's once a second at most.
    deadline = time.monotonic() + 10
    while "fresh" not in {m.id for m in client.models.list().data}:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    text = client.completions.create(model="fresh", prompt="be kind", max_tokens=4, temperature=0)
    assert text.choices[0].text == _solo(engine, "be kind", "fresh", max_new_tokens=4)
    # A request running on it when the folder goes finishes; new ones get 404.
    slow = _slow_decode(engine)
    try:
        stream = client.completions.create(
            model="fresh",
            prompt="be kind",
            max_tokens=40,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        first = next(iter(stream))
        shutil.rmtree(folder / "fresh")
        deadline = time.monotonic() + 10
        while "fresh" in {m.id for m in client.models.list().data}:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        rest = list(stream)
    finally:
        slow.undo()
    assert rest[-1].choices[0].finish_reason == "length"
    assert len((first.choices[0].text + "".join(c.choices[0].text for c in rest)).split()) >= 30
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="fresh", prompt="be kind", max_tokens=4)


class _slow_decode:
    """Make each decode step take at least 20 ms, so a request runs long enough to act on."""

    def __init__(self, engine: Engine) -> None:
        self.runner = engine.runner
        original = self.runner.decode

        def slow(*args, **kwargs):
            time.sleep(0.02)
            return original(*args, **kwargs)

        self.runner.decode = slow

    def undo(self) -> None:
        del self.runner.decode


def test_a_client_that_leaves_mid_stream_frees_its_slot(served):
    url, _, _, engine = served
    slow = _slow_decode(engine)
    before = engine.stats.generated_tokens
    try:
        body = {
            "model": "ad0",
            "prompt": "be kind",
            "max_tokens": CAP,
            "stream": True,
            "temperature": 0,
            "ignore_eos": True,
        }
        with (
            httpx.Client(timeout=30) as http,
            http.stream(
                "POST",
                url + "/v1/completions",
                json=body,
                headers={"Authorization": f"Bearer {KEY}"},
            ) as response,
        ):
            assert response.status_code == 200
            lines = response.iter_lines()
            while not next(lines).startswith("data: "):
                pass
            assert engine.load()["running"] == 1
        deadline = time.monotonic() + 5
        while engine.load()["running"]:
            assert time.monotonic() < deadline, "the slot was not freed"
            time.sleep(0.02)
    finally:
        slow.undo()
    assert engine.stats.generated_tokens - before < CAP // 2  # stopped, not run to the end


def _post(url: str, body: bytes | str | dict, key: str | None = KEY, path="/v1/completions"):
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    content = json.dumps(body) if isinstance(body, dict) else body
    return httpx.post(url + path, content=content, headers=headers, timeout=30)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "nope", "prompt": "hi"}, 404, "model"),
        ({"model": "../ad0", "prompt": "hi"}, 404, "model"),
        ({"model": "ad0/../../etc", "prompt": "hi"}, 404, "model"),
        ({"model": "ad0", "prompt": "hi", "temperature": 5}, 400, "temperature"),
        ({"model": "ad0", "prompt": "hi", "top_p": 0}, 400, "top_p"),
        ({"model": "ad0", "prompt": "hi", "max_tokens": CAP + 1}, 400, "max_tokens"),
        ({"model": "ad0", "prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
        ({"model": "ad0", "prompt": "hi", "stop": ""}, 400, "stop"),
        ({"model": "ad0", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"model": "ad0", "prompt": "hi", "n": 99}, 400, "n"),
        ({"model": "ad0", "prompt": "hi", "logprobs": 6}, 400, "logprobs"),
        ({"model": "ad0", "prompt": 12}, 400, "prompt"),
        ({"model": "ad0", "prompt": []}, 400, "prompt"),
        ({"model": "ad0", "prompt": [999999]}, 400, "prompt"),
        ({"model": "ad0", "prompt": "hope " * 300}, 400, "prompt"),
        ({"prompt": "hi"}, 400, "model"),
    ],
)
def test_bad_requests_get_openai_errors(served, body, status, param):
    response = _post(served[0], body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]
    if status == 404:
        assert error["code"] == "model_not_found"


def test_malformed_bodies_keys_and_huge_bodies_never_break_the_server(served, client):
    url = served[0]
    assert _post(url, "{not json").status_code == 400
    assert _post(url, "[1, 2]").status_code == 400
    assert _post(url, {"model": "ad0", "prompt": "hi"}, key=None).status_code == 401
    assert _post(url, {"model": "ad0", "prompt": "hi"}, key="wrong").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    huge = {"model": "ad0", "prompt": "x" * (2 << 20)}
    assert _post(url, huge).status_code == 413
    chat = {"model": "ad0", "messages": [{"role": "robot", "content": "hi"}]}
    assert _post(url, chat, path="/v1/chat/completions").json()["error"]["param"] == "messages"
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    assert client.completions.create(model="ad0", prompt="hi", max_tokens=2).choices


def test_metrics_count_requests_tokens_and_time_to_first_token(served, client):
    client.completions.create(model="ad4", prompt="be kind", max_tokens=3, temperature=0)
    auth = {"Authorization": f"Bearer {KEY}"}  # the server has a key: /metrics needs it too
    text = httpx.get(served[0] + "/metrics", headers=auth).text
    for name in (
        'softprompt_requests_total{endpoint="completions",status="200"}',
        "softprompt_prompt_tokens_total",
        "softprompt_generation_tokens_total",
        "softprompt_batch_size",
        "softprompt_queue_length",
        "softprompt_time_to_first_token_seconds_count",
        "softprompt_adapters_resident",
        "softprompt_adapters_served 8.0",
        "softprompt_engine_time_to_first_token_seconds_count",
        'softprompt_longest_token_gap_seconds_bucket{le="1"}',
        "softprompt_prefix_cache_hit_tokens_total",
        "softprompt_prefix_cache_hit_rate",
    ):
        assert name in text, name
    gap = "softprompt_longest_token_gap_seconds_count"
    gaps = [line for line in text.splitlines() if line.startswith(gap)]
    assert float(gaps[0].split()[-1]) >= 1  # three new tokens: two gaps, one request
    count = [
        line
        for line in text.splitlines()
        if line.startswith("softprompt_time_to_first_token_seconds_count")
    ]
    assert float(count[0].split()[-1]) >= 1


def test_32_concurrent_clients_get_their_own_answers(served):
    """A bounded load test: 96 requests from 32 clients over 8 adapters and the base model."""
    url, _, _, engine = served
    models = ["tiny", *ADAPTERS]
    jobs = [(PROMPTS[i % len(PROMPTS)], models[i % len(models)]) for i in range(96)]

    async def run() -> list[str]:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        gate = asyncio.Semaphore(32)

        async def one(prompt: str, model: str) -> str:
            async with gate:
                out = await client.completions.create(
                    model=model, prompt=prompt, max_tokens=12, temperature=0
                )
                return out.choices[0].text

        try:
            return await asyncio.wait_for(asyncio.gather(*(one(*j) for j in jobs)), 120)
        finally:
            await client.close()

    answers = asyncio.run(run())
    expected = {j: _solo(engine, j[0], j[1], max_new_tokens=12) for j in set(jobs)}
    assert answers == [expected[j] for j in jobs]
    assert engine.stats.largest_batch > 8  # they did share batches


def test_playground_streams_side_by_side_columns_in_chromium(served):
    from playwright.sync_api import sync_playwright

    url, _, _, engine = served
    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail("chromium is not installed: apt-get install chromium (.ci/run does)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(url + "/")
        page.fill("#api-key", KEY)
        page.dispatch_event("#api-key", "change")
        page.click("#refresh")
        page.wait_for_selector("#models input[value='ad5']")
        for box in page.query_selector_all("#models input"):
            box.set_checked(box.get_attribute("value") in ("tiny", "ad5"))
        page.fill("#prompt", "i want you to act as a poet")
        page.fill("#max-tokens", "12")
        page.fill("#penalty", "1")
        page.click("#run")
        page.wait_for_selector(".column[data-done='true'] >> nth=1", timeout=30000)
        columns = {
            c.get_attribute("data-model"): c.query_selector(".text").inner_text()
            for c in page.query_selector_all(".column")
        }
        meta = page.inner_text(".column[data-model='ad5'] .meta")
        if shot := docs_screenshot("playground.png"):
            page.screenshot(path=str(shot))
        browser.close()
    assert set(columns) == {"tiny", "ad5"}
    for model, text in columns.items():
        assert text.strip() and text == _solo(
            engine, "i want you to act as a poet", model, max_new_tokens=12
        )
    assert "tokens" in meta and "first token" in meta


def test_schemathesis_finds_no_server_errors_or_schema_violations(served, tmp_path):
    url = served[0]
    report = tmp_path / "junit.xml"
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("schemathesis")),
            "run",
            url + "/openapi.json",
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance",
            "--max-examples",
            "15",
            "--header",
            f"Authorization: Bearer {KEY}",
            "--seed",
            "1",
            "--report",
            "junit",
            "--report-junit-path",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,  # schemathesis keeps a cache folder where it runs
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "passed" in result.stdout
    print(result.stdout[-1500:])


def test_completions_logprobs_are_the_engines(served, client):
    engine = served[3]
    for model in ("tiny", "ad2"):
        out = client.completions.create(
            model=model, prompt=PROMPTS[2], max_tokens=5, temperature=0, logprobs=2
        )
        params = SamplingParams(max_new_tokens=5, logprobs=2)
        alone = engine.generate([PROMPTS[2]], [None if model == "tiny" else model], params)[0]
        lp = out.choices[0].logprobs
        assert lp.token_logprobs == pytest.approx([e.logprob for e in alone.logprobs], abs=1e-5)
        # each token's own text, with the spacing the text has: the pieces join into the text
        assert [t.strip() for t in lp.tokens] == [
            engine.tokenizer.decode([t]) for t in alone.token_ids
        ]
        assert "".join(lp.tokens) == out.choices[0].text
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
        for top, entry in zip(lp.top_logprobs, alone.logprobs, strict=True):
            assert len(top) <= 2 and max(top.values()) == pytest.approx(entry.top[0][1], abs=1e-5)


def test_echo_with_max_tokens_0_scores_the_prompt(served, client):
    """What lm-evaluation-harness's local-completions sends to score a continuation."""
    engine = served[3]
    ids = engine.tokenizer(PROMPTS[0])["input_ids"]
    out = client.completions.create(
        model="ad1", prompt=ids, max_tokens=0, temperature=0, logprobs=1, echo=True
    )
    choice = out.choices[0]
    assert choice.text == engine.tokenizer.decode(ids) and out.usage.completion_tokens == 0
    params = SamplingParams(max_new_tokens=1, prompt_logprobs=True, logprobs=1)
    alone = engine.generate([ids], ["ad1"], params)[0]
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    expected = [e.logprob for e in alone.prompt_logprobs[1:]]
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-5)
    assert len(choice.logprobs.tokens) == len(ids)
    # echo with generated tokens: the prompt's tokens, then the completion's
    both = client.completions.create(
        model="ad1", prompt=PROMPTS[0], max_tokens=3, temperature=0, logprobs=0, echo=True
    )
    assert both.choices[0].text.startswith(PROMPTS[0])
    assert len(both.choices[0].logprobs.tokens) == len(ids) + both.usage.completion_tokens


def test_chat_logprobs_in_the_chat_format(served, client):
    out = client.chat.completions.create(
        model="ad4",
        messages=[{"role": "user", "content": "be kind"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    assert "".join(c.token for c in content) == out.choices[0].message.content
    for c in content:
        assert len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob >= c.logprob - 1e-6
        assert bytes(c.bytes).decode() == c.token
    plain = client.chat.completions.create(
        model="ad4", messages=[{"role": "user", "content": "be kind"}], max_tokens=4
    )
    assert plain.choices[0].logprobs is None


def _joined_legacy(chunks) -> dict:
    """A streamed completion's choice 0: its text and its legacy logprobs, chunks joined."""
    out = {"text": "", "tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for chunk in chunks:
        for c in chunk.choices:
            out["text"] += c.text
            if c.logprobs is not None:
                for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                    out[key] += getattr(c.logprobs, key)
    return out


@pytest.mark.parametrize("echo", [False, True])
def test_streamed_logprobs_equal_the_whole_answers(client, echo):
    args = dict(model="ad3", prompt=PROMPTS[1], max_tokens=12, temperature=0, logprobs=2, echo=echo)
    whole = client.completions.create(**args).choices[0]
    joined = _joined_legacy(client.completions.create(**args, stream=True))
    assert joined["text"] == whole.text
    lp = whole.logprobs
    assert joined["tokens"] == lp.tokens and joined["text_offset"] == lp.text_offset
    assert joined["token_logprobs"] == pytest.approx(lp.token_logprobs, abs=1e-6)
    assert joined["top_logprobs"] == lp.top_logprobs
    if echo:
        assert joined["token_logprobs"][0] is None and whole.text.startswith(PROMPTS[1])


def test_streamed_echo_with_max_tokens_0_and_without_logprobs(served, client):
    engine = served[3]
    ids = engine.tokenizer(PROMPTS[0])["input_ids"]
    scored = client.completions.create(
        model="ad1", prompt=ids, max_tokens=0, logprobs=1, echo=True
    ).choices[0]
    chunks = list(
        client.completions.create(
            model="ad1", prompt=ids, max_tokens=0, logprobs=1, echo=True, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    joined = _joined_legacy(chunks)
    assert joined["text"] == scored.text == engine.tokenizer.decode(ids)
    assert joined["token_logprobs"] == pytest.approx(scored.logprobs.token_logprobs, abs=1e-6)
    assert chunks[-1].usage.completion_tokens == 0
    # echo alone: the prompt comes first, then the completion, no logprobs anywhere
    plain = list(
        client.completions.create(
            model="ad1", prompt=PROMPTS[0], max_tokens=4, temperature=0, echo=True, stream=True
        )
    )
    text = "".join(c.text for chunk in plain for c in chunk.choices)
    assert text == PROMPTS[0] + _solo(engine, PROMPTS[0], "ad1", max_new_tokens=4)
    assert all(c.logprobs is None for chunk in plain for c in chunk.choices)


def test_streamed_chat_logprobs_equal_the_whole_answer(client):
    args = dict(
        model="ad4", messages=[{"role": "user", "content": "be kind"}], max_tokens=6,
        temperature=0, logprobs=True, top_logprobs=2,
    )  # fmt: skip
    whole = client.chat.completions.create(**args).choices[0].logprobs.content
    streamed = [
        entry
        for chunk in client.chat.completions.create(**args, stream=True)
        for c in chunk.choices
        if c.logprobs is not None
        for entry in c.logprobs.content
    ]
    assert [e.token for e in streamed] == [e.token for e in whole]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in whole], abs=1e-6)
    assert [[t.token for t in e.top_logprobs] for e in streamed] == [
        [t.token for t in e.top_logprobs] for e in whole
    ]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("completions", {"prompt": "hope", "max_tokens": 0}, "max_tokens"),
        ("completions", {"prompt": "hope", "logprobs": 6}, "logprobs"),
        ("chat/completions", {"messages": [{"role": "user", "content": "hope"}],
                              "top_logprobs": 2}, "top_logprobs"),
        ("chat/completions", {"messages": [{"role": "user", "content": "hope"}],
                              "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ],
)  # fmt: skip
def test_logprobs_requests_it_cannot_serve_are_refused_by_name(served, path, body, param):
    url = served[0]
    reply = httpx.post(
        f"{url}/v1/{path}",
        json={"model": "tiny", **body},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param


def test_with_an_api_key_metrics_docs_and_the_schema_need_it_too(served, tiny_model_dir):
    url, _, _, engine = served
    auth = {"Authorization": f"Bearer {KEY}"}
    for path in ("/metrics", "/docs", "/redoc", "/openapi.json"):
        refused = httpx.get(url + path)
        assert refused.status_code == 401, (path, refused.status_code)
        assert refused.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url + path, headers=auth).status_code == 200, path
    assert httpx.get(url + "/health").status_code == 200  # for load balancers
    # A scraper that cannot send the key: --public-metrics opens /metrics alone.
    config = ServerConfig(model_name="tiny", api_key=KEY, public_metrics=True)
    other_app = create_app(engine, config, start_engine=False)
    other_app.state.close = lambda: None  # the engine is the module's server's
    with ServerThread(other_app) as other:
        assert httpx.get(other + "/metrics").status_code == 200
        assert httpx.get(other + "/openapi.json").status_code == 401
