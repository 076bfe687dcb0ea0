"""softprompt's prompt tuning against PEFT's, started alike: are the two training loops the same?

``bench_tasks.py`` found softprompt's 8-token prompt behind PEFT's on ``examples:routing`` (0.67 and
0.54 against 0.84, different seeds). The runs differed in more than the code: the starting rows
(both sample vocabulary rows, from different generators), the batches (softprompt groups rows of
similar length; the PEFT loop draws them at random) and which rows are kept (softprompt keeps the
best held-out evaluation, the PEFT loop its last step). This script takes those apart:

  1. steps: the same starting rows and the same batches, ``--steps`` AdamW steps of each loop
     (softprompt's ``task_losses``, PEFT's ``PeftModel`` forward with ``labels``); prints each
     step's loss side by side and the largest difference in the rows after them.
  2. accuracy (``--epochs``, default 5): held-out accuracy (rank classification, as ``eval
     --metric choice``) of
       a. the PEFT loop,                               random batches, last rows;
       b. softprompt's step on the same random batches, last rows;
       c. ``softprompt train``'s own loop (``train_tasks``: length-grouped batches, best rows),
     all from the same starting rows (``--seed``).

Run: .venv/bin/python benchmarks/bench_pt_parity.py [--seed 0] [--steps 10] [--skip accuracy]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from softprompt.adapters import Adapter
from softprompt.data import load_texts
from softprompt.insight.scoring import choice_accuracy, task_rows
from softprompt.layout import example_layout
from softprompt.models import load_base_model
from softprompt.prompt import SoftPromptModel
from softprompt.tuning.config import Task, TrainConfig
from softprompt.tuning.init import init_prompt
from softprompt.tuning.train import task_losses, train_tasks

SET = "routing"
LR = 3e-2


def batches(count: int, batch_size: int, epochs: int, seed: int) -> list[list[int]]:
    """Random batches of row indices, epoch after epoch (the PEFT loop's order)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(epochs):
        order = torch.randperm(count, generator=generator).tolist()
        out += [order[at : at + batch_size] for at in range(0, count, batch_size)]
    return out


class PeftLoop:
    def __init__(self, spm: SoftPromptModel, start: torch.Tensor) -> None:
        from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

        config = PromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=start.shape[0],
            prompt_tuning_init=PromptTuningInit.RANDOM,
        )
        self.model = get_peft_model(spm.model, config)
        with torch.no_grad():
            self.model.prompt_encoder["default"].embedding.weight.copy_(start)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=LR, weight_decay=0.0)
        self.pad = spm.tokenizer.eos_token_id

    def step(self, layouts: list) -> float:
        width = max(len(b.ids) for b in layouts)
        ids = torch.tensor([b.ids + [self.pad] * (width - len(b.ids)) for b in layouts])
        mask = torch.tensor([[1] * len(b.ids) + [0] * (width - len(b.ids)) for b in layouts])
        labels = torch.tensor(
            [
                [t if s else -100 for t, s in zip(b.ids, b.scored, strict=True)]
                + [-100] * (width - len(b.ids))
                for b in layouts
            ]
        )
        self.model.train()
        loss = self.model(input_ids=ids, attention_mask=mask, labels=labels).loss
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return float(loss)

    def rows(self) -> torch.Tensor:
        return self.model.prompt_encoder["default"].embedding.weight.detach().clone()

    def remove(self) -> None:
        """Back to the base model alone: prompt tuning adds no layers to it, so dropping the
        wrapper is enough; eval mode as softprompt runs it."""
        self.model.base_model.eval()


class OursLoop:
    def __init__(self, spm: SoftPromptModel, start: torch.Tensor, name: str) -> None:
        self.spm, self.name = spm, name
        self.param = spm.add_adapter(Adapter(name, start.clone()), trainable=True)
        self.optimizer = torch.optim.AdamW([self.param], lr=LR, weight_decay=0.0)
        self.virtual = spm.virtual_ids(name)

    def step(self, layouts: list) -> float:
        rows = [(self.virtual + b.ids, len(self.virtual), b.scored, 0) for b in layouts]
        totals, counts = task_losses(self.spm, rows, 1)
        loss = (totals / counts).sum()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return float(loss)

    def rows(self) -> torch.Tensor:
        return self.param.detach().clone()


def accuracy_of(spm: SoftPromptModel, rows: torch.Tensor, name: str, heldout) -> float:
    if name in spm.adapters:
        spm.remove_adapter(name)
    spm.add_adapter(Adapter(name, rows.clone()))
    result = choice_accuracy(spm, heldout, name, SET)
    spm.remove_adapter(name)
    return result.accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--virtual-tokens", type=int, default=8)
    parser.add_argument("--skip", action="append", default=[], help="steps or accuracy")
    parser.add_argument(
        "--start", choices=["softprompt", "peft"], default="softprompt",
        help="starting rows: softprompt's --init vocab draw for --seed, or the rows PEFT's "
        "SAMPLE_VOCAB draws in bench_tasks.py's PEFT run of that seed",
    )  # fmt: skip
    parser.add_argument(
        "--ways", default="abc", help="which of the accuracy runs a, b, c to make (default: all)"
    )
    args = parser.parse_args()
    import transformers

    transformers.utils.logging.set_verbosity_error()
    base = load_base_model()
    spm = SoftPromptModel(base)
    examples = load_texts(f"examples:{SET}").examples
    heldout = task_rows(load_texts(f"examples:{SET}:heldout").examples)
    layouts = [example_layout(spm.tokenizer, e, 256) for e in examples]
    if args.start == "peft":
        start = peft_start(args.seed, args.virtual_tokens)
    else:
        start = init_prompt(base, args.virtual_tokens, "vocab", seed=args.seed)
    order = batches(len(layouts), args.batch_size, args.epochs, args.seed)

    if "steps" not in args.skip:
        peft, theirs = PeftLoop(spm, start), []
        for batch in order[: args.steps]:
            theirs.append(peft.step([layouts[i] for i in batch]))
        peft_rows = peft.rows()
        peft.remove()
        ours, mine = OursLoop(spm, start, "parity"), []
        for batch in order[: args.steps]:
            mine.append(ours.step([layouts[i] for i in batch]))
        diff = float((ours.rows() - peft_rows).abs().max())
        spm.remove_adapter("parity")
        for step, (a, b) in enumerate(zip(theirs, mine, strict=True), 1):
            print(
                json.dumps({"step": step, "peft_loss": round(a, 6), "softprompt_loss": round(b, 6)})
            )
        print(json.dumps({"steps": args.steps, "max_row_difference": diff}), flush=True)

    if "accuracy" in args.skip:
        return
    table = []
    if "a" in args.ways:
        began = time.perf_counter()
        peft = PeftLoop(spm, start)
        for batch in order:
            peft.step([layouts[i] for i in batch])
        rows = peft.rows()
        peft.remove()
        accuracy = accuracy_of(spm, rows, "a", heldout)
        way = "a. PEFT loop, random batches, last rows"
        table.append((way, accuracy, time.perf_counter() - began))
        print(json.dumps({"way": table[-1][0], "accuracy": table[-1][1]}), flush=True)
    if "b" in args.ways:
        began = time.perf_counter()
        ours = OursLoop(spm, start, "b")
        for batch in order:
            ours.step([layouts[i] for i in batch])
        rows = ours.rows()
        spm.remove_adapter("b")
        accuracy = accuracy_of(spm, rows, "b", heldout)
        way = "b. softprompt step, the same random batches, last rows"
        table.append((way, accuracy, time.perf_counter() - began))
        print(json.dumps({"way": table[-1][0], "accuracy": table[-1][1]}), flush=True)
    if "c" not in args.ways:
        print_table(args, table)
        return
    began = time.perf_counter()
    config = TrainConfig(
        virtual_tokens=args.virtual_tokens, epochs=args.epochs, batch_size=args.batch_size,
        lr=LR, seed=args.seed, max_length=256, group_by_length=True, weight_decay=0.0,
        reparam="none",
    )  # fmt: skip
    heldout_texts = load_texts(f"examples:{SET}:heldout").examples
    train_tasks(spm, [Task("c", start.clone(), examples, heldout_texts)], config, progress=False)
    rows = spm.adapter_weights("c")
    spm.remove_adapter("c")
    table.append(("c. softprompt train (length-grouped batches, best held-out rows)",
                  accuracy_of(spm, rows, "c", heldout), time.perf_counter() - began))  # fmt: skip
    print(json.dumps({"way": table[-1][0], "accuracy": table[-1][1]}), flush=True)
    print_table(args, table)


def print_table(args: argparse.Namespace, table: list) -> None:
    print()
    print(f"seed {args.seed} ({args.start}'s start), {args.epochs} epochs, "
          f"batch {args.batch_size}, lr {LR}")  # fmt: skip
    print("| way | held-out accuracy | seconds |")
    print("|---|---:|---:|")
    for way, acc, seconds in table:
        print(f"| {way} | {acc:.2f} | {seconds:.0f} |")


def peft_start(seed: int, virtual_tokens: int) -> torch.Tensor:
    """The rows PEFT's SAMPLE_VOCAB draws in ``bench_tasks.py``'s PEFT prompt run of ``seed``
    (the same calls in the same order, so the same random numbers)."""
    from peft import PromptTuningConfig, PromptTuningInit, get_peft_model
    from transformers import AutoModelForCausalLM

    from softprompt.models import embedded_model_dir

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(embedded_model_dir(), dtype=torch.float32)
    config = PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=virtual_tokens,
        prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB,
    )
    peft = get_peft_model(model, config)
    return peft.prompt_encoder["default"].embedding.weight.detach().clone()


if __name__ == "__main__":
    main()
