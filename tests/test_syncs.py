"""The pruned forward waits for the device no more often than the unpruned one (issue 10's sync-free path).

Counted on CPU with `HostSyncCounter`: calls that would stall the host on a GPU (`.tolist()`, `bool(t)`,
`nonzero`, boolean indexing, ...), in a prefill and in one decode step, against the unpruned model's own.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext

import pytest
import torch
from transformers import LlavaForConditionalGeneration

import vlmprune
from vlmprune.engine.compat import find_cache
from vlmprune.engine.syncs import HostSyncCounter

CACHE_ARGUMENT = (
    "cache" if "cache" in inspect.signature(LlavaForConditionalGeneration.forward).parameters else ("past_key_values")
)
PROMPTS = ["what is the color of the large object on the left", "where is the cat", "is it red", "describe it"]


def count_syncs(model, inputs, method) -> tuple[HostSyncCounter, HostSyncCounter]:
    """Host syncs of a prefill and of the decode step after it, with `method` (None: unpruned)."""
    prefill, decode = HostSyncCounter(), HostSyncCounter()
    with torch.no_grad(), vlmprune.prune(model, method) if method else nullcontext():
        with prefill:
            out = model(**inputs, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(token)], dim=1)
        positions = mask.sum(dim=1, keepdim=True) - 1
        cache = find_cache(out)
        with decode:
            model(input_ids=token, attention_mask=mask, position_ids=positions, **{CACHE_ARGUMENT: cache})
    return prefill, decode


# method, parameters, host reads in a prefill beyond the unpruned model's: the image and real-token counts once,
# plus one per stage whose kept count depends on the data (FEATHER's union without top-up, text_mean's queries).
CASES = {
    "fastv": ("fastv", {}, 1),
    "fastv-layer0-after": ("fastv", {"scoring": "after", "layer": 0}, 1),
    "pdrop": ("pdrop", {"layers": (2, 3, 5)}, 1),
    "feather": ("feather", {"layers": (2, 4)}, 2),
    "feather-top-up": ("feather", {"layers": (2, 4), "top_up": True}, 1),
    "random": ("random", {}, 1),
    "uniform": ("uniform", {"layer": 2}, 1),
    "knn": ("knn", {"layer": 2, "keep": 40}, 1),
    "btp": ("btp", {"layers": (1, 2, 3, 4)}, 1),
    "vispruner": ("vispruner", {"keep": 40}, 1),
    "vispruner-ratio-original-positions": ("vispruner", {"keep": None, "ratio": 0.7, "positions": "original"}, 1),
    "fastervlm": ("fastervlm", {"keep": 40}, 1),
    "divprune": ("divprune", {}, 1),
    "dart": ("dart", {}, 2),
    "cdpruner": ("cdpruner", {"keep": 40}, 1),
    "visionzip": ("visionzip", {}, 1),
    "pooling": ("pooling", {"size": 3, "space": "vision_features"}, 1),
    "fastv-text-mean": ("fastv", {"query": "text_mean"}, 2),
    "fastv-all": ("fastv", {"query": "all"}, 1),
    "pdrop-keep": ("pdrop", {"layers": (2, 3, 5), "keep": 20}, 1),
    "feather-keep": ("feather", {"layers": (2, 4), "keep": (30, 12)}, 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pruning_adds_no_host_sync_that_grows_with_the_batch_or_the_stages(models, make_inputs, case):
    name, params, allowance = CASES[case]
    model = models["sdpa"]
    method = vlmprune.build_method(name, **params)
    for batch in (1, 4):
        inputs = make_inputs(PROMPTS[:batch])
        unpruned_prefill, unpruned_decode = count_syncs(model, inputs, None)
        prefill, decode = count_syncs(model, inputs, method)
        added = prefill.total - unpruned_prefill.total
        assert added == allowance, f"batch {batch}: {prefill.places - unpruned_prefill.places}"
        # At most the unpruned step's: pruning at layer 0 even spares the model's check of the caller's mask.
        assert decode.total <= unpruned_decode.total, f"batch {batch}: {decode.places - unpruned_decode.places}"


def test_the_counter_sees_the_calls_that_wait_for_the_device():
    x = torch.arange(6)
    with HostSyncCounter() as counter:
        x.tolist()
        bool(x.any())
        x[x > 2]
        torch.nonzero(x)
        x.sum() * 2  # stays on the device
    assert counter.counts == {"tolist": 1, "__bool__": 1, "boolean __getitem__": 1, "nonzero": 1}
