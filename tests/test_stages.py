"""The A/B-stage simulator (cg4ctr_fast.training.stages): the ranker's rule, the perfect-ranker bound, the
scoring cost, the bootstrap's mechanics, the cache, World.bid and the command line's refusals.

Most tests use small hand-made or random tables (generation is not the point); one runs the whole command on
the embedded toy models at a tiny size (2 products, 2 steps) to check the stored-embedding path and the cache.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cg4ctr_fast.errors import InputError
from cg4ctr_fast.training import stages
from cg4ctr_fast.training.stages import ARMS, Requests, StageTable, draw_requests, serve, serve_arms
from tests.test_sim import _cli, assert_refused


def random_table(seed: int, products: int, groups: int, slots: int) -> StageTable:
    rng = np.random.default_rng(seed)
    pred = rng.uniform(0.005, 0.1, (products, groups, slots))
    # true CTR correlated with pred but not equal: the model is imperfect on purpose
    true = np.clip(pred * rng.lognormal(0.0, 0.4, pred.shape), 1e-4, 1.0)
    return StageTable(np.arange(products) + 1000, rng.lognormal(0.0, 0.5, products), pred, true)


def reference_serve(table: StageTable, requests: Requests, stage: str, ranker: str):
    """A plain loop over requests and candidates: the rule written out, to compare the vectorised one with."""
    score = table.pred if ranker == "model" else table.true
    out = []
    for r in range(requests.n):
        g = int(requests.groups[r])
        best_key, best = -math.inf, None
        for p in requests.candidates[r]:
            slots = score[p, g]
            chosen = 0  # the photo is kept unless a creative is strictly better
            for c in range(1, len(slots)):
                if slots[c] > slots[chosen]:
                    chosen = c
            if stage == "photo":
                key, shown = slots[0] * table.bids[p], 0
            elif stage == "A":
                key, shown = slots[0] * table.bids[p], chosen
            else:
                key, shown = slots[chosen] * table.bids[p], chosen
            if key > best_key:  # ties keep the first candidate
                best_key, best = key, (int(p), shown)
        p, c = best
        ctr = table.true[p, g, c]
        out.append((p, c, ctr, table.bids[p] * ctr))
    return out


@pytest.mark.parametrize("seed, products, groups, slots, candidates", [
    (0, 7, 3, 5, 3), (1, 11, 5, 2, 5), (2, 5, 1, 7, 5), (3, 13, 8, 4, 1), (4, 9, 2, 1, 4),
])
def test_serving_matches_the_reference_loop(seed, products, groups, slots, candidates):
    table = random_table(seed, products, groups, slots)
    traffic = np.random.default_rng(seed + 50).dirichlet(np.ones(groups))
    requests = draw_requests(products, traffic, 97, candidates, np.random.default_rng(seed))
    served = serve_arms(table, requests)
    for arm, (stage, ranker) in ARMS.items():
        ref = reference_serve(table, requests, stage, ranker)
        s = served[arm]
        assert s.winner.tolist() == [x[0] for x in ref], arm
        assert s.slot.tolist() == [x[1] for x in ref], arm
        np.testing.assert_allclose(s.ctr, [x[2] for x in ref], rtol=0, atol=1e-15)
        np.testing.assert_allclose(s.revenue, [x[3] for x in ref], rtol=1e-12, atol=0)
        one = serve(table, requests, stage, ranker)  # the single-arm entry point agrees with serve_arms
        assert np.array_equal(one.winner, s.winner) and np.array_equal(one.slot, s.slot)


@pytest.mark.parametrize("seed, products, groups, slots, candidates", [
    (10, 7, 3, 5, 3), (11, 17, 5, 3, 9), (12, 5, 1, 6, 5), (13, 23, 8, 4, 7), (14, 3, 2, 2, 2),
])
def test_b_stage_with_a_perfect_ranker_is_never_worse(seed, products, groups, slots, candidates):
    """B with the oracle as ranker maximises bid × true CTR over every (item, candidate) of a request, so no
    arm — A with either ranker, B with the model, the photo — earns more on any request, nor in total."""
    table = random_table(seed, products, groups, slots)
    traffic = np.random.default_rng(seed).dirichlet(np.ones(groups))
    requests = draw_requests(products, traffic, 301, candidates, np.random.default_rng(seed + 1))
    served = serve_arms(table, requests)
    best = served["B_perfect"].revenue
    # the bound itself, computed independently: the max over candidates and slots of bid × true CTR
    gathered = table.true[requests.candidates, requests.groups[:, None]] * table.bids[requests.candidates][..., None]
    np.testing.assert_allclose(best, gathered.max(axis=(1, 2)), rtol=1e-12)
    for arm in ARMS:
        assert np.all(best >= served[arm].revenue - 1e-15), arm
        assert best.sum() >= served[arm].revenue.sum() - 1e-12, arm
    # and on these imperfect tables the bound is strict somewhere for A and for the model's B
    assert np.any(best > served["A"].revenue + 1e-12) and np.any(best > served["B"].revenue + 1e-12)


def test_the_ranker_orders_by_predicted_ctr_times_bid():
    """Planted: item 2 has the highest predicted CTR, item 1 the highest bid, but item 0 has the highest photo
    prediction × bid (A's key) and item 1 the highest best-candidate prediction × bid (B's key)."""
    bids = np.array([1.0, 2.0, 0.5])
    pred = np.array([[[0.050, 0.049]], [[0.020, 0.040]], [[0.090, 0.085]]])  # [P=3, G=1, C=2]
    true = np.array([[[0.030, 0.060]], [[0.010, 0.045]], [[0.070, 0.020]]])
    table = StageTable(np.array([7, 8, 9]), bids, pred, true)
    requests = Requests(np.array([[0, 1, 2], [2, 1, 0], [2, 0, 1], [1, 2, 0]]), np.zeros(4, np.int64), np.full(4, 0.5))
    a, b = serve(table, requests, "A"), serve(table, requests, "B")
    photo = serve(table, requests, "photo")
    assert a.winner.tolist() == [0] * 4 and a.slot.tolist() == [0] * 4  # item 0 keeps its photo: 0.049 < 0.050
    assert b.winner.tolist() == [1] * 4 and b.slot.tolist() == [1] * 4  # 0.040 × 2.0 = 0.080 beats 0.050
    assert photo.winner.tolist() == [0] * 4
    np.testing.assert_allclose(a.revenue, 1.0 * 0.030)
    np.testing.assert_allclose(b.revenue, 2.0 * 0.045)
    # the perfect ranker: A ranks photos by true × bid (item 2: 0.035) and shows item 2's best (photo, 0.07);
    # B ranks best true × bid: item 1 (2 × 0.045 = 0.09) over item 0 (0.06) and item 2 (0.035)
    ap, bp = serve(table, requests, "A", "oracle"), serve(table, requests, "B", "oracle")
    assert ap.winner.tolist() == [2] * 4 and ap.slot.tolist() == [0] * 4
    assert bp.winner.tolist() == [1] * 4 and bp.slot.tolist() == [1] * 4
    # a tie between the photo and a creative keeps the photo; a tie between items keeps the first candidate
    tie = StageTable(np.array([1, 2]), np.array([1.0, 1.0]), np.full((2, 1, 3), 0.04), np.full((2, 1, 3), 0.02))
    s = serve(tie, Requests(np.array([[1, 0]]), np.zeros(1, np.int64), np.zeros(1)), "B")
    assert s.slot.tolist() == [0] and s.winner.tolist() == [1]


@pytest.mark.parametrize("candidates, slots", [(1, 1), (3, 5), (7, 2), (5, 9)])
def test_candidates_scored_per_request(candidates, slots):
    """A (and photo only) score the N photos; B scores all N × C stored candidates of the request's group."""
    table = random_table(candidates + slots, 11, 2, slots)
    requests = draw_requests(11, np.array([0.3, 0.7]), 13, candidates, np.random.default_rng(0))
    served = serve_arms(table, requests)
    for arm, (stage, _) in ARMS.items():
        assert served[arm].scored == (candidates * slots if stage == "B" else candidates), arm


def test_online_scoring_batches_equal_the_stored_table():
    """time_scoring's gather: A scores the N photos, B the N × C candidates, and A's scores are B's slot 0."""
    import torch

    from cg4ctr_fast.models.reward import RewardConfig, RewardModel

    torch.manual_seed(0)
    cfg = RewardConfig(group_dim=3, title_vocab_size=11, caption_vocab_size=13, image_channels=(4, 4, 8, 8),
                       token_dim=8, tower_hidden=16, d_model=8, n_heads=2, n_layers=1, ff_dim=16, head_hidden=8)
    reward = RewardModel(cfg).eval()
    P, G, C = 5, 3, 4
    gen = torch.Generator().manual_seed(1)
    bank = stages.ScoringBank(torch.randn(P, G, C, 8, generator=gen),
                              torch.randint(0, 11, (P, cfg.max_title_tokens), generator=gen),
                              torch.randint(0, 13, (P, G, C, cfg.max_caption_tokens), generator=gen),
                              torch.randn(G, 3, generator=gen))
    cand = np.array([4, 0, 2])
    with torch.inference_mode():
        a = stages._score_request(reward, bank, cand, 1, all_slots=False)
        b = stages._score_request(reward, bank, cand, 1, all_slots=True)
        ref = reward.score(bank.embeddings[cand, 1].reshape(-1, 8), bank.title_ids[cand].repeat_interleave(C, 0),
                           bank.caption_ids[cand, 1].reshape(-1, cfg.max_caption_tokens), bank.group_features[1:2])
    assert a.shape == (3,) and b.shape == (3 * C,)
    torch.testing.assert_close(b, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(a, b.reshape(3, C)[:, 0], rtol=0, atol=1e-6)
    times = stages.time_scoring(reward, bank, Requests(np.array([[1, 2], [3, 4]]), np.array([0, 2]), np.zeros(2)),
                                warmup=1)
    assert {k: v.shape for k, v in times.items()} == {"A": (2,), "B": (2,)}
    assert all(np.all(np.isfinite(v) & (v >= 0)) for v in times.values())


def test_requests_are_distinct_and_follow_traffic():
    traffic = np.array([0.1, 0.6, 0.3])
    req = draw_requests(9, traffic, 20000, 4, np.random.default_rng(5))
    assert req.candidates.shape == (20000, 4) and req.candidates.min() >= 0 and req.candidates.max() <= 8
    assert all(len(set(row)) == 4 for row in req.candidates[:2000].tolist())
    share = np.bincount(req.groups, minlength=3) / 20000
    # multinomial: within 5 standard errors of the traffic shares
    assert np.all(np.abs(share - traffic) < 5 * np.sqrt(traffic * (1 - traffic) / 20000))
    with pytest.raises(InputError, match="candidates"):
        draw_requests(3, traffic, 5, 4, np.random.default_rng(0))


def test_bootstrap_mechanics():
    # Constant pools: every product alike, so any resample and any requests give exactly R × CTR × bid.
    g = 2
    t1 = StageTable(np.arange(4), np.full(4, 2.0), np.full((4, g, 3), 0.05), np.full((4, g, 3), 0.04))
    t2 = StageTable(np.arange(5), np.full(5, 0.5), np.full((5, g, 3), 0.05), np.full((5, g, 3), 0.02))
    boot = stages.bootstrap_arms([t1, t2], np.array([0.5, 0.5]), 37, 3, resamples=25, seed=0)
    for arm in ARMS:
        np.testing.assert_allclose(boot[arm]["expected_clicks"], 37 * (0.04 + 0.02), rtol=1e-12)
        np.testing.assert_allclose(boot[arm]["revenue"], 37 * (2.0 * 0.04 + 0.5 * 0.02), rtol=1e-12)
    # Creatives never predicted above the photo: A and B serve alike on every resample, so B/A is exactly 1,
    # while the totals themselves vary between resamples (products differ).
    table = random_table(3, 9, 3, 4)
    pred = table.pred.copy()
    pred[..., 1:] = pred[..., :1] * 0.5
    flat = StageTable(table.item_ids, table.bids, pred, table.true)
    boot = stages.bootstrap_arms([flat], np.array([0.2, 0.3, 0.5]), 50, 4, resamples=30, seed=1)
    np.testing.assert_array_equal(boot["B"]["revenue"], boot["A"]["revenue"])
    np.testing.assert_array_equal(boot["A"]["revenue"], boot["photo"]["revenue"])
    assert np.std(boot["A"]["revenue"]) > 0


def test_table_checks_and_cache_roundtrip(tmp_path):
    with pytest.raises(InputError, match=r"\[P, G, C\]"):
        StageTable(np.arange(2), np.ones(2), np.full((2, 3), 0.1), np.full((2, 3), 0.1))
    with pytest.raises(InputError, match="bids"):
        StageTable(np.arange(2), np.array([1.0, 0.0]), np.full((2, 1, 2), 0.1), np.full((2, 1, 2), 0.1))
    with pytest.raises(InputError, match="pred"):
        StageTable(np.arange(2), np.ones(2), np.full((2, 1, 2), 1.5), np.full((2, 1, 2), 0.1))
    rng = np.random.default_rng(0)
    item = {"pred": rng.random((3, 5)), "true": rng.random((3, 5)), "embeddings": rng.random((3, 5, 7), np.float32),
            "caption_ids": rng.integers(0, 9, (3, 5, 4)), "title_ids": rng.integers(0, 9, 6),
            "prompts": [["a b"] * 4] * 3, "seconds": 1.25}
    path = tmp_path / "cache" / "item_1.safetensors"
    stages._save_item(path, "k1", item)
    back = stages._load_item(path, "k1")
    for key in ("pred", "true", "embeddings", "caption_ids", "title_ids"):
        np.testing.assert_array_equal(back[key], item[key])
    assert back["prompts"] == item["prompts"] and back["seconds"] == 1.25
    assert stages._load_item(path, "another key") is None  # other models or settings: regenerated
    path.write_bytes(b"not a safetensors file")
    assert stages._load_item(path, "k1") is None


def test_world_bid_is_a_stable_lognormal():
    from cg4ctr_fast.sim.world import BID_MEDIAN, BID_SIGMA, World

    w, again, other = World(seed=3), World(seed=3), World(seed=4)
    ids = range(0, 4000, 2)
    bids = np.array([w.bid(i) for i in ids])
    assert np.array_equal(bids, [again.bid(i) for i in ids]) and np.all(bids > 0)
    assert not np.allclose(bids[:50], [other.bid(i) for i in list(ids)[:50]])
    logs = np.log(bids)
    n = len(logs)
    assert abs(logs.mean() - math.log(BID_MEDIAN)) < 4 * BID_SIGMA / math.sqrt(n)
    assert abs(logs.std() - BID_SIGMA) < 4 * BID_SIGMA / math.sqrt(2 * n)
    with pytest.raises(InputError):
        w.bid(-1)
    assert w.fingerprint() == World(seed=3).fingerprint()


# ----------------------------------------------------------------------------- command line


@pytest.mark.parametrize("args, message", [
    (["--products", "4", "--candidates", "5"], "cannot exceed --products"),
    (["--candidates", "0"], "--candidates must be ≥ 1"),
    (["--requests", "-3"], "--requests must be ≥ 1"),
    (["--seeds", "0", "-1"], "--seeds must be non-negative"),
    (["--seeds", "2", "2"], "--seeds must be distinct"),
    (["--resamples", "5"], "--resamples must be ≥ 20"),
    (["--steps", "0"], "--steps must be ≥ 1"),
    (["--threads", "0"], "--threads must be ≥ 1"),
    (["--reward", "somewhere"], "give all four model folders or none"),
    (["--requests", "many"], "invalid int value"),
])
def test_cli_rejects_bad_input(tmp_path, capsys, args, message):
    assert_refused(capsys, tmp_path, message, "stages", *args)


def test_cli_refuses_a_foreign_out_folder(tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    code, cap = _cli(capsys, "stages", "--out", str(busy), "--quiet")
    assert code == 2 and len(cap.err.strip().splitlines()) == 1 and "not a `cg4ctr-sim stages` folder" in cap.err
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    file = tmp_path / "file"
    file.write_text("x")
    code, cap = _cli(capsys, "stages", "--out", str(file), "--quiet")
    assert code == 2 and "not a directory" in cap.err and file.read_text() == "x"


def test_end_to_end_on_the_toy_models_reuses_its_cache(tmp_path, capsys):
    """Tiny but real: the toy generator makes the creatives, the stored-embedding head must reproduce the
    reward model's scores (checked inside), and a rerun into the same folder generates nothing."""
    import torch

    torch.set_num_threads(1)
    out = tmp_path / "stages"
    argv = ["stages", "--out", str(out), "--products", "2", "--candidates", "2", "--requests", "40",
            "--prompts-per-group", "1", "--images-per-prompt", "1", "--steps", "2", "--resamples", "20",
            "--timed-requests", "3", "--quiet"]
    code, cap = _cli(capsys, *argv)
    assert code == 0, cap.err
    first = json.loads((out / "results.json").read_text())
    assert first["build"]["cache_hits"] == 0 and first["settings"]["slots_per_item_group"] == 2
    assert sorted(p.name for p in out.iterdir()) >= ["cache", "results.json", "results.md"]
    cost = first["cost"]
    assert cost["A"]["candidates_scored_per_request"] == 2 and cost["B"]["candidates_scored_per_request"] == 4
    arms = first["arms"]
    assert arms["B_perfect"]["revenue"]["total"] >= max(arms[a]["revenue"]["total"] for a in arms) - 1e-12
    code, cap = _cli(capsys, *argv)
    assert code == 0, cap.err
    second = json.loads((out / "results.json").read_text())
    assert second["build"]["cache_hits"] == 2
    for arm in arms:  # the same stored table and the same seeded requests: the same totals
        assert second["arms"][arm]["revenue"]["total"] == arms[arm]["revenue"]["total"]


def test_ranker_noise_sweep_starts_at_the_perfect_ranker():
    table = random_table(21, 9, 3, 4)
    noise = np.random.default_rng(0).standard_normal(table.pred.shape)
    exact = stages.noisy_oracle(table, 0.0, noise)
    np.testing.assert_array_equal(exact.pred, table.true)
    requests = draw_requests(9, np.array([0.2, 0.3, 0.5]), 83, 4, np.random.default_rng(1))
    for stage in ("A", "B"):
        a, b = serve(exact, requests, stage, "model"), serve(table, requests, stage, "oracle")
        assert np.array_equal(a.winner, b.winner) and np.array_equal(a.slot, b.slot)
    rows = stages.ranker_noise_sweep([table], np.array([0.2, 0.3, 0.5]), (0.0, 0.4), 83, 4, resamples=20, seed=3)
    assert [r["sigma"] for r in rows] == [0.0, 0.4]
    # at sigma 0, B is B_perfect: never below A_perfect on any request, so neither the ratio nor its interval
    assert rows[0]["revenue"]["ratio"] >= 1.0 and rows[0]["revenue"]["ci95"][0] >= 1.0
    # the perfect ranker's pick is never below the photo; by hand: traffic-weighted max over slots / photo − 1
    w = np.array([0.2, 0.3, 0.5])
    expected = (table.true.max(axis=2) * w).sum() / (table.true[..., 0] * w).sum() - 1.0
    assert rows[0]["selection_lift"] == pytest.approx(expected, rel=1e-12) and expected > 0
    # the model's error on the sweep's scale: a per-group offset does not count, the spread does
    rng = np.random.default_rng(4)
    offset = rng.normal(0, 1, (1, 3, 1))
    planted = StageTable(table.item_ids, table.bids, np.clip(table.true * np.exp(offset - 2.0), 0, 1), table.true)
    assert stages.model_log_error([planted]) < 1e-9
    eps = rng.standard_normal(table.true.shape)
    noisy = StageTable(table.item_ids, table.bids, np.clip(table.true * np.exp(offset - 3.0 + 0.3 * eps), 0, 1),
                       table.true)
    n = eps.size
    assert abs(stages.model_log_error([noisy]) - 0.3) < 4 * 0.3 / math.sqrt(2 * n) + 0.02
