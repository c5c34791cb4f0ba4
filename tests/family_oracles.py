"""The oracle tests every model family passes, for every registered method (imported by each family's test file).

A family's test module defines the `family` fixture: a `Family` with its tiny models (one per attention backend),
a function making processor inputs from the batch's sample indices, and the batch every test runs on (images of
different sizes). It may define `EXTRA_CASES`, a dict of `Case`s its model needs covered beyond the generic ones
(read when the tests are collected, so a module constant rather than a field of the fixture's `Family`).

Methods come from `vlmprune.methods.METHODS`, so a method registered later is covered; `FITTING` gives parameters
that fit a 6-layer model with 12 to 80 image tokens per sample. Positions: a family whose forward derives its own
(M-RoPE) gets none, the others get `generate`'s from the attention mask (`helpers.position_kwargs`), as the
references in `vlmprune.reference` do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

import vlmprune
from helpers import assert_same_answers, position_kwargs, renumber_flags
from vlmprune.methods import METHODS
from vlmprune.reference import pre_llm_greedy, pre_llm_logits, reference_greedy, reference_logits

__all__ = [
    "CASES",
    "Case",
    "Family",
    "pytest_generate_tests",
    "test_generation_on_a_static_cache_equals_masked_reference",
    "test_greedy_generation_equals_masked_reference",
    "test_keeping_every_token_changes_nothing",
    "test_padded_batch_equals_samples_run_alone",
    "test_pruned_forward_equals_masked_reference",
    "test_pruning_before_the_llm_equals_the_llm_run_on_the_kept_embeddings_alone",
]


@dataclass(frozen=True)
class Case:
    """One row of the oracle tables: a registered method, its parameters, and the options given to `prune`."""

    method: str
    params: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)  # keyword arguments of `vlmprune.prune` (budget_scope)

    def build(self):
        return vlmprune.build_method(self.method, **self.params)

    def prune(self, model):
        return vlmprune.prune(model, self.build(), **self.options)


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
CASES: dict[str, Case] = {name: Case(name, FITTING.get(name, {})) for name in METHODS}
CASES |= {
    "fastv-layer0-scored-after": Case("fastv", {"layer": 0, "scoring": "after"}),
    "fastv-per-image": Case("fastv", {}, {"budget_scope": "per_image"}),
    "vispruner-per-image": Case("vispruner", FITTING["vispruner"], {"budget_scope": "per_image"}),
    "pdrop-per-image": Case("pdrop", FITTING["pdrop"], {"budget_scope": "per_image"}),
    **{
        f"{name}-per-image": Case(name, FITTING[name], {"budget_scope": "per_image"})
        for name in ("visionzip", "cdpruner", "sparsevlm")
    },
    "dart-per-image": Case("dart", {}, {"budget_scope": "per_image"}),
}
# Generation on a static cache: these, and every case a family adds.
STATIC_CACHE_CASES = ["fastv", "pdrop", "vispruner-per-image"]


@dataclass
class Family:
    """A family's tiny models and inputs for the oracle tests."""

    models: dict[str, torch.nn.Module]  # per attention backend, one set of weights
    make_inputs: Callable[[list[int]], dict]  # processor inputs of the batch's samples `indices`, left-padded
    size: int  # samples in the batch
    new_tokens: int = 4  # tokens generated per test


def family_cases(module) -> dict[str, Case]:
    """The generic cases and the family module's own (`EXTRA_CASES`)."""
    return CASES | getattr(module, "EXTRA_CASES", {})


def _over_cases(select: Callable[[dict[str, Case]], list[str]]):
    """Marks an oracle test to run over the cases `select` picks from its family's (see `pytest_generate_tests`)."""

    def mark(test):
        test.select_cases = select
        return test

    return mark


def pytest_generate_tests(metafunc):
    """Parametrises the marked oracle tests by `case` over the cases of the module that collects them: the generic
    ones and the module's `EXTRA_CASES` (a family module imports this hook with the tests)."""
    select = getattr(metafunc.function, "select_cases", None)
    if select is not None:
        cases = family_cases(metafunc.module)
        names = select(cases)
        metafunc.parametrize("case", [cases[name] for name in names], ids=names)


def _all(cases: dict[str, Case]) -> list[str]:
    return list(cases)


def _on_a_static_cache(cases: dict[str, Case]) -> list[str]:
    return STATIC_CACHE_CASES + [name for name in cases if name not in CASES]


def _before_the_llm(cases: dict[str, Case]) -> list[str]:
    return [name for name, case in cases.items() if [s.layer for s in case.build().stages()] == [0]]


def _depth(model) -> int:
    return model.config.text_config.num_hidden_layers


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@_over_cases(_all)
def test_pruned_forward_equals_masked_reference(family, backend, case):
    model = family.models[backend]
    inputs = family.make_inputs(list(range(family.size)))
    with torch.no_grad(), case.prune(model) as trace:
        logits = model(**inputs, **position_kwargs(model, inputs)).logits
    assert len(trace.stages) == len(case.build().stages())
    reference = reference_logits(model, inputs, trace, renumber_flags(case.build(), _depth(model)))
    rows = trace.output_index
    for b in range(rows.shape[0]):
        real = rows[b] >= 0
        torch.testing.assert_close(logits[b, real], reference[b, rows[b, real]], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@_over_cases(_all)
def test_greedy_generation_equals_masked_reference(family, backend, case):
    model, n = family.models[backend], family.new_tokens
    inputs = family.make_inputs(list(range(family.size)))
    with torch.no_grad(), case.prune(model) as trace:
        generated = model.generate(**inputs, max_new_tokens=n, do_sample=False)[:, inputs["input_ids"].shape[1] :]
    expected = reference_greedy(model, inputs, trace, renumber_flags(case.build(), _depth(model)), n)
    assert_same_answers(generated, expected, model)


@_over_cases(_on_a_static_cache)
def test_generation_on_a_static_cache_equals_masked_reference(family, case):
    model, n = family.models["sdpa"], family.new_tokens
    inputs = family.make_inputs(list(range(family.size)))
    with torch.no_grad(), case.prune(model) as trace:
        generated = model.generate(**inputs, max_new_tokens=n, do_sample=False, cache_implementation="static")
    expected = reference_greedy(model, inputs, trace, renumber_flags(case.build(), _depth(model)), n)
    assert_same_answers(generated[:, inputs["input_ids"].shape[1] :], expected, model)


@_over_cases(_all)
def test_padded_batch_equals_samples_run_alone(family, case):
    model, n = family.models["sdpa"], family.new_tokens
    batch = family.make_inputs(list(range(family.size)))
    with torch.no_grad(), case.prune(model) as trace:
        together = model.generate(**batch, max_new_tokens=n, do_sample=False)[:, batch["input_ids"].shape[1] :]
        kept_together = [[k.tolist() for k in stage.kept] for stage in trace.stages]
        for b in range(family.size):
            single = family.make_inputs([b])
            alone = model.generate(**single, max_new_tokens=n, do_sample=False)[:, single["input_ids"].shape[1] :]
            assert_same_answers(together[b : b + 1], alone, model)
            assert [stage.kept[0].tolist() for stage in trace.stages] == [k[b] for k in kept_together]


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@_over_cases(_before_the_llm)
def test_pruning_before_the_llm_equals_the_llm_run_on_the_kept_embeddings_alone(family, backend, case):
    """With DeepStack (Qwen3-VL) the reference is the unmodified stack given only the kept tokens' additions."""
    model, n = family.models[backend], family.new_tokens
    renumber = case.build().stages()[0].positions == "renumbered"
    inputs = family.make_inputs(list(range(family.size)))
    with torch.no_grad(), case.prune(model) as trace:
        logits = model(**inputs, **position_kwargs(model, inputs)).logits
        generated = model.generate(**inputs, max_new_tokens=n, do_sample=False)[:, inputs["input_ids"].shape[1] :]
    rows = trace.output_index
    for b, (columns, reference) in enumerate(pre_llm_logits(model, inputs, trace, renumber)):
        real = rows[b] >= 0
        assert torch.equal(rows[b, real], columns)
        torch.testing.assert_close(logits[b, real], reference, atol=2e-4, rtol=1e-4)
    expected = torch.stack(pre_llm_greedy(model, inputs, trace, renumber, n))
    assert_same_answers(generated, expected, model)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_keeping_every_token_changes_nothing(family, backend):
    model, n = family.models[backend], family.new_tokens
    inputs = family.make_inputs(list(range(family.size)))
    with torch.no_grad():
        expected = model(**inputs).logits
        expected_tokens = model.generate(**inputs, max_new_tokens=n, do_sample=False)
        for method in (
            vlmprune.build_method("fastv", ratio=0.0),
            vlmprune.build_method("random", layer=0, ratio=0.0),
            vlmprune.build_method("pdrop", layers=(1, 3), keep_fractions=(1.0, 1.0), positions="original"),
        ):
            with vlmprune.prune(model, method) as trace:
                logits = model(**inputs).logits
                tokens = model.generate(**inputs, max_new_tokens=n, do_sample=False)
            assert all(kept == before for s in trace.stages for kept, before in zip(s.n_kept, s.n_before, strict=True))
            real = inputs["attention_mask"].bool()
            torch.testing.assert_close(logits[real], expected[real], atol=1e-5, rtol=1e-5)
            assert torch.equal(tokens, expected_tokens)
