"""Task tuning side by side, over the task suite: softprompt's prompts against the base
model's baselines and PEFT, each trained method once per seed.

The suite (``make_task_sets.py``; ``suite_sets.py`` describes the new sets), each judged on its
held-out part:

  routing, shelving (classification by opaque codes, 4 and 5 labels): rank-classification
  accuracy (``softprompt eval --metric choice``);
  booking (a reference among other codes), initials (a phrase's initials): exact match of the
  greedy reply's first line (``--metric exact`` compares the whole reply; here every method,
  few-shot contexts included, is judged as a user with ``stop: ["\\n"]`` would see it);
  pirate (chat): the share of greedy replies that open "Arr, matey!", and of the single-fact
  questions, the share whose reply still names the right fact (the base model's knowledge kept);
  signoff (chat): the share of greedy replies of up to 160 tokens that end with the closing line.

``--sets unseen`` runs the two sets kept out of every choice (``benchmarks/data/unseen/``).

Methods:
  - the base model zero-shot, with an instruction, and with 4 and 8 examples in context
    (chat: as earlier turns), from the training part;
  - softprompt at the command's defaults with 8 virtual tokens (``softprompt defaults``: the
    method and settings ``train`` picks for the data); plain prompt tuning (``--reparam none``),
    8 and 20 virtual tokens, and prefix tuning, 8; prompt tuning through a residual MLP
    (``--reparam residual``); for classification also plain prompt and prefix started from the
    label words (``--init labels``);
  - PEFT prompt tuning, 8 virtual tokens, SAMPLE_VOCAB init, lr 0.03 (the guide's method);
  - PEFT LoRA r8 (alpha 16) on all linear layers, lr 1e-3.

softprompt runs go through the ``softprompt`` command as a user runs it: the set's training part
written to a file of their own, ``softprompt train --data FILE`` (so the command holds out 10%
of it to choose the rows kept; until 2026-12-04 this benchmark passed the training part as
``--eval-data`` instead), then the library's scoring. PEFT runs use a plain training loop over
the same rows and the same layouts (``softprompt.layout.example_layout``), keep the last rows,
and are scored by the same rules, one row at a time (a PEFT prompt model's replies generated
from its forward's inputs: ``peft_greedy`` says why).

Run: .venv/bin/python benchmarks/bench_tasks.py [--sets suite|unseen|NAME...] [--seeds 0 1 2]
Prints one JSON line per run, then a table per set and method (mean over seeds, the lowest seed,
the spread) and one per method over the sets (mean, the worst set, the worst seed anywhere).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from softprompt.adapters import load_adapter
from softprompt.data import Example, load_texts
from softprompt.engine import SamplingParams
from softprompt.generation import Request, generate
from softprompt.insight.scoring import (
    choice_accuracy,
    choice_scores,
    first_line,
    in_context,
    normalise,
    pattern_match,
    pick_shots,
    task_rows,
)
from softprompt.layout import example_layout, prompt_ids
from softprompt.models import embedded_model_dir, load_base_model
from softprompt.prompt import SoftPromptModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_task_sets import _qa  # noqa: E402  (the facts behind the pirate set)

UNSEEN = Path(__file__).resolve().parent / "data" / "unseen"


@dataclass(frozen=True)
class TaskSet:
    """How one set of the suite is judged (``make_task_sets.py`` writes the sets)."""

    metric: str
    """choice (rank classification), exact (greedy reply equals the reference) or pattern."""
    instruction: str
    pattern: str = ""
    max_new_tokens: int = 40
    unseen: bool = False
    """Kept out of every choice: only checks that the suite's choices carry over."""
    folder: Path | None = None
    """Where a generated family's task lives (``task_families.py``)."""

    def source(self, name: str, part: str = "train") -> str:
        if self.folder is not None:
            return str(self.folder / f"{name}.{part}.jsonl")
        if self.unseen:
            return str(UNSEEN / f"{name}.{part}.jsonl")
        return f"examples:{name}" + (":heldout" if part == "heldout" else "")


SETS = {
    "routing": TaskSet(
        "choice", "Teams: QX-17 billing, LM-04 delivery, VR-88 technical problems, TJ-31 privacy."
    ),
    "shelving": TaskSet(
        "choice",
        "Shelf codes: A-310 cooking, C-552 astronomy, F-118 gardening, H-904 sailing, P-276 chess.",
    ),
    "booking": TaskSet("exact", "Answer with the booking reference only.", max_new_tokens=12),
    "initials": TaskSet("exact", "Answer with the initials only, in capitals.", max_new_tokens=12),
    "pirate": TaskSet(
        "pattern",
        "You are a pirate. Begin every reply with 'Arr, matey!' and talk like a pirate.",
        pattern=r"^Arr, matey!",
    ),
    "signoff": TaskSet(
        "pattern",
        "End every answer with the line 'Stay curious! - Ms. Vega'.",
        pattern=r"Stay curious! - Ms\. Vega\s*$",
        max_new_tokens=160,
    ),
    "dispatch": TaskSet(
        "choice",
        "Depots: ZK-6 furniture, WD-2 groceries, QB-9 electronics repair, MT-4 garden, "
        "HV-7 pharmacy.",
        unseen=True,
    ),
    "closing": TaskSet(
        "pattern",
        "End every answer with the line 'Fair winds, the Harbour Desk'.",
        pattern=r"Fair winds, the Harbour Desk\s*$",
        max_new_tokens=160,
        unseen=True,
    ),
}
SUITE = [name for name, spec in SETS.items() if not spec.unseen]


def add_family(folder: Path) -> list[str]:
    """Register the tasks of a generated family (``task_families.py`` wrote ``folder``) as
    sets; returns their names."""
    described = json.loads((folder / "family.json").read_text())["tasks"]
    for name, spec in described.items():
        SETS[name] = TaskSet(
            spec["metric"],
            spec["instruction"],
            pattern=spec["pattern"],
            max_new_tokens=spec["max_new_tokens"],
            folder=folder,
        )
    return list(described)


NUMBERS = {
    "two": "2", "three": "3", "four": "4", "six": "6", "seven": "7", "eight": "8",
    "eleven": "11", "twelve": "12", "twenty-four": "24", "sixty": "60",
}  # fmt: skip


def softprompt_runs(set_name: str) -> list[tuple[str, list[str]]]:
    runs = [
        ("softprompt defaults", ["--virtual-tokens", "8"]),  # what train picks for the data
        (
            "softprompt prompt 8",
            ["--method", "prompt", "--virtual-tokens", "8", "--reparam", "none"],
        ),
        (
            "softprompt prompt 20",
            ["--method", "prompt", "--virtual-tokens", "20", "--reparam", "none"],
        ),
    ]
    runs.append(("softprompt prefix 8", ["--method", "prefix", "--virtual-tokens", "8"]))
    runs.append(
        ("softprompt prompt 8 residual", ["--virtual-tokens", "8", "--reparam", "residual"])
    )
    if SETS[set_name].metric == "choice":
        runs.append(
            ("softprompt prompt 8 labels", ["--method", "prompt", "--virtual-tokens", "8",
                                            "--init", "labels", "--reparam", "none"])
        )  # fmt: skip
        runs.append(
            ("softprompt prefix 8 labels", ["--method", "prefix", "--virtual-tokens", "8",
                                            "--init", "labels"])
        )  # fmt: skip
    return runs


def facts() -> dict[str, str]:
    """Single-fact question -> the word its answer must name (the pirate set's facts)."""
    out = {}
    for kind, question, answer in _qa():
        if kind == "advice":
            continue
        m = re.search(r" be (.+?)[,.]", answer) or re.search(r" (\w+), I've heard", answer)
        assert m, answer
        out[question] = m.group(1)
    return out


class Judge:
    """Scores any model the same way on one set's held-out rows."""

    def __init__(self, set_name: str) -> None:
        self.set_name = set_name
        self.spec = SETS[set_name]
        self.rows = task_rows(load_texts(self.spec.source(set_name, "heldout")).examples)
        self.pool = task_rows(load_texts(self.spec.source(set_name)).examples)
        self.facts = facts() if set_name == "pirate" else {}

    def contexts(self) -> list[tuple[str, list[Example]]]:
        out = [("base zero-shot", self.rows)]
        out.append(("base + instruction", in_context(self.rows, [], self.spec.instruction)))
        for k in (4, 8):
            shots = pick_shots(self.pool, k)
            out.append((f"base {k}-shot", in_context(self.rows, shots, None)))
        return out

    def hit(self, reply: str, row: Example) -> bool:
        if self.spec.metric == "exact":
            # The reply's first line, as a user with stop ["\n"] gets it: few-shot contexts
            # go on to the next example after a right answer.
            return first_line(reply) == normalise(row.completion)
        return re.search(self.spec.pattern, reply) is not None

    def replies_score(self, rows: list[Example], replies: list[str]) -> dict:
        hits = [self.hit(r, e) for r, e in zip(replies, rows, strict=True)]
        out = {"accuracy": sum(hits) / len(rows), "sample": replies[:2]}
        if self.facts:
            asked = [
                (r, e)
                for r, e in zip(replies, rows, strict=True)
                if e.messages[-1][1] in self.facts
            ]
            kept = [
                any(
                    f in r.lower()
                    for f in (self.facts[e.messages[-1][1]].lower(),)
                    + tuple(v for k, v in NUMBERS.items() if k == self.facts[e.messages[-1][1]])
                )
                for r, e in asked
            ]
            out.update(facts_kept=sum(kept) / len(kept), fact_questions=len(kept))
        return out

    def score_softprompt(self, spm: SoftPromptModel, rows: list[Example], adapter: str | None):
        spec = self.spec
        if spec.metric == "choice":
            result = choice_accuracy(spm, rows, adapter, self.set_name)
            return {"accuracy": result.accuracy, "accuracy_norm": result.accuracy_norm}
        if not self.facts and spec.metric == "pattern":
            result = pattern_match(
                spm, rows, adapter, spec.pattern, self.set_name, spec.max_new_tokens
            )
            return {"accuracy": result.accuracy, "sample": [m for m in result.misses[:2]]}
        params = SamplingParams(max_new_tokens=spec.max_new_tokens)
        requests = [
            Request(e.messages[-1][1] if e.messages else e.prompt, adapter, messages=e.messages)
            for e in rows
        ]
        return self.replies_score(rows, generate(spm, requests, params))

    def score_peft(self, model, tokenizer) -> dict:
        model.eval()
        if self.spec.metric == "choice":
            labels = list(dict.fromkeys(e.completion for e in self.pool))
            right = 0
            for e in self.rows:
                scores = [loglik(model, tokenizer, e, c) for c in labels]
                right += labels[max(range(len(labels)), key=scores.__getitem__)] == e.completion
            return {"accuracy": right / len(self.rows)}
        replies = [
            peft_greedy(model, tokenizer, prompt_ids(tokenizer, e), self.spec.max_new_tokens)
            for e in self.rows
        ]
        return self.replies_score(self.rows, replies)


def score_ensembles(judge: Judge, spm: SoftPromptModel, folders: list[Path]) -> list[dict]:
    """Prompt ensembles (``eval --ensemble``'s rule) of adapters trained on one choice set:
    every pair, and all of them when there are more than two, from one pass over the held-out
    rows per adapter (``choice_scores``).

    One record per group: the ensemble's accuracy, its members' and the best member's.
    """
    from itertools import combinations

    names = []
    for i, folder in enumerate(folders):
        adapter = load_adapter(folder, name=f"member{i}", hub=False)
        spm.add_adapter(adapter)
        names.append(adapter.name)
    try:
        scores = choice_scores(spm, judge.rows, names, judge.set_name)
    finally:
        for n in names:
            spm.remove_adapter(n)
    alone = [scores.accuracy([i]) for i in range(len(names))]
    groups = [list(c) for c in combinations(range(len(names)), 2)]
    if len(names) > 2:
        groups.append(list(range(len(names))))
    return [
        {"accuracy": scores.accuracy(group), "members": [alone[i] for i in group],
         "best_member": max(alone[i] for i in group),
         "folders": [str(folders[i]) for i in group]}
        for group in groups
    ]  # fmt: skip


def peft_greedy(model, tokenizer, ids: list[int], max_new_tokens: int) -> str:
    """A PEFT model's greedy reply to one prompt.

    LoRA goes through PEFT's ``generate``. A prompt-tuning model does not: under transformers 5
    (checked with peft 0.21.2, transformers 5.24) its cached ``generate`` stops after a few
    tokens with text unrelated to what the same model's forward predicts (the known class of
    PEFT issues 1391 and 2123). Its replies here are generated by the base model from the
    inputs PEFT's own forward builds: the virtual rows, then the prompt's token embeddings.
    """
    tensor = torch.tensor([ids])
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False,
              "pad_token_id": tokenizer.eos_token_id}  # fmt: skip
    with torch.no_grad():
        if not model.peft_config[model.active_adapter].is_prompt_learning:
            out = model.generate(input_ids=tensor, attention_mask=torch.ones_like(tensor), **kwargs)
            return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
        base = model.get_base_model()
        embeds = torch.cat([model.get_prompt(batch_size=1), base.get_input_embeddings()(tensor)], 1)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long)
        out = base.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
    return tokenizer.decode(out[0], skip_special_tokens=True)  # only new tokens from embeds


def loglik(model, tokenizer, example: Example, candidate: str) -> float:
    row = Example(completion=candidate, prompt=example.prompt, messages=example.messages)
    layout = example_layout(tokenizer, row, 512, eos=False)
    ids = torch.tensor([layout.ids])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
    logits = logits[-len(layout.ids) :].float().log_softmax(-1)  # PEFT prompts come first
    return sum(
        float(logits[i - 1, t])
        for i, (t, s) in enumerate(zip(layout.ids, layout.scored, strict=True))
        if s
    )


def train_peft(set_name: str, kind: str, epochs: int, batch_size: int, seed: int):
    """PEFT prompt tuning or LoRA on the set's training rows; returns (model, tokenizer, s)."""
    from peft import LoraConfig, PromptTuningConfig, PromptTuningInit, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    folder = embedded_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if kind == "prompt":
        config = PromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=8,
            prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB,
        )
        lr = 3e-2
    else:
        config = LoraConfig(
            task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"
        )
        lr = 1e-3
    model = get_peft_model(model, config)
    examples = load_texts(SETS[set_name].source(set_name)).examples
    layouts = [example_layout(tokenizer, e, 256) for e in examples]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(layouts), generator=generator).tolist()
        for at in range(0, len(order), batch_size):
            batch = [layouts[i] for i in order[at : at + batch_size]]
            width = max(len(b.ids) for b in batch)
            pad = tokenizer.eos_token_id
            # right padding: PEFT's virtual tokens go before the real tokens, as in its guide
            ids = torch.tensor([b.ids + [pad] * (width - len(b.ids)) for b in batch])
            mask = torch.tensor([[1] * len(b.ids) + [0] * (width - len(b.ids)) for b in batch])
            labels = torch.tensor(
                [
                    [t if s else -100 for t, s in zip(b.ids, b.scored, strict=True)]
                    + [-100] * (width - len(b.ids))
                    for b in batch
                ]
            )
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    seconds = time.perf_counter() - start
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, tokenizer, seconds, trainable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sets", nargs="+", default=["suite"],
        help="set names, or suite (the six sets defaults are chosen on) and unseen (the two "
        "kept to check them); default: suite",
    )  # fmt: skip
    parser.add_argument(
        "--family", type=Path, metavar="FOLDER",
        help="a generated family of tasks (task_families.py wrote FOLDER): its tasks become "
        "sets, named in --sets or all of them when --sets is not given",
    )  # fmt: skip
    parser.add_argument(
        "--epochs", type=int,
        help="epochs of every run (default: softprompt train's own, decided by the data; 5 "
        "for the PEFT runs)",
    )  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--skip", nargs="*", default=[], help="run names to leave out")
    parser.add_argument(
        "--only", nargs="*", default=[], help="run names to keep (default: every run)"
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0],
        help="train each method once per seed; the table gives each run's mean (default: 0)",
    )  # fmt: skip
    parser.add_argument(
        "--train-flags", default="",
        help="more flags for every softprompt train run, as one string after = (e.g. "
        "--train-flags=--no-group-by-length); written in each run's record",
    )  # fmt: skip
    parser.add_argument("--work", help="folder for the adapters (default: a temporary one)")
    parser.add_argument(
        "--ensemble-of", nargs="+", metavar="ADAPTER", type=Path,
        help="train nothing: score these adapters, trained on the one choice set --sets names, "
        "as prompt ensembles (each pair, and all of them), records named by --ensemble-run and "
        "the group's size",
    )  # fmt: skip
    parser.add_argument(
        "--ensemble-run", default="ensemble", help="the run name --ensemble-of's records carry"
    )
    parser.add_argument(
        "--tables-from", nargs="+", metavar="LOG",
        help="train nothing: print the tables of the records (JSON lines) in these logs, a run "
        "with --train-flags named apart",
    )  # fmt: skip
    args = parser.parse_args()
    family = add_family(args.family) if args.family else []
    if family and args.sets == ["suite"]:
        args.sets = family
    if args.tables_from:
        records = []
        for log in args.tables_from:
            for line in Path(log).read_text().splitlines():
                if line.startswith("{"):
                    record = json.loads(line)
                    if record.get("train_flags"):
                        record["run"] += f" ({record['train_flags']})"
                    records.append(record)
        print_table(records)
        return
    import transformers

    transformers.utils.logging.set_verbosity_error()
    if args.ensemble_of:
        if len(args.sets) != 1 or args.sets[0] not in SETS or SETS[args.sets[0]].metric != "choice":
            parser.error("--ensemble-of needs --sets with one choice set")
        if len(args.ensemble_of) < 2:
            parser.error("--ensemble-of needs at least two adapters")
        judge = Judge(args.sets[0])
        spm = SoftPromptModel(load_base_model())
        for record in score_ensembles(judge, spm, args.ensemble_of):
            run = f"{args.ensemble_run} of {len(record['members'])}"
            print(json.dumps({"set": judge.set_name, "run": run, **record}))
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-tasks-"))
    softprompt = Path(sys.executable).with_name("softprompt")
    table = []

    def emit(record: dict) -> None:
        print(json.dumps(record), flush=True)
        table.append(record)

    def wanted(name: str) -> bool:
        return name not in args.skip and (not args.only or name in args.only)

    names = []
    for name in args.sets:
        if name == "suite":
            names += SUITE
        elif name == "unseen":
            names += [n for n, spec in SETS.items() if spec.unseen]
        elif name in SETS:
            names.append(name)
        else:
            parser.error(f"unknown set {name!r}; choose from suite, unseen, {', '.join(SETS)}")
    for set_name in names:
        judge = Judge(set_name)
        train_file = work / f"{set_name}.train.jsonl"
        train_file.parent.mkdir(parents=True, exist_ok=True)
        rows = [e.as_json() for e in load_texts(SETS[set_name].source(set_name)).examples]
        train_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
        spm = SoftPromptModel(load_base_model())
        for name, rows in judge.contexts():
            if wanted(name):
                emit({"set": set_name, "run": name, **judge.score_softprompt(spm, rows, None)})
        trained = [(n, f, s) for n, f in softprompt_runs(set_name) for s in args.seeds]
        folders: dict[str, list[Path]] = {}
        for name, flags, seed in trained:
            if not wanted(name):
                continue
            out = work / set_name / f"{name.replace(' ', '-')}-seed{seed}"
            began = time.perf_counter()
            done = subprocess.run(
                # As a user runs it: the training part as a file of their own, so the rows
                # kept are chosen on the 10% the command holds out of it, never on the
                # held-out part the table scores.
                [str(softprompt), "train", "--data", str(train_file), "--output", str(out),
                 *(["--epochs", str(args.epochs)] if args.epochs else []),
                 "--batch-size", str(args.batch_size),
                 "--seed", str(seed), "--overwrite", "--json", *flags,
                 *shlex.split(args.train_flags)],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            wall = time.perf_counter() - began
            if done.returncode != 0:
                sys.exit(f"{name} on {set_name} failed: {done.stderr.strip()[-2000:]}")
            summary = json.loads(done.stdout.strip().splitlines()[-1])
            adapter = load_adapter(out)
            spm.add_adapter(adapter)
            score = judge.score_softprompt(spm, judge.rows, adapter.name)
            spm.remove_adapter(adapter.name)
            folders.setdefault(name, []).append(out)
            # Which held-out evaluation chose the rows kept, of how many
            evals = json.loads((out / "loss_log.json").read_text())["evals"]
            kept = next((e["epoch"] for e in evals if e["step"] == summary["best_step"]), None)
            emit(
                {"set": set_name, "run": name, "seed": seed, **score,
                 "kept_epoch": kept, "epochs_evaluated": max(e["epoch"] for e in evals),
                 "heldout_losses": [round(e["loss"], 4) for e in evals],
                 "train_seconds": summary["seconds"], "parameters": summary["trainable_params"],
                 "wall_seconds": round(wall, 1), "epochs": summary.get("epochs"),
                 **({"search_winner": summary["search"]["winner"]} if "search" in summary else {}),
                 **({"train_flags": args.train_flags} if args.train_flags else {})}
            )  # fmt: skip
        for name, made in folders.items():
            if judge.spec.metric == "choice" and len(made) == len(args.seeds) > 1:
                for record in score_ensembles(judge, spm, made)[-1:]:  # all the seeds together
                    emit(
                        {"set": set_name, "run": f"{name} ensemble of {len(made)}", **record,
                         **({"train_flags": args.train_flags} if args.train_flags else {})}
                    )  # fmt: skip
        peft_runs = (("prompt", "PEFT prompt 8"), ("lora", "PEFT LoRA r8 all-linear"))
        for (kind, name), seed in [(r, s) for r in peft_runs for s in args.seeds]:
            if not wanted(name):
                continue
            model, tokenizer, seconds, trainable = train_peft(
                set_name, kind, args.epochs or 5, args.batch_size, seed=seed
            )
            score = judge.score_peft(model, tokenizer)
            emit(
                {"set": set_name, "run": name, "seed": seed, **score,
                 "train_seconds": round(seconds, 1), "parameters": trainable}
            )  # fmt: skip
    print_table(table)


def print_table(table: list[dict]) -> None:
    """One Markdown row per (set, run): the mean over its seeds, the lowest seed, the spread
    (highest minus lowest) and each seed's figure."""
    runs: dict[tuple[str, str], list[dict]] = {}
    for r in table:
        runs.setdefault((r["set"], r["run"]), []).append(r)
    print()
    columns = ["set", "method", "mean", "lowest", "spread", "per seed", "facts kept"]
    print("| " + " | ".join([*columns, "training s", "parameters"]) + " |")
    print("|---|---|---:|---:|---:|---|---:|---:|---:|")
    for (set_name, run), rs in runs.items():
        accs = [r["accuracy"] for r in rs]
        seeds = ", ".join(f"{a:.2f}" for a in accs) if len(rs) > 1 else ""
        kept = ""
        if "facts_kept" in rs[0]:
            kept = f"{statistics.mean(r['facts_kept'] for r in rs):.2f}"
        secs = [r["train_seconds"] for r in rs if r.get("train_seconds")]
        seconds = f"{statistics.mean(secs):.0f}" if secs else ""
        params = f"{rs[0]['parameters']:,}" if rs[0].get("parameters") else ""
        print(
            f"| {set_name} | {run} | {statistics.mean(accs):.2f} | {min(accs):.2f} | "
            f"{max(accs) - min(accs):.2f} | {seeds} | {kept} | {seconds} | {params} |"
        )
    means: dict[str, list[float]] = {}
    lows: dict[str, list[float]] = {}
    for (_, run), rs in runs.items():
        means.setdefault(run, []).append(statistics.mean(r["accuracy"] for r in rs))
        lows.setdefault(run, []).append(min(r["accuracy"] for r in rs))
    print()
    print("| method | sets | mean over sets | worst set's mean | worst seed anywhere |")
    print("|---|---:|---:|---:|---:|")
    for run, ms in means.items():
        print(
            f"| {run} | {len(ms)} | {statistics.mean(ms):.2f} | {min(ms):.2f} | "
            f"{min(lows[run]):.2f} |"
        )


if __name__ == "__main__":
    main()
