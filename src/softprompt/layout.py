"""The token layout of an example, and which of its tokens the loss covers.

One place decides how text, prompt/completion and chat examples become token ids, so training,
evaluation and serving see the same tokens: a prompt trained on conversations is served through
the chat endpoint exactly as it was trained (the adapter's virtual tokens, then the template).

- text: its tokens and EOS, all scored;
- prompt/completion: the prompt's tokens (not scored), then the completion's and EOS (scored);
- chat: the model's chat template, rendered turn by turn; each assistant turn's tokens up to and
  including its end-of-turn token are scored, the rest (system, user, the template's own
  markup) is not.

Long examples are cut from the left of what is not scored (the prompt, earlier turns), never
inside what is; an example whose scored part alone does not fit is cut at its end and loses its
EOS, as a long plain text does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .data import Example
from .errors import UserError


@dataclass
class Layout:
    """An example's text token ids and, for each, whether the loss covers it."""

    ids: list[int]
    scored: list[bool]
    cut: bool = False
    """Whether the example was cut at its end to fit (so it lost its EOS)."""


def _encode(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"]) if text else []


def _render(tokenizer: Any, turns: list[dict[str, str]], generation: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(
            turns, add_generation_prompt=generation, tokenize=False
        )
    except Exception as exc:  # noqa: BLE001 - a template that rejects these messages
        raise UserError(f"the chat template refused a conversation: {exc}") from exc
    return str(text)


def chat_layout(
    tokenizer: Any, messages: Sequence[tuple[str, str]], add_generation_prompt: bool = False
) -> Layout:
    """A conversation through the model's chat template, piece by piece: the text before each
    assistant turn (not scored) and the turn itself (scored up to its end-of-turn token).

    With ``add_generation_prompt``, what the model is asked to continue (serving): the whole
    conversation, then the template's opening of an assistant turn.

    Raises:
        UserError: the model has no chat template, or its renderings of a conversation and of
            its first turns do not start the same way (the turns cannot be told apart).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("this model has no chat template: train on text or prompt/completion data")
    turns = [{"role": role, "content": content} for role, content in messages]
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    scored: list[bool] = []
    done = ""  # the rendered text already turned into ids

    def take(text: str, score: bool) -> None:
        nonlocal done
        if not text.startswith(done):
            raise UserError(
                "the chat template renders a conversation's first turns differently from the "
                "whole conversation; softprompt cannot tell its assistant turns apart"
            )
        piece = _encode(tokenizer, text[len(done) :], special=False)
        marks = [score] * len(piece)
        if score and eos in piece:  # what follows the end-of-turn token is never generated
            last = len(piece) - 1 - piece[::-1].index(eos)
            marks = [i <= last for i in range(len(piece))]
        ids.extend(piece)
        scored.extend(marks)
        done = text

    try:
        for i, (role, _) in enumerate(messages):
            if role == "assistant":
                take(_render(tokenizer, turns[:i], generation=True), score=False)
                take(_render(tokenizer, turns[: i + 1], generation=False), score=True)
    except UserError:
        if not add_generation_prompt:
            raise
        # Serving only: a template whose turns cannot be told apart cannot have been trained
        # on, so the conversation is sent as one rendering, as any server would.
        whole = _encode(tokenizer, _render(tokenizer, turns, generation=True), special=False)
        return Layout(whole, [False] * len(whole))
    if add_generation_prompt:
        take(_render(tokenizer, turns, generation=True), score=False)
    return Layout(ids, scored)


def prompt_ids(tokenizer: Any, example: Example) -> list[int]:
    """What a model is asked to continue for ``example``: its prompt's tokens, or for a chat
    task row (a conversation before an assistant turn) the conversation in the chat template
    and the opening of the assistant's turn, as the chat endpoint sends it."""
    if example.messages is not None:
        return chat_layout(tokenizer, example.messages, add_generation_prompt=True).ids
    return _encode(tokenizer, example.prompt, special=True)


def example_layout(tokenizer: Any, example: Example, max_length: int, eos: bool = True) -> Layout:
    """The text tokens of ``example`` (at most ``max_length``) and which of them are scored.

    A conversation scores its assistant turns; a chat task row (a conversation and the
    ``completion`` of the assistant turn that follows it) scores that completion and the
    end-of-turn token. ``eos=False`` leaves the EOS (end of turn) off a completion: rank
    classification scores a candidate's own tokens, as lm-evaluation-harness does (with EOS where
    one candidate's tokens begin another's: ``scoring.choice_scores``)."""
    eos_id = tokenizer.eos_token_id
    if example.messages is not None and not example.completion:
        layout = chat_layout(tokenizer, example.messages)
    else:
        prompt = prompt_ids(tokenizer, example)
        completion = _encode(tokenizer, example.completion, special=not prompt)
        if eos and eos_id is not None:
            completion.append(eos_id)
        layout = Layout(prompt + completion, [False] * len(prompt) + [True] * len(completion))
    over = len(layout.ids) - max_length
    if over <= 0:
        return layout
    # Cut the unscored lead first (the prompt's start, earlier turns), never a scored token.
    lead = next((i for i, s in enumerate(layout.scored) if s), len(layout.scored))
    drop = min(over, lead)
    ids, scored = layout.ids[drop:], layout.scored[drop:]
    if len(ids) > max_length:  # the scored part alone does not fit: cut its end, and its EOS
        ids, scored = ids[:max_length], scored[:max_length]
        return Layout(ids, scored, cut=True)
    return Layout(ids, scored, cut=False)
