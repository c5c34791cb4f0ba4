"""SparseVLM: its rule against a re-implementation written from its official code (`tests/official.py`), on
hand-built inputs and on the tiny model; the merged states it feeds the next layer; its schedule and budgets.

That a pruned run equals the unmodified language model with the dropped tokens masked and the merged states put in
place of their tokens' (eager and sdpa, a padded batch, generate from the pruned dynamic and static caches) is
checked by the `sparsevlm` rows of `tests/test_engine.py`."""

from __future__ import annotations

import pytest
import torch

import official
import vlmprune
from vlmprune.adapters import get_adapter
from vlmprune.cost import TokenSchedule, get_shape
from vlmprune.criteria import SelectionContext, TextRaterAttention
from vlmprune.criteria.base import kept_positions
from vlmprune.methods.sparsevlm import SCHEDULES

PROMPT = "what is the color of the large object on the left"
PRE = 2  # text rows before the image in the hand-built sequences


def hand_built(seed: int, images: list[int], texts: list[int], width: int = 16, heads: int = 2):
    """Per sample b a sequence of PRE text rows, `images[b]` image rows and `texts[b]` instruction rows, left-padded:
    random input embeddings, head-wise attention maps (rows softmaxed) and image states; and the context over it."""
    g = torch.Generator().manual_seed(seed)
    lengths = [PRE + n + t for n, t in zip(images, texts, strict=True)]
    longest = max(lengths)
    samples = []
    for n, length in zip(images, lengths, strict=True):
        embeds = torch.randn(length, width, generator=g)
        attention = torch.softmax(3 * torch.randn(heads, length, length, generator=g), dim=-1)
        states = torch.randn(n, 8, generator=g)
        samples.append((embeds, attention, states))
    pads = [longest - length for length in lengths]
    rows = torch.stack([torch.cat([torch.zeros(p, width), e]) for p, (e, _, _) in zip(pads, samples, strict=True)])
    instruction = torch.zeros(len(images), longest, dtype=torch.bool)
    for b, (p, n) in enumerate(zip(pads, images, strict=True)):
        instruction[b, p + PRE + n :] = True
    image_embeds = torch.nn.utils.rnn.pad_sequence(
        [e[PRE : PRE + n] for n, (e, _, _) in zip(images, samples, strict=True)], True
    )

    def rows_attention(query_rows, softmax, rope, score_dtype):
        per_sample = []
        for b, (p, n, (_, attention, _)) in enumerate(zip(pads, images, samples, strict=True)):
            queries = torch.nonzero(query_rows[b]).flatten() - p
            per_sample.append(attention.mean(dim=0)[queries][:, PRE : PRE + n])
        q, m = max(w.shape[0] for w in per_sample), max(images)
        weights = torch.zeros(len(images), q, m)
        valid = torch.zeros(len(images), q, dtype=torch.bool)
        for b, w in enumerate(per_sample):
            weights[b, : w.shape[0], : w.shape[1]] = w
            valid[b, : w.shape[0]] = True
        return weights, valid

    states = torch.nn.utils.rnn.pad_sequence([s for _, _, s in samples], batch_first=True)
    ctx = SelectionContext.from_lists(
        [torch.arange(n) for n in images],
        image_grids=[[(1, n)] for n in images],
        n_original=list(images),
        hidden_states_fn=lambda: states,
        instruction_fn=lambda: (rows, instruction),
        input_embeddings_fn=lambda: (image_embeds, rows),
        rows_attention_fn=rows_attention,
    )
    return ctx, samples


def official_stage(embeds, attention, states, n: int, count, adaptive=None):
    """(kept ∪ cluster centres, ascending; {centre: (members, merged state)}) by the official rule, one sample."""
    text_start = PRE + n
    raters = official.sparsevlm_raters(embeds[PRE:text_start], embeds[text_start:]) + text_start
    kept, recycled = official.sparsevlm_cut(attention, slice(PRE, text_start), raters, count, adaptive=adaptive)
    if recycled is None:
        return kept, {}
    centres, assignment, merged = official.sparsevlm_clusters(states[recycled], official.sparsevlm_noise(len(recycled)))
    clusters = {
        int(recycled[c]): (recycled[assignment == j].sort().values, merged[j]) for j, c in enumerate(centres.tolist())
    }
    return torch.cat([kept, recycled[centres]]).sort().values, clusters


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("adaptive", [False, True])
def test_selection_and_cluster_tokens_are_the_official_ones(seed, adaptive):
    images, texts = [40, 33], [7, 11]
    ctx, samples = hand_built(seed, images, texts)
    criterion = TextRaterAttention(count=12, adaptive=adaptive, scale=4.0, bias=1.0)
    keep = criterion.select(ctx, [n for n in images])
    weights = criterion.merge_weights(ctx, list(images), keep)
    merged = weights @ ctx.hidden_states()
    for b, (n, (embeds, attention, states)) in enumerate(zip(images, samples, strict=True)):
        expected, clusters = official_stage(embeds, attention, states, n, 12, (4.0, 1.0) if adaptive else None)
        assert kept_positions(keep)[b].tolist() == expected.tolist()
        for slot in kept_positions(keep)[b].tolist():
            members = torch.nonzero(weights[b, slot]).flatten()
            if slot in clusters:
                assert members.tolist() == clusters[slot][0].tolist()
                torch.testing.assert_close(merged[b, slot], clusters[slot][1], atol=1e-5, rtol=1e-5)
            else:
                assert members.tolist() == [slot] and weights[b, slot, slot] == 1.0


def test_counts_follow_the_code_min_count_n_minus_1_then_30_percent_recycled_in_tenths():
    criterion = TextRaterAttention(count=66)
    assert criterion.plan(144) == (66, 24, 3)  # p = 78: int(78 * 0.3) + 1 = 24 recycled, 24 // 10 + 1 = 3 clusters
    assert criterion.plan(50) == (49, 1, 1)  # never more than n - 1 by relevance: one token recycled, alone
    assert TextRaterAttention(count=66, recycle=False).plan(144) == (66, 0, 0)


def test_the_schedule_is_the_code_table_and_other_budgets_scale_the_nearest_row():
    assert vlmprune.build_method("sparsevlm").stage_counts() == (300, 200, 110)
    assert {k: vlmprune.build_method("sparsevlm", keep=k).stage_counts() for k in SCHEDULES} == SCHEDULES
    assert vlmprune.build_method("sparsevlm", keep=100).stage_counts() == (247, 50, 27)  # 96's row · 100/96
    assert vlmprune.build_method("sparsevlm", keep=400).stage_counts() == (625, 416, 229)  # 192's row · 400/192
    assert vlmprune.build_method("sparsevlm", layers=[1, 4], counts=[50, 20]).stage_counts() == (50, 20)
    assert vlmprune.build_method("sparsevlm", layers=[1, 4], adaptive=True).stage_counts() is None
    method = vlmprune.build_method("sparsevlm")
    assert [s.layer for s in method.stages()] == [3, 7, 16]  # cut after the code's pruning layers 2, 6 and 15
    assert [s.scoring_layer for s in method.stages()] == [2, 6, 15]


def test_projected_tokens_on_llava_are_the_schedule_plus_cluster_tokens():
    llava = get_shape("llava-1.5-7b")
    method = vlmprune.build_method("sparsevlm", keep=192)
    schedule = TokenSchedule.from_method(method, llava)
    # 576 -> 300 + (276: 83 recycled, 9 clusters) -> 200 + (109: 33, 4) -> 110 + (94: 29, 3)
    assert [schedule.image_tokens[s.layer] for s in method.stages()] == [309, 204, 113]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"layers": [3, 2, 5]}, "strictly increasing"),
        ({"layers": [0, 2, 5]}, ">= 1"),
        ({"layers": [2, 4]}, "give counts"),
        ({"counts": [10, 5]}, "2 values for 3 layers"),
        ({"keep": 0}, "positive image-token budget"),
        ({"recycle_share": 1.5}, "recycle_share"),
    ],
)
def test_bad_parameters_say_what_is_valid(params, message):
    with pytest.raises(vlmprune.errors.ParameterError, match=message):
        vlmprune.build_method("sparsevlm", **params)


# --- on the tiny model ------------------------------------------------------------------------------------------


def test_each_stage_keeps_and_merges_what_the_official_rule_does_on_its_layer_inputs(models, make_inputs):
    """Batch 1, as the code runs: at each stage, the official rule on the attention of the layer before the cut
    (recomputed from its input) and on that layer's output, against the trace's kept tokens and sources."""
    model = models["eager"]
    adapter = get_adapter(model)
    method = vlmprune.build_method("sparsevlm", layers=(2, 3, 5), keep=64)
    inputs = make_inputs([PROMPT])
    seen: dict = {}

    def capture(key):
        def before(module, args, kwargs):
            seen[key] = {
                "input": args[0] if args else kwargs["hidden_states"],
                "cos_sin": kwargs["position_embeddings"],
            }

        return before

    def output_of(key):
        def after(module, args, output):
            seen[key]["output"] = output[0] if isinstance(output, tuple) else output

        return after

    with torch.no_grad(), vlmprune.prune(model, method) as trace:
        handles = [
            adapter.text_model.register_forward_pre_hook(
                lambda m, a, k: seen.update(embeds=k["inputs_embeds"]), with_kwargs=True
            )
        ]
        for stage in method.stages():
            layer = adapter.layers[stage.scoring_layer]
            handles += [
                layer.register_forward_pre_hook(capture(stage.layer), with_kwargs=True),
                layer.register_forward_hook(output_of(stage.layer)),
            ]
        try:
            model(**inputs)
        finally:
            for handle in handles:
                handle.remove()
    image = adapter.image_token_mask(inputs)[0]
    columns = torch.nonzero(image).flatten()
    start, end = int(columns[0]), int(columns[-1]) + 1
    embeds = seen["embeds"][0]
    raters = official.sparsevlm_raters(embeds[start:end], embeds[end:])
    ids = torch.arange(144)  # the image tokens present, by original index
    for s, (stage, count) in enumerate(zip(method.stages(), (66, 30, 17), strict=True)):
        layer = adapter.layers[stage.scoring_layer]
        n = ids.numel()
        record = seen[stage.layer]
        with torch.no_grad():
            q, k = official.qk(layer, record["input"], record["cos_sin"], rope=True)
            logits = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
            causal = torch.ones(logits.shape[-2:], dtype=torch.bool).tril()
            attention = logits.masked_fill(~causal, float("-inf")).softmax(dim=-1)[0]
        text_start = start + n
        kept, recycled = official.sparsevlm_cut(attention, slice(start, text_start), raters + text_start, count)
        centres, assignment, _ = official.sparsevlm_clusters(
            record["output"][0, start:text_start][recycled], official.sparsevlm_noise(len(recycled))
        )
        expected = torch.cat([kept, recycled[centres]]).sort().values
        assert torch.equal(trace.stages[s].kept[0], ids[expected]), f"stage {s}"
        sources = dict(zip(trace.stages[s].kept[0].tolist(), trace.stages[s].sources[0], strict=True))
        for j, c in enumerate(centres.tolist()):
            members = ids[recycled[assignment == j]].sort().values
            assert sources[int(ids[recycled[c]])][0].sort().values.tolist() == members.tolist()
        ids = ids[expected]


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_a_cluster_token_enters_the_next_layer_as_the_mean_of_its_members(models, make_inputs, backend):
    model = models[backend]
    adapter = get_adapter(model)
    method = vlmprune.build_method("sparsevlm", layers=(2, 4), counts=(40, 12))
    inputs = make_inputs([PROMPT, "where is the cat"])
    seen = {}
    with torch.no_grad(), vlmprune.prune(model, method) as trace:
        handles = [
            adapter.layers[1].register_forward_hook(
                lambda m, a, out: seen.update(before=out[0] if isinstance(out, tuple) else out)
            ),
            adapter.layers[2].register_forward_pre_hook(
                lambda m, a, k: seen.update(after=a[0] if a else k["hidden_states"]), with_kwargs=True
            ),
        ]
        try:
            model(**inputs)
        finally:
            for handle in handles:
                handle.remove()
    stage = trace.stages[0]
    image = adapter.image_token_mask(inputs)
    merged = 0
    for b in range(2):
        columns = torch.nonzero(image[b]).flatten()  # original rows (the layer before the cut runs on all of them)
        kept = stage.kept[b]
        width = seen["after"].shape[1]
        real = width - (int(inputs["attention_mask"][b].sum()) - 144 + stage.n_kept[b])
        text_before = int(columns[0]) - int((inputs["attention_mask"][b] == 0).sum())
        first_image_row = real + text_before
        for k, (ids, weights) in enumerate(stage.sources[b]):
            expected = (weights[:, None] * seen["before"][b, columns[ids]]).sum(dim=0)
            torch.testing.assert_close(seen["after"][b, first_image_row + k], expected, atol=1e-5, rtol=1e-5)
            if ids.numel() > 1:
                merged += 1
                torch.testing.assert_close(weights, torch.full_like(weights, 1 / ids.numel()))
        assert kept.numel() == 40 + (int((144 - 40) * 0.3) + 1) // 10 + 1
    assert merged > 0
