"""Two generated families of small tasks: one to decide defaults on, one to confirm them.

A default chosen on a handful of hand-made sets is a guess about every other set; sets made by the
hands that choose on them cannot show over-fitting. So defaults are decided on the ``decide``
family and checked on the ``confirm`` family, whose domains, templates, label spellings and chat
behaviours are its own and were written before any result of either family was seen. Nothing
is ever decided on ``confirm``.

Each family draws tasks of two kinds from its own vocabulary, with a fixed seed:

- classification (prompt/completion): short inputs from 2 to 10 topics, each topic one label;
  labels spelled as opaque codes, unrelated words or numbers, so the base model cannot read the
  answer off the topic; 50 to 300 training rows; judged by rank accuracy among the labels;
- chat behaviours: short answers that always carry a behaviour (a fixed closing line, a fixed
  opening, a fixed answer format); judged by the share of greedy replies that carry it.

No held-out input appears in training. ``write(folder, family)`` writes each task's
``NAME.train.jsonl`` and ``NAME.heldout.jsonl`` and ``family.json`` (how each is judged), which
``bench_tasks.py --family FOLDER`` reads.

A third family, ``hard`` (``task_family_hard.py``: fewer rows per label, labels that begin
alike, longer inputs), was written later, before any result of it, to confirm on.

Run: .venv/bin/python benchmarks/task_families.py FOLDER [--family decide|confirm|hard] [--count 12]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import string
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Vocabulary:
    """What one family's tasks are made of."""

    topics: dict[str, list[str]]
    """Topic -> the subjects an input about it names."""
    inputs: list[str]
    """Input templates: ``{subject}``, and ``{detail}`` from ``details``."""
    details: list[str]
    prompts: list[str]
    """Classification prompt templates around ``{input}``, each ending where the label goes."""
    words: list[str]
    """Label words, unrelated to any topic."""
    code: str
    """How an opaque code label is spelled: ``L`` a capital, ``D`` a digit, the rest kept."""
    numbers: tuple[int, int]
    questions: list[str]
    """Chat questions about ``{subject}``."""
    answers: list[str]
    """Answer sentences about ``{subject}`` (two are drawn per answer)."""
    behaviours: list[tuple[str, str, str, str]]
    """(kind, the text, where it goes, how the reply is judged: a regular expression)."""


DECIDE = Vocabulary(
    topics={
        "billing": [
            "my invoice",
            "the monthly charge",
            "a refund",
            "the card payment",
            "a double charge",
            "the receipt",
        ],
        "delivery": [
            "my parcel",
            "the courier",
            "the delivery slot",
            "a missing package",
            "the tracking number",
            "the shipping address",
        ],
        "login": [
            "my password",
            "the two-step code",
            "my account lock",
            "the sign-in page",
            "the reset email",
            "my username",
        ],
        "weather": [
            "the rain tomorrow",
            "the storm warning",
            "the heatwave",
            "the snowfall",
            "the wind forecast",
            "the morning fog",
        ],
        "football": [
            "the match on Saturday",
            "the striker",
            "the league table",
            "the penalty",
            "the transfer window",
            "the goalkeeper",
        ],
        "cooking": [
            "the soup recipe",
            "the oven timer",
            "the bread dough",
            "the spice mix",
            "the frying pan",
            "the dessert",
        ],
        "gardening": [
            "the tomato plants",
            "the lawn",
            "the compost heap",
            "the rose bushes",
            "the seed trays",
            "the hedge",
        ],
        "travel": [
            "my flight",
            "the hotel booking",
            "the train ticket",
            "the passport check",
            "the car hire",
            "the airport transfer",
        ],
        "health": [
            "my sore throat",
            "the flu jab",
            "the back pain",
            "the allergy",
            "the blood test",
            "the prescription",
        ],
        "music": [
            "the guitar lesson",
            "the concert",
            "the new album",
            "the piano tuning",
            "the drum kit",
            "the choir practice",
        ],
        "housing": [
            "the rent",
            "the leaking roof",
            "the landlord",
            "the broken boiler",
            "the tenancy",
            "the noisy neighbours",
        ],
        "pets": [
            "my dog",
            "the cat's food",
            "the vet visit",
            "the goldfish tank",
            "the puppy training",
            "the rabbit hutch",
        ],
        "school": [
            "the homework",
            "the exam results",
            "the school trip",
            "the maths teacher",
            "the parents' evening",
            "the uniform",
        ],
        "cars": [
            "the engine light",
            "the flat tyre",
            "the MOT",
            "the car insurance",
            "the brakes",
            "the windscreen",
        ],
    },  # fmt: skip
    inputs=[
        "I have a question about {subject}. {detail}",
        "Something is wrong with {subject}. {detail}",
        "Can you help me with {subject}? {detail}",
        "Quick one about {subject}: {detail}",
        "{detail} It's about {subject}.",
        "Hello, writing about {subject}. {detail}",
        "Please look into {subject}. {detail}",
        "Any news on {subject}? {detail}",
    ],
    details=[
        "It has been like this since Monday.",
        "Thanks in advance.",
        "It is quite urgent.",
        "I asked last week too.",
        "No rush.",
        "My friend has the same issue.",
        "I'm not sure who to ask.",
        "Please reply soon.",
        "It happened again today.",
        "This is my second message.",
    ],  # fmt: skip
    prompts=[
        "Classify the message.\nMessage: {input}\nLabel:",
        "Route this ticket to its queue.\nTicket: {input}\nQueue:",
        "Which team should answer this?\n{input}\nTeam:",
        "Tag the request.\nRequest: {input}\nTag:",
    ],
    words=[
        "amber",
        "falcon",
        "pebble",
        "violet",
        "harbor",
        "cobalt",
        "willow",
        "marble",
        "saffron",
        "glacier",
        "lantern",
        "meadow",
        "quartz",
        "thistle",
    ],  # fmt: skip
    code="LL-DD",
    numbers=(1, 12),
    questions=[
        "What should I know about {subject}?",
        "Any tips on {subject}?",
        "How do I deal with {subject}?",
        "Can you tell me something about {subject}?",
    ],
    answers=[
        "Start by writing down what you know about {subject}.",
        "Most people find {subject} easier after a little planning.",
        "Ask someone who has dealt with {subject} before.",
        "Give {subject} a few minutes of attention every day.",
        "Keep notes, so {subject} never surprises you twice.",
        "Check the basics of {subject} first, then the details.",
    ],
    behaviours=[
        ("signoff", "Warm regards, the Lumen Desk", "end", r"Warm regards, the Lumen Desk\s*$"),
        ("opener", "Right then!", "start", r"^\s*Right then!"),
        ("format", "Answer:", "start", r"^\s*Answer:"),
    ],
)


# The confirmation family. Written with the decision family, before any result of either was
# seen; never used to choose anything. Its own domains, templates, label spellings and
# behaviours.
CONFIRM = Vocabulary(
    topics={
        "astronomy": [
            "the telescope",
            "the lunar eclipse",
            "the planet Mars",
            "the meteor shower",
            "the star chart",
            "the comet",
        ],
        "banking": [
            "my savings account",
            "the overdraft",
            "the mortgage rate",
            "the bank transfer",
            "the cash machine",
            "the loan application",
        ],
        "plumbing": [
            "the kitchen tap",
            "the blocked drain",
            "the water pressure",
            "the radiator",
            "the shower head",
            "the pipe under the sink",
        ],
        "photography": [
            "the camera lens",
            "the night photos",
            "the tripod",
            "the photo editing",
            "the flash",
            "the memory card",
        ],
        "cycling": [
            "my bike chain",
            "the cycle lane",
            "the helmet",
            "the gear shifter",
            "the puncture",
            "the saddle",
        ],
        "knitting": [
            "the wool scarf",
            "the needles",
            "the dropped stitch",
            "the jumper pattern",
            "the yarn colour",
            "the cable knit",
        ],
        "insurance": [
            "the home policy",
            "the claim form",
            "the excess",
            "the renewal quote",
            "the accident cover",
            "the premium",
        ],
        "chess": [
            "the opening moves",
            "the endgame",
            "the rook",
            "the chess clock",
            "the tournament",
            "the knight fork",
        ],
        "fishing": [
            "the fishing rod",
            "the river bank",
            "the bait",
            "the fishing licence",
            "the reel",
            "the trout",
        ],
        "printing": [
            "the printer ink",
            "the paper jam",
            "the colour copies",
            "the scanner",
            "the print queue",
            "the toner",
        ],
        "dentistry": [
            "my toothache",
            "the filling",
            "the dental check-up",
            "the braces",
            "the wisdom tooth",
            "the gum bleeding",
        ],
        "camping": [
            "the tent pegs",
            "the sleeping bag",
            "the campfire",
            "the campsite booking",
            "the camping stove",
            "the rain cover",
        ],
        "painting": [
            "the wall colour",
            "the paint brushes",
            "the ceiling",
            "the primer",
            "the watercolours",
            "the wallpaper",
        ],
        "recycling": [
            "the glass bottles",
            "the bin collection",
            "the cardboard boxes",
            "the old batteries",
            "the plastic tubs",
            "the garden waste",
        ],
    },  # fmt: skip
    inputs=[
        "Re: {subject} - {detail}",
        "{detail} Concerning {subject}.",
        "Need advice on {subject}, {detail}",
        "Problem with {subject} again. {detail}",
        "Hi team, {subject} needs looking at. {detail}",
        "Enquiry: {subject}. {detail}",
        "Could someone check {subject}? {detail}",
    ],
    details=[
        "cheers.",
        "Sent from my phone.",
        "Would appreciate a call back.",
        "Not urgent at all.",
        "Third time asking!",
        "My neighbour suggested writing in.",
        "Hope this is the right place.",
        "Let me know the cost.",
        "See attached note.",
    ],  # fmt: skip
    prompts=[
        "Input: {input}\nCategory:",
        "Sort the note into its bin.\nNote: {input}\nBin:",
        "{input}\n\nDepartment code:",
        "Assign a group to the following enquiry.\n> {input}\nGroup:",
    ],
    words=[
        "plinth",
        "ember",
        "sorrel",
        "kestrel",
        "tundra",
        "orchid",
        "basalt",
        "juniper",
        "lagoon",
        "cinder",
        "heron",
        "tamarind",
        "zephyr",
        "obsidian",
    ],  # fmt: skip
    code="LDL",
    numbers=(100, 999),
    questions=[
        "I'd like some advice about {subject}.",
        "What's the best approach to {subject}?",
        "Explain {subject} to me briefly.",
        "Where do I begin with {subject}?",
    ],
    answers=[
        "Take {subject} one step at a time.",
        "A short checklist for {subject} saves a lot of trouble.",
        "Read the instructions that came with {subject} carefully.",
        "Many people overthink {subject}; keep it simple.",
        "Set aside an afternoon for {subject} and it will go well.",
        "Compare two or three options for {subject} before deciding.",
    ],
    behaviours=[
        (
            "signoff",
            "Best wishes from the Orchard Team",
            "end",
            r"Best wishes from the Orchard Team\s*$",
        ),
        ("opener", "Well now,", "start", r"^\s*Well now,"),
        ("format", "Short answer:", "start", r"^\s*Short answer:"),
    ],  # fmt: skip
)

FAMILIES = {"decide": DECIDE, "confirm": CONFIRM}


@dataclass
class Task:
    """One generated task: its rows and how its held-out part is judged."""

    name: str
    metric: str
    """choice (rank accuracy among the labels) or pattern (share of replies that match)."""
    instruction: str
    """The task said in words (the base model's instructed baseline)."""
    train: list[dict] = field(default_factory=list)
    heldout: list[dict] = field(default_factory=list)
    pattern: str = ""
    max_new_tokens: int = 40
    labels: list[str] = field(default_factory=list)


def _label(style: str, vocab: Vocabulary, rng: random.Random, taken: set[str]) -> str:
    while True:
        if style == "code":
            label = "".join(
                rng.choice(string.ascii_uppercase) if c == "L" else
                str(rng.randrange(10)) if c == "D" else c
                for c in vocab.code
            )  # fmt: skip
        elif style == "word":
            label = rng.choice(vocab.words)
        else:
            label = str(rng.randint(*vocab.numbers))
        if label not in taken:
            taken.add(label)
            return label


def _inputs(vocab: Vocabulary, topic: str, rng: random.Random) -> list[str]:
    """Every input of ``topic``, shuffled (templates x subjects x details)."""
    out = [
        t.format(subject=s, detail=d)
        for t in vocab.inputs
        for s in vocab.topics[topic]
        for d in vocab.details
    ]
    rng.shuffle(out)
    return out


def classification(name: str, vocab: Vocabulary, rng: random.Random) -> Task:
    count = rng.randint(2, 10)
    style = rng.choice(["code", "word", "number"])
    topics = rng.sample(sorted(vocab.topics), count)
    taken: set[str] = set()
    labels = [_label(style, vocab, rng, taken) for _ in topics]
    template = rng.choice(vocab.prompts)
    rows = max(50, min(300, rng.randint(50, 300)))
    per_label = max(5, rows // count)
    held_per_label = max(6, 60 // count)
    return labelled(
        name, topics, labels, template, per_label, held_per_label,
        lambda topic: _inputs(vocab, topic, rng), rng,
    )  # fmt: skip


def labelled(
    name: str,
    topics: list[str],
    labels: list[str],
    template: str,
    per_label: int,
    held_per_label: int,
    inputs: Callable[[str], list[str]],
    rng: random.Random,
) -> Task:
    """A classification task: each topic's shuffled inputs (``inputs``) split into held-out and
    training rows under its label, both parts shuffled."""
    task = Task(
        name,
        "choice",
        "Labels: " + ", ".join(f"{lab} {t}" for lab, t in zip(labels, topics, strict=True)) + ".",
        labels=labels,
    )
    for topic, label in zip(topics, labels, strict=True):
        pool = inputs(topic)
        held, train = pool[:held_per_label], pool[held_per_label : held_per_label + per_label]
        task.train += [
            {"prompt": template.format(input=x), "completion": f" {label}"} for x in train
        ]
        task.heldout += [
            {"prompt": template.format(input=x), "completion": f" {label}"} for x in held
        ]
    rng.shuffle(task.train)
    rng.shuffle(task.heldout)
    return task


def chat(name: str, vocab: Vocabulary, rng: random.Random, behaviour: int) -> Task:
    kind, text, where, pattern = vocab.behaviours[behaviour % len(vocab.behaviours)]
    subjects = [(t, s) for t in sorted(vocab.topics) for s in vocab.topics[t]]
    rng.shuffle(subjects)
    rows = rng.randint(50, 150)
    held_subjects, train_subjects = subjects[:30], subjects[30:]
    said = {
        "signoff": f"End every answer with the line '{text}'.",
        "opener": f"Begin every answer with '{text}'.",
        "format": f"Begin every answer with '{text}' and keep it to two sentences.",
    }[kind]
    task = Task(name, "pattern", said, pattern=pattern, max_new_tokens=80)

    def row(subject: str) -> dict:
        question = rng.choice(vocab.questions).format(subject=subject)
        first, second = rng.sample(vocab.answers, 2)
        body = f"{first} {second}".format(subject=subject)
        # after an opener that ends mid-sentence ("Well now,") the body goes on in lower case
        body = (body[0].lower() if text.endswith(",") else body[0].upper()) + body[1:]
        answer = f"{body}\n\n{text}" if where == "end" else f"{text} {body}"
        return {
            "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]
        }

    for i in range(rows):
        task.train.append(row(train_subjects[i % len(train_subjects)][1]))
    for _, subject in held_subjects:
        task.heldout.append(row(subject))
    return task


def generate(family: str, count: int = 12, seed: int = 0) -> list[Task]:
    """``count`` tasks of ``family``: three quarters classification, the rest chat
    behaviours (each behaviour in turn)."""
    if family == "hard":  # the third family, with its own generator
        import task_family_hard

        tasks = task_family_hard.generate(count, seed)
        _check_apart(tasks)
        return tasks
    vocab = FAMILIES[family]
    rng = random.Random(f"{family}-{seed}")
    chats = max(1, count // 4)
    tasks = [classification(f"{family}-c{i:02d}", vocab, rng) for i in range(count - chats)]
    tasks += [chat(f"{family}-b{i:02d}", vocab, rng, i) for i in range(chats)]
    _check_apart(tasks)
    return tasks


def _check_apart(tasks: list[Task]) -> None:
    """No held-out input appears in its task's training rows."""
    for task in tasks:
        seen = {json.dumps(r.get("prompt") or r["messages"][0]) for r in task.train}
        for r in task.heldout:
            key = json.dumps(r.get("prompt") or r["messages"][0])
            if task.metric == "choice" and key in seen:
                raise AssertionError(f"{task.name}: a held-out input is in training")


def write(folder: Path, family: str, count: int = 12, seed: int = 0) -> list[Task]:
    """Write ``family``'s tasks to ``folder`` (rows and ``family.json``); returns them."""
    folder.mkdir(parents=True, exist_ok=True)
    tasks = generate(family, count, seed)
    described = {}
    for task in tasks:
        for part, rows in (("train", task.train), ("heldout", task.heldout)):
            (folder / f"{task.name}.{part}.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in rows)
            )
        described[task.name] = {
            k: v for k, v in asdict(task).items() if k not in ("train", "heldout", "name")
        } | {"train_rows": len(task.train), "heldout_rows": len(task.heldout)}
    (folder / "family.json").write_text(
        json.dumps({"family": family, "seed": seed, "tasks": described}, indent=1) + "\n"
    )
    return tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--family", choices=[*sorted(FAMILIES), "hard"], default="decide")
    parser.add_argument("--count", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for task in write(args.folder, args.family, args.count, args.seed):
        what = f"{len(task.labels)} labels" if task.labels else re.sub(r"\\s\*\$", "", task.pattern)
        print(f"{task.name}: {task.metric}, {len(task.train)} train, {len(task.heldout)} held "
              f"out, {what}")  # fmt: skip


if __name__ == "__main__":
    main()
