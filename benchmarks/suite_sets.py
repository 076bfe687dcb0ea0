"""The task suite's other sets, beside ``routing`` and ``pirate``
(``make_task_sets.py`` writes them all):

shelving (prompt/completion, classification, 5 opaque labels): book blurbs to shelf codes. A
second classification in another domain than routing's, with another label count; the codes say
nothing about the subject, so zero-shot is near chance (0.2).

booking (prompt/completion, extraction, exact match): a customer message holding a booking
reference (three capitals and four digits) among other codes (a flight number, a postcode, an
order number, a date, an amount); the answer is the reference alone. The base model tends to
answer with a sentence or another code: the format and the choice are what is learned.

signoff (chat, a behaviour that must last to the end of long answers): how-to questions answered
in three to five sentences that always end with the line ``Stay curious! - Ms. Vega``. Judged on
greedy replies of up to 160 tokens: the reply must end with that line (``--metric pattern`` with
``Ms\\. Vega\\s*$``), so an answer that opens well and drifts, or never stops, fails.

initials (prompt/completion, exact match): the initials of a phrase of three to five words, in
capitals. A small input-dependent computation; prompt tuning on a small frozen model is known
to be weak at what the model cannot already do (Lester et al. 2021 on model size), so this set
shows where it stops.

Unseen sets (``benchmarks/data/unseen/``, never used to choose anything): ``dispatch``
(requests to five opaque depot codes, another domain and vocabulary than either
classification) and ``closing`` (the signoff questions, another closing line
``Fair winds, the Harbour Desk`` and another draw of answers).

Every set is built from per-class pieces with a fixed seed; no held-out message, blurb, question
or phrase appears in training.
"""

from __future__ import annotations

import itertools
import random
import string

SHELF_PROMPT = "Give the shelf code for this book.\nBook: {blurb}\nShelf code:"
SHELVES = {
    # cooking
    "A-310": (
        ["A practical guide to", "Simple recipes for", "The home cook's handbook of",
         "Weeknight dinners built on", "A baker's notes on", "Family cooking with"],
        ["sourdough bread", "one-pot soups", "roasting vegetables", "fresh pasta",
         "spices and curries", "slow-cooked stews", "summer salads", "holiday cakes"],
    ),
    # astronomy
    "C-552": (
        ["An illustrated tour of", "A beginner's map of", "The science behind",
         "Observing notes on", "A history of the discovery of", "Night-sky stories about"],
        ["the planets", "distant galaxies", "black holes", "the moon's phases",
         "comets and meteors", "the life of stars", "telescopes", "the constellations"],
    ),
    # gardening
    "F-118": (
        ["A season-by-season guide to", "Growing your own", "The small-space gardener's book of",
         "Practical advice on", "An allotment diary about", "Healthy soil for"],
        ["tomatoes", "roses", "herbs on a balcony", "fruit trees", "compost",
         "spring bulbs", "raised vegetable beds", "houseplants"],
    ),
    # sailing and the sea
    "H-904": (
        ["A skipper's handbook on", "True stories of", "Learning the basics of",
         "A coastal guide to", "The seamanship of", "Safety at sea and"],
        ["small sailing boats", "reading the tides", "knots and rigging",
         "ocean crossings", "navigation by chart", "harbour manoeuvres",
         "storm tactics", "racing dinghies"],
    ),
    # chess and board games
    "P-276": (
        ["Winning strategies for", "A grandmaster's lessons in", "Puzzles to sharpen",
         "The classic games of", "An opening repertoire for", "Endgame technique in"],
        ["chess", "the Sicilian defence", "rook endgames", "tactical combinations",
         "club tournaments", "blitz play", "pawn structures", "attacking the king"],
    ),
}  # fmt: skip
SHELF_ENDINGS = ["", " Second edition.", " With diagrams.", " Now in paperback."]

DISPATCH_PROMPT = "Which depot handles this request?\nRequest: {message}\nDepot:"
DEPOTS = {
    # furniture
    "ZK-6": (
        ["Please collect the", "We need to return the", "Can you assemble the",
         "The legs are loose on the", "Delivery damaged the", "Swap the colour of the"],
        ["oak wardrobe", "corner sofa", "dining table", "bunk bed", "office chair",
         "bookcase", "sideboard", "garden bench"],
    ),
    # groceries
    "WD-2": (
        ["Some items were missing from the", "Substitute the", "The cold chain failed for the",
         "Add extra to the", "Cancel the", "The bag split with the"],
        ["weekly grocery order", "fresh fruit box", "frozen food order",
         "milk and eggs", "bakery items", "vegetable crate", "meat order", "snack bundle"],
    ),
    # electronics repair
    "QB-9": (
        ["The screen cracked on my", "Book a repair for the", "The battery drains fast on the",
         "No sound comes from the", "The charger stopped working for the",
         "Update failed on the"],
        ["laptop", "tablet", "phone", "smart speaker", "games console",
         "e-reader", "headphones", "smart watch"],
    ),
    # garden and outdoor
    "MT-4": (
        ["Deliver the", "Return the unused", "Collect the broken", "The wrong size came for the",
         "Schedule fitting of the", "Replace the faded"],
        ["garden shed", "lawn mower", "patio heater", "trellis panels", "hose reel",
         "outdoor lights", "parasol", "fence posts"],
    ),
    # pharmacy
    "HV-7": (
        ["Refill my", "The pharmacy sent the wrong", "Check the dose on my",
         "Cancel the repeat", "Deliver the urgent", "Confirm the allergy note on my"],
        ["blood pressure tablets", "inhaler", "eye drops", "insulin supplies",
         "antibiotics", "skin cream", "vitamin order", "prescription"],
    ),
}  # fmt: skip
DISPATCH_ENDINGS = ["", " Thank you.", " As soon as possible.", " Order placed last week."]


def classification(
    classes: dict[str, tuple[list[str], list[str]]],
    endings: list[str],
    template: str,
    field: str,
    seed: int,
    train_per_class: int,
    held_per_class: int,
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Rows of a classification by opaque codes: each class's texts from its own pieces."""
    rng = random.Random(seed)
    train, held = [], []
    for code, (starts, objects) in classes.items():
        texts = [f"{a} {b}.{c}" for a, b, c in itertools.product(starts, objects, endings)]
        rng.shuffle(texts)
        for i, text in enumerate(texts[: held_per_class + train_per_class]):
            row = {"prompt": template.format(**{field: text}), "completion": f" {code}"}
            (held if i < held_per_class else train).append(row)
    rng.shuffle(train)
    rng.shuffle(held)
    return train, held


def shelving() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    return classification(SHELVES, SHELF_ENDINGS, SHELF_PROMPT, "blurb", 20261204, 48, 20)


def dispatch() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    return classification(DEPOTS, DISPATCH_ENDINGS, DISPATCH_PROMPT, "message", 20261205, 40, 20)


BOOKING_PROMPT = "Find the booking reference in this message.\nMessage: {message}\nReference:"
BOOKING_FRAMES = [
    "Hi, my booking {ref} was for flight {flight} on {date} but I need to change it.",
    "I paid {amount} for order {order} and my booking reference is {ref}; please confirm.",
    "Please move booking {ref} to {date}. I live at postcode {post}.",
    "Flight {flight} was cancelled. Reference {ref}. What are my options?",
    "Can you resend the receipt? It was {amount} on {date}, booking {ref}.",
    "My name is on booking {ref} but the ticket shows flight {flight}.",
    "Order {order} arrived but booking {ref} still shows as unpaid.",
    "We are two adults and a child under booking {ref}, postcode {post}.",
    "Is {ref} still valid? I changed the date to {date} and paid {amount}.",
    "Refund order {order} please; it has nothing to do with booking {ref}.",
]
MONTHS = ["January", "March", "April", "June", "July", "September", "October", "December"]


def _booking_row(rng: random.Random, frame: str) -> dict[str, str]:
    letters = "".join(rng.choice(string.ascii_uppercase) for _ in range(3))
    ref = f"{letters}{rng.randint(1000, 9999)}"
    values = {
        "ref": ref,
        "flight": f"{rng.choice(['BA', 'LH', 'AF', 'KL', 'IB'])} {rng.randint(100, 2999)}",
        "date": f"{rng.randint(1, 28)} {rng.choice(MONTHS)}",
        "amount": f"{rng.randint(20, 900)} euros",
        "order": f"#{rng.randint(100000, 999999)}",
        "post": f"{rng.choice(['N', 'SE', 'W', 'E'])}{rng.randint(1, 20)} {rng.randint(1, 9)}"
        f"{rng.choice(string.ascii_uppercase)}{rng.choice(string.ascii_uppercase)}",
    }
    message = frame.format(**values)
    return {"prompt": BOOKING_PROMPT.format(message=message), "completion": f" {ref}"}


def booking() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Held-out messages use frames no training message uses, with fresh values."""
    rng = random.Random(20261206)
    train_frames, held_frames = BOOKING_FRAMES[:7], BOOKING_FRAMES[7:]
    train = [_booking_row(rng, train_frames[i % len(train_frames)]) for i in range(210)]
    held = [_booking_row(rng, held_frames[i % len(held_frames)]) for i in range(60)]
    held += [_booking_row(rng, train_frames[i % len(train_frames)]) for i in range(40)]
    rng.shuffle(train)
    rng.shuffle(held)
    return train, held


INITIALS_PROMPT = "Write the initials of this phrase in capitals.\nPhrase: {phrase}\nInitials:"
WORDS = (
    "apple river garden silver morning paper window forest candle yellow harbour little "
    "winter market golden ocean stone quiet bright orange simple castle pencil thunder "
    "velvet maple lantern meadow copper violet basket rocket tiger summer island north "
    "kettle marble feather wagon planet cotton ribbon saddle desert jacket hollow"
).split()


def initials() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Held-out phrases share no three-word start with a training phrase."""
    rng = random.Random(20261207)
    seen: set[tuple[str, ...]] = set()
    rows: list[tuple[tuple[str, ...], dict[str, str]]] = []
    while len(rows) < 300:
        words = tuple(rng.sample(WORDS, rng.randint(3, 5)))
        if words[:3] in seen:
            continue
        seen.add(words[:3])
        answer = "".join(w[0].upper() for w in words)
        row = {"prompt": INITIALS_PROMPT.format(phrase=" ".join(words)), "completion": f" {answer}"}
        rows.append((words, row))
    return [r for _, r in rows[100:]], [r for _, r in rows[:100]]


SIGNOFF = "Stay curious! - Ms. Vega"
TOPICS = {
    "plants": (
        ["How do I keep basil alive on a windowsill?", "Why are my tomato leaves turning yellow?",
         "How often should I water a cactus?", "What is the best way to start seeds indoors?",
         "How do I get rid of aphids without sprays?", "When should I repot a houseplant?"],
        ["Give the plant as much light as the window allows, turning it every few days.",
         "Water when the top of the soil feels dry, and never leave the pot standing in water.",
         "Pinch off the top leaves often, which makes the plant bushier.",
         "Yellow leaves usually mean too much water or too little food.",
         "A weak liquid feed every two weeks in summer is plenty.",
         "Good drainage matters more than the type of pot.",
         "Check under the leaves each week, where pests like to hide.",
         "A spray of soapy water knocks most small insects off the stems."],
    ),
    "cooking": (
        ["How do I make rice that is not sticky?", "What is the secret to crispy roast potatoes?",
         "How can I stop pasta from boiling over?", "How do I know when bread is baked?",
         "Why does my soup taste flat?", "How do I cook an egg with a runny yolk?"],
        ["Rinse the grains first to wash away the loose starch.",
         "Use a big pot and plenty of salted water.",
         "Heat the oil before the food goes in, so it sizzles at once.",
         "A pinch of salt and a squeeze of lemon wake up most dishes.",
         "Let it rest for a few minutes before you serve it.",
         "Tap the bottom of the loaf: it should sound hollow.",
         "Dry the surface well, because water stops things from browning.",
         "Taste as you go and adjust a little at a time."],
    ),
    "study": (
        ["How can I remember what I read?", "What is a good way to revise for exams?",
         "How do I stop procrastinating on homework?", "How long should I study without a break?",
         "How do I take better notes in class?", "How can I learn new words faster?"],
        ["Test yourself instead of rereading, since recalling is what builds memory.",
         "Short sessions spread over days beat one long night.",
         "Explain the idea out loud as if you were teaching a friend.",
         "Write questions in the margin and answer them a day later.",
         "Start with just five minutes; starting is the hardest part.",
         "Put your phone in another room while you work.",
         "Take a short walk between sessions to reset your focus.",
         "Connect each new fact to something you already know."],
    ),
    "fitness": (
        ["How do I start running as a beginner?", "How can I get better at push-ups?",
         "Is it fine to exercise every day?", "How do I stretch after a workout?",
         "How much water should I drink when I exercise?", "How do I stay motivated to train?"],
        ["Begin with short intervals of running and walking.",
         "Increase the effort by no more than a tenth each week.",
         "Rest days are when the body actually gets stronger.",
         "Warm up for five minutes before anything hard.",
         "Good form matters more than the number of repetitions.",
         "Drink a little before, during and after, rather than a lot at once.",
         "Write down each session so you can see your progress.",
         "Training with a friend makes it easier to keep going."],
    ),
    "money": (
        ["How do I start saving money?", "How can I spend less on groceries?",
         "What is a simple way to make a budget?", "Should I pay off debt or save first?",
         "How do I avoid impulse buying?", "How much should I keep for emergencies?"],
        ["Move a fixed amount to savings on the day you are paid.",
         "Write a shopping list and stick to it.",
         "Track every expense for one month to see where the money goes.",
         "Pay the debt with the highest interest first.",
         "Wait a day before any purchase you did not plan.",
         "A few months of expenses set aside gives real peace of mind.",
         "Cook larger batches and freeze portions for busy days.",
         "Review your subscriptions and cancel the ones you forget about."],
    ),
}  # fmt: skip
HELD_TOPICS = {
    "pets": (
        ["How do I teach my dog to sit?", "How often should I brush my cat?",
         "What should I feed a pet rabbit?", "How do I keep a fish tank clean?"],
        ["Reward the behaviour you want the moment it happens.",
         "Keep sessions short and end while your pet is still keen.",
         "Fresh water every day matters as much as food.",
         "A regular routine helps an animal feel safe.",
         "Ask a vet before changing its diet.",
         "Clean a little often rather than a lot at once."],
    ),
    "sleep": (
        ["How can I fall asleep faster?", "Is a nap in the afternoon a good idea?",
         "How do I stop waking up at night?", "What is a good bedtime routine?"],
        ["Go to bed and get up at the same time every day.",
         "Keep the bedroom cool, dark and quiet.",
         "Avoid coffee after lunch.",
         "A short nap of twenty minutes refreshes without spoiling the night.",
         "Put screens away an hour before bed.",
         "If you cannot sleep, get up and read until you feel tired."],
    ),
}  # fmt: skip


def _answer(rng: random.Random, pool: list[str], closing: str) -> str:
    body = " ".join(rng.sample(pool, rng.randint(3, 5)))
    return f"{body}\n\n{closing}"


def signoff(closing: str = SIGNOFF, seed: int = 20261208) -> tuple[list[dict], list[dict]]:
    """Training: the first four questions of each topic, each answered five times (100 rows);
    held out: the other two of each topic and questions on topics no training row has, each
    answered twice (36 rows)."""
    rng = random.Random(seed)
    train, held = [], []
    for _, (questions, pool) in TOPICS.items():
        for question in questions[:4]:
            for _ in range(5):
                train.append(_chat(question, _answer(rng, pool, closing)))
        for question in questions[4:]:
            held += [_chat(question, _answer(rng, pool, closing)) for _ in range(2)]
    for _, (questions, pool) in HELD_TOPICS.items():
        for question in questions:
            held += [_chat(question, _answer(rng, pool, closing)) for _ in range(2)]
    rng.shuffle(train)
    rng.shuffle(held)
    return train, held


def _chat(question: str, answer: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


CLOSING = "Fair winds, the Harbour Desk"


def closing() -> tuple[list[dict], list[dict]]:
    """The unseen persona: the same questions' kind, another closing line and seed."""
    return signoff(CLOSING, seed=20261209)
