"""``serve --upstream`` when requests are cancelled and upstreams fail, against an in-process
stand-in for vLLM (``fake_vllm``): cancels at any moment, retries, failover, drains, upstreams
that are down or answer what vLLM would not, and what the server says about them to whom.
``test_upstream.py`` runs the main paths against a real vLLM server."""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import start_serve
from fake_vllm import FakeVLLM
from softprompt.engine import EngineConfig, SamplingParams
from softprompt.errors import UserError
from softprompt.frontend import FrontEnd, load_front_end
from softprompt.server.app import ServerConfig, create_app
from softprompt.server.run import ServerThread
from softprompt.upstream.engine import UpstreamEngine, UpstreamSettings
from softprompt.upstream.pool import check_upstreams

PROMPT = "be kind every day"


@pytest.fixture(scope="module")
def front(tiny_model_dir: Path) -> FrontEnd:
    return load_front_end(str(tiny_model_dir))


def _engine(front: FrontEnd, urls: list[str], queue: int = 8, **settings) -> UpstreamEngine:
    found = check_upstreams(front, urls)
    return UpstreamEngine(front, found, EngineConfig(max_queue=queue), UpstreamSettings(**settings))


def _wait(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Cancels and drains ---------------------------------------------------------------------------


def test_a_request_cancelled_before_its_task_starts_gives_its_place_back_and_a_drain_ends(front):
    with FakeVLLM(front) as url:
        engine = _engine(front, [url], queue=4)
        outs: list = []
        params = SamplingParams(max_new_tokens=4)
        [handle] = engine.submit_many([(PROMPT, None, params, outs.append)])
        handle.cancel()  # queued on the loop behind the request's launch: the loop is not running
        assert engine.room() == 3
        engine.drain(1.0)
        loop = threading.Thread(target=engine.run, daemon=True)
        started = time.monotonic()
        loop.start()
        loop.join(15)
        assert not loop.is_alive(), "the drain never ended"
        assert time.monotonic() - started < 5
        assert engine.room() == 4
        assert [o.finished for o in outs] == [True]
        assert outs[0].finish_reason in ("cancelled", "abort")


def test_a_request_cancelled_mid_answer_stops_its_upstream_call(front):
    with FakeVLLM(front) as url:
        fake = FakeVLLM.at(url)
        fake.token_seconds = 0.05
        engine = _engine(front, [url], queue=4)
        engine.start()
        try:
            outs: list = []
            [handle] = engine.submit_many(
                [(PROMPT, None, SamplingParams(max_new_tokens=200), outs.append)]
            )
            assert _wait(lambda: any(o.token_ids for o in outs))
            handle.cancel()
            assert _wait(lambda: fake.left == 1 and fake.in_flight == 0)
            assert _wait(lambda: engine.room() == 4)
            assert outs[-1].finished and outs[-1].finish_reason == "cancelled"
        finally:
            engine.stop()


def test_a_drain_aborts_what_runs_past_it_and_the_loop_is_closed(front):
    with FakeVLLM(front) as url:
        FakeVLLM.at(url).token_seconds = 0.05
        engine = _engine(front, [url], queue=4)
        engine.start()
        outs: list = []
        engine.submit_many([(PROMPT, None, SamplingParams(max_new_tokens=500), outs.append)])
        assert _wait(lambda: any(o.token_ids for o in outs))
        engine.drain(0.3)
        assert _wait(lambda: bool(outs) and outs[-1].finished, 10)
        assert outs[-1].finish_reason == "abort"
        engine.stop()
        assert engine.room() == 4
        assert engine._loop.is_closed()
        engine.cancel("gone")  # a late cancel meets a closed loop quietly


# Retries and failover -------------------------------------------------------------------------


def test_a_5xx_before_any_token_is_retried_on_another_upstream(front):
    with FakeVLLM(front) as bad_url, FakeVLLM(front) as good_url:
        bad, good = FakeVLLM.at(bad_url), FakeVLLM.at(good_url)
        engine = _engine(front, [bad_url, good_url])
        bad.completion_status = 500  # after the start-up check, which it would fail
        bad.requests = good.requests = 0
        engine.start()
        try:
            for stream_held in (False, True):
                outs: list = []
                engine.submit_many(
                    [(PROMPT, None, SamplingParams(max_new_tokens=5), outs.append)],
                    held=stream_held,
                )
                assert _wait(lambda outs=outs: bool(outs) and outs[-1].finished)
                assert outs[-1].finish_reason == "length"
                assert sum(len(o.token_ids) for o in outs) == 5
            assert bad.requests >= 1 and good.requests == 2
        finally:
            engine.stop()


def test_a_whole_answer_cut_mid_way_starts_again_elsewhere_and_counts_its_tokens_once(front):
    with FakeVLLM(front) as cut_url, FakeVLLM(front) as good_url:
        cut = FakeVLLM.at(cut_url)
        cut.cut_after = 3
        engine = _engine(front, [cut_url, good_url])
        cut.requests = FakeVLLM.at(good_url).requests = 0  # the start-up check's
        # the cut upstream first: the pool picks the fewest in flight, the first of a tie
        engine.start()
        try:
            outs: list = []
            engine.submit_many(
                [(PROMPT, None, SamplingParams(max_new_tokens=8), outs.append)], held=True
            )
            assert _wait(lambda: bool(outs) and outs[-1].finished)
            assert cut.requests == 1 and FakeVLLM.at(good_url).requests == 1
            assert [len(o.token_ids) for o in outs] == [8]  # held: one output, the whole answer
            assert outs[0].finish_reason == "length"
            assert engine.stats.generated_tokens == 8  # the cut attempt's 3 are not counted
        finally:
            engine.stop()


def test_a_stream_cut_mid_way_ends_with_an_error_that_names_no_credentials(front):
    with FakeVLLM(front) as url:
        fake = FakeVLLM.at(url)
        fake.cut_after = 2
        secret = url.replace("http://", "http://someone:hunter2@")
        engine = _engine(front, [secret])
        engine.start()
        try:
            outs: list = []
            engine.submit_many([(PROMPT, None, SamplingParams(max_new_tokens=8), outs.append)])
            assert _wait(lambda: bool(outs) and outs[-1].finished)
            assert outs[-1].finish_reason == "error"
            assert "mid-answer" in outs[-1].error and "hunter2" not in outs[-1].error
            assert "hunter2" not in str(engine.health())
        finally:
            engine.stop()


# What the server says, and to whom -------------------------------------------------------------


def _app(engine: UpstreamEngine, **config):
    return create_app(engine, ServerConfig(model_name="tiny", poll_seconds=0, **config))


def test_health_gives_the_upstreams_only_with_the_key_and_never_a_password(front, caplog):
    with FakeVLLM(front) as url:
        secret = url.replace("http://", "http://someone:hunter2@")
        engine = _engine(front, [secret], health_seconds=0.1)
        with ServerThread(_app(engine, api_key="k")) as served:
            anyone = httpx.get(f"{served}/health")
            assert anyone.status_code == 200 and anyone.json() == {"status": "ok"}
            keyed = httpx.get(f"{served}/health", headers={"Authorization": "Bearer k"})
            [report] = keyed.json()["upstreams"]
            assert report["healthy"] is True and "hunter2" not in keyed.text
            assert report["url"] == url.replace("http://", "http://***@")
            FakeVLLM.at(url).health_status = 500
            assert _wait(lambda: httpx.get(f"{served}/health").status_code == 503)
            down = httpx.get(f"{served}/health")
            assert down.json()["error"]["message"] == "no upstream answers"
            assert "127.0.0.1" not in down.text and "/health answered" not in down.text
            keyed = httpx.get(f"{served}/health", headers={"Authorization": "Bearer k"})
            assert keyed.status_code == 503 and "/health answered 500" in keyed.text
            metrics = httpx.get(f"{served}/metrics", headers={"Authorization": "Bearer k"})
            assert "softprompt_upstream_healthy" in metrics.text and "hunter2" not in metrics.text
    assert "hunter2" not in caplog.text


def test_no_upstream_left_answers_503_with_retry_after(front):
    with FakeVLLM(front) as url:
        fake = FakeVLLM.at(url)
        # The health poll is slow: the first request finds the upstream gone by itself.
        engine = _engine(front, [url], health_seconds=60)
        with ServerThread(_app(engine)) as served:
            body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 4}
            assert httpx.post(f"{served}/v1/completions", json=body).status_code == 200
            fake.stop()
            for _ in range(2):  # found down by trying it, then known down at submission
                late = httpx.post(f"{served}/v1/completions", json=body, timeout=30)
                assert late.status_code == 503, late.text
                assert late.headers["Retry-After"] == "1"
                assert late.json()["error"]["code"] == "upstreams_down"
            chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
            late = httpx.post(f"{served}/v1/chat/completions", json=chat, timeout=30)
            assert late.status_code in (400, 503)  # the tiny model has no chat template
            streamed = httpx.post(f"{served}/v1/completions", json={**body, "stream": True})
            assert streamed.status_code == 503 and "Retry-After" in streamed.headers
            assert httpx.get(f"{served}/v1/models").status_code == 200  # still serving


# The start-up check ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "status", "content", "said"),
    [
        ("/v1/models", 200, b"<html>a web UI</html>", "/v1/models answered something other"),
        ("/tokenize", 200, b"not json", "/tokenize answered something other"),
        ("/v1/completions", 200, b'{"id": "x"}', "/v1/completions answered without"),
        ("/v1/models", 200, b'{"data": "many"}', "/v1/models answered without"),
    ],
)
def test_an_upstream_answering_what_vllm_would_not_is_refused_in_one_line(
    front, path, status, content, said
):
    with FakeVLLM(front) as url:
        FakeVLLM.at(url).raw[path] = (status, content)
        with pytest.raises(UserError, match=said) as caught:
            check_upstreams(front, [url])
        assert "\n" not in str(caught.value)


def test_the_same_upstream_twice_and_credentials_in_errors_are_refused(front):
    with FakeVLLM(front) as url, pytest.raises(UserError, match="given twice"):
        check_upstreams(front, [url, url + "/v1/"])
    dead = f"http://someone:hunter2@127.0.0.1:{_free_port()}"
    with pytest.raises(UserError, match="does not answer") as caught:
        check_upstreams(front, [dead])
    assert "hunter2" not in str(caught.value) and "http://***@127.0.0.1" in str(caught.value)


def test_serve_never_prints_an_upstream_password(tiny_model_dir, tmp_path):
    import subprocess
    import sys

    dead = f"http://someone:hunter2@127.0.0.1:{_free_port()}"
    done = subprocess.run(
        [sys.executable, "-m", "softprompt.cli", "serve", "--model", str(tiny_model_dir),
         "--adapters", str(tmp_path), "--upstream", dead, "--port", "0"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "hunter2" not in done.stderr and "does not answer" in done.stderr


# The whole server, as a user runs it ----------------------------------------------------------


def _leave_before_the_first_byte(url: str, body: bytes) -> None:
    host, port = url.split("//")[1].split(":")
    with socket.create_connection((host, int(port))) as conn:
        conn.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        conn.shutdown(socket.SHUT_RDWR)


def test_sigterm_after_clients_that_leave_before_their_first_byte_exits_within_the_drain(
    front, tiny_model_dir, tmp_path
):
    import json

    with FakeVLLM(front) as upstream:
        fake = FakeVLLM.at(upstream)
        fake.token_seconds = 0.05
        secret = upstream.replace("http://", "http://someone:hunter2@")
        proc, url, lines = start_serve(
            ["--model", str(tiny_model_dir), "--adapters", str(tmp_path), "--upstream", secret,
             "--port", "0", "--poll-seconds", "0", "--max-queue", "16", "--drain-seconds", "2"]
        )  # fmt: skip
        try:
            body = json.dumps(
                {"model": "tiny-model", "prompt": PROMPT, "max_tokens": 100, "stream": True}
            ).encode()
            model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
            body = body.replace(b"tiny-model", model.encode())
            threads = [
                threading.Thread(target=_leave_before_the_first_byte, args=(url, body))
                for _ in range(40)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)

            def queue_empty() -> bool:
                text = httpx.get(f"{url}/metrics").text
                return "softprompt_batch_size 0.0" in text

            assert _wait(queue_empty, 20), httpx.get(f"{url}/metrics").text
            # every place is back: a full queue's worth of requests is taken
            results: list[int] = []

            def one() -> None:
                reply = httpx.post(
                    f"{url}/v1/completions",
                    json={"model": model, "prompt": PROMPT, "max_tokens": 2},
                    timeout=60,
                )
                results.append(reply.status_code)

            many = [threading.Thread(target=one) for _ in range(16)]
            for t in many:
                t.start()
            for t in many:
                t.join(60)
            assert results == [200] * 16
            # one stream still running when the signal comes
            streaming = threading.Thread(
                target=lambda: httpx.post(
                    f"{url}/v1/completions",
                    json={"model": model, "prompt": PROMPT, "max_tokens": 1000, "stream": True},
                    timeout=60,
                ),
                daemon=True,
            )
            streaming.start()
            assert _wait(lambda: fake.in_flight == 1)
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
            assert time.monotonic() - signalled < 2 + 8  # the drain, and the server's exit
            said = "".join(lines) + proc.stderr.read()
            assert "vLLM upstream" in said and "hunter2" not in said
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
