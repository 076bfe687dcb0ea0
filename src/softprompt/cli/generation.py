"""``softprompt generate``, ``compare`` and ``embeds``: prompts through the engine, side by
side, or as the tensors another engine takes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from .common import (
    add_adapters,
    generate_config,
    load_base,
    load_model,
    quiet,
    read_adapters,
)

if TYPE_CHECKING:
    pass


def _read_requests(path: str, names: list[str]) -> list[Any]:
    from ..generation import Request

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text ({exc.reason})") from exc
    requests = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise UserError(f'{path}:{number}: expected {{"prompt": "...", "adapter": ...}}')
        adapter = item.get("adapter")
        if adapter is not None and adapter not in names:
            known = ", ".join(names) or "none loaded; pass --adapter DIR"
            raise UserError(f"{path}:{number}: unknown adapter {adapter!r} (adapters: {known})")
        seed = item.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise UserError(f"{path}:{number}: seed must be an integer, not {seed!r}")
        requests.append(Request(prompt=item["prompt"], adapter=adapter, seed=seed))
    if not requests:
        raise UserError(f"{path} has no requests")
    return requests


def cmd_generate(args: argparse.Namespace) -> int:
    from ..generation import Request

    config = generate_config(args)
    if bool(args.prompt) == bool(args.requests):
        raise UserError("give --prompt (repeatable) or --requests FILE.jsonl, not both")
    quiet()
    from ..generation import generate

    adapters = read_adapters(args.adapter, args.allow_pickle)
    spm = load_model(args)
    names = add_adapters(spm, adapters)
    if args.requests:
        requests = _read_requests(args.requests, names)
    else:
        targets: list[str | None] = ([None] if args.with_base or not names else []) + names
        requests = [Request(p, a, chat=args.chat) for p in args.prompt for a in targets]
    completions = generate(
        spm,
        requests,
        config,
        batch_size=args.batch_size,
        progress=not args.json and len(requests) > args.batch_size,
    )
    for request, completion in zip(requests, completions, strict=True):
        if args.json:
            print(
                json.dumps(
                    {
                        "prompt": request.prompt,
                        "adapter": request.adapter,
                        "chat": request.chat,
                        "completion": completion,
                    }
                )
            )
        elif request.chat:
            print(
                f"[{request.adapter or 'base'}] user: {request.prompt}\nassistant: {completion}\n"
            )
        else:
            print(f"[{request.adapter or 'base'}] {request.prompt}{completion}\n")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    config = generate_config(args)
    if not args.prompt:
        raise UserError("give at least one --prompt")
    if any(not p.strip() for p in args.prompt):
        raise UserError("a --prompt is empty; give some text")
    quiet()
    from ..insight.compare import compare, print_tables, to_markdown

    adapters = read_adapters(args.adapter, args.allow_pickle)
    spm = load_model(args)
    names = add_adapters(spm, adapters)
    comparisons = compare(spm, args.prompt, names, config)
    if args.json:
        print(json.dumps([c.as_dict() for c in comparisons]))
    elif args.markdown:
        print(to_markdown(comparisons))
    else:
        from rich.console import Console

        print_tables(comparisons, Console())
    return 0


def cmd_embeds(args: argparse.Namespace) -> int:
    if not args.output and not args.base64:
        raise UserError("give --output FILE.pt, --base64, or both")
    output = Path(args.output) if args.output else None
    if output is not None and output.exists() and not args.overwrite:
        raise UserError(f"{output} exists; pass --overwrite to replace it")
    if output is not None and not output.parent.is_dir():
        raise UserError(f"folder {output.parent} does not exist")
    adapters = read_adapters([args.adapter], args.allow_pickle) if args.adapter else [None]
    if adapters[0] is not None and adapters[0].method == "prefix":
        raise UserError(
            f"{args.adapter} is a prefix (deep prompt) adapter: keys and values at every layer, "
            "which prompt_embeds (input rows) cannot carry; serve it with softprompt"
        )
    quiet()
    from ..embeds import prompt_embeds, to_base64, to_bytes
    from ..files import write_bytes

    base = load_base(args)
    try:
        tensor = prompt_embeds(base.model, base.tokenizer, adapters[0], args.prompt)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    if output is not None:
        write_bytes(output, to_bytes(tensor))
        print(
            f"softprompt: wrote {tuple(tensor.shape)} {tensor.dtype} to {output}", file=sys.stderr
        )
    if args.base64:
        print(to_base64(tensor))
    return 0
