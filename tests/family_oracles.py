"""The oracle tests every model family passes, for every registered method (imported by each family's test file).

A family's test module defines the `family` fixture: a `Family` with its tiny models (one per attention backend),
a function making processor inputs from (prompt, image) pairs, and the batch with images of different aspect
ratios every test runs on. Methods come from `vlmprune.methods.METHODS`, so a method registered later is covered;
`FITTING` gives parameters that fit a 6-layer model with 30 to 80 image tokens per sample.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import vlmprune
from vlmprune.methods import METHODS
from vlmprune.reference import pre_llm_greedy, pre_llm_logits, reference_greedy, reference_logits

__all__ = [
    "CASES",
    "Family",
    "test_generation_on_a_static_cache_equals_masked_reference",
    "test_greedy_generation_equals_masked_reference",
    "test_keeping_every_token_changes_nothing",
    "test_padded_batch_equals_samples_run_alone",
    "test_pruned_forward_equals_masked_reference",
    "test_pruning_before_the_llm_equals_the_llm_run_on_the_kept_embeddings_alone",
]

# Parameters that fit the tiny models (6 layers; budgets as fractions: the samples' token counts differ).
FITTING: dict[str, dict] = {
    "pdrop": {"layers": (2, 3, 5)},
    "feather": {"layers": (2, 4)},
    "uniform": {"layer": 2},
    "knn": {"layer": 2, "keep": None, "ratio": 0.5},
    "btp": {"layers": (1, 2, 3, 4)},
    "vispruner": {"keep": None, "ratio": 0.5},
    "fastervlm": {"keep": None, "ratio": 0.5},
    "cdpruner": {"keep": None, "ratio": 0.5},
    "visionzip": {"keep": None, "ratio": 0.5},
    "sparsevlm": {"layers": (2, 3, 5), "keep": 64},
}
# Every registered method with its fitting parameters, then variants: per-image budgets, a stage before the LLM.
CASES: dict[str, tuple[str, dict, dict]] = {name: (name, FITTING.get(name, {}), {}) for name in METHODS}
CASES |= {
    "fastv-layer0-scored-after": ("fastv", {"layer": 0, "scoring": "after"}, {}),
    "fastv-per-image": ("fastv", {}, {"budget_scope": "per_image"}),
    "vispruner-per-image": ("vispruner", FITTING["vispruner"], {"budget_scope": "per_image"}),
    "pdrop-per-image": ("pdrop", FITTING["pdrop"], {"budget_scope": "per_image"}),
    **{
        f"{name}-per-image": (name, FITTING[name], {"budget_scope": "per_image"})
        for name in ("visionzip", "cdpruner", "sparsevlm")
    },
    "dart-per-image": ("dart", {}, {"budget_scope": "per_image"}),
}


@dataclass
class Family:
    """A family's tiny models and inputs for the oracle tests."""

    models: dict[str, torch.nn.Module]  # per attention backend, one set of weights
    make_inputs: Callable[[list[int]], dict]  # processor inputs of the batch's samples `indices`, left-padded
    size: int  # samples in the batch


def _method(case: str):
    name, params, _ = CASES[case]
    return vlmprune.build_method(name, **params)


def _prune(model, case: str):
    return vlmprune.prune(model, _method(case), **CASES[case][2])


def renumber_flags(method, depth: int) -> list[bool]:
    flags, current = [], False
    stages = {s.layer: s for s in method.stages()}
    for layer in range(depth):
        if layer in stages:
            current = stages[layer].positions == "renumbered"
        flags.append(current)
    return flags


def _positions(inputs):
    return (inputs["attention_mask"].long().cumsum(1) - 1).clamp(min=0)


def _depth(model) -> int:
    return model.config.text_config.num_hidden_layers


def _assert_same_answers(generated: torch.Tensor, expected: torch.Tensor, model) -> None:
    """Equal tokens up to each row's first end-of-sequence: `generate` pads a finished sample after it, the references
    keep going."""
    eos = model.generation_config.eos_token_id
    for b, (got, want) in enumerate(zip(generated, expected, strict=True)):
        ends = (want == eos).nonzero().flatten()
        stop = int(ends[0]) + 1 if ends.numel() else want.numel()
        assert torch.equal(got[:stop], want[:stop]), f"sample {b}: {got.tolist()} != {want.tolist()}"


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("case", list(CASES))
def test_pruned_forward_equals_masked_reference(family, backend, case):
    model = family.models[backend]
    inputs = family.make_inputs(list(range(family.size)))
    with torch.no_grad(), _prune(model, case) as trace:
        logits = model(**inputs, position_ids=_positions(inputs)).logits
    assert len(trace.stages) == len(_method(case).stages())
    reference = reference_logits(model, inputs, trace, renumber_flags(_method(case), _depth(model)))
    rows = trace.output_index
    for b in range(rows.shape[0]):
        real = rows[b] >= 0
        torch.testing.assert_close(logits[b, real], reference[b, rows[b, real]], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("case", list(CASES))
def test_greedy_generation_equals_masked_reference(family, backend, case):
    model = family.models[backend]
    inputs = family.make_inputs(list(range(family.size)))
    with torch.no_grad(), _prune(model, case) as trace:
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)[:, inputs["input_ids"].shape[1] :]
    expected = reference_greedy(model, inputs, trace, renumber_flags(_method(case), _depth(model)), 4)
    _assert_same_answers(generated, expected, model)


@pytest.mark.parametrize("case", ["fastv", "pdrop", "vispruner-per-image"])
def test_generation_on_a_static_cache_equals_masked_reference(family, case):
    model = family.models["sdpa"]
    inputs = family.make_inputs(list(range(family.size)))
    with torch.no_grad(), _prune(model, case) as trace:
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False, cache_implementation="static")
    expected = reference_greedy(model, inputs, trace, renumber_flags(_method(case), _depth(model)), 4)
    _assert_same_answers(generated[:, inputs["input_ids"].shape[1] :], expected, model)


@pytest.mark.parametrize("case", list(CASES))
def test_padded_batch_equals_samples_run_alone(family, case):
    model = family.models["sdpa"]
    batch = family.make_inputs(list(range(family.size)))
    with torch.no_grad(), _prune(model, case) as trace:
        together = model.generate(**batch, max_new_tokens=4, do_sample=False)[:, batch["input_ids"].shape[1] :]
        kept_together = [[k.tolist() for k in stage.kept] for stage in trace.stages]
        for b in range(family.size):
            single = family.make_inputs([b])
            alone = model.generate(**single, max_new_tokens=4, do_sample=False)[:, single["input_ids"].shape[1] :]
            _assert_same_answers(together[b : b + 1], alone, model)
            assert [stage.kept[0].tolist() for stage in trace.stages] == [k[b] for k in kept_together]


PRE_LLM_CASES = [case for case in CASES if [s.layer for s in _method(case).stages()] == [0]]


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("case", PRE_LLM_CASES)
def test_pruning_before_the_llm_equals_the_llm_run_on_the_kept_embeddings_alone(family, backend, case):
    model = family.models[backend]
    renumber = _method(case).stages()[0].positions == "renumbered"
    inputs = family.make_inputs(list(range(family.size)))
    with torch.no_grad(), _prune(model, case) as trace:
        logits = model(**inputs, position_ids=_positions(inputs)).logits
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)[:, inputs["input_ids"].shape[1] :]
    rows = trace.output_index
    for b, (columns, reference) in enumerate(pre_llm_logits(model, inputs, trace, renumber)):
        real = rows[b] >= 0
        assert torch.equal(rows[b, real], columns)
        torch.testing.assert_close(logits[b, real], reference, atol=2e-4, rtol=1e-4)
    expected = torch.stack(pre_llm_greedy(model, inputs, trace, renumber, 4))
    _assert_same_answers(generated, expected, model)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_keeping_every_token_changes_nothing(family, backend):
    model = family.models[backend]
    inputs = family.make_inputs(list(range(family.size)))
    with torch.no_grad():
        expected = model(**inputs).logits
        expected_tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        for method in (
            vlmprune.build_method("fastv", ratio=0.0),
            vlmprune.build_method("pdrop", layers=(1, 3), keep_fractions=(1.0, 1.0), positions="original"),
        ):
            with vlmprune.prune(model, method) as trace:
                logits = model(**inputs).logits
                tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
            assert all(k == n for s in trace.stages for k, n in zip(s.n_kept, s.n_before, strict=True))
            real = inputs["attention_mask"].bool()
            torch.testing.assert_close(logits[real], expected[real], atol=1e-5, rtol=1e-5)
            assert torch.equal(tokens, expected_tokens)
