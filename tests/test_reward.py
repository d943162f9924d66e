"""Reward (CTR) model: metrics, Beta prior, loaders for the three log layouts, training, files, CLI.

The synthetic logs here are made in the test (`make_sim_world`), not by `cg4ctr_fast.sim`: flat-ish
coloured backgrounds around a product square, and user groups that click more on the colours they
prefer (group 0 reddish, group 1 bluish, further groups random colour directions).
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

FIXTURES = Path(__file__).parent / "fixtures"

_STYLE_WORDS = {0: "red warm", 1: "green fresh", 2: "blue cool"}


def make_sim_world(root: Path, *, n_items: int = 16, creatives_per_item: int = 6, n_groups: int = 2,
                   size: int = 16, days: int = 2, impressions: int = 1500, effect: float = 1.2,
                   seed: int = 0) -> Path:
    """Write a small sim-layout folder: logs.parquet, creatives.parquet, groups.json, items.parquet, creatives/.

    True CTR(creative, group) = item_base · exp(effect · w_g · (rgb − 0.5)), with w_0 = reddish,
    w_1 = bluish and random unit directions for further groups; clicks ~ Binomial(impressions, CTR)
    with impressions ~ Poisson per day.  logs.parquet also carries `true_ctr` (ignored by the loader)
    so a test can compare the model with the oracle.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "creatives").mkdir(parents=True, exist_ok=True)
    prefs = [np.array([1.0, 0.0, -0.6]), np.array([-0.6, 0.0, 1.0])]
    while len(prefs) < n_groups:
        v = rng.normal(size=3)
        prefs.append(v / np.linalg.norm(v))
    groups = [
        {"group_id": g, "age_band": ["18-24", "25-34", "35-44", "45+"][g % 4], "gender": "fm"[g % 2],
         "region": "north" if g % 3 else "south", "interest": ["tech", "home", "fashion"][g % 3],
         "features": [1.0 if j == g else 0.0 for j in range(n_groups)]}
        for g in range(n_groups)
    ]
    (root / "groups.json").write_text(json.dumps(groups))
    creatives, items, logs = [], [], []
    for item in range(n_items):
        base = rng.uniform(0.02, 0.06)
        product = rng.integers(0, 256, 3)
        title = f"product {item} {['lamp', 'mug', 'shoe', 'bag'][item % 4]}"
        items.append({"item_id": item, "title": title, "category": item % 4})
        for k in range(creatives_per_item):
            cid = f"c{item:03d}_{k}"
            colour = rng.uniform(0, 1, 3)
            pixels = np.clip(colour * 255 + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
            q = size // 4
            pixels[q : size - q, q : size - q] = product
            Image.fromarray(pixels).save(root / "creatives" / f"{cid}.png")
            caption = f"{_STYLE_WORDS[int(np.argmax(colour))]} {'bright' if colour.mean() > 0.5 else 'dark'}"
            creatives.append({"creative_id": cid, "item_id": item, "caption": caption, "title": title,
                              "file": f"{cid}.png"})
            for g in range(n_groups):
                ctr = min(0.5, base * math.exp(effect * float(prefs[g] @ (colour - 0.5))))
                for day in range(days):
                    n = int(rng.poisson(impressions))
                    logs.append({"creative_id": cid, "item_id": item, "group_id": g, "day": day,
                                 "impressions": n, "clicks": int(rng.binomial(n, ctr)), "true_ctr": ctr})
    pd.DataFrame(logs).to_parquet(root / "logs.parquet")
    pd.DataFrame(creatives).to_parquet(root / "creatives.parquet")
    pd.DataFrame(items).to_parquet(root / "items.parquet")
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return make_sim_world(tmp_path_factory.mktemp("world") / "sim")


@pytest.fixture()
def world_copy(world, tmp_path) -> Path:
    return Path(shutil.copytree(world, tmp_path / "data"))


# --------------------------------------------------------------------------------------------
# Metrics (hand-computed examples)
# --------------------------------------------------------------------------------------------

from cg4ctr_fast.training import metrics as M  # noqa: E402


def test_auc_perfect_reversed_constant_and_hand_example():
    clicks, imps = [5, 0, 7, 0], [5, 9, 7, 4]
    assert M.auc([0.9, 0.1, 0.8, 0.2], clicks, imps) == 1.0
    assert M.auc([0.1, 0.9, 0.2, 0.8], clicks, imps) == 0.0
    assert M.auc([0.3, 0.3, 0.3, 0.3], clicks, imps) == 0.5
    # One impression per row: the classic example, 3 of 4 positive-negative pairs ordered right.
    assert M.auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], [1, 1, 1, 1]) == pytest.approx(0.75)
    # Impression-weighted: row A (p .2, 1 click in 3), row B (p .6, 2 clicks in 2).  Positives 1@.2, 2@.6;
    # negatives 2@.2.  Pairs: 1·2 ties (½ each) + 2·2 wins = 5 of 6.
    assert M.auc([0.2, 0.6], [1, 2], [3, 2]) == pytest.approx(5 / 6)
    assert math.isnan(M.auc([0.2, 0.6], [0, 0], [3, 2]))


def test_auc_of_random_ranking_is_one_half():
    rng = np.random.default_rng(0)
    n = 20000
    clicks = rng.binomial(1, 0.3, n)
    assert M.auc(rng.random(n), clicks, np.ones(n)) == pytest.approx(0.5, abs=0.02)


def test_logloss_ne_and_calibration():
    assert M.logloss([0.5, 0.5], [1, 3], [2, 6]) == pytest.approx(math.log(2))
    assert M.logloss([0.2], [1], [4]) == pytest.approx(-(math.log(0.2) + 3 * math.log(0.8)) / 4)
    clicks, imps = np.array([3, 10, 0, 7]), np.array([100, 120, 50, 130])
    base = clicks.sum() / imps.sum()
    assert M.ne(np.full(4, base), clicks, imps) == pytest.approx(1.0)
    assert M.ne(clicks / imps, clicks, imps) < 1.0  # the per-row MLE beats the base rate in sample
    assert M.calibration([0.1], [5], [100]) == pytest.approx(2.0)
    assert M.calibration(np.full(4, base), clicks, imps) == pytest.approx(1.0)
    assert math.isnan(M.ne([0.1], [0], [10]))


def test_pairwise_accuracy_within_lists_only():
    lists = ["a", "a", "a", "b", "b"]
    targets = [0.3, 0.2, 0.1, 0.05, 0.01]
    assert M.pairwise_accuracy([3, 2, 1, 0, 9], targets, lists) == 0.0 + (3 + 0) / 4  # list b reversed
    assert M.pairwise_accuracy([3, 2, 1, 9, 0], targets, lists) == 1.0  # cross-list order is irrelevant
    assert M.pairwise_accuracy([1, 2, 3, 0, 9], targets, lists) == 0.0
    assert M.pairwise_accuracy([1, 1, 1, 1, 1], targets, lists) == 0.5  # score ties count ½
    assert M.pairwise_accuracy([3, 2, 1], [0.2, 0.2, 0.1], ["a"] * 3) == 1.0  # tied targets: pair skipped
    assert math.isnan(M.pairwise_accuracy([1, 2], [0.1, 0.1], ["a", "a"]))


def test_uplift_hand_example_and_oracle():
    clicks, imps, lists = [10, 5, 1], [100, 100, 100], [7, 7, 7]
    assert M.uplift_at_1([3, 2, 1], clicks, imps, lists) == pytest.approx(0.10 / (16 / 300) - 1)
    assert M.uplift_at_k([3, 2, 1], clicks, imps, lists, 2) == pytest.approx((15 / 200) / (16 / 300) - 1)
    assert M.uplift_at_1([1, 2, 3], clicks, imps, lists) == pytest.approx(0.01 / (16 / 300) - 1)
    assert math.isnan(M.uplift_at_5([3, 2, 1], clicks, imps, lists))  # ≤ 5 creatives: no list qualifies
    # An oracle ranking has positive uplift on random logs; plain and impression-weighted means.
    rng = np.random.default_rng(1)
    n_lists, per = 40, 8
    true = rng.uniform(0.01, 0.08, n_lists * per)
    imps = rng.integers(500, 3000, n_lists * per)
    clicks = rng.binomial(imps, true)
    lists = np.repeat(np.arange(n_lists), per)
    for k in (1, 5):
        assert M.uplift_at_k(true, clicks, imps, lists, k) > 0.1
        assert M.uplift_at_k(true, clicks, imps, lists, k, weighted=True) > 0.1
    assert M.uplift_at_1(-true, clicks, imps, lists) < 0


def test_beta_prior_fit_recovers_the_prior():
    rng = np.random.default_rng(0)
    ctr = rng.beta(2.0, 38.0, 4000)
    imps = rng.integers(500, 5000, 4000)
    clicks = rng.binomial(imps, ctr)
    prior = M.fit_beta_prior(clicks, imps)
    assert prior.mean == pytest.approx(0.05, rel=0.05)
    assert 30 < prior.alpha + prior.beta < 55
    np.testing.assert_allclose(M.smoothed_ctr([0, 4], [0, 10], prior),
                               [prior.alpha / (prior.alpha + prior.beta), (4 + prior.alpha) / (10 + prior.alpha + prior.beta)])
    # No spread beyond binomial noise: the strongest prior, every creative smoothed to the mean.
    flat = M.fit_beta_prior(rng.binomial(1000, 0.05, 2000), np.full(2000, 1000))
    assert flat.alpha + flat.beta > 1e4


# --------------------------------------------------------------------------------------------
# Loss and calibration
# --------------------------------------------------------------------------------------------

from cg4ctr_fast.training.reward import fit_platt, reward_loss  # noqa: E402


def test_reward_loss_matches_a_per_list_loop():
    torch.manual_seed(0)
    logits = torch.randn(9, requires_grad=True)
    target = torch.rand(9) * 0.1 + 0.01
    lists = torch.tensor([2, 0, 0, 1, 2, 0, 2, 3, 1])  # list 3 has one row: no ranking term
    loss, parts = reward_loss(logits, target, lists)
    expected_list = []
    for lst in (0, 1, 2):
        rows = lists == lst
        p = torch.softmax(torch.log(target[rows]), 0)
        expected_list.append(-(p * torch.log_softmax(logits[rows], 0)).sum())
    lw = torch.stack(expected_list).mean()
    pw = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    assert float(loss.detach()) == pytest.approx(float((0.9 * lw + 0.1 * pw).detach()), rel=1e-5)
    assert parts["listwise"] == pytest.approx(float(lw.detach()), rel=1e-5)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_fit_platt_recovers_scale_and_bias():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 1, 3000)
    imps = rng.integers(200, 2000, 3000)
    clicks = rng.binomial(imps, 1 / (1 + np.exp(-(0.7 * z - 2.5))))
    a, b = fit_platt(z, clicks, imps)
    assert a == pytest.approx(0.7, abs=0.05) and b == pytest.approx(-2.5, abs=0.05)
    # Anti-correlated scores: the slope is clamped so the calibrated CTR stays increasing.
    a, b = fit_platt(-z, clicks, imps)
    assert a > 0


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

from cg4ctr_fast.errors import InputError  # noqa: E402
from cg4ctr_fast.models.reward import RewardConfig, RewardModel, Vocabulary, tokenize  # noqa: E402


def _tiny_model(seed: int = 0) -> RewardModel:
    torch.manual_seed(seed)
    titles = Vocabulary.build(["red ceramic mug", "desk lamp 中文"])
    captions = Vocabulary.build(["warm red", "cool blue studio"])
    config = RewardConfig(group_dim=3, title_vocab_size=len(titles), caption_vocab_size=len(captions),
                          image_size=16, calib_scale=0.8, calib_bias=-2.0)
    return RewardModel(config, titles, captions).eval()


def test_tokenize_and_vocabulary():
    assert tokenize("Red-Mug, 350ml!") == ["red", "mug", "350ml"]
    assert tokenize("desk lamp台灯") == ["desk", "lamp", "台", "灯"]
    vocab = Vocabulary.build(["b a a", "c a"])
    assert vocab.tokens == ("<pad>", "<unk>", "a", "b", "c")
    assert vocab.encode(["a zzz c", ""], 4).tolist() == [[2, 1, 4, 0], [0, 0, 0, 0]]


def test_embed_images_then_score_equals_forward():
    model = _tiny_model()
    images = torch.rand(5, 3, 16, 16)
    titles = model.encode_titles(["red ceramic mug"])  # batch 1: broadcast to every creative
    captions = model.encode_captions(["warm red", "cool blue", "", "studio", "warm"])
    groups = torch.eye(3)[[0, 1, 2, 0, 1]]
    with torch.no_grad():
        emb = model.embed_images(images)
        assert emb.shape == (5, model.config.image_dim)
        ctr = model.score(emb, titles, captions, groups)
        full = model(images, titles, captions, groups)
    torch.testing.assert_close(ctr, full, rtol=0, atol=0)
    assert ((ctr > 0) & (ctr < 1)).all()
    # The calibration in the config is applied on top of the logits.
    torch.testing.assert_close(ctr, torch.sigmoid(0.8 * model.logits(emb, titles, captions, groups) - 2.0))


def test_save_load_round_trip_gives_identical_scores(tmp_path):
    model = _tiny_model(seed=3)
    images = torch.rand(4, 3, 16, 16)
    titles = model.encode_titles(["desk lamp", "red mug", "unknown words", ""])
    captions = model.encode_captions(["cool blue studio"] * 4)
    groups = torch.eye(3)[[0, 1, 2, 2]]
    with torch.no_grad():
        before = model(images, titles, captions, groups)
    model.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors", "vocab.json"]
    loaded = RewardModel.load(tmp_path / "m")
    assert loaded.config == model.config and loaded.title_vocab == model.title_vocab
    with torch.no_grad():
        after = loaded(images, loaded.encode_titles(["desk lamp", "red mug", "unknown words", ""]),
                       loaded.encode_captions(["cool blue studio"] * 4), groups)
    torch.testing.assert_close(before, after, rtol=0, atol=0)
    with pytest.raises(dataclasses_frozen_error()):
        loaded.config.calib_scale = 2.0
    (tmp_path / "m" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(InputError, match="model.safetensors"):
        RewardModel.load(tmp_path / "m")
    with pytest.raises(InputError, match="not a reward model folder"):
        RewardModel.load(tmp_path / "nothing")


def dataclasses_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_pipeline_scorer_ranks_pil_images():
    model = _tiny_model()
    images = [Image.new("RGB", (40, 24), c) for c in ("red", "blue", "green")]
    scorer = model.pipeline_scorer(np.eye(3), title="red mug", captions=["warm red", "cool blue", "studio"])
    scores = scorer(images, [0, 1, 2])
    assert len(scores) == 3 and all(0 < s < 1 for s in scores)


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------

from cg4ctr_fast.training.data import detect_layout, load_ad_log, split_items  # noqa: E402


def test_sim_loader(world):
    log = load_ad_log(world)
    assert log.layout == "sim" and len(log.creatives) == 16 * 6 and log.group_ids == ["0", "1"]
    assert log.group_features.shape == (2, 2)
    assert log.creatives["caption"].str.len().min() > 0 and log.creatives["title"].iloc[0].startswith("product")
    agg = log.aggregate()
    assert len(agg) == 16 * 6 * 2
    raw = pd.read_parquet(world / "logs.parquet")
    assert agg["clicks"].sum() == raw["clicks"].sum() and agg["impressions"].sum() == raw["impressions"].sum()


def test_sim_loader_file_paths_relative_to_the_folder_too(world_copy):
    creatives = pd.read_parquet(world_copy / "creatives.parquet")
    creatives["file"] = "creatives/" + creatives["file"]  # how cg4ctr_fast.sim writes them
    creatives.drop(columns=["title"]).to_parquet(world_copy / "creatives.parquet")
    log = load_ad_log(world_copy)
    assert all(Path(p).is_file() for p in log.creatives["path"])
    assert log.creatives["title"].iloc[0].startswith("product")  # from items.parquet


def test_creative_ranking_loader():
    root = FIXTURES / "creative_ranking"
    assert detect_layout(root) == "creative_ranking"
    log = load_ad_log(root)
    assert len(log.creatives) == 6 and log.group_ids == ["0"] and log.group_features.tolist() == [[1.0]]
    assert set(log.creatives["item_id"]) == {"1001", "1002", "1003"}
    assert (log.creatives["title"] == "").all() and (log.creatives["caption"] == "").all()
    agg = log.aggregate().set_index(log.creatives["creative_id"].to_numpy()[log.aggregate()["creative"]])
    # Both days (both list files, the header line skipped) are summed.
    assert agg.loc["1001_b.jpg", "impressions"] == 110 + 125 and agg.loc["1001_b.jpg", "clicks"] == 7 + 7
    assert len(log.logs) == 12


def test_cg4ctr_json_loader():
    root = FIXTURES / "cg4ctr_json"
    assert detect_layout(root) == "cg4ctr_json"
    log = load_ad_log(root)
    c = log.creatives.set_index("creative_id")
    assert list(c.index) == ["9001", "9002", "9003", "9004", "9005"]
    assert c.loc["9003", "item_id"] == "501" and c.loc["9004", "item_id"] == "502"
    assert c.loc["9004", "path"].endswith("9004.png")  # no image hash: named by creative id
    assert c.loc["9002", "path"].endswith("d4e5f6.png")
    assert c.loc["9004", "caption"] == "warm light wooden desk" and c.loc["9001", "title"] == "ceramic mug 350 ml"
    agg = log.aggregate()
    # 9002 is listed twice under one key: counted once, as in the paper's loader.
    assert agg["impressions"].sum() == 300 + 250 + 200 + 400 + 350


def test_split_items_is_by_item_and_seeded():
    items = [f"i{k}" for k in range(20)]
    fit, val, test = split_items(items, 0.2, 0.25, seed=5)
    assert (len(fit), len(val), len(test)) == (12, 4, 4)
    assert not (set(fit) & set(val) or set(fit) & set(test) or set(val) & set(test))
    assert split_items(items, 0.2, 0.25, seed=5) == (fit, val, test)
    assert split_items(items, 0.2, 0.25, seed=6) != (fit, val, test)
    with pytest.raises(InputError, match="test split is empty"):
        split_items(items[:3], 0.1, 0.0, seed=0)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

from cg4ctr_fast.training.reward import RewardTrainConfig, save_reward_run, train_reward  # noqa: E402


def test_reward_model_learns_group_colour_preferences(world, tmp_path):
    log = load_ad_log(world)
    result = train_reward(log, RewardTrainConfig(epochs=20, seed=0, image_size=16, test_fraction=0.25))
    test = result.metrics["test"]
    assert result.metrics["counts"]["test_items"] == 4 and test["rows"] == 4 * 6 * 2
    # Chance is 0.5; the generator's preferences give ≈ 0.9 here.
    assert test["pairwise_accuracy"] >= 0.65, test
    assert test["uplift_at_1"] > 0.1, test
    # Sanity only: item-level CTR is random in this world, so calibration on 2 validation items is rough.
    assert 1 / 3 < test["calibration"] < 3 and test["ne"] < 1.15, test
    assert set(test) >= {"auc", "logloss", "ne", "calibration", "pairwise_accuracy", "uplift_at_1", "uplift_at_5"}
    # Platt scaling was fitted on validation items and is part of the saved config.
    assert result.metrics["calibration_fit"]["split"] == "val"
    assert result.model.config.calib_scale == result.metrics["calibration_fit"]["scale"]
    out = save_reward_run(result, tmp_path / "model")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "metrics.json", "model.safetensors", "vocab.json"]
    loaded = RewardModel.load(out)
    assert loaded.config == result.model.config


def test_training_is_deterministic_under_the_seed(world):
    log = load_ad_log(world)
    config = RewardTrainConfig(epochs=1, seed=3, image_size=16)
    a, b = train_reward(log, config), train_reward(log, config)
    for key, value in a.model.state_dict().items():
        torch.testing.assert_close(value, b.model.state_dict()[key], rtol=0, atol=0)
    assert a.metrics["test"] == b.metrics["test"] and a.metrics["loss_per_epoch"] == b.metrics["loss_per_epoch"]
    c = train_reward(log, RewardTrainConfig(epochs=1, seed=4, image_size=16))
    assert c.metrics["test_items"] != a.metrics["test_items"]


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

from cg4ctr_fast.cli.train import main as train_main  # noqa: E402


def _train_cli(capsys, *argv):
    code = train_main(list(argv))
    return code, capsys.readouterr().err


def test_cli_trains_and_writes_the_model_folder(capsys, world, tmp_path):
    out = tmp_path / "model"
    code, err = _train_cli(capsys, "reward", "--data", str(world), "--out", str(out), "--epochs", "2",
                           "--image-size", "16", "--quiet")
    assert code == 0, err
    assert err == ""
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["layout"] == "sim" and metrics["train_config"]["epochs"] == 2
    assert RewardModel.load(out).config.image_size == 16
    # Not quiet: one summary line; an existing model folder needs --overwrite.
    code, err = _train_cli(capsys, "reward", "--data", str(world), "--out", str(out), "--epochs", "1", "--image-size", "16")
    assert code == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    code, err = _train_cli(capsys, "reward", "--data", str(world), "--out", str(out), "--epochs", "1",
                           "--image-size", "16", "--overwrite")
    assert code == 0 and err.strip().splitlines()[-1].startswith("wrote ")


@pytest.mark.parametrize("layout", ["creative_ranking", "cg4ctr_json"])
def test_cli_trains_on_the_public_layouts(capsys, tmp_path, layout):
    out = tmp_path / "model"
    code, err = _train_cli(capsys, "reward", "--data", str(FIXTURES / layout), "--out", str(out), "--epochs", "1",
                           "--image-size", "16", "--test-fraction", "0.34", "--quiet")
    assert code == 0, err
    assert json.loads((out / "metrics.json").read_text())["layout"] == layout


def _drop_column(root: Path):
    pd.read_parquet(root / "logs.parquet").drop(columns=["clicks"]).to_parquet(root / "logs.parquet")


def _set_value(column: str, value):
    def mutate(root: Path):
        logs = pd.read_parquet(root / "logs.parquet")
        logs[column] = logs[column].astype("float64")
        logs.loc[5, column] = value
        logs.to_parquet(root / "logs.parquet")
    return mutate


def _clicks_over(root: Path):
    logs = pd.read_parquet(root / "logs.parquet")
    logs.loc[3, "clicks"] = logs.loc[3, "impressions"] + 1
    logs.to_parquet(root / "logs.parquet")


def _unknown_group(root: Path):
    logs = pd.read_parquet(root / "logs.parquet")
    logs.loc[7, "group_id"] = 9
    logs.to_parquet(root / "logs.parquet")


def _missing_image(root: Path):
    (root / "creatives" / "c003_2.png").unlink()


def _corrupt_image(root: Path):
    (root / "creatives" / "c003_2.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")


def _corrupt_parquet(root: Path):
    (root / "logs.parquet").write_bytes(b"PAR1 not really")


def _unreadable_layout(root: Path):
    for name in ("logs.parquet", "creatives.parquet", "groups.json", "items.parquet"):
        (root / name).unlink()


BAD_INPUTS = {
    "missing column": (_drop_column, [], "missing column clicks"),
    "negative count": (_set_value("impressions", -4), [], "negative impressions"),
    "NaN count": (_set_value("clicks", float("nan")), [], "missing (NaN) clicks"),
    "clicks > impressions": (_clicks_over, [], "clicks > impressions"),
    "unknown group": (_unknown_group, [], "group id '9'"),
    "missing image": (_missing_image, [], "image file missing"),
    "corrupt image": (_corrupt_image, [], "c003_2.png"),
    "corrupt parquet": (_corrupt_parquet, [], "cannot read as parquet"),
    "unreadable layout": (_unreadable_layout, [], "unrecognised data layout"),
    "empty test split": (None, ["--test-fraction", "0.01"], "test split is empty"),
    "empty train split": (None, ["--test-fraction", "0.99"], "train split is empty"),
    "bad epochs": (None, ["--epochs", "0"], "--epochs"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_cli_bad_input_one_line_exit_2_nothing_written(capsys, world_copy, tmp_path, case):
    mutate, extra, needle = BAD_INPUTS[case]
    if mutate is not None:
        mutate(world_copy)
    out_parent = tmp_path / "outputs"
    out_parent.mkdir()
    code, err = _train_cli(capsys, "reward", "--data", str(world_copy), "--out", str(out_parent / "model"),
                           "--epochs", "1", "--image-size", "16", "--quiet", *extra)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cg4ctr-train: error:"), err
    assert needle in lines[0], lines[0]
    assert list(out_parent.iterdir()) == []  # no output folder, no temporary leftovers


def test_cli_bad_public_layouts(capsys, tmp_path):
    cr = Path(shutil.copytree(FIXTURES / "creative_ranking", tmp_path / "cr"))
    with open(cr / "test_data.list", "a") as handle:
        handle.write("1003\t1003_a.jpg\t20200603\t5\n")
    code, err = _train_cli(capsys, "reward", "--data", str(cr), "--out", str(tmp_path / "o1"), "--quiet")
    assert code == 2 and "test_data.list:7: 4 fields" in err and len(err.strip().splitlines()) == 1
    cj = Path(shutil.copytree(FIXTURES / "cg4ctr_json", tmp_path / "cj"))
    (cj / "images" / "112233.png").unlink()
    code, err = _train_cli(capsys, "reward", "--data", str(cj), "--out", str(tmp_path / "o2"), "--quiet")
    assert code == 2 and "112233" in err and "image file missing" in err
    data = json.loads((FIXTURES / "cg4ctr_json" / "samples.json").read_text())
    data["502_0"][0]["exp_click_cnt"] = 999
    (cj / "samples.json").write_text(json.dumps(data))
    code, err = _train_cli(capsys, "reward", "--data", str(cj), "--out", str(tmp_path / "o3"), "--quiet")
    assert code == 2 and "clicks > impressions" in err and "502_0[0]" in err
    assert not any(p.name.startswith(("o1", "o2", "o3", ".o")) for p in tmp_path.iterdir())


def test_cli_usage_errors_are_one_line(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        train_main(["reward", "--out", str(tmp_path / "m")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--data" in err


def test_console_script_entry_point(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "cg4ctr_fast.cli.train", "reward", "--data", str(tmp_path), "--out", str(tmp_path / "m")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "unrecognised data layout" in proc.stderr
