"""Stock-LoRA export (issue #2, point 6): compact, gate and scale folded into B, loadable without peft_alora."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import alora_config, load_base, logits_of, make_ranks_unequal, random_batch, randomize_lora_b
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import peft_alora

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _adapted(kind, llama_dir, gpt2_dir, seed=0):
    torch.manual_seed(seed)
    model = get_peft_model(load_base(kind, llama_dir, gpt2_dir), alora_config(r=4, lora_alpha=6))
    randomize_lora_b(model, std=0.05, seed=seed)
    ranks = make_ranks_unequal(model, seed=seed)
    return model, ranks


@pytest.mark.parametrize("kind", ["linear", "conv1d", "4bit"])
def test_export_contents(kind, tiny_llama_dir, tiny_gpt2_dir, tmp_path):
    model, ranks = _adapted(kind, tiny_llama_dir, tiny_gpt2_dir)
    zero = [name for name, rank in ranks.items() if rank == 0]
    assert len(zero) == 1
    out = peft_alora.export_lora(model, tmp_path / "lora")

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    largest = max(ranks.values())
    assert largest == 6 and config["r"] == largest and config["lora_alpha"] == largest
    kept = {name: rank for name, rank in ranks.items() if rank > 0}
    assert config["rank_pattern"] == kept and config["alpha_pattern"] == kept
    assert all(type(v) is int for v in config["rank_pattern"].values())
    assert all(type(v) is int for v in config["alpha_pattern"].values())
    assert sorted(config["target_modules"]) == sorted(kept) and zero[0] not in config["target_modules"]
    assert config["use_rslora"] is False and config["use_dora"] is False
    assert config["fan_in_fan_out"] is (kind == "conv1d")
    assert config["base_model_name_or_path"] == (tiny_gpt2_dir if kind == "conv1d" else tiny_llama_dir)

    tensors = load_file(out / "adapter_model.safetensors")
    assert not [k for k in tensors if "gate" in k.split(".")[-1]]
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)
    assert not [k for k in tensors if zero[0] in k]
    assert len(tensors) == 2 * len(kept)
    for name, layer in model.base_model.gated_layers():
        if name not in kept:
            continue
        active = layer.active_slots("default")
        weight_a, weight_b = layer.slot_weights("default")
        got_a = tensors[f"base_model.model.{name}.lora_A.weight"]
        got_b = tensors[f"base_model.model.{name}.lora_B.weight"]
        assert got_a.shape == (kept[name], layer.in_features) and got_b.shape == (layer.out_features, kept[name])
        torch.testing.assert_close(got_a, weight_a[active], rtol=0, atol=0)
        torch.testing.assert_close(got_b, weight_b[:, active] * (6 / 4), rtol=0, atol=1e-7)
        # the compact pair gives the gated delta: s B diag(g) A == B' A'
        torch.testing.assert_close(got_b @ got_a, 1.5 * (weight_b * layer.lora_gate["default"]) @ weight_a,
                                   rtol=0, atol=1e-6)


def test_export_in_process_matches_and_second_adapter(tiny_llama_dir, tiny_gpt2_dir, tmp_path):
    x = random_batch()
    model, _ = _adapted("linear", tiny_llama_dir, tiny_gpt2_dir)
    model.add_adapter("second", alora_config(r=2, lora_alpha=2, target_modules=["v_proj"]))
    randomize_lora_b(model, std=0.1, seed=5, adapter="second")
    layer = model.base_model.get_gated_layer("model.layers.1.self_attn.v_proj")
    layer.deactivate_slot("second", 0)
    peft_alora.export_lora(model, tmp_path / "first")
    peft_alora.export_lora(model, tmp_path / "second", adapter_name="second")
    config = json.loads((tmp_path / "second" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {"model.layers.0.self_attn.v_proj": 2, "model.layers.1.self_attn.v_proj": 1}
    for adapter in ("default", "second"):
        model.set_adapter(adapter)
        expected = logits_of(model, x)
        folder = tmp_path / ("first" if adapter == "default" else "second")
        stock = PeftModel.from_pretrained(load_base("linear", tiny_llama_dir, tiny_gpt2_dir), folder)
        assert type(stock.base_model).__name__ == "LoraModel"
        torch.testing.assert_close(logits_of(stock, x), expected, rtol=0, atol=1e-5)


def test_export_from_a_transformers_model_with_the_adapter_loaded(tiny_llama_dir, tiny_gpt2_dir, tmp_path):
    # transformers' load_adapter leaves keys without PeftModel's "base_model.model." prefix; the export
    # must still write the prefixed keys that PeftModel.from_pretrained loads (it ignores others silently)
    x = random_batch()
    model, _ = _adapted("linear", tiny_llama_dir, tiny_gpt2_dir)
    expected = logits_of(model, x)
    model.save_pretrained(tmp_path / "native")
    plain = load_base("linear", tiny_llama_dir, tiny_gpt2_dir)
    plain.load_adapter(str(tmp_path / "native"))
    peft_alora.export_lora(plain, tmp_path / "lora")
    keys = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    assert keys and all(k.startswith("base_model.model.model.layers.") for k in keys)
    stock = PeftModel.from_pretrained(load_base("linear", tiny_llama_dir, tiny_gpt2_dir), tmp_path / "lora")
    torch.testing.assert_close(logits_of(stock, x), expected, rtol=0, atol=1e-5)


def test_export_refuses_non_alora_and_empty_adapters(tiny_llama_dir, tiny_gpt2_dir, tmp_path):
    from peft import LoraConfig

    lora = get_peft_model(load_base("linear", tiny_llama_dir, tiny_gpt2_dir), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="'default' is a LoraConfig, not ALoRA.*save_pretrained"):
        peft_alora.export_lora(lora, tmp_path / "x")
    model = get_peft_model(load_base("linear", tiny_llama_dir, tiny_gpt2_dir), alora_config(target_modules=["q_proj"]))
    for _, layer in model.base_model.gated_layers():
        for slot in layer.active_slots("default"):
            layer.deactivate_slot("default", slot)
    with pytest.raises(ValueError, match="no active rank"):
        peft_alora.export_lora(model, tmp_path / "y")
    with pytest.raises(ValueError, match=r"adapter_name='other'.*adapters are \['default'\]"):
        peft_alora.export_lora(model, tmp_path / "z", adapter_name="other")
    assert not any((tmp_path / name).exists() for name in "xyz")


_LOADER = textwrap.dedent("""
    import json, sys
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    results = {}
    for case in json.loads(sys.argv[1]):
        quant = None
        if case["kind"] == "4bit":
            quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                       bnb_4bit_compute_dtype=torch.float32)
        base = AutoModelForCausalLM.from_pretrained(case["base"], quantization_config=quant, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, case["export"]).eval()
        for module in model.modules():  # the kernel the trained model used: peft_alora turns off bitsandbytes'
            if hasattr(module, "support_avx512bf16_for_cpu"):  # CPU inference repacking, which computes in bf16
                module.support_avx512bf16_for_cpu = False
        data = load_file(case["expected"])
        with torch.no_grad():
            logits = model(input_ids=data["input_ids"]).logits
        results[case["kind"]] = {
            "diff": (logits - data["logits"]).abs().max().item(),
            "tuner": type(model.base_model).__name__,
            "peft_type": str(model.peft_config["default"].peft_type.value),
        }
    results["peft_alora_imported"] = "peft_alora" in sys.modules
    print("RESULTS" + json.dumps(results))
""")


def test_export_loads_in_a_python_without_peft_alora(tiny_llama_dir, tiny_gpt2_dir, tmp_path):
    x = random_batch()
    cases = []
    for kind in ("linear", "conv1d", "4bit"):
        model, ranks = _adapted(kind, tiny_llama_dir, tiny_gpt2_dir)
        assert min(ranks.values()) == 0 and len(set(ranks.values())) == 4
        export = peft_alora.export_lora(model, tmp_path / f"{kind}-lora")  # (4-bit: before any forward)
        expected = logits_of(model, x)
        with model.disable_adapter():
            assert (expected - logits_of(model, x)).abs().max() > 0.05
        save_file({"input_ids": x, "logits": expected}, str(tmp_path / f"{kind}-expected.safetensors"))
        cases.append({"kind": kind, "base": tiny_gpt2_dir if kind == "conv1d" else tiny_llama_dir,
                      "export": str(export), "expected": str(tmp_path / f"{kind}-expected.safetensors")})

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", _LOADER, json.dumps(cases)], capture_output=True, text=True,
                          env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULTS"))
    results = json.loads(line.removeprefix("RESULTS"))
    assert results.pop("peft_alora_imported") is False
    assert set(results) == {"linear", "conv1d", "4bit"}
    for kind, result in results.items():
        assert result["tuner"] == "LoraModel" and result["peft_type"] == "LORA", (kind, result)
        assert result["diff"] <= 1e-5, (kind, result)
