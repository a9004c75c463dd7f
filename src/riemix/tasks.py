"""How a dataset is presented to a model: prompts, tokenisation, batching, losses and scores.

Causal LMs see every task as text continuation:

- ``mcq`` with ``format="letter"``: ``"Question: …\\nA. …\\nB. …\\nAnswer:"`` → ``" A"``; the score is the
  answer-position logit of each valid letter (the LM head is evaluated on those rows only).
- ``mcq`` with ``format="cloze"``: each choice's text after ``"Question: …\\nAnswer:"`` is scored by its
  length-normalised log-likelihood; training uses the correct choice's text as the target.
- ``classification`` (label words): ``template`` (default ``"{text}\\nAnswer:"``) → ``" " + label word``,
  scored on the first token of each label word.
- ``sft``: prompt → completion, loss on the completion tokens only.

The loss covers the answer tokens only, and the LM head is applied only at the positions the loss or the
score needs (never the full vocabulary at every position).  Encoders (``sequence_classification``) use
the model's classification head with cross-entropy (or MSE for regression).
"""

from __future__ import annotations

import string
import warnings
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from .data import ClassificationExample, Dataset, MCQExample, SFTExample

__all__ = [
    "FORMATS",
    "MIN_MAX_LENGTH",
    "MODEL_KINDS",
    "TEMPLATE_FIELDS",
    "TaskSpec",
    "TaskModel",
    "LMItem",
    "encode_train",
    "pack_items",
    "collate_lm",
    "collate_encoder",
    "eval_batches",
    "one_of",
    "check_label_words",
    "check_template",
    "max_positions",
    "fit_max_length",
]

#: Model kinds riemix trains and evaluates: a causal LM (``AutoModelForCausalLM``) or an encoder with a
#: classification head (``AutoModelForSequenceClassification``).
MODEL_KINDS: tuple[str, ...] = ("causal_lm", "sequence_classification")
#: Multiple-choice formulations for causal LMs (see the module docstring).
FORMATS: tuple[str, ...] = ("cloze", "letter")
#: The smallest token budget per sequence (``max_length``) a task accepts.
MIN_MAX_LENGTH = 8
#: The placeholders a prompt ``template`` may use.
TEMPLATE_FIELDS: tuple[str, ...] = ("text", "text_pair")


def one_of(values: tuple[str, ...]) -> str:
    """``"'a' or 'b'"`` / ``"'a', 'b' or 'c'"``: allowed values as error messages name them."""
    quoted = [repr(v) for v in values]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def check_template(template: str) -> None:
    """Refuse a prompt template ``str.format`` cannot fill from ``TEMPLATE_FIELDS``.

    Only the plain placeholders ``{text}`` and ``{text_pair}`` are allowed (no positional field,
    conversion or format spec); literal braces are written ``{{`` and ``}}``.

    Raises:
        ValueError: naming the template, the bad placeholder (or the brace error) and the allowed ones.
    """
    allowed = ", ".join("{" + name + "}" for name in TEMPLATE_FIELDS)
    hint = f"allowed placeholders: {allowed} (write a literal brace as '{{{{' or '}}}}')"
    if not isinstance(template, str):
        raise ValueError(f"template must be a string, got {type(template).__name__}")
    try:
        fields = [(name, conv, spec) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise ValueError(f"template {template!r} is malformed: {exc}; {hint}") from exc
    for name, conv, spec in fields:
        shown = "{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
        if name not in TEMPLATE_FIELDS:
            raise ValueError(f"template {template!r} has an unknown placeholder {shown}; {hint}")
        if conv or spec:
            raise ValueError(
                f"template {template!r} has an unsupported placeholder {shown} (no conversion or format spec); {hint}"
            )


DEFAULT_TEMPLATES = {
    "glue/sst2": "Review: {text}\nSentiment:",
    "boolq": "{text_pair}\nQuestion: {text}?\nAnswer:",
}
DEFAULT_LABEL_WORDS = {"glue/sst2": ["negative", "positive"], "boolq": ["no", "yes"]}


@dataclass
class TaskSpec:
    """Presentation of one dataset to one model.

    Attributes:
        model_kind: ``"causal_lm"`` or ``"sequence_classification"``.
        task: the dataset's task (``mcq``, ``classification``, ``regression``, ``sft``).
        format: MCQ formulation for causal LMs: ``"cloze"`` or ``"letter"``.
        template: prompt template for label-word classification (``{text}``, ``{text_pair}``).
        label_words: one word per class for label-word classification.
        max_length: token budget per sequence (prompts are truncated from the left).
    """

    model_kind: str
    task: str
    format: str = "cloze"
    template: str = "{text}\nAnswer:"
    label_words: list[str] = field(default_factory=list)
    max_length: int = 256

    def __post_init__(self) -> None:
        if self.model_kind not in MODEL_KINDS:
            raise ValueError(f"model_kind must be {one_of(MODEL_KINDS)}, got {self.model_kind!r}")
        if self.format not in FORMATS:
            raise ValueError(f"format must be {one_of(FORMATS)}, got {self.format!r}")
        if self.max_length < MIN_MAX_LENGTH:
            raise ValueError(f"max_length must be >= {MIN_MAX_LENGTH}, got {self.max_length}")
        check_template(self.template)
        if self.model_kind == "causal_lm" and self.task == "regression":
            raise ValueError(
                "regression tasks need an encoder (task sequence_classification), not a causal LM"
            )
        if self.model_kind == "sequence_classification" and self.task in ("mcq", "sft"):
            raise ValueError(f"task {self.task!r} needs a causal LM, not a sequence-classification model")

    @classmethod
    def for_dataset(cls, dataset: Dataset, model_kind: str, **overrides) -> TaskSpec:
        """Defaults for a dataset (template and label words of the built-in sets), then ``overrides``.

        Raises:
            ValueError: when label words are needed but neither known nor given.
        """
        kw: dict = {"model_kind": model_kind, "task": dataset.task}
        if dataset.name in DEFAULT_TEMPLATES:
            kw["template"] = DEFAULT_TEMPLATES[dataset.name]
        words = DEFAULT_LABEL_WORDS.get(dataset.name) or list(dataset.label_names or [])
        kw["label_words"] = words
        kw.update({k: v for k, v in overrides.items() if v is not None})
        spec = cls(**kw)
        if model_kind == "causal_lm" and dataset.task == "classification":
            n = dataset.num_labels or 0
            if len(spec.label_words) != n:
                raise ValueError(
                    f"label_words has {len(spec.label_words)} entries for {n} classes of {dataset.name}"
                )
        return spec


@dataclass
class LMItem:
    """One causal-LM sequence: ``prompt`` ids then ``target`` ids (the loss covers the target only)."""

    prompt: list[int]
    target: list[int]


def _mcq_prompt(ex: MCQExample, with_choices: bool) -> str:
    parts = [f"Context: {ex.context}"] if ex.context else []
    parts.append(f"Question: {ex.question}")
    if with_choices:
        parts += [f"{lab}. {c}" for lab, c in zip(ex.labels, ex.choices, strict=True)]
    return "\n".join(parts) + "\nAnswer:"


def _cls_prompt(ex: ClassificationExample, template: str) -> str:
    return template.format(text=ex.text.strip(), text_pair=(ex.text_pair or "").strip())


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def check_label_words(spec: TaskSpec, tokenizer) -> None:
    """Refuse label words the causal-LM scoring cannot tell apart (classification with label words only).

    Each class is scored by the first token of ``" " + word``: two words starting with the same token
    would always get the same score, and a word whose first token is the unknown token scores the
    unknown token, so either freezes accuracy without a word of warning.

    Raises:
        ValueError: naming the words and their first tokens.
    """
    if spec.task != "classification" or spec.model_kind != "causal_lm" or not spec.label_words:
        return
    firsts: dict[int, list[str]] = {}
    for word in spec.label_words:
        ids = _ids(tokenizer, " " + word, False)
        if not ids:
            raise ValueError(f"label word {word!r} encodes to no token")
        if tokenizer.unk_token_id is not None and ids[0] == tokenizer.unk_token_id:
            raise ValueError(
                f"label word {word!r} starts with the unknown token {tokenizer.unk_token!r}: pick words the "
                "tokenizer knows"
            )
        firsts.setdefault(ids[0], []).append(word)
    for token, words in firsts.items():
        if len(words) > 1:
            shown = tokenizer.convert_ids_to_tokens(token)
            raise ValueError(
                f"label words {words} all start with the token {shown!r} (id {token}): the model scores a "
                "class by the first token of its word, so these classes cannot be told apart; pick words "
                "whose first tokens differ"
            )


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the absolute position embeddings of a Hugging Face model cover.

    This is ``config.max_position_embeddings``, less the ``padding_idx + 1`` positions that RoBERTa-style
    embeddings skip.

    Args:
        model: a Hugging Face model.

    Returns:
        The number of usable positions, or None when the config does not say.
    """
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(limit, int) or isinstance(limit, bool):
        return None
    embeddings = getattr(getattr(model, "base_model", None), "embeddings", None)
    padding_idx = getattr(embeddings, "padding_idx", None)
    if isinstance(padding_idx, int):  # RoBERTa: positions start at padding_idx + 1
        limit -= padding_idx + 1
    return limit


def fit_max_length(spec: TaskSpec, model: nn.Module) -> TaskSpec:
    """``spec`` with an encoder's ``max_length`` lowered to the positions its model has.

    A longer ``max_length`` would index past the encoder's position embeddings; the effective budget is
    ``min(max_length, max_positions(model))``, with a warning naming both (Python shows it once per
    distinct message). Causal LMs and models without a known limit are left as they are.

    Args:
        spec: the task presentation.
        model: the Hugging Face model ``spec`` is used with.

    Returns:
        ``spec`` itself, or a copy with the lowered ``max_length``.
    """
    limit = max_positions(model) if spec.model_kind == "sequence_classification" else None
    if limit is None or spec.max_length <= limit:
        return spec
    warnings.warn(
        f"max_length {spec.max_length} exceeds the {limit} positions of {type(model).__name__} "
        f"(max_position_embeddings); encoder inputs are truncated to {limit} tokens",
        UserWarning,
        stacklevel=2,
    )
    return replace(spec, max_length=limit)


def _fit(prompt: list[int], target: list[int], max_length: int) -> LMItem:
    target = target[: max_length // 2]
    keep = max_length - len(target)
    return LMItem(prompt[-keep:], target)


def encode_train(ex, spec: TaskSpec, tokenizer) -> LMItem:
    """Tokenise one training example for a causal LM.

    Raises:
        TypeError: for an example type the spec cannot handle.
    """
    if isinstance(ex, MCQExample):
        if spec.format == "letter":
            return _fit(
                _ids(tokenizer, _mcq_prompt(ex, True), True),
                _ids(tokenizer, " " + ex.labels[ex.answer], False),
                spec.max_length,
            )
        return _fit(
            _ids(tokenizer, _mcq_prompt(ex, False), True),
            _ids(tokenizer, " " + ex.choices[ex.answer], False),
            spec.max_length,
        )
    if isinstance(ex, ClassificationExample):
        word = " " + spec.label_words[int(ex.label)]
        return _fit(
            _ids(tokenizer, _cls_prompt(ex, spec.template), True),
            _ids(tokenizer, word, False),
            spec.max_length,
        )
    if isinstance(ex, SFTExample):
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        if not ex.prompt:  # plain text: the first token is context, the rest is predicted
            ids = _ids(tokenizer, ex.completion, True) + eos
            return _fit(ids[:1], ids[1:], spec.max_length)
        completion = ex.completion if ex.completion[:1].isspace() else " " + ex.completion
        return _fit(
            _ids(tokenizer, ex.prompt, True), _ids(tokenizer, completion, False) + eos, spec.max_length
        )
    raise TypeError(f"cannot encode {type(ex).__name__} for a causal LM")


def pack_items(items: list[LMItem], max_length: int) -> list[list[LMItem]]:
    """Greedy first-fit-decreasing packing of whole sequences into rows of at most ``max_length`` tokens.

    Packed sequences share a row and attend to each other (plain causal mask; positions continue
    across the row), the usual "naive packing" trade-off for throughput. The loss still covers
    each sequence's target tokens only.
    """
    rows: list[list[LMItem]] = []
    room: list[int] = []
    for it in sorted(items, key=lambda it: -(len(it.prompt) + len(it.target))):
        size = len(it.prompt) + len(it.target)
        for r, free in enumerate(room):
            if size <= free:
                rows[r].append(it)
                room[r] -= size
                break
        else:
            rows.append([it])
            room.append(max_length - size)
    return rows


def collate_lm(items: list[LMItem | list[LMItem]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad LM rows; ``loss_index`` holds flat (batch·T) positions predicting ``loss_target``.

    Each row is one ``LMItem`` or a packed list of them (see ``pack_items``).
    """
    rows = [it if isinstance(it, list) else [it] for it in items]
    length = max(sum(len(it.prompt) + len(it.target) for it in row) for row in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), length), dtype=torch.long)  # (B, T)
    index, target, owner = [], [], []
    for b, row in enumerate(rows):
        offset = 0
        for it in row:
            seq = it.prompt + it.target
            ids[b, offset : offset + len(seq)] = torch.tensor(seq)
            mask[b, offset : offset + len(seq)] = 1
            start = offset + len(it.prompt)
            for j, tok in enumerate(it.target):
                index.append(b * length + start + j - 1)  # position predicting target token j
                target.append(tok)
                owner.append(b)
            offset += len(seq)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "loss_index": torch.tensor(index, dtype=torch.long),  # (P,)
        "loss_target": torch.tensor(target, dtype=torch.long),  # (P,)
        "loss_owner": torch.tensor(owner, dtype=torch.long),  # (P,) which row each target belongs to
    }


def collate_encoder(
    examples: list[ClassificationExample], tokenizer, max_length: int, regression: bool
) -> dict:
    """Tokenise (pair) classification examples for an encoder with a classification head."""
    texts = [ex.text for ex in examples]
    pairs = [ex.text_pair for ex in examples] if examples[0].text_pair is not None else None
    batch = dict(
        tokenizer(texts, pairs, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    )
    dtype = torch.float32 if regression else torch.long
    batch["labels"] = torch.tensor([ex.label for ex in examples], dtype=dtype)
    return batch


def _by_length(lengths: list[int]) -> list[int]:
    """Example indices sorted by length (stable): batches of similar length waste little padding."""
    return sorted(range(len(lengths)), key=lambda i: lengths[i])


def eval_batches(dataset: Dataset, spec: TaskSpec, tokenizer, batch_size: int):
    """Yield ``(kind, batch, indices)`` scoring batches covering every example of ``dataset`` once.

    Examples are grouped by length to cut padding; ``indices`` are the dataset positions of the batch's
    examples, in batch order. ``kind`` is ``"choice"`` (one answer position, candidate token ids in
    ``batch["candidates"]``), ``"cloze"`` (one row per (example, choice), ``batch["num_choices"]``),
    ``"encoder"`` or ``"sft"``.
    """
    exs = dataset.examples
    if spec.model_kind == "sequence_classification":
        order = _by_length([len(ex.text) + len(ex.text_pair or "") for ex in exs])
        for i in range(0, len(exs), batch_size):
            idx = order[i : i + batch_size]
            chunk = [exs[j] for j in idx]
            yield "encoder", collate_encoder(chunk, tokenizer, spec.max_length, dataset.task == "regression"), idx
        return
    if dataset.task == "sft":
        items = [encode_train(e, spec, tokenizer) for e in exs]
        order = _by_length([len(it.prompt) + len(it.target) for it in items])
        for i in range(0, len(exs), batch_size):
            idx = order[i : i + batch_size]
            yield "sft", collate_lm([items[j] for j in idx], tokenizer.pad_token_id), idx
        return
    if dataset.task == "mcq" and spec.format == "cloze":  # batch whole examples, one row per choice
        rows = []
        for ex in exs:
            prompt = _ids(tokenizer, _mcq_prompt(ex, False), True)
            rows.append([_fit(prompt, _ids(tokenizer, " " + c, False), spec.max_length) for c in ex.choices])
        order = _by_length([max(len(it.prompt) + len(it.target) for it in row) for row in rows])
        per = max(1, batch_size // max(len(exs[0].choices), 1))
        for i in range(0, len(exs), per):
            idx = order[i : i + per]
            batch = collate_lm([it for j in idx for it in rows[j]], tokenizer.pad_token_id)
            batch["num_choices"] = torch.tensor([len(rows[j]) for j in idx])
            yield "cloze", batch, idx
        return
    items, cands = [], []
    for ex in exs:
        if isinstance(ex, MCQExample):
            prompt, words = _mcq_prompt(ex, True), [" " + lab for lab in ex.labels]
        else:
            prompt, words = _cls_prompt(ex, spec.template), [" " + w for w in spec.label_words]
        first = [_ids(tokenizer, w, False)[0] for w in words]
        items.append(_fit(_ids(tokenizer, prompt, True), first[:1], spec.max_length))
        cands.append(first)
    order = _by_length([len(it.prompt) for it in items])
    for i in range(0, len(exs), batch_size):
        idx = order[i : i + batch_size]
        width = max(len(cands[j]) for j in idx)
        batch = collate_lm([items[j] for j in idx], tokenizer.pad_token_id)
        batch["candidates"] = torch.tensor([cands[j] + [cands[j][0]] * (width - len(cands[j])) for j in idx])  # (B, C)
        batch["candidate_valid"] = torch.tensor([[k < len(cands[j]) for k in range(width)] for j in idx])
        yield "choice", batch, idx


class TaskModel(nn.Module):
    """Wraps a Hugging Face model so ``forward(batch)`` returns the training loss or eval scores.

    Keeping this in one module lets ``accelerate`` wrap it (DDP) while the LM head is applied only at
    the positions that matter.
    """

    def __init__(self, model: nn.Module, model_kind: str) -> None:
        super().__init__()
        self.model = model
        self.model_kind = model_kind
        self.max_positions = max_positions(model) if model_kind == "sequence_classification" else None

    def _hidden(self, batch: dict) -> torch.Tensor:
        out = self.model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.last_hidden_state  # (B, T, H)

    def _head(self, hidden: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        head = self.model.get_output_embeddings()
        if rows is None:
            return head(hidden)
        weight = head.weight[rows]  # (..., C, H)
        logits = torch.einsum("bh,bch->bc", hidden.to(weight.dtype), weight)
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias[rows]
        return logits

    @staticmethod
    def num_targets(batch: dict) -> int:
        """The loss terms of a batch: its target tokens (causal LM) or examples (encoder)."""
        return int(batch["labels"].numel() if "labels" in batch else batch["loss_target"].numel())

    def forward(self, batch: dict, mode: str = "loss") -> torch.Tensor:
        """``mode="loss"``: mean loss; ``"loss_sum"``: summed loss (over ``num_targets(batch)`` terms);
        ``"token_logprobs"``: (P,) target log-probs; ``"choice"``: (B, C).

        Raises:
            ValueError: an encoder batch longer than the model's position embeddings (``max_positions``).
        """
        if self.model_kind == "sequence_classification":
            length = batch["input_ids"].shape[-1]
            if self.max_positions is not None and length > self.max_positions:
                raise ValueError(
                    f"a batch of {length} tokens is longer than the {self.max_positions} positions of "
                    f"{type(self.model).__name__} (max_position_embeddings): set max_length to "
                    f"{self.max_positions} or less"
                )
            out = self.model(**{k: v for k, v in batch.items() if k != "labels"})
            logits = out.logits  # (B, C)
            if mode not in ("loss", "loss_sum"):
                return logits
            reduction = "sum" if mode == "loss_sum" else "mean"
            if logits.shape[-1] == 1:
                return F.mse_loss(logits.squeeze(-1).float(), batch["labels"].float(), reduction=reduction)
            return F.cross_entropy(logits.float(), batch["labels"], reduction=reduction)
        hidden = self._hidden(batch)  # (B, T, H)
        flat = hidden.reshape(-1, hidden.shape[-1])  # (B·T, H)
        if mode == "choice":
            last = flat[batch["loss_index"]]  # (B, H): one answer position per row
            logits = self._head(last, batch["candidates"]).float()  # (B, C)
            return logits.masked_fill(~batch["candidate_valid"], float("-inf"))
        logits = self._head(flat[batch["loss_index"]]).float()  # (P, V) only at target positions
        if mode == "token_logprobs":
            return -F.cross_entropy(logits, batch["loss_target"], reduction="none")  # (P,)
        return F.cross_entropy(logits, batch["loss_target"], reduction="sum" if mode == "loss_sum" else "mean")
