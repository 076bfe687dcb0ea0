"""The ``softprompt`` command: parses arguments, builds configs, calls the library.

Heavy imports (torch, transformers) happen inside the commands so ``--help`` answers at once.
Mistakes a user can fix end as one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..device import out_of_memory
from ..errors import Interrupted, UserError
from .parser import build_parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if _needs_hub(args):
        from ..hub import go_offline_if_unreachable

        go_offline_if_unreachable()
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        # One line, whatever a library put in the message.
        message = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        # One write: the processes of a distributed run share one stderr, line by line.
        sys.stderr.write(f"softprompt: error: {message}\n")
        sys.stderr.flush()
        return 2
    except Interrupted as exc:
        if str(exc):
            print(str(exc), file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("softprompt: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        if not out_of_memory(exc):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "out of memory"
        print(
            f"softprompt: error: out of memory ({first}); "
            "try a smaller --batch-size (serve: --max-batch-size) or --dtype bfloat16",
            file=sys.stderr,
        )
        return 2


def _needs_hub(args: argparse.Namespace) -> bool:
    """Whether a --model, --data or adapter names something that is neither local nor bundled
    (a Hub id: then a quick look decides whether to go offline)."""
    data = getattr(args, "data", None) or []
    refs = [getattr(args, "model", None), getattr(args, "eval_data", None)]
    refs += data if isinstance(data, list) else [data]
    if any(ref and not ref.startswith("examples:") and not Path(ref).exists() for ref in refs):
        return True
    if getattr(args, "command", None) == "push":  # push reads a local folder
        return False
    from ..hub import hub_adapter

    adapters = getattr(args, "adapter", None) or []
    adapters = [*(adapters if isinstance(adapters, list) else [adapters])]
    if getattr(args, "command", None) == "serve":  # NAME=REF
        adapters = [a.partition("=")[2] for a in adapters]
    adapters.append(getattr(args, "init_from", None))
    return any(ref and hub_adapter(ref) is not None for ref in adapters)
