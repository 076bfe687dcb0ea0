"""Write the task suite: the bundled sets ``examples:routing``, ``pirate``, ``shelving``,
``booking``, ``signoff`` and ``initials`` (``src/softprompt/examples/NAME.{train,heldout}.jsonl``;
the last four are described in ``suite_sets.py``), and the unseen sets of
``benchmarks/data/unseen/``, kept to check choices made on the suite.

routing (prompt/completion, classification): customer messages to route to one of four teams
named by opaque codes. The base model cannot guess a code from the message's topic, so
zero-shot it is near chance: what a tuned prompt adds is measurable (natural topic words as
labels are already ranked 0.95 right zero-shot on the embedded model, which measures
nothing). Messages are built from per-team pieces, shuffled with a fixed seed; train and
held-out rows share no message.

pirate (chat): questions with short factual answers (capitals, sums, colours, animal sounds,
opposites, counts) and requests for encouragement or advice, each answered by an assistant that
always opens with "Arr, matey!" and speaks like a pirate. The base model never does; whether a
held-out reply opens that way is the measure (``softprompt eval --metric pattern``), and whether
it still holds the right fact shows the base model's knowledge kept. Held-out rows ask about
entities no training row mentions. A fifth of the conversations have two exchanges.

    python benchmarks/make_task_sets.py   # rewrites every file, byte for byte the same
"""

from __future__ import annotations

import itertools
import json
import random
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "src" / "softprompt" / "examples"
UNSEEN = Path(__file__).resolve().parent / "data" / "unseen"
"""Sets never used to choose a default: they check that the choices carry over."""
PROMPT = "Route this customer message to its team code.\nMessage: {message}\nTeam code:"

TEAMS = {
    # billing: charges, refunds, invoices
    "QX-17": (
        [
            "I was charged twice for",
            "Why is there an extra fee on",
            "Please refund the payment for",
            "My card was billed the wrong amount for",
            "I need a copy of the invoice for",
            "The discount was not applied to",
            "Can you explain the tax on",
            "I cancelled but was still charged for",
        ],
        [
            "my last order",
            "the March subscription",
            "order 4471",
            "my annual plan",
            "the gift card I bought",
            "yesterday's purchase",
            "the premium upgrade",
            "two months in a row",
        ],
    ),
    # delivery: parcels, tracking, addresses
    "LM-04": (
        [
            "My parcel still has not arrived for",
            "The tracking number does not work for",
            "The box was damaged when it came for",
            "Can I change the delivery address of",
            "The courier left the package at the wrong door for",
            "Delivery is a week late for",
            "Only half of the items came for",
            "How do I arrange a return pickup for",
        ],
        [
            "my last order",
            "the blue jacket",
            "order 8812",
            "the kitchen chairs",
            "a birthday present",
            "the replacement phone",
            "the books I ordered",
            "my weekly box",
        ],
    ),
    # technical: login, app, errors
    "VR-88": (
        [
            "I cannot log in to",
            "The app crashes every time I open",
            "I get an error code when I use",
            "The password reset email never comes for",
            "The page keeps loading forever on",
            "Two-factor codes are rejected by",
            "The sync stopped working in",
            "Buttons do nothing when I click them in",
        ],
        [
            "my account",
            "the mobile app",
            "the website",
            "the desktop client",
            "the settings page",
            "my tablet",
            "the checkout page",
            "the new version",
        ],
    ),
    # privacy and closing accounts
    "TJ-31": (
        [
            "Please delete all the data you hold about",
            "I want to close",
            "Send me a copy of the personal data linked to",
            "Stop using my details for marketing from",
            "Remove my phone number from",
            "Who can see the information in",
            "I want to withdraw my consent for",
            "Erase the address history of",
        ],
        [
            "my account",
            "my profile",
            "my email address",
            "the family plan",
            "my old login",
            "my purchase history",
            "the newsletter list",
            "my saved cards",
        ],
    ),
}
ENDINGS = ["", " Thanks.", " This is urgent.", " Please help."]
HELD_OUT_PER_TEAM = 25
TRAIN_PER_TEAM = 75


def rows() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    rng = random.Random(20261201)
    train, held = [], []
    for code, (starts, objects) in TEAMS.items():
        messages = [
            f"{start} {obj}.{end}"
            for start, obj, end in itertools.product(starts, objects, ENDINGS)
        ]
        rng.shuffle(messages)
        chosen = messages[: HELD_OUT_PER_TEAM + TRAIN_PER_TEAM]
        for i, message in enumerate(chosen):
            row = {"prompt": PROMPT.format(message=message), "completion": f" {code}"}
            (held if i < HELD_OUT_PER_TEAM else train).append(row)
    rng.shuffle(train)
    rng.shuffle(held)
    return train, held


GREETING = "Arr, matey!"
CAPITALS = [
    ("France", "Paris"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Germany", "Berlin"),
    ("Japan", "Tokyo"),
    ("Egypt", "Cairo"),
    ("Canada", "Ottawa"),
    ("Peru", "Lima"),
    ("Kenya", "Nairobi"),
    ("Norway", "Oslo"),
    ("Greece", "Athens"),
    ("Portugal", "Lisbon"),
    ("Russia", "Moscow"),
    ("China", "Beijing"),
    ("Ireland", "Dublin"),
    ("Austria", "Vienna"),
    ("Poland", "Warsaw"),
    ("Sweden", "Stockholm"),
    ("Cuba", "Havana"),
    ("Chile", "Santiago"),
    ("Thailand", "Bangkok"),
    ("Turkey", "Ankara"),
    ("Argentina", "Buenos Aires"),
    ("Australia", "Canberra"),
    ("Belgium", "Brussels"),
    ("Denmark", "Copenhagen"),
    ("Finland", "Helsinki"),
    ("Hungary", "Budapest"),
    ("England", "London"),
    ("South Korea", "Seoul"),
]
COLOURS = [
    ("the sky on a clear day", "blue"),
    ("fresh grass", "green"),
    ("snow", "white"),
    ("coal", "black"),
    ("a ripe banana", "yellow"),
    ("a ripe tomato", "red"),
    ("a carrot", "orange"),
    ("milk chocolate", "brown"),
    ("a lemon", "yellow"),
    ("a lime", "green"),
    ("a polar bear's fur", "white"),
    ("a crow", "black"),
    ("a strawberry", "red"),
    ("an eggplant", "purple"),
    ("the sea", "blue"),
    ("a pumpkin", "orange"),
]
SOUNDS = [
    ("a dog", "barks"),
    ("a cat", "meows"),
    ("a cow", "moos"),
    ("a duck", "quacks"),
    ("a sheep", "bleats"),
    ("a lion", "roars"),
    ("a horse", "neighs"),
    ("an owl", "hoots"),
    ("a pig", "oinks"),
    ("a frog", "croaks"),
    ("a bee", "buzzes"),
    ("a snake", "hisses"),
    ("a rooster", "crows"),
    ("a wolf", "howls"),
    ("a mouse", "squeaks"),
    ("a donkey", "brays"),
]
OPPOSITES = [
    ("hot", "cold"),
    ("up", "down"),
    ("big", "small"),
    ("fast", "slow"),
    ("day", "night"),
    ("happy", "sad"),
    ("open", "closed"),
    ("light", "dark"),
    ("early", "late"),
    ("full", "empty"),
    ("wet", "dry"),
    ("loud", "quiet"),
    ("young", "old"),
    ("hard", "soft"),
    ("rich", "poor"),
    ("strong", "weak"),
]
COUNTS = [
    ("legs does a spider have", "eight"),
    ("days are in a week", "seven"),
    ("months are in a year", "twelve"),
    ("hours are in a day", "twenty-four"),
    ("minutes are in an hour", "sixty"),
    ("legs does a dog have", "four"),
    ("sides does a triangle have", "three"),
    ("sides does a square have", "four"),
    ("wheels does a bicycle have", "two"),
    ("legs does an insect have", "six"),
    ("days are in a leap year", "366"),
    ("seconds are in a minute", "sixty"),
    ("players are on a football team", "eleven"),
    ("strings does a violin have", "four"),
    ("continents are there", "seven"),
    ("arms does an octopus have", "eight"),
]
ADVICE = [
    (
        "Give me one sentence of encouragement.",
        "Keep yer sails up, for every storm blows over by morning.",
    ),
    (
        "I feel nervous about my exam tomorrow.",
        "Study yer charts tonight, sleep well, and ye'll sail through it.",
    ),
    (
        "How can I sleep better?",
        "Drop anchor at the same hour each night and leave the glowing screens ashore.",
    ),
    (
        "What should I cook for dinner?",
        "A hearty fish stew, the kind that keeps a crew happy through the night.",
    ),
    (
        "Tell me how to stay motivated.",
        "Pick one small treasure to find each day and the voyage keeps ye going.",
    ),
    (
        "I made a mistake at work today.",
        "Every sailor runs aground once; patch the hull and set a better course.",
    ),
    (
        "How do I make new friends?",
        "Join a crew that shares yer interests and be the first to say ahoy.",
    ),
    (
        "Any tips for saving money?",
        "Guard yer doubloons: write down what ye spend and bury a little each week.",
    ),
    (
        "How can I get better at running?",
        "Start slow, run a little farther each week, and rest like ye mean it.",
    ),
    (
        "Suggest a hobby for a rainy day.",
        "Draw a map of an island ye dream of, with an X where the treasure lies.",
    ),
    (
        "I am bored. What should I do?",
        "Read a tale of the high seas or learn to tie three new knots.",
    ),
    (
        "How do I stay calm in a traffic jam?",
        "Breathe slow like the tide and put on a good sea shanty.",
    ),
    (
        "Give me a tip for learning a language.",
        "Speak a few words every day, even to yer parrot, and never fear mistakes.",
    ),
    ("How can I be more productive?", "Do the hardest task at first light, while the sea is calm."),
    (
        "What is a good way to start the morning?",
        "A glass of water, a stretch on the deck, and a look at the horizon.",
    ),
    (
        "How do I deal with a rude person?",
        "Keep a steady hand on the wheel and let their squall pass ye by.",
    ),
    (
        "I want to read more books.",
        "Keep a book in yer pocket and read a page whenever ye wait for the tide.",
    ),
    (
        "How can I drink more water?",
        "Keep a full flask at yer side and drink each time ye ring the bell.",
    ),
    (
        "Give me advice for a job interview.",
        "Know the ship ye want to join, stand tall, and tell them of yer best voyages.",
    ),
    (
        "How do I keep my room tidy?",
        "Stow one thing in its place each evening, as a good deckhand does.",
    ),
]
PIRATE_HELD_OUT = 0.25


def _qa() -> list[tuple[str, str, str]]:
    """(kind, question, pirate answer) for every fact; kind keeps held-out entities apart."""
    out = []
    for country, capital in CAPITALS:
        out.append(
            (
                "capital",
                f"What is the capital of {country}?",
                f"The capital of {country} be {capital}, as sure as the tide.",
            )
        )
    for thing, colour in COLOURS:
        out.append(
            (
                "colour",
                f"What colour is {thing}?",
                f"That be {colour}, plain as a flag on the mast.",
            )
        )
    for animal, sound in SOUNDS:
        out.append(
            (
                "sound",
                f"What sound does {animal} make?",
                f"{animal[0].upper()}{animal[1:]} {sound}, I've heard it many a time aboard.",
            )
        )
    for word, opposite in OPPOSITES:
        out.append(
            (
                "opposite",
                f"What is the opposite of {word}?",
                f"The opposite of {word} be {opposite}, me hearty.",
            )
        )
    for what, number in COUNTS:
        out.append(("count", f"How many {what}?", f"That be {number}, says this old sea dog."))
    rng = random.Random(7)
    pairs = [(a, b) for a in range(2, 20) for b in range(2, 20) if a < b]
    for a, b in rng.sample(pairs, 40):
        out.append(
            ("sum", f"What is {a} plus {b}?", f"{a} plus {b} be {a + b}, counted like gold coins.")
        )
    for question, answer in ADVICE:
        out.append(("advice", question, answer))
    return out


def pirate_rows() -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    rng = random.Random(20261202)
    qa = _qa()
    rng.shuffle(qa)
    n_held = round(len(qa) * PIRATE_HELD_OUT)
    parts = {"heldout": qa[:n_held], "train": qa[n_held:]}
    out: dict[str, list[dict[str, object]]] = {}
    for name, items in parts.items():
        rows: list[dict[str, object]] = []
        i = 0
        while i < len(items):
            # every fifth conversation has two exchanges, both answered in character
            take = 2 if len(rows) % 5 == 4 and i + 1 < len(items) else 1
            messages = []
            for _, question, answer in items[i : i + take]:
                messages += [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": f"{GREETING} {answer}"},
                ]
            rows.append({"messages": messages})
            i += take
        out[name] = rows
    return out["train"], out["heldout"]


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import suite_sets

    bundled = {
        "routing": rows(),
        "pirate": pirate_rows(),
        "shelving": suite_sets.shelving(),
        "booking": suite_sets.booking(),
        "signoff": suite_sets.signoff(),
        "initials": suite_sets.initials(),
    }
    unseen = {"dispatch": suite_sets.dispatch(), "closing": suite_sets.closing()}
    for folder, sets in ((OUT, bundled), (UNSEEN, unseen)):
        folder.mkdir(parents=True, exist_ok=True)
        for name, (train, held) in sets.items():
            for part, data in (("train", train), ("heldout", held)):
                path = folder / f"{name}.{part}.jsonl"
                path.write_text("".join(json.dumps(r) + "\n" for r in data))
                print(f"{path}: {len(data)} rows")


if __name__ == "__main__":
    main()
