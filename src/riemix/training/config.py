"""``TrainConfig``: every option of a training run, validated, with YAML round trip.

Options come from a YAML file and/or CLI flags (flags override); the resolved config is saved in the
run directory as ``config.yaml``.  The defaults are the default job: SmolLM2-135M-Instruct learning
SST-2 with label words, MoE-LoRA and gate-rescaled Riemannian AdamW on a 2-core CPU in minutes.

The adapter is a typed ``MoELoRAConfig`` (its defaults are the default job's adapter).  In YAML and in
``to_dict()`` it is a nested mapping; a partial mapping is merged over the ``MoELoRAConfig`` defaults.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from riemix.core.config import REGULARIZER_MODES, MoELoRAConfig
from riemix.core.fields import allowed_types, check_field_types, check_ranges
from riemix.core.regularizers import REGULARIZERS
from riemix.hub.quantize import BASE_DTYPES, QUANTIZATIONS
from riemix.optim import OPTIMIZER_NAMES
from riemix.tasks import FORMATS, MIN_MAX_LENGTH, MODEL_KINDS, one_of

__all__ = ["RESUME_SAFE_FIELDS", "SCHEDULES", "TrainConfig", "read_yaml_options"]

#: Learning-rate schedules accepted by ``TrainConfig.schedule`` (``riemix.core.schedules.linear_schedule``;
#: both start with the linear warm-up).
SCHEDULES: tuple[str, ...] = ("linear", "constant")

#: The fields a resume may change (``--resume`` with other values continues the same run); a difference in
#: any other field (model, data, adapter, optimizer, schedule ...) is refused, naming it.
RESUME_SAFE_FIELDS: tuple[str, ...] = (
    "max_steps",
    "eval_every",
    "eval_batch_size",
    "early_stopping_patience",
    "diagnostics_every",
    "output_dir",
    "save_every",
    "keep_last",
    "resume",
    "overwrite",
    "gradient_checkpointing",
    "cpu",
    "log_every",
    "tensorboard",
    "progress",
    "verbose",
)

# Fields validated as ints >= 1 / ints >= 0 / numbers >= 0.
_POSITIVE_INTS = ("max_steps", "batch_size", "grad_accum", "eval_batch_size", "keep_last", "log_every")
_NON_NEGATIVE_INTS = (
    "warmup_steps",
    "eval_every",
    "save_every",
    "early_stopping_patience",
    "seed",
    "diagnostics_every",
)
_NON_NEGATIVE_NUMBERS = ("lr", "reg", "weight_decay", *(f"{name}_coef" for name in REGULARIZERS))


@dataclass
class TrainConfig:
    """A training run. Every field is a CLI flag (``--lr 1e-4``) and a YAML key (``lr: 1e-4``).

    Attributes:
        model: Base model: a built-in name (e.g. ``smollm2-135m``), a local Hugging Face directory or a hub id.
        model_kind: ``causal_lm`` (label words / multiple choice / SFT as text) or ``sequence_classification``
            (an encoder with a classification head).
        quantization: Load the base model quantized by bitsandbytes (``pip install riemix[quant]``): ``nf4`` or
            ``fp4`` (4-bit) or ``int8``; null: full precision. The adapters stay in fp32.
        base_dtype: Dtype of the base model's unquantized weights (and 4-bit compute dtype): ``fp32`` or ``bf16``;
            null: fp32.
        dataset: Training dataset(s): a built-in name (e.g. ``glue/sst2``) or a .jsonl/.tsv file; a list trains
            on their union.
        eval_dataset: Evaluation dataset(s), one per training dataset; null evaluates the training datasets.
        data_dir: Directory laid out like the built-in data, searched for dataset names; null: packaged data.
        train_split: Split of ``dataset`` to train on (e.g. ``train``).
        eval_split: Split of ``eval_dataset`` to evaluate on (e.g. ``dev``, ``test``).
        train_subset: Train on a fixed random subset of this many examples (int >= 1); null: all.
        eval_subset: Evaluate a fixed random subset of this many examples (int >= 1); null: all.
        format: Multiple-choice formulation for causal LMs: ``cloze`` (score each choice's text) or ``letter``
            (score the answer letter).
        template: Prompt template for label-word classification (``{text}``, ``{text_pair}``); null: the
            dataset's default.
        label_words: One word per class for label-word classification; empty: the dataset's default.
        max_length: Token budget per sequence (int >= 8); prompts are truncated from the left.
        packing: Pack several SFT sequences into one row of ``max_length`` tokens.
        adapter: The MoE-LoRA adapter (``MoELoRAConfig``); in YAML a mapping of its fields, merged over its
            defaults.
        optimizer: ``radamw`` or ``rsgd`` (Riemannian preconditioned) or ``adamw`` or ``sgd`` (plain).
        lr: Learning rate of the expert factors A and B (>= 0).
        gate_lr: Learning rate of the routers (>= 0); null: ``lr``.
        reg: Ridge term delta of the Riemannian preconditioner (>= 0).
        weight_decay: Weight decay of every parameter group (>= 0).
        loraplus_ratio: LoRA+ multiplier of the B learning rate (> 0; 1: plain).
        gate_max_grad_norm: Gradient-norm clip of the routers (> 0); null: no clipping.
        batch_size: Examples per micro-batch and process (int >= 1): the global batch of a step is
            ``batch_size`` × processes × ``grad_accum``.
        grad_accum: Micro-batches accumulated per optimizer step (int >= 1).
        max_steps: Number of optimizer steps (int >= 1; ``riemix eval`` scores a model without training).
        warmup_steps: Steps of linear learning-rate warm-up from 0 (int >= 0).
        schedule: Learning rate after the warm-up: ``linear`` (decay to 0 at ``max_steps``) or ``constant``.
        eval_every: Evaluate every this many steps (int >= 0; 0: only before and after training).
        eval_batch_size: Examples per evaluation batch (int >= 1).
        eval_before: Evaluate zero-shot before training (the "before" column of the summary).
        early_stopping_metric: Evaluation metric watched for early stopping (e.g. ``accuracy``; ``loss`` is
            minimised).
        early_stopping_patience: Stop after this many evaluations without improvement (int >= 0; 0: never).
        load_balance_coef: Weight of the Switch load-balancing loss (>= 0; 0: off).
        z_loss_coef: Weight of the router z-loss (>= 0; 0: off).
        uniform_prior_coef: Weight of the KL(mean routing || uniform) loss (>= 0; 0: off).
        diversity_coef: Weight of the expert-diversity loss (>= 0; 0: off).
        orthogonality_coef: Weight of the orthogonality loss of the stacked A rows (>= 0; 0: off).
        regularizer_mode: ``loss`` (regularisers are added to the task loss) or ``inject`` (their gradients are
            added to the routers' / factors' ``.grad`` directly).
        diagnostics_every: Write routing / expert diagnostics every this many steps (int >= 0; 0: never).
        seed: Random seed of data order, dropout and adapter initialisation (int >= 0).
        output_dir: Run directory (config.yaml, metrics.jsonl, adapter/, checkpoints/, summary.json); one that
            already holds a run needs ``resume`` or ``overwrite``.
        save_every: Save a resumable checkpoint every this many steps (int >= 0; 0: only at the end).
        keep_last: Checkpoints kept on disk (int >= 1).
        resume: ``true`` / ``latest``: continue the run in ``output_dir`` from its newest intact checkpoint; a
            path: from that checkpoint of the run; ``false``: start a new run. The saved config is restored;
            only run-length, evaluation, checkpoint and logging fields may change.
        overwrite: Delete the run already in ``output_dir`` and start a new one.
        divergence_loss_ratio: Stop (exit 3) when the smoothed training loss rises above this many times its
            best value and by more than 1 nat (> 1; null: only non-finite loss, gradients or weights stop).
        fsdp: Shard the frozen base model across the processes with FSDP2 (``torchrun``, several processes);
            the adapters stay whole on every process (``riemix.training.sharding``).
        bf16: Train and evaluate under bfloat16 autocast.
        gradient_checkpointing: Recompute activations in the backward pass (less memory, more time).
        cpu: Train on the CPU even where an accelerator is available.
        log_every: Append the training loss to metrics.jsonl every this many steps (int >= 1).
        tensorboard: Also write TensorBoard event files to ``output_dir/tensorboard``.
        progress: Show a progress bar.
        verbose: Print evaluations and the before/after table.
    """

    # model and data
    model: str = "smollm2-135m"
    model_kind: str = "causal_lm"
    quantization: str | None = None
    base_dtype: str | None = None
    dataset: str | list[str] = "glue/sst2"
    eval_dataset: str | list[str] | None = None
    data_dir: str | None = None
    train_split: str = "train"
    eval_split: str = "dev"
    train_subset: int | None = None
    eval_subset: int | None = None
    # presentation to the model
    format: str = "cloze"
    template: str | None = None
    label_words: list[str] = field(default_factory=list)
    max_length: int = 256
    packing: bool = False
    # adapter and optimizer
    adapter: MoELoRAConfig = field(default_factory=MoELoRAConfig)
    optimizer: str = "radamw"
    lr: float = 1e-3
    gate_lr: float | None = None
    reg: float = 1e-6
    weight_decay: float = 0.0
    loraplus_ratio: float = 1.0
    gate_max_grad_norm: float | None = 1.0
    # steps and schedule
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 120
    warmup_steps: int = 0
    schedule: str = "linear"
    # evaluation and early stopping
    eval_every: int = 0
    eval_batch_size: int = 32
    eval_before: bool = True
    early_stopping_metric: str = "accuracy"
    early_stopping_patience: int = 0
    # regularisers and diagnostics
    load_balance_coef: float = 0.0
    z_loss_coef: float = 0.0
    uniform_prior_coef: float = 0.0
    diversity_coef: float = 0.0
    orthogonality_coef: float = 0.0
    regularizer_mode: str = "loss"
    diagnostics_every: int = 0
    # run directory, checkpoints and runtime
    seed: int = 0
    output_dir: str = "runs/default"
    save_every: int = 0
    keep_last: int = 2
    resume: bool | str = False
    overwrite: bool = False
    divergence_loss_ratio: float | None = 3.0
    fsdp: bool = False
    bf16: bool = False
    gradient_checkpointing: bool = False
    cpu: bool = False
    log_every: int = 10
    tensorboard: bool = False
    progress: bool = True
    verbose: bool = True

    def __post_init__(self) -> None:
        def bad(name: str, value: Any, want: str) -> None:
            raise ValueError(f"{name} must be {want}, got {value!r}")

        check_field_types(self)

        for name, allowed in (
            ("model_kind", MODEL_KINDS),
            ("format", FORMATS),
            ("regularizer_mode", REGULARIZER_MODES),
            ("schedule", SCHEDULES),
        ):
            if getattr(self, name) not in allowed:
                bad(name, getattr(self, name), one_of(allowed))
        for name, allowed in (("quantization", QUANTIZATIONS), ("base_dtype", BASE_DTYPES)):
            if getattr(self, name) is not None and getattr(self, name) not in allowed:
                bad(name, getattr(self, name), f"{', '.join(map(repr, allowed))} or null")
        check_ranges(
            self,
            positive_ints=_POSITIVE_INTS,
            non_negative_ints=_NON_NEGATIVE_INTS,
            positive_ints_or_none=("train_subset", "eval_subset"),
            non_negative_numbers=_NON_NEGATIVE_NUMBERS,
            non_negative_numbers_or_none=("gate_lr",),
        )
        inf = float("inf")
        if not 0 < self.loraplus_ratio < inf:
            bad("loraplus_ratio", self.loraplus_ratio, "> 0 and finite")
        if self.gate_max_grad_norm is not None and not self.gate_max_grad_norm > 0:
            bad("gate_max_grad_norm", self.gate_max_grad_norm, "> 0 or null")
        if self.divergence_loss_ratio is not None and not 1 < self.divergence_loss_ratio < float("inf"):
            bad("divergence_loss_ratio", self.divergence_loss_ratio, "a finite number > 1 or null")
        if self.fsdp and self.quantization is not None:
            raise ValueError(
                f"fsdp and quantization={self.quantization!r} exclude each other: FSDP2 cannot shard bitsandbytes' "
                "packed weights (a quantized base is small already: use data parallel without fsdp)"
            )
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: continue the run, or replace it")
        if self.max_length < MIN_MAX_LENGTH:
            bad("max_length", self.max_length, f">= {MIN_MAX_LENGTH}")
        if self.optimizer.lower() not in OPTIMIZER_NAMES:
            bad("optimizer", self.optimizer, f"one of {', '.join(OPTIMIZER_NAMES)}")
        self.adapter = _adapter_config(self.adapter)

    def regularizer_coefs(self) -> dict[str, float]:
        """``{regulariser name: coefficient}`` (the ``<name>_coef`` fields), as ``riemix.core.regularizers``
        takes them."""
        return {name: getattr(self, f"{name}_coef") for name in REGULARIZERS}

    @classmethod
    def field_names(cls) -> list[str]:
        """The option names, in declaration order."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build from a mapping; unknown keys raise ``ValueError`` naming them and ``source``.

        Keys of ``adapter`` not given keep the ``MoELoRAConfig`` defaults.
        """
        unknown = sorted(set(data) - set(cls.field_names()))
        if unknown:
            hints = [_suggest(key, cls.field_names()) for key in unknown]
            hint = "; ".join(h for h in hints if h)
            raise ValueError(
                f"{source}: unknown option(s) {unknown}"
                + (f" ({hint})" if hint else "")
                + f"; valid: {cls.field_names()}"
            )
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
        """Load a YAML file, then apply ``overrides`` (e.g. CLI flags).

        Raises:
            ValueError: a missing/unparsable file or a bad option, naming the file.
        """
        path = Path(path)
        data = read_yaml_options(path, cls)
        merged = {**data, **(overrides or {})}
        if "adapter" in data and overrides and "adapter" in overrides:
            merged["adapter"] = {**data["adapter"], **overrides["adapter"]}
        try:
            return cls.from_dict(merged, source=str(path))
        except ValueError as exc:
            if str(exc).startswith(str(path)):
                raise
            raise ValueError(f"{path}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML/JSON-serialisable dict; ``adapter`` is the nested ``MoELoRAConfig.to_dict()``."""
        data = dataclasses.asdict(self)
        data["adapter"] = self.adapter.to_dict()
        return data

    def to_yaml(self) -> str:
        """``to_dict()`` as YAML, keys in declaration order (the run directory's ``config.yaml``)."""
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def read_yaml_options(path: str | Path, cls: type) -> dict[str, Any]:
    """The options of a YAML config file for the dataclass ``cls`` (with an ``adapter`` mapping), numbers that
    PyYAML reads as strings (``1e-3``) converted where the field wants a number.

    Raises:
        ValueError: a missing or unparsable file, or one that is not a mapping, naming the file.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of options, got {type(data).__name__}")
    data = _yaml_numbers(data, cls)
    if isinstance(data.get("adapter"), Mapping):
        data["adapter"] = _yaml_numbers(data["adapter"], MoELoRAConfig)
    return data


def _suggest(key: str, names: list[str]) -> str:
    """A hint for an unknown option: the adapter field it names (``adapter: {alpha: ..}``) or a close name."""
    if key in {f.name for f in dataclasses.fields(MoELoRAConfig)}:
        return f"{key} is an adapter option: write it under adapter:, or as the flag --{key.replace('_', '-')}"
    close = difflib.get_close_matches(key, names, n=1)
    return f"did you mean {close[0]!r} for {key!r}?" if close else ""


_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _yaml_numbers(data: Mapping[str, Any], cls: type) -> dict[str, Any]:
    """``data`` with numeric strings in ``float`` fields of ``cls`` read as numbers.

    PyYAML (YAML 1.1) reads ``lr: 1e-3`` as the string ``"1e-3"`` (a float needs a dot there); such a
    string in a field typed ``float`` (or ``float | None``) becomes the number.  Nothing else is converted:
    ``bf16: "false"`` stays a string and the config rejects it, naming the field.
    """
    hints = typing.get_type_hints(cls)
    out = dict(data)
    for key, value in data.items():
        numeric = key in hints and float in allowed_types(hints[key])
        if numeric and isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            out[key] = float(value)
    return out


def _adapter_config(adapter: Any) -> MoELoRAConfig:
    """``adapter`` as a ``MoELoRAConfig``: a mapping is merged over the defaults; errors name ``adapter``."""
    if isinstance(adapter, MoELoRAConfig):
        return adapter
    if not isinstance(adapter, Mapping):
        raise ValueError(f"adapter must be a MoELoRAConfig or a mapping of its fields, got {adapter!r}")
    try:
        return MoELoRAConfig(**adapter)
    except TypeError as exc:
        raise ValueError(f"adapter: {exc}") from exc
    except ValueError as exc:
        raise ValueError(f"adapter.{exc}") from exc
