"""Write the bundled task set ``examples:routing`` (``src/softprompt/examples/routing.*.jsonl``).

Customer messages to route to one of four teams named by opaque codes. The base model cannot
guess a code from the message's topic, so zero-shot it is near chance: what a tuned prompt adds
is measurable (natural topic words as labels are already ranked 0.95 right zero-shot on the
embedded model, which measures nothing). Messages are built from per-team pieces, shuffled with
a fixed seed; train and held-out rows share no message.

    python benchmarks/make_task_sets.py   # rewrites the two files, byte for byte the same
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "src" / "softprompt" / "examples"
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


def main() -> None:
    train, held = rows()
    for part, data in (("train", train), ("heldout", held)):
        path = OUT / f"routing.{part}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in data))
        print(f"{path}: {len(data)} rows")


if __name__ == "__main__":
    main()
