"""One quick look at whether the Hugging Face Hub is reachable, before anything asks it.

Without a network, huggingface_hub retries each request with backoff (about 50 s and a page of
warnings for one unknown model id). When the Hub cannot be reached, softprompt switches the
Hugging Face libraries to offline mode instead: cached models and datasets still load, and
anything else fails at once with one clear message.
"""

from __future__ import annotations

import os
import socket
import sys
from urllib.parse import urlparse

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def go_offline_if_unreachable(timeout: float = 3.0) -> bool:
    """Set offline mode when the Hub endpoint does not accept a connection; True if reachable.

    Must run before huggingface_hub is imported, which reads these variables once.
    """
    if is_offline():
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname or "", port), timeout=timeout).close()
        return True
    except OSError:
        if "huggingface_hub" in sys.modules:  # too late to switch; requests will retry
            return False
        for name in OFFLINE_VARS:
            os.environ[name] = "1"
        return False


def unreachable_note() -> str:
    """A hint to add to load errors when offline mode is on."""
    return " (the Hugging Face Hub is not reachable: offline mode)" if is_offline() else ""
