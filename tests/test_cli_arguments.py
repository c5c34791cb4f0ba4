"""Every argument of every subcommand is checked before anything runs: one `vlmprune: error:` line, exit status 2."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import pytest

from vlmprune.cli import arguments
from vlmprune.cli.main import SUBCOMMANDS, build_parser, main, module_name

NOWHERE = "/nonexistent/dir"

# {model}: a directory with a config.json (that would not load); {image}, {file}: existing files; {dir}: an empty
# directory; {trace}: a file standing for a saved trace.
GENERATE = ["generate", "--model", "{model}", "--image", "{image}", "--prompt", "hi", "--method", "fastv"]
FLOPS = ["flops", "--model", "llava-1.5-7b"]
CALIBRATE = ["calibrate", "--model", "{model}", "--images", "{dir}", "--out", "{dir}/c.json"]
EVAL = ["eval", "--model", "{model}", "--data", "{dir}", "--out", "{dir}/run"]
COMPARE = ["compare", "--model", "{model}", "--data", "{dir}", "--out", "{dir}/cmp", "--methods", "fastv"]
TRAIN = ["testbed", "train", "--out", "{dir}/tb"]

BAD = [
    # the root parser and argparse's own errors
    ([], "COMMAND"),
    (["nope"], "argument COMMAND: invalid choice: 'nope'"),
    (["methods", "--bogus"], "unrecognized arguments: --bogus"),
    (["env", "extra"], "unrecognized arguments: extra"),
    (["generate", "--method", "fastv"], "required: --model, --image, --prompt"),
    # generate
    ([*GENERATE, "--max-new-tokens", "0"], "argument --max-new-tokens: must be >= 1, got 0"),
    ([*GENERATE, "--max-new-tokens", "x"], "argument --max-new-tokens: expected an integer, got 'x'"),
    ([*GENERATE, "--save-trace", f"{NOWHERE}/t.json"], f"argument --save-trace: {NOWHERE}/t.json: its directory"),
    ([*GENERATE, "--save-trace", "{dir}"], "argument --save-trace: {dir} is a directory"),
    ([*GENERATE, "--image", "{dir}/none.png"], "argument --image: file {dir}/none.png does not exist"),
    ([*GENERATE, "--image", "{dir}/two\nlines.png"], "argument --image: file {dir}/two lines.png does not exist"),
    ([*GENERATE, "--model", "{dir}/none"], "argument --model: model directory {dir}/none does not exist"),
    ([*GENERATE, "--model", "{dir}"], "argument --model: model directory {dir} has no config.json"),
    ([*GENERATE, "--model", "{file}"], "argument --model: model path {file} is not a directory"),
    ([*GENERATE, "--method", "nope"], "argument --method: unknown method 'nope'"),
    ([*GENERATE, "--param", "ratio"], "argument --param: expected KEY=VALUE"),
    ([*GENERATE, "--device", "toaster"], "argument --device: device 'toaster' is not usable"),
    ([*GENERATE, "--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
    ([*GENERATE, "--param", "ratio=half"], "ratio must be a number, got 'half'"),  # check: against the method
    ([*GENERATE[:-1], "none", "--param", "layer=2"], "--method none takes no --param"),
    ([*GENERATE[:-1], "none", "--save-trace", "{dir}/t.json"], "--save-trace needs a pruning --method"),
    # calibrate
    ([*CALIBRATE, "--threshold", "1.5"], "argument --threshold: must be in [-1, 1], got 1.5"),
    ([*CALIBRATE, "--active-share", "0"], "argument --active-share: must be in (0, 1], got 0"),
    ([*CALIBRATE, "--num-images", "0"], "argument --num-images: must be >= 1, got 0"),
    ([*CALIBRATE[:4], "{dir}/none", *CALIBRATE[5:]], "argument --images: directory {dir}/none does not exist"),
    ([*CALIBRATE[:6], f"{NOWHERE}/c.json"], f"argument --out: {NOWHERE}/c.json: its directory"),
    # flops
    ([*FLOPS, "--method", "fastv", "--image-tokens", "0"], "argument --image-tokens: must be >= 1, got 0"),
    ([*FLOPS, "--method", "fastv", "--text-tokens", "-1"], "argument --text-tokens: cannot be negative, got -1"),
    ([*FLOPS, "--method", "fastv", "--text-tokens", "nan"], "argument --text-tokens: expected a finite number"),
    (["flops", "--model", "llava-9b", "--method", "fastv"], "argument --model: 'llava-9b' is neither a known shape"),
    ([*FLOPS, "--method", "nope"], "argument --method: unknown method 'nope'"),
    ([*FLOPS, "--trace", "{dir}/none.json"], "argument --trace: file {dir}/none.json does not exist"),
    ([*FLOPS, "--method", "fastv", "--formula", "guess"], "argument --formula: invalid choice: 'guess'"),
    ([*FLOPS, "--method", "fastv", "--schedule", "576@0"], "argument --schedule: not allowed with argument --method"),
    (FLOPS, "one of the arguments --method --schedule --trace is required"),
    ([*FLOPS, "--schedule", "576@0", "--param", "layer=2"], "--param applies to --method only"),
    ([*FLOPS, "--method", "fastv", "--param", "ratio=2"], "ratio"),
    # bench
    (["bench", "--batch", "0"], "argument --batch: every value must be >= 1, got 0"),
    (["bench", "--batch", "1,x"], "argument --batch: expected comma-separated integers >= 1 (e.g. 1,8), got 'x'"),
    (["bench", "--batch", "1,,8"], "argument --batch: expected comma-separated integers"),
    (["bench", "--repeats", "0"], "argument --repeats: must be >= 1, got 0"),
    (["bench", "--warmup", "-1"], "argument --warmup: must be >= 0, got -1"),
    (["bench", "--new-tokens", "0"], "argument --new-tokens: must be >= 1"),
    (["bench", "--text-words", "0"], "argument --text-words: must be >= 1"),
    (["bench", "--shape", "llava-99b"], "argument --shape: unknown shape 'llava-99b'; choose from"),
    (["bench", "--methods", "fastv,nope"], "argument --methods: unknown method 'nope'"),
    (["bench", "--methods", "fastv,fastv"], "argument --methods: method 'fastv' is listed twice"),
    (["bench", "--param", "ratio=0.5"], "argument --param: expected METHOD.KEY=VALUE"),
    (["bench", "--param", "nope.ratio=0.5"], "argument --param: unknown method 'nope'"),
    (["bench", "--methods", "fastv", "--param", "knn.k=3"], "--param knn.k=3 is for 'knn', which is not run here"),
    (["bench", "--methods", "fastv", "--param", "fastv.ratio=2"], "ratio"),
    (["bench", "--out", "{file}"], "argument --out: {file} is a file, not a directory"),
    (["bench", "--out", "{file}/sub"], "argument --out: cannot create {file}/sub: {file} is a file"),
    # eval
    ([*EVAL, "--limit", "-3"], "argument --limit: must be >= 1, got -3"),
    ([*EVAL, "--limit", "0"], "argument --limit: must be >= 1, got 0"),
    ([*EVAL, "--out", "{file}"], "argument --out: {file} is a file, not a directory"),
    ([*EVAL, "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    ([*EVAL, "--max-new-tokens", "0"], "argument --max-new-tokens: must be >= 1, got 0"),
    ([*EVAL, "--tasks", "refcoco,coco"], "argument --tasks: unknown task 'coco'; choose from refcoco"),
    ([*EVAL, "--tasks", ","], "argument --tasks: expected one or more comma-separated tasks"),
    ([*EVAL, "--data", "{dir}/none"], "argument --data: data path {dir}/none does not exist"),
    ([*EVAL, "--data", "coco={dir}"], "argument --data: unknown task 'coco'"),
    ([*EVAL, "--method", "nope"], "argument --method: unknown method 'nope'; available: fastv"),
    ([*EVAL, "--method", "fastv", "--param", "ratio=half"], "ratio must be a number"),
    ([*EVAL, "--param", "ratio=0.5"], "--method none takes no --param"),
    (["eval", "--model", "{model}", "--out", "{dir}/run"], "no data for task 'refcoco': give --data ROOT"),
    ([*EVAL, "--data", "ocid-ref={dir}"], "--data ocid-ref=... names a task not in --tasks refcoco"),
    ([*EVAL, "--data", "{model}"], "--data: give one ROOT (or TASK=PATH per task), got 2"),
    (["eval", "--model", "{model}", "--data", "{dir}"], "required: --out"),
    # compare
    ([*COMPARE, "--match-flops", "1.5"], "argument --match-flops: must be in [0, 1)"),
    ([*COMPARE, "--match-flops", "most"], "argument --match-flops: expected a number, got 'most'"),
    ([*COMPARE, "--text-tokens", "-2"], "argument --text-tokens: cannot be negative"),
    ([*COMPARE, "--lmms-include", "{dir}/none"], "argument --lmms-include: directory {dir}/none does not exist"),
    ([*COMPARE, "--lmms-include", "{dir}"], "--lmms-include applies to --other-tasks only"),
    ([*COMPARE, "--param", "fastv.softmax=imag"], "softmax must be one of"),
    ([*COMPARE, "--param", "knn.k=3"], "--param knn.k=3 is for 'knn', which is not run here"),
    # viz
    (["viz", "--run", "{dir}", "--samples", "-1"], "argument --samples: must be >= 0, got -1"),
    (["viz", "--run", "{dir}/none"], "argument --run: {dir}/none does not exist"),
    (["viz", "--run", "{dir}", "--trace", "{trace}"], "argument --trace: not allowed with argument --run"),
    (["viz", "--trace", "{dir}/none.json"], "argument --trace: file {dir}/none.json does not exist"),
    (["viz", "--trace", "{trace}", "--sample", "-1"], "argument --sample: must be >= 0, got -1"),
    (["viz", "--trace", "{trace}", "--box", "0,0,2,2"], "argument --box: expected x1,y1,x2,y2 normalised to 0..1"),
    (["viz", "--trace", "{trace}", "--box", "0,0,1"], "argument --box: expected x1,y1,x2,y2"),
    (["viz", "--trace", "{trace}", "--frame", "fit"], "argument --frame: invalid choice: 'fit'"),
    (["viz", "--trace", "{trace}", "--out", "{file}"], "argument --out: {file} is a file, not a directory"),
    (["viz", "--run", "{dir}", "--image", "{image}"], "--image applies to --trace only"),
    (["viz", "--trace", "{trace}", "--task", "refcoco"], "--task applies to --run only"),
    (["viz", "--trace", "{trace}", "--out", "{dir}/v"], "--trace needs --image"),
    # testbed
    (["testbed"], "required: ACTION"),
    (["testbed", "fit"], "argument ACTION: invalid choice: 'fit'"),
    ([*TRAIN, "--threads", "0"], "argument --threads: must be >= 1, got 0"),
    ([*TRAIN, "--minutes", "0"], "argument --minutes: must be > 0, got 0"),
    ([*TRAIN, "--minutes", "-5"], "argument --minutes: must be > 0, got -5"),
    ([*TRAIN, "--seed", "-1"], "argument --seed: must be >= 0, got -1"),
    ([*TRAIN, "--set", "lm_batch"], "argument --set: expected KEY=VALUE"),
    ([*TRAIN, "--from", "{dir}/none.pt"], "argument --from: file {dir}/none.pt does not exist"),
    ([*TRAIN, "--device", "toaster"], "argument --device: device 'toaster' is not usable"),
    (["testbed", "train", "--out", "{file}"], "argument --out: {file} is a file, not a directory"),
    ([*TRAIN, "--set", "bogus=1"], "--set: unknown TrainConfig field(s) bogus"),
    ([*TRAIN, "--set", "lm_batch=0"], "--set: invalid training configuration: lm_batch"),
    (["testbed", "eval", "--limit", "0"], "argument --limit: must be >= 1, got 0"),
    (["testbed", "eval", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["testbed", "eval", "--threads", "-2"], "argument --threads: must be >= 1, got -2"),
    (["testbed", "eval", "--split", "val"], "argument --split: invalid choice: 'val'"),
    (["testbed", "eval", "--model", "{dir}"], "argument --model: no model in {dir} (config.json missing); train"),
    (["testbed", "eval", "--json", f"{NOWHERE}/r.json"], "argument --json: "),
    (["testbed", "export", "--run", "{dir}/none"], "argument --run: directory {dir}/none does not exist"),
    (["testbed", "export", "--run", "{dir}"], "--run {dir} has no model/"),
    (["testbed", "export", "--run", "{dir}", "--dest", "{file}"], "argument --dest: {file} is a file"),
    (["testbed", "curve", "{dir}/none.jsonl"], "argument LOG: file {dir}/none.jsonl does not exist"),
    (["testbed", "curve", "{file}", "--out", "{dir}"], "argument --out: {dir} is a directory; give a file name"),
    # demo
    (["demo", "--limit", "0"], "argument --limit: must be >= 1, got 0"),
    (["demo", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["demo", "--timing-rounds", "0"], "argument --timing-rounds: must be >= 1, got 0"),
    (["demo", "--model", "{dir}/none"], "argument --model: {dir}/none does not exist; train one with `vlmprune"),
    (["demo", "--out", "{file}"], "argument --out: {file} is a file, not a directory"),
    (["demo", "--json", "{dir}"], "argument --json: {dir} is a directory; give a file name"),
    (["convert-prismatic", "{dir}", "{dir}/out"], "required: --llm"),
    (["convert-prismatic", NOWHERE, "{dir}/out", "--llm", "{dir}"], f"argument RUN_DIR: directory {NOWHERE} does not"),
    (["convert-prismatic", "{dir}", "{file}", "--llm", "{dir}"], "argument OUT_DIR: {file} is a file, not a directory"),
    (["convert-prismatic", "{dir}", "{dir}/o", "--llm", "{dir}", "--vision", "{dir}"], "argument --vision: {dir} is a"),
    (["convert-prismatic", "{dir}", "{dir}/o", "--llm", "{dir}", "--dtype", "int8"], "argument --dtype: invalid"),
    (["convert-prismatic", "{dir}", "{dir}/o", "--llm", "{dir}"], "{dir} is not a Prismatic run directory: it has"),
    (["convert-prismatic", "{dir}", "{model}", "--llm", "{dir}"], "OUT_DIR {model} is not empty"),
]


@pytest.fixture
def places(tmp_path: Path) -> dict[str, str]:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    empty = tmp_path / "empty"
    empty.mkdir()
    for name in ("image.png", "file.txt", "trace.json"):
        (tmp_path / name).write_text("x")
    return {
        "model": str(model),
        "dir": str(empty),
        "image": str(tmp_path / "image.png"),
        "file": str(tmp_path / "file.txt"),
        "trace": str(tmp_path / "trace.json"),
    }


@pytest.fixture
def nothing_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every subcommand's `run` and every model loader fail the test if called: the checks come first."""

    def forbidden(*args: object, **kwargs: object) -> None:
        pytest.fail("the command went past its argument checks")

    import transformers

    import vlmprune.cli._common
    import vlmprune.testbed.model

    for name in SUBCOMMANDS:
        module = importlib.import_module(module_name(name))
        monkeypatch.setattr(module, "run", forbidden)
        if hasattr(module, "load_model"):
            monkeypatch.setattr(module, "load_model", forbidden)
    monkeypatch.setattr(vlmprune.cli._common, "load_model", forbidden)
    monkeypatch.setattr(vlmprune.testbed.model, "load_testbed", forbidden)
    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", forbidden)
    monkeypatch.setattr(transformers.LlavaForConditionalGeneration, "_from_config", forbidden)


def _fill(text: str, places: dict[str, str]) -> str:
    return text.format(**places) if "{" in text else text


@pytest.mark.parametrize(("argv", "expected"), BAD, ids=[" ".join(argv) or "(nothing)" for argv, _ in BAD])
@pytest.mark.usefixtures("nothing_runs")
def test_a_bad_argument_is_one_line_and_exit_2_before_anything_runs(
    argv: list[str], expected: str, places: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    code = main([_fill(arg, places) for arg in argv])
    captured = capsys.readouterr()
    assert code == 2, captured
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlmprune: error: "), captured.err
    assert _fill(expected, places) in lines[0], lines[0]


def test_the_table_covers_every_subcommand() -> None:
    assert set(SUBCOMMANDS) <= {argv[0] for argv, _ in BAD if argv}


@pytest.mark.parametrize("argv", [["--help"], ["bench", "--help"], ["testbed", "train", "-h"], ["eval", "--help"]])
def test_help_still_prints_the_usage(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("usage: vlmprune") and captured.err == ""


# Arguments whose value is free text by nature: a question, a dataset split or lmms-eval task names checked by
# the loader, a schedule checked against the model's shape, names that filter records.
FREE_TEXT = {
    ("generate", "--prompt"),
    ("eval", "--split"),
    ("compare", "--split"),
    ("compare", "--other-tasks"),
    ("flops", "--schedule"),
    ("viz", "--method"),
    ("viz", "--task"),
}


def _arguments(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _arguments(sub, (*path, name))
        elif action.nargs != 0 and not isinstance(action, argparse._HelpAction):
            yield path, action


def test_every_argument_of_every_subcommand_is_declared_with_a_checking_type() -> None:
    unchecked = []
    for path, action in _arguments(build_parser()):
        name = action.option_strings[-1] if action.option_strings else action.dest
        if action.type is None and action.choices is None and (path[0], name) not in FREE_TEXT:
            unchecked.append(f"{' '.join(path)} {name}")
    assert not unchecked, f"declare these with a type from vlmprune.cli.arguments: {unchecked}"


def test_every_parser_reports_errors_in_one_line() -> None:
    parsers = [build_parser()]
    for parser in parsers:
        assert isinstance(parser, arguments.ArgumentParser)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
    assert len(parsers) == 1 + len(SUBCOMMANDS) + 4  # the root, each subcommand, testbed's four actions


@pytest.mark.parametrize(
    ("parse", "text", "value"),
    [
        (arguments.positive_int, "3", 3),
        (arguments.non_negative_int, "0", 0),
        (arguments.positive_float, "0.5", 0.5),
        (arguments.non_negative_float, "0", 0.0),
        (arguments.unit_fraction, "0.64", 0.64),
        (arguments.positive_int_list, " 1, 8 ", [1, 8]),
        (arguments.method_list, "fastv,pdrop", "fastv,pdrop"),
        (arguments.method_or_none_name, "None", "None"),
        (arguments.task_list, "refcoco,ocid-ref", "refcoco,ocid-ref"),
        (arguments.method_key_value, "fastv.layers=[2, 4]", "fastv.layers=[2, 4]"),
        (arguments.shape_ref, "llava-hf/llava-1.5-7b-hf", "llava-hf/llava-1.5-7b-hf"),
        (arguments.model_ref, "llava-hf/llava-1.5-7b-hf", "llava-hf/llava-1.5-7b-hf"),
        (arguments.box, "0,0.25,1,0.5", (0.0, 0.25, 1.0, 0.5)),
        (arguments.device, "cpu", "cpu"),
    ],
)
def test_good_values_pass_the_types(parse, text: str, value: object) -> None:
    assert parse(text) == value


def test_output_types_accept_what_can_be_written(tmp_path: Path) -> None:
    (tmp_path / "old.json").write_text("{}")
    assert arguments.output_file(str(tmp_path / "old.json")) == str(tmp_path / "old.json")  # overwritten
    assert arguments.output_file(str(tmp_path / "new.json")) == str(tmp_path / "new.json")
    assert arguments.output_path(str(tmp_path / "a" / "b" / "t.json"))  # its directories are made
    assert arguments.output_dir(str(tmp_path / "a" / "b"))
    assert arguments.output_dir(str(tmp_path))
    with pytest.raises(argparse.ArgumentTypeError, match="its directory"):
        arguments.output_file(str(tmp_path / "a" / "t.json"))
    with pytest.raises(argparse.ArgumentTypeError, match="empty"):
        arguments.output_dir("")
