"""What `vlmprune env` reports: the versions that matter, and a two-second check that pruning is right here.

The self-check builds a tiny random LLaVA, prunes a padded batch of two prompts with FastV under the eager and
sdpa backends, and compares the pruned forward and greedy generation (which decodes from the pruned KV cache)
with the masked reference of `vlmprune.reference`. A transformers release that changes what the engine relies
on shows up here as a failed check, in the report a user pastes into a bug report.
"""

from __future__ import annotations

import importlib.metadata
import platform
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

import vlmprune
from vlmprune.reference import positions_from_mask, reference_greedy, reference_logits
from vlmprune.testing import build_tiny_llava, build_tiny_processor, tiny_llava_config

__all__ = ["CheckResult", "declared_range", "run_self_check", "versions"]

_PACKAGES = (
    "torch",
    "transformers",
    "tokenizers",
    "huggingface-hub",
    "accelerate",
    "lmms-eval",
    "matplotlib",
    "pyarrow",
)


def versions() -> dict[str, str]:
    """Name -> version of vlmprune, Python, the platform, the packages that matter and the CUDA device, if any."""
    found = {"vlmprune": vlmprune.__version__, "python": platform.python_version(), "platform": platform.platform()}
    for package in _PACKAGES:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    if torch.cuda.is_available():
        found["cuda"] = f"{torch.version.cuda}, {torch.cuda.get_device_name()} (x{torch.cuda.device_count()})"
    else:
        found["cuda"] = "no CUDA device"
    return found


def declared_range(package: str = "transformers") -> str:
    """The version range of `package` that vlmprune's metadata declares (e.g. `>=5.4,<6`), or '' if none."""
    try:
        requirements = importlib.metadata.requires("vlmprune") or []
    except importlib.metadata.PackageNotFoundError:
        return ""
    for requirement in requirements:
        match = re.fullmatch(rf"{re.escape(package)}\s*\(?([^;)]*)\)?\s*", requirement.strip())
        if match:  # lower bounds first, as people write ranges
            specifiers = match.group(1).replace(" ", "").split(",")
            return ",".join(sorted(specifiers, key=lambda spec: not spec.startswith(">")))
    return ""


@dataclass
class CheckResult:
    name: str
    ok: bool
    detail: str = ""


def run_self_check() -> list[CheckResult]:
    """Pruned forward and generation against the masked reference, per backend, on a tiny random LLaVA (CPU)."""
    image_size, patch = 112, 14  # an 8 x 8 grid of image tokens
    config = tiny_llava_config(text_layers=4, image_size=image_size, patch_size=patch)
    processor = build_tiny_processor(image_size=image_size, patch_size=patch)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (image_size, image_size, 3), dtype=np.uint8)) for _ in range(2)]
    texts = ["USER: <image>\nwhat is the color of the car on the left ASSISTANT:", "USER: <image>\nwhere ASSISTANT:"]
    inputs = dict(processor(images=images, text=texts, return_tensors="pt", padding=True))
    method = vlmprune.build_method("fastv", layer=2, ratio=0.5)
    renumber = [False] * config.text_config.num_hidden_layers  # FastV keeps the original positions
    new_tokens = 6
    results = []
    for backend in ("eager", "sdpa"):
        model = build_tiny_llava(config, attn_implementation=backend)
        try:
            with torch.no_grad(), vlmprune.prune(model, method) as trace:
                logits = model(**inputs, position_ids=positions_from_mask(inputs["attention_mask"])).logits
            expected = reference_logits(model, inputs, trace, renumber)  # outside the block: nothing pruned
            same_logits = all(  # output_index: each output row's column in the prompt, -1 for padding
                torch.allclose(logits[b, rows >= 0], expected[b, rows[rows >= 0]], atol=2e-4, rtol=1e-4)
                for b, rows in enumerate(trace.output_index)
            )
            with torch.no_grad(), vlmprune.prune(model, method) as trace:
                generated = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
            expected_tokens = reference_greedy(model, inputs, trace, renumber, new_tokens)
            same_tokens = torch.equal(generated[:, inputs["input_ids"].shape[1] :], expected_tokens)
        except Exception as error:  # the report must finish: a crash inside transformers is itself the finding
            results.append(CheckResult(f"pruning runs ({backend})", False, f"{type(error).__name__}: {error}"))
            continue
        results.append(CheckResult(f"pruned forward equals the masked reference ({backend})", same_logits))
        results.append(CheckResult(f"pruned generation equals the masked reference ({backend})", same_tokens))
    return results
