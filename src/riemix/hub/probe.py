"""Is the Hugging Face hub usable right now? A quick reachability probe and a forced offline mode.

``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``) is honoured at call time, and an unreachable
hub is detected with one short TCP connection (through the configured proxy, if any), so that a
load from an offline machine fails at once instead of after minutes of retries.
"""

from __future__ import annotations

import contextlib
import os
import socket
import urllib.parse
import urllib.request
from collections.abc import Iterator

__all__ = ["HUB_PROBE_TIMEOUT_S", "hub_offline_mode", "hub_offline_reason"]

HUB_PROBE_TIMEOUT_S = 3.0
"""Seconds the connection probe waits for the hub (or the proxy) to answer."""


def _env_true(var: str) -> bool:
    return os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_offline_reason() -> str | None:
    """Return why the hub cannot be used right now, or ``None`` if it looks reachable.

    Returns:
        ``"HF_HUB_OFFLINE=1 is set"`` (or the ``TRANSFORMERS_OFFLINE`` equivalent), a note that
        ``huggingface_hub`` is in offline mode, ``"cannot connect to host:port (...)"``, or ``None``.
    """
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if _env_true(var):
            return f"{var}=1 is set"
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return "huggingface_hub is in offline mode"
        endpoint = constants.ENDPOINT
    except Exception:  # pragma: no cover - huggingface_hub always comes with transformers
        endpoint = "https://huggingface.co"
    url = urllib.parse.urlsplit(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme or "https")
    if proxy and not urllib.request.proxy_bypass(host):
        purl = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = purl.hostname or host, purl.port or 8080
    try:
        with socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S):
            return None
    except OSError as err:
        return f"cannot connect to {host}:{port} ({err})"


@contextlib.contextmanager
def hub_offline_mode(enabled: bool) -> Iterator[None]:
    """Force huggingface_hub's offline mode for the duration of a load.

    ``local_files_only=True`` alone is not enough: some transformers versions still probe the hub
    for an ``adapter_config.json`` and spend ~25 s in retries when it is unreachable. In offline
    mode every hub request fails immediately instead. (Process-global while active.)

    Args:
        enabled: Whether to switch offline mode on; ``False`` makes this a no-op.
    """
    if not enabled:
        yield
        return
    from huggingface_hub import constants

    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old
