"""`vlmprune testbed`: train the grounding testbed model, or evaluate one (both accuracies, unpruned)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import time

from vlmprune.cli._common import CommandError, parse_params
from vlmprune.cli.arguments import (
    device,
    existing_dir,
    existing_file,
    key_value,
    non_negative_int,
    output_dir,
    output_file,
    output_path,
    positive_float,
    positive_int,
    testbed_model_dir,
)

__all__ = ["add_parser", "check", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "testbed",
        help="train or evaluate the tiny grounding testbed model",
        description="The offline grounding testbed: a tiny LLaVA trained on procedural scenes.",
    )
    actions = parser.add_subparsers(dest="testbed_command", metavar="ACTION", required=True)

    train = actions.add_parser(
        "train",
        help="train the testbed model (resumable)",
        description=(
            "Train the testbed model from a seed: dense per-patch supervision of the vision tower, then the "
            "projector and language model on questions. Checkpoints every few minutes into OUT; --resume "
            "continues an interrupted run exactly where it stopped. Logs both accuracies to OUT/log.jsonl."
        ),
    )
    train.add_argument(
        "--out", required=True, type=output_dir, metavar="DIR", help="run directory (checkpoint, log, model/)"
    )
    train.add_argument("--minutes", type=positive_float, metavar="M", help="stop (with a checkpoint) after M minutes")
    train.add_argument(
        "--fit-minutes",
        type=positive_float,
        metavar="M",
        help="set the language-model stage's length so the run ends about M minutes after this call starts, at "
        "the throughput measured in the stage (logged; the result equals a run configured so; for a GPU lent for "
        "a fixed time)",
    )
    train.add_argument("--seed", type=non_negative_int, default=0, help="run seed (default: 0); ignored with --resume")
    train.add_argument("--resume", action="store_true", help="continue the run in DIR if it has a checkpoint")
    train.add_argument("--threads", type=positive_int, metavar="N", help="torch CPU threads (default: torch's choice)")
    train.add_argument("--device", type=device, default="cpu", help="torch device (default: cpu)")
    train.add_argument(
        "--workers",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="processes rendering the next batches while a step runs (default: 0, rendered in the step); the "
        "result is the same with any number",
    )
    train.add_argument(
        "--precision",
        choices=("bf16", "fp32"),  # testbed.train.PRECISIONS, not imported: parsing loads no torch
        help="what the training steps compute in, weights staying float32 (default: bf16 on CUDA, fp32 on CPU; "
        "bf16 on a CPU with AVX-512 BF16 takes about three quarters of the time)",
    )
    train.add_argument(
        "--batch-scale",
        type=positive_int,
        default=1,
        metavar="K",
        help="a new run's batches K times larger, learning rates times sqrt(K), warm-up K times shorter in steps "
        "(for a GPU; default: 1)",
    )
    train.add_argument(
        "--set",
        type=key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a TrainConfig field for a new run, repeatable (e.g. --set lm_batch=8 "
        "--set \"model={'text_layers': 2}\"); with --resume only fields that keep the run equal to one "
        "configured so from the start (see Trainer.reconfigure)",
    )
    train.add_argument(
        "--from",
        dest="start_from",
        type=existing_file,
        metavar="CHECKPOINT",
        help="start DIR from another run's checkpoint (e.g. RUN/checkpoint-vision.pt, to try LM-stage settings "
        "given with --set)",
    )
    train.add_argument("--max-steps", type=non_negative_int, metavar="N", help=argparse.SUPPRESS)  # tests
    train.set_defaults(run=run)

    evaluate = actions.add_parser(
        "eval",
        help="evaluate a testbed model (unpruned)",
        description="Localization Acc@IoU>=0.5 and other-question accuracy of the unpruned model, greedy decoding.",
    )
    evaluate.add_argument(
        "--model", type=testbed_model_dir, metavar="DIR", help="model directory (default: the shipped checkpoint)"
    )
    evaluate.add_argument("--split", choices=("test", "train"), default="test", help="scene split (default: test)")
    evaluate.add_argument(
        "--limit", type=positive_int, default=500, metavar="N", help="number of scenes (default: 500)"
    )
    evaluate.add_argument("--batch-size", type=positive_int, default=32, metavar="N")
    evaluate.add_argument(
        "--threads", type=positive_int, metavar="N", help="torch CPU threads (default: torch's choice)"
    )
    evaluate.add_argument(
        "--dependence",
        action="store_true",
        help="also measure localization with every patch of the asked-about object dropped, with as many other "
        "patches dropped, and with one of the object's patches left (the first min(N, 100) scenes)",
    )
    evaluate.add_argument(
        "--probe",
        action="store_true",
        help="also read one object's colour and shape with linear probes at each site of the model (tower, "
        "projector, each language-model layer), next to its answers (600 one-object scenes)",
    )
    evaluate.add_argument("--json", type=output_file, metavar="FILE", help="also write the result as JSON")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")
    evaluate.set_defaults(run=run)

    export = actions.add_parser(
        "export",
        help="copy a run's model, training log and command into the package's checkpoint directory",
        description=(
            "Copy RUN/model (fp16 weights, config, processor) with RUN's log.jsonl, command.txt and config.json "
            "(as training_log.jsonl, training_command.txt, training_config.json) into DEST, by default the "
            "package data directory that `load_testbed()` reads. Refuses more than 30 MB."
        ),
    )
    export.add_argument(
        "--run",
        dest="run_dir",
        required=True,
        type=existing_dir,
        metavar="DIR",
        help="a `testbed train` output directory",
    )
    export.add_argument(
        "--dest", type=output_dir, metavar="DIR", help="destination (default: vlmprune/testbed/checkpoint)"
    )
    export.set_defaults(run=run)

    curve = actions.add_parser(
        "curve",
        help="plot a run's held-out accuracies against images seen",
        description="Draw localization and other-question accuracy (and each question kind) from a training log.",
    )
    curve.add_argument(
        "log", type=existing_file, metavar="LOG", help="a run's log.jsonl (or a shipped training_log.jsonl)"
    )
    curve.add_argument(
        "--out", type=output_path, default="training_curve.png", metavar="PNG", help="(default: training_curve.png)"
    )
    curve.set_defaults(run=run)


def check(args: argparse.Namespace) -> None:
    """`train`: the `--set` fields, and what --out holds against --resume / --from; `export`: a run with a model."""
    if args.testbed_command == "train":
        _check_train(args)
    elif args.testbed_command == "export" and not os.path.isfile(os.path.join(args.run_dir, "model", "config.json")):
        raise CommandError(
            f"--run {args.run_dir} has no model/ (run `vlmprune testbed train --out {args.run_dir}` first)"
        )


def _check_train(args: argparse.Namespace) -> None:
    from vlmprune.testbed.train import TrainConfig

    overrides = parse_params(args.set)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise CommandError(
            f"--set: unknown TrainConfig field(s) {', '.join(unknown)}; valid: {', '.join(sorted(fields))}"
        )
    held = os.path.exists(os.path.join(args.out, "checkpoint.pt"))
    if held and args.start_from is not None:
        raise CommandError(f"{args.out} already holds a run; --from starts a new run in an empty directory")
    if (held or args.start_from is not None) and args.batch_scale != 1:
        raise CommandError("--batch-scale sets up a new run; a resumed or --from run keeps its own batches")
    if held and not args.resume:
        raise CommandError(f"{args.out} already holds a run; pass --resume to continue it, or another --out")
    if not held and args.start_from is None:  # a new run: its configuration (a resumed one is checked on load)
        _new_config(args, overrides)


def _new_config(args: argparse.Namespace, overrides: dict[str, object]):
    from vlmprune.testbed.train import TrainConfig, scaled_recipe

    try:
        config = TrainConfig(**{**overrides, "seed": overrides.get("seed", args.seed)})  # type: ignore[arg-type]
        return scaled_recipe(config, args.batch_scale)
    except (TypeError, ValueError) as error:
        raise CommandError(f"--set: invalid training configuration: {error}") from None


def run(args: argparse.Namespace) -> int:
    import torch

    if getattr(args, "threads", None) is not None:
        torch.set_num_threads(args.threads)
    if args.testbed_command == "train":
        return _train(args)
    if args.testbed_command == "export":
        return _export(args)
    if args.testbed_command == "curve":
        return _curve(args)
    return _eval(args)


def _train(args: argparse.Namespace) -> int:
    from vlmprune.testbed.train import Trainer

    overrides = parse_params(args.set)
    os.makedirs(args.out, exist_ok=True)
    checkpoint = os.path.join(args.out, "checkpoint.pt")
    with open(os.path.join(args.out, "command.txt"), "a") as handle:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        handle.write(f"{stamp} vlmprune {shlex.join(_argv(args))}\n")
    if args.start_from is not None:  # `check` made sure --out holds no run
        shutil.copyfile(args.start_from, checkpoint)
        args.resume = True
    if os.path.exists(checkpoint):  # with --resume (`check`)
        trainer = Trainer.resume(args.out, device=args.device, workers=args.workers, precision=args.precision)
        try:
            trainer.reconfigure(overrides)
        except ValueError as error:
            raise CommandError(str(error)) from None
        if args.start_from is not None:
            trainer._log({"event": "start_from", "checkpoint": os.path.abspath(args.start_from)})
        print(f"resuming {args.out}: stage {trainer.stage}, step {trainer.step}, {trainer.images} images")
    else:
        trainer = Trainer(
            args.out, _new_config(args, overrides), device=args.device, workers=args.workers, precision=args.precision
        )
    stage = trainer.run(minutes=args.minutes, max_steps=args.max_steps, fit_minutes=args.fit_minutes)
    print(f"stopped in stage {stage}; checkpoint {checkpoint}, model {os.path.join(args.out, 'model')}")
    return 0


def _argv(args: argparse.Namespace) -> list[str]:
    """The command line of this `testbed train` call, rebuilt from its parsed arguments (for command.txt)."""
    argv = ["testbed", "train", "--out", args.out, "--seed", str(args.seed)]
    if args.minutes is not None:
        argv += ["--minutes", str(args.minutes)]
    if args.fit_minutes is not None:
        argv += ["--fit-minutes", str(args.fit_minutes)]
    if args.start_from is not None:
        argv += ["--from", args.start_from]
    elif args.resume:
        argv.append("--resume")
    if args.threads is not None:
        argv += ["--threads", str(args.threads)]
    if args.device != "cpu":
        argv += ["--device", args.device]
    if args.workers:
        argv += ["--workers", str(args.workers)]
    if args.precision is not None:
        argv += ["--precision", args.precision]
    if args.batch_scale != 1:
        argv += ["--batch-scale", str(args.batch_scale)]
    for item in args.set:
        argv += ["--set", item]
    return argv


def _eval(args: argparse.Namespace) -> int:
    from vlmprune.testbed.evaluate import evaluate, prior_baseline
    from vlmprune.testbed.model import CHECKPOINT_DIR, load_testbed

    path = args.model or str(CHECKPOINT_DIR)
    try:
        processor, model = load_testbed(path)
    except (OSError, ValueError) as error:
        raise CommandError(f"cannot load testbed model {path}: {error}") from None
    start = time.time()
    from tqdm.auto import tqdm

    with tqdm(total=2 * args.limit, desc="testbed eval", unit="question", disable=args.no_progress) as bar:
        result = evaluate(
            model, processor, split=args.split, limit=args.limit, batch_size=args.batch_size, progress=bar.update
        )
    print(f"model: {path}")
    print(f"split: {args.split}, scenes: {result.n} ({time.time() - start:.1f} s)")
    prior = prior_baseline(split=args.split, limit=args.limit)
    print("                           model  (answering blind: most common training answer, mean box)")
    print(f"localization Acc@IoU>=0.5: {result.localization_acc:.3f}  ({prior.localization_acc:.3f})")
    print(f"mean IoU:                  {result.mean_iou:.3f}  ({prior.mean_iou:.3f})")
    print(f"other questions:           {result.other_acc:.3f}  ({prior.other_acc:.3f})")
    for kind, accuracy in result.per_kind.items():
        if kind != "where":
            print(f"  {kind:<24} {accuracy:.3f}  ({prior.per_kind.get(kind, 0.0):.3f})")
    record = {"model": path, "split": args.split, **result.to_dict(), "blind_prior": prior.to_dict()}
    if args.dependence:
        from vlmprune.testbed.dependence import referred_object_dependence

        dependence = referred_object_dependence(model, processor, split=args.split, limit=min(args.limit, 100))
        print(f"dependence: {dependence.summary()}")
        record["dependence"] = dataclasses.asdict(dependence)
    if args.probe:
        from vlmprune.testbed.probe import attribute_probe

        probe = attribute_probe(model, processor)
        print(probe.summary())
        record["probe"] = dataclasses.asdict(probe)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(record, handle, indent=1)
    return 0


_EXPORT_LIMIT = 30 * 2**20
_RUN_FILES = {"log.jsonl": "training_log.jsonl", "command.txt": "training_command.txt",
              "config.json": "training_config.json"}  # fmt: skip


def _export(args: argparse.Namespace) -> int:
    from vlmprune.testbed.model import CHECKPOINT_DIR

    model_dir = os.path.join(args.run_dir, "model")  # `check` found model/config.json there
    sources = {os.path.join(model_dir, name): name for name in sorted(os.listdir(model_dir))}
    sources.update(
        {
            os.path.join(args.run_dir, k): v
            for k, v in _RUN_FILES.items()
            if os.path.isfile(os.path.join(args.run_dir, k))
        }
    )
    size = sum(os.path.getsize(path) for path in sources)
    if size > _EXPORT_LIMIT:
        raise CommandError(f"the export would be {size / 2**20:.1f} MB, over the 30 MB limit")
    dest = args.dest or str(CHECKPOINT_DIR)
    os.makedirs(dest, exist_ok=True)
    for path, name in sources.items():
        shutil.copyfile(path, os.path.join(dest, name))
    print(f"exported {len(sources)} files ({size / 2**20:.1f} MB) to {dest}")
    return 0


def _curve(args: argparse.Namespace) -> int:
    from vlmprune.viz.plot import plot_training_curve, save_png

    try:
        with open(args.log) as handle:
            records = [json.loads(line) for line in handle if line.strip()]
    except OSError as error:
        raise CommandError(f"cannot read {args.log}: {error.strerror}") from error
    except json.JSONDecodeError as error:
        raise CommandError(f"{args.log} is not a JSON-lines training log: {error}") from error
    easy_images = None
    # the run's TrainConfig: config.json beside a run's log, training_config.json beside a shipped one (whose
    # config.json is the model's)
    for name in ("training_config.json", "config.json"):
        path = os.path.join(os.path.dirname(args.log), name)
        if os.path.isfile(path):
            with open(path) as handle:
                easy_images = json.load(handle).get("easy_images")
            if easy_images is not None:
                break
    try:
        figure = plot_training_curve(records, easy_images=easy_images)
    except ValueError as error:
        raise CommandError(f"{args.log}: {error}") from error
    print(f"picture: {save_png(figure, args.out)}")
    return 0
