"""``export_model``: a directory ``AutoModelForCausalLM`` serves alone, computing riemix's forward."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from riemix import MoELoRAConfig, add_moe_lora, export_model, iter_moe_lora_layers, save_adapter
from riemix.ship.export import EXPORT_FORMAT, MODELING_FILE
from tests.helpers import make_tiny_bert
from tests.ship.common import adapted_tiny, greedy_ids, logits, write_run


def load_export(out) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()


@pytest.mark.parametrize("routing", ["softmax_topk", "dense"])
def test_the_export_computes_the_riemix_logits_and_generations(routing, model_dir, tmp_path):
    model, tokenizer = adapted_tiny(model_dir, routing, expert_scales=True)
    for _, layer in iter_moe_lora_layers(model):
        layer.scale_factor, layer.router_temperature = 0.7, 1.4  # runtime state goes along
    out = export_model(model, tmp_path / "export", tokenizer)
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", MODELING_FILE, "tokenizer.json", "generation_config.json"} <= files
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_riemix.RiemixMoELoRAForCausalLM"}
    spec = config["riemix_moe_lora"]
    assert spec["format"] == EXPORT_FORMAT and spec["adapter_config"]["routing"] == routing
    assert spec["layers"]["model.layers.1.mlp.down_proj"]["temperature"] == 1.4

    loaded = load_export(out)
    assert type(loaded).__name__ == "RiemixMoELoRAForCausalLM"
    want = logits(model)
    assert (want - logits(AutoModelForCausalLM.from_pretrained(model_dir))).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(logits(loaded), want, atol=1e-5, rtol=1e-5)
    assert torch.equal(greedy_ids(loaded), greedy_ids(model))


def test_every_export_routing_mode_and_the_bf16_adapter_dtype(model_dir, tmp_path):
    for routing in ("topk_softmax", "top_p", "global"):
        model, tokenizer = adapted_tiny(model_dir, routing, top_p=0.6)
        out = export_model(model, tmp_path / routing, tokenizer)
        torch.testing.assert_close(logits(load_export(out)), logits(model), atol=1e-5, rtol=1e-5)
    q = (
        AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.bfloat16)
        .model.layers[0]
        .self_attn.q_proj
    )
    assert q.base_layer.weight.dtype == torch.bfloat16 and q.lora_A.dtype == torch.float32  # as riemix keeps it


def test_the_export_loads_without_riemix(model_dir, tmp_path):
    model, tokenizer = adapted_tiny(model_dir)
    out = export_model(model, tmp_path / "export", tokenizer)
    torch.save(logits(model), tmp_path / "want.pt")
    script = (
        "import sys; sys.modules['riemix'] = None  # any riemix import fails\n"
        "import torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()\n"
        f"tok = AutoTokenizer.from_pretrained({str(out)!r})\n"
        "g = torch.Generator().manual_seed(1)\n"
        "ids = torch.randint(0, 64, (2, 7), generator=g)\n"
        "with torch.no_grad(): got = m(input_ids=ids, attention_mask=torch.ones_like(ids)).logits\n"
        f"torch.testing.assert_close(got, torch.load({str(tmp_path / 'want.pt')!r}), atol=1e-5, rtol=1e-5)\n"
        "m.generate(**tok('what is the best', return_tensors='pt'), max_new_tokens=3, do_sample=False)\n"
        "print('ok', 'riemix' in str(sys.modules.get('riemix')))\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["ok", "False"]


def test_a_run_directory_exports_with_its_base_model(model_dir, tmp_path):
    model, _ = adapted_tiny(model_dir)
    run = write_run(tmp_path / "run", model_dir, model)
    out = export_model(run, tmp_path / "export")
    assert (out / "tokenizer.json").is_file()  # the base model's tokenizer came along
    torch.testing.assert_close(logits(load_export(out)), logits(model), atol=1e-5, rtol=1e-5)


def test_an_adapter_directory_needs_the_base_model(model_dir, tmp_path):
    model, _ = adapted_tiny(model_dir)
    adapter = save_adapter(model, tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"adapter is an adapter directory: name the base model \(--model\)"):
        export_model(adapter, tmp_path / "export")
    out = export_model(adapter, tmp_path / "export", base_model=model_dir)
    torch.testing.assert_close(logits(load_export(out)), logits(model), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="base_model applies to a run or adapter directory, not to a model object"):
        export_model(model, tmp_path / "other", base_model=model_dir)


def test_merge_writes_a_plain_model_and_leaves_the_callers_model(model_dir, tmp_path):
    model, tokenizer = adapted_tiny(model_dir, "global")
    out = export_model(model, tmp_path / "merged", tokenizer, merge=True)
    assert not (out / MODELING_FILE).exists() and "auto_map" not in json.loads((out / "config.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(out)  # no remote code
    assert type(plain).__name__ == "LlamaForCausalLM"
    assert len(list(iter_moe_lora_layers(model))) == 8  # merged a copy
    torch.testing.assert_close(logits(plain), logits(model), atol=1e-5, rtol=1e-5)
    topk, _ = adapted_tiny(model_dir, "softmax_topk")
    with pytest.raises(ValueError, match=r"merge=True \(--merge\): 8 layer\(s\) have input-dependent gates"):
        export_model(topk, tmp_path / "refused", merge=True)
    assert not (tmp_path / "refused").exists()


def test_an_existing_directory_is_replaced_only_with_overwrite(model_dir, tmp_path):
    model, tokenizer = adapted_tiny(model_dir)
    out = tmp_path / "export"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"export: the export directory exists and is not empty; .* --overwrite"):
        export_model(model, out, tokenizer)
    assert (out / "notes.txt").read_text() == "mine"
    export_model(model, out, tokenizer, overwrite=True)
    assert not (out / "notes.txt").exists() and (out / MODELING_FILE).is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="file: the export directory is a file"):
        export_model(model, tmp_path / "file", tokenizer, overwrite=True)


def test_the_source_directory_is_never_the_export_directory(model_dir, tmp_path):
    model, _ = adapted_tiny(model_dir)
    run = write_run(tmp_path / "run", model_dir, model)
    for out in (run, tmp_path):
        with pytest.raises(ValueError, match=r"the export directory would replace the source .*run; choose another"):
            export_model(run, out, overwrite=True)
    assert (run / "adapter" / "adapter_config.json").is_file()


def test_models_that_cannot_be_exported_are_refused(model_dir, tmp_path):
    out = tmp_path / "export"
    plain, _ = adapted_tiny(model_dir)
    layer = dict(iter_moe_lora_layers(plain))["model.layers.0.self_attn.q_proj"]
    layer.routing = "hash"
    with pytest.raises(
        ValueError, match=r"cannot export routing mode\(s\) \['hash'\] \(layers \['model.layers.0.self_attn.q_proj'\]\)"
    ):
        export_model(plain, out)
    nan, _ = adapted_tiny(model_dir)
    with torch.no_grad():
        dict(iter_moe_lora_layers(nan))["model.layers.1.mlp.down_proj"].lora_B[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite adapter tensors .*'model.layers.1.mlp.down_proj.lora_B'"):
        export_model(nan, out)
    bert = add_moe_lora(make_tiny_bert(), MoELoRAConfig(num_experts=2, top_k=1, target_modules=["query"]))
    with pytest.raises(ValueError, match="BertForSequenceClassification is not one of them"):
        export_model(bert, out)
    with pytest.raises(ValueError, match="LlamaForCausalLM has no MoE-LoRA adapters to export"):
        export_model(AutoModelForCausalLM.from_pretrained(model_dir), out)
    assert not out.exists()


def test_a_grown_model_exports_and_mixed_ranks_or_immature_experts_are_refused(model_dir, tmp_path):
    from riemix import grow_experts
    from riemix.core.schedules import set_maturity

    q0 = "model.layers.0.self_attn.q_proj"
    grown, _ = adapted_tiny(model_dir)
    grow_experts(grown, modules=[q0])
    with torch.no_grad():
        dict(iter_moe_lora_layers(grown))[q0].lora_B[4].normal_()  # the new expert matters
    loaded = load_export(export_model(grown, tmp_path / "export"))
    torch.testing.assert_close(logits(loaded), logits(grown), atol=1e-5, rtol=1e-5)
    out = tmp_path / "refused"
    grow_experts(grown, rank=3, modules=[q0])
    match = rf"cannot export 1 layer\(s\) whose experts have different ranks \(e.g. {q0} with "
    match += r"expert_ranks=\[2, 2, 2, 2, 2, 3\]\)"
    with pytest.raises(ValueError, match=match):
        export_model(grown, out)
    young, _ = adapted_tiny(model_dir)
    set_maturity(young, 5)
    grow_experts(young, modules=[q0])
    with pytest.raises(ValueError, match=rf"cannot export 1 layer\(s\) with immature experts \(e.g. {q0}\)"):
        export_model(young, out)
    assert not out.exists()
