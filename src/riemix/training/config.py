"""``TrainConfig``: every option of a training run, validated, with YAML round trip.

Options come from a YAML file and/or CLI flags (flags override); the resolved config is saved in the
run directory as ``config.yaml``.  The defaults are the default job: SmolLM2-135M-Instruct learning
SST-2 with label words, MoE-LoRA and gate-rescaled Riemannian AdamW on a 2-core CPU in minutes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from riemix.core.config import MoELoRAConfig

__all__ = ["TrainConfig", "DEFAULT_ADAPTER"]

DEFAULT_ADAPTER: dict[str, Any] = {
    "num_experts": 8,
    "top_k": 2,
    "rank": 4,
    "alpha": 16.0,
    "dropout": 0.0,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "routing": "softmax_topk",
    "gate_grad_power": 0.5,
}


@dataclass
class TrainConfig:
    """A training run. Every field is a CLI flag (``--lr 1e-4``) and a YAML key (``lr: 1e-4``)."""

    model: str = "smollm2-135m"
    model_kind: str = "causal_lm"
    dataset: str | list[str] = "glue/sst2"
    eval_dataset: str | list[str] | None = None
    data_dir: str | None = None
    train_split: str = "train"
    eval_split: str = "dev"
    train_subset: int | None = None
    eval_subset: int | None = None
    format: str = "cloze"
    template: str | None = None
    label_words: list[str] = field(default_factory=list)
    max_length: int = 256
    packing: bool = False
    adapter: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_ADAPTER))
    optimizer: str = "radamw"
    lr: float = 1e-3
    gate_lr: float | None = None
    reg: float = 1e-6
    weight_decay: float = 0.0
    loraplus_ratio: float = 1.0
    gate_max_grad_norm: float | None = 1.0
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 120
    warmup_steps: int = 0
    schedule: str = "linear"
    eval_every: int = 0
    eval_batch_size: int = 32
    eval_before: bool = True
    early_stopping_metric: str = "accuracy"
    early_stopping_patience: int = 0
    load_balance_coef: float = 0.0
    z_loss_coef: float = 0.0
    uniform_prior_coef: float = 0.0
    diversity_coef: float = 0.0
    orthogonality_coef: float = 0.0
    regularizer_mode: str = "loss"
    diagnostics_every: int = 0
    seed: int = 0
    output_dir: str = "runs/default"
    save_every: int = 0
    keep_last: int = 2
    resume: bool | str = False
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

        if self.model_kind not in ("causal_lm", "sequence_classification"):
            bad("model_kind", self.model_kind, "'causal_lm' or 'sequence_classification'")
        if self.format not in ("cloze", "letter"):
            bad("format", self.format, "'cloze' or 'letter'")
        if self.regularizer_mode not in ("loss", "inject"):
            bad("regularizer_mode", self.regularizer_mode, "'loss' or 'inject'")
        if self.schedule not in ("linear", "constant"):
            bad("schedule", self.schedule, "'linear' or 'constant'")
        for name in ("batch_size", "grad_accum", "eval_batch_size", "keep_last", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, getattr(self, name), "an int >= 1")
        for name in (
            "max_steps",
            "warmup_steps",
            "eval_every",
            "save_every",
            "early_stopping_patience",
            "seed",
            "diagnostics_every",
        ):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                bad(name, getattr(self, name), "an int >= 0")
        for name in ("train_subset", "eval_subset"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                bad(name, value, "an int >= 1 or null")
        for name in (
            "lr",
            "reg",
            "weight_decay",
            "load_balance_coef",
            "z_loss_coef",
            "uniform_prior_coef",
            "diversity_coef",
            "orthogonality_coef",
        ):
            if not getattr(self, name) >= 0:
                bad(name, getattr(self, name), ">= 0")
        if self.gate_lr is not None and not self.gate_lr >= 0:
            bad("gate_lr", self.gate_lr, ">= 0 or null")
        if not self.loraplus_ratio > 0:
            bad("loraplus_ratio", self.loraplus_ratio, "> 0")
        if self.gate_max_grad_norm is not None and not self.gate_max_grad_norm > 0:
            bad("gate_max_grad_norm", self.gate_max_grad_norm, "> 0 or null")
        if self.max_length < 8:
            bad("max_length", self.max_length, ">= 8")
        if self.optimizer.lower() not in ("sgd", "adamw", "rsgd", "radamw"):
            bad("optimizer", self.optimizer, "one of sgd, adamw, rsgd, radamw")
        if not isinstance(self.adapter, dict):
            bad("adapter", self.adapter, "a mapping of MoELoRAConfig fields")
        try:
            MoELoRAConfig(**self.adapter)
        except TypeError as exc:
            raise ValueError(f"adapter: {exc}") from exc
        except ValueError as exc:
            raise ValueError(f"adapter.{exc}") from exc

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build from a mapping; unknown keys raise ``ValueError`` naming them and ``source``.

        Keys of ``adapter`` not given keep the default adapter values.
        """
        unknown = sorted(set(data) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"{source}: unknown option(s) {unknown}; valid: {cls.field_names()}")
        data = dict(data)
        if isinstance(data.get("adapter"), dict):
            data["adapter"] = {**DEFAULT_ADAPTER, **data["adapter"]}
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
        """Load a YAML file, then apply ``overrides`` (e.g. CLI flags).

        Raises:
            ValueError: a missing/unparsable file or a bad option, naming the file.
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
        merged = {**data, **(overrides or {})}
        if "adapter" in data and overrides and "adapter" in overrides:
            merged["adapter"] = {**data["adapter"], **overrides["adapter"]}
        return cls.from_dict(merged, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)
