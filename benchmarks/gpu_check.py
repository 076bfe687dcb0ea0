"""The GPU check: serving and training speed on one CUDA GPU, with no downloaded weights.

Random-init models of two configs (the embedded SmolLM2-135M's, and a ~1.1B Llama: hidden 2048,
22 layers, 32 heads, 4 KV heads, intermediate 5632, vocab 32000) in bfloat16, and a synthetic
word-level tokenizer over their vocabularies (prompts are token ids; the tokenizer only turns
outputs into text, as a real one would). For each config:

  serving, 64 requests over 8 adapters of 20 virtual tokens and the base model, 64 new tokens
  each (EOS ignored, greedy):
    - transformers' static-batch ``generate`` of the base model alone, default dynamic cache;
    - the same with ``cache_implementation="static"`` (transformers compiles the decode step;
      by default on the 135M config only, ``--static-configs`` for more);
    - PEFT (on the 135M config; ``--peft-configs`` for more): ``set_adapter`` + ``generate`` per
      request (on the first ``--peft-requests``, 3), and grouped by adapter (one batched
      ``generate`` per adapter, every request);
    - this engine, every request submitted at once (after one warm-up run that records its
      CUDA graphs), its peak GPU memory, and its greedy outputs batched vs one by one (the
      share of identical completions over the first ``--alone``, 32: bf16 sums in another
      order may flip a near-tie);
  training, a prompt-tuning step on 16 x 128 text tokens (20 virtual tokens), AdamW:
    - PEFT (``get_peft_model`` + PROMPT_TUNING), with the float32 model under bf16 autocast and
      with the model in bf16;
    - softprompt (``batch_loss``: bf16 model, float32 prompt rows and optimizer);
    - forward-only tokens/s of the bf16 model on the same batch.

Prints one JSON line per measurement (``"error"`` where one failed, and the check goes on), then
a table. Runs in a few minutes on one H100/H200:

    python benchmarks/gpu_check.py            # both configs
    python benchmarks/gpu_check.py --tiny --device cpu   # a smoke run of the script itself

``--tiny`` swaps both configs for a two-layer model and fewer requests (what the test suite runs
on the CPU, so the script is known to work before GPU time is spent on it).

``--families llama mistral qwen2 qwen3 gemma2 gemma3_text phi3`` adds, for each family, a
random model with the first config's sizes in that family's shape (``bench_archs.py``) served
by the engine on its lean forward (CUDA graphs on a GPU): tok/s against the Llama model's in
the same run, and greedy agreement with the family's own ``generate`` on the first requests.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

CONFIGS = {
    "135M": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    ),
    "1.1B": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        rope_theta=10000.0,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    ),
}
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)

RESULTS: list[dict[str, Any]] = []


def emit(record: dict[str, Any]) -> dict[str, Any]:
    RESULTS.append(record)
    print(json.dumps(record), flush=True)
    return record


def guarded(config: str, what: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
    """Run one measurement; a failure is reported as a line and the check goes on."""
    try:
        return emit({"config": config, "what": what, **fn()})
    except Exception as exc:  # noqa: BLE001 - report every failure, keep measuring
        emit({"config": config, "what": what, "error": f"{type(exc).__name__}: {exc}"})
        traceback.print_exc(file=sys.stderr)
        return None
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tokenizer_for(vocab: int):
    """A word-level tokenizer whose token i is ``t<i>`` (id 0 is the EOS and padding)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<eos>": 0, **{f"t{i}": i for i in range(1, vocab)}}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    fast.padding_side = "left"
    return fast


def build_model(spec: dict[str, Any], device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**spec, bos_token_id=None, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    with device:
        model = LlamaForCausalLM(config)
    model.to(dtype).eval().requires_grad_(False)
    model.generation_config.eos_token_id = 0
    model.generation_config.pad_token_id = 0
    return model


def workload(vocab: int, count: int, adapters: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    prompts = []
    for _ in range(count):
        length = int(torch.randint(16, 49, (1,), generator=gen))
        prompts.append(torch.randint(1, vocab, (length,), generator=gen).tolist())
    names: list[str | None] = [f"a{i}" for i in range(adapters)] + [None]
    return prompts, [names[i % len(names)] for i in range(count)]


def adapter_rows(model, count: int, virtual: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """Scale-matched random rows (what ``--init random`` makes), float32 on the CPU."""
    weight = model.get_input_embeddings().weight.detach().float()
    norm = float(weight.norm(dim=1).mean())
    gen = torch.Generator().manual_seed(seed)
    hidden = weight.shape[1]
    return {
        f"a{i}": torch.randn(virtual, hidden, generator=gen) * (norm / hidden**0.5)
        for i in range(count)
    }


def left_pad(prompts: list[list[int]], device: torch.device) -> dict[str, torch.Tensor]:
    from softprompt.data import pad_left

    batch = pad_left(prompts, 0)
    return {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}


def hf_generate(model, prompts, new_tokens: int, device, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            **left_pad(prompts, device),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            **kwargs,
        )


def timed(device: torch.device, fn: Callable[[], Any]) -> tuple[float, Any]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


# Serving -----------------------------------------------------------------------------------


def serve_checks(name: str, spec, args, device, dtype) -> None:
    from softprompt.adapters import Adapter
    from softprompt.engine import Engine, EngineConfig, SamplingParams

    model = build_model(spec, device, dtype)
    tokenizer = tokenizer_for(spec["vocab_size"])
    prompts, targets = workload(spec["vocab_size"], args.requests, args.adapters)
    rows = adapter_rows(model, args.adapters, args.virtual_tokens)
    new = args.new_tokens
    total = len(prompts) * new
    measured: dict[str, float] = {}

    def hf_dynamic() -> dict[str, Any]:
        hf_generate(model, prompts[:4], 4, device)  # warm-up
        seconds, out = timed(device, lambda: hf_generate(model, prompts, new, device))
        assert out.shape[1] - max(len(p) for p in prompts) == new
        measured["hf_dynamic"] = total / seconds
        return {"tok_s": round(total / seconds, 1), "seconds": round(seconds, 3)}

    def hf_static() -> dict[str, Any]:
        kwargs = {"cache_implementation": "static"}
        warm, _ = timed(device, lambda: hf_generate(model, prompts, new, device, **kwargs))
        seconds, _ = timed(device, lambda: hf_generate(model, prompts, new, device, **kwargs))
        measured["hf_static"] = total / seconds
        return {
            "tok_s": round(total / seconds, 1),
            "seconds": round(seconds, 3),
            "first_run_seconds": round(warm, 1),
        }

    def engine_run() -> dict[str, Any]:
        config = EngineConfig(
            max_batch_size=len(prompts), max_prefill_tokens=1 << 16, max_new_tokens_cap=4096
        )
        engine = Engine(model, tokenizer, config)
        for adapter, weights in rows.items():
            engine.add_adapter(adapter, Adapter(adapter, weights))
        params = SamplingParams(max_new_tokens=new, ignore_eos=True)
        warm, _ = timed(device, lambda: engine.generate(prompts, targets, params))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        before = engine.stats.__dict__.copy()
        seconds, batched = timed(device, lambda: engine.generate(prompts, targets, params))
        after = engine.stats.__dict__
        short = [c for c in batched if len(c.token_ids) != new]
        assert not short, f"{len(short)} completions came out short: {short[0].error}"
        measured["engine"] = total / seconds
        steps = after["steps"] - before["steps"]
        record: dict[str, Any] = {
            "tok_s": round(total / seconds, 1),
            "seconds": round(seconds, 3),
            "first_run_seconds": round(warm, 2),
            "prefill_seconds": round(after["prefill_seconds"] - before["prefill_seconds"], 4),
            "decode_seconds": round(after["decode_seconds"] - before["decode_seconds"], 4),
            "decode_steps": steps,
            "graphs": engine.runner.graphed is not None,
            "peak_gpu_mib": round(torch.cuda.max_memory_allocated(device) / 2**20)
            if device.type == "cuda"
            else None,
            "memory_mib": {k: round(v / 2**20, 1) for k, v in engine.memory().items()},
        }
        graphed = engine.runner.graphed
        if graphed is not None and graphed.graphs and device.type == "cuda":
            graph, _ = graphed.graphs[max(graphed.graphs)]
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(20):
                graph.replay()
            end.record()
            sync(device)
            record["graph_replay_ms"] = round(start.elapsed_time(end) / 20, 3)
            record["graph_rows"] = max(graphed.graphs)
        if measured.get("hf_static"):
            record["vs_hf_static"] = round(measured["engine"] / measured["hf_static"], 2)
        if measured.get("hf_dynamic"):
            record["vs_hf_dynamic"] = round(measured["engine"] / measured["hf_dynamic"], 2)
        # Greedy agreement: requests again, alone (the first --alone of them).
        count = min(args.alone, len(prompts))
        alone = [
            engine.generate([p], [a], params)[0].token_ids
            for p, a in zip(prompts[:count], targets[:count], strict=True)
        ]
        same = sum(a == b.token_ids for a, b in zip(alone, batched[:count], strict=True))
        record["identical_alone_vs_batched"] = f"{same}/{count}"
        return record

    def peft_runs() -> dict[str, Any]:
        import tempfile

        from peft import PeftModel

        from softprompt.adapters import adapter_config, write_adapter_files

        with tempfile.TemporaryDirectory() as tmp:
            folders = {}
            for adapter, weights in rows.items():
                folder = Path(tmp) / adapter
                folder.mkdir()
                write_adapter_files(
                    folder, weights, adapter_config(Adapter(adapter, weights), "random")
                )
                folders[adapter] = folder
            names = list(folders)
            peft = PeftModel.from_pretrained(model, str(folders[names[0]]), adapter_name=names[0])
            for adapter in names[1:]:
                peft.load_adapter(str(folders[adapter]), adapter_name=adapter)
            peft.eval()

            def gen(batch, adapter):
                if adapter is None:
                    with peft.disable_adapter():
                        return hf_generate(peft, batch, new, device)
                peft.set_adapter(adapter)
                return hf_generate(peft, batch, new, device)

            gen(prompts[:1], names[0])  # warm-up
            subset = list(range(min(len(prompts), args.peft_requests)))
            seconds, _ = timed(device, lambda: [gen([prompts[i]], targets[i]) for i in subset])
            per_request = len(subset) * new / seconds
            groups: dict[str | None, list[int]] = {}
            for i, adapter in enumerate(targets):
                groups.setdefault(adapter, []).append(i)
            grouped_s, _ = timed(
                device,
                lambda: [gen([prompts[i] for i in idx], a) for a, idx in groups.items()],
            )
            peft.unload() if hasattr(peft, "unload") else None
        measured["peft_per_request"] = per_request
        measured["peft_grouped"] = total / grouped_s
        record = {
            "per_request_tok_s": round(per_request, 1),
            "per_request_subset": len(subset),
            "grouped_tok_s": round(total / grouped_s, 1),
        }
        if measured.get("engine"):
            record["engine_vs_per_request"] = round(measured["engine"] / per_request, 1)
            record["engine_vs_grouped"] = round(measured["engine"] / measured["peft_grouped"], 1)
        return record

    if not args.skip_dynamic:
        guarded(name, "serve: transformers generate, base model, dynamic cache", hf_dynamic)
    if name in args.static_configs or args.tiny:
        guarded(name, "serve: transformers generate, base model, static cache", hf_static)
    guarded(name, f"serve: softprompt engine, {args.adapters} adapters + base mixed", engine_run)
    if not (args.skip_peft or args.skip_peft_serve) and (name in args.peft_configs or args.tiny):
        guarded(name, "serve: PEFT", peft_runs)


# Training ----------------------------------------------------------------------------------


def train_checks(name: str, spec, args, device, dtype) -> None:
    batch, length, virtual = args.train_batch, args.train_length, args.virtual_tokens
    gen = torch.Generator().manual_seed(2)
    texts = torch.randint(1, spec["vocab_size"], (batch, length), generator=gen)
    tokens = batch * length
    steps = args.train_steps
    measured: dict[str, float] = {}

    def rate(step: Callable[[], Any]) -> float:
        for _ in range(3):
            step()
        seconds, _ = timed(device, lambda: [step() for _ in range(steps)])
        return tokens * steps / seconds

    def ours(compile_mode: str | None = None) -> dict[str, Any]:
        from softprompt.adapters import Adapter
        from softprompt.models import BaseModel
        from softprompt.prompt import SoftPromptModel
        from softprompt.rows import batch_loss

        model = build_model(spec, device, dtype)
        spm = SoftPromptModel(BaseModel(model, tokenizer_for(spec["vocab_size"]), "random"))
        rows = adapter_rows(model, 1, virtual)["a0"]
        param = spm.add_adapter(Adapter("p", rows), trainable=True)
        optimizer = torch.optim.AdamW([param], lr=1e-3)
        virtual_ids = spm.virtual_ids("p")
        data = [(virtual_ids + row, virtual, [True] * len(row)) for row in texts.tolist()]

        def step() -> None:
            total, count = batch_loss(spm, data, skip_first=False)
            optimizer.zero_grad(set_to_none=True)
            (total / count).backward()
            optimizer.step()

        compile_seconds = None
        if compile_mode is not None:
            spm.compile(None if compile_mode == "default" else compile_mode)
            compile_seconds, _ = timed(device, step)
        key = "ours" if compile_mode is None else f"ours_{compile_mode}"
        measured[key] = rate(step)
        assert param.dtype == torch.float32 and param.grad is not None
        if compile_mode is not None:
            record = {
                "tok_s": round(measured[key]),
                "first_step_seconds": round(compile_seconds or 0, 1),
            }
            for peft_key in ("peft_autocast", "peft_bf16"):
                if measured.get(peft_key):
                    record[f"vs_{peft_key}"] = round(measured[key] / measured[peft_key], 2)
            if measured.get("forward"):
                record["fraction_of_forward"] = round(measured[key] / measured["forward"], 2)
            return record

        embeds = torch.cat(
            [
                rows.to(device, dtype)[None].expand(batch, -1, -1),
                model.get_input_embeddings()(texts.to(device)),
            ],
            dim=1,
        )

        def forward() -> None:
            with torch.no_grad():
                model(inputs_embeds=embeds, use_cache=False)

        measured["forward"] = rate(forward)
        return {
            "tok_s": round(measured["ours"]),
            "forward_only_tok_s": round(measured["forward"]),
            "fraction_of_forward": round(measured["ours"] / measured["forward"], 2),
            "prompt_dtype": str(param.dtype),
            "model_dtype": str(dtype),
        }

    def peft(autocast: bool) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

            model = build_model(spec, device, torch.float32 if autocast else dtype)
            config = PromptTuningConfig(
                task_type="CAUSAL_LM",
                num_virtual_tokens=virtual,
                prompt_tuning_init=PromptTuningInit.RANDOM,
            )
            peft_model = get_peft_model(model, config)
            params = [p for p in peft_model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=1e-3)
            ids = texts.to(device)
            mask = torch.ones_like(ids)

            def step() -> None:
                with torch.autocast(device.type, dtype=dtype, enabled=autocast):
                    out = peft_model(input_ids=ids, attention_mask=mask, labels=ids)
                optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                optimizer.step()

            key = "peft_autocast" if autocast else "peft_bf16"
            measured[key] = rate(step)
            record = {
                "tok_s": round(measured[key]),
                "weights": "float32 + autocast" if autocast else str(dtype),
            }
            if measured.get("ours"):
                record["ours_vs_this"] = round(measured["ours"] / measured[key], 2)
            return record

        return run

    guarded(name, "train: softprompt step", ours)
    if not args.skip_peft:
        guarded(name, "train: PEFT step, float32 weights, autocast", peft(True))
        guarded(name, f"train: PEFT step, {str(dtype).removeprefix('torch.')} weights", peft(False))
    for mode in args.compile_modes:
        guarded(name, f"train: softprompt step, --compile ({mode})", lambda m=mode: ours(m))


def family_checks(name: str, spec, args, device, dtype) -> None:
    """Each family at ``spec``'s sizes on the engine: tok/s (against Llama's, same run) and
    greedy agreement with transformers' ``generate`` of the same model, request by request."""
    from types import SimpleNamespace

    from bench_archs import sized

    from softprompt.adapters import Adapter
    from softprompt.engine import Engine, EngineConfig, SamplingParams

    base = SimpleNamespace(**spec, eos_token_id=0, bos_token_id=None, pad_token_id=0)
    tok = tokenizer_for(spec["vocab_size"])
    prompts, targets = workload(spec["vocab_size"], args.requests, args.adapters)
    rates: dict[str, float] = {}
    for family in ["llama", *[f for f in args.families if f != "llama"]]:

        def one(family: str = family) -> dict[str, Any]:
            model = sized(family, base).to(device=device, dtype=dtype).requires_grad_(False)
            rows = adapter_rows(model, args.adapters, args.virtual_tokens)
            engine = Engine(model, tok, EngineConfig(max_batch_size=args.requests))
            for adapter, weights in rows.items():
                engine.add_adapter(adapter, Adapter(adapter, weights))
            params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
            engine.generate(prompts[:2], targets[:2], params)  # warm-up: graphs recorded
            sync(device)
            seconds, done = timed(device, lambda: engine.generate(prompts, targets, params))
            rates[family] = args.requests * args.new_tokens / seconds
            count = min(args.alone, 8)
            same = 0
            embed = model.get_input_embeddings()
            for ids, adapter, out in zip(prompts[:count], targets[:count], done, strict=False):
                with torch.no_grad():
                    text = embed(torch.tensor(ids, device=device))
                    if adapter is not None:
                        text = torch.cat((rows[adapter].to(device, dtype), text))
                    mask = torch.ones(1, text.shape[0], dtype=torch.long, device=device)
                    ref = model.generate(
                        inputs_embeds=text[None], attention_mask=mask,
                        max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None,
                        pad_token_id=0,
                    )[0].tolist()  # fmt: skip
                same += ref == out.token_ids
            record = {
                "lean": engine.runner.lean is not None,
                "graphs": engine.runner.graphed is not None,
                "tok_s": round(rates[family], 1),
                "vs_llama": round(rates[family] / rates["llama"], 3),
                "identical_to_generate": f"{same}/{count}",
            }
            return record

        guarded(name, f"family: {family}", one)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--virtual-tokens", type=int, default=20)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--train-length", type=int, default=128)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument(
        "--static-configs",
        nargs="*",
        default=["135M"],
        help="configs to run transformers' static-cache generate on (it compiles for a minute)",
    )
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-serve", action="store_true")
    parser.add_argument("--skip-peft-serve", action="store_true")
    parser.add_argument("--skip-dynamic", action="store_true")
    parser.add_argument(
        "--alone", type=int, default=32, help="requests rerun alone for the agreement check"
    )
    parser.add_argument(
        "--peft-configs",
        nargs="*",
        default=["135M"],
        help="configs to serve through PEFT on (its runs are slow: about a minute each)",
    )
    parser.add_argument(
        "--peft-requests",
        type=int,
        default=3,
        help="requests PEFT runs one by one with set_adapter (its rate per request)",
    )
    parser.add_argument(
        "--compile-modes",
        nargs="*",
        default=["default"],
        help="torch.compile modes to measure the training step in too (none: --compile-modes)",
    )
    parser.add_argument("--tiny", action="store_true", help="a two-layer model, few requests")
    parser.add_argument(
        "--families", nargs="*", default=[],
        help="decoder families to serve at the first config's sizes (bench_archs.py's models)",
    )  # fmt: skip
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    configs = {name: CONFIGS[name] for name in args.configs}
    if args.tiny:
        configs = {"tiny": TINY}
        args.requests, args.adapters, args.new_tokens = 9, 2, 6
        args.train_batch, args.train_length, args.train_steps = 2, 8, 2
    import transformers

    emit(
        {
            "what": "environment",
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "dtype": args.dtype,
        }
    )
    if args.families:
        name, spec = next(iter(configs.items()))
        family_checks(name, spec, args, device, dtype)
    for name, spec in configs.items():
        if not args.skip_serve:
            serve_checks(name, spec, args, device, dtype)
        if not args.skip_train:
            train_checks(name, spec, args, device, dtype)
    print("\nconfig  measurement" + " " * 48 + "result")
    for r in RESULTS[1:]:
        shown = {k: v for k, v in r.items() if k not in ("config", "what")}
        print(f"{r['config']:<7} {r['what']:<58} {json.dumps(shown)[:160]}")
    return 1 if any("error" in r for r in RESULTS) else 0


if __name__ == "__main__":
    sys.exit(main())
