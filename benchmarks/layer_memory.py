"""Activation memory of one MoE-LoRA layer (the tensors autograd saves) against PEFT LoRA at equal active rank.

Target: the bytes one riemix layer keeps for its backward, beyond its input x, are at most those of PEFT
LoRA with rank k·r (the rank a token actually passes through).

Method: one forward runs inside ``torch.autograd.graph.saved_tensors_hooks``; the pack hook records the
untyped storage (``data_ptr``, ``nbytes``) of every saved tensor, once per storage (a view counts its whole
storage: that is what stays alive).  Storages of the module's parameters and buffers are left out (weights
are not activation memory); the storage of x is reported apart, because every candidate keeps it (the
base linear needs it for its own backward only when its weight is trained, but any adapter needs it).
Each candidate is measured at N and N/2 tokens: a storage whose size does not change with N is a copy
of weights made by the forward (``weight-derived``), the rest is per-token activation memory.  The second
measure is the peak of the CPU allocations (torch profiler memory events, no ``torch.cuda``) over one
forward+backward with a given upstream gradient, counted from before the forward.

Candidates, all with an input that requires grad and a frozen base ``nn.Linear(in, in)``:

- ``base``: the frozen Linear alone;
- ``peft_lora_r<R>``: PEFT LoRA (``get_peft_model`` on a one-Linear module) at every active rank below;
- ``riemix_E<E>_k<k>_r<r>_<path>[_recompute]``: ``MoELoRALinear`` (softmax-top-k routing) with
  ``expert_compute`` forced to the dense or the sparse path, for the configs in ``CONFIGS``; the dense
  path keeping h for the backward (the default) or recomputing it there (``recompute_hidden=True``, the
  ``_recompute`` rows; the sparse path always recomputes it).

Prints a table and the saved-tensor breakdown of the riemix rows; writes JSON to
``benchmarks/results/layer_memory_<dtype>.json`` (``--out`` to override).

    python benchmarks/layer_memory.py                      # in=out=2048, N=2048 tokens, fp32
    python benchmarks/layer_memory.py --dtype bfloat16
    python benchmarks/layer_memory.py --quick --out /tmp/layer_memory.json   # small smoke run
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lib.harness import record_header, script_parser, write_record
from torch import nn

from riemix.core.layer import MoELoRALinear

#: The riemix configurations ``(E, k, r, expert_compute)``; the active rank of each is k·r.
CONFIGS = ((8, 2, 4, "dense"), (8, 2, 4, "sparse"), (20, 10, 4, "dense"), (64, 2, 8, "sparse"), (64, 2, 8, "dense"))
MIB = 2.0**20


def saved_storages(module: nn.Module, x: torch.Tensor) -> list[dict[str, Any]]:
    """The distinct non-weight storages that one forward of ``module`` on ``x`` saves for its backward.

    Args:
        module: the layer; the storages of its parameters and buffers are not counted.
        x: ``(N, in)`` input that requires grad.

    Returns:
        One dict per storage, in the order first saved: ``shapes`` (of every saved tensor viewing it),
        ``dtype``, ``bytes`` (the storage's ``nbytes``) and ``is_x`` (it is x's storage).
    """
    weights = {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers())}
    x_ptr = x.untyped_storage().data_ptr()
    seen: dict[int, dict[str, Any]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if ptr in weights or nbytes == 0:
            return t
        entry = seen.setdefault(
            ptr, {"shapes": [], "dtype": str(t.dtype).removeprefix("torch."), "bytes": nbytes, "is_x": ptr == x_ptr}
        )
        entry["shapes"].append(list(t.shape))
        return t  # keep the tensor itself: saved storages stay alive, so no pointer is reused meanwhile

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x)  # (N, out)
    del out  # frees the graph and what it saved
    return list(seen.values())


def classify(at_n: list[dict[str, Any]], at_half: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mark each storage of ``at_n`` per-token (its size changes between N and N/2 tokens) or not.

    Raises:
        RuntimeError: when the two forwards saved different numbers of storages (no pairing possible).
    """
    if len(at_n) != len(at_half):
        raise RuntimeError(f"{len(at_n)} storages saved at N tokens but {len(at_half)} at N/2: cannot pair them")
    return [{**full, "per_token": full["bytes"] != half["bytes"]} for full, half in zip(at_n, at_half, strict=True)]


def peak_bytes(module: nn.Module, x: torch.Tensor, upstream: torch.Tensor) -> int | None:
    """Peak of the net CPU allocations over ``module(x).backward(upstream)``, from before the forward.

    Read from the profiler's memory events (allocations positive, frees negative); None when this torch
    does not expose them.  Gradients are cleared before and after.
    """
    from torch.profiler import ProfilerActivity, profile

    x.grad = None
    module.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        module(x).backward(upstream)
    x.grad = None
    module.zero_grad(set_to_none=True)
    try:
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except AttributeError:
        return None
    total = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        total += event.nbytes()
        peak = max(peak, total)
    return peak


def peft_layer(base: nn.Linear, rank: int, dtype: torch.dtype) -> nn.Module:
    """PEFT's LoRA layer of rank ``rank`` on a copy of ``base`` (``lora_dropout=0``, B ~ N(0, 0.01²))."""
    from peft import LoraConfig, get_peft_model

    holder = nn.Module()
    holder.proj = nn.Linear(base.in_features, base.out_features, bias=False).to(dtype)
    holder.proj.weight.data.copy_(base.weight.data)
    holder.forward = lambda x: holder.proj(x)
    config = LoraConfig(r=rank, lora_alpha=16, target_modules=["proj"], lora_dropout=0.0)
    model = get_peft_model(holder, config).to(dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.01)
    return model.base_model.model.proj


def riemix_layer(
    base: nn.Linear, experts: int, top_k: int, rank: int, path: str, dtype: torch.dtype, recompute: bool = False
) -> nn.Module:
    """``MoELoRALinear`` on ``base`` as ``layer_speed.py`` builds it, ``expert_compute=path``."""
    layer = MoELoRALinear(
        base, experts, rank, alpha=16.0, top_k=top_k, gate_grad_power=0.5, expert_compute=path,
        recompute_hidden=recompute,
    )  # fmt: skip
    layer = layer.to(dtype)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.01)
    return layer


def candidates(width: int, dtype: torch.dtype) -> list[tuple[str, int, Callable[[], nn.Module]]]:
    """``(name, active rank, builder)`` of every candidate; PEFT rows only when peft is installed."""
    torch.manual_seed(0)
    base = nn.Linear(width, width, bias=False).to(dtype).requires_grad_(False)
    rows: list[tuple[str, int, Callable[[], nn.Module]]] = [("base", 0, lambda: base)]
    try:
        import peft  # noqa: F401
    except ImportError:
        print("peft not installed: skipping the PEFT LoRA candidates (pip install peft)")
    else:
        for rank in sorted({k * r for _, k, r, _ in CONFIGS}):
            rows.append((f"peft_lora_r{rank}", rank, lambda rank=rank: peft_layer(base, rank, dtype)))
    for (e, k, r, path), recompute in itertools.product(CONFIGS, (False, True)):
        if recompute and path == "sparse":
            continue  # the sparse path always recomputes h
        build = lambda e=e, k=k, r=r, path=path, rc=recompute: riemix_layer(base, e, k, r, path, dtype, rc)  # noqa: E731
        rows.append((f"riemix_E{e}_k{k}_r{r}_{path}{'_recompute' if recompute else ''}", k * r, build))
    return rows


def measure(width: int, tokens: int, dtype: torch.dtype, with_peak: bool = True) -> list[dict[str, Any]]:
    """Saved bytes (x, beyond x, per-token, weight-derived), breakdown and peak of every candidate.

    Args:
        width: in = out features.
        tokens: N.
        dtype: parameter and activation dtype.
        with_peak: also measure the fwd+bwd allocation peak (``peak_bytes``).

    Returns:
        One row per candidate (see the JSON's ``candidates``), ratios to PEFT filled in.
    """
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, width, generator=gen).to(dtype).requires_grad_(True)  # (N, in)
    x_half = torch.randn(tokens // 2, width, generator=gen).to(dtype).requires_grad_(True)  # (N/2, in)
    upstream = torch.randn(tokens, width, generator=gen).to(dtype)  # (N, out)
    rows = []
    for name, active_rank, build in candidates(width, dtype):
        module = build()
        saved = classify(saved_storages(module, x), saved_storages(module, x_half))
        beyond = [s for s in saved if not s["is_x"]]
        rows.append(
            {
                "name": name,
                "family": name.split("_")[0],
                "active_rank": active_rank,
                "x_bytes": sum(s["bytes"] for s in saved if s["is_x"]),
                "beyond_x_bytes": sum(s["bytes"] for s in beyond),
                "per_token_bytes": sum(s["bytes"] for s in beyond if s["per_token"]),
                "weight_derived_bytes": sum(s["bytes"] for s in beyond if not s["per_token"]),
                "peak_fwd_bwd_bytes": peak_bytes(module, x, upstream) if with_peak else None,
                "saved": saved,
            }
        )
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Set ``ratio_to_peft`` and ``per_token_ratio_to_peft`` (None without a PEFT row at that rank)."""
    peft = {row["active_rank"]: row for row in rows if row["family"] == "peft"}
    for row in rows:
        ref = peft.get(row["active_rank"])
        ok = ref is not None and row["family"] != "base"
        row["ratio_to_peft"] = row["beyond_x_bytes"] / ref["beyond_x_bytes"] if ok else None
        row["per_token_ratio_to_peft"] = row["per_token_bytes"] / ref["per_token_bytes"] if ok else None


def _mib(value: int | None) -> str:
    """Bytes as a MiB table cell (``-`` for None)."""
    return "-" if value is None else f"{value / MIB:.3f}"


def _ratio(value: float | None) -> str:
    """A ratio as a table cell (``-`` for None)."""
    return "-" if value is None else f"{value:.2f}x"


def print_table(rows: Sequence[dict[str, Any]]) -> None:
    """The summary table, then each riemix row's saved storages (largest first)."""
    head = ("candidate", "rank", "x MiB", "beyond x", "per-token", "weights", "vs PEFT", "per-tok vs", "peak MiB")
    print(f"{head[0]:<28} {head[1]:>5} " + " ".join(f"{h:>10}" for h in head[2:]))
    for row in rows:
        cells = [_mib(row[key]) for key in ("x_bytes", "beyond_x_bytes", "per_token_bytes", "weight_derived_bytes")]
        cells += [_ratio(row["ratio_to_peft"]), _ratio(row["per_token_ratio_to_peft"])]
        cells.append(_mib(row["peak_fwd_bwd_bytes"]))
        print(f"{row['name']:<28} {row['active_rank']:>5} " + " ".join(f"{c:>10}" for c in cells))
    for row in rows:
        if row["family"] != "riemix":
            continue
        verdict = "met" if row["ratio_to_peft"] is not None and row["ratio_to_peft"] <= 1.0 else "NOT met"
        print(f"\n{row['name']} (beyond x <= PEFT at rank {row['active_rank']}: {verdict})")
        for s in sorted(row["saved"], key=lambda s: -s["bytes"]):
            kind = "x" if s["is_x"] else ("per-token" if s["per_token"] else "weight-derived")
            shapes = ", ".join("(" + ", ".join(map(str, shape)) + ")" for shape in s["shapes"])
            elements = s["bytes"] // getattr(torch, s["dtype"]).itemsize
            if all(math.prod(shape) < elements for shape in s["shapes"]):
                shapes += f"  [views of a {elements}-element storage]"
            print(f"  {s['bytes'] / MIB:9.3f} MiB  {s['dtype']:<8} {kind:<14} {shapes}")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse the command line, measure every candidate, print the table and write the JSON.

    Returns:
        The record written.
    """
    parser = script_parser(__doc__)
    parser.add_argument("--width", type=int, default=None, help="in = out features (default 2048; 256 with --quick)")
    parser.add_argument("--tokens", type=int, default=None, help="N (default 2048; 256 with --quick)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--no-peak", action="store_true", help="skip the profiler fwd+bwd peak measure")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (bytes do not depend on it)")
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    parser.add_argument("--out", default=None, help="JSON output path")
    args = parser.parse_args(argv)
    size = 256 if args.quick else 2048
    args.width = args.width or size
    args.tokens = args.tokens or size
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)  # one: OpenMP regions (index_add_) stall on a busy shared machine
    try:
        rows = measure(args.width, args.tokens, getattr(torch, args.dtype), with_peak=not args.no_peak)
        header = record_header("layer_memory")
    finally:
        torch.set_num_threads(threads)
    print(f"Saved-tensor memory of one layer: in=out={args.width}, N={args.tokens} tokens, {args.dtype}")
    print_table(rows)
    record = {
        **header,
        "args": vars(args),
        "target": "riemix beyond_x_bytes <= PEFT LoRA beyond_x_bytes at equal active rank (k*r)",
        "configs": [{"experts": e, "top_k": k, "rank": r, "expert_compute": p} for e, k, r, p in CONFIGS],
        "candidates": rows,
        "ratios": {row["name"]: row["ratio_to_peft"] for row in rows if row["family"] == "riemix"},
    }
    write_record(record, "layer_memory", args.quick, args.out, tail=f"_{args.dtype}")
    return record


if __name__ == "__main__":
    main()
