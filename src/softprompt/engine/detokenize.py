"""Text of many sequences at once, decoding only each one's newest tokens.

Decoding a whole completion again at every step costs more per token the longer it gets (at a
GPU's speeds, as long as the whole decode step; docs/benchmarks/engine.md). Here each step
decodes, for every row in one call into the tokenizer's Rust
side, only a short window: the tokens since the last committed point, with one earlier token of
context so that decoders which treat the first token specially (SentencePiece's leading space)
give the same text as a whole decode. Text that ends in an incomplete UTF-8 character (shown as
U+FFFD) is not committed until the character completes.
"""

from __future__ import annotations

from typing import Any


class Detokenizer:
    """``texts(seqs)``: each sequence's whole output text, as ``tokenizer.decode`` gives it.

    A sequence carries ``output_ids``, ``decoded`` (the committed text, of
    ``output_ids[:read_offset]``), ``prefix_offset`` and ``read_offset``, all updated here.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        # transformers' decode adds a clean-up pass on top of the backend for some tokenizers;
        # those decode whole texts the slow, exact way.
        cleans = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
        self.backend = backend if backend is not None and not cleans else None

    def texts(self, seqs: list[Any]) -> list[str]:
        if self.backend is None:
            return [self.tokenizer.decode(s.output_ids, skip_special_tokens=True) for s in seqs]
        windows = []
        for s in seqs:
            windows.append(s.output_ids[s.prefix_offset : s.read_offset])
            windows.append(s.output_ids[s.prefix_offset :])
        decoded = self.backend.decode_batch(windows, skip_special_tokens=True)
        texts = []
        for j, s in enumerate(seqs):
            before, now = decoded[2 * j], decoded[2 * j + 1]
            new = now[len(before) :]
            texts.append(s.decoded + new)
            if new and not now.endswith("\ufffd"):
                s.decoded += new
                s.prefix_offset, s.read_offset = s.read_offset, len(s.output_ids)
        return texts
