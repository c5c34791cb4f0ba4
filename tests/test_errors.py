"""Bad input gets a clear error naming the problem; hooks never outlive the context."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import vlmprune
from vlmprune import Keep, Stage
from vlmprune.criteria import Attention
from vlmprune.methods.base import Method


def hook_count(model) -> int:
    """Hooks vlmprune installed (transformers installs output-capturing hooks of its own on first use)."""
    return sum(
        getattr(hook, "__module__", "").startswith("vlmprune")
        for m in model.modules()
        for hook in (*m._forward_pre_hooks.values(), *m._forward_hooks.values())
    )


class _Fixed(Method):
    """A one-stage method with an arbitrary budget, for error tests."""

    name = "fixed"
    paper = "test"

    def __init__(self, budget: Keep, layer: int = 2) -> None:
        self.budget, self.layer = budget, layer

    def stages(self) -> list[Stage]:
        return [Stage(layer=self.layer, criterion=Attention(), budget=self.budget)]


def test_unknown_method_lists_the_available_ones():
    with pytest.raises(vlmprune.UnknownMethodError, match="available: fastv, pdrop, feather"):
        vlmprune.build_method("fastvv")


def test_unknown_parameter_lists_the_valid_ones():
    with pytest.raises(vlmprune.UnknownMethodError, match=r"no parameter 'rate'.*valid: .*ratio"):
        vlmprune.build_method("fastv", rate=0.5)


def test_out_of_range_parameters_are_rejected_with_their_value():
    with pytest.raises(ValueError, match=r"got 1\.5"):
        vlmprune.build_method("fastv", ratio=1.5)
    with pytest.raises(ValueError, match="strictly increasing"):
        vlmprune.build_method("pdrop", layers=(16, 8))


def test_layer_beyond_the_model_depth(models):
    with (
        pytest.raises(
            vlmprune.LayerError, match=r"before layer 8, but the language model has 6 layers \(valid: 0 to 5\)"
        ),
        vlmprune.prune(models["sdpa"], vlmprune.build_method("feather")),
    ):
        pass
    assert hook_count(models["sdpa"]) == 0


def test_layer_zero_cannot_score_with_the_layer_before():
    with pytest.raises(vlmprune.LayerError, match="layer 0 cannot score"):
        Stage(layer=0, criterion=Attention(), budget=Keep.fraction_of_original(0.5))


def test_budget_larger_than_the_image_tokens(models, make_inputs):
    inputs = make_inputs(["what is this"])
    with (
        pytest.raises(vlmprune.BudgetError, match="asks for 500 image tokens but only 144 are present"),
        torch.no_grad(),
        vlmprune.prune(models["sdpa"], _Fixed(Keep.count(500))),
    ):
        models["sdpa"](**inputs)
    assert hook_count(models["sdpa"]) == 0


def test_prompt_without_an_image(models, processor):
    inputs = dict(processor.tokenizer(["USER: what is this ASSISTANT:"], return_tensors="pt"))
    with (
        pytest.raises(vlmprune.NoImageTokensError, match="no image tokens"),
        torch.no_grad(),
        vlmprune.prune(models["sdpa"], vlmprune.build_method("fastv")),
    ):
        models["sdpa"](**inputs)


def test_unsupported_model_family_names_the_supported_ones():
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    with (
        pytest.raises(
            vlmprune.UnsupportedModelError, match=r"no adapter for LlamaForCausalLM.*LlavaForConditionalGeneration"
        ),
        vlmprune.prune(llama, vlmprune.build_method("fastv")),
    ):
        pass


def test_errors_are_value_errors_so_callers_can_catch_them_together():
    assert issubclass(vlmprune.VlmpruneError, ValueError)
    for error in (
        vlmprune.LayerError,
        vlmprune.BudgetError,
        vlmprune.NoImageTokensError,
        vlmprune.UnsupportedModelError,
    ):
        assert issubclass(error, vlmprune.VlmpruneError)


def test_hooks_are_removed_after_the_block_and_after_an_exception(models, make_inputs):
    model = models["sdpa"]
    before = hook_count(model)
    assert before == 0
    inputs = make_inputs(["what is this"])
    with torch.no_grad():
        expected = model(**inputs).logits
        with vlmprune.prune(model, vlmprune.build_method("feather", layers=(2, 4))):
            assert hook_count(model) > before
            model(**inputs)
        assert hook_count(model) == before
        with pytest.raises(RuntimeError, match="boom"), vlmprune.prune(model, vlmprune.build_method("fastv")):
            raise RuntimeError("boom")
        assert hook_count(model) == before
        torch.testing.assert_close(model(**inputs).logits, expected, atol=0, rtol=0)


def test_nested_prune_on_one_model_is_a_clear_error_and_leaves_the_outer_block_working(models, make_inputs):
    model = models["sdpa"]
    inputs = make_inputs(["where is the cat"])
    with torch.no_grad(), vlmprune.prune(model, vlmprune.build_method("fastv")) as trace:
        with (
            pytest.raises(vlmprune.VlmpruneError, match="already active on this model"),
            vlmprune.prune(model, vlmprune.build_method("pdrop", layers=(2, 4))),
        ):
            pass
        model(**inputs)
        assert len(trace.stages) == 1  # the outer method still runs, alone
    assert hook_count(model) == 0
    with vlmprune.prune(model, vlmprune.build_method("fastv")):  # and a new block may start afterwards
        pass
