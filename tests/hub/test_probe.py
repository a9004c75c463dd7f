"""riemix.hub.probe: an unreachable hub is detected quickly, without HF_HUB_OFFLINE."""

from __future__ import annotations

import time

import pytest

from riemix.hub import ModelLoadError, load_model, probe


def test_unreachable_hub_detected_without_offline_flag(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def refuse(*args, **kwargs):
        raise OSError("network is unreachable (test)")

    monkeypatch.setattr(probe.socket, "create_connection", refuse)
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="unreachable/offline.*cannot connect"):
        load_model("riemix-no-such-org/no-such-model")
    assert time.perf_counter() - start < 5
