"""Online selection (cg4ctr_fast.serving.select): the numpy reward head against torch's RewardModel.score, and the
Selector over a real CreativeStore (the original wins ties, model ids never mix, none_stored, the budget fallback
with a driven clock, k ordering, bad input, refresh after writes).  No timings are asserted (see the bench)."""
from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch

from cg4ctr_fast.errors import InputError
from cg4ctr_fast.models.reward import RewardConfig, RewardModel
from cg4ctr_fast.serving import select as select_mod
from cg4ctr_fast.serving.errors import NotFound
from cg4ctr_fast.serving.select import LIVE_CHUNK, Choice, RewardHead, Selection, Selector, erf, gelu
from cg4ctr_fast.serving.store import CreativeStore, NewCreative

MODEL = "preset:tiny:seed0"
OTHER_MODEL = "model:0123456789abcdef"
REWARD = "reward:00112233aabbccdd"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# RewardHead vs torch on the calibrated CTR.  Measured over the shapes below: ≤ 4.8e-7 on the CTR, ≤ 1.2e-6 on the
# logits (float32 rounding of different summation orders, on weights perturbed by N(0, 0.2²)).
CTR_ATOL = 1e-5
LOGIT_ATOL = 1e-4


def random_model(seed: int, **overrides) -> RewardModel:
    """A RewardModel with every parameter perturbed (LayerNorm weights ≠ 1, padding rows of the embedding tables
    ≠ 0, which EmbeddingBag must ignore) and a non-identity calibration."""
    torch.manual_seed(seed)
    config = RewardConfig(**{"calib_scale": 1.7, "calib_bias": -1.3, **overrides})
    model = RewardModel(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.2)
    return model.eval()


def torch_score(model: RewardModel, emb, title_ids, caption_ids, groups, logits: bool = False) -> np.ndarray:
    args = [torch.from_numpy(np.asarray(a)) for a in (emb, title_ids, caption_ids, groups)]
    with torch.no_grad():
        return (model.logits if logits else model.score)(*args).numpy()


# --------------------------------------------------------------------------------------------
# erf / GELU
# --------------------------------------------------------------------------------------------


def test_erf_and_gelu_against_exact_references():
    z = np.linspace(-7.0, 7.0, 140_001)
    exact = np.array([math.erf(v) for v in z.tolist()])
    assert np.abs(erf(z) - exact).max() <= 1e-7  # measured 1.5e-8
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(50_000) * 3, rng.uniform(-8, 8, 20_000),
                        [0.0, -5.6, 5.6, -100.0, 100.0, -1e30, 1e30, 1e-30]]).astype(np.float32)
    # float64 torch GELU (std::erf) rounded to float32 is the reference.
    ref = torch.nn.functional.gelu(torch.from_numpy(x.astype(np.float64))).numpy()
    got = gelu(x)
    assert got.dtype == np.float32 and got.shape == x.shape
    err = np.abs(got.astype(np.float64) - ref)
    # An erf error of 1e-7 costs |x|/2 · 1e-7 in GELU, float32 rounding half an ulp (one ulp allowed).
    bound = 0.5e-7 * np.abs(x) + np.spacing(np.abs(ref).astype(np.float32)).astype(np.float64)
    assert (err <= bound).all(), float((err - bound).max())
    assert got[-3] == 0.0 and got[-2] == 1e30  # the tails are exact
    assert gelu(x.reshape(8, -1)).shape == (8, x.size // 8)


# --------------------------------------------------------------------------------------------
# RewardHead vs RewardModel.score
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,group_dim,title_vocab,caption_vocab,layers,heads,d_model,image_dim", [
    (1, 1, 3, 2, 2, 4, 64, 7),
    (3, 19, 37, 101, 1, 2, 32, 40),
    (65, 1, 101, 37, 3, 4, 48, 7),
    (65, 19, 2, 5, 2, 1, 24, 40),
])
def test_head_matches_torch_score(n, group_dim, title_vocab, caption_vocab, layers, heads, d_model, image_dim):
    model = random_model(n + group_dim, group_dim=group_dim, title_vocab_size=title_vocab,
                         caption_vocab_size=caption_vocab, n_layers=layers, n_heads=heads, d_model=d_model,
                         image_channels=(4, 6, 8, image_dim), tower_hidden=33, token_dim=17, ff_dim=29, head_hidden=15)
    head = RewardHead.from_model(model)
    rng = np.random.default_rng(n * 100 + group_dim)
    emb = rng.standard_normal((n, image_dim)).astype(np.float32) * 2
    groups = rng.standard_normal((n, group_dim)).astype(np.float32)
    title_ids = rng.integers(0, title_vocab, (n, 11))
    caption_ids = rng.integers(0, caption_vocab, (n, 7))
    title_ids[0] = 0  # all padding: EmbeddingBag gives zeros
    caption_ids[-1] = 0
    caption_ids[0, 3:] = 0  # right padding
    title_ids[-1, ::2] = 0  # padding inside a row is left out of the mean too
    for t_ids, c_ids, g in [(title_ids, caption_ids, groups),              # every input per row
                            (title_ids[-1:], caption_ids, groups[:1]),    # title and group broadcast
                            (title_ids[:1], caption_ids[-1:], groups[-1:])]:  # all-padding title and caption
        ref = torch_score(model, emb, t_ids, c_ids, g)
        got = head.score(emb, t_ids, c_ids, g)
        assert got.dtype == np.float32 and got.shape == (n,)
        np.testing.assert_allclose(got, ref, rtol=0, atol=CTR_ATOL)
        np.testing.assert_allclose(head.logits(emb, t_ids, c_ids, g),
                                   torch_score(model, emb, t_ids, c_ids, g, logits=True), rtol=0, atol=LOGIT_ATOL)
        assert ((got > 0) & (got < 1)).all()


def test_head_is_eval_mode_and_a_copy():
    model = random_model(3, group_dim=2, title_vocab_size=9, caption_vocab_size=9)
    reference = RewardHead.from_model(model)
    model.train()  # dropout on in the torch model: the head copies weights and always runs as eval
    head = RewardHead.from_model(model)
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((5, model.config.image_dim)).astype(np.float32)
    args = (emb, rng.integers(0, 9, (1, 6)), rng.integers(0, 9, (5, 4)), rng.standard_normal((1, 2)))
    ref = torch_score(model.eval(), *args)
    np.testing.assert_allclose(head.score(*args), ref, atol=CTR_ATOL, rtol=0)
    with torch.no_grad():  # later changes to the torch model are not seen by the copies
        model.head[3].bias.add_(5.0)
    np.testing.assert_array_equal(head.score(*args), reference.score(*args))
    assert head.score(emb[:0], args[1], args[2][:0], args[3]).shape == (0,)
    with pytest.raises(ValueError, match="batch"):
        head.score(emb, args[1], rng.integers(0, 9, (3, 4)), args[3])
    with pytest.raises(ValueError, match="outside"):
        head.score(emb, args[1], np.full((5, 4), 9), args[3])
    with pytest.raises(ValueError, match="embeddings"):
        head.score(emb[:, :-1], *args[1:])


def test_encode_matches_the_model_vocabulary():
    from cg4ctr_fast.models.reward import Vocabulary

    texts = ["Red shoe, red SOLE", "", "unknownword 中文 mixedABC中", "a b c d e f g h i j k l m n o p q r s t u v w x y z",
             "   ", "shoe"]
    vocab = Vocabulary.build(texts[:1] + ["sole lamp 中"])
    config = RewardConfig(title_vocab_size=len(vocab), caption_vocab_size=len(vocab), max_title_tokens=5,
                          max_caption_tokens=3)
    model = RewardModel(config, vocab, vocab).eval()
    head = RewardHead.from_model(model)
    titles = head.encode_titles(texts)
    assert titles.dtype == np.int64 and titles.shape == (len(texts), 5)
    np.testing.assert_array_equal(titles, model.encode_titles(texts).numpy())
    np.testing.assert_array_equal(head.encode_captions(texts), model.encode_captions(texts).numpy())


# --------------------------------------------------------------------------------------------
# Selector over a real CreativeStore
# --------------------------------------------------------------------------------------------

GROUP_DIM = 3
GROUPS = {"g0": np.array([1.0, 0.0, 0.0]), "g1": np.array([0.0, 1.0, -0.5]), "7": np.array([0.3, 0.3, 0.3])}


@pytest.fixture(scope="module")
def reward_model():
    return random_model(11, group_dim=GROUP_DIM, title_vocab_size=13, caption_vocab_size=17,
                        image_channels=(4, 6, 8, 16), tower_hidden=32, d_model=32, ff_dim=32, head_hidden=16)


@pytest.fixture(scope="module")
def head(reward_model):
    return RewardHead.from_model(reward_model)


@pytest.fixture
def store(tmp_path):
    with CreativeStore(tmp_path / "store") as s:
        yield s


_counter = iter(range(10**9))


def png() -> bytes:
    """Distinct PNG-signed bytes (the store is content addressed and checks only the signature)."""
    return PNG_SIGNATURE + next(_counter).to_bytes(8, "little") + b"fake"


def add_creatives(store, scores, *, product="p1", model=MODEL, group="g0", embeddings=None, prompts=None,
                  seed=0) -> list:
    """One creative per score (None = no score stored for `group`); returns their ids."""
    rng = np.random.default_rng(seed)
    new = []
    for n, score in enumerate(scores):
        emb = rng.standard_normal(16).astype(np.float32) if embeddings is None else embeddings[n]
        new.append(NewCreative(product_id=product, group_id=None, prompt=prompts[n] if prompts else f"prompt {n}",
                               index=n, seed=n, model_id=model, png=png(), reward=None, embedding=emb,
                               scores={} if score is None else {group: score}))
    return store.put_creatives(new, reward_id=REWARD)


def make_selector(store, head, model=MODEL, **kwargs) -> Selector:
    return Selector(store, head, GROUPS, model_id=model, reward_id=REWARD, **kwargs)


def ids_of(selection: Selection) -> list:
    return [c.creative_id for c in selection.chosen]


def test_original_wins_when_better_and_on_ties(store, head):
    store.put_product("p1", png(), title="red shoe", embedding=np.ones(16, np.float32), scores={"g0": 0.5},
                      reward_id=REWARD)
    ids = add_creatives(store, [0.25, 0.375, 0.5])  # the best creative ties with the original
    selector = make_selector(store, head)
    sel = selector.select("p1", "g0", k=4)
    assert sel.fallback == "original_better" and sel.chosen[0] == Choice(None, 0.5, None)
    assert ids_of(sel) == [None, ids[2], ids[1], ids[0]]
    assert sel.original_score == 0.5 and sel.candidates == 4
    # A strictly better creative replaces the photo.
    store.put_scores("p1", MODEL, REWARD, "g0", [ids[1]], [0.625])
    sel = selector.select("p1", "g0")
    assert sel.fallback is None and ids_of(sel) == [ids[1]] and sel.chosen[0].prompt == "prompt 1"
    # Scores that are equal as stored tie (compared in float32): 0.3 is not 0.30000001.
    store.put_product("p2", png(), scores={"g1": 0.3}, reward_id=REWARD)
    add_creatives(store, [0.3, 0.1], product="p2", group="g1")
    assert selector.select("p2", "g1").fallback == "original_better"


def test_model_ids_never_mix(store, head):
    store.put_product("p1", png(), scores={"g0": 0.4}, reward_id=REWARD)
    mine = add_creatives(store, [0.5, 0.45])
    theirs = add_creatives(store, [0.9, 0.8, 0.7], model=OTHER_MODEL, seed=1)
    sel = make_selector(store, head).select("p1", "g0", k=10)
    assert ids_of(sel) == [mine[0], mine[1], None] and sel.candidates == 3
    sel = make_selector(store, head, model=OTHER_MODEL).select("p1", "g0", k=10)
    assert ids_of(sel) == theirs + [None]
    # A model with nothing stored for the product: only the original.
    sel = make_selector(store, head, model="model:ffffffffffffffff").select("p1", "g0", k=3)
    assert sel.fallback == "none_stored" and ids_of(sel) == [None] and sel.candidates == 1


def test_none_stored(store, head):
    store.put_product("p1", png(), scores={"g0": 0.2}, reward_id=REWARD)
    sel = make_selector(store, head).select("p1", "g0", k=2)
    assert sel.fallback == "none_stored" and sel.chosen == (Choice(None, np.float32(0.2).item(), None),)
    out = sel.to_dict()
    assert json.loads(json.dumps(out, allow_nan=False)) == out
    assert out["chosen"] == [{"id": "original", "score": np.float32(0.2).item(), "prompt": None}]
    # Creatives with neither a score for the group nor an embedding cannot be ranked: still none stored.
    add_creatives(store, [None, None], embeddings=[None, None])
    sel = make_selector(store, head).select("p1", "g0")
    assert sel.fallback == "none_stored" and sel.candidates == 1


def live_scores(reward_model, head, title, embeddings, captions, group) -> np.ndarray:
    """The torch reference for what the selector computes live."""
    n = len(captions)
    return torch_score(reward_model, np.stack(embeddings), head.encode_titles([title]), head.encode_captions(captions),
                       np.asarray(GROUPS[group], np.float32).reshape(1, -1)).reshape(n)


def test_missing_scores_are_computed_live(store, head, reward_model):
    rng = np.random.default_rng(5)
    original = rng.standard_normal(16).astype(np.float32)
    store.put_product("p1", png(), title="red shoe lamp", embedding=original)  # no stored score at all
    n = LIVE_CHUNK + 5  # two chunks
    embeddings = list(rng.standard_normal((n, 16)).astype(np.float32) * 3)
    prompts = [f"warm beach {i % 4}" if i % 3 else "" for i in range(n)]
    stored = [None] * n
    stored[2] = 0.999  # one stored score: used as stored, not recomputed
    ids = add_creatives(store, stored, embeddings=embeddings, prompts=prompts, group="g1")
    sel = make_selector(store, head).select("p1", "g1", k=n + 1)
    ref = live_scores(reward_model, head, "red shoe lamp", [original] + embeddings, [""] + prompts, "g1")
    ref[3] = np.float32(0.999)  # creative 2, row 3
    by_id = {c.creative_id: c.score for c in sel.chosen}
    assert len(by_id) == n + 1 and sel.candidates == n + 1
    np.testing.assert_allclose([by_id[None]] + [by_id[i] for i in ids], ref, atol=CTR_ATOL, rtol=0)
    assert ids_of(sel)[0] == ids[2] and sel.original_score == pytest.approx(ref[0], abs=CTR_ATOL)
    order = sorted(range(n + 1), key=lambda r: (-float(ref[r]), r != 0, ids[r - 1] if r else ""))
    assert ids_of(sel) == [None if r == 0 else ids[r - 1] for r in order]
    # The title comes from title_for when given.
    sel = make_selector(store, head, title_for=lambda pid: "blue").select("p1", "g1")
    ref = live_scores(reward_model, head, "blue", [original], [""], "g1")
    assert sel.original_score == pytest.approx(float(ref[0]), abs=CTR_ATOL)


class FakeClock:
    """Every read advances 1 ms: the budget check becomes a count of clock reads."""

    def __init__(self):
        self.now = 0.0
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        self.now += 0.001
        return self.now


def test_budget_fallback(store, head, monkeypatch):
    store.put_product("p1", png(), title="t", embedding=np.full(16, 0.5, np.float32))
    ids = add_creatives(store, [None] * (4 * LIVE_CHUNK + 3))  # 67 missing + the original: 5 chunks
    clock = FakeClock()
    monkeypatch.setattr(select_mod, "_clock", clock)
    selector = make_selector(store, head)
    calls = []
    score = head.score

    class CountingHead:
        def __getattr__(self, name):
            return getattr(head, name)

        def score(self, *args):
            calls.append(len(args[0]))
            return score(*args)

    selector.head = CountingHead()
    # The call starts at 1 ms; chunks run while the clock reads < 1 + 2.5 ms: two chunks, then "budget".
    sel = selector.select("p1", "g0", k=3, budget_ms=2.5)
    assert sel.fallback == "budget" and ids_of(sel) == [None] and calls == [LIVE_CHUNK, LIVE_CHUNK]
    assert sel.original_score is not None  # the original is scored in the first chunk
    assert sel.candidates == len(ids) + 1
    # The scores computed so far are kept: the next call goes on from there.
    sel = selector.select("p1", "g0", k=3, budget_ms=2.5)
    assert sel.fallback == "budget" and calls == [LIVE_CHUNK] * 4
    sel = selector.select("p1", "g0", k=len(ids) + 1, budget_ms=2.5)
    assert sel.fallback != "budget" and calls == [LIVE_CHUNK] * 4 + [4] and len(sel.chosen) == len(ids) + 1
    full = make_selector(store, head).select("p1", "g0", k=len(ids) + 1)
    assert sel.chosen == full.chosen
    # With every score known the budget is never spent, however small.
    sel = selector.select("p1", "g0", budget_ms=1e-9)
    assert sel.fallback != "budget" and len(calls) == 5
    # A budget already spent before the first chunk: the original, unscored.
    store.put_product("p3", png(), embedding=np.ones(16, np.float32))
    add_creatives(store, [None], product="p3")
    sel = selector.select("p3", "g0", budget_ms=0.5)
    assert sel.fallback == "budget" and sel.original_score is None and sel.chosen[0].creative_id is None
    assert sel.to_dict()["chosen"][0]["score"] is None and len(calls) == 5


def test_k_ordering_and_ties(store, head):
    store.put_product("p1", png(), scores={"7": 0.25}, reward_id=REWARD)
    scores = [0.5, 0.125, 0.75, 0.5, 0.25, 0.5, 0.0625]
    ids = add_creatives(store, scores, group="7")
    selector = make_selector(store, head)
    expected = sorted([(-s, 1, i) for s, i in zip(scores, ids)] + [(-0.25, 0, "")])
    expected_ids = [None if flag == 0 else i for _, flag, i in expected]
    for k in (1, 2, 3, 5, len(ids) + 1, 100):
        sel = selector.select("p1", 7, k=k)  # an int group id is its str
        assert ids_of(sel) == expected_ids[:k] and sel.group_id == "7"
        assert [c.score for c in sel.chosen] == sorted((c.score for c in sel.chosen), reverse=True)
    # the three creatives at 0.5 come in creative id order; the original (0.25) before the creative at 0.25
    top = ids_of(selector.select("p1", "7", k=4))
    assert top[1:] == sorted(i for s, i in zip(scores, ids) if s == 0.5)
    assert expected_ids.index(None) + 1 == expected_ids.index(ids[4])


def test_bad_input(store, head):
    store.put_product("p1", png(), scores={"g0": 0.25}, reward_id=REWARD)
    selector = make_selector(store, head)
    with pytest.raises(NotFound, match="unknown product"):
        selector.select("nope", "g0")
    for kwargs in ({"group_id": "g9"}, {"k": 0}, {"k": -1}, {"k": 1.5}, {"k": True}, {"budget_ms": 0},
                   {"budget_ms": -1.0}, {"budget_ms": float("nan")}, {"budget_ms": "5"}, {"group_id": ["g0"]},
                   {"product_id": ["p1"]}, {"product_id": None}, {"group_id": True}):
        args = {"product_id": "p1", "group_id": "g0", **kwargs}
        with pytest.raises(InputError) as info:
            selector.select(**args)
        assert not isinstance(info.value, NotFound) and "\n" not in str(info.value)
    store.put_product("12", png(), scores={"g0": 0.25}, reward_id=REWARD)
    assert selector.select(12, "g0").product_id == "12"  # an int id (from JSON) is its str
    with pytest.raises(InputError, match="unknown group id 'g9'; known groups: '7', 'g0', 'g1'"):
        selector.select("p1", "g9")
    with pytest.raises(ValueError, match="features"):
        Selector(store, head, {"g": np.zeros(2)}, model_id=MODEL, reward_id=REWARD)


class FrozenVersion:
    """A store whose versions never move: only `invalidate` can refresh the selector."""

    def __init__(self, store):
        self.store = store

    def data_version(self) -> int:
        return 0

    def product_version(self, product_id) -> int:
        return 0

    def __getattr__(self, name):
        return getattr(self.store, name)


def test_refresh_after_writes_and_invalidate(tmp_path, head):
    with CreativeStore(tmp_path / "s") as store, CreativeStore(tmp_path / "s") as writer:
        store.put_product("p1", png(), scores={"g0": 0.5, "g1": 0.5}, reward_id=REWARD)
        selector = make_selector(store, head)
        assert selector.select("p1", "g0").fallback == "none_stored"
        # Another connection writes: data_version moves and the next select sees the write.
        ids = add_creatives(writer, [0.75])
        sel = selector.select("p1", "g0")
        assert ids_of(sel) == ids and sel.fallback is None
        writer.put_scores("p1", MODEL, REWARD, "g0", ids, [0.25])
        assert selector.select("p1", "g0").fallback == "original_better"

        # With data_version frozen the index stays as read until invalidate.
        store.put_product("p2", png(), scores={"g0": 0.5}, reward_id=REWARD)
        frozen = make_selector(FrozenVersion(store), head)
        assert frozen.select("p2", "g0").fallback == "none_stored"
        first = add_creatives(writer, [0.875], product="p2", seed=3)
        assert frozen.select("p2", "g0").fallback == "none_stored"
        frozen.invalidate("p1")  # another product: p2 stays cached
        assert frozen.select("p2", "g0").fallback == "none_stored"
        frozen.invalidate("p2")
        assert ids_of(frozen.select("p2", "g0")) == first
        second = add_creatives(writer, [0.9375], product="p2", seed=4)
        assert ids_of(frozen.select("p2", "g0")) == first
        frozen.invalidate()
        assert ids_of(frozen.select("p2", "g0", k=3)) == [second[0], first[0], None]


def test_threads_select_while_a_writer_writes(store, head):
    import threading

    store.put_product("p1", png(), title="t", embedding=np.ones(16, np.float32), scores={"g0": 0.5},
                      reward_id=REWARD)
    selector = make_selector(store, head)
    written: list = []
    errors: list = []
    stop = threading.Event()

    def reader(group):
        try:
            while not stop.is_set():
                sel = selector.select("p1", group, k=3)
                seen = set(written)  # read after the selection: everything it names was written by then
                assert all(c.creative_id is None or c.creative_id in seen for c in sel.chosen)
                assert [c.score for c in sel.chosen] == sorted((c.score for c in sel.chosen), reverse=True)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(g,)) for g in ("g0", "g1", "g0")]
    for t in threads:
        t.start()
    try:
        rng = np.random.default_rng(7)
        for n in range(12):  # scores for g0 only: g1 is scored live by the readers
            image = png()
            written.append(hashlib.sha256(image).hexdigest())  # known to the readers before it is committed
            store.put_creatives([NewCreative("p1", None, f"p {n}", n, n, MODEL, image, None,
                                             rng.standard_normal(16), {"g0": 0.25 + n / 32})], reward_id=REWARD)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[0]
    best = selector.select("p1", "g0")
    assert ids_of(best) == [written[-1]] and best.chosen[0].score == 0.25 + 11 / 32
    assert selector.select("p1", "g1").candidates == 13


def test_a_write_to_another_product_keeps_this_index(tmp_path, head, monkeypatch):
    """The cache is versioned per product: nearline writes to other products do not force re-reads here."""
    with CreativeStore(tmp_path / "s") as store:
        store.put_product("p1", png(), scores={"g0": 0.5}, reward_id=REWARD)
        add_creatives(store, [0.75])
        selector = make_selector(store, head)
        selector.select("p1", "g0")
        reads = []
        inner = store.candidates
        monkeypatch.setattr(store, "candidates", lambda *a, **k: reads.append(a[0]) or inner(*a, **k))
        store.put_product("p2", png(), scores={"g0": 0.5}, reward_id=REWARD)
        add_creatives(store, [0.875], product="p2", seed=5)
        selector.select("p1", "g0")
        assert reads == []
        newest = add_creatives(store, [0.9], seed=6)  # a write to p1 itself: read again, the new creative wins
        assert ids_of(selector.select("p1", "g0")) == newest and reads == ["p1"]
