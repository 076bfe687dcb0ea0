"""Devices and dtypes: nothing in softprompt names a device but ``device.py``; the flags fail
clearly where the machine cannot do what they ask.

CI has no GPU, so the first test is a lint over the source: any device spelled out in code (a
string given as ``device=``, ``torch.device("cuda")``, ``.cuda()``, ``.to("cpu")``) or a copy to
the host (``.cpu()``, ``map_location``) must be one of the few listed here, each with its reason.
Everything else follows the tensors it works with (``weight.device``, ``logits.device``...), and
``device.resolve`` turns ``--device`` into the device the model loads on.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest
import torch

SRC = Path(__file__).resolve().parents[1] / "src" / "softprompt"

ALLOWED = {
    # Copies to the host on purpose: file formats and checksums are host bytes.
    ("prompt.py", "base_checksum"): "hashes the weights' bytes",
    ("adapters.py", "write_adapter_files"): "safetensors files hold CPU tensors",
    ("init.py", "init_prompt"): "initial rows are float32 on the CPU on every device",
    ("prefix.py", "model_kv"): "a prefix's start is float32 on the CPU, as init_prompt's rows",
    ("adapters.py", "_read_weights"): "a pickled adapter loads to the CPU, then follows the model",
    ("embeds.py", "to_bytes"): "torch.save of a tensor for another process",
    ("train.py", "save_checkpoint"): "a checkpoint's rows are saved from the CPU",
    ("checkpoint.py", "load"): "a checkpoint loads to the CPU, then follows the model",
    ("checkpoint.py", "record"): "a search's record is read from a checkpoint on the CPU",
    ("common.py", "load_base"): "--shard reads the model into host memory, then shards it "
    "onto the device, which never holds it whole",
    ("frontend.py", "_embedding"): "the meta device: the model built without any weights, "
    "to find its embedding's name",
}


def _hard_coded(node: ast.AST) -> str | None:
    """What in ``node`` names a device, or None."""
    if not isinstance(node, ast.Call):
        return None
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    literal = [a for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    for keyword in node.keywords:
        if keyword.arg in ("device", "map_location") and isinstance(keyword.value, ast.Constant):
            return f"{keyword.arg}={keyword.value.value!r}"
    if name in ("cpu", "cuda") and isinstance(func, ast.Attribute):
        return f".{name}()"
    if name == "device" and literal:
        return f"torch.device({literal[0].value!r})"
    if name == "to" and any(str(a.value).split(":")[0] in ("cpu", "cuda") for a in literal):
        return f".to({literal[0].value!r})"
    return None


def _findings() -> list[tuple[str, str, int, str]]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        parents: dict[ast.AST, ast.AST] = {}
        for parent in ast.walk(tree):
            for child in ast.iter_child_nodes(parent):
                parents[child] = parent
        for node in ast.walk(tree):
            what = _hard_coded(node)
            if what is None:
                continue
            scope: ast.AST | None = node
            while scope is not None and not isinstance(
                scope, ast.FunctionDef | ast.AsyncFunctionDef
            ):
                scope = parents.get(scope)
            function = scope.name if isinstance(scope, ast.FunctionDef) else "<module>"
            found.append((path.name, function, node.lineno, what))  # type: ignore[attr-defined]
    return found


def test_no_device_is_hard_coded_outside_the_listed_places():
    unexpected = [f for f in _findings() if (f[0], f[1]) not in ALLOWED]
    listing = "\n".join(f"  {f}:{line} in {fn}: {what}" for f, fn, line, what in unexpected)
    assert not unexpected, f"devices named in code (follow a tensor's .device):\n{listing}"


def test_the_lint_sees_what_it_must(tmp_path):
    """The rule itself can fail: each spelling it must catch is caught, the device-following
    spellings are not."""
    bad = [
        "torch.zeros(3, device='cuda')",
        "torch.device('cpu')",
        "x.cuda()",
        "x.cpu()",
        "x.to('cuda:0')",
        "torch.load(f, map_location='cpu')",
    ]
    good = ["torch.zeros(3, device=w.device)", "x.to(w.device)", "x.to(torch.float32)"]
    for source in bad:
        assert any(_hard_coded(n) for n in ast.walk(ast.parse(source))), source
    for source in good:
        assert not any(_hard_coded(n) for n in ast.walk(ast.parse(source))), source


def test_every_allowance_is_still_used():
    used = {(f[0], f[1]) for f in _findings()}
    assert set(ALLOWED) <= used, f"stale allowances: {set(ALLOWED) - used}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message of a machine without CUDA")
def test_device_cuda_without_a_gpu_is_one_clear_line(cli_main):
    done = cli_main("eval", "--device", "cuda", "--data", "examples:quotes:heldout")
    code, err = done.returncode, done.stderr
    assert code == 2
    assert err.startswith("softprompt: error: --device cuda:") and err.count("\n") == 1
    assert "use --device cpu" in err and "Traceback" not in err


def test_a_misspelt_device_is_refused_by_the_parser(cli_main):
    with pytest.raises(SystemExit) as exc:
        cli_main("eval", "--device", "gpu", "--data", "examples:quotes:heldout")
    assert exc.value.code == 2


def test_auto_is_the_cpu_in_float32_here_and_bfloat16_is_allowed_on_the_cpu():
    from softprompt.device import resolve

    if not torch.cuda.is_available():
        assert resolve("auto", "auto") == (torch.device("cpu"), torch.float32)
    assert resolve("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)


@pytest.mark.parametrize("native", [False, True, None])
def test_bfloat16_on_a_cpu_without_bf16_instructions_says_float32_is_faster(
    monkeypatch, caplog, native
):
    import softprompt.device as device

    monkeypatch.setattr(device, "native_cpu_bf16", lambda: native)
    with caplog.at_level("WARNING", logger="softprompt.device"):
        assert device.resolve("cpu", "bfloat16")[1] == torch.bfloat16
        assert device.resolve("cpu", "float32")[1] == torch.float32
    warned = [r.getMessage() for r in caplog.records]
    if native is False:
        assert len(warned) == 1 and "no bfloat16 instructions" in warned[0]
        assert "float32 is the fast choice here" in warned[0]
    else:  # the CPU has them, or its flags cannot be read: nothing to say
        assert warned == []


def test_native_cpu_bf16_reads_the_cpus_flags(tmp_path):
    from softprompt.device import native_cpu_bf16

    info = tmp_path / "cpuinfo"
    info.write_text("model name\t: AMD EPYC\nflags\t\t: fpu sse avx2 fma avx512f\n")
    assert native_cpu_bf16(info) is False
    info.write_text("model name\t: Xeon\nflags\t\t: avx2 avx512f avx512_bf16 amx_tile\n")
    assert native_cpu_bf16(info) is True
    info.write_text("Features\t: fp asimd sve bf16\n")  # Arm
    assert native_cpu_bf16(info) is True
    assert native_cpu_bf16(tmp_path / "missing") is None


def test_running_out_of_memory_is_one_line_with_what_to_try(cli_main, monkeypatch, tiny_model_dir):
    import softprompt.cli.evaluation as evaluation

    def fail(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(evaluation, "load_model", fail)
    done = cli_main("eval", "--model", str(tiny_model_dir), "--data", "examples:quotes:heldout")
    err = done.stderr
    assert done.returncode == 2 and err.count("\n") == 1
    assert err.startswith("softprompt: error: out of memory (CUDA out of memory.")
    assert "smaller --batch-size" in err and "Traceback" not in err


def test_an_adapter_trained_on_a_gpu_loads_and_runs_on_the_cpu():
    """``tests/data/gpu-trained-quotes`` came from ``softprompt train --device cuda`` (bf16
    model) on an NVIDIA H200 (benchmarks/gpu_session.sh, 2026-11-26): its rows are float32 and
    serve on a CPU model of the same hidden size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from softprompt.adapters import load_adapter
    from softprompt.engine import Engine, SamplingParams

    folder = Path(__file__).parent / "data" / "gpu-trained-quotes"
    adapter = load_adapter(folder)
    assert adapter.weights.dtype == torch.float32 and adapter.weights.shape == (8, 576)
    assert bool(torch.isfinite(adapter.weights).all())
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=576,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=300,
        eos_token_id=0,
    )
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = {"<eos>": 0, **{f"t{i}": i for i in range(1, 300)}}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="<eos>")), eos_token="<eos>"
    )
    engine = Engine(model, tokenizer)
    engine.add_adapter("gpu", adapter)
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    tuned, base = engine.generate([[5, 6, 7], [5, 6, 7]], ["gpu", None], params)
    assert len(tuned.token_ids) == 8 and tuned.finish_reason == "length"
    assert tuned.token_ids != base.token_ids  # the GPU-trained rows do change the output


def test_bfloat16_on_a_gpu_without_it_is_one_clear_error(monkeypatch):
    """An older GPU (say a V100) has no bfloat16: ``--dtype bfloat16`` says so and what to use,
    and ``auto`` falls back to float32 there."""
    import contextlib

    from softprompt.device import resolve_dtype
    from softprompt.errors import UserError

    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    gpu = torch.device("cuda")
    with pytest.raises(UserError, match="Tesla V100-SXM2-16GB does not support it; use --dtype"):
        resolve_dtype("bfloat16", gpu)
    assert resolve_dtype("auto", gpu) == torch.float32
    assert resolve_dtype("float32", gpu) == torch.float32


def test_a_single_process_run_on_a_bare_cuda_device_loads(monkeypatch):
    # `softprompt train --device cuda` (no index, one process) once called
    # torch.cuda.set_device("cuda"), which PyTorch refuses; caught on an H200.
    from softprompt import device, models
    from softprompt.cli import common
    from softprompt.tuning.distributed import launched

    monkeypatch.setattr(device, "resolve", lambda d, t: (torch.device("cuda"), torch.float32))
    loaded = []
    monkeypatch.setattr(models, "load_base_model", lambda *a, **k: loaded.append(k) or "base")
    args = argparse.Namespace(model=None, device="cuda", dtype="auto")
    assert common.load_base(args, launched()) == "base"
    assert loaded[0]["device"] == torch.device("cuda")
