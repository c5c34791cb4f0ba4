"""Time one language-model-stage training step of the testbed model at each precision (`--precision`).

    .venv/bin/python benchmarks/testbed_step.py [--threads 2] [--steps 6] [--json PATH]

The default model and LM-stage recipe (batch 16, 4 box and 4 other questions per image), fresh weights, the same
batch every step (rendered once, outside the timing). Prints seconds per step and the ratio to float32, and writes
them with the machine's description to JSON (default `benchmarks/results/testbed_training/step_precision.json`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import torch
import transformers

from vlmprune.testbed.train import PRECISIONS, TrainConfig, Trainer

DEFAULT_JSON = os.path.join(os.path.dirname(__file__), "results", "testbed_training", "step_precision.json")


def seconds_per_step(precision: str, steps: int, out: str) -> float:
    trainer = Trainer(out, TrainConfig(vision_images=0), log=None, precision=precision)  # starts in the LM stage
    batch = trainer.batcher.lm_batch(0)
    trainer._next_batch = lambda: batch  # the step's compute only: rendering is the workers' job
    trainer._train_step()  # warm-up (allocations, oneDNN kernel choice)
    started = time.perf_counter()
    for _ in range(steps):
        trainer._train_step()
    return (time.perf_counter() - started) / steps


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo where there is one (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--json", default=DEFAULT_JSON)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as out:
        seconds = {p: seconds_per_step(p, args.steps, os.path.join(out, p)) for p in PRECISIONS}
    for precision, value in seconds.items():
        print(f"{precision}: {value:.3f} s per LM step, {seconds['fp32'] / value:.2f}x float32's speed")
    result = {
        "command": f"python benchmarks/testbed_step.py --threads {args.threads} --steps {args.steps}",
        "machine": f"{cpu_name()}, {args.threads} torch threads",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "seconds_per_step": {p: round(v, 4) for p, v in seconds.items()},
        "speedup_over_fp32": {p: round(seconds["fp32"] / v, 3) for p, v in seconds.items()},
    }
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as handle:
        json.dump(result, handle, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
