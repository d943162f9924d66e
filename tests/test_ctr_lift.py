"""Aggregate CTR lift as an A/B test measures it (training.metrics.aggregate_ctr_lift) and selection with the
original image always a candidate (training.metrics.pick_over_original)."""
from __future__ import annotations

import numpy as np
import pytest

from cg4ctr_fast.training.metrics import aggregate_ctr_lift, pick_over_original


def test_aggregate_lift_against_the_mean_of_ratios_by_hand():
    """A large group slightly down, a small group far up: −2.0 % in aggregate, +26.0 % as a mean of ratios.

    Group A: 90 % of the traffic, control 4 %, treatment 3.856 % (−3.6 %); group B: 10 %, 1 % → 1.556 % (+55.6 %).
    Clicks per 1000 impressions: control 900·0.04 + 100·0.01 = 37; treatment 900·0.03856 + 100·0.01556 = 36.26.
    36.26 / 37 − 1 = −2.0 %; (−3.6 % + 55.6 %) / 2 = +26.0 %.
    """
    result = aggregate_ctr_lift([0.03856, 0.01556], [0.04, 0.01], [0.9, 0.1])
    assert result.lift == pytest.approx(-0.02, abs=1e-12)
    assert result.mean_of_ratios == pytest.approx(0.26, abs=1e-12)
    assert result.treatment_ctr == pytest.approx(0.03626, abs=1e-12)
    assert result.control_ctr == pytest.approx(0.037, abs=1e-12)
    assert np.isnan(result.ci95[0]) and np.isnan(result.ci95[1]) and result.clusters == 0  # no clusters, no CI
    # Any positive scale of the traffic gives the same lift (shares or impression counts).
    assert aggregate_ctr_lift([0.03856, 0.01556], [0.04, 0.01], [900, 100]).lift == pytest.approx(result.lift, abs=1e-12)
    # Equal weights: the two groups count alike.
    assert aggregate_ctr_lift([0.03856, 0.01556], [0.04, 0.01]).lift == pytest.approx(
        (0.03856 + 0.01556) / 0.05 - 1, abs=1e-12)


def test_weight_is_the_same_as_repeating_a_cell():
    rng = np.random.default_rng(3)
    t, c = rng.uniform(0.01, 0.06, 5), rng.uniform(0.01, 0.06, 5)
    counts = np.array([1, 3, 2, 5, 1])
    weighted = aggregate_ctr_lift(t, c, counts)
    repeated = aggregate_ctr_lift(np.repeat(t, counts), np.repeat(c, counts))
    assert weighted.lift == pytest.approx(repeated.lift, rel=1e-12)
    # Zero weight: the cell does not count at all.
    assert aggregate_ctr_lift([0.05, 0.9], [0.04, 0.01], [1.0, 0.0]).lift == pytest.approx(0.25, abs=1e-12)


@pytest.mark.parametrize("t, c, w, needle", [
    ([0.1], [0.0], None, "control CTRs must be > 0"),
    ([0.1, 0.2], [0.1], None, "different lengths"),
    ([], [], None, "no cells"),
    ([0.1], [0.1], [-1.0], "weights must be ≥ 0"),
    ([0.1], [0.1], [0.0], "weights must be ≥ 0"),
    ([np.nan], [0.1], None, "finite"),
])
def test_bad_input_raises(t, c, w, needle):
    with pytest.raises(ValueError, match=needle):
        aggregate_ctr_lift(t, c, w)


def test_bootstrap_interval_collapses_when_every_cluster_agrees():
    # Every cell at +10 %: every resample gives +10 %, both intervals are that point.
    c = np.random.default_rng(0).uniform(0.01, 0.05, 24)
    result = aggregate_ctr_lift(1.1 * c, c, np.arange(1, 25), clusters=[k // 8 for k in range(24)])
    assert result.clusters == 3 and result.cells == 24
    assert result.ci95 == pytest.approx((0.1, 0.1), abs=1e-12)
    assert result.mean_of_ratios_ci95 == pytest.approx((0.1, 0.1), abs=1e-12)


def test_bootstrap_interval_matches_the_delta_method():
    """Independent clusters: the percentile interval of the ratio estimator ≈ ±1.96 delta-method standard errors,
    SE² = Σ_k (T_k − R·C_k)² / (Σ_k C_k)² with T_k, C_k the cluster's weighted sums and R = ΣT/ΣC."""
    rng = np.random.default_rng(1)
    n_clusters, per = 300, 4
    c = rng.uniform(0.01, 0.05, n_clusters * per)
    t = c * rng.lognormal(0.05, 0.3, n_clusters * per)
    w = rng.uniform(0.1, 1.0, n_clusters * per)
    clusters = np.repeat(np.arange(n_clusters), per)
    result = aggregate_ctr_lift(t, c, w, clusters=clusters.tolist(), resamples=4000, seed=2)
    T = np.bincount(clusters, weights=w * t)
    C = np.bincount(clusters, weights=w * c)
    ratio = T.sum() / C.sum()
    se = np.sqrt(np.sum((T - ratio * C) ** 2)) / C.sum()
    assert result.lift == pytest.approx(ratio - 1, rel=1e-12)
    assert result.ci95[0] < result.lift < result.ci95[1]
    assert result.ci95[1] - result.ci95[0] == pytest.approx(2 * 1.96 * se, rel=0.1)
    assert (result.ci95[0] + result.ci95[1]) / 2 == pytest.approx(result.lift, abs=0.5 * se)


def test_correlated_cells_widen_the_interval():
    """8 groups of one product move together: clustering by product gives a wider interval than pretending
    the 400 cells are independent (each its own cluster)."""
    rng = np.random.default_rng(4)
    per_product = rng.lognormal(0.0, 0.3, 50)
    c = np.full(400, 0.03)
    t = c * np.repeat(per_product, 8)
    by_product = aggregate_ctr_lift(t, c, clusters=np.repeat(np.arange(50), 8).tolist(), resamples=3000)
    by_cell = aggregate_ctr_lift(t, c, clusters=list(range(400)), resamples=3000)
    assert by_product.lift == by_cell.lift
    width = lambda r: r.ci95[1] - r.ci95[0]  # noqa: E731
    assert width(by_product) > 2.0 * width(by_cell)  # √8 ≈ 2.8 in expectation


def test_bootstrap_is_seeded():
    rng = np.random.default_rng(5)
    t, c = rng.uniform(0.01, 0.05, 40), rng.uniform(0.01, 0.05, 40)
    clusters = [k // 4 for k in range(40)]
    assert aggregate_ctr_lift(t, c, clusters=clusters, seed=7) == aggregate_ctr_lift(t, c, clusters=clusters, seed=7)


@pytest.mark.parametrize("rewards, original, expected", [
    ([0.02, 0.05, 0.03], 0.04, 1),  # the best creative beats the photo
    ([0.02, 0.03], 0.04, None),  # none does: keep the photo
    ([0.04, 0.01], 0.04, None),  # a tie keeps the photo
    ([], 0.04, None),  # nothing generated
    ([0.05, 0.05], 0.01, 0),  # equal creatives: the first, as a stable sort
])
def test_pick_over_original(rewards, original, expected):
    assert pick_over_original(rewards, original) == expected


def test_selection_never_loses_to_the_original_with_a_right_reward():
    """If the reward orders candidates like the true CTR, serving pick_over_original's choice never has a lower
    true CTR than the original, in every cell, so the aggregate lift is ≥ 0; with a reward that cannot tell
    the candidates apart, the photo is kept everywhere and the lift is exactly 0."""
    rng = np.random.default_rng(6)
    served, constant, base = [], [], []
    for _ in range(200):
        original = rng.uniform(0.01, 0.05)
        creatives = original * rng.lognormal(-0.1, 0.3, 4)  # most creatives worse than the photo
        pick = pick_over_original(list(creatives), original)
        served.append(original if pick is None else creatives[pick])
        flat = pick_over_original([0.3] * 4, 0.3)
        constant.append(original if flat is None else creatives[flat])
        base.append(original)
    assert all(s >= b for s, b in zip(served, base))
    assert aggregate_ctr_lift(served, base).lift > 0
    assert aggregate_ctr_lift(constant, base).lift == 0.0


def test_world_group_traffic_is_the_share_of_logged_impressions():
    from cg4ctr_fast.sim import World

    world = World(seed=0)
    shares = world.group_traffic()
    assert shares.shape == (world.n_groups,) and shares.sum() == pytest.approx(1.0, abs=1e-12) and (shares > 0).all()
    logs = world.sample_logs(2, 2, 40, np.random.default_rng(0)).logs
    per_group = logs.groupby("group_id")["impressions"].sum().reindex(range(world.n_groups)).to_numpy()
    # ≥ 11,000 impressions per group here: Poisson noise ≤ 1 % relative (measured worst 2 %), so 10 % is safe.
    np.testing.assert_allclose(per_group / per_group.sum(), shares, rtol=0.1)
