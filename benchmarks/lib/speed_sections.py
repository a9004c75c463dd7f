"""The speed and memory sections of ``docs/benchmarks.md``: layer, sparse path, memory, optimizer, end to end,
``torch.compile`` and the GPU rows, each next to the result measured before issue 16 where one was kept
(``benchmarks/results/before_issue16/``)."""

from __future__ import annotations

from lib.render import IMG, bar, load, machine, table

__all__ = ["speed_sections"]

BEFORE = "before_issue16"
GPU = "gpu_h100"
MIB = 2.0**20


def _before(name: str) -> dict | None:
    return load(f"{BEFORE}/{name}")


def _ratio_rows(ratios: dict, before: dict | None, targets: dict) -> list[list[str]]:
    old = (before or {}).get("ratios", {})
    return [[k, f"{v:.2f}", f"{old[k]:.2f}" if k in old else "", targets.get(k, "")] for k, v in ratios.items()]


def layer_section(rec: dict) -> list[str]:
    a, med = rec["args"], rec["median_seconds"]
    lines = [
        "## Layer: forward + backward of one MoE-LoRA layer",
        "",
        f"`benchmarks/layer_speed.py --paths`: E={a['experts']}, top-k={a['top_k']}, r={a['rank']}, "
        f"in=out={a['width']}, {a['tokens']} tokens, {a['dtype']}, median of {a['repeats']} interleaved repeats "
        f"({machine(rec)}). `riemix` is the layer as configured (`expert_compute='auto'`, dense here); "
        "`riemix_dense`/`riemix_sparse` force each path.",
        "",
        *table(
            ["candidate", "ms", "vs frozen base"],
            ([n, f"{1e3 * t:.1f}", f"{t / med['base']:.2f}x"] for n, t in med.items()),
        ),
        "",
    ]
    targets = {"riemix_over_base": "<= 1.3", "loop_over_riemix": ">= 8", "riemix_over_peft_lora": "<= 1.1"}
    lines += table(["ratio", "measured", "before issue 16", "target"], _ratio_rows(rec["ratios"], _before(
        "layer_speed_float32.json"), targets))  # fmt: skip
    lines += [
        "",
        f"No adapter can beat the frozen base, so loop/riemix is bounded by loop/base = "
        f"{med['loop'] / med['base']:.2f} on this shape: the >= 8x target is out of reach here whatever the "
        "adapter costs.",
    ]
    bar(IMG / "layer_speed.png", list(med), [1e3 * t for t in med.values()], "MoE-LoRA layer fwd+bwd", "ms")
    return lines + ["", "![layer speed](img/layer_speed.png)", ""]


def layer_sweep_section(rec: dict) -> list[str]:
    b = rec["base_point"]
    lines = [
        "### Layer speed across sizes and dtypes",
        "",
        f"`benchmarks/layer_sweep.py`: one factor at a time around E={b['experts']}, top-k={b['top_k']}, "
        f"r={b['rank']}, in=out={b['width']}, {b['tokens']} tokens; median of {rec['repeats']} interleaved repeats "
        f"({machine(rec)}). `peft` is PEFT LoRA of rank E·r.",
        "",
        "| varied | E | k | r | width | dtype | base ms | riemix/base | loop/riemix | riemix/peft |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for p in rec["points"]:
        peft = p["riemix_over_peft_lora"]
        lines.append(
            f"| {p['varied']} | {p['experts']} | {p['top_k']} | {p['rank']} | {p['width']} | {p['dtype']} | "
            f"{1e3 * p['median_seconds']['base']:.1f} | {p['riemix_over_base']:.2f} | {p['loop_over_riemix']:.2f} | "
            f"{'-' if peft is None else f'{peft:.2f}'} |"
        )
    return lines + [
        "",
        "This CPU has no bf16 matrix units (no AVX512-BF16/AMX), so bf16 matmuls run far slower than fp32 and "
        "the bf16 rows mostly measure that; they show the layer works in bf16, not how fast it would be on "
        "bf16 hardware.",
        "",
    ]


def _paths_table(rec: dict) -> list[str]:
    med = rec["median_seconds"]
    return table(
        ["candidate", "ms", "vs frozen base"],
        ([n, f"{1e3 * t:.2f}", f"{t / med['base']:.2f}x"] for n, t in med.items()),
    )


def width576_section(rec: dict) -> list[str]:
    a, ratios = rec["args"], rec["ratios"]
    return [
        "### The layer at SmolLM2's width",
        "",
        f"`benchmarks/layer_speed.py --paths --width {a['width']} --tokens {a['tokens']}`: E={a['experts']}, "
        f"top-k={a['top_k']}, r={a['rank']}, {a['dtype']}, median of {a['repeats']} ({machine(rec)}).",
        "",
        *_paths_table(rec),
        "",
        f"riemix/PEFT LoRA of rank E·r: {ratios['riemix_over_peft_lora']:.2f}; recomputing h in the backward "
        f"(`recompute_hidden=True`) costs {ratios['riemix_recompute_over_riemix']:.2f}x the layer time here.",
        "",
    ]


def sparse_section(rec: dict) -> list[str]:
    a = rec["args"]
    return [
        "### The sparse path: only the selected experts",
        "",
        f"`benchmarks/layer_speed.py --sparse-case`: E={a['experts']}, top-k={a['top_k']}, r={a['rank']}, "
        f"in=out={a['width']}, {a['tokens']} tokens, {a['dtype']}, median of {a['repeats']} ({machine(rec)}).",
        "",
        *_paths_table(rec),
        "",
        f"Target: sparse path <= 1.3x the frozen base; measured {rec['ratios']['riemix_sparse_over_base']:.2f}x "
        f"(the dense path: {rec['ratios']['riemix_dense_over_base']:.2f}x).",
        "",
    ]


def experts_sweep_section(rec: dict, title: str = "### Time against the number of experts (top-2)") -> list[str]:
    f = rec["fixed"]
    rows = [
        [
            str(p["experts"]),
            f"{1e3 * p['median_seconds']['base']:.2f}",
            f"{1e3 * p['median_seconds']['riemix_dense']:.2f}",
            f"{1e3 * p['median_seconds']['riemix_sparse']:.2f}",
            f"{p['riemix_dense_over_base']:.2f}",
            f"{p['riemix_sparse_over_base']:.2f}",
        ]
        for p in rec["points"]
    ]
    return [
        title,
        "",
        f"`benchmarks/layer_sweep.py --experts-sweep`: top-k={f['top_k']}, r={f['rank']}, in=out={f['width']}, "
        f"{f['tokens']} tokens, {rec['points'][0]['dtype']}, median of {rec['repeats']} ({machine(rec)}).",
        "",
        *table(["E", "base ms", "dense ms", "sparse ms", "dense/base", "sparse/base"], rows),
        "",
    ]


def memory_section(rec: dict, before: dict | None) -> list[str]:
    a = rec["args"]
    old = {c["name"]: c for c in (before or {}).get("candidates", [])}
    rows = []
    for c in rec["candidates"]:
        was = old.get(c["name"], {}).get("beyond_x_bytes")
        ratio = c.get("ratio_to_peft")
        rows.append(
            [
                c["name"],
                str(c["active_rank"]),
                f"{c['beyond_x_bytes'] / MIB:.3f}",
                "" if ratio is None else f"{ratio:.2f}",
                "" if was is None else f"{was / MIB:.3f}",
            ]
        )
    return [
        f"### Activation memory of one layer ({a['dtype']})",
        "",
        f"`benchmarks/layer_memory.py`: the bytes autograd keeps for the backward beyond the input x and the "
        f"parameters, in=out={a['width']}, {a['tokens']} tokens ({machine(rec)}). Target: riemix <= PEFT LoRA of "
        "the active rank k·r.",
        "",
        *table(["candidate", "active rank", "MiB beyond x", "vs PEFT at k·r", "MiB before issue 16"], rows),
        "",
    ]


OPTIMIZER_TARGETS = {"riemix_radamw_over_torch_adamw_fused": "<= 1.5", "riemix_rsgd_over_torch_sgd": "<= 1.5"}


def optimizer_section(rec: dict) -> list[str]:
    a, med = rec["args"], rec["median_seconds"]
    lines = [
        "## Optimizer step",
        "",
        f"`benchmarks/optimizer_speed.py`: {a['layers']} layers x E={a['experts']} experts x rank {a['rank']}, "
        f"width {a['width']}, plus routers (clipped), fp32, median of {a['repeats']} ({machine(rec)}).",
        "",
        *table(["candidate", "ms/step"], ([n, f"{1e3 * t:.1f}"] for n, t in med.items())),
        "",
        *table(
            ["ratio", "measured", "before issue 16", "target"],
            _ratio_rows(rec["ratios"], _before("optimizer_speed.json"), OPTIMIZER_TARGETS),
        ),
    ]
    bar(IMG / "optimizer_speed.png", list(med), [1e3 * t for t in med.values()], "Optimizer step", "ms")
    return lines + [
        "",
        "Targets: RiemannianAdamW <= 1.5x torch's fused AdamW and RiemannianSGD <= 1.5x torch SGD. "
        "`riemix_radamw` runs its elementwise update in torch's fused AdamW kernel (its default); "
        "`riemix_radamw_foreach` is the same optimizer with `fused=False`, so the preconditioning cost on its "
        "own is riemix_radamw − torch_adamw_fused.",
        "",
        "![optimizer speed](img/optimizer_speed.png)",
        "",
    ]


def e2e_section(rec: dict, title: str = "## End to end: SmolLM2-135M training and evaluation") -> list[str]:
    tps, mem = rec["tokens_per_s"], rec.get("memory", {})
    ev = rec.get("eval_tokens_per_s", {})
    a = rec["args"]
    mem_key = "peak_cuda_growth_mib" if a.get("device") == "cuda" else "peak_rss_growth_mib"
    before = _before("e2e_throughput.json") if a.get("device", "cpu") == "cpu" else None
    old = (before or {}).get("tokens_per_s", {})
    rows = []
    for n, v in tps.items():
        m = mem.get(n, {}).get(mem_key)
        was = f"{old[n] / old['peft_lora_r16']:.2f}" if n in old else ""
        e = ev.get(n)
        rows.append(
            [n, f"{v:.0f}", f"{v / tps['peft_lora_r16']:.2f}", was]
            + (["", ""] if e is None else [f"{e:.0f}", f"{e / ev['frozen_base']:.2f}"])
            + ["" if m is None else f"{m:.0f}"]
        )
    header = ["candidate", "train tokens/s", "vs PEFT r=16", "before issue 16", "eval tokens/s", "vs base"]
    header.append("peak GPU memory growth (MiB)" if mem_key == "peak_cuda_growth_mib" else "peak RSS growth (MiB)")
    precision = "bf16 autocast" if a.get("bf16") else "fp32"
    lines = [
        title,
        "",
        f"`benchmarks/e2e_throughput.py`: ARC-Easy cloze batches of {a['batch_size']}, {a['steps']} interleaved "
        f"timed training steps and evaluation forwards per candidate, {precision} ({machine(rec)}).",
        "",
        *table(header, rows),
        "",
        "Targets: training riemix 8/2/4 >= 1.05x and 20/10/4 >= 1.0x PEFT LoRA r=16; evaluation >= 0.95x the "
        "base model's forward.",
        "",
    ]
    if a.get("device", "cpu") == "cpu":
        lines += [f"MixLoRA: {rec['mixlora']}", ""]
        bar(IMG / "e2e_throughput.png", list(tps), list(tps.values()), "Training throughput", "tokens/s")
        lines += ["![throughput](img/e2e_throughput.png)", ""]
    return lines


def compile_section(rec: dict) -> list[str]:
    rows = []
    for r in rec["rows"]:
        med, ex = r.get("median_seconds") or {}, r.get("explain") or {}
        ratio = (r.get("ratios") or {}).get("compiled_over_eager")
        fresh = (r.get("fresh_inputs") or {}).get("graphs_added")
        rows.append(
            [
                r["row"],
                r.get("backend", ""),
                f"{1e3 * med['eager']:.1f}" if "eager" in med else "",
                f"{1e3 * med['compiled']:.1f}" if "compiled" in med else "",
                "" if ratio is None else f"{ratio:.2f}",
                str(ex.get("graph_count", "")),
                str(ex.get("graph_break_count", "")),
                "" if fresh is None else str(fresh),
                r["status"] if r["status"] == "ok" else f"{r['status']}: {str(r.get('error', ''))[:120]}",
            ]
        )
    return [
        "## torch.compile",
        "",
        f"`benchmarks/compile_check.py`: eager against `torch.compile` (fwd+bwd of one layer; a training step of "
        f"a small Llama with MoE-LoRA on q/k/v/o and RiemannianAdamW, the model compiled or the whole step), "
        f"median of {rec['args']['repeats']} ({machine(rec)}). `graphs`/`breaks` from `torch._dynamo.explain`; "
        "`new graphs` = graphs compiled for two fresh inputs (recompilations).",
        "",
        *table(
            ["row", "backend", "eager ms", "compiled ms", "ratio", "graphs", "breaks", "new graphs", "status"], rows
        ),  # fmt: skip
        "",
    ]


def gpu_sections() -> list[str]:
    """The rows ``benchmarks/gpu_check.sh`` measured on a GPU (``results/gpu_h100/``)."""
    layer = load(f"{GPU}/layer_speed_bfloat16_cuda.json")
    if layer is None:
        return []
    lines = [
        "## GPU (bf16, NVIDIA H100)",
        "",
        "`bash benchmarks/gpu_check.sh OUT GGUF`, run once on a lent H100 (the log is in "
        "`benchmarks/results/gpu_h100/`). The same rows as above, in bfloat16.",
        "",
        f"Layer at E={layer['args']['experts']}, top-k={layer['args']['top_k']}, r={layer['args']['rank']}, "
        f"in=out={layer['args']['width']}, {layer['args']['tokens']} tokens, median of {layer['args']['repeats']}:",
        "",
        *_paths_table(layer),
        "",
        "The GPU rows were measured once, before the sparse path's last change (it then kept h for the "
        "backward; it now recomputes it, which on CPU is faster); the device time left did not allow a rerun.",
        "",
    ]
    for mode in ("default", "reduce-overhead"):
        rec = load(f"{GPU}/layer_speed_bfloat16_cuda_compiled_{mode}.json")
        if rec is not None:
            lines += [
                f"The same layer rows with every candidate under `torch.compile(mode={mode!r})` "
                "(`layer_speed.py --compile`; the per-expert loop left out):",
                "",
                *_paths_table(rec),
                "",
            ]
    for name in ("layer_speed_sparse_bfloat16_cuda.json", "layer_speed_sparse_4096_bfloat16_cuda.json"):
        rec = load(f"{GPU}/{name}")
        if rec is not None:
            a = rec["args"]
            lines += [
                f"Sparse case E={a['experts']}, top-k={a['top_k']}, r={a['rank']}, in=out={a['width']}, "
                f"{a['tokens']} tokens:",
                "",
                *_paths_table(rec),
                "",
            ]
    sweep = load(f"{GPU}/layer_sweep_experts_bfloat16_cuda.json")
    if sweep is not None:
        lines += experts_sweep_section(sweep, "### GPU: time against the number of experts")
    e2e = load(f"{GPU}/e2e_throughput_bf16_cuda.json")
    if e2e is not None:
        lines += e2e_section(e2e, "### GPU: SmolLM2-135M end to end")
        lines += [
            "Measured eagerly, in the same session as the layer rows but before the layer's last change "
            "(it then recomputed h in the backward and did not keep it; the device time left did not allow "
            "a rerun).",
            "",
        ]
    return lines


def distributed_section(rec: dict) -> list[str]:
    """Several processes on the CPU: one process, DDP and FSDP2 (``benchmarks/distributed.py``)."""
    rows, base = rec["rows"], rec["rows"]["1proc_2threads"]["tokens_per_s"]
    names = {"1proc_2threads": "1 process, 2 threads", "ddp_2x1thread": "DDP, 2 processes x 1 thread",
             "fsdp_2x1thread": "FSDP2, 2 processes x 1 thread"}  # fmt: skip
    lines = [
        "## Several processes (CPU, gloo): SmolLM2-135M, SST-2",
        "",
        f"`benchmarks/distributed.py`, {rec['steps']} steps, global batch 8 ({rec['date'][:10]}); see "
        "docs/distributed.md for what each configuration shards.",
        "",
        "| configuration | tokens/s | vs 1 process | peak RSS per process (MiB) | RSS at the end (MiB) |",
        "|---|---|---|---|---|",
    ]
    for key, row in rows.items():
        rss = row["rss_mib_per_process"]
        peak, now = (", ".join(f"{x:.0f}" for x in rss[k]) for k in ("peak", "now"))
        speed = f"{row['tokens_per_s']:.0f} | {row['tokens_per_s'] / base:.2f}x"
        lines.append(f"| {names.get(key, key)} | {speed} | {peak} | {now} |")
    return [*lines, ""]


def quantization_section(rec: dict) -> list[str]:
    """The default job, shortened, on an fp32 and an NF4 base (``benchmarks/quantization.py``)."""
    lines = [
        "## Quantized base (CPU): SmolLM2-135M, SST-2, fp32 vs NF4",
        "",
        f"`benchmarks/quantization.py`: the default job for {rec['steps']} steps, accuracy on a fixed "
        f"{rec['eval_subset']}-example dev subset ({rec['date'][:10]}).",
        "",
        "| base | accuracy before | after | tokens/s | peak RSS (MiB) |",
        "|---|---|---|---|---|",
    ]
    for name, r in rec["rows"].items():
        acc = f"{r['before']['accuracy']:.4f} | {r['after']['accuracy']:.4f}"
        lines.append(f"| {name} | {acc} | {r['tokens_per_s']:.1f} | {r['peak_rss_mib']:.0f} |")
    return [*lines, ""]


def _memory(dtype: str):
    return lambda rec: memory_section(rec, _before(f"layer_memory_{dtype}.json"))


#: (result JSON, its renderer), in reading order.
SECTIONS = (
    ("layer_speed_float32.json", layer_section),
    ("layer_speed_width576_float32.json", width576_section),
    ("layer_speed_sparse_float32.json", sparse_section),
    ("layer_sweep_experts.json", experts_sweep_section),
    ("layer_sweep.json", layer_sweep_section),
    ("layer_memory_float32.json", _memory("float32")),
    ("layer_memory_bfloat16.json", _memory("bfloat16")),
    ("optimizer_speed.json", optimizer_section),
    ("e2e_throughput.json", e2e_section),
    ("compile_check.json", compile_section),
    ("distributed.json", distributed_section),
    ("quantization.json", quantization_section),
)


def speed_sections() -> list[str]:
    """Every speed and memory section whose result JSON exists, then the GPU rows."""
    out: list[str] = []
    for name, render in SECTIONS:
        rec = load(name)
        if rec is not None:
            out += render(rec)
    return out + gpu_sections()
