"""`vlmprune calibrate`: measure where a model's layers change the image tokens and propose BTP's pruning layers."""

from __future__ import annotations

import argparse
import os
import random

from vlmprune.calibrate import DEFAULT_ACTIVE_SHARE, DEFAULT_IMAGES, DEFAULT_STAGES, DEFAULT_THRESHOLD
from vlmprune.cli._common import CommandError, add_loading_args, load_model
from vlmprune.cli.arguments import existing_dir, model_ref, non_negative_int, number_in, output_file, positive_int

__all__ = ["IMAGE_SUFFIXES", "add_parser", "pick_images", "run"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "calibrate",
        help="calibrate Balanced Token Pruning's layers on a few images",
        description=(
            "Run the unpruned model on a few images, count per decoder layer the image tokens whose hidden state "
            "the layer turns by a cosine similarity below the threshold, and propose the layers where BTP prunes "
            "(Balanced Token Pruning, arXiv 2505.22038). Use the file with `--method btp --param calibration=FILE`."
        ),
    )
    parser.add_argument("--model", required=True, type=model_ref, metavar="ID_OR_DIR", help="Hub id or local directory")
    parser.add_argument(
        "--images", required=True, type=existing_dir, metavar="DIR", help="directory of images (png, jpg, ...)"
    )
    parser.add_argument(
        "--out", required=True, type=output_file, metavar="FILE", help="where to write the calibration (JSON)"
    )
    parser.add_argument(
        "--num-images",
        type=positive_int,
        default=DEFAULT_IMAGES,
        metavar="N",
        help=f"images measured, drawn at random when DIR has more (default {DEFAULT_IMAGES}, the paper's)",
    )
    parser.add_argument(
        "--threshold",
        type=number_in(-1.0, 1.0),
        default=DEFAULT_THRESHOLD,
        metavar="TAU",
        help=f"a token changes when cos(layer input, layer output) < TAU (default {DEFAULT_THRESHOLD})",
    )
    parser.add_argument(
        "--stages",
        type=positive_int,
        default=DEFAULT_STAGES,
        help=f"pruning layers to propose, the last dropping every image token (default {DEFAULT_STAGES})",
    )
    parser.add_argument(
        "--active-share",
        type=number_in(0.0, 1.0, low_open=True),
        default=DEFAULT_ACTIVE_SHARE,
        metavar="SHARE",
        help=f"a layer is active when it changes at least this share of the tokens (default {DEFAULT_ACTIVE_SHARE})",
    )
    parser.add_argument(
        "--seed", type=non_negative_int, default=0, help="seed of the random draw of images (default 0)"
    )
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_loading_args(parser)
    parser.set_defaults(run=run)


def pick_images(directory: str, count: int, seed: int) -> list[str]:
    """Up to `count` image files of `directory` (names, sorted), drawn at random with `seed` when it has more."""
    names = sorted(n for n in os.listdir(directory) if n.lower().endswith(IMAGE_SUFFIXES))
    if not names:
        raise CommandError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {directory}")
    if len(names) > count:
        names = sorted(random.Random(seed).sample(names, count))
    return names


def run(args: argparse.Namespace) -> int:
    from vlmprune.calibrate import calibrate
    from vlmprune.cli.generate import load_image

    names = pick_images(args.images, args.num_images, args.seed)
    images = [load_image(os.path.join(args.images, name)) for name in names]
    processor, model = load_model(args.model, device=args.device, dtype=args.dtype, attn=args.attn)

    from tqdm.auto import tqdm

    with tqdm(total=len(images), desc="calibrate", unit="image", disable=args.no_progress) as bar:
        result = calibrate(
            model,
            processor,
            images,
            model_name=args.model,
            image_dir=os.path.abspath(args.images),
            image_files=names,
            threshold=args.threshold,
            stages=args.stages,
            active_share=args.active_share,
            batch_size=args.batch_size,
            progress=bar.update,
        )
    try:
        result.save(args.out)
    except OSError as error:
        raise CommandError(f"cannot write {args.out}: {error}") from None
    tokens = f" of {result.image_tokens}" if result.image_tokens else ""
    print(f"image tokens per image with cos(input, output) < {result.threshold:g}, over {len(names)} images:")
    for layer, (count, share) in enumerate(zip(result.changed_tokens, result.changed_share, strict=True)):
        print(f"  layer {layer:3d}  {count:8.1f}{tokens}  ({share:.1%})")
    print(f"calibration written to {args.out}")
    if result.layers is None:
        raise CommandError(f"no pruning layers proposed: {result.note}")
    print(f"proposed BTP layers: {list(result.layers)} (the last drops every image token)")
    print(f"use them with: --method btp --param calibration={args.out}")
    return 0
