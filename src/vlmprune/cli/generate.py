"""`vlmprune generate`: answer one prompt about one image with a pruned model, and say what was kept."""

from __future__ import annotations

import argparse
import json

from vlmprune.cli._common import (
    CommandError,
    add_budget_scope_arg,
    add_loading_args,
    add_model_arg,
    load_model,
    method_or_none,
    parse_params,
)
from vlmprune.cli.arguments import existing_file, key_value, method_or_none_name, output_file, positive_int

__all__ = ["add_parser", "build_prompt", "check", "load_image", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate an answer about one image with a pruning method",
        description=(
            "Load a Hugging Face VLM, answer PROMPT about IMAGE with greedy decoding inside "
            "`vlmprune.prune(model, method)`, and print the answer and the image tokens each stage kept."
        ),
    )
    add_model_arg(parser)
    parser.add_argument(
        "--image", required=True, type=existing_file, metavar="FILE", help="image file (any format PIL reads)"
    )
    parser.add_argument(
        "--prompt",
        required=True,
        metavar="TEXT",
        help="question; wrapped in the processor's chat template unless it already contains the image token",
    )
    parser.add_argument(
        "--method",
        required=True,
        type=method_or_none_name,
        metavar="NAME",
        help="method name (see `vlmprune methods`), or `none`",
    )
    parser.add_argument(
        "--param",
        type=key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a method parameter, repeatable; VALUE is a Python literal or a bare string "
        "(e.g. --param layer=3 --param ratio=0.75 --param layers=[8,16])",
    )
    add_budget_scope_arg(parser)
    parser.add_argument("--max-new-tokens", type=positive_int, default=32, metavar="N")
    add_loading_args(parser)
    parser.add_argument(
        "--save-trace",
        type=output_file,
        metavar="FILE",
        help="write the trace as JSON (kept tokens per stage, tokens per layer); needs a pruning --method",
    )
    parser.set_defaults(run=run)


def check(args: argparse.Namespace) -> None:
    """The method with its parameters; a trace to save needs a method that prunes."""
    method = method_or_none(args.method, parse_params(args.param))
    if method is None and args.save_trace:
        raise CommandError("--save-trace needs a pruning --method: --method none records no trace")


def run(args: argparse.Namespace) -> int:
    method = method_or_none(args.method, parse_params(args.param))
    image = load_image(args.image)
    processor, model = load_model(args.model, device=args.device, dtype=args.dtype, attn=args.attn)

    prompt = build_prompt(processor, args.prompt)
    image_token = getattr(processor, "image_token", None) or "<image>"
    if prompt.count(image_token) != 1:
        raise CommandError(
            f"the prompt does not fit the image: it has {prompt.count(image_token)} {image_token} placeholders "
            "for the one --image"
        )
    try:
        inputs = processor(images=image, text=prompt, return_tensors="pt").to(model.device)
    except ValueError as error:  # e.g. two <image> placeholders for the one --image
        raise CommandError(f"the prompt does not fit the image: {error}") from None
    if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    generate_kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": False}

    if method is None:
        output = model.generate(**inputs, **generate_kwargs)
        trace = None
    else:
        from vlmprune import prune

        with prune(model, method, budget_scope=args.budget_scope) as trace:
            output = model.generate(**inputs, **generate_kwargs)

    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    answer = processor.batch_decode(new_tokens, skip_special_tokens=True)[0].strip()
    print(answer)
    print(f"--- method: {args.method}" + (f" ({method})" if method is not None else ""))
    if trace is None:
        image_token_id = getattr(model.config, "image_token_id", None)
        if image_token_id is not None:
            n_image = int((inputs["input_ids"][0] == image_token_id).sum())
            print(f"no pruning: all {n_image} image tokens kept")
        else:
            print("no pruning")
    else:
        print(trace.summary())
        if args.save_trace:
            try:
                with open(args.save_trace, "w") as handle:
                    json.dump(trace.to_dict(), handle)
            except OSError as error:
                raise CommandError(f"cannot write the trace to {args.save_trace}: {error}") from None
            print(f"trace written to {args.save_trace}")
    return 0


def load_image(path: str):
    """The image at `path` as an RGB PIL image; a `CommandError` if it is missing or unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise CommandError(f"cannot read image {path}: {error}") from None


def build_prompt(processor, text: str) -> str:
    """The prompt text given to the processor.

    A prompt that already contains the processor's image token is used as written. Otherwise the
    processor's chat template (one user turn: the image, then `text`) is applied when it has one, and
    `"<image>\\n"` is prefixed when it has none.
    """
    image_token = getattr(processor, "image_token", None) or "<image>"
    if image_token in text:
        return text
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return f"{image_token}\n{text}"
