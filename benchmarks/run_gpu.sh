#!/usr/bin/env bash
# The GPU benchmark: a LLaVA-1.5-7B-shaped model with random weights in bf16, batch 1 and 8, on CUDA.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec "${PYTHON:-python}" -m vlmprune.cli.main bench --shape llava-1.5-7b --methods fastv,pdrop,feather --batch 1,8 \
    --repeats 10 --warmup 2 --new-tokens 32 --device cuda --dtype bfloat16 --attn sdpa --out benchmarks/results/gpu "$@"
