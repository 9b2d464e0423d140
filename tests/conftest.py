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
