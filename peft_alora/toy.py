"""A tiny offline world for demos, recipes and tests: a byte-level BPE tokenizer with a chat
template, a small Llama built from a config, and a synthetic instruction dataset (arithmetic
and string tasks). Nothing is downloaded."""

from __future__ import annotations

import random

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|>{{ message['content'] }}\n"
    "{% elif message['role'] == 'system' %}<|system|>{{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{% generation %}{{ message['content'] }}</s>"
    "{% endgeneration %}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]


def _task(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(4)
    a, b = rng.randrange(100), rng.randrange(100)
    if kind == 0:
        return f"What is {a} plus {b}?", str(a + b)
    if kind == 1:
        return f"What is {a} times {b % 10}?", str(a * (b % 10))
    word = "".join(rng.choice("abcdefghij") for _ in range(rng.randrange(3, 8)))
    if kind == 2:
        return f"Reverse the word {word}.", word[::-1]
    return f"Spell {word} in capitals.", word.upper()


def toy_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [_task(rng) for _ in range(n)]


def toy_dataset(n: int = 256, seed: int = 0, style: str = "conversational"):
    """A ``datasets.Dataset`` in one of TRL's formats: ``conversational`` (messages),
    ``prompt_completion`` (plain prompt/completion) or ``language_modeling`` (text)."""
    from datasets import Dataset

    pairs = toy_pairs(n, seed)
    if style == "conversational":
        rows = {"messages": [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in pairs]}
    elif style == "prompt_completion":
        rows = {"prompt": [f"Q: {q}\nA:" for q, _ in pairs], "completion": [f" {a}" for _, a in pairs]}
    elif style == "language_modeling":
        rows = {"text": [f"Q: {q}\nA: {a}" for q, a in pairs]}
    else:
        raise ValueError(f"style={style!r}: use 'conversational', 'prompt_completion' or 'language_modeling'")
    return Dataset.from_dict(rows)


def toy_tokenizer(vocab_size: int = 384):
    """Byte-level BPE trained in memory on the toy tasks (deterministic), with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [f"Q: {q}\nA: {a}" for q, a in toy_pairs(2000, seed=1234)]
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def toy_llama(vocab_size: int, hidden_size: int = 64, layers: int = 2, seed: int = 0, **overrides):
    """A small randomly initialised Llama (widths multiples of 64 so bitsandbytes' CPU 4-bit works)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    kwargs = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2)
    kwargs.update(overrides)
    return AutoModelForCausalLM.from_config(LlamaConfig(**kwargs))
