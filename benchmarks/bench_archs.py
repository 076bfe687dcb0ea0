"""The engine's lean forward across decoder families at equal sizes, against the Llama path.

Every family gets a random-weight model with exactly the embedded model's sizes (SmolLM2-135M:
30 layers, hidden 576, 9 query and 3 key/value heads of 64, MLP 1,536, vocabulary 49,152, tied
embeddings), so each does the same arithmetic per token up to what the family adds (Qwen's q/k/v
bias, Qwen3's and Gemma 3's q/k norms, Gemma's extra norms, GeGLU and soft caps, the windows).
The same requests run on each: ``--requests`` short prompts (bundled texts, 12 words), half with
one of 8 adapters of 20 virtual tokens, ``--new-tokens`` new tokens each, greedy, end of sequence
ignored, float32. Two ways per family: the engine on its lean forward (``lean.py``), and on
transformers' own forward (``EngineConfig(lean_forward=False)``, the path every family but
Llama took before ``families.py``). Rounds alternate the order of the families, so every one
meets the machine's drift alike; each figure is the median of the rounds.

Run: .venv/bin/python benchmarks/bench_archs.py [--rounds 3] [--families llama qwen2 ...]
Prints one JSON object per run, then the table (tok/s, and each family against Llama's lean
forward measured in the same rounds).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import time
from pathlib import Path

import torch

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3"]


def emit(record: dict) -> dict:
    print(json.dumps(record), flush=True)
    return record


def sized(family: str, base) -> torch.nn.Module:
    """A random-weight ``family`` model with the sizes of the Llama config ``base``."""
    import transformers as tf

    common = dict(
        vocab_size=base.vocab_size,
        hidden_size=base.hidden_size,
        intermediate_size=base.intermediate_size,
        num_hidden_layers=base.num_hidden_layers,
        num_attention_heads=base.num_attention_heads,
        num_key_value_heads=base.num_key_value_heads,
        max_position_embeddings=base.max_position_embeddings,
        tie_word_embeddings=True,
        eos_token_id=base.eos_token_id,
        bos_token_id=base.bos_token_id,
        pad_token_id=base.pad_token_id,
    )
    dim = base.hidden_size // base.num_attention_heads
    classes = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {"sliding_window": 4096}),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {"head_dim": dim}),
        "gemma2": (
            tf.Gemma2Config,
            tf.Gemma2ForCausalLM,
            {"head_dim": dim, "query_pre_attn_scalar": dim, "sliding_window": 4096},
        ),
        "gemma3_text": (
            tf.Gemma3TextConfig,
            tf.Gemma3ForCausalLM,
            {"head_dim": dim, "query_pre_attn_scalar": dim},
        ),
        "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, {"sliding_window": 2047}),
    }
    config_cls, model_cls, extra = classes[family]
    torch.manual_seed(0)
    return model_cls(config_cls(**common, **extra)).eval()


def workload(tokenizer, count: int, hidden: int):
    """``count`` (prompt ids, adapter) pairs and the 8 adapters' rows."""
    from softprompt.data import load_texts

    texts = load_texts("examples:role-prompts").texts + load_texts("examples:quotes").texts
    random.Random(0).shuffle(texts)
    generator = torch.Generator().manual_seed(0)
    adapters = {f"a{i}": torch.randn(20, hidden, generator=generator) * 0.05 for i in range(8)}
    names = list(adapters)
    requests = []
    for i in range(count):
        prompt = " ".join(texts[i % len(texts)].split()[:12])
        adapter = names[(i // 2) % len(names)] if i % 2 else None
        requests.append((tokenizer(prompt)["input_ids"], adapter))
    return requests, adapters


def run(model, tokenizer, requests, adapters, new_tokens: int, batch: int, lean: bool) -> dict:
    """One engine over the requests, all submitted at once; seconds of the timed run."""
    from softprompt.adapters import Adapter
    from softprompt.engine import Engine, EngineConfig, SamplingParams

    engine = Engine(model, tokenizer, EngineConfig(max_batch_size=batch, lean_forward=lean))
    assert (engine.runner.lean is not None) == lean
    for name, rows in adapters.items():
        engine.add_adapter(name, Adapter(name, rows))
    engine.generate([requests[0][0]], [None], SamplingParams(max_new_tokens=2))  # warm-up
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    done = engine.generate([r for r, _ in requests], [a for _, a in requests], params)
    seconds = time.perf_counter() - start
    assert all(len(c.token_ids) == new_tokens for c in done)
    path = engine.runner.decode_path.summary() if engine.runner.decode_path else None
    del engine
    gc.collect()
    return {"seconds": seconds, "decode_path": path}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=FAMILIES, choices=FAMILIES)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--skip-transformers", action="store_true", help="time the lean forward only"
    )
    args = parser.parse_args()
    from transformers import AutoConfig, AutoTokenizer

    from softprompt.models import embedded_model_dir

    folder = embedded_model_dir()
    base = AutoConfig.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    families = list(dict.fromkeys(["llama", *args.families]))
    models = {f: sized(f, base) for f in families}
    requests, adapters = workload(tokenizer, args.requests, base.hidden_size)
    emit({"machine": _cpu(), "torch": torch.__version__, "threads": torch.get_num_threads(),
          "requests": len(requests), "new_tokens": args.new_tokens})  # fmt: skip
    ways = [True] if args.skip_transformers else [True, False]
    seconds: dict[tuple[str, bool], list[float]] = {(f, w): [] for f in families for w in ways}
    for index in range(args.rounds):
        shift = index % len(families)
        for family in families[shift:] + families[:shift]:
            for lean in ways if index % 2 == 0 else ways[::-1]:
                record = run(
                    models[family], tokenizer, requests, adapters, args.new_tokens,
                    args.batch_size, lean,
                )  # fmt: skip
                seconds[(family, lean)].append(record["seconds"])
                emit({"round": index, "family": family,
                      "path": "lean" if lean else "transformers",
                      "tok_s": round(len(requests) * args.new_tokens / record["seconds"], 1),
                      "decode_path": record["decode_path"]})  # fmt: skip
    tokens = len(requests) * args.new_tokens
    llama = [tokens / s for s in seconds[("llama", True)]]
    print(
        "\n| family | lean tok/s (rounds) | against Llama's lean path "
        "| transformers' forward tok/s | lean / transformers |"
    )
    print("|---|---|---:|---:|---:|")
    for family in families:
        lean = [tokens / s for s in seconds[(family, True)]]
        ratios = [mine / theirs for mine, theirs in zip(lean, llama, strict=True)]
        row = [
            family,
            f"{statistics.median(lean):.0f} ({', '.join(f'{x:.0f}' for x in lean)})",
            f"{statistics.median(ratios):.2f}",
        ]
        if not args.skip_transformers:
            slow = [tokens / s for s in seconds[(family, False)]]
            gains = [a / b for a, b in zip(lean, slow, strict=True)]
            row += [f"{statistics.median(slow):.0f}", f"{statistics.median(gains):.2f}"]
        else:
            row += ["", ""]
        print("| " + " | ".join(row) + " |")
        emit({"family": family, "lean_tok_s": [round(x, 1) for x in lean],
              "against_llama_median": round(statistics.median(ratios), 3)})  # fmt: skip


def _cpu() -> str:
    """The CPU's name, family and model (a name alone does not tell Zen 4 from Zen 5)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        return "unknown"
    name = fields.get("model name", "unknown")
    return f"{name} (family {fields.get('cpu family')}, model {fields.get('model')})"


if __name__ == "__main__":
    main()
