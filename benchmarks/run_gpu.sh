#!/usr/bin/env bash
# The GPU benchmark: a LLaVA-1.5-7B-shaped model with random weights in bf16, on CUDA: eager at batch 1, 8 and
# 32, then compiled (CUDA graphs, static cache) at batch 1 with the methods whose counts are known beforehand.
# Writes benchmarks/results/gpu/{eager,compiled}/bench.{json,md} with the device, torch and transformers versions.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bench() { "${PYTHON:-python}" -m vlmprune.cli.main bench --shape llava-1.5-7b --new-tokens 32 --device cuda \
    --dtype bfloat16 --attn sdpa "$@"; }
bench --methods fastv,pdrop,feather --batch 1,8,32 --repeats 10 --warmup 2 --out benchmarks/results/gpu/eager
bench --methods fastv,pdrop,feather --param feather.top_up=true --no-original-fastv --batch 1 --repeats 10 \
    --warmup 2 --compile --out benchmarks/results/gpu/compiled
