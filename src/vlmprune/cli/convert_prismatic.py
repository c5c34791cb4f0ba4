"""`vlmprune convert-prismatic`: a Prismatic VLM run (FEATHER's model) -> a transformers LLaVA model directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from vlmprune.cli._common import CommandError
from vlmprune.cli.arguments import existing_dir, existing_file, output_dir

__all__ = ["add_parser", "check", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert-prismatic",
        help="convert a Prismatic VLM checkpoint (e.g. prism-siglip-controlled+7b) to a transformers LLaVA",
        description=(
            "Write a Prismatic VLM run (RUN_DIR/config.json, RUN_DIR/checkpoints/latest-checkpoint.pt) to OUT_DIR "
            "as a LlavaForConditionalGeneration with its processor: the SigLIP tower's penultimate-block features, "
            "the GELU MLP projector, the Llama-2 language model, resize-naive images and Prismatic's prompt "
            "('In: {question}\\nOut:') as the chat template. The outputs equal Prismatic's on the same weights. "
            "OUT_DIR then works with every vlmprune command (--model OUT_DIR)."
        ),
    )
    parser.add_argument("src", type=existing_dir, metavar="RUN_DIR", help="the Prismatic run directory")
    parser.add_argument("dst", type=output_dir, metavar="OUT_DIR", help="where to write (empty or new)")
    parser.add_argument(
        "--llm",
        required=True,
        type=existing_dir,
        metavar="DIR",
        help="local Hugging Face Llama-2 directory the run was trained from (its config and tokenizer; e.g. "
        "meta-llama/Llama-2-7b-hf); its weights are not read, the checkpoint has them",
    )
    parser.add_argument(
        "--vision",
        type=existing_file,
        metavar="FILE",
        help="the timm SigLIP weights (open_clip_pytorch_model.bin of timm/ViT-SO400M-14-SigLIP-384, or a timm "
        "model.safetensors); not needed when the checkpoint has its vision_backbone (full-finetune runs)",
    )
    parser.add_argument(
        "--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16", help="dtype (default: bfloat16)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def check(args: argparse.Namespace) -> None:
    """OUT_DIR is empty or new, RUN_DIR's config names backbones that convert, its checkpoint exists (unread)."""
    from vlmprune.convert.prismatic import CHECKPOINT_PATH, read_run_config

    dst = Path(args.dst)
    if dst.is_dir() and any(dst.iterdir()):
        raise CommandError(f"OUT_DIR {dst} is not empty; give a new or empty directory")
    read_run_config(args.src)
    if not (Path(args.src) / CHECKPOINT_PATH).is_file():
        raise CommandError(f"{args.src} has no checkpoint: {CHECKPOINT_PATH} is missing")


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from vlmprune.convert.prismatic import convert_prismatic

    bars = []

    def advance(tensors: int) -> None:  # the bar starts with the first tensor: an input error prints no bar
        if not bars:
            bars.append(tqdm(desc="convert-prismatic", unit="tensor", disable=args.no_progress))
        bars[0].update(tensors)

    try:
        out = convert_prismatic(
            args.src,
            args.dst,
            llm_dir=args.llm,
            vision_weights=args.vision,
            dtype=getattr(torch, args.dtype),
            progress=advance,
        )
    finally:
        for bar in bars:
            bar.close()
    print(f"wrote {out} (LlavaForConditionalGeneration, {args.dtype}); use it as --model {out}")
    return 0
