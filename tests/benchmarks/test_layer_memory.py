"""benchmarks/layer_memory.py: the saved-tensor measure, checked on cases whose bytes are known by hand."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("peft")
import layer_memory  # noqa: E402

TOKENS, WIDTH = 48, 32  # N and in = out of the smoke run (tokens differ from width on purpose)
ROW_KEYS = {
    "name",
    "family",
    "active_rank",
    "x_bytes",
    "beyond_x_bytes",
    "per_token_bytes",
    "weight_derived_bytes",
    "peak_fwd_bwd_bytes",
    "saved",
    "ratio_to_peft",
    "per_token_ratio_to_peft",
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_quick_run_writes_the_record_and_measures_known_cases_exactly(tmp_path, dtype):
    out = tmp_path / "layer_memory.json"
    argv = ["--quick", "--tokens", str(TOKENS), "--width", str(WIDTH), "--dtype", dtype, "--out", str(out)]
    returned = layer_memory.main(argv)
    record = json.loads(out.read_text())
    assert record == returned
    assert {"benchmark", "date", "machine", "args", "target", "configs", "candidates", "ratios"} <= set(record)
    assert record["benchmark"] == "layer_memory" and record["args"]["tokens"] == TOKENS
    rows = {row["name"]: row for row in record["candidates"]}
    configs = [(c, tail) for c in layer_memory.CONFIGS for tail in ("", "_recompute") if c[3] == "dense" or not tail]
    riemix = [f"riemix_E{e}_k{k}_r{r}_{p}{tail}" for (e, k, r, p), tail in configs]
    assert list(rows) == ["base", "peft_lora_r8", "peft_lora_r16", "peft_lora_r40", *riemix]
    assert set(record["ratios"]) == set(riemix)
    for row in rows.values():
        assert set(row) == ROW_KEYS
        assert row["beyond_x_bytes"] == row["per_token_bytes"] + row["weight_derived_bytes"]
        assert row["x_bytes"] + row["beyond_x_bytes"] == sum(s["bytes"] for s in row["saved"])
        assert row["peak_fwd_bwd_bytes"] is None or row["peak_fwd_bwd_bytes"] > 0
    size = torch.empty((), dtype=getattr(torch, dtype)).element_size()  # bytes per element, independently
    # The frozen base adds nothing beyond x (with its weight frozen it does not even keep x).
    assert rows["base"]["beyond_x_bytes"] == 0 and rows["base"]["x_bytes"] in (0, TOKENS * WIDTH * size)
    # PEFT LoRA keeps x (for ∂L/∂A) and h = x Aᵀ (N, r) for ∂L/∂B: exactly N·r elements beyond x.
    for rank in (8, 16, 40):
        row = rows[f"peft_lora_r{rank}"]
        assert row["x_bytes"] == TOKENS * WIDTH * size
        assert row["beyond_x_bytes"] == TOKENS * rank * size and row["weight_derived_bytes"] == 0
        assert row["ratio_to_peft"] == 1.0
    # Every riemix layer keeps x itself, counted apart, and its ratio is to PEFT at rank k·r.
    # Recomputing h, it keeps only the gates: less than PEFT at that rank.
    for ((_, k, r, _), tail), name in zip(configs, riemix, strict=True):
        row = rows[name]
        assert row["active_rank"] == k * r and row["x_bytes"] == TOKENS * WIDTH * size
        assert row["ratio_to_peft"] == row["beyond_x_bytes"] / rows[f"peft_lora_r{k * r}"]["beyond_x_bytes"]
        if tail or name.endswith("_sparse"):
            assert row["ratio_to_peft"] <= 1.0


def test_weight_storages_are_excluded_and_views_count_their_storage_once():
    class Twice(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(4, 6))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            wide = x @ torch.cat([self.w, self.w]).t()  # (N, 8): a new storage, saved through two views
            return (wide[:, :4] * wide[:, 4:]) @ self.w  # (N, 6); saves w, which is a parameter

    x = torch.randn(5, 6, requires_grad=True)
    saved = layer_memory.saved_storages(Twice(), x)
    wide = [s for s in saved if not s["is_x"] and s["shapes"] == [[5, 4], [5, 4]]]
    assert len(wide) == 1 and wide[0]["bytes"] == 5 * 8 * 4  # one entry, the whole (5, 8) storage
    assert sum(s["bytes"] for s in saved if s["is_x"]) == 5 * 6 * 4
