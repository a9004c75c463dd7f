"""Helpers shared by the tests (fixtures live in conftest.py files).

- tiny randomly initialised Hugging Face models and their inputs;
- a word-level tokenizer and synthetic, learnable data files;
- tiny training runs (configs, metrics, resume) and the first step's regulariser values;
- fp64 LoRA factor pairs and the explicit per-expert preconditioner the optimizer tests compare with.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

F64 = torch.float64


# ---------------------------------------------------------------- tiny models
def make_tiny_llama(seed: int = 0, hidden: int = 32, layers: int = 2, dtype=torch.float32):
    """A 2-layer LlamaForCausalLM with hidden size 32 and vocabulary 64, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).to(dtype).eval()


def make_tiny_bert(seed: int = 0, num_labels: int = 2):
    """A 2-layer BertForSequenceClassification with hidden size 32, in eval mode."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(cfg).eval()


#: model name -> (factory, its attention projections to adapt)
TINY_MODELS = {
    "llama": (make_tiny_llama, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    "bert": (make_tiny_bert, ["query", "key", "value", "attention.output.dense"]),
}


def tiny_inputs(seed: int = 1, batch: int = 2, seq: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


# ---------------------------------------------------------------- tokenizer and synthetic data
GOOD = ["apple", "pear", "plum", "fig"]
BAD = ["rock", "sand", "iron", "salt", "clay", "dust"]
FILLER = ["what", "is", "tasty", "the", "best", "pick", "today", "here"]
_SPECIAL = ["<pad>", "<eos>", "<unk>", "Question:", "Answer:", "Review:", "Sentiment:", "good", "bad"]
_WORDS = _SPECIAL + ["A", "B", "C", ".", ":", "?"] + GOOD + BAD + FILLER


def tiny_tokenizer(pad: bool = True):
    """A whitespace word-level fast tokenizer over the synthetic vocabulary (``pad=False``: no pad token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(_WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    extra = {"pad_token": "<pad>"} if pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", **extra)


def write_lines(path: Path, lines) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, rows) -> Path:
    """One JSON object per line (a string row is written as it is)."""
    return write_lines(path, [r if isinstance(r, str) else json.dumps(r) for r in rows])


def at_line(path: Path, line: int) -> str:
    """The regex of the ``<file>:<line>: `` prefix of a data error."""
    return re.escape(f"{path}:{line}: ")


def write_mcq(path, n, seed):
    """Synthetic but learnable: the correct choice is always a fruit, the others are minerals."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        choices = rng.sample(BAD, 2) + [rng.choice(GOOD)]
        rng.shuffle(choices)
        answer = next(i for i, c in enumerate(choices) if c in GOOD)
        rows.append({"question": " ".join(rng.sample(FILLER, 3)), "choices": choices, "answer": answer})
    write_jsonl(Path(path), rows)
    return str(path)


def write_mcq_pair(folder: Path, n_train: int, n_dev: int) -> tuple[str, str]:
    """``train.jsonl`` (seed 0) and ``dev.jsonl`` (seed 1) in ``folder``."""
    return write_mcq(folder / "train.jsonl", n_train, 0), write_mcq(folder / "dev.jsonl", n_dev, 1)


# ---------------------------------------------------------------- tiny training runs
def save_tiny_model_dir(tmp_path) -> str:
    """A tiny Llama and its tokenizer saved as a Hugging Face directory."""
    model_dir = tmp_path / "tiny-model"
    make_tiny_llama().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    return str(model_dir)


def tiny_train_cfg(output_dir, dataset, **kw):
    """A short quiet run on the tiny model; ``kw`` overrides any option."""
    from riemix.training.config import TrainConfig

    opts = dict(model="tiny", dataset=str(dataset), output_dir=str(output_dir), progress=False, verbose=False)
    return TrainConfig.from_dict({**opts, **kw})


def base_cfg(tmp_path, mcq_files, **kw):
    """The multiple-choice run most training tests start from: 30 steps, 4 experts top-2, run dir ``run``."""
    opts = dict(
        eval_dataset=mcq_files[1],
        format="cloze",
        batch_size=8,
        max_steps=30,
        lr=3e-2,
        gate_lr=1e-2,
        eval_batch_size=48,
        adapter={
            "num_experts": 4,
            "top_k": 2,
            "rank": 4,
            "alpha": 8.0,
            "dropout": 0.1,
            "target_modules": ["q_proj", "v_proj", "o_proj", "down_proj"],
        },
    )
    return tiny_train_cfg(kw.pop("output_dir", tmp_path / "run"), mcq_files[0], **{**opts, **kw})


def train_tiny(cfg, model=None) -> dict:
    """``train`` on a fresh tiny Llama (or ``model``) with the tiny tokenizer; returns the summary."""
    from riemix.training.recipe import train

    return train(cfg, model=make_tiny_llama() if model is None else model, tokenizer=tiny_tokenizer())


def read_metrics(run_dir, key: str | None = None) -> list[dict]:
    """The lines of a run's metrics.jsonl (only those holding ``key`` when given)."""
    lines = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if key is None or key in x]


def train_straight_and_resumed(make_cfg: Callable, tmp_path: Path, checkpoint: str = "step-000003"):
    """Train ``make_cfg(out)`` straight, then again resumed from the straight run's ``checkpoint``.

    The resumed run directory is the straight one as it stood when ``checkpoint`` was written (its config,
    run id, metrics and that checkpoint only), so the resume cuts metrics.jsonl back to the checkpoint.

    Returns the two final adapters loaded onto fresh tiny Llamas: (straight, resumed).
    """
    from riemix.io.adapter import load_adapter

    train_tiny(make_cfg(tmp_path / "straight"))
    ckpt = Path("checkpoints") / checkpoint
    shutil.copytree(tmp_path / "straight" / ckpt, tmp_path / "resumed" / ckpt)
    for name in ("config.yaml", "run.json", "metrics.jsonl"):
        shutil.copy(tmp_path / "straight" / name, tmp_path / "resumed" / name)
    torch.manual_seed(999)  # a different ambient RNG state must not matter: the checkpoint restores it
    train_tiny(make_cfg(tmp_path / "resumed", resume=True))
    return tuple(load_adapter(make_tiny_llama(), tmp_path / run / "adapter") for run in ("straight", "resumed"))


def lm_steps(model, optimizer, steps, after_step=None) -> None:
    """One optimizer step of the tiny Llama's LM loss per ``step`` (inputs seeded with the step);
    ``after_step(model, step)`` runs after each (e.g. ``advance_maturity``)."""
    for step in steps:
        inputs = tiny_inputs(seed=step)
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step(model, step)


def first_step_regularizers(cfg) -> dict[str, float]:
    """The unweighted regulariser values of a tiny run's first step, computed outside the trainer.

    The run's seeded start is rebuilt (``prepare`` after ``seed_everything``, as ``setup`` does), its first
    micro-batch taken with ``batch_at``/``collate``, and each active regulariser of ``riemix.core`` evaluated
    on every adapted layer and averaged. Exact for zero-B starts, whose expert dropout cannot change the
    forward (the adapters add nothing yet).
    """
    from riemix.core.regularizers import (
        expert_diversity_loss,
        load_balancing_loss,
        orthogonality_loss,
        router_z_loss,
        uniform_prior_loss,
    )
    from riemix.core.tuner import iter_moe_lora_layers, set_record_routing
    from riemix.tasks import TaskModel
    from riemix.training.data import batch_at, collate, encode_items, seed_everything
    from riemix.training.recipe import prepare

    model = make_tiny_llama()
    seed_everything(cfg.seed)  # after building the model, as in train(cfg, model=...)
    ctx = prepare(cfg, model, tiny_tokenizer())
    items = encode_items(ctx["train_sets"], ctx["specs"], ctx["tokenizer"], cfg.model_kind)
    batch = collate(batch_at(items, 0, cfg.batch_size, cfg.seed), ctx["tokenizer"], cfg.model_kind, cfg.max_length)
    set_record_routing(ctx["model"])
    TaskModel(ctx["model"], cfg.model_kind).train()(batch)
    mask = batch["attention_mask"]
    losses = {
        "load_balance": lambda m: load_balancing_loss(m.last_router_logits, m.top_k, m.routing, mask),
        "z_loss": lambda m: router_z_loss(m.last_router_logits, mask),
        "uniform_prior": lambda m: uniform_prior_loss(m.last_router_logits, mask),
        "diversity": lambda m: expert_diversity_loss(m.lora_A, m.lora_B),
        "orthogonality": lambda m: orthogonality_loss(m.lora_A),
    }
    layers = [layer for _, layer in iter_moe_lora_layers(ctx["model"])]
    coefs = cfg.regularizer_coefs()
    with torch.no_grad():
        return {k: sum(f(m).item() for m in layers) / len(layers) for k, f in losses.items() if coefs[k]}


# ---------------------------------------------------------------- optimizer references (fp64)
#: (E, r, in, out); E=None means 2-D factors. Two pairs share a shape, several (E, r) buckets.
SPECS = [(3, 2, 5, 7), (3, 2, 5, 7), (3, 2, 6, 4), (2, 3, 5, 5), (None, 2, 4, 3)]


def make_pairs(specs=SPECS, seed=0, dtype=F64):
    """Random (A, B) parameter pairs; B is not zero so both preconditioners are non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    pairs = []
    for e, r, d_in, d_out in specs:
        lead = () if e is None else (e,)
        a = nn.Parameter(torch.randn(*lead, r, d_in, generator=gen, dtype=F64).to(dtype))
        b = nn.Parameter(torch.randn(*lead, d_out, r, generator=gen, dtype=F64).to(dtype))
        pairs.append((a, b))
    return pairs


def set_grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=F64).to(p.dtype)


def ids(params):
    return [id(p) for p in params]


def clone_params(params):
    return [nn.Parameter(p.detach().clone()) for p in params]


def clone_pairs(pairs):
    return [tuple(clone_params(p)) for p in pairs]


def flat(pairs):
    return [p for pair in pairs for p in pair]


def ref_precond(a, b, ga, gb, reg):
    """Explicit per-expert preconditioned grads with torch.linalg.inv (loop over experts)."""
    a3, b3, ga3, gb3 = (t if t.dim() == 3 else t[None] for t in (a, b, ga, gb))
    eye = torch.eye(a3.shape[1], dtype=a3.dtype)
    pa, pb = torch.empty_like(ga3), torch.empty_like(gb3)
    for e in range(a3.shape[0]):
        pa[e] = torch.linalg.inv(b3[e].T @ b3[e] + reg * eye) @ ga3[e]
        pb[e] = gb3[e] @ torch.linalg.inv(a3[e] @ a3[e].T + reg * eye)
    return pa.reshape(ga.shape), pb.reshape(gb.shape)


def ref_grads(pairs, reg):
    out = {}
    for a, b in pairs:
        out[a], out[b] = ref_precond(a.detach(), b.detach(), a.grad, b.grad, reg)
    return out


def assert_params_close(xs, ys, atol=1e-12, rtol=0.0):
    for x, y in zip(xs, ys, strict=True):
        torch.testing.assert_close(x.detach(), y.detach(), atol=atol, rtol=rtol)


def moe_layer(d_in, d_out, n_experts=3, r=2):
    """A MoELoRALinear (fp64, frozen base, all experts routed) with random non-zero A and B."""
    from riemix.core.layer import MoELoRALinear

    base = nn.Linear(d_in, d_out, dtype=F64).requires_grad_(False)
    layer = MoELoRALinear(base, num_experts=n_experts, rank=r, alpha=r, top_k=n_experts)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(n_experts, r, d_in, dtype=F64) * 0.3)
        layer.lora_B.copy_(torch.randn(n_experts, d_out, r, dtype=F64) * 0.3)
    return layer


def moe_stack():
    """Two MoE-LoRA layers around a LayerNorm (fp64, seed 0): routers, factors and an ``other`` parameter."""
    torch.manual_seed(0)
    return nn.Sequential(moe_layer(6, 5), nn.LayerNorm(5, dtype=F64), moe_layer(5, 4, n_experts=2, r=3))


# ---------------------------------------------------------------- benchmark records
def result_row(stage, cand, lr, seed, final, early=None):
    """A result row of benchmarks/quality_compare.py (one trained and scored candidate)."""
    row = {"stage": stage, "candidate": cand, "lr": lr, "seed": seed, "final": final, "trainable_params": 10}
    if early is not None:
        row["early"] = early
    return row
