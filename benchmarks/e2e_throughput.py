"""End-to-end training and evaluation throughput on SmolLM2-135M with multiple-choice batches, side by side.

Each candidate runs full training steps (forward, loss on the answer tokens, backward, optimizer step) on
the same ARC-Easy ``cloze`` training batches (packaged data, batch 16), then evaluation forwards (eval
mode, ``torch.no_grad``: nothing is saved for a backward) on the same batches:

- ``frozen_base``: no adapters; forward + backward to the input embeddings (the floor any adapter pays);
- ``peft_lora_r16``: PEFT LoRA r=16, alpha 32 on q/k/v/o + torch AdamW;
- ``riemix_20_10_4``: riemix MoE-LoRA E=20, top-10, r=4 on q/k/v/o + gate-rescaled RiemannianAdamW;
- ``riemix_8_2_4``: E=8, top-2, r=4.

Steps are interleaved across candidates (one step each in rotating order), so machine noise hits all
alike; tokens/s counts non-padding tokens. On CPU, peak memory is the resident-set growth of a separate
process per candidate (model load excluded, ``VmHWM`` reset after loading); on CUDA it is the growth of
``torch.cuda.max_memory_allocated`` over one training step of each candidate.
MixLoRA (``mixlora`` on PyPI) is attempted and reported as skipped with the reason if it cannot train here.

    python benchmarks/e2e_throughput.py            # 12 timed steps per candidate, CPU fp32
    python benchmarks/e2e_throughput.py --quick    # 2 steps, smoke run
    python benchmarks/e2e_throughput.py --device cuda --bf16 --model path/to/SmolLM2.gguf --out r.json
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
from pathlib import Path

import torch
from lib.harness import RESULTS, interleaved_times, record_header, script_parser, write_json, write_record

_LOADED: dict = {}  # model name -> (model, tokenizer) as loaded, copied by build()
CANDIDATES = ("frozen_base", "peft_lora_r16", "riemix_20_10_4", "riemix_8_2_4")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def build(name: str, model_name: str = "smollm2-135m", device: str = "cpu"):
    """Model, task wrapper and optimizer (None for the frozen base) of one candidate, on ``device``."""
    from riemix import MoELoRAConfig, add_moe_lora, build_optimizer
    from riemix.hub import load_model
    from riemix.tasks import TaskModel

    if model_name not in _LOADED:  # load (and dequantise) once; every candidate gets its own copy
        _LOADED[model_name] = load_model(model_name)
    model, tok = _LOADED[model_name]
    model = copy.deepcopy(model).to(device).train()
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
        model.to(device)  # the new adapter tensors
        opt = build_optimizer(model, "radamw", lr=1e-4, gate_lr=1e-5, gate_max_grad_norm=1.0)
    return TaskModel(model, "causal_lm"), opt, tok


def batches(tok, n: int, batch_size: int):
    from riemix.data import load_dataset
    from riemix.tasks import TaskSpec, collate_lm, encode_train

    ds = load_dataset("arc_easy", "train")
    spec = TaskSpec.for_dataset(ds, "causal_lm", format="cloze")
    items = [encode_train(ex, spec, tok) for ex in ds.examples[: n * batch_size]]
    return [collate_lm(items[i : i + batch_size], tok.pad_token_id) for i in range(0, len(items), batch_size)]


def to_device(batch: dict, device: str) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step(task_model, opt, batch, bf16: bool = False, device: str = "cpu") -> None:
    """One training step: forward (bf16 autocast when asked), loss, backward, optimizer step."""
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        loss = task_model(batch)
    loss.backward()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)
    _sync(device)


@torch.no_grad()
def eval_step(task_model, batch, bf16: bool = False, device: str = "cpu") -> None:
    """One evaluation forward (the model in eval mode, no autograd graph)."""
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        task_model(batch, mode="token_logprobs")
    _sync(device)


def cuda_memory(built: dict, batch: dict, bf16: bool) -> dict:
    """Growth of the CUDA allocator's peak over one training step of each candidate (MiB)."""
    memory = {}
    for name, (task_model, opt, _) in built.items():
        task_model.train()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(task_model, opt, batch, bf16, "cuda")
        peak = torch.cuda.max_memory_allocated()
        memory[name] = {"peak_cuda_growth_mib": (peak - before) / 2**20}
    return memory


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_child(name: str, steps: int, batch_size: int, model_name: str = "smollm2-135m") -> None:
    """Entry point of the per-candidate memory subprocess: prints JSON with peak RSS growth in MiB.

    The peak resident set (VmHWM) is reset after the model is loaded (``/proc/self/clear_refs``), so the
    figure is the training steps' peak above the loaded model.
    """
    task_model, opt, tok = build(name, model_name)
    data = batches(tok, steps, batch_size)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    for b in data:
        step(task_model, opt, b)
    peak = _status_kib("VmHWM")
    print(json.dumps({"peak_rss_growth_mib": (peak - before) / 1024, "peak_rss_mib": peak / 1024}))


def measure_memory(batch_size: int, model_name: str = "smollm2-135m") -> dict:
    """Peak RSS growth of each candidate, each in its own process."""
    memory = {}
    for name in CANDIDATES:
        cmd = [sys.executable, __file__, "--memory-child", name, "--batch-size", str(batch_size), "--model", model_name]
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
    parser.add_argument("--model", default="smollm2-135m", help="built-in name or local path (e.g. a .gguf file)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast over fp32 weights (as train --bf16)")
    parser.add_argument("--out", default=None, help="JSON output path (default results/e2e_throughput.json)")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-candidate memory measurement")
    parser.add_argument("--memory-only", action="store_true", help="re-measure CPU memory into the existing JSON")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, 3, args.batch_size, args.model)
        return
    if args.quick:
        args.steps = 2
    if args.memory_only:
        out = RESULTS / "e2e_throughput.json"
        record = json.loads(out.read_text())
        record["memory"] = measure_memory(args.batch_size, args.model)
        record["mixlora"] = try_mixlora()
        write_json(out, record)
        print(json.dumps(record["memory"], indent=2))
        return
    dev, bf16 = args.device, args.bf16
    built = {name: build(name, args.model, dev) for name in CANDIDATES}
    tok = built["frozen_base"][2]
    data = [to_device(b, dev) for b in batches(tok, args.steps + 1, args.batch_size)]
    tokens = [int(b["attention_mask"].sum()) for b in data]
    timed_tokens = sum(tokens[1:])
    # Training: warm-up on batch 0, then one step of each candidate per batch 1.. in rotating order.
    times = interleaved_times(
        CANDIDATES, lambda name, i: step(built[name][0], built[name][1], data[i], bf16, dev), range(1, len(data)), 1
    )
    tps = {n: timed_tokens / sum(t) for n, t in times.items()}
    # Evaluation: every model in eval mode, no-grad forwards on the same batches, interleaved the same way.
    for task_model, _, _ in built.values():
        task_model.eval()
    eval_times = interleaved_times(
        CANDIDATES, lambda name, i: eval_step(built[name][0], data[i], bf16, dev), range(1, len(data)), 1
    )
    eval_tps = {n: timed_tokens / sum(t) for n, t in eval_times.items()}
    if args.no_memory:
        memory = {}
    elif dev == "cuda":
        memory = cuda_memory(built, data[1], bf16)
    else:
        memory = measure_memory(args.batch_size, args.model)
    ratios = {
        "riemix_20_10_4_over_peft_lora_r16": tps["riemix_20_10_4"] / tps["peft_lora_r16"],
        "riemix_8_2_4_over_peft_lora_r16": tps["riemix_8_2_4"] / tps["peft_lora_r16"],
        **{f"eval_{n}_over_frozen_base": eval_tps[n] / eval_tps["frozen_base"] for n in CANDIDATES[1:]},
    }
    where = f"{dev}{' bf16 autocast' if bf16 else ' fp32'}, " + (
        torch.cuda.get_device_name() if dev == "cuda" else f"{torch.get_num_threads()} threads"
    )
    print(
        f"SmolLM2-135M, ARC-Easy cloze batches of {args.batch_size} ({timed_tokens / len(tokens[1:]):.0f} "
        f"tokens/batch), {args.steps} timed steps each, {where}"
    )
    mem_key = "peak_cuda_growth_mib" if dev == "cuda" else "peak_rss_growth_mib"
    print(f"{'candidate':<16} {'train tok/s':>11} {'vs PEFT':>8} {'eval tok/s':>10} {'vs base':>8} {'peak +MiB':>10}")
    for name in CANDIDATES:
        mem = memory.get(name, {}).get(mem_key)
        print(
            f"{name:<16} {tps[name]:11.0f} {tps[name] / tps['peft_lora_r16']:8.2f} {eval_tps[name]:10.0f} "
            f"{eval_tps[name] / eval_tps['frozen_base']:8.2f} {'' if mem is None else f'{mem:10.0f}'}"
        )
    mixlora = try_mixlora()
    print(f"mixlora: {mixlora}")
    for key, target in (
        ("riemix_8_2_4_over_peft_lora_r16", 1.05),
        ("riemix_20_10_4_over_peft_lora_r16", 1.0),
        ("eval_riemix_8_2_4_over_frozen_base", 0.95),
        ("eval_riemix_20_10_4_over_frozen_base", 0.95),
    ):
        print(f"target {key} >= {target}: {ratios[key]:.2f} ({'met' if ratios[key] >= target else 'NOT met'})")
    record = {
        **record_header("e2e_throughput"),
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
        "args": vars(args),
        "tokens_per_s": tps,
        "step_seconds": times,
        "eval_tokens_per_s": eval_tps,
        "eval_seconds": eval_times,
        "memory": memory,
        "ratios": ratios,
        "mixlora": mixlora,
    }
    write_record(record, "e2e_throughput", args.quick, args.out)


if __name__ == "__main__":
    main()
