"""Shared fixtures: tiny models built from configs (nothing is downloaded)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, GPT2Config, LlamaConfig

import peft_alora  # noqa: F401  (registers the method)

VOCAB = 128


def tiny_llama_config(**overrides):
    # widths are multiples of 64: bitsandbytes' CPU 4-bit kernels need that
    kwargs = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=False)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def make_tiny_llama(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_llama_config(**overrides)).eval()


def make_tiny_gpt2(seed: int = 0):
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A saved tiny Llama (fp32), so that quantized loads and AutoPeftModel can read it from disk."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama(seed=0).save_pretrained(path)
    return str(path)


def load_quantized(path: str, bits: int):
    if bits == 4:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_compute_dtype=torch.float32)
    else:
        quant = BitsAndBytesConfig(load_in_8bit=True)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.float32).eval()


def random_batch(n: int = 4, length: int = 12, seed: int = 0):
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


# ---- helpers for the tuner / export / QLoRA tests -------------------------------------------

BASE_KINDS = ("linear", "conv1d", "4bit", "8bit")  # nn.Linear (Llama), Conv1D (GPT-2), bnb 4-bit, bnb 8-bit


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    """A saved tiny GPT-2 (fp32), for AutoPeftModel loads of Conv1D models."""
    path = tmp_path_factory.mktemp("tiny-gpt2")
    make_tiny_gpt2(seed=0).save_pretrained(path)
    return str(path)


def load_base(kind: str, llama_dir: str, gpt2_dir: str):
    """The base model of one kind, read from a saved folder (so ``base_model_name_or_path`` points at it)."""
    if kind in ("linear", "conv1d"):
        path = llama_dir if kind == "linear" else gpt2_dir
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if kind in ("4bit", "8bit"):
        return load_quantized(llama_dir, int(kind[0]))
    raise ValueError(kind)


def alora_config(**overrides):
    kwargs = dict(r=4, lora_alpha=8, target_modules="all-linear")
    kwargs.update(overrides)
    return peft_alora.ALoRAConfig(**kwargs)


@torch.no_grad()
def randomize_lora_b(model, std: float = 0.05, seed: int = 0, adapter: str | None = None):
    """Give every lora_B (all slots) random values, so the adapter changes the output."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if ".lora_B." in name and (adapter is None or f".{adapter}." in name):
            param.copy_(torch.randn(param.shape, generator=generator) * std)


def make_ranks_unequal(model, adapter: str = "default", seed: int = 0):
    """Move ranks by hand: first module -> rank 0, second -> r - 1, third -> r + 2 (fresh ranks with B set)."""
    layers = dict(model.base_model.gated_layers(adapter))
    names = sorted(layers)
    generator = torch.Generator().manual_seed(seed)
    first, second, third = (layers[n] for n in names[:3])
    for slot in first.active_slots(adapter):
        first.deactivate_slot(adapter, slot)
    second.deactivate_slot(adapter, 1)
    for slot in (first.r_init[adapter], first.r_init[adapter] + 1):
        third.activate_slot(adapter, slot, generator=generator)
        with torch.no_grad():  # a fresh rank has B = 0; give it weight so the slot matters
            third.lora_B[adapter].weight[:, slot] = torch.randn(third.out_features, generator=generator) * 0.05
    return {name: layers[name].num_active(adapter) for name in names}


@torch.no_grad()
def logits_of(model, input_ids):
    return model(input_ids=input_ids).logits.float()


@pytest.fixture
def torch_single_thread():
    """Run a test with one intra-op thread: on 2 busy cores, tiny models are ~100x slower with 2 OpenMP threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def train_steps(model, input_ids, optimizer, steps: int) -> list:
    """A few plain language-modelling steps on one batch; returns the losses."""
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses
