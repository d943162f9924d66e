"""The synthetic ad world (cg4ctr_fast.sim): determinism, exact masks, token → feature effects, the click
model and its oracle, the dataset layout and the `cg4ctr-sim` command line."""
from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cg4ctr_fast.errors import InputError
from cg4ctr_fast.sim import (
    CATEGORIES,
    CREATIVE_COLUMNS,
    FEATURE_NAMES,
    GROUP_FEATURE_NAMES,
    ITEM_COLUMNS,
    LOG_COLUMNS,
    SHAPES,
    STYLE_VOCAB,
    World,
    compose,
    image_features,
    load_dataset,
    parse_caption,
    render_background,
)
from cg4ctr_fast.sim.products import rasterize
from cg4ctr_fast.sim.render import render_background_array

F = {name: i for i, name in enumerate(FEATURE_NAMES)}


@pytest.fixture(scope="module")
def world():
    return World(seed=0)


# ----------------------------------------------------------------------------- vocabulary and rendering
def test_vocabulary():
    assert tuple(STYLE_VOCAB) == CATEGORIES == ("palette", "texture", "scene", "lighting")
    tokens = [t for c in CATEGORIES for t in STYLE_VOCAB[c]]
    assert len(tokens) >= 24 and len(set(tokens)) == len(tokens)
    assert all(len(STYLE_VOCAB[c]) >= 6 for c in CATEGORIES)
    assert parse_caption("Golden  warm beach") == {"palette": "warm", "scene": "beach", "lighting": "golden"}
    with pytest.raises(InputError, match="unknown style token"):
        parse_caption("warm sparkly")
    with pytest.raises(InputError, match="two palette tokens"):
        parse_caption(["warm", "cool"])


def test_render_is_deterministic_fast_and_any_size():
    a = render_background_array("warm stripes beach golden", np.random.default_rng(5), 64)
    b = render_background_array("warm stripes beach golden", np.random.default_rng(5), 64)
    c = render_background_array("warm stripes beach golden", np.random.default_rng(6), 64)
    assert a.dtype == np.uint8 and a.shape == (64, 64, 3)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    for size in (32, 100, 512):
        img = render_background(("cool", "checker"), np.random.default_rng(0), size)
        assert img.mode == "RGB" and img.size == (size, size)
    # The same draws at another size give the same picture, sharper: features measured at 64 agree.
    f64 = image_features(render_background_array("neon grainy city dramatic", np.random.default_rng(3), 64))
    f256 = image_features(render_background_array("neon grainy city dramatic", np.random.default_rng(3), 256))
    assert np.allclose(f64, f256, atol=0.03)
    rng = np.random.default_rng(0)
    render_background_array((), rng, 64)
    started = time.perf_counter()
    for _ in range(200):
        render_background_array((), rng, 64)
    per_image = (time.perf_counter() - started) / 200
    assert per_image < 0.005, f"{per_image * 1e3:.2f} ms per 64×64 background"
    with pytest.raises(InputError):
        render_background("warm", np.random.default_rng(0), 4)


def _mean_features(caption, n=40, seed=0):
    rng = np.random.default_rng(seed)
    return np.mean([image_features(render_background_array(caption, rng, 64)) for _ in range(n)], axis=0)


def test_each_style_token_moves_its_feature():
    m = {t: _mean_features((t,), seed=i) for i, t in enumerate(t for c in CATEGORIES for t in STYLE_VOCAB[c])}
    hue = {t: np.degrees(np.arctan2(v[F["hue_sin"]], v[F["hue_cos"]])) % 360 for t, v in m.items()}
    # palette -> hue and saturation
    assert m["warm"][F["hue_cos"]] > 0.5 > -0.5 > m["cool"][F["hue_cos"]]
    assert hue["warm"] < 45 and 180 < hue["cool"] < 240
    assert m["neon"][F["saturation"]] > m["pastel"][F["saturation"]] + 0.2
    assert m["monochrome"][F["saturation"]] == min(m[t][F["saturation"]] for t in STYLE_VOCAB["palette"])
    assert m["monochrome"][F["saturation"]] < 0.5 * m["warm"][F["saturation"]]
    assert m["earthy"][F["brightness"]] < m["pastel"][F["brightness"]] - 0.1
    # texture -> texture energy
    tex = {t: m[t][F["texture"]] for t in STYLE_VOCAB["texture"]}
    assert tex["grainy"] > 2 * max(tex["stripes"], tex["checker"])
    assert min(tex["stripes"], tex["checker"]) > 3 * tex["smooth"]
    assert tex["smooth"] == min(tex.values())
    # lighting -> brightness, spread, warm cast
    assert m["bright"][F["brightness"]] > m["dim"][F["brightness"]] + 0.3
    assert m["dramatic"][F["brightness_spread"]] > 2 * m["soft"][F["brightness_spread"]]
    assert m["backlit"][F["brightness_spread"]] > 2 * m["soft"][F["brightness_spread"]]
    assert m["golden"][F["hue_cos"]] > m["soft"][F["hue_cos"]] + 0.2
    # scene -> colour regions: blue sky and sea against warm wood and green leaves
    assert m["sky"][F["hue_cos"]] < m["kitchen"][F["hue_cos"]] - 0.3
    assert m["beach"][F["hue_sin"]] < m["forest"][F["hue_sin"]] - 0.2


def _log_power_spectrum(images):
    luma = np.stack(images).astype(float) @ np.array([0.299, 0.587, 0.114]) / 255.0
    luma -= luma.mean(axis=(1, 2), keepdims=True)
    return np.log((np.abs(np.fft.fft2(luma)) ** 2).mean(axis=0) + 1e-3)


def test_tokens_are_visually_distinct():
    """Within each category, with the other tokens fixed, every two tokens give clearly different images:
    palette, scene and lighting change the mean picture; textures change the (phase-free) power spectrum."""
    base = {"palette": "warm", "texture": "smooth", "scene": "studio", "lighting": "soft"}
    for category in CATEGORIES:
        stats = {}
        for token in STYLE_VOCAB[category]:
            caption = [token if c == category else base[c] for c in CATEGORIES]
            rng = np.random.default_rng(1)
            images = [render_background_array(caption, rng, 64) for _ in range(8)]
            stats[token] = (_log_power_spectrum(images) if category == "texture"
                            else np.mean([i.astype(float) for i in images], axis=0))
        tokens = list(stats)
        for i, a in enumerate(tokens):
            for b in tokens[i + 1:]:
                diff = np.abs(stats[a] - stats[b]).mean()
                limit = 1.0 if category == "texture" else 10.0
                assert diff > limit, f"{category}: {a} and {b} differ by only {diff:.2f}"


# ----------------------------------------------------------------------------- products and masks
def test_products_have_exact_masks(world):
    seen_shapes, seen_patterns = set(), set()
    for item in range(48):
        p = world.product(item)
        seen_shapes.add(p.shape)
        seen_patterns.add(p.spec.pattern)
        assert p.image.mode == "RGB" and p.mask.mode == "L" and p.image.size == p.mask.size == (64, 64)
        mask = np.asarray(p.mask)
        assert set(np.unique(mask)) == {0, 255}
        assert np.all(np.asarray(p.image)[mask == 255] == 255)  # plain white around the product
        assert p.title.endswith(p.shape) and p.category and np.isfinite(p.features).all()
        background = render_background_array((), np.random.default_rng(item), 64)
        creative = np.asarray(compose(p, background))
        keep = mask == 0
        assert np.array_equal(creative[keep], np.asarray(p.image)[keep])
        assert np.array_equal(creative[~keep], background[~keep])
    assert len(seen_shapes) >= 6 and seen_shapes <= set(SHAPES)
    assert len(seen_patterns) == 5
    for size in (32, 97, 512):  # the same product at any size: same geometry, mask still two-valued
        image, mask = rasterize(world.product(3).spec, size)
        assert image.size == (size, size) and set(np.unique(np.asarray(mask))) == {0, 255}
        fraction = (np.asarray(mask) == 0).mean()
        assert abs(fraction - world.product(3).area) < 0.03


def test_image_features_read_the_background_only(world):
    p = world.product(1)
    background = render_background_array("cool waves forest bright", np.random.default_rng(0), 64)
    creative = np.asarray(compose(p, background))
    f = image_features(creative, p.mask)
    assert f.shape == (len(FEATURE_NAMES),) and np.isfinite(f).all()
    # Repainting the product changes only the contrast feature.
    recoloured = creative.copy()
    recoloured[np.asarray(p.mask) == 0] = (255, 0, 255)
    g = image_features(recoloured, p.mask)
    others = [i for i in range(len(FEATURE_NAMES)) if i != F["contrast"]]
    assert np.allclose(f[others], g[others]) and not np.isclose(f[F["contrast"]], g[F["contrast"]])
    assert image_features(background)[F["contrast"]] == 0.0
    # A bigger copy of the same creative measures (almost) the same.
    big = np.asarray(Image.fromarray(creative).resize((256, 256), Image.Resampling.NEAREST))
    big_mask = p.mask.resize((256, 256), Image.Resampling.NEAREST)
    assert np.allclose(image_features(big, big_mask), f, atol=0.02)


# ----------------------------------------------------------------------------- world, click model, oracle
def test_world_is_deterministic():
    a, b, c = World(seed=3), World(seed=3), World(seed=4)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert [g.record() for g in a.groups] == [g.record() for g in b.groups]
    la = a.sample_logs(3, 2, 3, np.random.default_rng(9))
    lb = b.sample_logs(3, 2, 3, np.random.default_rng(9))
    lc = c.sample_logs(3, 2, 3, np.random.default_rng(9))
    pd.testing.assert_frame_equal(la.logs, lb.logs)
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(la.creatives, lb.creatives))
    assert [x.caption for x in la.creatives] == [y.caption for y in lb.creatives]
    assert np.array_equal(la.true_ctr, lb.true_ctr)
    assert not la.logs["clicks"].equals(lc.logs["clicks"])
    assert not np.array_equal(np.asarray(la.products[0].image), np.asarray(lc.products[0].image))


def test_logs_are_consistent_and_informative(world):
    logs = world.sample_logs(12, 4, 7, np.random.default_rng(0))
    frame = logs.logs
    assert tuple(frame.columns) == LOG_COLUMNS
    assert len(frame) == 12 * 4 * world.n_groups * 7
    assert not frame.isna().any().any()
    assert (frame["clicks"] >= 0).all() and (frame["clicks"] <= frame["impressions"]).all()
    assert (frame["item_id"] == frame["creative_id"] // 4).all()
    assert 0.003 < logs.true_ctr.min() and logs.true_ctr.max() < 0.2
    assert 0.01 < np.median(logs.true_ctr) < 0.05
    # Observed CTR per (creative, group) follows the truth.
    agg = frame.groupby(["creative_id", "group_id"])[["impressions", "clicks"]].sum()
    observed = (agg["clicks"] / agg["impressions"]).to_numpy()
    truth = logs.true_ctr[agg.index.get_level_values(0), agg.index.get_level_values(1)]
    assert np.corrcoef(observed, truth)[0, 1] > 0.7
    overall = frame["clicks"].sum() / frame["impressions"].sum()
    expected = (logs.true_ctr[frame["creative_id"], frame["group_id"]] * frame["impressions"]).sum() / frame["impressions"].sum()
    assert abs(overall - expected) / expected < 0.05


def test_true_ctr_rules(world):
    item = 5
    image = world.creative(item, "pastel bokeh sky soft", np.random.default_rng(0))
    p = world.product(item)
    value = world.true_ctr(image, 2, item_id=item)
    assert value == world.true_ctr(image, 2, item_id=item, mask=p.mask)
    assert 0.0 < value < 1.0
    # No item, no mask: the whole image is background; still a CTR.
    assert 0.0 < world.true_ctr(render_background("warm", np.random.default_rng(0), 64), 0) < 1.0
    # A 4× bigger copy of the creative scores (nearly) the same: the product mask is resized to match.
    big = image.resize((256, 256), Image.Resampling.NEAREST)
    assert abs(world.true_ctr(big, 2, item_id=item) - value) / value < 0.05
    groups = world.true_ctr_groups(image, item)
    assert groups.shape == (world.n_groups,) and groups[2] == value
    with pytest.raises(InputError):
        world.true_ctr(image, world.n_groups, item_id=item)
    with pytest.raises(InputError):
        world.true_ctr(image, 0, item_id=-1)


def test_best_caption_beats_median_and_other_groups(world):
    captions, table = world.caption_ctr_table()
    assert table.shape == (world.n_groups, 6**4)
    bests = [world.best_caption(g) for g in range(world.n_groups)]
    wins = 0
    for g, best in enumerate(bests):
        assert len(best) == 4 and world.best_caption(g) == best
        own = world.caption_ctr(best, g)
        assert own > 1.2 * np.median(table[g]), (g, best, own, np.median(table[g]))
        rivals = [world.caption_ctr(bests[h], g) for h in range(world.n_groups) if bests[h] != best]
        wins += all(own > r for r in rivals)
    assert wins >= 0.75 * world.n_groups
    assert len(set(bests)) >= world.n_groups // 2  # groups want different things
    # On a product, too.
    best = world.best_caption(0, item_id=7)
    _, item_table = world.caption_ctr_table(item_id=7)
    assert world.caption_ctr(best, 0, item_id=7) > np.median(item_table[0])


def test_world_json_round_trip(tmp_path, world):
    path = world.save(tmp_path)
    data = json.loads(path.read_text())
    assert data["seed"] == 0 and data["image_size"] == 64 and data["n_groups"] == 8
    assert data["vocabulary"] == {c: list(STYLE_VOCAB[c]) for c in CATEGORIES}
    text = path.read_text()
    assert "weights" not in text and "prefs" not in text  # hidden preferences are regenerated, not stored
    loaded = World.load(tmp_path)
    rng = np.random.default_rng(2)
    for item in (0, 9):
        image = world.creative(item, (), rng)
        for g in range(world.n_groups):
            assert loaded.true_ctr(image, g, item_id=item) == world.true_ctr(image, g, item_id=item)
    assert World.from_json(world.to_json()).fingerprint() == world.fingerprint()
    tampered = dict(data, fingerprint="0" * 64)
    with pytest.raises(InputError, match="fingerprint"):
        World.from_json(tampered)
    with pytest.raises(InputError):
        World.load(tmp_path / "missing")


# ----------------------------------------------------------------------------- command line
def _cli(capsys, *argv):
    """Run cg4ctr-sim in process: (exit code, captured output); argparse's own exits are caught too."""
    from cg4ctr_fast.cli.sim import main

    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr()


def test_cli_writes_the_layout(tmp_path, capsys):
    out = tmp_path / "sim"
    code, cap = _cli(capsys, "logs", "--out", str(out), "--products", "3", "--creatives-per-product", "2",
                     "--days", "2", "--seed", "7", "--quiet")
    assert code == 0, cap.err
    assert cap.err == "" and cap.out == ""
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["products", "masks", "creatives", "groups.json", "world.json", "items.parquet", "creatives.parquet", "logs.parquet"])
    assert sorted(p.name for p in (out / "products").iterdir()) == ["0.png", "1.png", "2.png"]
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["0.png", "1.png", "2.png"]
    assert sorted(p.name for p in (out / "creatives").iterdir()) == [f"{i}.png" for i in range(6)]
    items = pd.read_parquet(out / "items.parquet")
    creatives = pd.read_parquet(out / "creatives.parquet")
    logs = pd.read_parquet(out / "logs.parquet")
    assert tuple(items.columns) == ITEM_COLUMNS
    assert tuple(creatives.columns) == CREATIVE_COLUMNS == ("creative_id", "item_id", "caption", "title", "file")
    assert tuple(logs.columns) == LOG_COLUMNS == ("creative_id", "item_id", "group_id", "day", "impressions", "clicks")
    assert len(logs) == 6 * 8 * 2
    groups = json.loads((out / "groups.json").read_text())
    assert [g["group_id"] for g in groups] == list(range(8))
    assert all(set(g) == {"group_id", "age_band", "gender", "region", "interest", "features"} for g in groups)
    assert all(len(g["features"]) == len(GROUP_FEATURE_NAMES) and sum(g["features"]) == 4 for g in groups)
    for row in creatives.itertuples():
        image = Image.open(out / row.file)
        assert image.mode == "RGB" and image.size == (64, 64)
        assert all(parse_caption(row.caption)) and row.title == items.set_index("item_id").loc[row.item_id, "title"]
    mask = Image.open(out / "masks" / "0.png")
    assert mask.mode == "L" and set(np.unique(np.asarray(mask))) == {0, 255}
    # The files score exactly like the in-memory run with the same seed.
    data = load_dataset(out)
    assert data.world.fingerprint() == World(seed=7).fingerprint()
    again = World(seed=7).sample_logs(3, 2, 2, World(seed=7).logs_rng())
    pd.testing.assert_frame_equal(logs, again.logs)
    for c in again.creatives:
        image = data.creative_image(c.creative_id)
        assert np.array_equal(np.asarray(image), np.asarray(c.image))
        assert np.allclose(data.world.true_ctr_groups(image, c.item_id), again.true_ctr[c.creative_id])
    # Same seed: same dataset; another seed: another one.
    code, _ = _cli(capsys, "logs", "--out", str(tmp_path / "same"), "--products", "3", "--creatives-per-product", "2",
                   "--days", "2", "--seed", "7", "--quiet")
    assert code == 0
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "same" / "logs.parquet"), logs)
    assert (tmp_path / "same" / "creatives" / "5.png").read_bytes() == (out / "creatives" / "5.png").read_bytes()
    code, _ = _cli(capsys, "logs", "--out", str(tmp_path / "other"), "--products", "3", "--creatives-per-product", "2",
                   "--days", "2", "--seed", "8", "--quiet")
    assert code == 0
    assert not pd.read_parquet(tmp_path / "other" / "logs.parquet").equals(logs)


def test_cli_defaults_are_fast_and_useful(tmp_path, capsys):
    started = time.perf_counter()
    code, cap = _cli(capsys, "logs", "--out", str(tmp_path / "d"))
    seconds = time.perf_counter() - started
    assert code == 0 and seconds < 60
    assert cap.err.strip().splitlines()[-1].startswith("wrote 48 products, 384 creatives, 43008 log rows")
    logs = pd.read_parquet(tmp_path / "d" / "logs.parquet")
    assert logs["clicks"].sum() > 10_000


@pytest.mark.parametrize(
    "args, message",
    [
        (["--products", "-1"], "--products must be a positive integer"),
        (["--products", "0"], "--products must be a positive integer"),
        (["--creatives-per-product", "-2"], "--creatives-per-product must be a positive integer"),
        (["--days", "-3"], "--days must be a positive integer"),
        (["--image-size", "16"], "--image-size must be from 32 to 512"),
        (["--image-size", "1024"], "--image-size must be from 32 to 512"),
        (["--groups", "0"], "--groups must be from 1 to 64"),
        (["--seed", "-1"], "--seed must be a non-negative integer"),
        (["--products", "many"], "invalid int value"),
    ],
)
def test_cli_bad_arguments(tmp_path, capsys, args, message):
    assert_refused(capsys, tmp_path, message, "logs", *args)


def assert_refused(capsys, tmp_path, message, command, *args):
    """`cg4ctr-sim COMMAND --out tmp_path/never --quiet ARGS` exits 2 with one line holding `message`, and
    writes nothing under tmp_path."""
    out = tmp_path / "never"
    code, cap = _cli(capsys, command, "--out", str(out), "--quiet", *args)
    assert code == 2
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], cap.err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_refuses_a_non_empty_out(tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, cap = _cli(capsys, "logs", "--out", str(out), "--products", "1", "--quiet")
    assert code == 2 and len(cap.err.strip().splitlines()) == 1 and "not empty" in cap.err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and [p.name for p in tmp_path.iterdir()] == ["busy"]


def test_cli_oracle_and_sheet(tmp_path, capsys, world):
    code, cap = _cli(capsys, "oracle", "--seed", "0")
    assert code == 0
    rows = cap.out.strip().splitlines()
    assert rows[0].split("\t")[0] == "group_id" and len(rows) == 1 + 8
    best = rows[1].split("\t")[2]
    assert tuple(best.split()) == world.best_caption(0)
    code, cap = _cli(capsys, "sheet", "--out", str(tmp_path / "sheet.png"))
    assert code == 0 and Image.open(tmp_path / "sheet.png").size[0] > 6 * 64
    code, cap = _cli(capsys, "oracle", "--data", str(tmp_path / "nope"))
    assert code == 2 and "no such file" in cap.err


def test_cli_output_does_not_depend_on_the_process(tmp_path, capsys):
    """Another interpreter with another hash seed writes the same dataset (no Python hash() anywhere)."""
    import os
    import subprocess
    import sys

    args = ["logs", "--products", "2", "--creatives-per-product", "2", "--days", "2", "--seed", "11", "--quiet"]
    code, _ = _cli(capsys, *args, "--out", str(tmp_path / "here"))
    assert code == 0
    env = dict(os.environ, PYTHONHASHSEED="12345")
    done = subprocess.run([sys.executable, "-m", "cg4ctr_fast.cli.sim", *args, "--out", str(tmp_path / "there")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for name in ("logs.parquet", "creatives.parquet", "items.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "here" / name), pd.read_parquet(tmp_path / "there" / name))
    assert json.loads((tmp_path / "here" / "world.json").read_text()) == json.loads((tmp_path / "there" / "world.json").read_text())
    for png in sorted((tmp_path / "here" / "creatives").iterdir()):
        assert png.read_bytes() == (tmp_path / "there" / "creatives" / png.name).read_bytes()
