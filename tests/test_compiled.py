"""The compiled path: a static cache, and torch.compile with the pruning hooks inside, equal the eager path.

On a GPU the same code runs under CUDA graphs (`mode="reduce-overhead"`); here the graphs are checked with the
`eager` and `aot_eager` backends (Dynamo's tracing and guards, plus functionalisation of the in-place updates)
so that the suite stays fast. "No recompilation" is the property that lets CUDA graphs replay each step.
"""

from __future__ import annotations

import pytest
import torch
from transformers import CompileConfig

import vlmprune
from vlmprune.bench import Variant, run_benchmark
from vlmprune.cost import shape_from_config

PROMPTS = ["what is the color of the large object on the left", "where is the cat"]
# Counts known before the forward (the compiled path's methods), original and renumbered positions.
CASES = {
    "fastv": ("fastv", {}),
    "pdrop": ("pdrop", {"layers": (2, 3, 5)}),
    "feather-top-up": ("feather", {"layers": (2, 4), "top_up": True}),
    "fastv-layer0-after": ("fastv", {"layer": 0, "scoring": "after"}),
}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def no_recompilation():
    return torch._dynamo.config.patch(error_on_recompile=True)


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_compiled_decoding_equals_eager_and_compiles_once(models, make_inputs, case):
    """`generate` with a static cache and a compile config: transformers compiles the decode step, hooks included."""
    model = models["sdpa"]
    name, params = CASES[case]
    inputs = make_inputs(PROMPTS)
    config = CompileConfig(backend="aot_eager" if case == "pdrop" else "eager", mode=None)
    config._compile_all_devices = True  # transformers compiles on accelerators only unless told
    with torch.no_grad(), vlmprune.prune(model, vlmprune.build_method(name, **params)):
        eager = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        static = model.generate(**inputs, max_new_tokens=6, do_sample=False, cache_implementation="static")
        compiled = model.generate(**inputs, max_new_tokens=6, do_sample=False, compile_config=config)
        with no_recompilation():  # every later step and call replays the same graph
            again = model.generate(**inputs, max_new_tokens=9, do_sample=False, compile_config=config)
    assert torch.equal(static, eager) and torch.equal(compiled, eager)
    assert torch.equal(again[:, : eager.shape[1]], eager)


def test_compiled_forward_with_hooks_inside_equals_eager_and_does_not_recompile(models, make_inputs):
    """torch.compile over the whole forward (prefill and static-cache decode), as `bench --compile` runs it."""
    model = models["sdpa"]
    inputs = make_inputs(PROMPTS)
    method = vlmprune.build_method("pdrop", layers=(2, 3, 5))
    with torch.no_grad(), vlmprune.prune(model, method):
        eager_logits = model(**inputs).logits
        eager_tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False, cache_implementation="static")
        model.forward = torch.compile(model.forward, backend="eager", dynamic=False)
        try:
            compiled_logits = model(**inputs).logits
            compiled_tokens = model.generate(
                **inputs, max_new_tokens=5, do_sample=False, cache_implementation="static", disable_compile=True
            )
            with no_recompilation():
                again = model(**inputs).logits
                model.generate(
                    **inputs, max_new_tokens=5, do_sample=False, cache_implementation="static", disable_compile=True
                )
        finally:
            del model.forward
    torch.testing.assert_close(compiled_logits, eager_logits)
    torch.testing.assert_close(again, eager_logits)
    assert torch.equal(compiled_tokens, eager_tokens)


def test_bench_times_the_compiled_path(models, make_inputs):
    model = models["sdpa"]
    inputs = make_inputs(["what is in the picture"])
    variants = [Variant("unpruned", None), Variant("fastv", vlmprune.build_method("fastv", ratio=0.75))]
    shape = shape_from_config(model.config)
    results = run_benchmark(
        model, inputs, variants, shape, new_tokens=3, repeats=1, warmup=1, compile_options={"backend": "eager"}
    )
    assert "forward" not in vars(model)  # the class's forward again afterwards
    base, pruned = results
    assert pruned.ideal_speedup > 1.0 and base.decode_tokens_per_s > 0 and pruned.decode_tokens_per_s > 0


def test_a_forward_compiled_before_pruning_prunes_inside_the_block_and_not_after(models, make_inputs):
    """Dynamo must not replay a graph traced without the hooks inside `prune()`, nor one traced with them after."""
    model = models["sdpa"]
    inputs = make_inputs(PROMPTS)
    method = vlmprune.build_method("fastv", ratio=0.75)
    with torch.no_grad():
        unpruned = model(**inputs).logits
        with vlmprune.prune(model, method):
            pruned = model(**inputs).logits
        model.forward = torch.compile(model.forward, backend="eager", dynamic=False)
        try:
            with torch._dynamo.config.patch(skip_nnmodule_hook_guards=True):  # as in a process vlmprune never ran in
                torch.testing.assert_close(model(**inputs).logits, unpruned)
                with vlmprune.prune(model, method) as trace:
                    torch.testing.assert_close(model(**inputs).logits, pruned)
                assert trace.calls == 1
                torch.testing.assert_close(model(**inputs).logits, unpruned)
        finally:
            del model.forward
