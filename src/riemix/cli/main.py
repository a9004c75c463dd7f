"""``riemix`` command line: a thin layer over ``riemix.training.recipe`` and ``riemix.evaluate``.

riemix train                                  # the default job (SmolLM2-135M on SST-2)
riemix train --config configs/paper.yaml --lr 2e-5 --output-dir runs/x
riemix train --output-dir runs/x --resume     # continue the latest checkpoint
riemix eval --model smollm2-135m --adapter runs/x/adapter --dataset glue/sst2
riemix inspect runs/x                         # routing/expert diagnostics: tables + plots
riemix check-init smollm2-135m --init pissa   # does the adapter init change the model's outputs?
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from typing import Any

from riemix.training.config import DEFAULT_ADAPTER, TrainConfig

__all__ = ["main", "build_parser"]

def _bool_text(text: str) -> bool:
    """``true/false/yes/no/1/0`` -> bool (for adapter flags such as ``--expert-scales true``)."""
    if text.lower() in ("true", "yes", "1"):
        return True
    if text.lower() in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


# Adapter options exposed as top-level flags: flag name -> MoELoRAConfig field.
ADAPTER_FLAGS = {
    "experts": ("num_experts", int),
    "top_k": ("top_k", int),
    "rank": ("rank", int),
    "alpha": ("alpha", float),
    "dropout": ("dropout", float),
    "target_modules": ("target_modules", str),
    "routing": ("routing", str),
    "gate_grad_power": ("gate_grad_power", float),
    "init": ("init", str),
    "init_b_std": ("init_b_std", float),
    "scale_warmup_steps": ("scale_warmup_steps", int),
    "router_temperature": ("router_temperature", float),
    "router_temperature_final": ("router_temperature_final", float),
    "router_noise_std": ("router_noise_std", float),
    "top_p": ("top_p", float),
    "expert_scales": ("expert_scales", _bool_text),
    "scale_anchor_beta": ("scale_anchor_beta", float),
}


def _nullable(cast):
    def parse(text: str):
        return None if text.lower() in ("none", "null") else cast(text)

    parse.__name__ = cast.__name__
    return parse


def _resume(text: str) -> bool | str:
    return True if text.lower() in ("", "latest", "true") else text


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name == "adapter":
            continue
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        args = typing.get_args(hint)
        origin = typing.get_origin(hint)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"(default: {default!r})"
        if f.name == "resume":
            parser.add_argument(
                flag,
                nargs="?",
                const=True,
                type=_resume,
                default=argparse.SUPPRESS,
                help="resume from the latest checkpoint of --output-dir, or from a given checkpoint",
            )
        elif hint is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
            )
        elif origin is list or list in [typing.get_origin(a) for a in args]:
            parser.add_argument(flag, nargs="+", default=argparse.SUPPRESS, help=help_text)
        else:
            base = (
                next((a for a in args if a is not type(None)), hint)
                if origin in (typing.Union, types.UnionType)
                else hint
            )
            cast = base if base in (int, float, str) else str
            parser.add_argument(
                flag,
                type=_nullable(cast) if type(None) in args else cast,
                default=argparse.SUPPRESS,
                help=help_text,
            )
    for name, (field_name, cast) in ADAPTER_FLAGS.items():
        flag = "--" + name.replace("_", "-")
        kw: dict[str, Any] = {
            "default": argparse.SUPPRESS,
            "help": f"adapter.{field_name} (default: {DEFAULT_ADAPTER.get(field_name)!r})",
        }
        if field_name == "target_modules":
            kw["nargs"] = "+"
        else:
            kw["type"] = cast
        parser.add_argument(flag, **kw)


def build_parser() -> argparse.ArgumentParser:
    """The ``riemix`` argument parser (subcommands ``train``, ``eval``, ``inspect``, ...)."""
    parser = argparse.ArgumentParser(
        prog="riemix",
        description="MoE-LoRA fine-tuning with gate-rescaled Riemannian preconditioned optimizers.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser(
        "train",
        help="train MoE-LoRA adapters (no arguments: the default job)",
        description="Train MoE-LoRA adapters. Options come from --config (YAML) and flags; "
        "flags override the file.",
    )
    tr.add_argument("--config", help="YAML file of options (keys = flag names with underscores)")
    _add_config_flags(tr)
    ev = sub.add_parser("eval", help="evaluate a model (optionally with an adapter) on a dataset")
    ev.add_argument("--model", default="smollm2-135m", help="built-in name, local directory or hub id")
    ev.add_argument("--model-kind", default="causal_lm", choices=["causal_lm", "sequence_classification"])
    ev.add_argument("--adapter", help="adapter directory written by riemix (optional: zero-shot without)")
    ev.add_argument("--dataset", default="glue/sst2", help="built-in dataset name or a .jsonl/.tsv file")
    ev.add_argument("--split", default="dev")
    ev.add_argument("--data-dir", help="directory laid out like the built-in data (see docs)")
    ev.add_argument("--format", default="cloze", choices=["cloze", "letter"])
    ev.add_argument("--template", help="prompt template for label-word classification")
    ev.add_argument("--label-words", nargs="+", help="one word per class")
    ev.add_argument("--subset", type=int, help="evaluate a fixed random subset of this size")
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--max-length", type=int, default=256)
    ev.add_argument("--output", help="write the metrics as JSON to this file")
    ins = sub.add_parser(
        "inspect",
        help="routing / expert diagnostics of a run: tables and PNG plots",
        description="Print per-layer routing entropy, usage, load CV, dead experts, expert similarity "
        "and effective rank of a run directory, and write PNG plots (see docs/diagnostics.md).",
    )
    ins.add_argument("run_dir", help="run directory written by riemix train")
    ins.add_argument("--out", help="directory for the plots (default: RUN_DIR/plots)")
    ins.add_argument("--layer", help="layer for the similarity plot (default: the most collapsed)")
    ins.add_argument("--threshold", type=float, default=0.8, help="similarity threshold (default: 0.8)")
    ins.add_argument("--no-plots", action="store_true", help="print the tables only")
    from riemix.diagnostics.check_init import add_check_init_parser

    add_check_init_parser(sub)
    return parser


def _inspect(ns: argparse.Namespace) -> int:
    from riemix.diagnostics.inspect import inspect_run

    result = inspect_run(ns.run_dir, ns.out, ns.layer, ns.threshold, plots=not ns.no_plots)
    print(result["text"])
    for path in result["plots"]:
        print(f"wrote {path}")
    return 0


def _train(ns: argparse.Namespace) -> int:
    from riemix.training.recipe import train

    opts = {k: v for k, v in vars(ns).items() if k not in ("command", "config")}
    adapter = {ADAPTER_FLAGS[k][0]: opts.pop(k) for k in list(opts) if k in ADAPTER_FLAGS}
    if adapter:
        opts["adapter"] = adapter
    if ns.config:
        cfg = TrainConfig.from_yaml(ns.config, opts)
    else:
        cfg = TrainConfig.from_dict(opts, source="command line")
    train(cfg)
    return 0


def _eval(ns: argparse.Namespace) -> int:
    from riemix.data import load_dataset
    from riemix.evaluate import evaluate
    from riemix.hub.loading import load_model
    from riemix.io.adapter import load_adapter
    from riemix.io.fileio import atomic_write_json
    from riemix.tasks import TaskModel, TaskSpec

    ds = load_dataset(ns.dataset, ns.split, ns.data_dir)
    if ns.subset:
        ds = ds.subset(ns.subset, seed=0)
    num_labels = None
    if ns.model_kind == "sequence_classification":
        num_labels = 1 if ds.task == "regression" else ds.num_labels
    model, tokenizer = load_model(ns.model, task=ns.model_kind, num_labels=num_labels)
    if ns.adapter:
        load_adapter(model, ns.adapter)
    spec = TaskSpec.for_dataset(
        ds,
        ns.model_kind,
        format=ns.format,
        template=ns.template,
        label_words=ns.label_words,
        max_length=ns.max_length,
    )
    metrics = evaluate(TaskModel(model, ns.model_kind), ds, spec, tokenizer, ns.batch_size)
    print(json.dumps({"dataset": ds.name, "split": ns.split, "examples": len(ds), **metrics}, indent=2))
    if ns.output:
        atomic_write_json(ns.output, {"dataset": ds.name, "split": ns.split, "examples": len(ds), **metrics})
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``riemix`` command; returns the exit status (2 on bad input)."""
    from riemix.data import DataError
    from riemix.io.adapter import AdapterError

    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        if ns.command == "inspect":
            return _inspect(ns)
        if ns.command == "check-init":
            from riemix.diagnostics.check_init import run_check_init

            return run_check_init(ns)
        return _train(ns) if ns.command == "train" else _eval(ns)
    except (ValueError, DataError, AdapterError, FileNotFoundError) as exc:
        print(f"riemix {ns.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # model loading errors carry their own explanation
        if type(exc).__name__ == "ModelLoadError":
            print(f"riemix {ns.command}: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
