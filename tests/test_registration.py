"""Registration with PEFT and every adapter loading path of PEFT and transformers (issue #2, points 2 and 5)."""

import importlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import (
    BASE_KINDS,
    alora_config,
    load_base,
    logits_of,
    make_ranks_unequal,
    make_tiny_llama,
    random_batch,
    randomize_lora_b,
)
from peft import (
    AdaLoraConfig,
    AutoPeftModelForCausalLM,
    LoraConfig,
    PeftConfig,
    PeftModel,
    get_peft_model,
)
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.lora import LoraModel
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.utils.peft_types import PeftType

import peft_alora
from peft_alora import ALoRAConfig, ALoRAModel, GatedLinear


pytestmark = pytest.mark.usefixtures("torch_single_thread")

QUANT_KWARGS = {
    "4bit": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "8bit": dict(load_in_8bit=True),
}


def _registry_snapshot():
    return (
        list(PeftType.__members__),
        PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.ALLOCATING_LORA],
        PEFT_TYPE_TO_TUNER_MAPPING[PeftType.ALLOCATING_LORA],
        PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.ALLOCATING_LORA],
    )


def test_registered_under_its_own_type():
    member = PeftType["ALLOCATING_LORA"]
    assert member.value == "ALLOCATING_LORA" and PeftType("ALLOCATING_LORA") is member
    assert peft_alora.PEFT_TYPE is member
    assert PEFT_TYPE_TO_CONFIG_MAPPING[member] is ALoRAConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[member] is ALoRAModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[member] == "lora_"
    assert "ALORA" not in PeftType.__members__  # that name belongs to Activated LoRA, not to us


def test_import_and_reload_are_idempotent():
    before = _registry_snapshot()
    assert before[0].count("ALLOCATING_LORA") == 1
    importlib.reload(peft_alora.registration)
    importlib.reload(peft_alora)
    peft_alora.registration.register()
    after = _registry_snapshot()
    assert after == before
    assert len(PeftType) == len(before[0])

    model = get_peft_model(make_tiny_llama(), peft_alora.ALoRAConfig(r=2, target_modules=["q_proj"]))
    assert isinstance(model.base_model, ALoRAModel)
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj, GatedLinear)


def test_plain_lora_and_adalora_still_work_alongside():
    x = random_batch()
    lora = get_peft_model(make_tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert type(lora.base_model) is LoraModel
    q_proj = lora.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q_proj) is LoraLinear and not hasattr(q_proj, "lora_gate")
    assert lora.peft_config["default"].peft_type is PeftType.LORA

    adalora = get_peft_model(make_tiny_llama(), AdaLoraConfig(init_r=4, target_r=2, total_step=10,
                                                               target_modules=["q_proj"]))
    assert adalora.peft_config["default"].peft_type is PeftType.ADALORA

    alora = get_peft_model(make_tiny_llama(), alora_config())
    for model in (lora, adalora, alora):
        assert torch.isfinite(logits_of(model, x)).all()
    # fresh LoRA-style inits (B = 0) leave the base model's output untouched, for all three
    base = logits_of(make_tiny_llama(), x)
    for model in (lora, adalora, alora):
        torch.testing.assert_close(logits_of(model, x), base, rtol=0, atol=1e-6)


# ---- loading paths ----------------------------------------------------------------------------

@pytest.fixture(params=BASE_KINDS)
def saved_native(request, tmp_path, tiny_llama_dir, tiny_gpt2_dir):
    """An ALoRA adapter with unequal per-module ranks (one module at rank 0) and nonzero B, saved natively."""
    kind = request.param
    model = get_peft_model(load_base(kind, tiny_llama_dir, tiny_gpt2_dir), alora_config())
    randomize_lora_b(model, seed=1)
    ranks = make_ranks_unequal(model)
    assert sorted(set(ranks.values())) == [0, 3, 4, 6]
    x = random_batch()
    expected = logits_of(model, x)
    with model.disable_adapter():
        base = logits_of(model, x)
    assert (expected - base).abs().max() > 1e-2  # the adapter really changes the output
    path = tmp_path / "native"
    model.save_pretrained(path)
    gates = {name: layer.lora_gate["default"].clone() for name, layer in model.base_model.gated_layers()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    return dict(kind=kind, path=str(path), x=x, expected=expected, ranks=ranks, gates=gates, weights=weights,
                base_dir=tiny_gpt2_dir if kind == "conv1d" else tiny_llama_dir)


def _check_reloaded(peft_model, saved):
    reloaded_ranks = {name: layer.num_active("default") for name, layer in peft_model.base_model.gated_layers()}
    assert reloaded_ranks == saved["ranks"]
    for name, layer in peft_model.base_model.gated_layers():
        assert layer.lora_gate["default"].dtype == torch.float32
        torch.testing.assert_close(layer.lora_gate["default"], saved["gates"][name], rtol=0, atol=0)
    weights = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    assert weights.keys() == saved["weights"].keys()
    for name, value in saved["weights"].items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=0)
    torch.testing.assert_close(logits_of(peft_model, saved["x"]), saved["expected"], rtol=0, atol=1e-6)


def test_adapter_config_says_allocating_lora(saved_native):
    with open(os.path.join(saved_native["path"], "adapter_config.json")) as f:
        raw = json.load(f)
    assert raw["peft_type"] == "ALLOCATING_LORA"
    assert raw["r"] == 4 and raw["max_r"] == 8 and raw["lora_alpha"] == 8
    assert raw["base_model_name_or_path"] == saved_native["base_dir"]

    config = PeftConfig.from_pretrained(saved_native["path"])
    assert type(config) is ALoRAConfig
    assert config.peft_type is PeftType.ALLOCATING_LORA
    assert (config.r, config.max_r, config.lora_alpha) == (4, 8, 8)


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_peft_model_from_pretrained(saved_native, tiny_llama_dir, tiny_gpt2_dir, low_cpu_mem_usage):
    base = load_base(saved_native["kind"], tiny_llama_dir, tiny_gpt2_dir)
    model = PeftModel.from_pretrained(base, saved_native["path"], low_cpu_mem_usage=low_cpu_mem_usage)
    assert isinstance(model.base_model, ALoRAModel)
    _check_reloaded(model, saved_native)


@pytest.mark.parametrize("load_kwargs", [{}, {"low_cpu_mem_usage": True},
                                         {"low_cpu_mem_usage": True, "autocast_adapter_dtype": False}])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_native_adapter_on_a_half_precision_base_keeps_fp32_gates(tmp_path, dtype, load_kwargs):
    x = random_batch()
    model = get_peft_model(make_tiny_llama(), alora_config())
    randomize_lora_b(model, seed=2)
    make_ranks_unequal(model)
    expected = logits_of(model, x)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_tiny_llama().to(dtype), tmp_path, **load_kwargs)
    plain = make_tiny_llama().to(dtype)
    plain.load_adapter(str(tmp_path))
    for layers in (dict(loaded.base_model.gated_layers()),
                   {n: m for n, m in plain.named_modules() if isinstance(m, peft_alora.GatedLoraMixin)}):
        assert len(layers) == 14
        for name, layer in layers.items():
            assert layer.lora_gate["default"].dtype == torch.float32, name
            assert layer.lora_gate["default"].device.type == "cpu"
    for reloaded in (loaded, plain):
        torch.testing.assert_close(logits_of(reloaded, x), expected, rtol=0, atol=0.05)


def test_auto_peft_model_from_pretrained(saved_native):
    kwargs = {}
    if saved_native["kind"] in QUANT_KWARGS:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(**QUANT_KWARGS[saved_native["kind"]])
    model = AutoPeftModelForCausalLM.from_pretrained(saved_native["path"], dtype=torch.float32, **kwargs).eval()
    assert isinstance(model.base_model, ALoRAModel)
    _check_reloaded(model, saved_native)


@pytest.mark.parametrize("adapter_name", ["default", "mine"])
def test_transformers_load_adapter(saved_native, tiny_llama_dir, tiny_gpt2_dir, adapter_name):
    # transformers' load_adapter marks adapter keys by the adapter name and by `peft_type.value.lower()`:
    # the weights and gates must really arrive (the adapter has nonzero B, so the logits tell).
    model = load_base(saved_native["kind"], tiny_llama_dir, tiny_gpt2_dir)
    info = model.load_adapter(saved_native["path"], adapter_name=adapter_name)
    assert not info.missing_keys and not info.unexpected_keys and not info.mismatched_keys
    gated = {n: m for n, m in model.named_modules() if isinstance(m, peft_alora.GatedLoraMixin)}
    assert {n: m.num_active(adapter_name) for n, m in gated.items()} == saved_native["ranks"]
    for name, layer in gated.items():
        torch.testing.assert_close(layer.lora_gate[adapter_name], saved_native["gates"][name], rtol=0, atol=0)
    weights = {f"base_model.model.{n}".replace(f".{adapter_name}.", ".default."): p
               for n, p in model.named_parameters() if "lora_" in n}
    assert weights.keys() == saved_native["weights"].keys()
    for name, value in saved_native["weights"].items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=0)
    torch.testing.assert_close(logits_of(model, saved_native["x"]), saved_native["expected"], rtol=0, atol=1e-6)


def test_native_adapter_without_import_names_the_missing_type(tmp_path, tiny_llama_dir):
    """What a user sees when loading a native adapter without ``import peft_alora`` (the README quotes it)."""
    model = get_peft_model(load_base("linear", tiny_llama_dir, None), alora_config(target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "native")
    script = textwrap.dedent(f"""
        import sys
        import transformers
        from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel
        path, base = {str(tmp_path / "native")!r}, {tiny_llama_dir!r}
        attempts = {{
            "PeftModel.from_pretrained": lambda: PeftModel.from_pretrained(
                transformers.AutoModelForCausalLM.from_pretrained(base), path),
            "PeftConfig.from_pretrained": lambda: PeftConfig.from_pretrained(path),
            "AutoPeftModelForCausalLM.from_pretrained": lambda: AutoPeftModelForCausalLM.from_pretrained(path),
            "load_adapter": lambda: transformers.AutoModelForCausalLM.from_pretrained(base).load_adapter(path),
        }}
        for name, attempt in attempts.items():
            try:
                attempt()
                print(name, "-> loaded")
            except Exception as exc:
                print(name, "->", f"{{type(exc).__name__}}: {{exc}}")
        assert "peft_alora" not in sys.modules
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if " -> " in line]
    assert len(lines) == 4, done.stdout
    for line in lines:
        assert line.endswith("-> KeyError: 'ALLOCATING_LORA'"), line
