#!/usr/bin/env bash
# The baselines' CPU benchmark committed in benchmarks/results/baselines-cpu: the llava-cpu-mid layout (576 image
# tokens, 32 layers, a narrow LLM, random weights) at batch 1, each method at its defaults next to FastV. Prints
# ratios (measured and ideal prefill speed-up, selection share); writes bench.json and bench.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec .venv/bin/vlmprune bench --shape llava-cpu-mid \
    --methods fastv,fastervlm,divprune,dart,cdpruner,visionzip,pooling,sparsevlm --batch 1 --repeats 5 \
    --no-original-fastv --device cpu --dtype float32 --attn sdpa --out benchmarks/results/baselines-cpu "$@"
