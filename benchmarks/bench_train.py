"""Training, side by side on the embedded model: the guide's recipe against ``softprompt train``.

(1) The guide's recipe, as it writes it: PEFT ``get_peft_model`` (prompt tuning, RANDOM init, 4
    virtual tokens) + transformers ``Trainer`` (lr 3e-3, 6 epochs, batch 8, its default linear
    schedule) + ``DataCollatorForLanguageModeling``, on the bundled role prompts; and the same
    recipe started from softprompt's starting rows (vocabulary rows, the scale the model expects).
    Against it, ``softprompt train`` with the same virtual tokens, batch size, epochs and starting
    rows (its own lr, 3e-2), evaluated every few steps: training tokens/s, and seconds of
    training until its held-out loss reaches each recipe's final held-out loss. Every held-out
    loss is softprompt's ``evaluate`` on the bundled held-out role prompts.
    Then tokens/s alone: one epoch of each, alternating, best of two each.
(2) Training tokens/s as a fraction of forward-only tokens/s on the same batches.
(3) Several prompts in one run (``train_tasks``: role prompts and quotes sharing batches)
    against training them one after the other.
(4) Long texts: seconds per epoch and tokens/s at ``--max-length`` 64 (texts cut) and at the
    default (what the longest text needs, up to 256).

Run: .venv/bin/python benchmarks/bench_train.py [--epochs 6] [--skip PART] (PART: recipe,
throughput, forward, tasks, long; the first softprompt run always runs)
Prints one JSON line per part. Tokens/s count text tokens only, the same for both ways: no
padding, no virtual tokens, and not the EOS softprompt also trains on each row.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time

import torch

from softprompt.adapters import Adapter
from softprompt.data import load_texts
from softprompt.insight.evaluate import evaluate
from softprompt.models import load_base_model
from softprompt.prompt import SoftPromptModel
from softprompt.rows import batch_loss, fitting_length, training_rows
from softprompt.tuning.init import init_prompt
from softprompt.tuning.train import Task, TrainConfig, length_grouped_batches, train, train_tasks

VIRTUAL = 4
BATCH = 8


def emit(part: str, **fields: object) -> dict:
    line = {"part": part, **fields}
    print(json.dumps(line), flush=True)
    return line


def text_tokens(tokenizer, texts: list[str]) -> int:
    return sum(len(ids) for ids in tokenizer(texts)["input_ids"])


def recipe(texts: list[str], held: list[str], epochs: int, rows: torch.Tensor | None) -> dict:
    """The guide's PEFT + Trainer recipe; ``rows`` replaces its RANDOM starting rows."""
    from datasets import Dataset
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    base = load_base_model()
    tokenizer = base.tokenizer
    config = PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        prompt_tuning_init=PromptTuningInit.RANDOM,
        num_virtual_tokens=VIRTUAL,
        tokenizer_name_or_path=base.name,
    )
    model = get_peft_model(base.model, config)
    if rows is not None:
        with torch.no_grad():
            model.prompt_encoder["default"].embedding.weight.copy_(rows)
    data = Dataset.from_dict({"prompt": texts}).map(
        lambda batch: tokenizer(batch["prompt"]), batched=True, remove_columns=["prompt"]
    )
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            learning_rate=3e-3,
            num_train_epochs=epochs,
            per_device_train_batch_size=BATCH,
            use_cpu=True,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            seed=0,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=data,
            data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        )
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    trained = model.get_prompt_embedding_to_save(adapter_name="default").detach().float()
    spm = SoftPromptModel(load_base_model())
    spm.add_adapter(Adapter("recipe", trained))
    loss = evaluate(spm, held, "recipe", batch_size=16).loss
    tokens = text_tokens(tokenizer, texts) * epochs
    return {"seconds": seconds, "tokens_per_s": tokens / seconds, "heldout_loss": loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip", action="append", default=[])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--eval-every", type=int, default=4)
    parser.add_argument("--task-epochs", type=int, default=2)
    args = parser.parse_args()
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    texts = load_texts("examples:role-prompts").texts
    held = load_texts("examples:role-prompts:heldout").texts
    spm = SoftPromptModel(load_base_model())
    start_rows = init_prompt(spm.base, VIRTUAL, "vocab", seed=0)

    # softprompt train: same virtual tokens, batch, epochs and starting rows as the recipe.
    config = TrainConfig(
        virtual_tokens=VIRTUAL,
        epochs=args.epochs,
        batch_size=BATCH,
        eval_every=args.eval_every,
        max_length=fitting_length(spm, texts),
    )
    # The recipe's count for both (softprompt also trains each row's EOS: it is not counted).
    our_tokens = text_tokens(spm.tokenizer, texts)
    if "recipe" not in args.skip:
        ours = train(spm, "ours", start_rows.clone(), texts, held, config, progress=False)
        stepping = ours.evals[-1]["train_seconds"]
        ours_line = emit(
            "softprompt",
            seconds_training=stepping,
            seconds_with_evals=ours.seconds,
            tokens_per_s=our_tokens * args.epochs / stepping,
            heldout_loss_before=ours.loss_before,
            heldout_loss_final=ours.evals[-1]["loss"],
            heldout_loss_best=ours.loss_after,
            curve=[(e["train_seconds"], round(e["loss"], 4)) for e in ours.evals],
        )

        def time_to(loss: float) -> float | None:
            return next((e["train_seconds"] for e in ours.evals if e["loss"] <= loss), None)

        for label, rows in (("recipe_random_init", None), ("recipe_vocab_init", start_rows)):
            r = recipe(texts, held, args.epochs, rows)
            reach = time_to(r["heldout_loss"])
            emit(
                label,
                **r,
                softprompt_seconds_to_its_final_loss=reach,
                time_ratio=None if reach is None else reach / r["seconds"],
                tokens_per_s_ratio=ours_line["tokens_per_s"] / r["tokens_per_s"],
            )

    if "throughput" not in args.skip:
        # Tokens/s alone, side by side: one epoch of each, alternating, best of two each (the
        # 6-epoch runs above are minutes apart, and this machine's speed drifts between them).
        one = TrainConfig(
            virtual_tokens=VIRTUAL,
            epochs=1,
            batch_size=BATCH,
            eval_every=10**9,
            max_length=config.max_length,
        )
        best = {"recipe": 0.0, "softprompt": 0.0}
        for turn in range(2):
            r = recipe(texts, held, 1, start_rows)
            best["recipe"] = max(best["recipe"], r["tokens_per_s"])
            res = train(spm, f"epoch-{turn}", start_rows.clone(), texts, held, one, progress=False)
            best["softprompt"] = max(best["softprompt"], our_tokens / res.seconds)
            spm.remove_adapter(f"epoch-{turn}")
        emit(
            "throughput",
            recipe_tokens_per_s=best["recipe"],
            softprompt_tokens_per_s=best["softprompt"],
            ratio=best["softprompt"] / best["recipe"],
        )

    if "forward" not in args.skip:
        param = spm.add_adapter(Adapter("probe", start_rows.clone()), trainable=True)
        rows, _ = training_rows(spm, texts, "probe", config.max_length)
        batches = length_grouped_batches(rows, BATCH, random.Random(0))
        optimizer = torch.optim.AdamW([param], lr=3e-2)
        timings = {}
        for mode in ("forward", "train", "forward", "train"):  # alternating, best of 2
            start = time.perf_counter()
            for batch in batches:
                if mode == "forward":
                    with torch.no_grad():
                        batch_loss(spm, batch, skip_first=False)
                else:
                    total, count = batch_loss(spm, batch, skip_first=False)
                    optimizer.zero_grad(set_to_none=True)
                    (total / count).backward()
                    optimizer.step()
            seconds = time.perf_counter() - start
            timings[mode] = min(seconds, timings.get(mode, float("inf")))
        tokens = sum(len(ids) - n for ids, n in rows)
        emit(
            "forward_only",
            forward_tokens_per_s=tokens / timings["forward"],
            train_tokens_per_s=tokens / timings["train"],
            train_fraction_of_forward=timings["forward"] / timings["train"],
        )

    if "tasks" not in args.skip:
        quotes = load_texts("examples:quotes").texts
        quotes_held = load_texts("examples:quotes:heldout").texts
        task_config = TrainConfig(
            epochs=args.task_epochs, max_length=fitting_length(spm, texts + quotes)
        )
        inits = [init_prompt(spm.base, 8, "vocab", seed=0)] * 2
        start = time.perf_counter()
        one_by_one = [
            train(spm, f"{name}-alone", rows.clone(), t, h, task_config, progress=False)
            for name, rows, t, h in zip(
                ("roles", "quotes"), inits, (texts, quotes), (held, quotes_held), strict=True
            )
        ]
        alone_s = time.perf_counter() - start
        start = time.perf_counter()
        together = train_tasks(
            spm,
            [
                Task("roles-together", inits[0].clone(), texts, held),
                Task("quotes-together", inits[1].clone(), quotes, quotes_held),
            ],
            task_config,
            progress=False,
        )
        together_s = time.perf_counter() - start
        emit(
            "tasks",
            epochs=args.task_epochs,
            one_after_the_other_s=alone_s,
            one_run_s=together_s,
            speedup=alone_s / together_s,
            heldout_alone=[r.loss_after for r in one_by_one],
            heldout_together=[r.loss_after for r in together],
            heldout_before=[r.loss_before for r in one_by_one],
        )

    if "long" not in args.skip:
        # Long texts like the guide's own dataset's: several role prompts joined.
        rng = random.Random(0)
        long_texts = [" ".join(rng.sample(texts, rng.randint(2, 8))) for _ in range(48)]
        lengths = [len(ids) for ids in spm.tokenizer(long_texts)["input_ids"]]
        for max_length in (64, fitting_length(spm, long_texts)):
            cfg = TrainConfig(epochs=1, max_length=max_length, eval_every=10**9)
            result = train(
                spm,
                f"long-{max_length}",
                init_prompt(spm.base, 8, "vocab", seed=0),
                long_texts,
                long_texts[:8],
                cfg,
                progress=False,
            )
            rows, cut = training_rows(spm, long_texts, f"long-{max_length}", max_length)
            tokens = sum(len(ids) - n for ids, n, _ in rows)
            emit(
                "long_texts",
                max_length=max_length,
                text_tokens_median=sorted(lengths)[len(lengths) // 2],
                text_tokens_max=max(lengths),
                texts_cut=cut,
                tokens_trained=tokens,
                seconds=result.seconds,
                tokens_per_s=tokens / result.seconds,
            )


if __name__ == "__main__":
    main()
