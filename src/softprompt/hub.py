"""One quick look at whether the Hugging Face Hub is reachable, before anything asks it.

Without a network, huggingface_hub retries each request with backoff (about 50 s and a page of
warnings for one unknown model id). When the Hub cannot be reached, softprompt switches the
Hugging Face libraries to offline mode instead: cached models and datasets still load, and
anything else fails at once with one clear message.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.error
import urllib.request

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub endpoint (``HF_ENDPOINT`` or huggingface.co) answers at all.

    Goes through the user's proxy settings (``HTTPS_PROXY``, ``HTTP_PROXY``, ``NO_PROXY``), as
    the Hugging Face libraries do. Any answer counts, an HTTP error or a TLS failure included:
    only a connection that cannot be made (no route, refused, no DNS, timeout) means unreachable.
    """
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    request = urllib.request.Request(endpoint + "/", method="HEAD")
    try:
        # A new opener reads the proxy variables now (urlopen's global one keeps its first).
        urllib.request.build_opener().open(request, timeout=timeout).close()
    except urllib.error.HTTPError:
        return True
    except urllib.error.URLError as exc:
        return isinstance(exc.reason, ssl.SSLError)
    except ssl.SSLError:
        return True
    except (OSError, ValueError):
        return False
    return True


def go_offline_if_unreachable(timeout: float = 3.0) -> bool:
    """Set offline mode when the Hub endpoint cannot be reached; True if it can.

    Must run before huggingface_hub is imported, which reads these variables once.
    """
    if is_offline():
        return False
    if hub_reachable(timeout):
        return True
    if "huggingface_hub" not in sys.modules:  # too late to switch otherwise; requests will retry
        for name in OFFLINE_VARS:
            os.environ[name] = "1"
    return False


def unreachable_note() -> str:
    """A hint to add to load errors when offline mode is on."""
    return " (the Hugging Face Hub is not reachable: offline mode)" if is_offline() else ""


ADAPTER_FILES = [
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
    "README.md",
    "training_config.json",
    "loss_log.json",
    "loss.png",
]
"""An adapter folder's files on the Hub: what ``push`` uploads (when present; never the
held-out data) and what a download fetches."""


def hub_adapter(ref: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``ref`` names a Hub adapter (``owner/name[@revision]``) and
    no local path; None for a local path."""
    from pathlib import Path

    if Path(ref).exists() or ref.startswith((".", "/", "~")):
        return None
    repo, _, revision = ref.partition("@")
    parts = repo.split("/")
    if len(parts) != 2 or not all(parts):
        return None
    return repo, revision or None


def download_adapter(repo_id: str, revision: str | None = None) -> str:
    """The local folder of a Hub adapter, downloaded into the standard Hugging Face cache (or
    found there: offline, a cached copy loads without the network).

    Raises:
        UserError: no such repository or revision, or not cached while offline.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from .errors import UserError

    where = f"{repo_id}@{revision}" if revision else repo_id
    try:
        return str(snapshot_download(repo_id, revision=revision, allow_patterns=ADAPTER_FILES))
    except RepositoryNotFoundError as exc:
        raise UserError(f"adapter {where}: no such repository on the Hub (or no access)") from exc
    except RevisionNotFoundError as exc:
        raise UserError(f"adapter {where}: no such revision") from exc
    except LocalEntryNotFoundError as exc:
        raise UserError(
            f"adapter {where} is not in the local Hugging Face cache{unreachable_note()}"
        ) from exc
    except (HfHubHTTPError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"adapter {where}: {first}") from exc
