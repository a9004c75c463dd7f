"""End-to-end training throughput on SmolLM2-135M with multiple-choice batches, side by side.

Each candidate runs full training steps (forward, loss on the answer tokens, backward, optimizer step) on
the same ARC-Easy ``cloze`` training batches (packaged data, batch 16):

- ``frozen_base``: no adapters; forward + backward to the input embeddings (the floor any adapter pays);
- ``peft_lora_r16``: PEFT LoRA r=16, alpha 32 on q/k/v/o + torch AdamW;
- ``riemix_20_10_4``: riemix MoE-LoRA E=20, top-10, r=4 on q/k/v/o + gate-rescaled RiemannianAdamW;
- ``riemix_8_2_4``: E=8, top-2, r=4.

Steps are interleaved across candidates (one step each in rotating order), so machine noise hits all
alike; tokens/s counts non-padding tokens. Peak memory is the resident-set growth of a separate
process per candidate (model load excluded), measured with ``resource.getrusage``.
MixLoRA (``mixlora`` on PyPI) is attempted and reported as skipped with the reason if it cannot train here.

    python benchmarks/e2e_throughput.py            # 12 timed steps per candidate
    python benchmarks/e2e_throughput.py --quick    # 2 steps, smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from lib.harness import RESULTS, interleaved_times, record_header, script_parser, write_json, write_record

CANDIDATES = ("frozen_base", "peft_lora_r16", "riemix_20_10_4", "riemix_8_2_4")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def build(name: str):
    """Model, task wrapper and optimizer (None for the frozen base) of one candidate."""
    from riemix import MoELoRAConfig, add_moe_lora, build_optimizer
    from riemix.hub import load_model
    from riemix.tasks import TaskModel

    model, tok = load_model("smollm2-135m")
    model.train()
    opt = None
    if name == "frozen_base":
        model.requires_grad_(False)
        model.enable_input_require_grads()
    elif name == "peft_lora_r16":
        from peft import LoraConfig, get_peft_model

        peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
        model = peft_model.base_model.model  # the same modules, now with LoRA layers
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=True)
    else:
        e, k, r = (int(v) for v in name.split("_")[1:])
        add_moe_lora(model, MoELoRAConfig(num_experts=e, top_k=k, rank=r, alpha=16.0, target_modules=TARGETS))
        opt = build_optimizer(model, "radamw", lr=1e-4, gate_lr=1e-5, gate_max_grad_norm=1.0)
    return TaskModel(model, "causal_lm"), opt, tok


def batches(tok, n: int, batch_size: int):
    from riemix.data import load_dataset
    from riemix.tasks import TaskSpec, collate_lm, encode_train

    ds = load_dataset("arc_easy", "train")
    spec = TaskSpec.for_dataset(ds, "causal_lm", format="cloze")
    items = [encode_train(ex, spec, tok) for ex in ds.examples[: n * batch_size]]
    return [collate_lm(items[i : i + batch_size], tok.pad_token_id) for i in range(0, len(items), batch_size)]


def step(task_model, opt, batch) -> None:
    loss = task_model(batch)
    loss.backward()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_child(name: str, steps: int, batch_size: int) -> None:
    """Entry point of the per-candidate memory subprocess: prints JSON with peak RSS growth in MiB.

    The peak resident set (VmHWM) is reset after the model is loaded (``/proc/self/clear_refs``), so the
    figure is the training steps' peak above the loaded model.
    """
    task_model, opt, tok = build(name)
    data = batches(tok, steps, batch_size)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    for b in data:
        step(task_model, opt, b)
    peak = _status_kib("VmHWM")
    print(json.dumps({"peak_rss_growth_mib": (peak - before) / 1024, "peak_rss_mib": peak / 1024}))


def measure_memory(batch_size: int) -> dict:
    """Peak RSS growth of each candidate, each in its own process."""
    memory = {}
    for name in CANDIDATES:
        cmd = [sys.executable, __file__, "--memory-child", name, "--batch-size", str(batch_size)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
        memory[name] = json.loads(lines[-1]) if lines else {"error": out.stderr[-500:]}
    return memory


def try_mixlora() -> str:
    return (
        "not benchmarked: the PyPI package `mixlora` (0.2.3) is MixLoRA's adapter loader for inference "
        "(experts injected into the MLP from saved weights, kept outside the module tree); its training code "
        "lives in the separate MoE-PEFT framework, which is not on PyPI"
    )


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-candidate memory subprocesses")
    parser.add_argument("--memory-only", action="store_true", help="re-measure memory into the existing JSON")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, 3, args.batch_size)
        return
    if args.quick:
        args.steps = 2
    if args.memory_only:
        out = RESULTS / "e2e_throughput.json"
        record = json.loads(out.read_text())
        record["memory"] = measure_memory(args.batch_size)
        record["mixlora"] = try_mixlora()
        write_json(out, record)
        print(json.dumps(record["memory"], indent=2))
        return
    built = {name: build(name) for name in CANDIDATES}
    tok = built["frozen_base"][2]
    data = batches(tok, args.steps + 1, args.batch_size)
    tokens = [int(b["attention_mask"].sum()) for b in data]
    # warm-up on batch 0, then one step of each candidate per batch 1.. in rotating order
    times = interleaved_times(
        CANDIDATES, lambda name, i: step(built[name][0], built[name][1], data[i]), range(1, len(data)), warmup=1
    )
    timed_tokens = sum(tokens[1:])
    tps = {n: timed_tokens / sum(t) for n, t in times.items()}
    memory = {} if args.no_memory else measure_memory(args.batch_size)
    ratios = {
        "riemix_20_10_4_over_peft_lora_r16": tps["riemix_20_10_4"] / tps["peft_lora_r16"],
        "riemix_8_2_4_over_peft_lora_r16": tps["riemix_8_2_4"] / tps["peft_lora_r16"],
    }
    print(
        f"SmolLM2-135M training steps, ARC-Easy cloze batches of {args.batch_size} "
        f"({timed_tokens / len(tokens[1:]):.0f} tokens/batch), {args.steps} timed steps each, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"{'candidate':<18} {'tokens/s':>9} {'s/step':>8} {'vs PEFT':>8} {'peak RSS +MiB':>14}")
    for name in CANDIDATES:
        mem = memory.get(name, {}).get("peak_rss_growth_mib")
        print(
            f"{name:<18} {tps[name]:9.0f} {statistics.median(times[name]):8.2f} "
            f"{tps[name] / tps['peft_lora_r16']:8.2f} {mem if mem is None else f'{mem:14.0f}'}"
        )
    mixlora = try_mixlora()
    print(f"mixlora: {mixlora}")
    print(
        f"target riemix_20_10_4 >= 0.85x PEFT LoRA r=16 tokens/s: {ratios['riemix_20_10_4_over_peft_lora_r16']:.2f} "
        f"({'met' if ratios['riemix_20_10_4_over_peft_lora_r16'] >= 0.85 else 'NOT met'})"
    )
    record = {
        **record_header("e2e_throughput"),
        "args": vars(args),
        "tokens_per_s": tps,
        "step_seconds": times,
        "memory": memory,
        "ratios": ratios,
        "mixlora": mixlora,
    }
    write_record(record, "e2e_throughput", args.quick)


if __name__ == "__main__":
    main()
