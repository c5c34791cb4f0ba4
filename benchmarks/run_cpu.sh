#!/usr/bin/env bash
# The CPU benchmark committed in benchmarks/results/cpu: a LLaVA-1.5 layout (576 image tokens, 32 layers) with a
# narrow LLM (hidden 512) and random weights, batch 1 and 8. Prints ratios; writes bench.json and bench.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec .venv/bin/vlmprune bench --shape llava-cpu-mid --methods fastv,pdrop,feather --batch 1,8 \
    --repeats 10 --warmup 1 --new-tokens 16 --device cpu --dtype float32 --attn sdpa --out benchmarks/results/cpu "$@"
