"""The Hub folder of an `alora-sft` run: card, file layout, and loading it without peft_alora."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM

from conftest import TINY_RUN_REPO, FakeHubApi
from peft_alora.hub import push_output_dir, upload_files


def _card_metadata(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_pushed_repository_layout(alora_sft_run):
    _, out, remote = alora_sft_run
    assert ("create_repo", TINY_RUN_REPO, {"private": None, "exist_ok": True, "repo_type": "model"}) in FakeHubApi.calls
    files = {p.relative_to(remote).as_posix() for p in remote.rglob("*") if p.is_file()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "alora_allocation.png",
            "loss_curve.png", "alora/adapter_config.json", "alora/adapter_model.safetensors"} <= files
    assert files == set(upload_files(out))


def test_the_token_is_used_but_never_written(alora_sft_run):
    _, out, remote = alora_sft_run
    assert FakeHubApi.tokens[0] == "test-token"  # the run's --hub_token reached the Hub client
    for folder in (out, remote):
        for path in folder.rglob("*"):
            assert not path.is_file() or b"test-token" not in path.read_bytes(), path


def test_card_says_peft_base_model_ranks_results_and_loading(alora_sft_run):
    summary, _, remote = alora_sft_run
    card = (remote / "README.md").read_text()
    meta = _card_metadata(card)
    assert meta["library_name"] == "peft" and meta["base_model"] == summary["base_model"]
    assert {"alora", "peft", "lora", "trl"} <= set(meta["tags"])
    assert "![allocation of ranks" in card and "(alora_allocation.png)" in card
    ranks = summary["adapter"]
    assert f"{ranks['active_ranks_final']} active ranks (budget {ranks['budget']})" in card
    assert f"{ranks['active_trainable_params_final']:,} trainable LoRA parameters in active ranks" in card
    assert "| 0 | " in card and "| q_proj |" in card  # the per-module rank table (layer x type)
    before, after = summary["before"], summary["after"]
    assert f"| eval loss | {before['eval_loss']:.4f} | {after['eval_loss']:.4f} |" in card
    assert f"| {before['exact_match']:.3f} | {after['exact_match']:.3f} |" in card
    assert "| learning_rate | `0.003` |" in card and "| allocation_rounds | `2` |" in card
    assert f'PeftModel.from_pretrained(base, "{TINY_RUN_REPO}")' in card
    assert 'subfolder="alora"' in card and "import peft_alora" in card
    assert "LoRARequest" in card and "enable_lora=True" in card


def test_card_names_the_rows_kept_out_of_eval(alora_sft_run):
    """The card says which eval rows ALoRA's scoring set took; a streaming split has no row count to give."""
    from peft_alora.hub import model_card

    summary, _, _ = alora_sft_run
    card = model_card(summary, TINY_RUN_REPO)
    assert "Measured on the 76 eval examples outside ALoRA's scoring set: 4 of the eval split" in card
    streamed = model_card({**summary, "eval_examples": None}, TINY_RUN_REPO)
    assert "Measured on the eval examples outside ALoRA's scoring set: 4 of the eval split" in streamed
    assert "outside ALoRA's scoring set" not in model_card({**summary, "scoring_examples_held_out": None},
                                                           TINY_RUN_REPO)


def test_checkpoints_and_pickles_stay_local(alora_sft_run, tmp_path):
    import shutil

    _, out, _ = alora_sft_run
    folder = tmp_path / "run"
    shutil.copytree(out, folder)
    (folder / "checkpoint-6").mkdir()
    (folder / "checkpoint-6" / "optimizer.pt").write_bytes(b"x")
    (folder / "runs" / "tb").mkdir(parents=True)
    (folder / "runs" / "tb" / "events").write_bytes(b"x")
    (folder / "alora" / "training_args.bin").write_bytes(b"x")
    uploaded = upload_files(folder)
    assert not [f for f in uploaded if f.startswith(("checkpoint-", "runs/")) or f.endswith((".bin", ".pt"))]
    assert "adapter_model.safetensors" in uploaded


def test_push_refuses_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(ValueError, match="alora_summary.json"):
        push_output_dir(tmp_path, "someone/x", api=FakeHubApi())


def test_plain_peft_loads_the_repository_root_without_peft_alora(alora_sft_run, toy_chat_llama_dir, tmp_path,
                                                                 torch_single_thread):
    _, out, remote = alora_sft_run
    ids = [[5, 17, 42, 99, 7, 250, 3, 64]]
    script = textwrap.dedent(f"""
        import json, sys
        sys.modules["peft_alora"] = None  # any import of peft_alora now fails
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        torch.set_num_threads(1)
        base = AutoModelForCausalLM.from_pretrained({toy_chat_llama_dir!r}, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, {str(remote)!r}).eval()
        with torch.no_grad():
            print(json.dumps(model(input_ids=torch.tensor({ids})).logits[0, -1].tolist()))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    plain = torch.tensor(json.loads(result.stdout.strip().splitlines()[-1]))

    base = AutoModelForCausalLM.from_pretrained(toy_chat_llama_dir, dtype=torch.float32)
    native = PeftModel.from_pretrained(base, str(remote), subfolder="alora").eval()  # needs peft_alora: imported
    assert native.peft_config["default"].peft_type.value == "ALLOCATING_LORA"
    with torch.no_grad():
        expected = native(input_ids=torch.tensor(ids)).logits[0, -1]
    torch.testing.assert_close(plain, expected, atol=1e-5, rtol=1e-5)
