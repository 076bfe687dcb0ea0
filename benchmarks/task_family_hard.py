"""A third generated family, ``hard``: harder tasks, to confirm what ``decide`` decides.

The ``confirm`` family turned out easy for the embedded model (PEFT LoRA r8 scored 1.00 on eight
of its nine classifications), so it separates methods little. This family was written on
2026-12-08, before any result of it was seen, and is never used to choose anything. It makes its
tasks harder in the ways the ``confirm`` results pointed at, by construction:

- **fewer rows per label**: 30 to 200 training rows over 2 to 10 labels (as few as 4 a label);
- **labels that begin alike**: codes sharing their first characters (``QV-31``, ``QV-38``),
  numbers from a narrow range (``640`` to ``669``), or two-word labels sharing their first word
  (``north gate``, ``north tower``), besides plain unrelated words;
- **longer, noisier inputs**: each input is two or three sentences, one naming the subject and
  the others topic-neutral, so the telling words are a small part of the text;
- **neighbouring topics**: the domains come in pairs that share vocabulary (train and bus
  travel, house and car insurance, ...), so some subjects are near each other's;
- **chat behaviours**: a closing line, an opening phrase and an answer format, as the other
  families, with their own texts.

Its vocabulary, templates and behaviours are its own (none of ``decide``'s or ``confirm``'s).

Run: .venv/bin/python benchmarks/task_families.py FOLDER --family hard
"""

from __future__ import annotations

import random

from task_families import Task, Vocabulary, chat, labelled

HARD = Vocabulary(
    topics={
        "rail travel": [
            "the train ticket",
            "the platform change",
            "the rail card",
            "the delayed train",
            "the seat reservation",
            "the station lift",
        ],
        "bus travel": [
            "the bus pass",
            "the night bus",
            "the bus stop",
            "the bus timetable",
            "the coach ticket",
            "the bus driver",
        ],
        "home insurance": [
            "the house cover",
            "the flood claim",
            "the contents policy",
            "the burglary claim",
            "the buildings cover",
            "the home excess",
        ],
        "car insurance": [
            "the car cover",
            "the no-claims bonus",
            "the windscreen claim",
            "the named driver",
            "the courtesy car",
            "the motor excess",
        ],
        "gardening": [
            "the tomato plants",
            "the lawn",
            "the compost heap",
            "the rose bush",
            "the hedge",
            "the greenhouse",
        ],
        "beekeeping": [
            "the beehive",
            "the honey harvest",
            "the queen bee",
            "the bee swarm",
            "the smoker",
            "the wax frames",
        ],
        "payroll": [
            "my payslip",
            "the overtime pay",
            "the tax code",
            "the pension deduction",
            "the bonus payment",
            "the holiday pay",
        ],
        "expenses": [
            "the travel claim",
            "the hotel receipt",
            "the mileage form",
            "the meal allowance",
            "the expense report",
            "the company card",
        ],
        "pottery": [
            "the clay",
            "the kiln",
            "the glaze",
            "the potter's wheel",
            "the vase",
            "the firing",
        ],
        "violin lessons": [
            "the violin bow",
            "the scales practice",
            "the violin teacher",
            "the rosin",
            "the music grade exam",
            "the violin strings",
        ],
        "pharmacy": [
            "the prescription",
            "the repeat medicine",
            "the pill dosage",
            "the cough syrup",
            "the pharmacist",
            "the allergy tablets",
        ],
        "veterinary": [
            "the horse's limp",
            "the kitten's jabs",
            "the dog's stitches",
            "the parrot's feathers",
            "the flea treatment",
            "the pet microchip",
        ],
    },  # fmt: skip
    inputs=[
        "{detail} The thing is {subject}.",
        "Writing again about {subject}, I'm afraid. {detail}",
        "{detail} Could someone check {subject} for me?",
        "So, {subject}. {detail}",
        "I would like to raise {subject}. {detail}",
        "{detail} Would you mind looking at {subject}?",
        "Morning. It concerns {subject}. {detail}",
        "Not sure this is the right place, but {subject}. {detail}",
    ],
    details=[
        "I have been with you for six years and rarely complain.",
        "My sister told me to get in touch with you directly.",
        "I tried the website first but could not find an answer there.",
        "It is the third time this month, which is frustrating.",
        "I will be away next week, so an answer before then would help.",
        "The person I spoke to on the phone was very kind.",
        "I am writing this on my lunch break, so forgive the typos.",
        "Everything else has been fine, it is only this one thing.",
        "A neighbour of mine had something similar last year.",
        "Please call me back rather than email if you can.",
        "I kept all the paperwork in case you need it.",
        "I am not in a hurry, but I would like it sorted eventually.",
    ],  # fmt: skip
    prompts=[
        "Read the customer's note and give its category code.\nNote: {input}\nCategory:",
        'Inbox triage.\n"{input}"\nForward to:',
        "Assign the enquiry to a desk.\nEnquiry: {input}\nDesk:",
        "{input}\nThe right department for this message is",
    ],
    words=[
        "juniper",
        "basalt",
        "kestrel",
        "tundra",
        "sorrel",
        "ember",
        "lagoon",
        "ferric",
        "mistral",
        "bramble",
        "onyx",
        "puffin",
    ],  # fmt: skip
    code="QV-DD",
    numbers=(640, 669),
    questions=[
        "Could you give me a hand with {subject}?",
        "I'm confused about {subject}. Thoughts?",
        "What would you do about {subject}?",
        "Is there a trick to {subject}?",
    ],
    answers=[
        "Begin with the simplest explanation for {subject}.",
        "Write down what happened with {subject} and when.",
        "A second opinion on {subject} rarely hurts.",
        "Most trouble with {subject} goes away with patience.",
        "Look at what changed just before {subject} went wrong.",
        "Keep a small budget aside for {subject}.",
    ],
    behaviours=[
        (
            "signoff",
            "Yours in tea and patience, Marigold",
            "end",
            r"Yours in tea and patience, Marigold\s*$",
        ),
        ("opener", "Ahoy there!", "start", r"^\s*Ahoy there!"),
        ("format", "Verdict:", "start", r"^\s*Verdict:"),
    ],  # fmt: skip
)

SHARED_FIRST_WORDS = ["north", "silver", "harbour"]
"""Two-word labels of a ``shared`` task begin with one of these (``north gate``, ...)."""
SECOND_WORDS = ["gate", "tower", "field", "bridge", "yard", "lane", "wharf", "hill", "mill", "row"]


def _label(style: str, rng: random.Random, taken: set[str], first: str) -> str:
    while True:
        if style == "code":
            label = "".join(str(rng.randrange(10)) if c == "D" else c for c in HARD.code)
        elif style == "number":
            label = str(rng.randint(*HARD.numbers))
        elif style == "shared":
            label = f"{first} {rng.choice(SECOND_WORDS)}"
        else:
            label = rng.choice(HARD.words)
        if label not in taken:
            taken.add(label)
            return label


def _inputs(topic: str, rng: random.Random) -> list[str]:
    """Every input of ``topic``, shuffled: a template with one detail, and half of them with a
    second detail after it (two or three sentences in all)."""
    out = []
    for t in HARD.inputs:
        for s in HARD.topics[topic]:
            for d in HARD.details:
                text = t.format(subject=s, detail=d)
                if rng.random() < 0.5:
                    text += " " + rng.choice([x for x in HARD.details if x != d])
                out.append(text)
    rng.shuffle(out)
    return out


def classification(name: str, rng: random.Random) -> Task:
    count = rng.randint(2, 10)
    style = rng.choice(["code", "number", "shared", "word"])
    topics = rng.sample(sorted(HARD.topics), count)
    first = rng.choice(SHARED_FIRST_WORDS)
    taken: set[str] = set()
    labels = [_label(style, rng, taken, first) for _ in topics]
    template = rng.choice(HARD.prompts)
    rows = rng.randint(30, 200)
    per_label = max(4, rows // count)
    held_per_label = max(6, 60 // count)
    return labelled(
        name, topics, labels, template, per_label, held_per_label,
        lambda topic: _inputs(topic, rng), rng,
    )  # fmt: skip


def generate(count: int = 12, seed: int = 0) -> list[Task]:
    """``count`` tasks: three quarters classification, the rest chat behaviours in turn."""
    rng = random.Random(f"hard-{seed}")
    chats = max(1, count // 4)
    tasks = [classification(f"hard-c{i:02d}", rng) for i in range(count - chats)]
    tasks += [chat(f"hard-b{i:02d}", HARD, rng, i) for i in range(chats)]
    return tasks
