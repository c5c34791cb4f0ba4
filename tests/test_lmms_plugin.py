"""lmms-eval runs a task end to end with the vlmprune model (a local dataset, a tiny random model)."""

from __future__ import annotations

import json
import textwrap

import pytest

lmms_eval = pytest.importorskip("lmms_eval", reason="lmms-eval is an optional extra")

TASK_YAML = """
task: vlmprune_smoke
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  until: ["\\n"]
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""

TASK_UTILS = """
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc):
    return doc["question"] + " Answer with one word."
"""


@pytest.fixture()
def smoke_task(tmp_path):
    from conftest import random_image

    rows = []
    for i in range(4):
        path = tmp_path / f"image{i}.png"
        random_image(i).save(path)
        rows.append({"image": str(path), "question": "what color is the cat", "answer": "red"})
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    (task_dir / "vlmprune_smoke.yaml").write_text(TASK_YAML.format(data=data))
    (task_dir / "utils.py").write_text(textwrap.dedent(TASK_UTILS))
    return task_dir


def test_lmms_eval_runs_a_task_with_a_pruned_model(small_model_dir, smoke_task, monkeypatch):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.models import get_model
    from lmms_eval.tasks import TaskManager

    from vlmprune.eval.lmms_plugin import VlmpruneLMM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert get_model("vlmprune") is VlmpruneLMM  # found through the entry point, no registration by hand
    results = simple_evaluate(
        model="vlmprune",
        model_args=f"pretrained={small_model_dir},method=fastv,ratio=0.75,layer=2",
        tasks=["vlmprune_smoke"],
        task_manager=TaskManager(include_path=str(smoke_task)),
        batch_size=2,
        device="cpu",
        log_samples=True,
    )
    task = results["results"]["vlmprune_smoke"]
    assert 0.0 <= task["exact_match,none"] <= 1.0
    assert len(results["samples"]["vlmprune_smoke"]) == 4


def test_the_lmms_eval_model_prunes_as_its_model_args_say(small_model_dir, smoke_task, monkeypatch):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from vlmprune.eval.lmms_plugin import VlmpruneLMM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model = VlmpruneLMM.create_from_arg_string(f"pretrained={small_model_dir},method=feather,layers=[2,4],batch_size=2")
    simple_evaluate(model=model, tasks=["vlmprune_smoke"], task_manager=TaskManager(include_path=str(smoke_task)))
    assert len(model.last_traces) == 2  # 4 documents in batches of 2
    assert all([s["layer"] for s in t["stages"]] == [2, 4] for t in model.last_traces)
