"""Prompt tuning against prefix tuning (deep prompts), side by side on the embedded model.

On both bundled sets (role prompts, quotes), each trained with the same epochs, batch size and
data, evaluated on the bundled held-out texts:

  - prompt, 8 virtual tokens (softprompt's default; 4,608 parameters on the embedded model);
  - prefix, 8 virtual tokens, started from the model's own keys/values (``--init vocab``):
    about the same training time;
  - at equal parameter count: prompt with 20 virtual tokens against prefix with 1 (11,520 each:
    a prefix token is 30 layers x 2 x 3 key/value heads x 64);
  - prefix, 8 virtual tokens, PEFT's start (N(0, 1) noise, ``--init random`` without the scale).

Prints one JSON line per run (held-out loss before and after, seconds, parameters), the ratios
the README quotes, and a few greedy generations of each adapter.

Run: .venv/bin/python benchmarks/bench_prefix.py [--epochs 2] [--prefix-lr 0.01]
"""

from __future__ import annotations

import argparse
import json

import torch

from softprompt.data import load_texts
from softprompt.models import load_base_model
from softprompt.prompt import SoftPromptModel
from softprompt.rows import fitting_length
from softprompt.tuning.init import init_prefix, init_prompt
from softprompt.tuning.train import TrainConfig, train

SETS = {"roles": "examples:role-prompts", "quotes": "examples:quotes"}
PROMPTS = {
    "roles": ["I want you to act as a travel guide.", "I want you to act as a chef."],
    "quotes": ["Courage is", "The best way to"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--prompt-lr", type=float, default=3e-2)
    parser.add_argument("--prefix-lr", type=float, default=1e-2)
    parser.add_argument("--sets", nargs="+", default=list(SETS))
    parser.add_argument("--skip-noise", action="store_true", help="leave out PEFT's N(0, 1) start")
    args = parser.parse_args()
    import transformers

    transformers.utils.logging.set_verbosity_error()
    spm = SoftPromptModel(load_base_model())
    runs = [("prompt", 8, "vocab"), ("prefix", 8, "vocab"), ("prompt", 20, "vocab")]
    runs += [("prefix", 1, "vocab")] + ([] if args.skip_noise else [("prefix", 8, "noise")])
    results: dict[tuple[str, str, int, str], dict] = {}
    from softprompt.engine import Engine, EngineConfig, SamplingParams

    for set_name in args.sets:
        texts = load_texts(SETS[set_name]).texts
        held = load_texts(SETS[set_name] + ":heldout").texts
        for method, n, init in runs:
            name = f"{set_name}-{method}-{n}-{init}"
            if method == "prompt":
                start = init_prompt(spm.base, n, init, seed=0)
            elif init == "noise":
                start = torch.randn(
                    n, spm.prefix_shape.width, generator=torch.Generator().manual_seed(0)
                )
            else:
                start = init_prefix(spm.base, n, init, seed=0)
            config = TrainConfig(
                virtual_tokens=n,
                method=method,
                reparam="none",  # as the figures in the docs were measured
                epochs=args.epochs,
                lr=args.prompt_lr if method == "prompt" else args.prefix_lr,
                max_length=fitting_length(spm, texts),
            )
            result = train(spm, name, start, texts, held, config, progress=False)
            engine = Engine.from_softprompt(spm, EngineConfig(max_batch_size=4))
            outs = engine.generate(
                PROMPTS[set_name],
                [name] * 2,
                SamplingParams(max_new_tokens=24, repetition_penalty=1.2),
            )
            line = {
                "set": set_name,
                "method": method,
                "virtual_tokens": n,
                "init": init,
                "lr": config.lr,
                "params": result.trainable_params,
                "heldout_before": round(result.loss_before, 4),
                "heldout_after": round(result.loss_after, 4),
                "train_seconds": result.evals[-1]["train_seconds"],
                "generations": [
                    p + " ->" + o.text for p, o in zip(PROMPTS[set_name], outs, strict=True)
                ],
            }
            results[(set_name, method, n, init)] = line
            print(json.dumps(line), flush=True)
            spm.remove_adapter(name)
        from softprompt.insight.evaluate import evaluate

        base_loss = evaluate(spm, held, None).loss
        prompt8 = results[(set_name, "prompt", 8, "vocab")]
        prefix8 = results[(set_name, "prefix", 8, "vocab")]
        print(
            json.dumps(
                {
                    "set": set_name,
                    "base_model_heldout": round(base_loss, 4),
                    "prefix8_over_prompt8": round(
                        prefix8["heldout_after"] / prompt8["heldout_after"], 3
                    ),
                    "prefix1_over_prompt20": round(
                        results[(set_name, "prefix", 1, "vocab")]["heldout_after"]
                        / results[(set_name, "prompt", 20, "vocab")]["heldout_after"],
                        3,
                    ),
                    "time_prefix8_over_prompt8": round(
                        prefix8["train_seconds"] / prompt8["train_seconds"], 2
                    ),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
