"""Is the Hugging Face Hub within reach? Decided in seconds, before lm-eval downloads.

lm-eval fetches each task's dataset with ``datasets.load_dataset``; without a
network that retries for half a minute and ends in a long traceback. So
``rgemma eval`` asks first: ``offline_reason()`` is None when the Hub (or the
proxy in front of it) accepts a TCP connection within a few seconds, else why
not (an ``HF_*_OFFLINE`` variable, or the failed connection). ``go_offline()``
then puts ``huggingface_hub`` and ``datasets`` in offline mode, so a dataset
missing from the local cache fails at once instead of retrying.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from urllib.parse import urlsplit

DEFAULT_ENDPOINT = "https://huggingface.co"
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
PROBE_TIMEOUT = 2.5  # seconds for the name lookup and the TCP connection together
_TRUE = {"1", "ON", "YES", "TRUE"}


def offline_reason(timeout: float = PROBE_TIMEOUT) -> str | None:
    """Why the Hub cannot be used now (None: it can)."""
    for name in OFFLINE_VARIABLES:
        if os.environ.get(name, "").strip().upper() in _TRUE:
            return f"{name} is set"
    host, port = probe_address()
    if not can_connect(host, port, timeout):
        return f"cannot connect to {host}:{port} within {timeout:g} s"
    return None


def probe_address() -> tuple[str, int]:
    """(host, port) a download would connect to first: the proxy if one is set for the
    endpoint's scheme, else the endpoint (``HF_ENDPOINT``, default huggingface.co)."""
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT)
    scheme = endpoint.scheme or "https"
    proxy = os.environ.get(f"{scheme}_proxy") or os.environ.get(f"{scheme.upper()}_PROXY")
    target = urlsplit(proxy if "://" in (proxy or "") else f"http://{proxy}") if proxy else None
    if target is None or not target.hostname:
        target = endpoint
    try:
        port = target.port
    except ValueError:
        port = None
    default = 443 if (target.scheme or scheme) == "https" else 80
    return target.hostname or "huggingface.co", port or default


def can_connect(host: str, port: int, timeout: float) -> bool:
    """True if ``host:port`` accepts a TCP connection within ``timeout`` seconds, name
    lookup included (which socket timeouts do not bound: it runs in a thread)."""
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except (OSError, ValueError):
            result.append(False)

    thread = threading.Thread(target=probe, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def go_offline() -> None:
    """Offline mode for ``huggingface_hub`` and ``datasets``: the environment variables
    (for modules imported later) and the flags of those already imported (they read
    the variables once, at import)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None:
        hub.HF_HUB_OFFLINE = True
    config = sys.modules.get("datasets.config")
    if config is not None:
        config.HF_HUB_OFFLINE = True
        config.HF_DATASETS_OFFLINE = True


def is_network_error(e: BaseException) -> bool:
    """True for an error (or one of its causes) that says the network was needed."""
    seen = 0
    while e is not None and seen < 10:
        name = type(e).__name__
        if isinstance(e, ConnectionError | TimeoutError | socket.gaierror) or any(
            word in name for word in ("Connection", "Timeout", "Offline")
        ):
            return True
        e = e.__cause__ or e.__context__
        seen += 1
    return False
