"""Flags several commands share: the model, adapters, data, evaluation tasks, generation."""

from __future__ import annotations

import argparse

from ..device import DTYPES, device_name


def model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", help="Hub id or local folder (default: the embedded SmolLM2-135M-Instruct)"
    )
    p.add_argument(
        "--device",
        type=device_name,
        default="auto",
        help="auto, cpu, cuda or cuda:N (default: auto, a CUDA GPU when PyTorch sees one)",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="the base model's precision; auto: bfloat16 on a GPU that has it, else float32 "
        "(prompt rows and saved adapters are float32 either way); serve on a CPU with auto "
        "also measures linear layers in bfloat16 against float32 at start-up where the CPU has "
        "native bfloat16, and keeps the faster",
    )


def adapter_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument(
        "--adapter",
        action="append",
        default=None if required else [],
        required=required,
        metavar="DIR",
        help="adapter folder (repeatable)",
    )
    p.add_argument("--allow-pickle", action="store_true", help="accept adapter_model.bin")


def task_args(p: argparse.ArgumentParser, metrics: tuple[str, ...]) -> None:
    """Task metrics and the base model's baselines (eval and report)."""
    p.add_argument(
        "--metric",
        action="append",
        choices=metrics,
        help=("loss (default); " if "loss" in metrics else "")
        + "choice: each candidate completion ranked by its log-likelihood "
        "after the prompt, as lm-evaluation-harness does; exact: greedy completion equal to the "
        "reference, case and whitespace aside; pattern: greedy completion in which --pattern is "
        "found (repeatable)",
    )
    p.add_argument(
        "--choices",
        metavar="A,B,C",
        help="candidates for --metric choice (default: the distinct completions of the data)",
    )
    p.add_argument(
        "--choices-field",
        metavar="FIELD",
        help="field with each row's own candidates for --metric choice (a list of texts)",
    )
    p.add_argument(
        "--pattern",
        metavar="REGEX",
        help="for --metric pattern: a Python regular expression searched in each greedy "
        "completion; ^ anchors it at the start (e.g. '^Arr, matey!')",
    )
    p.add_argument(
        "--few-shot",
        type=int,
        default=0,
        metavar="K",
        help="also run the base model with K examples in context before each prompt (chat: as "
        "earlier turns), balanced over the completions, fixed seed: the baseline a prompt must "
        "beat (default: 0)",
    )
    p.add_argument(
        "--shots-from",
        metavar="DATA",
        help="where --few-shot examples come from (default: the training part of a bundled "
        "held-out set, or the training data of an --adapter that records --data as its "
        "held-out data); evaluated rows are never shots",
    )
    p.add_argument(
        "--instruction",
        metavar="TEXT",
        help="also run the base model with TEXT before each prompt (chat: as a system message; "
        "zero-shot with an instruction; with --few-shot, before the shots too)",
    )


def data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--text-field", help="field holding the text (default: 'text' or the only string field)"
    )
    p.add_argument(
        "--prompt-field",
        help="field of a prompt/completion dataset's prompts (default: 'prompt'); data with "
        "prompts and completions is scored on the completions only",
    )
    p.add_argument(
        "--completion-field",
        help="field of a prompt/completion dataset's completions (default: 'completion')",
    )
    p.add_argument(
        "--messages-field",
        help="field of a chat dataset's conversations, lists of {role, content} (default: "
        "'messages'); rendered with the model's chat template, scored on the assistant turns",
    )
    p.add_argument("--max-samples", type=int, help="use at most this many texts")


def generation_args(
    p: argparse.ArgumentParser, max_new_tokens: int = 64, repetition_penalty: float = 1.0
) -> None:
    p.add_argument(
        "--max-new-tokens", type=int, default=max_new_tokens, help="default: %(default)s"
    )
    p.add_argument(
        "--repetition-penalty", type=float, default=repetition_penalty, help="default: %(default)s"
    )
    p.add_argument(
        "--temperature", type=float, default=0.0, help="0 is greedy (default: %(default)s)"
    )
    p.add_argument("--top-p", type=float, default=1.0, help="default: %(default)s")
    p.add_argument(
        "--min-new-tokens",
        type=int,
        default=0,
        help="no end-of-sequence before this many new tokens (default: %(default)s)",
    )
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="end a completion before this text (repeatable)",
    )
    p.add_argument(
        "--ignore-eos",
        action="store_true",
        help="keep going past end-of-sequence up to --max-new-tokens",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of each sampled request (default: %(default)s)"
    )


def engine_limit_args(p: argparse.ArgumentParser) -> None:
    """How much prompt the serving engine computes a step, and keeps for reuse."""
    p.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=128,
        help="prompt tokens computed per engine step at most; a longer prompt is computed in "
        "chunks over several steps while running streams keep getting tokens: lower it for "
        "shorter stalls, raise it for faster prompts (default: %(default)s)",
    )
    p.add_argument(
        "--prefix-cache-mb",
        type=float,
        default=2048.0,
        help="memory for keys/values of prompt text kept and reused by later prompts that "
        "start the same way with the same adapter (a system prompt, few-shot examples, earlier "
        "chat turns); least recently used first out; 0 turns it off (default: %(default)g)",
    )
