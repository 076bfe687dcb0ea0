"""``softprompt serve`` and ``push``: adapters served over HTTP, or uploaded to the Hub."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError
from .common import (
    quiet,
)

if TYPE_CHECKING:
    pass


def cmd_serve(args: argparse.Namespace) -> int:
    import torch

    from ..server.run import serve
    from ..upstream.engine import UpstreamSettings

    quiet()
    if args.upstream_timeout <= 0:
        raise UserError("--upstream-timeout must be above 0")
    upstream = UpstreamSettings(
        timeout=args.upstream_timeout,
        embeds_dtype=getattr(torch, args.embeds_dtype),
        api_key=args.upstream_api_key or None,
    )
    return serve(
        args.model,
        args.device,
        args.dtype,
        args.adapters,
        args.host,
        args.port,
        args.api_key or None,
        args.max_batch_size,
        args.max_tokens_cap,
        args.poll_seconds,
        args.max_body_bytes,
        max_queue=args.max_queue,
        drain_seconds=args.drain_seconds,
        named=args.adapter,
        retune=args.retune,
        max_messages=args.max_messages,
        public_metrics=args.public_metrics,
        max_prefill_tokens=args.max_prefill_tokens,
        prefix_cache_mb=args.prefix_cache_mb,
        upstreams=args.upstream,
        upstream=upstream,
    )


def cmd_push(args: argparse.Namespace) -> int:
    from huggingface_hub import ModelCard
    from huggingface_hub.utils import validate_repo_id

    from ..adapters import load_adapter
    from ..hub import ADAPTER_FILES

    folder = Path(args.adapter)
    load_adapter(folder, allow_pickle=args.allow_pickle)  # a folder that is not one fails here
    try:
        validate_repo_id(args.repo_id)
    except Exception as exc:  # noqa: BLE001 - huggingface_hub's validation error, any version
        raise UserError(f"{args.repo_id!r} is not a Hub repository id (owner/name): {exc}") from exc
    if "/" not in args.repo_id:
        raise UserError(f"{args.repo_id!r}: give the repository as owner/name")
    # what a Hub download fetches, when present (never the held-out data)
    files = [name for name in ADAPTER_FILES if (folder / name).is_file()]
    card = folder / "README.md"
    metadata = ModelCard.load(card).data.to_dict() if card.is_file() else {}
    message = args.commit_message or f"Upload {folder.name} with softprompt"
    if args.dry_run:
        where = f"{args.repo_id}@{args.revision or 'main'}"
        private = " (private)" if args.private else ""
        print(f"would upload to {where}{private}: {message!r}")
        for name in files:
            print(f"  {name}  {(folder / name).stat().st_size:,d} bytes")
        print("model card metadata:")
        print(json.dumps(metadata, indent=2))
        return 0
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        api.create_repo(args.repo_id, private=args.private, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            folder_path=str(folder),
            repo_id=args.repo_id,
            revision=args.revision,
            commit_message=message,
            allow_patterns=files,
        )
    except (HfHubHTTPError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"could not push to {args.repo_id}: {first}") from exc
    print(f"pushed {len(files)} files to {getattr(info, 'commit_url', None) or args.repo_id}")
    return 0
