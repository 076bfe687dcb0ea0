"""The real CLI in a subprocess: bad input ends in one line on stderr and exit status 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import write_jsonl


def run(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "softprompt.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


def assert_user_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_help_is_fast_and_lists_commands():
    proc = run("--help")
    assert proc.returncode == 0
    for command in ("demo", "train", "generate", "eval"):
        assert command in proc.stdout


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """An adapter trained through the CLI on the tiny model."""
    out = tmp_path_factory.mktemp("cli") / "kind"
    data = out.parent / "data.jsonl"
    data.write_text(
        "".join(
            json.dumps({"quote": q, "n": 1}) + "\n"
            for q in [
                "be kind every day",
                "be brave every day",
                "hope every day",
                "small steps every day",
                "courage every day",
            ]
            * 4
        )
    )
    proc = run(
        "train",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(data),
        "--output",
        str(out),
        "--epochs",
        "2",
        "--virtual-tokens",
        "3",
        "--lr",
        "0.1",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["heldout_loss_after"] < summary["heldout_loss_before"]
    assert summary["trainable_params"] == 3 * 16
    # 10% of the 20 texts were held out, and kept beside the adapter.
    held = [json.loads(line)["text"] for line in (out / "heldout.jsonl").read_text().splitlines()]
    assert len(held) == 2
    return out, data


def test_generate_json_in_input_order(trained, tiny_model_dir, tmp_path):
    adapter, _ = trained
    requests = tmp_path / "requests.jsonl"
    rows = [
        {"prompt": "be kind", "adapter": "kind"},
        {"prompt": "the river", "adapter": None},
        {"prompt": "hope is", "adapter": "kind"},
    ]
    write_jsonl(requests, rows)
    outputs = []
    for batch_size in ("1", "16"):
        proc = run(
            "generate",
            "--model",
            str(tiny_model_dir),
            "--adapter",
            str(adapter),
            "--requests",
            str(requests),
            "--max-new-tokens",
            "6",
            "--json",
            "--batch-size",
            batch_size,
            "--repetition-penalty",
            "1.5",
        )
        assert proc.returncode == 0, proc.stderr
        records = [json.loads(line) for line in proc.stdout.splitlines()]
        assert [(r["prompt"], r["adapter"]) for r in records] == [
            (r["prompt"], r["adapter"]) for r in rows
        ]
        outputs.append([r["completion"] for r in records])
    assert outputs[0] == outputs[1]


def test_eval_json_records(trained, tiny_model_dir):
    adapter, data = trained
    proc = run(
        "eval",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(data),
        "--adapter",
        str(adapter),
        "--text-field",
        "quote",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    records = json.loads(proc.stdout)
    assert [r["adapter"] for r in records] == [None, "kind"]
    for r in records:
        assert set(r) == {
            *("adapter", "data", "loss", "perplexity", "tokens", "texts_cut"),
            *("metric", "n", "context"),
        }
        assert r["metric"] == "loss" and r["n"] > 0 and r["context"] is None
        assert r["tokens"] > 0 and r["perplexity"] == pytest.approx(2.718281828 ** r["loss"])
    assert records[1]["loss"] < records[0]["loss"]


def test_bad_inputs(trained, tiny_model_dir, tmp_path, cli_main):
    run = cli_main  # in this process: the same entry point, without a new interpreter per case
    adapter, data = trained
    model = ["--model", str(tiny_model_dir)]
    out = str(tmp_path / "new")
    assert_user_error(
        run("train", *model, "--data", str(tmp_path / "nope.jsonl"), "--output", out),
        "does not exist",
    )
    assert_user_error(
        run("train", *model, "--data", str(data), "--text-field", "prompt", "--output", out),
        "quote",
        "n",
    )
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert_user_error(run("train", *model, "--data", str(empty), "--output", out))
    assert_user_error(
        run(
            "train",
            "--model",
            "nobody-here/no-such-model-xyz",
            "--data",
            str(data),
            "--output",
            out,
        ),
        "cannot load model",
    )
    assert_user_error(
        run("train", *model, "--data", str(data), "--output", str(adapter)), "--overwrite"
    )
    assert_user_error(
        run("train", *model, "--data", str(data), "--output", "/proc/sp/out"), "cannot write"
    )
    assert_user_error(
        run("generate", "--model", str(tmp_path / "no-model"), "--prompt", "hi"), "does not exist"
    )
    assert not Path(out).exists()

    # An adapter made for another base model (token_dim mismatch).
    other = tmp_path / "other"
    other.mkdir()
    (other / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    config = json.loads((other / "adapter_config.json").read_text())
    config["token_dim"] = 32
    (other / "adapter_config.json").write_text(json.dumps(config))
    from safetensors.torch import save_file

    save_file({"prompt_embeddings": torch.zeros(3, 32)}, str(other / "adapter_model.safetensors"))
    assert_user_error(
        run("generate", *model, "--adapter", str(other), "--prompt", "hi"), "token_dim 32"
    )

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00" * 20)
    assert_user_error(
        run("eval", *model, "--data", str(data), "--adapter", str(corrupt)), "corrupt"
    )

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    torch.save({"prompt_embeddings": torch.zeros(3, 16)}, pickled / "adapter_model.bin")
    assert_user_error(
        run("generate", *model, "--adapter", str(pickled), "--prompt", "hi"), "--allow-pickle"
    )
    proc = run(
        "generate",
        *model,
        "--adapter",
        str(pickled),
        "--prompt",
        "hi",
        "--allow-pickle",
        "--max-new-tokens",
        "2",
    )
    assert proc.returncode == 0, proc.stderr

    requests = tmp_path / "bad.jsonl"
    requests.write_text('{"prompt": "hi", "adapter": "missing"}\n')
    assert_user_error(run("generate", *model, "--requests", str(requests)), "unknown adapter")
    assert_user_error(run("generate", *model, "--prompt", "hi", "--top-p", "2"), "--top-p")
    assert_user_error(run("generate", *model, "--prompt", "hi", "--stop", ""), "--stop")
    assert_user_error(
        run("generate", *model, "--prompt", "hi", "--min-new-tokens", "9", "--max-new-tokens", "4"),
        "--min-new-tokens",
    )
    assert_user_error(run("generate", *model, "--prompt", "hope " * 300), "context")


def test_generate_stop_min_tokens_and_ignore_eos(trained, tiny_model_dir, cli_main, tmp_path):
    from transformers import AutoTokenizer

    adapter, _ = trained
    base = ["generate", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--json"]
    base += ["--prompt", "be kind", "--max-new-tokens", "12"]

    def completion(*flags: str) -> str:
        proc = cli_main(*base, *flags)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.splitlines()[0])["completion"]

    full = completion("--ignore-eos")
    words = full.split()
    assert len(words) >= 4, full
    assert completion("--ignore-eos", "--stop", words[2]) == full[: full.find(words[2])]
    # --min-new-tokens carries a completion past an end of sequence. The tiny model rarely
    # ends by itself: a copy of it whose generation config also ends at the third word does.
    ending = tmp_path / "ending-model"
    shutil.copytree(tiny_model_dir, ending)
    third = AutoTokenizer.from_pretrained(tiny_model_dir).convert_tokens_to_ids(words[2])
    (ending / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, third]}))
    base[base.index(str(tiny_model_dir))] = str(ending)
    plain = completion()
    assert len(plain.split()) < 3, plain  # it ends early now (the check below always runs)
    assert len(completion("--min-new-tokens", "12").split()) > len(plain.split())


def test_compare_inspect_report(trained, tiny_model_dir, tmp_path):
    adapter, data = trained
    model = ["--model", str(tiny_model_dir)]
    proc = run(
        "compare",
        *model,
        "--adapter",
        str(adapter),
        "--prompt",
        "be kind",
        "--prompt",
        "hope",
        "--max-new-tokens",
        "4",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    records = json.loads(proc.stdout)
    assert [r["prompt"] for r in records] == ["be kind", "hope"]
    assert [c["adapter"] for c in records[0]["completions"]] == [None, "kind"]
    proc = run(
        "compare",
        *model,
        "--adapter",
        str(adapter),
        "--prompt",
        "be kind",
        "--max-new-tokens",
        "4",
        "--markdown",
    )
    assert proc.returncode == 0 and "| model | completion |" in proc.stdout

    proc = run("inspect", *model, str(adapter), "--json", "--top-k", "3")
    assert proc.returncode == 0, proc.stderr
    view = json.loads(proc.stdout)
    assert len(view["tokens"]) == 3 and len(view["tokens"][0]["nearest"]) == 3

    report = tmp_path / "report.html"
    proc = run(
        "report",
        *model,
        "--adapter",
        str(adapter),
        "--data",
        str(data),
        "--text-field",
        "quote",
        "--prompt",
        "be kind",
        "--max-new-tokens",
        "4",
        "--output",
        str(report),
    )
    assert proc.returncode == 0, proc.stderr
    assert report.read_text().count("data:image/png;base64,") == 2
    # Without --data, the report evaluates on the adapter's own held-out texts.
    proc = run(
        "report",
        *model,
        "--adapter",
        str(adapter),
        "--prompt",
        "be kind",
        "--max-new-tokens",
        "4",
        "--output",
        str(report),
    )
    assert proc.returncode == 0, proc.stderr
    html = report.read_text()
    assert "heldout.jsonl" in html and html.count(" &#9733;<br>") == 1


def test_compare_inspect_report_bad_inputs(trained, tiny_model_dir, tmp_path, cli_main):
    run = cli_main
    adapter, data = trained
    model = ["--model", str(tiny_model_dir)]
    assert_user_error(run("compare", *model, "--adapter", str(adapter)), "--prompt")
    assert_user_error(run("inspect", *model, str(tmp_path)), "not an adapter folder")
    assert_user_error(
        run("report", *model, "--adapter", str(tmp_path), "--output", str(tmp_path / "r.html")),
        "not an adapter folder",
    )
    assert_user_error(
        run(
            "report",
            *model,
            "--adapter",
            str(adapter),
            "--data",
            str(data),
            "--output",
            str(tmp_path / "missing" / "r.html"),
        ),
        "does not exist",
    )
    assert_user_error(
        run(
            "report",
            *model,
            "--adapter",
            str(adapter),
            "--data",
            str(data),
            "--prompt",
            " ",
            "--output",
            str(tmp_path / "r.html"),
        ),
        "empty",
    )
    assert not (tmp_path / "r.html").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_unreachable_hub_fails_at_once_with_one_line(tmp_path):
    # Not offline by configuration: the CLI must notice the Hub is unreachable by itself
    # (here an endpoint nobody listens on) instead of retrying each request for a minute.
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"
    env["HF_HOME"] = str(tmp_path / "hf")
    proc = run("eval", "--model", "nobody-here/no-such-model", "--data", "examples:quotes", env=env)
    assert_user_error(proc, "cannot load model", "not reachable")
    proc = run("eval", "--data", "nobody-here/no-such-dataset", env=env)
    assert_user_error(proc, "cannot load dataset", "not reachable")


def test_more_bad_inputs_found_in_review(trained, tiny_model_dir, tmp_path, cli_main):
    run = cli_main
    adapter, data = trained
    model = ["--model", str(tiny_model_dir)]
    out = str(tmp_path / "new")
    # --init-from used to be ignored silently unless --init file was given too.
    assert_user_error(
        run(
            "train",
            *model,
            "--data",
            str(data),
            "--output",
            out,
            "--init-from",
            str(adapter),
            "--init",
            "random",
        ),
        "--init-from",
    )
    binary = tmp_path / "requests.jsonl"
    binary.write_bytes(b"\xff\xfe\x00 not text")
    assert_user_error(run("generate", *model, "--requests", str(binary)), "not UTF-8")
    seeded = tmp_path / "seeded.jsonl"
    seeded.write_text(json.dumps({"prompt": "be kind", "adapter": None, "seed": "7"}) + "\n")
    assert_user_error(run("generate", *model, "--requests", str(seeded)), "seed must be an integer")
    # A seed beyond 64 bits used to reach torch's generator and fail inside the step.
    huge = str(2**64)
    assert_user_error(
        run("generate", *model, "--prompt", "hope", "--temperature", "1", "--seed", huge),
        "--seed must be an integer from",
    )
    assert_user_error(
        run("train", *model, "--data", str(data), "--output", out, "--seed", huge),
        "--seed must be from 0 to",
    )
    assert_user_error(
        run("train", *model, "--data", str(data), "--output", out, "--virtual-tokens", "5000"),
        "more than the",
    )
    assert not Path(out).exists()


def test_init_from_alone_continues_from_the_adapter(trained, tiny_model_dir, tmp_path):
    adapter, data = trained
    out = tmp_path / "continued"
    proc = run(
        "train",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(data),
        "--text-field",
        "quote",
        "--output",
        str(out),
        "--init-from",
        str(adapter),
        "--epochs",
        "1",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    config = json.loads((out / "training_config.json").read_text())
    assert config["init"] == "file" and config["virtual_tokens"] == 3
    # Training started where the adapter ended: its held-out loss before equals the adapter's.
    before = json.loads((out / "loss_log.json").read_text())["evals"][0]["loss"]
    after = json.loads((adapter / "loss_log.json").read_text())["evals"][-1]["loss"]
    assert before == pytest.approx(after, abs=1e-5)
