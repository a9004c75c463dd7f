"""The training tool on tiny random models: learning, resume equivalence, CLI and config errors."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from tiny import make_tiny_bert, make_tiny_llama

from riemix import iter_moe_lora_layers
from riemix.cli import main
from riemix.core.schedules import linear_schedule
from riemix.io.adapter import load_adapter
from riemix.training.recipe import TrainConfig, train

GOOD = ["apple", "pear", "plum", "fig"]
BAD = ["rock", "sand", "iron", "salt", "clay", "dust"]
FILLER = ["what", "is", "tasty", "the", "best", "pick", "today", "here"]


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = (
        [
            "<pad>",
            "<eos>",
            "<unk>",
            "Question:",
            "Answer:",
            "Review:",
            "Sentiment:",
            "good",
            "bad",
            "A",
            "B",
            "C",
            ".",
            ":",
            "?",
        ]
        + GOOD
        + BAD
        + FILLER
    )
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")


def write_mcq(path, n, seed):
    """Synthetic but learnable: the correct choice is always a fruit, the others are minerals."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            choices = rng.sample(BAD, 2) + [rng.choice(GOOD)]
            rng.shuffle(choices)
            answer = next(i for i, c in enumerate(choices) if c in GOOD)
            fh.write(json.dumps({"question": " ".join(rng.sample(FILLER, 3)), "choices": choices, "answer": answer}))
            fh.write("\n")
    return str(path)


@pytest.fixture
def mcq_files(tmp_path):
    return write_mcq(tmp_path / "train.jsonl", 96, 0), write_mcq(tmp_path / "dev.jsonl", 48, 1)


def base_cfg(tmp_path, mcq_files, **kw) -> TrainConfig:
    opts = dict(
        model="tiny",
        dataset=mcq_files[0],
        eval_dataset=mcq_files[1],
        format="cloze",
        batch_size=8,
        max_steps=30,
        lr=3e-2,
        gate_lr=1e-2,
        output_dir=str(tmp_path / "run"),
        progress=False,
        verbose=False,
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
    opts.update(kw)
    return TrainConfig.from_dict(opts)


def test_tiny_model_learns_synthetic_mcq(tmp_path, mcq_files):
    torch.manual_seed(0)
    summary = train(base_cfg(tmp_path, mcq_files), model=make_tiny_llama(), tokenizer=tiny_tokenizer())
    assert summary["after"]["accuracy"] >= summary["before"]["accuracy"] + 0.25
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "run" / "metrics.jsonl") if '"loss"' in line]
    assert losses[-1] < losses[0]
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} >= {
        "config.yaml",
        "metrics.jsonl",
        "adapter",
        "checkpoints",
        "summary.json",
    }
    restored = load_adapter(make_tiny_llama(), run / "adapter")
    assert len(list(iter_moe_lora_layers(restored))) == 8


def test_resume_is_bit_identical(tmp_path, mcq_files):
    cfg = base_cfg(
        tmp_path,
        mcq_files,
        max_steps=6,
        save_every=3,
        keep_last=5,
        eval_before=False,
        output_dir=str(tmp_path / "straight"),
    )
    train(cfg, model=make_tiny_llama(), tokenizer=tiny_tokenizer())
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step-000003", resumed_dir / "checkpoints" / "step-000003")
    cfg2 = base_cfg(
        tmp_path,
        mcq_files,
        max_steps=6,
        save_every=3,
        keep_last=5,
        eval_before=False,
        output_dir=str(resumed_dir),
        resume=True,
    )
    torch.manual_seed(999)  # a different ambient RNG state must not matter: the checkpoint restores it
    train(cfg2, model=make_tiny_llama(), tokenizer=tiny_tokenizer())
    a = load_adapter(make_tiny_llama(), tmp_path / "straight" / "adapter")
    b = load_adapter(make_tiny_llama(), resumed_dir / "adapter")
    for (name, la), (_, lb) in zip(iter_moe_lora_layers(a), iter_moe_lora_layers(b), strict=True):
        assert torch.equal(la.lora_A, lb.lora_A), name
        assert torch.equal(la.lora_B, lb.lora_B), name
        assert torch.equal(la.router.weight, lb.router.weight), name


def test_keep_last_checkpoints(tmp_path, mcq_files):
    cfg = base_cfg(tmp_path, mcq_files, max_steps=4, save_every=1, keep_last=2, eval_before=False)
    train(cfg, model=make_tiny_llama(), tokenizer=tiny_tokenizer())
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "step-000003",
        "step-000004",
    ]


def test_encoder_classification_trains_head_and_adapters(tmp_path):
    rng = random.Random(0)
    for split, n in (("train", 64), ("dev", 32)):
        with open(tmp_path / f"{split}.jsonl", "w") as fh:
            for _ in range(n):
                label = rng.randint(0, 1)
                word = rng.choice(GOOD if label else BAD)
                fh.write(json.dumps({"text": f"{word} {rng.choice(FILLER)}", "label": label}) + "\n")
    cfg = TrainConfig.from_dict(
        dict(
            model="tiny",
            model_kind="sequence_classification",
            dataset=str(tmp_path / "train.jsonl"),
            eval_dataset=str(tmp_path / "dev.jsonl"),
            batch_size=8,
            max_steps=50,
            lr=3e-2,
            progress=False,
            verbose=False,
            output_dir=str(tmp_path / "run"),
            adapter={"num_experts": 2, "top_k": 1, "rank": 2, "target_modules": ["query", "value"]},
        )
    )
    model = make_tiny_bert()
    head_before = model.classifier.weight.detach().clone()
    summary = train(cfg, model=model, tokenizer=tiny_tokenizer())
    assert not torch.equal(model.classifier.weight, head_before)
    assert summary["after"]["accuracy"] > 0.8


def test_aux_losses_are_logged(tmp_path, mcq_files):
    cfg = base_cfg(
        tmp_path,
        mcq_files,
        max_steps=2,
        log_every=1,
        load_balance_coef=0.01,
        z_loss_coef=0.001,
        eval_before=False,
    )
    train(cfg, model=make_tiny_llama(), tokenizer=tiny_tokenizer())
    logged = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl") if '"loss"' in line]
    assert logged[0]["load_balance"] > 0 and logged[0]["z_loss"] > 0


def test_linear_schedule():
    f = linear_schedule(2, 10)
    assert [f(s) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    assert linear_schedule(0, 10, "constant")(9) == 1.0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"lr": -1.0}, r"lr must be >= 0, got -1.0"),
        ({"batch_size": 0}, r"batch_size must be an int >= 1, got 0"),
        ({"max_steps": -5}, r"max_steps must be an int >= 0, got -5"),
        ({"format": "mc"}, r"format must be 'cloze' or 'letter', got 'mc'"),
        ({"schedule": "cosine"}, r"schedule must be 'linear' or 'constant', got 'cosine'"),
        ({"optimizer": "lion"}, r"optimizer must be one of adamw, radamw, rsgd, sgd, got 'lion'"),
        ({"model_kind": "seq2seq"}, r"model_kind must be"),
        ({"train_subset": 0}, r"train_subset must be an int >= 1 or null, got 0"),
        ({"gate_lr": -1.0}, r"gate_lr must be >= 0 or null, got -1.0"),
        ({"loraplus_ratio": 0.0}, r"loraplus_ratio must be > 0, got 0.0"),
        ({"gate_max_grad_norm": 0.0}, r"gate_max_grad_norm must be > 0 or null, got 0.0"),
        ({"max_length": 4}, r"max_length must be >= 8, got 4"),
        ({"adapter": {"top_k": 99}}, r"adapter.top_k must be in 1..num_experts"),
        ({"adapter": {"experts": 3}}, r"adapter: .*unexpected keyword argument 'experts'"),
        ({"bogus": 1}, r"config: unknown option\(s\) \['bogus'\]"),
    ],
)
def test_train_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict(kwargs)


def test_train_config_adapter_is_a_typed_config_with_dict_round_trip(tmp_path):
    from riemix import MoELoRAConfig

    assert TrainConfig().adapter == MoELoRAConfig()  # the default job's adapter is MoELoRAConfig's defaults
    # the old config.yaml form: a partial adapter mapping, merged over the defaults
    old = tmp_path / "old.yaml"
    old.write_text("max_steps: 3\nadapter:\n  num_experts: 4\n  rank: 2\n  routing: dense\n")
    cfg = TrainConfig.from_yaml(old, {"adapter": {"rank": 8}})
    assert isinstance(cfg.adapter, MoELoRAConfig)
    assert (cfg.adapter.num_experts, cfg.adapter.rank, cfg.adapter.routing, cfg.adapter.top_k) == (4, 8, "dense", 2)
    data = cfg.to_dict()
    assert type(data["adapter"]) is dict and data["adapter"] == MoELoRAConfig(**data["adapter"]).to_dict()
    assert data["adapter"]["rank"] == 8 and data["adapter"]["init"] == "zero_b"
    saved = tmp_path / "config.yaml"
    saved.write_text(cfg.to_yaml())
    assert TrainConfig.from_yaml(saved) == cfg
    assert TrainConfig(adapter=cfg.adapter).adapter is cfg.adapter
    with pytest.raises(ValueError, match=r"adapter must be a MoELoRAConfig or a mapping of its fields, got 3"):
        TrainConfig(adapter=3)


def test_train_config_documents_every_field():
    import dataclasses

    doc = TrainConfig.__doc__
    for f in dataclasses.fields(TrainConfig):
        assert f"\n        {f.name}: " in doc, f.name


# ---------------------------------------------------------------- CLI
def save_tiny_model_dir(tmp_path):
    model_dir = tmp_path / "tiny-model"
    make_tiny_llama().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    return str(model_dir)


def test_cli_end_to_end_train_then_eval(tmp_path, mcq_files, capsys):
    model_dir = save_tiny_model_dir(tmp_path)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(
        f"model: {model_dir}\ndataset: {mcq_files[0]}\neval_dataset: {mcq_files[1]}\n"
        "max_steps: 3\nbatch_size: 4\nlr: 0.01\nadapter:\n  num_experts: 2\n  top_k: 1\n"
    )
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--config",
                str(cfg_file),
                "--output-dir",
                str(out),
                "--no-progress",
                "--rank",
                "2",
                "--max-steps",
                "2",
            ]
        )
        == 0
    )
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["max_steps"] == 2 and saved["adapter"]["rank"] == 2 and saved["adapter"]["num_experts"] == 2
    assert (
        main(
            [
                "eval",
                "--model",
                model_dir,
                "--adapter",
                str(out / "adapter"),
                "--dataset",
                mcq_files[1],
                "--output",
                str(tmp_path / "m.json"),
            ]
        )
        == 0
    )
    assert "accuracy" in json.loads((tmp_path / "m.json").read_text())


def test_cli_resume_without_checkpoint(tmp_path, mcq_files, capsys):
    model_dir = save_tiny_model_dir(tmp_path)
    argv = [
        "train",
        "--model",
        model_dir,
        "--dataset",
        mcq_files[0],
        "--output-dir",
        str(tmp_path / "empty"),
        "--resume",
        "--no-progress",
    ]
    assert main(argv) == 2
    assert "no checkpoint found" in capsys.readouterr().err


def test_sft_with_packing_reports_padding(tmp_path):
    rng = random.Random(0)
    with open(tmp_path / "sft.jsonl", "w") as fh:
        for _ in range(40):
            n = rng.randint(1, 5)
            fh.write(json.dumps({"prompt": " ".join(rng.sample(FILLER, n)), "completion": rng.choice(GOOD)}) + "\n")
    common = dict(
        model="tiny",
        dataset=str(tmp_path / "sft.jsonl"),
        eval_dataset=str(tmp_path / "sft.jsonl"),
        batch_size=4,
        max_steps=12,
        lr=3e-2,
        max_length=32,
        progress=False,
        verbose=False,
        adapter={"num_experts": 2, "top_k": 1, "rank": 2},
    )
    packed = train(
        TrainConfig.from_dict({**common, "packing": True, "output_dir": str(tmp_path / "p")}),
        model=make_tiny_llama(),
        tokenizer=tiny_tokenizer(),
    )
    plain = train(
        TrainConfig.from_dict({**common, "output_dir": str(tmp_path / "u")}),
        model=make_tiny_llama(),
        tokenizer=tiny_tokenizer(),
    )
    assert 0.0 <= packed["pad_fraction"] < plain["pad_fraction"]
    assert packed["after"]["loss"] < packed["before"]["loss"]  # completion loss goes down


def test_pack_items_and_collate_loss_positions():
    from riemix.tasks import LMItem, collate_lm, pack_items

    items = [LMItem([1, 2, 3], [4]), LMItem([5], [6, 7]), LMItem([8, 9, 10, 11], [12, 13])]
    rows = pack_items(items, max_length=8)
    # sizes 4, 3, 6 with room 8, first-fit decreasing: [6] and [4, 3]
    assert [sum(len(i.prompt) + len(i.target) for i in row) for row in rows] == [6, 7]
    batch = collate_lm(rows, pad_id=0)
    flat_ids = batch["input_ids"].reshape(-1)
    # every loss position predicts the token that follows it
    assert torch.equal(flat_ids[batch["loss_index"] + 1], batch["loss_target"])
    assert sorted(batch["loss_target"].tolist()) == [4, 6, 7, 12, 13]


def test_early_stopping_stops(tmp_path, mcq_files):
    cfg = base_cfg(
        tmp_path,
        mcq_files,
        max_steps=40,
        lr=0.0,
        gate_lr=0.0,
        eval_every=2,
        early_stopping_patience=2,
        eval_before=False,
    )
    summary = train(cfg, model=make_tiny_llama(), tokenizer=tiny_tokenizer())
    assert summary["steps"] == 6  # lr 0: no improvement after the first evaluation at step 2


def test_bf16_autocast_run(tmp_path, mcq_files):
    summary = train(
        base_cfg(tmp_path, mcq_files, max_steps=3, bf16=True, eval_before=False),
        model=make_tiny_llama(),
        tokenizer=tiny_tokenizer(),
    )
    assert 0.0 <= summary["after"]["accuracy"] <= 1.0


@pytest.mark.parametrize("name", ["paper.yaml", "fast_cpu.yaml", "minilm_glue.yaml"])
def test_example_configs_are_valid(name):
    from pathlib import Path

    cfg = TrainConfig.from_yaml(Path(__file__).parent.parent / "configs" / name)
    assert cfg.max_steps > 0


def test_metrics_logger_and_before_after_table(tmp_path):
    from riemix.training.logging import MetricsLogger, format_metrics, format_table

    MetricsLogger(tmp_path / "off.jsonl", enabled=False).record({"step": 1, "loss": 0.5})
    assert not (tmp_path / "off.jsonl").exists()  # non-main processes write nothing
    log = MetricsLogger(tmp_path / "m.jsonl")
    log.record({"step": 1, "loss": 0.5})
    log.record({"step": 2, "eval": {"accuracy": 0.75}})
    log.close()
    lines = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert lines == [{"step": 1, "loss": 0.5}, {"step": 2, "eval": {"accuracy": 0.75}}]
    assert format_metrics({"accuracy": 0.75, "loss": 0.123456}) == "accuracy=0.7500, loss=0.1235"
    table = format_table({"accuracy": 0.5, "loss": 1.0}, {"accuracy": 0.75}).splitlines()
    assert table[1] == f"{'accuracy':<28} {'0.5000':>10} {'0.7500':>10} {'+0.2500':>10}"
    assert table[2] == f"{'loss':<28} {'1.0000':>10} {'-':>10} {'':>10}"


def test_batch_at_is_a_seeded_sharded_permutation_per_epoch():
    from riemix.training.data import batch_at

    items = list(range(10))
    epoch0 = [batch_at(items, i, 4, seed=3) for i in range(2)]  # 10 // 4 = 2 batches per epoch
    assert len(set(epoch0[0] + epoch0[1])) == 8  # no repeats within an epoch
    assert batch_at(items, 2, 4, seed=3) != epoch0[0]  # a new permutation in the next epoch
    assert batch_at(items, 0, 4, seed=3) == epoch0[0]  # a function of (index, seed): no iterator state
    shards = [batch_at(items, 1, 4, seed=3, rank=r, world=2) for r in range(2)]
    assert shards == [epoch0[1][0::2], epoch0[1][1::2]]
