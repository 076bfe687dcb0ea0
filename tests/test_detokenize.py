"""Incremental detokenization gives, at every step, exactly what decoding the whole output gives."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from softprompt.engine.detokenize import Detokenizer

TEXTS = [
    "héllo wörld, naïve café 😀 and 🚀 rockets",
    "日本語のテキストも 混ぜて, then English again.",
    "plain ascii words with   double  spaces\nand a newline",
]


def _byte_level() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def _metaspace() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<eos>"])
    tok.train_from_iterator(TEXTS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


@pytest.mark.parametrize("make", [_byte_level, _metaspace])
def test_every_step_equals_a_whole_decode(make):
    tokenizer = make()
    detok = Detokenizer(tokenizer)
    assert detok.backend is not None
    rng = random.Random(0)
    eos = tokenizer.eos_token_id
    targets = []
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"]
        # Random ids too: byte-level pieces that split characters, and an EOS in the middle.
        noise = [rng.randrange(tokenizer.vocab_size) for _ in range(12)] + [eos]
        targets.append(ids + noise + ids[:5])
    seqs = [
        SimpleNamespace(output_ids=[], decoded="", prefix_offset=0, read_offset=0) for _ in TEXTS
    ]
    partial = 0
    for step in range(max(len(t) for t in targets)):
        live = [s for s, t in zip(seqs, targets, strict=True) if step < len(t)]
        for s, t in zip(seqs, targets, strict=True):
            if step < len(t):
                s.output_ids.append(t[step])
        for s, text in zip(live, detok.texts(live), strict=True):
            whole = tokenizer.decode(s.output_ids, skip_special_tokens=True)
            assert text == whole
            partial += whole.endswith("\ufffd")
    if make is _byte_level:
        assert partial > 0  # the case that must wait for a character to complete did occur
