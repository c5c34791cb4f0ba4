"""Balanced Token Pruning: its selection rules against a direct port of the official code, its schedule, its cost.

The `official_*` functions below re-implement, one sample at a time with Python lists, the rules that
`../shared/reference/vispruner-btp.md` §2.3 reads in the released `llava/modeling_llama.py` (`attn_prune`,
`div_prune`, `get_div_initial_indices` and the stage bodies of `LlamaModel.forward`), with the two fixes the
method documents: a token is kept once, and a union larger than the budget is cut to it, attention first.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import vlmprune
from vlmprune.cost import TokenSchedule, estimate, get_shape
from vlmprune.criteria import SelectionContext
from vlmprune.criteria.balanced import Balanced, max_min_picks, rebalanced_attention, spatial_picks

INF = float("inf")


# The official rules, one sample at a time ---------------------------------------------------------------------


def official_attn_prune(scores: torch.Tensor, select_num: int, extra_num: int, k: int) -> list[int]:
    """`attn_prune`: top `extra_num` by score; those with index < k first, then the rest; the first `select_num`."""
    top = torch.sort(scores, descending=True, stable=True).indices[:extra_num].tolist()
    pre = [i for i in top if i < k]
    post = [i for i in top if i >= k]
    if select_num - len(pre) > 0:
        return pre + post[: select_num - len(pre)]
    return pre[:select_num]


def official_max_min(distance: torch.Tensor, k: int, select: list[int] | None = None) -> list[int]:
    """`div_prune` / `get_div_initial_indices` on a distance matrix: greedy max-min, `k` more picks."""
    distance = distance.clone().float()
    distance.fill_diagonal_(INF)
    select = [] if select is None else list(select)
    if select:
        distance[:, select] = -INF
    for _ in range(k):
        if not select:
            index = int(distance.min(dim=1).values.argmax())
        else:
            index = int(distance[select].min(dim=0).values.argmax())
        select.append(index)
        distance[:, index] = -INF
    return select


def official_div_prune(hidden: torch.Tensor, k: int, select: list[int] | None = None) -> list[int]:
    unit = F.normalize(hidden.float(), p=2, dim=1)
    return official_max_min(1 - unit @ unit.T, k, select)


def official_spatial(coords: list[tuple[int, int]], k: int) -> list[int]:
    """`get_div_initial_indices(H, W, k)`: farthest points by Manhattan distance, from the first token."""
    return list(_official_spatial(tuple(coords), k))


@functools.lru_cache(maxsize=8)  # the official code, too, computes the full grid's picks once
def _official_spatial(coords: tuple[tuple[int, int], ...], k: int) -> tuple[int, ...]:
    c = torch.tensor(coords)
    manhattan = (c[:, None, :] - c[None, :, :]).abs().sum(-1).float()
    return tuple(official_max_min(manhattan, k - 1, [0])) if k else ()


def official_stage(hidden, scores, coords, k, attention, diversity, spatial, oversample) -> list[int]:
    """One stage of the official `forward` on the present tokens (slot order): the kept slots, ascending."""
    n = len(scores)
    a = int(k * attention)
    s = min(int(k * spatial), k - a)
    d = min(int(k * diversity), k - a)
    picks = official_attn_prune(scores, a, min(int(a * oversample), n), k) if a else []
    picks += official_spatial(coords, s) if s else []
    picks += official_div_prune(hidden, d) if d else []
    union = list(dict.fromkeys(picks))[:k]  # each token once, cut to k: attention, then spatial, then diversity
    if len(union) < k:
        union = official_div_prune(hidden, k - len(union), union)
    return sorted(union)


# Hand-built contexts --------------------------------------------------------------------------------------------


def context(ids, hidden, scores, grid=(24, 24)):
    """A SelectionContext over per-sample present ids, with hidden states and attention scores per slot."""
    ctx = SelectionContext.from_lists(
        [torch.tensor(i) for i in ids], image_grids=[[grid]] * len(ids), n_original=[grid[0] * grid[1]] * len(ids)
    )
    padded_hidden = torch.nn.utils.rnn.pad_sequence(hidden, batch_first=True)
    padded_scores = torch.nn.utils.rnn.pad_sequence(scores, batch_first=True)
    ctx.hidden_states_fn = lambda: padded_hidden
    ctx.attention_fn = lambda query, softmax, rope, full_map=False, score_dtype="float32": padded_scores
    return ctx


def kept_slots(keep: torch.Tensor) -> list[list[int]]:
    return [torch.nonzero(row).flatten().tolist() for row in keep]


def in_order(ranks: torch.Tensor) -> list[int]:
    """The slots a (m,) pick-order row picked (rank >= 0), in pick order."""
    picked = torch.nonzero(ranks >= 0).flatten().tolist()
    return sorted(picked, key=lambda i: int(ranks[i]))


def grid_coords(ids, cols=24):
    return [(i // cols, i % cols) for i in ids]


# Rebalanced attention ---------------------------------------------------------------------------------------------


def test_rebalancing_takes_the_early_candidates_first():
    scores = torch.arange(8.0)[None]  # RoPE's pull: the later a token, the higher its score
    present = torch.ones(1, 8, dtype=torch.bool)
    plain = rebalanced_attention(scores, present, picks=[2], candidates=[2], threshold=[4])
    assert torch.nonzero(plain[0] >= 0).flatten().tolist() == [6, 7]
    rebalanced = rebalanced_attention(scores, present, picks=[2], candidates=[6], threshold=[4])
    assert rebalanced[0].tolist() == [-1, -1, 1, 0, -1, -1, -1, -1]  # 3 then 2: early candidates, by score


@pytest.mark.parametrize(("picks", "extra", "k"), [(86, 318, 288), (129, 193, 144), (48, 57, 48), (5, 5, 50)])
def test_rebalanced_attention_follows_the_official_attn_prune(picks, extra, k):
    generator = torch.Generator().manual_seed(picks)
    counts = [300, 200]
    scores = [torch.randn(n, generator=generator) for n in counts]
    padded = torch.nn.utils.rnn.pad_sequence(scores, batch_first=True)
    present = torch.arange(300)[None] < torch.tensor(counts)[:, None]
    extras = [min(extra, n) for n in counts]
    ranks = rebalanced_attention(padded, present, [picks] * 2, extras, [k] * 2)
    for b in range(2):
        expected = official_attn_prune(scores[b], picks, extras[b], k)
        assert in_order(ranks[b]) == expected


# Max-min diversity and the spatial start --------------------------------------------------------------------------


def test_max_min_diversity_takes_one_token_per_cluster():
    centres = torch.eye(3)
    hidden = torch.cat(
        [centres[i] + 0.01 * torch.randn(4, 3, generator=torch.Generator().manual_seed(i)) for i in (0, 1, 2)]
    )
    unit = F.normalize(hidden, dim=-1)
    distances = (1 - unit @ unit.T)[None]
    present = torch.ones(1, 12, dtype=torch.bool)
    ranks = max_min_picks(distances, present, torch.zeros_like(present), torch.tensor([3]), 3)
    picked = torch.nonzero(ranks[0] >= 0).flatten()
    assert sorted((picked // 4).tolist()) == [0, 1, 2]


@pytest.mark.parametrize("seeded", [False, True])
def test_max_min_diversity_follows_the_official_div_prune(seeded):
    generator = torch.Generator().manual_seed(1)
    counts, k = [40, 25], 12
    hidden = [torch.randn(n, 16, generator=generator) for n in counts]
    padded = torch.nn.utils.rnn.pad_sequence(hidden, batch_first=True)
    present = torch.arange(40)[None] < torch.tensor(counts)[:, None]
    seeds = [[3, 17], [0]] if seeded else [[], []]
    seed_mask = torch.zeros_like(present)
    for b, s in enumerate(seeds):
        seed_mask[b, s] = True
    unit = F.normalize(padded, dim=-1)
    ranks = max_min_picks(1 - unit @ unit.transpose(1, 2), present, seed_mask, torch.tensor([k, k - 2]), k)
    for b in range(2):
        expected = official_div_prune(hidden[b], k - 2 * b, seeds[b] or None)[len(seeds[b]) :]
        assert in_order(ranks[b]) == expected


def test_spatial_start_is_farthest_points_from_the_first_token():
    ctx = context([list(range(25))], [torch.zeros(25, 4)], [torch.zeros(25)], grid=(5, 5))
    ranks = spatial_picks(ctx, [4])
    picks = in_order(ranks[0])
    assert picks[:2] == [0, 24]  # the first token, then the opposite corner
    assert picks == official_spatial(grid_coords(range(25), 5), 4)


def test_spatial_start_on_the_llava_grid_and_on_a_partly_pruned_one():
    """The official 144 of a 24x24 grid (computed once, from the grids), and the same rule on the present tokens."""
    full = context([list(range(576))], [torch.zeros(576, 4)], [torch.zeros(576)])
    ranks = spatial_picks(full, [144])
    assert torch.nonzero(ranks[0] >= 0).flatten().tolist() == sorted(official_spatial(grid_coords(range(576)), 144))
    present = [
        sorted(torch.randperm(576, generator=torch.Generator().manual_seed(s))[:n].tolist())
        for s, n in ((0, 300), (1, 200))
    ]
    partial = context(present, [torch.zeros(len(p), 4) for p in present], [torch.zeros(len(p)) for p in present])
    ranks = spatial_picks(partial, [50, 40])
    for b, ids in enumerate(present):
        expected = official_spatial(grid_coords(ids), [50, 40][b])
        assert in_order(ranks[b]) == expected


# A whole stage -----------------------------------------------------------------------------------------------------

STAGES = {  # (present tokens per sample, budget, Balanced settings) of the official LLaVA stages and the paper's
    "code-1": ([576, 576], 288, {"attention": 0.3, "diversity": 0.3, "spatial": 0.5, "oversample": 3.7}),
    "code-2": ([288, 200], 144, {"attention": 0.9, "diversity": 0.1, "oversample": 1.5}),
    "code-3": ([144, 100], 48, {"attention": 1.0, "oversample": 1.2}),
    "paper-1": ([576, 576], 288, {"attention": 0.6, "spatial": 0.5, "oversample": 3.7}),
    "paper-2": ([288, 200], 144, {"attention": 0.8, "oversample": 1.5}),
    "divprune": ([300, 250], 60, {"attention": 0.0}),
    "union-cut": ([100, 96], 90, {"attention": 0.3, "diversity": 1.0, "spatial": 1.0}),  # 27 + 63 + 63 picks for 90
}


@pytest.mark.parametrize("name", list(STAGES))
def test_a_stage_keeps_what_the_official_rules_keep(name):
    counts, k, settings = STAGES[name]
    generator = torch.Generator().manual_seed(len(name))
    ids = [sorted(torch.randperm(576, generator=generator)[:n].tolist()) for n in counts]
    hidden = [torch.randn(n, 32, generator=generator) for n in counts]
    scores = [torch.randn(n, generator=generator) + torch.linspace(0, 2, n) for n in counts]  # a late-token bias
    balanced = Balanced(**settings)
    keep = balanced.select(context(ids, hidden, scores), [k, k])
    for b, n in enumerate(counts):
        coords = grid_coords(ids[b])
        expected = official_stage(
            hidden[b],
            scores[b],
            coords,
            k,
            balanced.attention,
            balanced.diversity,
            balanced.spatial,
            balanced.oversample,
        )
        assert kept_slots(keep)[b] == expected
        a = int(k * balanced.attention)
        attention_picks = official_attn_prune(scores[b], a, min(int(a * balanced.oversample), n), k)
        assert set(attention_picks) <= set(expected)  # the attention share (lambda) is never displaced


def test_a_stage_keeps_each_token_once_and_exactly_its_budget():
    """The code's stage 2 (`set(div_indices)` of tensors) could keep a token twice and fewer distinct tokens."""
    generator = torch.Generator().manual_seed(0)
    hidden = [torch.randn(288, 8, generator=generator)]
    scores = [torch.linspace(0, 1, 288)]
    keep = Balanced(attention=0.9, diversity=0.1, oversample=1.5).select(
        context([list(range(288))], hidden, scores), [144]
    )
    assert int(keep.sum()) == 144
    assert Balanced(attention=0.9).counts(context([list(range(288))], hidden, scores), [144]) == [144]


def test_a_union_larger_than_the_budget_is_cut_attention_first():
    generator = torch.Generator().manual_seed(0)
    hidden = [torch.randn(144, 8, generator=generator)]
    scores = [torch.randn(144, generator=generator)]
    ctx = context([list(range(144))], hidden, scores, grid=(12, 12))
    balanced = Balanced(attention=0.5, diversity=0.5, spatial=0.5, oversample=1.0)  # 20 + 20 + 20 picks for 40
    keep = balanced.select(ctx, [40])
    attention_picks = official_attn_prune(scores[0], 20, 20, 40)
    assert int(keep.sum()) == 40 and set(attention_picks) <= set(kept_slots(keep)[0])


def test_a_budget_of_zero_needs_neither_attention_nor_hidden_states():
    ctx = SelectionContext.from_lists([torch.arange(10)], image_grids=[[(2, 5)]], n_original=[10])
    assert not Balanced(attention=0.0).select(ctx, [0]).any()
    assert Balanced(attention=0.0).requires == frozenset()


# The method: schedule, variants, cost --------------------------------------------------------------------------------


def budgets(method, n=576):
    present, out = n, []
    for stage in method.stages():
        present = stage.budget.resolve(n, present)
        out.append(present)
    return out


def test_the_default_is_the_official_llava_schedule():
    method = vlmprune.build_method("btp")
    assert method.layers == (3, 6, 14, 22)  # before 1-based layers 4, 7, 15 and 23
    assert budgets(method) == [288, 144, 48, 0]
    stages = method.stages()
    assert [s.criterion.attention for s in stages[:3]] == [0.3, 0.9, 1.0]
    assert [s.criterion.diversity for s in stages[:3]] == [0.3, 0.1, 0.0]
    assert [s.criterion.shares(k, n) for s, k, n in zip(stages[:3], [288, 144, 48], [576, 288, 144], strict=True)] == [
        (86, 318, 144, 86),  # int(0.3k) by attention from int(3.7a) candidates, 144 spatial, int(0.3k) diversity
        (129, 193, 0, 14),
        (48, 57, 0, 0),
    ]
    assert all(s.scoring == "before" and s.positions == "original" for s in stages)
    assert stages[-1].criterion.requires == frozenset()  # the last stage drops everything without scoring


def test_the_paper_variant_halves_each_stage_and_raises_lambda():
    method = vlmprune.build_method("btp", variant="paper")
    assert budgets(method) == [288, 144, 72, 0]
    stages = method.stages()
    assert [s.criterion.attention for s in stages[:3]] == [0.6, 0.8, 1.0]
    assert [s.criterion.shares(k, 2 * k) for s, k in zip(stages[:3], [288, 144, 72], strict=True)] == [
        (172, 576, 116, 0),  # the spatial start fills the diversity share 288 - 172
        (115, 172, 0, 0),
        (72, 86, 0, 0),
    ]


def test_scale_shrinks_every_stage_and_other_layers_fit_the_schedule():
    assert budgets(vlmprune.build_method("btp", scale=0.5)) == [144, 72, 24, 0]
    method = vlmprune.build_method("btp", layers=[2, 9])
    assert method.keep_fractions == (0.5, 0.0) and method.attention == (0.3, 1.0)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"variant": "best"}, "variant must be one of 'code', 'paper'"),
        ({"layers": [5, 3, 9, 12]}, "strictly increasing"),
        ({"keep_fractions": [0.5, 0.6, 0.1, 0.0]}, "must not increase"),
        ({"attention": [0.3, 0.9]}, "attention has 2 values for 4 layers"),
        ({"oversample": [0.5, 1, 1, 1]}, "oversample values"),
        ({"scale": 0}, "scale must be > 0"),
        ({"layers": [0, 6, 14, 22]}, "layer 0 has no layer before it"),
    ],
)
def test_bad_btp_parameters_are_one_line_errors(params, message):
    with pytest.raises(vlmprune.ParameterError, match=message):
        vlmprune.build_method("btp", **params)


def test_the_cost_model_gives_the_papers_tflops_for_128_tokens():
    """Table 1: LLaVA-1.5-7B, BTP at 128 tokens, 0.85 TFLOPs of 3.82 (PyramidDrop's formula)."""
    shape = get_shape("llava-1.5-7b")
    schedule = TokenSchedule.from_method(vlmprune.build_method("btp"), shape)
    assert round(sum(schedule.image_tokens) / shape.layers) == 129  # "128 tokens"
    report = estimate(shape, schedule, "paper-3ndm")
    assert round(report.baseline_prefill_flops / 1e12, 2) == 3.82
    assert round(report.prefill_flops / 1e12, 2) == 0.85


# In the model ---------------------------------------------------------------------------------------------------------


def test_first_stage_keeps_what_the_official_rules_pick_from_the_models_own_states(models, make_inputs):
    """Stage 1 before layer 2: layer 1's last-query attention and the hidden states entering layer 2.

    The raw logits rank the keys as the log of the softmaxed weights do (they differ by a constant per query), so
    the eager attention map stands in for the official code's logits.
    """
    model = models["eager"]
    inputs = make_inputs(["what is the color of the large object on the left"])
    image = inputs["input_ids"][0] == model.config.image_token_id
    with torch.no_grad():
        out = model(**inputs, output_attentions=True, output_hidden_states=True)
        method = vlmprune.build_method("btp", layers=(2, 3, 4, 5))
        with vlmprune.prune(model, method) as trace:
            model(**inputs)
    scores = out.attentions[1][0, :, -1, image].log().mean(0)
    hidden = out.hidden_states[2][0, image]
    expected = official_stage(hidden, scores, grid_coords(range(144), 12), 72, 0.3, 0.3, 0.5, 3.7)
    assert trace.stages[0].kept[0].tolist() == expected


def test_token_counts_replace_the_fractions():
    by_first = vlmprune.build_method("btp", keep=144)
    assert [stage.budget.resolve(576, 576) for stage in by_first.stages()[:3]] == [144, 72, 24]
    assert by_first.stages()[3].budget.resolve(576, 24) == 0
    explicit = vlmprune.build_method("btp", keep=(200, 100, 40, 0))
    assert [stage.budget.resolve(576, 576) for stage in explicit.stages()] == [200, 100, 40, 0]
    for bad, message in (((200, 100), "2 counts for 4 layers"), ((100, 200, 40, 0), "not increase")):
        with pytest.raises(vlmprune.VlmpruneError, match=message):
            vlmprune.build_method("btp", keep=bad)
