"""Forward+backward time of one MoE-LoRA layer against its peers, measured side by side.

Candidates, all on the same frozen ``nn.Linear`` and the same input (which requires grad):

- ``base``: the frozen Linear alone;
- ``riemix``: ``MoELoRALinear`` (fused experts, gate-rescaled backward, softmax-top-k routing);
- ``loop``: the paper-style per-expert Python loop with the same routing and gate rescaling;
- ``peft_lora``: PEFT ``LoraLayer`` with rank E·r (the same number of adapter parameters in A/B);
- ``riemix_mixed_rank``: ``MoELoRALinear`` whose experts have ranks r/2, r, 3r/2 in turn (as after growing
  experts of another rank; stacked at the largest rank with exact zero padding);
- with ``--paths``: ``riemix_dense`` and ``riemix_sparse``, the same layer (same parameters) with
  ``expert_compute`` forced to ``"dense"`` (every expert for every token) and ``"sparse"`` (only the
  selected token-expert pairs; ``riemix.core.sparse``), and ``riemix_recompute``, the layer with
  ``recompute_hidden=True`` (h computed again in the backward instead of kept).

``--sparse-case`` measures issue 16's shape instead (E=64, top-k=2, r=8 unless given): the frozen base, the
dense path and the sparse path only, and writes ``layer_speed_sparse_<dtype>.json``.

Timings are interleaved (each repeat runs every candidate once, in rotating order) and the median is
reported, because this machine is noisy.  Prints a table and writes JSON to ``benchmarks/results/``.

    python benchmarks/layer_speed.py            # E=20, top-k=10, r=4, 2048x2048, 2048 tokens, fp32
    python benchmarks/layer_speed.py --quick    # small smoke run
    python benchmarks/layer_speed.py --sparse-case --repeats 7   # base vs dense vs sparse, E=64/top-2/r=8
    python benchmarks/layer_speed.py --paths --compile default  # every candidate under torch.compile
"""

from __future__ import annotations

import torch
from lib.harness import interleaved_times, script_parser, speed_record, write_record
from lib.stats import medians
from torch import nn

from riemix.core.layer import MoELoRALinear
from riemix.core.routing import gate_grad_coefficients, route


def loop_forward(layer: MoELoRALinear, x: torch.Tensor) -> torch.Tensor:
    """The paper's pseudocode: one expert at a time, w = c·e + (g − c)·stopgrad(e)."""
    y = layer.base_layer(x)
    gates, _ = route(layer.router(x), layer.routing, layer.top_k)
    coef = gate_grad_coefficients(gates, layer.gate_grad_power)
    for i in range(layer.num_experts):
        e_i = layer.scaling * (x @ layer.lora_A[i].t()) @ layer.lora_B[i].t()
        g_i, c_i = gates[:, i : i + 1], coef[:, i : i + 1]
        y = y + c_i * e_i + (g_i - c_i) * e_i.detach()
    return y


#: The candidates of ``--sparse-case`` (and of ``layer_sweep.py --experts-sweep``).
PATHS = ("base", "riemix_dense", "riemix_sparse")


def forced_paths(moe: MoELoRALinear, recompute: bool = False) -> dict[str, MoELoRALinear]:
    """``riemix_dense`` and ``riemix_sparse``: layers on ``moe``'s base with its parameters, path forced.

    With ``recompute`` also ``riemix_recompute``: ``moe`` as configured with ``recompute_hidden=True``.
    """
    out = {}
    variants = [("dense", "dense", False), ("sparse", "sparse", False)]
    for name, path, rc in variants + ([("recompute", moe.expert_compute, True)] if recompute else []):
        layer = MoELoRALinear(
            moe.base_layer, moe.num_experts, moe.rank, alpha=moe.alpha, top_k=moe.top_k,
            gate_grad_power=moe.gate_grad_power, expert_compute=path, recompute_hidden=rc,
        )  # fmt: skip
        layer.load_state_dict(moe.state_dict())
        out[f"riemix_{name}"] = layer.to(moe.lora_A.device, moe.lora_A.dtype)
    return out


def build(args, dtype):
    torch.manual_seed(0)
    device = getattr(args, "device", "cpu")
    base = nn.Linear(args.width, args.width, bias=False).to(device, dtype).requires_grad_(False)
    moe = MoELoRALinear(base, args.experts, args.rank, alpha=16.0, top_k=args.top_k, gate_grad_power=0.5)
    moe.to(device, dtype)
    with torch.no_grad():
        moe.lora_B.normal_(std=0.01)
    if getattr(args, "sparse_case", False):
        return {"base": base, **forced_paths(moe)}
    cands = {"base": base, "riemix": moe, "loop": lambda x: loop_forward(moe, x)}
    if getattr(args, "paths", False):
        cands.update(forced_paths(moe, recompute=True))
    # per-expert ranks (grown experts of another rank): r/2, r, 3r/2 in turn, the same total rank on average
    mixed_ranks = [max(1, (args.rank * (i % 3 + 1)) // 2) for i in range(args.experts)]
    mixed = MoELoRALinear(base, args.experts, mixed_ranks, alpha=16.0, top_k=args.top_k, gate_grad_power=0.5)
    mixed.to(device, dtype)
    with torch.no_grad():
        mixed.lora_B.normal_(std=0.01)
    cands["riemix_mixed_rank"] = mixed
    try:
        from peft import LoraConfig, get_peft_model

        holder = nn.Module()
        holder.proj = nn.Linear(args.width, args.width, bias=False).to(dtype)
        holder.proj.weight.data.copy_(base.weight.data)
        holder.forward = lambda x: holder.proj(x)
        lora_cfg = LoraConfig(r=args.experts * args.rank, lora_alpha=16, target_modules=["proj"], lora_dropout=0.0)
        peft = get_peft_model(holder, lora_cfg).to(device, dtype)
        with torch.no_grad():
            for name, param in peft.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.01)
        cands["peft_lora"] = peft.base_model.model.proj
    except ImportError:
        print("peft not installed: skipping the PEFT LoRA candidate (pip install peft)")
    return cands


def measure(args, dtype: torch.dtype) -> dict[str, list[float]]:
    """Interleaved fwd+bwd timings (seconds) of every candidate at the sizes in ``args``."""
    cands = build(args, dtype)
    mode = getattr(args, "compile", None)
    if mode:  # every candidate compiled the same way; the per-expert Python loop is left out
        cands = {n: torch.compile(c, mode=None if mode == "default" else mode) for n, c in cands.items() if n != "loop"}
    device = getattr(args, "device", "cpu")
    x = torch.randn(args.tokens, args.width, dtype=dtype, device=device, requires_grad=True)  # (T, in)
    upstream = torch.randn(args.tokens, args.width, dtype=dtype, device=device)  # (T, out)

    def fwd_bwd(name: str, _round: int) -> None:
        if mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # a new iteration: the graphs' outputs may be reused
        cands[name](x).backward(upstream)
        if device == "cuda":
            torch.cuda.synchronize()  # time the kernels, not their launch

    params = {
        n: [p for p in c.parameters() if p.requires_grad] if isinstance(c, nn.Module) else [] for n, c in cands.items()
    }

    def clear_grad(name: str) -> None:  # as zero_grad(set_to_none=True) before every step
        x.grad = None
        for p in params[name]:
            p.grad = None

    return interleaved_times(list(cands), fwd_bwd, range(args.repeats), warmup=2, prepare=clear_grad)


def ratios_of(med: dict[str, float]) -> dict[str, float]:
    """riemix/base, loop/riemix and (when PEFT ran) riemix/PEFT LoRA of the median times ``med``.

    With the forced paths (``--paths``, ``--sparse-case``) also dense/base, sparse/base and dense/sparse;
    ``--sparse-case`` has only those.
    """
    paths = {}
    if "riemix_sparse" in med:
        paths = {
            "riemix_dense_over_base": med["riemix_dense"] / med["base"],
            "riemix_sparse_over_base": med["riemix_sparse"] / med["base"],
            "riemix_dense_over_sparse": med["riemix_dense"] / med["riemix_sparse"],
        }
    if "riemix_recompute" in med:
        paths["riemix_recompute_over_riemix"] = med["riemix_recompute"] / med["riemix"]
    if "riemix" not in med:
        return paths
    ratios = {"riemix_over_base": med["riemix"] / med["base"]}
    if "loop" in med:
        ratios["loop_over_riemix"] = med["loop"] / med["riemix"]
    if "peft_lora" in med:
        ratios["riemix_over_peft_lora"] = med["riemix"] / med["peft_lora"]
    if "riemix_mixed_rank" in med:
        ratios["riemix_mixed_rank_over_base"] = med["riemix_mixed_rank"] / med["base"]
    return {**ratios, **paths}


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--experts", type=int, default=None, help="E (default 20; 64 with --sparse-case)")
    parser.add_argument("--top-k", type=int, default=None, help="default 10; 2 with --sparse-case")
    parser.add_argument("--rank", type=int, default=None, help="default 4; 8 with --sparse-case")
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--compile",
        choices=["default", "reduce-overhead"],
        default=None,
        help="time every candidate under torch.compile with this mode (the per-expert loop is left out)",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats (smoke run)")
    parser.add_argument("--out", default=None, help="JSON output path")
    parser.add_argument("--paths", action="store_true", help="add riemix_dense and riemix_sparse (forced paths)")
    parser.add_argument(
        "--sparse-case",
        action="store_true",
        help="base vs dense vs sparse path only, at E=64, top-k=2, r=8 unless --experts/--top-k/--rank are given",
    )
    args = parser.parse_args()
    defaults = {"experts": 64, "top_k": 2, "rank": 8} if args.sparse_case else {"experts": 20, "top_k": 10, "rank": 4}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.quick:
        args.width, args.tokens, args.repeats = 256, 256, 3
    times = measure(args, getattr(torch, args.dtype))
    med = medians(times)
    ratios = ratios_of(med)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(
        f"MoE-LoRA layer fwd+bwd: E={args.experts} top-k={args.top_k} r={args.rank} "
        f"in=out={args.width} tokens={args.tokens} {args.dtype}, median of {args.repeats}, {where}"
    )
    print(f"{'candidate':<14} {'ms':>9} {'vs base':>9}")
    for name in med:
        print(f"{name:<14} {1e3 * med[name]:9.2f} {med[name] / med['base']:8.2f}x")
    targets = {
        "riemix_over_base": 1.3,
        "riemix_mixed_rank_over_base": 1.3,
        "loop_over_riemix": 8.0,
        "riemix_over_peft_lora": 1.1,
        "riemix_sparse_over_base": 1.3,
    }
    for key, value in ratios.items():
        if key not in targets:
            print(f"{key:<24} {value:6.2f}")
            continue
        better = value >= targets[key] if key == "loop_over_riemix" else value <= targets[key]
        print(
            f"{key:<24} {value:6.2f}  (target {'>=' if key == 'loop_over_riemix' else '<='} {targets[key]}: "
            f"{'met' if better else 'NOT met'})"
        )
    write_record(
        speed_record("layer_speed", args, times, med, ratios),
        "layer_speed",
        args.quick,
        args.out,
        tail=f"{'_sparse' if args.sparse_case else ''}_{args.dtype}{'_cuda' if args.device == 'cuda' else ''}"
        f"{'_compiled' if args.compile else ''}",
    )


if __name__ == "__main__":
    main()
