"""``softprompt serve`` and ``softprompt embeds`` as a user runs them."""

from __future__ import annotations

import base64
import dataclasses
import io
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import torch

from conftest import start_serve
from softprompt.adapters import Adapter, adapter_config, write_adapter_files


@pytest.fixture()
def adapter_dir(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A folder holding one adapter for the tiny model, ``kind``."""
    weights = torch.randn(4, 16, generator=torch.Generator().manual_seed(5)) * 4
    folder = tmp_path / "adapters" / "kind"
    folder.mkdir(parents=True)
    write_adapter_files(folder, weights, adapter_config(Adapter("kind", weights), "tiny"))
    return folder.parent


def test_serve_prints_where_it_serves_and_answers(tiny_model_dir, adapter_dir):
    env = {**os.environ, "SOFTPROMPT_API_KEY": "k"}
    proc, url, lines = start_serve(
        ["--model", str(tiny_model_dir), "--adapters", str(adapter_dir), "--port", "0"], env
    )
    try:
        text = "".join(lines)
        assert "serving 2 models at http://127.0.0.1:" in text and "kind" in text
        # start-up says which CPU decode path runs and what the choice rests on
        assert "decode path: " in text and "per full decode step" in text
        url = lines[-1].split("playground at ")[1].strip().rstrip("/")
        models = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k"}).json()
        # The base model is named after its folder, never by its path on the server.
        assert {m["id"] for m in models["data"]} == {tiny_model_dir.name, "kind"}
        assert str(tiny_model_dir) not in httpx.get(url + "/openapi.json").text
        assert httpx.get(url + "/v1/models").status_code == 401  # the key came from the env
        assert "softprompt playground" in httpx.get(url + "/").text
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    assert code == 0  # SIGTERM (like the first Ctrl-C) stops gracefully


def _start(args: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """``softprompt serve ARGS`` on a free port: the process and its base URL."""
    proc, url, _ = start_serve(["--port", "0", *args], env)
    return proc, url


def test_sigterm_drains_then_aborts_what_is_still_running_and_exits_0(
    tiny_model_dir, adapter_dir, tmp_path
):
    """A request in flight at SIGTERM: new requests get 503 at once, /health 503; after
    --drain-seconds the request ends with finish_reason "abort" and the process exits 0."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.max_position_embeddings = 20_000  # room for a request that outlives the drain
    long_context = tmp_path / "long-context"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(long_context)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(long_context)
    args = ["--model", str(long_context), "--adapters", str(adapter_dir)]
    proc, url = _start([*args, "--max-tokens-cap", "19000", "--drain-seconds", "1"])
    try:
        # No API key on loopback: a page on another site reaching it by DNS rebinding is refused.
        evil = httpx.get(url + "/v1/models", headers={"Host": "evil.example"})
        assert evil.status_code == 400
        body = {
            "model": "kind",
            "prompt": "be kind",
            "max_tokens": 19_000,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        with (
            httpx.Client(base_url=url, timeout=30) as http,
            http.stream("POST", "/v1/completions", json=body) as stream,
        ):
            lines = stream.iter_lines()
            next(line for line in lines if line.startswith("data: {"))
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            assert http.get("/health").status_code == 503
            refused = http.post("/v1/completions", json={"model": "kind", "prompt": "hope"})
            assert refused.status_code == 503
            rest = [line for line in lines if line.startswith("data: ")]
            ended = time.monotonic() - started
        assert rest[-1] == "data: [DONE]" and '"finish_reason":"abort"' in rest[-2]
        assert 0.9 < ended < 10
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0


def test_serve_bad_inputs(tiny_model_dir, adapter_dir, tmp_path, cli_main):
    missing = cli_main("serve", "--adapters", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    nothing = cli_main("serve", "--port", "0")
    assert nothing.returncode == 2 and "give --adapters DIR" in nothing.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = str(busy.getsockname()[1])
        taken = cli_main("serve", "--adapters", str(adapter_dir), "--port", port)
    assert taken.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in taken.stderr
    for args, needle in (
        (["--adapter", "no-equals-sign"], "give NAME=FOLDER"),
        (["--adapter", f"x={tmp_path}"], "is not an adapter folder"),
        (
            ["--adapter", f"k={adapter_dir / 'kind'}", "--adapter", f"k={adapter_dir / 'kind'}"],
            "given twice",
        ),
        (["--poll-seconds", "-1"], "--poll-seconds"),
        (["--max-body-bytes", "10"], "--max-body-bytes"),
        (["--max-batch-size", "0"], "--max-batch-size must be at least 1"),
        (["--max-messages", "0"], "--max-messages must be at least 1"),
        (["--max-prefill-tokens", "0"], "--max-prefill-tokens must be at least 1"),
        (["--prefix-cache-mb", "-1"], "--prefix-cache-mb cannot be negative"),
    ):
        proc = cli_main("serve", "--adapters", str(adapter_dir), "--port", "0", *args)
        assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_embeds_fed_to_the_base_model_give_softprompts_own_output(
    tiny_model_dir, adapter_dir, tmp_path, cli_main
):
    from softprompt.adapters import load_adapter
    from softprompt.engine import SamplingParams
    from softprompt.generation import engine_for
    from softprompt.models import load_base_model
    from softprompt.prompt import SoftPromptModel

    out = tmp_path / "embeds.pt"
    prompt = "i want you to act as a poet"
    proc = cli_main(
        "embeds",
        "--model",
        str(tiny_model_dir),
        "--adapter",
        str(adapter_dir / "kind"),
        "--prompt",
        prompt,
        "--output",
        str(out),
        "--base64",
    )
    assert proc.returncode == 0, proc.stderr
    tensor = torch.load(out)
    decoded = torch.load(io.BytesIO(base64.b64decode(proc.stdout.strip())))
    assert torch.equal(tensor, decoded)
    base = load_base_model(str(tiny_model_dir))
    ids = base.tokenizer(prompt)["input_ids"]
    assert tensor.shape == (4 + len(ids), 16)
    with torch.no_grad():
        reference = base.model.generate(
            inputs_embeds=tensor[None],
            attention_mask=torch.ones(1, tensor.shape[0], dtype=torch.long),
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=base.tokenizer.pad_token_id,
        )[0].tolist()
    spm = SoftPromptModel(base)
    spm.add_adapter(load_adapter(adapter_dir / "kind"))
    ours = engine_for(spm, 4).generate([prompt], ["kind"], SamplingParams(max_new_tokens=8))[0]
    eos = base.tokenizer.eos_token_id
    assert ours.token_ids == (reference[: reference.index(eos)] if eos in reference else reference)
    # Refusals: nothing to write to, an existing file, a folder that is not there.
    assert cli_main("embeds", "--prompt", "hi").returncode == 2
    again = cli_main(
        "embeds", "--model", str(tiny_model_dir), "--prompt", "hi", "--output", str(out)
    )
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert torch.equal(torch.load(out), tensor)  # untouched
    nowhere = cli_main("embeds", "--prompt", "hi", "--output", str(tmp_path / "no" / "x.pt"))
    assert nowhere.returncode == 2 and "does not exist" in nowhere.stderr


def test_serve_named_adapters_beside_or_without_a_folder(tiny_model_dir, adapter_dir):
    """``--adapter NAME=REF`` serves one adapter under a name of the user's choosing (a Hub
    repository too: ``load_adapter``'s Hub path, tested in test_card.py)."""
    proc, url = _start(
        ["--model", str(tiny_model_dir), "--adapter", f"coach={adapter_dir / 'kind'}"]
    )
    try:
        models = {m["id"] for m in httpx.get(url + "/v1/models").json()["data"]}
        assert models == {tiny_model_dir.name, "coach"}
        reply = httpx.post(
            url + "/v1/completions",
            json={"model": "coach", "prompt": "be kind", "max_tokens": 3, "temperature": 0},
        )
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] >= 1
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_serving_beyond_loopback_without_a_key_warns_in_one_line(tiny_model_dir, adapter_dir):
    env = {k: v for k, v in os.environ.items() if k != "SOFTPROMPT_API_KEY"}
    proc, _, lines = start_serve(
        ["--model", str(tiny_model_dir), "--adapters", str(adapter_dir)]
        + ["--port", "0", "--host", "0.0.0.0"],
        env,
    )
    try:
        warnings = [line for line in lines if "warning" in line]
        assert len(warnings) == 1 and "no API key" in warnings[0], "".join(lines)
        assert "0.0.0.0" in warnings[0] and "SOFTPROMPT_API_KEY" in warnings[0]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_serve_flag_defaults_are_the_engines():
    from softprompt.cli.parser import build_parser
    from softprompt.engine import EngineConfig

    args = build_parser().parse_args(["serve", "--adapters", "x"])
    assert args.max_prefill_tokens == EngineConfig.max_prefill_tokens
    assert args.prefix_cache_mb == EngineConfig.prefix_cache_mb


@pytest.mark.parametrize(("dtype", "wanted"), [("auto", "auto"), ("float32", None)])
def test_serve_auto_dtype_on_a_cpu_measures_bfloat16_linears_too(
    tiny_model_dir, monkeypatch, dtype, wanted
):
    """``--dtype auto`` on the CPU lets the engine measure bfloat16 linear layers beside
    float32's; an explicit ``--dtype float32`` keeps float32 (exact) throughout."""
    from softprompt.engine import Engine, EngineConfig
    from softprompt.server import run

    made: list[EngineConfig] = []

    class Recorded(Engine):
        def __init__(self, model, tokenizer, config):
            made.append(config)
            super().__init__(model, tokenizer, dataclasses.replace(config, tune=False))

    monkeypatch.setattr("softprompt.engine.Engine", Recorded)
    engine, _, _ = run._local_engine(str(tiny_model_dir), "cpu", dtype, EngineConfig())
    assert made[0].cpu_linear_dtype == wanted
    engine.stop()
