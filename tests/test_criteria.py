"""Criteria, budgets and the single-stage baseline methods, on hand-built inputs with obvious answers."""

from __future__ import annotations

import pytest
import torch

from vlmprune.budget import Keep
from vlmprune.criteria import (
    Ensemble,
    KnnDensity,
    RandomScore,
    ScoredCriterion,
    SelectionContext,
    Uniform,
)
from vlmprune.criteria.base import kept_positions
from vlmprune.errors import BudgetError
from vlmprune.methods import KnnPrune, RandomPrune, UniformPrune


def _ctx(ids, grids, n_original=None, stage_index=0, features=None) -> SelectionContext:
    ids = [torch.as_tensor(i, dtype=torch.long) for i in ids]
    if n_original is None:
        n_original = [sum(r * c for r, c in g) for g in grids]
    return SelectionContext.from_lists(
        ids,
        image_grids=grids,
        n_original=n_original,
        stage_index=stage_index,
        vision_features_fn=None if features is None else (lambda: features),
    )


def _full(rows: int, cols: int) -> torch.Tensor:
    return torch.arange(rows * cols)


class _Fixed(ScoredCriterion):
    """A scored criterion stub whose scores are given."""

    def __init__(self, scores: list[list[float]]) -> None:
        self._scores = torch.tensor(scores)

    def scores(self, ctx: SelectionContext) -> torch.Tensor:
        return self._scores


# --- Uniform ---------------------------------------------------------------------------------------------


def test_uniform_stride_3_on_24x24_keeps_the_top_left_anchored_grid():
    ctx = _ctx([_full(24, 24)], [[(24, 24)]])
    (kept,) = kept_positions(Uniform(stride=3).select(ctx, [10]))
    assert kept.tolist() == [r * 24 + c for r in range(0, 24, 3) for c in range(0, 24, 3)]


@pytest.mark.parametrize(("rows", "stride", "expected"), [(24, 3, 64), (24, 2, 144), (27, 3, 81), (27, 2, 196)])
def test_uniform_stride_counts_ignore_the_budget(rows, stride, expected):
    ctx = _ctx([_full(rows, rows)], [[(rows, rows)]])
    assert kept_positions(Uniform(stride=stride).select(ctx, [1]))[0].numel() == expected


def test_uniform_on_a_pruned_set_keeps_only_present_grid_cells_as_positions():
    present = torch.tensor([0, 1, 5, 6, 8, 12, 15])  # of a 4x4 grid; stride 2 cells are 0, 2, 8, 10
    ctx = _ctx([present], [[(4, 4)]])
    (kept,) = kept_positions(Uniform(stride=2).select(ctx, [3]))
    assert kept.tolist() == [0, 4]  # positions of ids 0 and 8
    assert present[kept].tolist() == [0, 8]


def test_uniform_covers_every_image_of_a_sample():
    ctx = _ctx([_full(4, 4).tolist() + (16 + _full(2, 3)).tolist()], [[(4, 4), (2, 3)]])
    (kept,) = kept_positions(Uniform(stride=2).select(ctx, [0]))
    assert kept.tolist() == [0, 2, 8, 10, 16, 18]


def test_uniform_rejects_grids_that_do_not_cover_the_image_tokens():
    ctx = _ctx([_full(4, 4)], [[(3, 3)]], n_original=[16])
    with pytest.raises(ValueError, match="grids"):
        kept_positions(Uniform(stride=2).select(ctx, [4]))


def test_uniform_budget_mode_keeps_exactly_the_budget_spread_over_the_grid():
    ctx = _ctx([_full(24, 24)], [[(24, 24)]])
    (kept,) = kept_positions(Uniform(stride=None).select(ctx, [100]))
    assert kept.numel() == 100 and kept.unique().numel() == 100
    rows, cols = (kept // 24).float(), (kept % 24).float()
    assert abs(rows.mean().item() - 11.5) < 1.5 and abs(cols.mean().item() - 11.5) < 1.5
    assert rows.max() - rows.min() >= 20 and cols.max() - cols.min() >= 20


def test_uniform_budget_mode_matching_a_stride_grid_returns_that_grid():
    ctx = _ctx([_full(24, 24)], [[(24, 24)]])
    spread, grid = (kept_positions(Uniform(stride=stride).select(ctx, [k]))[0] for stride, k in ((None, 64), (3, 0)))
    assert torch.equal(spread, grid)


def test_uniform_budget_mode_splits_the_budget_over_images_by_present_tokens():
    ctx = _ctx([_full(4, 4).tolist() + (16 + _full(2, 4)).tolist()], [[(4, 4), (2, 4)]])
    (kept,) = kept_positions(Uniform(stride=None).select(ctx, [6]))
    assert (kept < 16).sum() == 4 and (kept >= 16).sum() == 2


def test_uniform_budget_mode_is_deterministic_and_stays_within_present_tokens():
    present = torch.tensor([i for i in range(36) if i % 5 != 0])
    ctx = _ctx([present], [[(6, 6)]])
    first = kept_positions(Uniform(stride=None).select(ctx, [11]))[0]
    assert torch.equal(first, kept_positions(Uniform(stride=None).select(ctx, [11]))[0])
    assert first.numel() == 11 and int(first.max()) < present.numel()


# --- RandomScore -------------------------------------------------------------------------------------------


def _random_pick(seed=0, stage_index=0, ids=None, k=20):
    ids = _full(8, 8) if ids is None else ids
    ctx = _ctx([ids], [[(8, 8)]], stage_index=stage_index)
    return ids[kept_positions(RandomScore(seed=seed).select(ctx, [k]))[0]]


def test_random_is_deterministic_for_a_seed():
    assert torch.equal(_random_pick(seed=3), _random_pick(seed=3))


def test_random_differs_across_seeds_and_stages():
    assert not torch.equal(_random_pick(seed=0), _random_pick(seed=1))
    assert not torch.equal(_random_pick(stage_index=0), _random_pick(stage_index=1))


def test_random_pick_of_a_sample_does_not_depend_on_the_batch():
    a, b = torch.arange(0, 64, 2), torch.arange(64)
    alone = kept_positions(RandomScore(seed=7).select(_ctx([a], [[(8, 8)]]), [10]))[0]
    batched = kept_positions(RandomScore(seed=7).select(_ctx([b, a], [[(8, 8)], [(8, 8)]]), [30, 10]))[1]
    assert torch.equal(alone, batched)


def test_random_scores_follow_original_ids_not_positions():
    full = RandomScore().scores(_ctx([_full(8, 8)], [[(8, 8)]]))[0]
    some = torch.tensor([3, 9, 40])
    assert torch.equal(RandomScore().scores(_ctx([some], [[(8, 8)]]))[0], full[some])


# --- KnnDensity --------------------------------------------------------------------------------------------


def _two_clusters_and_outliers() -> torch.Tensor:
    angles = torch.arange(6) * (2 * torch.pi / 6)
    ring = torch.stack([angles.cos(), angles.sin()], dim=1)
    tight = torch.cat([torch.zeros(1, 2), 0.1 * ring])  # centre at index 0
    loose = torch.cat([torch.zeros(1, 2), 0.2 * ring]) + torch.tensor([10.0, 0.0])  # centre at index 7
    outliers = torch.tensor([[50.0, 50.0], [-40.0, 30.0], [20.0, -60.0]])
    return torch.cat([tight, loose, outliers])


def test_knn_ranks_the_cluster_centres_first_and_outliers_last():
    x = _two_clusters_and_outliers()
    ctx = _ctx([torch.arange(len(x))], [[(1, len(x))]], features=[x])
    order = KnnDensity(k=5).ranking(ctx)[0].tolist()
    assert order[:2] == [0, 7]
    assert set(order[-3:]) == {14, 15, 16}
    assert kept_positions(KnnDensity(k=5, shrink_k=False).select(ctx, [2]))[0].tolist() == [0, 7]


def test_knn_scores_only_the_present_tokens_in_their_order():
    x = _two_clusters_and_outliers()
    present = torch.tensor([1, 2, 3, 7, 8, 9, 10, 14])
    pruned = _ctx([present], [[(1, len(x))]], features=[x])
    alone = _ctx([torch.arange(8)], [[(1, 8)]], features=[x[present]])
    assert torch.equal(KnnDensity(k=3).scores(pruned)[0], KnnDensity(k=3).scores(alone)[0])


def test_knn_breaks_exact_ties_towards_the_earlier_token():
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [5.0, 5.0]])
    (score,) = KnnDensity(k=2).scores(_ctx([torch.arange(3)], [[(1, 3)]], features=[x]))
    assert score[0] > 0 and score[1] == 0


def test_knn_fallback_of_the_densest_token_is_the_global_or_the_row_max():
    x = torch.tensor([[0.0], [1.0], [1.1], [3.0]])  # 1 and 1.1 tie; the row max of token 1 is 2, not 3
    ctx = _ctx([torch.arange(4)], [[(1, 4)]], features=[x])
    globally = KnnDensity(k=2, delta_fallback="global").scores(ctx)[0]
    by_row = KnnDensity(k=2, delta_fallback="row").scores(ctx)[0]
    assert int(globally.argmax()) == 1
    assert globally[1] == pytest.approx(3.0, rel=1e-2)  # ρ ≈ 1 times the global max distance
    assert by_row[1] == pytest.approx(2.0, rel=1e-2)  # ρ ≈ 1 times its own farthest distance
    assert torch.equal(by_row[[0, 2, 3]], globally[[0, 2, 3]])


def test_knn_handles_fewer_tokens_than_neighbours():
    x = torch.randn(3, 4)
    (score,) = KnnDensity(k=5).scores(_ctx([torch.arange(3)], [[(1, 3)]], features=[x]))
    assert score.shape == (3,) and torch.isfinite(score).all()


def test_knn_needs_vision_features():
    assert KnnDensity().requires == frozenset({"vision_features"})
    with pytest.raises(ValueError, match="delta_fallback"):
        KnnDensity(delta_fallback="paper")


# --- ScoredCriterion and Ensemble --------------------------------------------------------------------------


def test_scored_criterion_keeps_the_top_k_as_sorted_positions():
    stub = _Fixed([[0.1, 0.9, 0.3, 0.8, 0.5]])
    ctx = _ctx([torch.arange(5)], [[(1, 5)]])
    assert kept_positions(stub.select(ctx, [3]))[0].tolist() == [1, 3, 4]
    assert kept_positions(stub.select(ctx, [5]))[0].tolist() == [0, 1, 2, 3, 4]


def test_ensemble_keeps_the_union_once():
    scores = torch.zeros(16)
    scores[[0, 2, 5]] = 1.0  # 0 and 2 are also on the stride-2 grid {0, 2, 8, 10}
    ctx = _ctx([_full(4, 4)], [[(4, 4)]])
    (kept,) = kept_positions(Ensemble((_Fixed([scores.tolist()]), Uniform(stride=2))).select(ctx, [3]))
    assert kept.tolist() == [0, 2, 5, 8, 10]


def test_ensemble_top_up_fills_to_the_sum_of_member_counts_from_the_scored_order():
    scores = torch.zeros(16)
    scores[[0, 2, 5]] = 1.0
    scores[[7, 13]] = 0.5
    scores[11] = 0.4
    ctx = _ctx([_full(4, 4)], [[(4, 4)]])
    ensemble = Ensemble((_Fixed([scores.tolist()]), Uniform(stride=2)), top_up=True)
    (kept,) = kept_positions(ensemble.select(ctx, [3]))
    assert kept.numel() == 3 + 4
    assert kept.tolist() == [0, 2, 5, 7, 8, 10, 13]


# --- Keep --------------------------------------------------------------------------------------------------


def test_keep_rounds_fractions_by_its_rounding():
    assert Keep.fraction_of_original(0.29).resolve(100, 100) == 28  # int(28.999999999999996), as official codes
    assert Keep.fraction_of_original(0.29, rounding="floor").resolve(100, 100) == 29
    assert Keep.fraction_of_original(0.29, rounding="round").resolve(100, 100) == 29
    assert Keep.fraction_of_original(0.5).resolve(577, 577) == 288
    assert Keep.fraction_of_current(0.5).resolve(576, 101) == 50
    assert Keep.count(7).resolve(576, 10) == 7


def test_keep_refuses_more_tokens_than_present():
    with pytest.raises(BudgetError, match="only 100"):
        Keep.fraction_of_original(0.5).resolve(576, 100)
    with pytest.raises(BudgetError):
        Keep.fraction_of_original(1.5)


# --- The single-stage baselines ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "layer", "keep", "criterion"),
    [
        (RandomPrune(), 0, 0.5, RandomScore),
        (RandomPrune(layer=2, ratio=0.75, seed=4), 2, 0.25, RandomScore),
        (UniformPrune(), 3, 0.25, Uniform),
        (KnnPrune(keep=None, ratio=0.75), 3, 0.25, KnnDensity),
        (KnnPrune(layer=0, keep=None, ratio=0.6, k=3), 0, 0.4, KnnDensity),
    ],
)
def test_baseline_methods_build_one_stage(method, layer, keep, criterion):
    (stage,) = method.stages()
    assert stage.layer == layer and isinstance(stage.criterion, criterion)
    assert stage.budget.of == "original" and stage.budget.value == pytest.approx(keep)
    assert stage.positions == "original"
    assert not stage.needs_attention


def test_baseline_methods_pass_their_parameters_to_the_criterion():
    assert RandomPrune(seed=9).stages()[0].criterion == RandomScore(seed=9)
    assert UniformPrune(stride=None).stages()[0].criterion == Uniform(stride=None)
    assert KnnPrune(k=7).stages()[0].criterion == KnnDensity(k=7)
    assert KnnPrune(positions="renumbered").stages()[0].positions == "renumbered"


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: RandomPrune(ratio=1.0), "ratio"),
        (lambda: RandomPrune(layer=-1), "layer"),
        (lambda: RandomPrune(positions="shifted"), "positions"),
        (lambda: UniformPrune(stride=0), "stride"),
        (lambda: UniformPrune(ratio=-0.1), "ratio"),
        (lambda: KnnPrune(k=0), "k"),
        (lambda: KnnPrune(keep=None, ratio=1.2), "ratio"),
    ],
)
def test_baseline_methods_reject_bad_parameters(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_random_per_sample_draws_differ_between_samples_with_the_same_tokens():
    ids = _full(8, 8)
    ctx = _ctx([ids, ids], [[(8, 8)], [(8, 8)]])
    shared = kept_positions(RandomScore(seed=1).select(ctx, [10, 10]))
    assert torch.equal(shared[0], shared[1])
    own = kept_positions(RandomScore(seed=1, per_sample=True).select(ctx, [10, 10]))
    assert not torch.equal(own[0], own[1])
    again = kept_positions(RandomScore(seed=1, per_sample=True).select(ctx, [10, 10]))
    assert all(torch.equal(a, b) for a, b in zip(own, again, strict=True))
