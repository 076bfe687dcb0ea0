"""What several commands share: quieting libraries, loading the model and adapters, and the
data flags' fields.

Heavy imports (torch, transformers) happen inside the functions, so ``softprompt --help``
answers at once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError

if TYPE_CHECKING:
    from ..data import Fields


def quiet() -> None:
    """Silence library chatter that is not ours (weight-loading bars, deprecation notes)."""
    import warnings

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def load_base(args: argparse.Namespace, group: Any = None) -> Any:
    """The base model of ``--model`` on ``--device`` in ``--dtype`` (flags a command lacks
    take their defaults). In a data-parallel ``group``, joins it first (on this process's GPU)."""
    from ..device import resolve
    from ..models import load_base_model
    from ..tuning.distributed import device_for, setup

    device, dtype = resolve(getattr(args, "device", "auto"), getattr(args, "dtype", "auto"))
    if group is not None:
        device = device_for(group, device)
        if device.type == "cuda" and device.index is not None:  # a process of a group
            import torch

            torch.cuda.set_device(device)
        setup(device)
    if group is not None and getattr(args, "shard", False):
        import torch

        from ..tuning.distributed import shard_layers

        # Loaded in host memory, then each layer's shards go to the device as it is sharded:
        # the device never holds the whole model.
        base = load_base_model(args.model, dtype=dtype, device=torch.device("cpu"))
        shard_layers(base.model, group, device)
        return base
    return load_base_model(args.model, dtype=dtype, device=device)


def load_model(args: argparse.Namespace, group: Any = None) -> Any:
    from ..prompt import SoftPromptModel

    return SoftPromptModel(load_base(args, group))


def read_adapters(folders: list[str], allow_pickle: bool) -> list[Any]:
    """Read adapter folders (before any model is loaded, so bad ones fail fast)."""
    from ..adapters import load_adapter

    adapters = [load_adapter(folder, allow_pickle=allow_pickle) for folder in folders]
    names = [a.name for a in adapters]
    for name in names:
        if names.count(name) > 1:
            raise UserError(f"two adapters are named {name!r}; give them distinct folders")
    return adapters


def add_adapters(spm: Any, adapters: list[Any]) -> list[str]:
    """Load read adapters into ``spm``; returns their names (folder names)."""
    for adapter in adapters:
        made_for = adapter.config.get("base_model_name_or_path")
        if made_for and made_for != spm.base.name:
            print(
                f"softprompt: note: {adapter.name} was trained on {made_for}, "
                f"loading it on {spm.base.name}",
                file=sys.stderr,
            )
        spm.add_adapter(adapter)
    return [a.name for a in adapters]


COVERS = {"completion": "completions", "chat": "assistant turns"}


def fields_of(args: argparse.Namespace) -> Fields:
    """The fields ``--prompt-field``, ``--completion-field`` and ``--messages-field`` name."""
    from ..data import Fields

    return Fields(
        prompt=getattr(args, "prompt_field", None),
        completion=getattr(args, "completion_field", None),
        messages=getattr(args, "messages_field", None),
        choices=getattr(args, "choices_field", None),
    )


def data_and_field(source: str) -> tuple[str, str | None]:
    """``DATA[:FIELD]``: the whole of ``source`` when it names data (a bundled set, an existing
    path), else split at its last colon when what follows looks like a field name."""
    from ..data import EXAMPLE_PREFIX, EXAMPLES

    if source.startswith(EXAMPLE_PREFIX):
        parts = source[len(EXAMPLE_PREFIX) :].split(":")
        if len(parts) >= 2 and parts[1] not in ("train", "heldout"):
            return EXAMPLE_PREFIX + ":".join(parts[:-1]), parts[-1]
        if len(parts) == 3:
            return EXAMPLE_PREFIX + ":".join(parts[:2]), parts[2]
        if parts[0] in EXAMPLES or len(parts) > 1:
            return source, None
    if Path(source).expanduser().exists():
        return source, None
    data, sep, field = source.rpartition(":")
    if sep and data and field and "/" not in field and "\\" not in field:
        return data, field
    return source, None


def generate_config(args: argparse.Namespace) -> Any:
    """The sampling parameters the generation flags give; a bad value names its flag."""
    from ..engine import RequestError, SamplingParams

    try:
        return SamplingParams(
            max_new_tokens=args.max_new_tokens,
            min_new_tokens=args.min_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
            stop=args.stop,
            ignore_eos=args.ignore_eos,
            seed=args.seed,
        )
    except RequestError as exc:
        if exc.field is None:
            raise
        raise UserError(exc.renamed("--" + exc.field.replace("_", "-"))) from exc
