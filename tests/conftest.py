"""Shared fixtures: tiny models built from configs (nothing is downloaded)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, GPT2Config, LlamaConfig

import peft_alora  # noqa: F401  (registers the method)
from peft_alora.model import keep_4bit_layers_differentiable

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
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.float32).eval()
    # the kernel an ALoRA-wrapped model uses (bitsandbytes' CPU inference repacking off), so that logits of a
    # plain base and of the wrapped model compare like with like
    keep_4bit_layers_differentiable(model)
    return model


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
        if (".lora_B." in name or ".lora_B_spare." in name) and (adapter is None or f".{adapter}." in name):
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
            _, weight_b, index = third.slot_parameters(adapter, slot)
            weight_b[:, index] = torch.randn(third.out_features, generator=generator) * 0.05
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


@pytest.fixture(scope="session")
def toy_chat_llama_dir(tmp_path_factory):
    """A saved tiny Llama with the toy chat tokenizer: a local model any recipe can be pointed at."""
    from peft_alora.toy import toy_llama, toy_tokenizer

    tokenizer = toy_tokenizer()
    path = tmp_path_factory.mktemp("toy-chat-llama")
    toy_llama(len(tokenizer), seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


class FakeHubApi:
    """Stands in for ``huggingface_hub.HfApi``: "uploads" into ``FakeHubApi.remote / repo_id`` with the
    same file filter the real ``upload_folder`` applies."""

    remote = None
    calls: list = []

    tokens: list = []

    def __init__(self, token=None):
        self.token = token
        FakeHubApi.tokens.append(token)

    def create_repo(self, repo_id, **kwargs):
        FakeHubApi.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, repo_id, folder_path, ignore_patterns=None, **kwargs):
        import shutil
        from pathlib import Path

        from huggingface_hub.utils import filter_repo_objects

        FakeHubApi.calls.append(("upload_folder", repo_id, kwargs))
        root = Path(folder_path)
        files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
        for rel in filter_repo_objects(files, ignore_patterns=ignore_patterns):
            target = Path(FakeHubApi.remote) / repo_id / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / rel, target)


TINY_RUN_REPO = "someone/tiny-alora"


@pytest.fixture(scope="session")
def alora_sft_run(toy_chat_llama_dir, tmp_path_factory):
    """One `alora-sft` run of the CPU default recipe pointed at the tiny local Llama, pushed to a fake Hub.

    Returns (summary, output dir, the fake Hub's copy of the repository).
    """
    from pathlib import Path
    from unittest import mock

    from peft_alora.cli import main, parse_args

    out = tmp_path_factory.mktemp("alora-sft-run")
    FakeHubApi.remote = tmp_path_factory.mktemp("fake-hub")
    FakeHubApi.tokens = []
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # the tests run offline: the fake Hub stands in for the real one, so the offline refusal is lifted
        with mock.patch("huggingface_hub.HfApi", FakeHubApi), mock.patch("huggingface_hub.constants.HF_HUB_OFFLINE", False):
            summary = main(*parse_args([
                "--config", "recipes/SmolLM2-135M-Instruct/alora_cpu.yaml", "--model_name_or_path",
                toy_chat_llama_dir, "--output_dir", str(out), "--max_steps", "6", "--per_device_train_batch_size",
                "4", "--max_length", "64", "--lora_r", "2", "--max_r", "4", "--allocation_rounds", "2",
                "--scoring_examples", "4", "--scoring_batch_size", "4",
                "--show_generations", "2", "--max_new_tokens", "6", "--logging_steps", "1", "--disable_tqdm", "true",
                "--push_to_hub", "true", "--hub_model_id", TINY_RUN_REPO, "--hub_token", "test-token"]))
    finally:
        torch.set_num_threads(previous)
    return summary, Path(out), Path(FakeHubApi.remote) / TINY_RUN_REPO
