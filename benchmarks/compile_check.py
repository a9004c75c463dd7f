"""Does the MoE-LoRA layer, and a training step, run under ``torch.compile``, and how fast on CPU?

Layer rows (``layer_dense``, ``layer_sparse``): one ``MoELoRALinear`` on a frozen ``nn.Linear``
(``--width`` x ``--width``, ``--tokens`` tokens, fp32, input requiring grad), built as in
``layer_speed.py``, with ``expert_compute`` forced:

- ``dense``: E=8, top-2, r=4 (every expert for every token, ``riemix.core.functional``);
- ``sparse``: E=64, top-2, r=8 (the selected pairs only, ``riemix.core.sparse``).

For each: the graphs and graph breaks ``torch._dynamo.explain`` finds in the forward (the reasons
deduplicated), the compiled output and gradients against eager's (max abs diff), the first compiled call
(compilation included), forward+backward time eager vs ``torch.compile(layer)`` (interleaved, median),
and a few calls on fresh inputs, which show data-dependent recompiles (the graphs they add).

Training-step rows (``train_model``, ``train_step``): a tiny ``LlamaForCausalLM`` (hidden 128, 2 layers,
vocabulary 256, random weights, random token ids) with ``add_moe_lora`` on q/k/v/o (E=8, top-2, r=4)
and ``build_optimizer(model, "radamw", lr=1e-3)``; a step is forward loss, backward, ``opt.step()``,
``opt.zero_grad()``.  This is a compile and speed check only; it says nothing about quality.
``train_model`` compiles the model (``torch.compile(model)``), ``train_step`` the whole step function;
both are timed against the eager step, each on its own copy of the same model, fed the same batches, so
the losses (``max_abs_diff``) and the final adapter weights (``max_param_diff``) can be compared.  The
table's graphs and breaks come from explain on the forward+loss; ``explain_step`` (unless
``--no-step-explain``) is explain on the whole step.  A candidate that raises is recorded as
``"failed"`` with the error, which is a finding, not hidden.

Ratios are compiled/eager of the medians (below 1: compiled is faster).  Inductor's caches are off, so a
first call's seconds are a cold compile.  Prints a table and writes
``benchmarks/results/compile_check.json``.

    python benchmarks/compile_check.py                          # inductor, 1024x1024, 1024 tokens
    python benchmarks/compile_check.py --backend aot_eager      # tracing without code generation
    python benchmarks/compile_check.py --backend inductor aot_eager --repeats 7
    python benchmarks/compile_check.py --quick                  # tiny shapes, sparse E=8, 1-layer Llama
"""

from __future__ import annotations

import copy
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from lib.harness import interleaved_times, record_header, script_parser, write_record
from lib.stats import medians
from torch import nn
from torch._dynamo.utils import counters

import riemix

#: Layer rows: name -> (E, top-k, r, expert_compute); ``--quick`` uses E=8 for the sparse one.
LAYER_CONFIGS = {"dense": (8, 2, 4, "dense"), "sparse": (64, 2, 8, "sparse")}
#: Most distinct break reasons kept per explain.
MAX_REASONS = 8


def error_text(exc: BaseException) -> str:
    """``"Type: message"`` of an exception, the message cut to its first lines and 400 characters."""
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()][:3]
    return f"{type(exc).__name__}: {' | '.join(lines)}"[:400]


def reason_text(reason: Any) -> str:
    """A dynamo break reason in one line: its headline and its ``Explanation:`` line, at most 300 chars."""
    lines = [ln.strip() for ln in str(reason).splitlines() if ln.strip()]
    explanation = next((ln for ln in lines if ln.startswith("Explanation:")), "")
    head = lines[0] if lines else "?"
    return (head if not explanation or explanation in head else f"{head}. {explanation}")[:300]


def explain_breaks(fn, *args) -> dict[str, Any]:
    """Graphs and breaks of ``fn(*args)`` under ``torch._dynamo.explain`` (which runs ``fn`` once).

    Returns:
        ``graph_count``, ``graph_break_count``, ``op_count``, ``break_reasons`` (``"<n>x file:line
        (function): reason"``, deduplicated, at most ``MAX_REASONS``) and ``logged_reasons`` (dynamo's own
        break counter over the same run: it also lists breaks that explain leaves without a reason);
        ``{"status": "failed", "error"}`` when explain raises.
    """
    torch._dynamo.reset()
    before = Counter(counters["graph_break"])
    t0 = time.perf_counter()
    try:
        ex = torch._dynamo.explain(fn)(*args)
    except Exception as exc:  # noqa: BLE001 - a failure is a finding, recorded
        return {"status": "failed", "error": error_text(exc)}
    found: Counter[str] = Counter()
    for brk in ex.break_reasons:
        frame = brk.user_stack[-1] if brk.user_stack else None
        where = f"{Path(frame.filename).name}:{frame.lineno} ({frame.name})" if frame else "?"
        found[f"{where}: {reason_text(brk.reason)}"] += 1
    logged = Counter(counters["graph_break"]) - before
    return {
        "graph_count": int(ex.graph_count),
        "graph_break_count": int(ex.graph_break_count),
        "op_count": int(ex.op_count),
        "break_reasons": [f"{n}x {r}" for r, n in found.most_common(MAX_REASONS)],
        "logged_reasons": [f"{n}x {reason_text(r)}" for r, n in logged.most_common(MAX_REASONS)],
        "seconds": time.perf_counter() - t0,
    }


def unique_graphs() -> int:
    """How many graphs dynamo has compiled so far in this process (grows with every recompile)."""
    return int(counters["stats"]["unique_graphs"])


def build_layer(name: str, args) -> tuple[riemix.MoELoRALinear, torch.Tensor, torch.Tensor]:
    """The layer of row ``name``, its input ``(T, in)`` (requires grad) and the upstream gradient ``(T, out)``."""
    experts, top_k, rank, path = LAYER_CONFIGS[name]
    if args.quick and path == "sparse":
        experts = 8
    torch.manual_seed(0)
    base = nn.Linear(args.width, args.width, bias=False).requires_grad_(False)
    layer = riemix.MoELoRALinear(base, experts, rank, alpha=16.0, top_k=top_k, expert_compute=path)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.01)  # zero B would leave A's gradient zero
    x = torch.randn(args.tokens, args.width, requires_grad=True)  # (T, in)
    upstream = torch.randn(args.tokens, args.width)  # (T, out)
    return layer, x, upstream


def output_and_grads(fn, x: torch.Tensor, upstream: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """``[y, x.grad, *param grads]`` of one forward+backward of ``fn`` (gradients reset first)."""
    for t in (x, *params):
        t.grad = None
    y = fn(x)  # (T, out)
    y.backward(upstream)
    return [y.detach(), x.grad.clone(), *(p.grad.clone() for p in params)]


def max_abs_diff(ref: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    """Largest elementwise |ref - got| over paired tensors."""
    return max(float((a - b).abs().max()) for a, b in zip(ref, got, strict=True))


def layer_rows(name: str, args) -> list[dict[str, Any]]:
    """One row per backend for layer config ``name`` (explain is backend-independent: run once)."""
    layer, x, upstream = build_layer(name, args)
    config = dict(zip(("experts", "top_k", "rank"), (layer.num_experts, layer.top_k, layer.rank), strict=True))
    config |= {"expert_compute": layer.expert_compute, "width": args.width, "tokens": args.tokens}
    explained = explain_breaks(layer, x)
    rows = []
    for backend in args.backend:
        row: dict[str, Any] = {"row": f"layer_{name}", "backend": backend, "config": config, "explain": explained}
        start = time.perf_counter()
        try:
            row.update(compare_layer(layer, x, upstream, backend, args), status="ok")
        except Exception as exc:  # noqa: BLE001 - a failure is a finding, recorded
            row.update(status="failed", error=error_text(exc))
        row["wall_seconds"] = time.perf_counter() - start
        rows.append(row)
    return rows


def compare_layer(layer: nn.Module, x: torch.Tensor, upstream: torch.Tensor, backend: str, args) -> dict[str, Any]:
    """``torch.compile(layer, backend=backend)`` against eager: first call, differences, times, fresh inputs."""
    params = [p for p in layer.parameters() if p.requires_grad]
    torch._dynamo.reset()
    fns = {"eager": layer, "compiled": torch.compile(layer, backend=backend)}
    ref = output_and_grads(layer, x, upstream, params)
    graphs, t0 = unique_graphs(), time.perf_counter()
    got = output_and_grads(fns["compiled"], x, upstream, params)
    out: dict[str, Any] = {"first_call_seconds": time.perf_counter() - t0, "max_abs_diff": max_abs_diff(ref, got)}
    out["allclose"] = all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(ref, got, strict=True))
    out["graphs_first_call"] = unique_graphs() - graphs

    def run(cand: str, _round: int) -> None:
        fns[cand](x).backward(upstream)

    def clear(_cand: str) -> None:
        for t in (x, *params):
            t.grad = None

    out.update(times_block(interleaved_times(list(fns), run, range(args.repeats), warmup=1, prepare=clear)))
    out["fresh_inputs"] = fresh_input_probe(fns, args, upstream)
    return out


def fresh_input_probe(fns: dict[str, Any], args, upstream: torch.Tensor) -> dict[str, Any]:
    """Seconds of eager and compiled fwd+bwd on ``args.fresh_inputs`` new inputs, and the graphs they add.

    The timing loop reuses one input; routing that changes with the data (the sparse path's per-expert
    spans) can make dynamo guard on it and recompile for every new batch, which this shows.
    """
    before = unique_graphs()
    out: dict[str, Any] = {"eager_seconds": [], "compiled_seconds": []}
    for i in range(args.fresh_inputs):
        torch.manual_seed(1000 + i)
        x = torch.randn(args.tokens, args.width, requires_grad=True)  # (T, in)
        for cand in ("eager", "compiled"):
            t0 = time.perf_counter()
            fns[cand](x).backward(upstream)
            out[f"{cand}_seconds"].append(time.perf_counter() - t0)
    out["graphs_added"] = unique_graphs() - before
    return out


def times_block(times: dict[str, list[float]], eager: str = "eager") -> dict[str, Any]:
    """Medians, every timed round and compiled/eager ratios of interleaved ``times``."""
    med = medians(times)
    ratios = {f"{name}_over_{eager}": med[name] / med[eager] for name in med if name != eager}
    return {"median_seconds": med, "all_seconds": times, "ratios": ratios}


def tiny_llama(args) -> nn.Module:
    """A random tiny Llama (hidden ``args.hidden``, ``args.layers`` layers, vocabulary 256), MoE-LoRA on q/k/v/o."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max(args.seq_len, 64),
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    riemix.add_moe_lora(model, riemix.MoELoRAConfig(num_experts=8, top_k=2, rank=4, target_modules=targets))
    with torch.no_grad():
        for _, layer in riemix.iter_moe_lora_layers(model):
            layer.lora_B.normal_(std=0.01)
    return model.train()


def make_step(model: nn.Module, opt: torch.optim.Optimizer):
    """``step(ids) -> loss``: forward loss, backward, ``opt.step()``, ``opt.zero_grad()``."""

    def step(ids: torch.Tensor) -> torch.Tensor:
        loss = model(input_ids=ids, labels=ids).loss  # ids: (B, L)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def train_rows(args) -> list[dict[str, Any]]:
    """Eager step vs compiled model and compiled step function, one row per (mode, backend)."""
    try:
        model = tiny_llama(args)
    except Exception as exc:  # noqa: BLE001 - transformers missing or incompatible: recorded
        return [{"row": "train", "status": "failed", "error": error_text(exc)}]
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (args.batch, args.seq_len), generator=gen) for _ in range(4)]  # (B, L) each
    config = {"hidden": args.hidden, "layers": args.layers, "vocab": 256, "batch": args.batch, "seq_len": args.seq_len,
              "adapter": "E=8 top-2 r=4 on q/k/v/o", "optimizer": "radamw lr=1e-3"}  # fmt: skip
    probe = copy.deepcopy(model)  # explain runs the function: on a copy, never on a timed model
    explain_fwd = explain_breaks(lambda ids: probe(input_ids=ids, labels=ids).loss, batches[0])
    explain_step = {"status": "skipped"}
    if not args.no_step_explain:
        explain_step = explain_breaks(make_step(probe, riemix.build_optimizer(probe, "radamw", lr=1e-3)), batches[0])
    rows = []
    for backend in args.backend:
        start = time.perf_counter()
        run = run_train_candidates(model, batches, backend, args)
        for mode in ("train_model", "train_step"):
            row: dict[str, Any] = {"row": mode, "backend": backend, "config": config, "explain": explain_fwd}
            if mode == "train_step":
                row["explain_step"] = explain_step
            row["wall_seconds_both_rows"] = time.perf_counter() - start
            if mode in run["failed"] or "eager" in run["failed"]:
                error = run["failed"].get(mode) or f"eager step: {run['failed']['eager']}"
                rows.append({**row, "status": "failed", "error": error})
                continue
            losses, eager_model, mode_model = run["losses"], run["models"]["eager"], run["models"][mode]
            row["first_call_seconds"] = run["first"][mode]
            row["eager_first_call_seconds"] = run["first"]["eager"]
            row.update(times_block({"eager": run["times"]["eager"], "compiled": run["times"][mode]}))
            row["max_abs_diff"] = max(abs(a - b) for a, b in zip(losses["eager"], losses[mode], strict=True))
            row["max_param_diff"] = max(
                float((p.detach() - q.detach()).abs().max())
                for p, q in zip(eager_model.parameters(), mode_model.parameters(), strict=True)
                if p.requires_grad
            )
            row["steps_taken"] = len(losses[mode])
            rows.append({**row, "status": "ok"})
    return rows


def run_train_candidates(model: nn.Module, batches: list[torch.Tensor], backend: str, args) -> dict[str, Any]:
    """Eager, compiled-model and compiled-step training on copies of ``model``, same batches, interleaved.

    Returns:
        ``models``, ``losses`` (every step's loss), ``first`` (seconds of the first, compiling call),
        ``failed`` (``name -> error`` of the candidates that raised, then left out) and ``times``.
    """
    torch._dynamo.reset()
    models = {name: copy.deepcopy(model) for name in ("eager", "train_model", "train_step")}
    opts = {name: riemix.build_optimizer(m, "radamw", lr=1e-3) for name, m in models.items()}
    steps = {
        "eager": make_step(models["eager"], opts["eager"]),
        "train_model": make_step(torch.compile(models["train_model"], backend=backend), opts["train_model"]),
        "train_step": torch.compile(make_step(models["train_step"], opts["train_step"]), backend=backend),
    }
    losses: dict[str, list[float]] = {name: [] for name in steps}
    first: dict[str, float] = {}
    failed: dict[str, str] = {}
    for name, step in steps.items():  # the first call compiles; every candidate starts on batch 0
        t0 = time.perf_counter()
        try:
            losses[name].append(float(step(batches[0])))
            first[name] = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - a failure is a finding, recorded
            failed[name] = error_text(exc)
    alive = [name for name in steps if name not in failed]

    def run(name: str, rnd: int) -> None:
        losses[name].append(float(steps[name](batches[rnd % len(batches)])))

    times = interleaved_times(alive, run, range(args.repeats), warmup=1) if "eager" in alive else {}
    return {"models": models, "losses": losses, "first": first, "failed": failed, "times": times}


def fmt(value: Any, spec: str) -> str:
    """``value`` formatted with ``spec`` (``"9.2f"``), or ``"-"`` right-aligned to its width when missing."""
    return format(value, spec) if value is not None else "-".rjust(int(spec.split(".")[0].rstrip("dfe")))


def print_table(rows: list[dict[str, Any]]) -> None:
    """The summary table, then each distinct explain's break reasons and each failure."""
    print(f"{'row':<14} {'backend':<10} {'eager ms':>9} {'comp. ms':>9} {'ratio':>6} {'1st s':>7} "
          f"{'graphs':>6} {'breaks':>6} {'max|diff|':>9} {'+graphs':>7}  status")  # fmt: skip
    for row in rows:
        med, ex = row.get("median_seconds", {}), row.get("explain", {})
        eager, comp = med.get("eager"), med.get("compiled")
        print(
            f"{row['row']:<14} {row.get('backend', '-'):<10} {fmt(eager and 1e3 * eager, '9.2f')} "
            f"{fmt(comp and 1e3 * comp, '9.2f')} {fmt(row.get('ratios', {}).get('compiled_over_eager'), '6.2f')} "
            f"{fmt(row.get('first_call_seconds'), '7.1f')} {fmt(ex.get('graph_count'), '6d')} "
            f"{fmt(ex.get('graph_break_count'), '6d')} {fmt(row.get('max_abs_diff'), '9.1e')} "
            f"{fmt(row.get('fresh_inputs', {}).get('graphs_added'), '7d')}  {row['status']}"
        )
    shown = set()
    for row in rows:
        for key in ("explain", "explain_step"):
            ex = row.get(key, {})
            label = f"{row['row']} {key}"
            if not ex or id(ex) in shown or ex.get("status") == "skipped":
                continue
            shown.add(id(ex))
            if ex.get("status") == "failed":
                print(f"{label}: FAILED {ex['error']}")
            elif key == "explain_step":
                print(f"{label}: {ex['graph_count']} graphs, {ex['graph_break_count']} breaks")
            for reason in ex.get("break_reasons", []) + [f"(logged) {r}" for r in ex.get("logged_reasons", [])]:
                print(f"{label}: {reason}")
        if row["status"] == "failed":
            print(f"{row['row']} [{row.get('backend', '-')}]: FAILED {row['error']}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the check, print the table, write the JSON; returns the record."""
    parser = script_parser(__doc__)
    parser.add_argument("--backend", nargs="+", default=["inductor"], choices=["inductor", "aot_eager", "eager"])
    parser.add_argument("--width", type=int, default=1024, help="in = out features of the layer")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--fresh-inputs", type=int, default=2, help="layer calls on new inputs (recompiles)")
    parser.add_argument("--hidden", type=int, default=128, help="tiny Llama hidden size")
    parser.add_argument("--layers", type=int, default=2, help="tiny Llama decoder layers")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--skip-train", action="store_true", help="layer rows only")
    parser.add_argument("--no-step-explain", action="store_true", help="skip explain on the whole training step")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, sparse E=8, 2 repeats (smoke run)")
    parser.add_argument("--out", default=None, help="JSON output path")
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.tokens, args.repeats, args.fresh_inputs = 64, 64, 2, min(args.fresh_inputs, 1)
        args.hidden, args.layers, args.batch, args.seq_len = 32, 1, 2, 16
    torch.manual_seed(0)
    load_start = os.getloadavg()  # the CPU is shared: a busy machine slows eager and compiled alike
    with torch._inductor.config.patch(force_disable_caches=True):  # first calls are cold compiles
        rows = [row for name in LAYER_CONFIGS for row in layer_rows(name, args)]
        if not args.skip_train:
            rows += train_rows(args)
    torch._dynamo.reset()
    print(f"torch.compile, backend(s) {', '.join(args.backend)}, median of {args.repeats}; ratio = compiled/eager")
    print_table(rows)
    record = {**record_header("compile_check"), "args": vars(args), "rows": rows}
    record["load_average_1_5_15min"] = {"start": load_start, "end": os.getloadavg()}
    write_record(record, "compile_check", args.quick, args.out)
    return record


if __name__ == "__main__":
    main()
