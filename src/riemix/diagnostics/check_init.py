"""Does an adapter initialisation leave the base model's behaviour intact? (``riemix check-init``)

Compares a causal LM with and without the freshly initialised MoE-LoRA adapters (or a run's trained
adapter with ``trained=True``) on sample text: the mean KL divergence KL(p_base ‖ p_adapted) of the
next-token distributions over every position, the perplexity of each model on the text, and greedy
generations side by side.  The check fails (``ok`` is False; the command exits 1 with a warning) when the
KL exceeds ``threshold``.

The default threshold, 1e-4 nats per token, sits far above the floating-point noise of the
output-preserving inits (≈1e-12 in fp32 for ``zero_b``/``gaussian``/``orthogonal``, which are exact,
and ≲1e-8 for ``pissa``, whose residual is rounded to the weight dtype) and far below any change a
person would notice: a KL of 1e-4 changes the perplexity by at most about 0.01 %, and argmax tokens
only flip where the top two candidates are within about 1 % of probability.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any

import torch

from riemix.core.config import MoELoRAConfig
from riemix.core.tuner import add_moe_lora
from riemix.hub import load_model
from riemix.hub.quantize import check_quantization
from riemix.io.adapter import load_adapter

__all__ = ["DEFAULT_TEXTS", "DEFAULT_THRESHOLD", "DTYPES", "check_init", "compare_models", "greedy_generate"]

#: KL (nats/token) above which an initialisation counts as changing the model (see the module docstring).
DEFAULT_THRESHOLD = 1e-4
#: Weight dtypes the comparison runs in.
DTYPES = ("float32", "float64", "bfloat16")
#: Built-in sample sentences (used unless other texts are given).
DEFAULT_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: What is the capital of France? Answer: Paris.",
    "In 1905 Albert Einstein published four papers that changed physics.",
    "def add(a, b):\n    return a + b",
    "The weather today is sunny with a light breeze from the west.",
]


def _encode(tokenizer, text: str, device) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=True)["input_ids"]  # (1, T)
    return ids.to(device)


@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, max_new_tokens: int) -> list[int]:
    """Greedy continuation (no cache: simple and deterministic); returns the new token ids."""
    ids = input_ids  # (1, T)
    new = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1]  # (1, V)
        token = logits.argmax(-1, keepdim=True)  # (1, 1)
        new.append(int(token))
        ids = torch.cat([ids, token], dim=1)
    return new


@torch.no_grad()
def compare_models(base, adapted, tokenizer, texts: list[str], max_new_tokens: int = 16) -> dict[str, Any]:
    """KL, perplexities and greedy generations of two causal LMs on ``texts`` (each its own batch).

    Args:
        base: the plain model.
        adapted: the model with adapters.
        tokenizer: their tokenizer.
        texts: sample texts.
        max_new_tokens: length of the greedy continuations (0: none).

    Returns:
        ``{"kl_mean", "kl_max", "ppl_base", "ppl_adapted", "positions", "generations": [...]}``; the KL is
        KL(p_base ‖ p_adapted) in nats, averaged over every position of every text.
    """
    base.eval()
    adapted.eval()
    device = next(base.parameters()).device
    kl_sum = kl_max = nll_b = nll_a = 0.0
    positions = predicted = 0
    gens = []
    for text in texts:
        ids = _encode(tokenizer, text, device)  # (1, T)
        if ids.shape[1] == 0:
            continue
        mask = torch.ones_like(ids)
        lb = base(input_ids=ids, attention_mask=mask).logits[0].double().log_softmax(-1)  # (T, V)
        la = adapted(input_ids=ids, attention_mask=mask).logits[0].double().log_softmax(-1)  # (T, V)
        kl = (lb.exp() * (lb - la)).sum(-1)  # (T,)
        kl_sum += float(kl.sum())
        kl_max = max(kl_max, float(kl.max()))
        positions += kl.numel()
        if ids.shape[1] > 1:
            target = ids[0, 1:]  # (T-1,)
            nll_b -= float(lb[:-1].gather(-1, target.unsqueeze(-1)).sum())
            nll_a -= float(la[:-1].gather(-1, target.unsqueeze(-1)).sum())
            predicted += target.numel()
        if max_new_tokens:
            gb = greedy_generate(base, ids, max_new_tokens)
            ga = greedy_generate(adapted, ids, max_new_tokens)
            gens.append(
                {
                    "prompt": text,
                    "base": tokenizer.decode(gb, skip_special_tokens=True),
                    "adapted": tokenizer.decode(ga, skip_special_tokens=True),
                    "identical": gb == ga,
                }
            )
    if not positions:
        raise ValueError("check-init: the sample texts produced no tokens")
    return {
        "kl_mean": kl_sum / positions,
        "kl_max": kl_max,
        "ppl_base": math.exp(nll_b / predicted) if predicted else float("nan"),
        "ppl_adapted": math.exp(nll_a / predicted) if predicted else float("nan"),
        "positions": positions,
        "generations": gens,
    }


def _models(
    model_or_run: str | os.PathLike,
    adapter: dict[str, Any],
    trained: bool,
    dtype: str,
    seed: int | None,
    quantization: str | None,
):
    """The base model, its adapted copy, the tokenizer and a description of the adapter."""
    run_dir = Path(model_or_run)
    model_name, run_seed, saved_adapter, run_quantization = str(model_or_run), 0, {}, None
    if (run_dir / "config.yaml").is_file():
        import yaml

        saved = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
        if saved.get("model_kind", "causal_lm") != "causal_lm":
            raise ValueError(f"check-init compares causal LMs; {run_dir} trained a {saved['model_kind']}")
        model_name, run_seed = saved["model"], int(saved.get("seed", 0))
        saved_adapter = saved.get("adapter") or {}
        run_quantization = saved.get("quantization")
    elif trained:
        raise ValueError(f"--trained needs a run directory with config.yaml, got {str(model_or_run)!r}")
    quantization = quantization or run_quantization
    base, tokenizer = load_model(model_name, dtype=getattr(torch, dtype), quantization=quantization)
    if tokenizer is None:
        raise ValueError(f"model {model_name!r} has no tokenizer; check-init needs one")
    adapted = copy.deepcopy(base)
    if trained:
        load_adapter(adapted, run_dir / "adapter")
        what = f"trained adapter of {run_dir}"
    else:
        cfg = MoELoRAConfig.from_dict({**saved_adapter, **adapter})
        torch.manual_seed(run_seed if seed is None else seed)
        add_moe_lora(adapted, cfg)
        what = f"init={cfg.init}, experts={cfg.num_experts}, top_k={cfg.top_k}, rank={cfg.rank}, routing={cfg.routing}"
    on = f", {quantization} base" if quantization else ""
    return base, adapted, tokenizer, f"{model_name} ({what}{on})"


def check_init(
    model_or_run: str | os.PathLike,
    adapter: dict[str, Any] | None = None,
    trained: bool = False,
    texts: list[str] | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    max_new_tokens: int = 16,
    dtype: str = "float32",
    seed: int | None = None,
    quantization: str | None = None,
) -> dict[str, Any]:
    """Compare a causal LM with and without an adapter on sample text.

    Args:
        model_or_run: A model name or directory (given a fresh adapter), or a run directory with
            config.yaml (its model, adapter options and seed; the adapter options given override them).
        adapter: ``MoELoRAConfig`` fields over the defaults, or over the run's adapter options.
        trained: Compare with the run directory's trained adapter/ instead of a fresh initialisation.
        texts: Sample texts, each its own batch (default: ``DEFAULT_TEXTS``).
        threshold: Mean KL (nats/token) above which the check fails.
        max_new_tokens: Length of the greedy continuations compared (0: none).
        dtype: Weight dtype of both models.
        seed: Adapter initialisation seed (default: the run's seed, else 0).
        quantization: Load the base quantized by bitsandbytes (nf4, fp4, int8), both models alike (default:
            the run's quantization, else full precision).

    Returns:
        ``compare_models``' result plus ``"threshold"``, ``"ok"`` (mean KL <= threshold) and ``"what"``
        (the model and adapter compared).

    Raises:
        ValueError: a negative threshold, an unknown dtype, bad adapter options, ``trained`` without a run
            directory, a run that did not train a causal LM, a model without a tokenizer.
    """
    if not threshold >= 0:
        raise ValueError(f"--threshold must be >= 0, got {threshold!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    check_quantization(quantization, None)
    base, adapted, tokenizer, what = _models(model_or_run, adapter or {}, trained, dtype, seed, quantization)
    res = compare_models(base, adapted, tokenizer, DEFAULT_TEXTS if texts is None else texts, max_new_tokens)
    return {**res, "threshold": threshold, "ok": res["kl_mean"] <= threshold, "what": what}
