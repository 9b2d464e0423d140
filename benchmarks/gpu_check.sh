#!/usr/bin/env bash
# The GPU checks, in one go for a short lease of one GPU: tests/test_gpu.py (4-bit merge numerics on CUDA, a bf16
# QLoRA SFT run with rounds, the FSDP2-offload refusal; the 2-GPU tests skip), then benchmarks/gpu_qlora.py at the
# 1B and 8B shapes (about 6 minutes on an H100). Logs and JSON go to the folder given (default: benchmarks/results).
#     bash benchmarks/gpu_check.sh [OUT_DIR] [extra gpu_qlora.py flags...]
set -uo pipefail
out="${1:-benchmarks/results}"
shift || true
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -c "import torch, transformers, peft, bitsandbytes; print(torch.__version__, transformers.__version__, \
peft.__version__, bitsandbytes.__version__, torch.cuda.get_device_name(0))" || exit 1
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/test_gpu.log" | tail -n 8
timeout 420 python3 benchmarks/gpu_qlora.py --workdir "${TMPDIR:-/tmp}" --rounds 1 --out "$out/gpu_qlora.json" "$@" 2>&1 \
    | grep -v "Warning\|warnings.warn\|Writing model\|Loading weights" | tee "$out/gpu_qlora.log"
