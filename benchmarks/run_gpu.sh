#!/usr/bin/env bash
# The GPU benchmark: a LLaVA-1.5-7B-shaped model with random weights in bf16, batch 1, 8 and 32, on CUDA.
# Writes benchmarks/results/gpu/bench.{json,md} with the device, torch and transformers versions.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec "${PYTHON:-python}" -m vlmprune.cli.main bench --shape llava-1.5-7b --methods fastv,pdrop,feather --batch 1,8,32 \
    --repeats 10 --warmup 2 --new-tokens 32 --device cuda --dtype bfloat16 --attn sdpa --out benchmarks/results/gpu "$@"
