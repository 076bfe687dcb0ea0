"""Rank accuracy of adapters on a held-out choice set, scored two ways: as ``softprompt eval
--metric choice`` scores it (each label's tokens after the prompt) and with the end-of-sequence
token after each label (the whole answer, as training scores it).

The two differ where one label's tokens begin another's (" 1" and " 11" are [" ", "1"] and
[" ", "1", "1"] to the embedded model's tokenizer): without the end, the shorter label's
log-likelihood is never below the longer one's, so the longer label is never chosen.

Run: .venv/bin/python benchmarks/choice_with_eos.py HELDOUT.jsonl ADAPTER...
Prints one JSON line per adapter, and one for the base model.
"""

from __future__ import annotations

import json
import sys

from softprompt.adapters import load_adapter
from softprompt.data import Example, load_texts
from softprompt.insight.scoring import choice_accuracy
from softprompt.models import load_base_model
from softprompt.prompt import SoftPromptModel


def main() -> None:
    heldout, adapters = sys.argv[1], sys.argv[2:]
    spm = SoftPromptModel(load_base_model())
    rows = load_texts(heldout).examples
    eos = spm.tokenizer.eos_token
    ended = [Example(prompt=e.prompt, completion=e.completion + eos) for e in rows]
    for folder in [*adapters, None]:
        name = None
        if folder is not None:
            adapter = load_adapter(folder)
            spm.add_adapter(adapter)
            name = adapter.name
        plain = choice_accuracy(spm, rows, name).accuracy
        with_eos = choice_accuracy(spm, ended, name).accuracy
        record = {"adapter": folder or "base", "choice": round(plain, 3)}
        print(json.dumps({**record, "choice_with_eos": round(with_eos, 3)}), flush=True)
        if name is not None:
            spm.remove_adapter(name)


if __name__ == "__main__":
    main()
