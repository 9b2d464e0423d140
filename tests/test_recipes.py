"""Every recipe parses (all keys known, values valid) without downloading; accelerate configs load;
recipes/README.md gives each recipe's command. The CPU recipe runs end to end in test_cli.py."""

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from trl import get_quantization_config

from peft_alora import ALoRAConfig
from peft_alora.cli import parse_args

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
MODEL_RECIPES = sorted(p for p in RECIPES.glob("*/*.yaml") if p.parent.name != "accelerate_configs")
ACCELERATE_CONFIGS = sorted((RECIPES / "accelerate_configs").glob("*.yaml"))


def test_the_expected_recipes_exist():
    names = {p.relative_to(RECIPES).as_posix() for p in MODEL_RECIPES}
    assert {"SmolLM2-135M-Instruct/alora_cpu.yaml", "Llama-3.1-8B-Instruct/qlora_alora.yaml",
            "Qwen2.5-7B-Instruct/qlora_alora.yaml", "Llama-3.1-8B-Instruct/alora_ddp.yaml",
            "Llama-3.1-8B-Instruct/qlora_alora_fsdp.yaml", "Llama-3.1-8B-Instruct/alora_zero3.yaml"} <= names
    assert {p.stem for p in ACCELERATE_CONFIGS} == {"ddp", "zero2", "zero3", "fsdp"}


@pytest.mark.parametrize("recipe", MODEL_RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_parses_with_valid_values(recipe, monkeypatch):
    # GPU recipes ask for bf16, which TrainingArguments checks against the hardware: pretend the GPU they name
    monkeypatch.setattr("transformers.training_args.is_torch_bf16_gpu_available", lambda: True)
    script, training, model, _, alora, evals = parse_args(["--config", str(recipe)])
    config = alora.to_config(model)
    assert isinstance(config, ALoRAConfig)
    assert config.target_modules == ({"q_proj", "v_proj"} if recipe.stem == "alora_cpu_qv_r1" else "all-linear")
    assert not training.load_best_model_at_end and not training.push_to_hub
    quantization = get_quantization_config(model)
    if "qlora" in recipe.stem:
        assert quantization is not None and quantization.load_in_4bit
    else:
        assert quantization is None
    header = recipe.read_text().splitlines()[:3]
    assert f"recipes/{recipe.parent.name}/{recipe.name}" in " ".join(header)  # the command names the file
    assert any(line.startswith("# Hardware:") for line in recipe.read_text().splitlines()[:6])
    if recipe.parent.name != "SmolLM2-135M-Instruct":
        assert model.model_name_or_path.endswith(recipe.parent.name) and script.dataset_name
        assert training.bf16 and not training.use_cpu
    # no recipe pins max_r: a user who changes only --lora_r gets 2 x r slots (a pinned 16 refused r = 32 and
    # gave r = 1 sixteen slots)
    assert config.max_r is None and config.capacity == 2 * config.r
    *_, changed_r, _, changed, _ = parse_args(["--config", str(recipe), "--lora_r", "4"])
    assert changed.to_config(changed_r).capacity == 8


def test_binding_budget_recipe_is_the_cpu_recipe_with_a_smaller_adapter():
    """Its figures in docs/benchmarks.md were measured as the CPU recipe with --lora_r 1 --lora_alpha 2
    --lora_target_modules q_proj v_proj: nothing else may differ (the output folder aside)."""
    cpu = parse_args(["--config", str(RECIPES / "SmolLM2-135M-Instruct/alora_cpu.yaml")])
    measured = parse_args(["--config", str(RECIPES / "SmolLM2-135M-Instruct/alora_cpu.yaml"), "--lora_r", "1",
                           "--lora_alpha", "2", "--lora_target_modules", "q_proj", "v_proj"])
    binding = parse_args(["--config", str(RECIPES / "SmolLM2-135M-Instruct/alora_cpu_qv_r1.yaml")])
    assert binding[2] != cpu[2]  # the adapter differs from the default's
    for parsed in (measured, binding):
        parsed[1].output_dir = cpu[1].output_dir
    assert repr(binding) == repr(measured)
    config = binding[4].to_config(binding[2])
    assert (config.r, config.lora_alpha, config.capacity) == (1, 2, 2)


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_loads(path):
    config = load_config_from_file(str(path))
    expected = {"ddp": "MULTI_GPU", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED", "fsdp": "FSDP"}[path.stem]
    assert config.distributed_type.value == expected
    if path.stem.startswith("zero"):
        assert config.deepspeed_config["zero_stage"] == int(path.stem[-1])


def test_readme_gives_every_command():
    readme = (RECIPES / "README.md").read_text()
    for recipe in MODEL_RECIPES:
        assert f"--config recipes/{recipe.parent.name}/{recipe.name}" in readme, recipe
    for path in ACCELERATE_CONFIGS:
        assert f"recipes/accelerate_configs/{path.name}" in readme, path


def test_sharded_set_ups_are_ones_alora_supports(monkeypatch):
    """FSDP2 without offload, ZeRO without offload (ALoRA refuses the rest), and FSDP-QLoRA's storage dtype equal to
    the model's dtype and to the mixed precision, so that FSDP shards the 4-bit weights with the others."""
    configs = {p.stem: load_config_from_file(str(p)) for p in ACCELERATE_CONFIGS}
    fsdp = configs["fsdp"]
    assert fsdp.fsdp_config["fsdp_version"] == 2 and fsdp.fsdp_config["fsdp_offload_params"] is False
    for stage in ("zero2", "zero3"):
        settings = configs[stage].deepspeed_config
        assert settings["offload_optimizer_device"] == settings["offload_param_device"] == "none", stage
    monkeypatch.setattr("transformers.training_args.is_torch_bf16_gpu_available", lambda: True)
    _, training, model, _, _, _ = parse_args(["--config", str(RECIPES / "Llama-3.1-8B-Instruct/qlora_alora_fsdp.yaml")])
    assert model.load_in_4bit and model.bnb_4bit_quant_storage == model.dtype == "bfloat16"
    assert fsdp.mixed_precision == "bf16" and training.bf16
