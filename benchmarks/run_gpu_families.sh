#!/usr/bin/env bash
# The GPU benchmark of the baselines and the other families: random-weight 7B-shaped models in bf16 on CUDA,
# eager. LLaVA-1.5-7B with every baseline at batch 1 and 8; LLaVA-NeXT-7B (5 crops, 2880 image tokens) and
# Qwen2.5-VL-7B (1024 image tokens) with a method of each kind at batch 1. Writes
# benchmarks/results/gpu/{baselines,llava-next,qwen2.5-vl}/bench.{json,md} with the device and versions.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bench() { "${PYTHON:-python}" -m vlmprune.cli.main bench --new-tokens 32 --device cuda --dtype bfloat16 \
    --attn sdpa --repeats 10 --warmup 2 --no-original-fastv "$@"; }
bench --shape llava-1.5-7b --methods fastv,fastervlm,divprune,dart,cdpruner,visionzip,pooling,sparsevlm \
    --batch 1,8 --out benchmarks/results/gpu/baselines
bench --shape llava-next-7b --methods fastv,pdrop,vispruner,visionzip,dart --batch 1 \
    --out benchmarks/results/gpu/llava-next
bench --shape qwen2.5-vl-7b --methods fastv,pdrop,vispruner,visionzip,dart --batch 1 \
    --out benchmarks/results/gpu/qwen2.5-vl
