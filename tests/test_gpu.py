"""GPU checks, skipped without CUDA (CI has none): 4-bit merge numerics where bitsandbytes' CUDA
kernels run, a bf16 QLoRA SFT run with allocation rounds, the refusal of FSDP2 parameter offload, and
(2 GPUs) the Trainer under FSDP2, ZeRO-3 and FSDP-QLoRA."""

import json
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import peft_alora
from peft_alora.callback import ALoRACallback
from conftest import alora_config, logits_of, random_batch, randomize_lora_b

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def load_4bit_cuda(path, compute_dtype=torch.float32):
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=compute_dtype,
                                                device_map={"": 0}).eval()


def test_4bit_merge_error_equals_stock_lora_on_cuda(tiny_llama_dir, tmp_path):
    ids = random_batch().cuda()
    model = get_peft_model(load_4bit_cuda(tiny_llama_dir), alora_config())
    randomize_lora_b(model)
    layers = dict(model.base_model.gated_layers())
    for name in sorted(layers)[:3]:  # unequal ranks: switch a few slots off
        layers[name].deactivate_slot("default", 0)
    peft_alora.export_lora(model, tmp_path / "lora")
    stock = PeftModel.from_pretrained(load_4bit_cuda(tiny_llama_dir), str(tmp_path / "lora"))

    unmerged, stock_unmerged = logits_of(model, ids), logits_of(stock, ids)
    assert (unmerged - stock_unmerged).abs().max().item() <= 1e-4
    alora_error = (logits_of(model.merge_and_unload(), ids) - unmerged).abs().max().item()
    lora_error = (logits_of(stock.merge_and_unload(), ids) - stock_unmerged).abs().max().item()
    assert alora_error <= 1.01 * lora_error + 1e-4, (alora_error, lora_error)


def test_qlora_sft_bf16_rounds_on_cuda(tmp_path):
    from trl import SFTConfig, SFTTrainer

    from peft_alora.toy import toy_dataset, toy_llama, toy_tokenizer

    tokenizer = toy_tokenizer()
    base_dir = str(tmp_path / "base")
    toy_llama(len(tokenizer), hidden_size=128, seed=0).save_pretrained(base_dir)
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=12, per_device_train_batch_size=8,
                     learning_rate=1e-2, logging_steps=2, report_to=[], save_strategy="no", bf16=True,
                     assistant_only_loss=True, max_length=64, seed=0, disable_tqdm=True)
    trainer = SFTTrainer(model=load_4bit_cuda(base_dir, torch.bfloat16), args=args, processing_class=tokenizer,
                         train_dataset=toy_dataset(96, seed=0), eval_dataset=toy_dataset(16, seed=1),
                         peft_config=alora_config(r=2, lora_alpha=4, allocation_start=3, allocation_end=None,
                                                  allocation_interval=3, allocation_rounds=3, scoring_examples=16))
    callback = ALoRACallback(trainer)
    trainer.add_callback(callback)
    trainer.train()
    layers = callback.allocator.layers
    assert all(layer.lora_gate["default"].dtype == torch.float32 for layer in layers.values())
    assert len(callback.allocator.history) == 4
    assert trainer.model.base_model.count_active_ranks() <= callback.allocator.budget
    report = json.loads((tmp_path / "out" / "alora_allocation.json").read_text())
    assert [r["round"] for r in report["history"]] == [0, 1, 2, 3]


# ---- several GPUs: the engines accelerate applies only on GPUs (FSDP2, DeepSpeed ZeRO-3) under the Trainer ----

TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
SFT_SCRIPT = Path(__file__).resolve().parent / "scripts" / "train_toy_sft.py"


def _torchrun(out, *args):
    from test_distributed import free_port, run

    return run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
                "--master_addr", "127.0.0.1", "--master_port", str(free_port()), SFT_SCRIPT, out, *args], out)


@TWO_GPUS
@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_trainer_engine_shards_and_decides_like_one_process(engine, tmp_path):
    if engine == "zero3":
        pytest.importorskip("deepspeed")
    from test_distributed import run

    two = _torchrun(tmp_path / "two", "--per-device-batch", "4", "--scorer", "fast", "--engine", engine)
    one = run([sys.executable, SFT_SCRIPT, tmp_path / "one", "--per-device-batch", "8", "--scorer", "fast"],
              tmp_path / "one")
    (r1, w1) = one[0]
    for rank, (r2, w2) in two.items():
        assert r2["lora_param_type"] == {"fsdp2": "DTensor", "zero3": "Parameter (ZeRO-3)"}[engine]
        assert r2["global_step"] == 16 and r2["history"] == r1["history"], rank
        for scores_1, scores_2 in zip(r1["scores"][1:], r2["scores"][1:]):
            assert max(abs(scores_1[k] - scores_2[k]) for k in scores_1) < 1e-4  # GPU against CPU fp32
        for name in w1:
            torch.testing.assert_close(w2[name], w1[name], atol=1e-3, rtol=0, msg=name)
    assert two[0][0]["scores"] == two[1][0]["scores"]


@TWO_GPUS
def test_trainer_fsdp_qlora_bf16_shards_4bit_weights_and_agrees_across_processes(tmp_path):
    two = _torchrun(tmp_path / "two", "--per-device-batch", "4", "--scorer", "fast", "--engine", "fsdp2",
                    "--qlora", "--bf16")
    (r0, w0), (r1, w1) = two[0], two[1]
    assert r0["lora_param_type"] == "DTensor" and r0["base_weight_type"] == "DTensor"  # the 4-bit weights too
    assert len(r0["history"]) == 4 and r0["history"] == r1["history"] and r0["scores"] == r1["scores"]
    for name in w0:
        assert torch.equal(w0[name], w1[name]), name


def test_fsdp2_parameter_offload_is_refused_naming_the_option():
    from test_engines import refusal

    result = refusal("fsdp2-offload")
    assert result["trained"] and "offload_params: false" in result["error"]
