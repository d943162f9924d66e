"""The creative store (cg4ctr_fast.serving.store) and `cg4ctr store`: round trips, idempotence, model ids that never
mix, schema refusal, crash safety under SIGKILL, readers during writes, id checks, Parquet export, the CLI."""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cg4ctr_fast.errors import InputError
from cg4ctr_fast.serving.errors import NotFound
from cg4ctr_fast.serving.store import (
    DB_FILE,
    SCHEMA_VERSION,
    CreativeStore,
    NewCreative,
    StoreError,
)

ROOT = Path(__file__).resolve().parents[1]
REWARD = "reward:0123456789abcdef"


def png_bytes(rng: np.random.Generator, height: int = 13, width: int = 9) -> bytes:
    """A random RGB PNG (odd sizes on purpose)."""
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def make_creatives(rng, product_id="p1", model_id="preset:tiny:seed0", groups=("g1", "g2"), per_group=2, dim=7,
                   scores_for=("g1", "g2", "g3")):
    out = []
    for group in groups:
        for index in range(per_group):
            out.append(NewCreative(
                product_id=product_id, group_id=group, prompt=f"{group} prompt ✓ {index}", index=index,
                seed=int(rng.integers(0, 2**63 - 1)), model_id=model_id, png=png_bytes(rng),
                reward=float(rng.random()), embedding=rng.standard_normal(dim).astype(np.float32),
                scores={g: float(rng.random()) for g in scores_for}))
    return out


def one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text and text
    return text


@pytest.fixture()
def store(tmp_path):
    with CreativeStore(tmp_path / "store") as s:
        yield s


def test_round_trip_rows_embeddings_scores(store):
    rng = np.random.default_rng(1)
    original = png_bytes(rng, 17, 11)
    product_embedding = rng.standard_normal(7).astype(np.float32)
    sha = store.put_product("p1", original, title="red shoe", embedding=product_embedding,
                            scores={"g1": 0.25, "g2": 0.5}, reward_id=REWARD)
    assert sha == hashlib.sha256(original).hexdigest()
    new = make_creatives(rng)
    new.append(NewCreative("p1", None, "no group", 0, None, "preset:tiny:seed0", png_bytes(rng), None, None))
    ids = store.put_creatives(new, reward_id=REWARD)
    assert ids == [hashlib.sha256(c.png).hexdigest() for c in new]

    rows = store.creatives("p1")
    assert [r.creative_id for r in rows] == ids
    for row, c in zip(rows, new):
        assert (row.product_id, row.group_id, row.prompt, row.index, row.seed, row.model_id, row.reward) == (
            c.product_id, c.group_id, c.prompt, c.index, c.seed, c.model_id, c.reward)
        if c.embedding is None:
            assert row.embedding is None
        else:  # float32 stored as bytes: bit-exact
            assert row.embedding.dtype == np.float32 and np.array_equal(row.embedding, c.embedding)
        assert store.image_path(row.creative_id).read_bytes() == c.png
        assert store.image_path(row.creative_id).parent.name == row.creative_id[:2]

    product = store.product("p1")
    assert (product.sha256, product.title) == (sha, "red shoe")
    assert np.array_equal(product.embedding, product_embedding)
    assert store.product("p2") is None
    assert store.image_path(sha).read_bytes() == original

    for group in ("g1", "g2", "g3"):
        cand = store.candidates("p1", "preset:tiny:seed0", group, REWARD)
        assert cand.creative_ids == ids and cand.prompts == [c.prompt for c in new]
        assert cand.embeddings.dtype == np.float32 and cand.embeddings.shape == (len(new), 7)
        assert np.array_equal(cand.embeddings[:-1], np.stack([c.embedding for c in new[:-1]]))
        assert np.isnan(cand.embeddings[-1]).all()  # stored without an embedding
        want = [c.scores[group] if c.scores else np.nan for c in new]
        # stored as float64, returned as float32: exactly the float32 rounding of what was put
        np.testing.assert_array_equal(cand.scores, np.array(want, np.float32))
        assert cand.original_sha256 == sha and np.array_equal(cand.original_embedding, product_embedding)
        if group != "g3":
            assert cand.original_score == {"g1": 0.25, "g2": 0.5}[group]
    assert np.isnan(store.candidates("p1", "preset:tiny:seed0", "g3", REWARD).original_score)
    # Scores of another reward model are not this one's.
    assert np.isnan(store.candidates("p1", "preset:tiny:seed0", "g1", "reward:other").scores).all()

    # put_scores replaces and adds; a creative of another model id is unknown for it.
    store.put_scores("p1", "preset:tiny:seed0", REWARD, "g9", ids[:2], [0.125, 0.75])
    cand = store.candidates("p1", "preset:tiny:seed0", "g9", REWARD)
    assert cand.scores[:2].tolist() == [0.125, 0.75] and np.isnan(cand.scores[2:]).all()
    with pytest.raises(NotFound) as err:
        store.put_scores("p1", "model:other", REWARD, "g9", ids[:1], [0.5])
    assert ids[0] in one_line(err)


def test_reput_is_idempotent_and_data_version_moves(store):
    rng = np.random.default_rng(2)
    store.put_product("p1", png_bytes(rng))
    new = make_creatives(rng)
    version = store.data_version()
    ids = store.put_creatives(new, reward_id=REWARD)
    assert store.data_version() > version
    first = store.creatives("p1")
    stats = store.stats()
    assert store.put_creatives(new, reward_id=REWARD) == ids
    again = store.creatives("p1")
    assert [(r.creative_id, r.created_at) for r in again] == [(r.creative_id, r.created_at) for r in first]
    assert {k: stats[k] for k in ("rows", "files", "bytes", "scores")} == \
        {k: store.stats()[k] for k in ("rows", "files", "bytes", "scores")}
    # The same image under another index is another row, but still one file.
    store.put_creatives([NewCreative("p1", "g1", "x", 7, None, new[0].model_id, new[0].png, None, None)])
    assert store.stats()["rows"] == len(new) + 1 and store.stats()["files"] == stats["files"]
    assert store.candidates("p1", new[0].model_id, "g1", REWARD).creative_ids == ids  # each image once

    # Re-putting the product with the same image and title keeps its scores; a new title drops them.
    original = png_bytes(rng)
    store.put_product("p1", original, title="a", scores={"g1": 0.5}, reward_id=REWARD)
    store.put_product("p1", original, title="a", scores={"g2": 0.25}, reward_id=REWARD)
    assert store.candidates("p1", new[0].model_id, "g1", REWARD).original_score == 0.5
    store.put_product("p1", original, title="b")
    assert np.isnan(store.candidates("p1", new[0].model_id, "g1", REWARD).original_score)
    assert store.product("p1").title == "b"

    # A commit made by another thread (its own connection) is seen here too.
    seen = store.data_version()
    worker = threading.Thread(target=store.put_scores, args=("p1", new[0].model_id, REWARD, "g7", ids[:1], [0.5]))
    worker.start()
    worker.join()
    assert store.data_version() > seen


def test_model_ids_never_mix(store):
    rng = np.random.default_rng(3)
    store.put_product("p1", png_bytes(rng))
    store.put_product("p2", png_bytes(rng))
    models = ["preset:tiny:seed0", "preset:tiny:seed0+lora:0123456789abcdef@1", "model:0123456789abcdef"]
    ids = {}
    for m in models:
        ids[m] = store.put_creatives(make_creatives(rng, model_id=m), reward_id=REWARD)
        store.put_creatives(make_creatives(rng, product_id="p2", model_id=m), reward_id=REWARD)
    for m in models:
        for group in ("g1", "g2"):
            assert store.candidates("p1", m, group, REWARD).creative_ids == ids[m]
        assert [r.creative_id for r in store.creatives("p1", m)] == ids[m]
    assert store.candidates("p1", "engines:unknown", "g1", REWARD).creative_ids == []
    empty = store.candidates("p1", "engines:unknown", "g1", REWARD)
    assert empty.embeddings.shape == (0, 0) and empty.scores.shape == (0,)
    with pytest.raises(NotFound) as err:
        store.candidates("p3", models[0], "g1", REWARD)
    assert "p3" in one_line(err)


def test_bad_input_is_one_line_and_stores_nothing(store):
    rng = np.random.default_rng(4)
    good = make_creatives(rng)[0]
    bad = [
        dict(png=b"GIF89a not a png"),
        dict(embedding=np.array([1.0, np.nan], np.float32)),
        dict(embedding=np.zeros((2, 3), np.float32)),
        dict(reward=1.5),
        dict(product_id=""),
        dict(group_id="x" * 201),
        dict(index=-1),
        dict(seed=2**64),
        dict(model_id=""),
        dict(prompt="caf\udce9"),
        dict(scores={"g1": float("inf")}),
    ]
    for change in bad:
        with pytest.raises(InputError) as err:
            store.put_creatives([good, NewCreative(**{**good.__dict__, **change})], reward_id=REWARD)
        one_line(err)
    with pytest.raises(InputError, match="reward id"):
        store.put_creatives([good])  # scores without the reward model that made them
    with pytest.raises(InputError, match="same size") as err:  # one embedding size per product and model
        store.put_creatives([good, NewCreative(**{**good.__dict__, "index": 5, "embedding": np.ones(3)})],
                            reward_id=REWARD)
    one_line(err)
    stats = store.stats()
    assert (stats["rows"], stats["files"], stats["temp_files"]) == (0, 0, 0)
    store.put_creatives([good], reward_id=REWARD)
    with pytest.raises(InputError, match=r"stored: \[7\]"):
        store.put_creatives([NewCreative(**{**good.__dict__, "index": 5, "embedding": np.ones(3)})],
                            reward_id=REWARD)
    assert store.stats()["rows"] == 1


def test_closed_store_refuses_calls(tmp_path):
    from cg4ctr_fast.serving.errors import RuntimeClosed

    store = CreativeStore(tmp_path / "s")
    store.close()
    store.close()
    with pytest.raises(RuntimeClosed):
        store.stats()


@pytest.mark.parametrize("bad", ["../etc/passwd", "A" * 64, "a" * 63, "a" * 65, "ab/" + "a" * 61,
                                 "/" + "a" * 63, "a" * 64 + "\n", "g" * 64, "", 123, None])
def test_image_path_refuses_non_hex(store, bad):
    with pytest.raises(InputError) as err:
        store.image_path(bad)
    assert type(err.value) is InputError  # refused as malformed, not looked up
    assert one_line(err) == "creative id must be 64 lowercase hex characters (a sha256)"


def test_image_path_not_found(store):
    with pytest.raises(NotFound):
        store.image_path("0" * 64)


def test_schema_version_and_not_a_store(tmp_path):
    root = tmp_path / "s"
    CreativeStore(root).close()
    with sqlite3.connect(root / DB_FILE) as conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (SCHEMA_VERSION + 1,))
    for create in (True, False):
        with pytest.raises(StoreError) as err:
            CreativeStore(root, create=create)
        assert one_line(err) == (f"{root}: store schema version {SCHEMA_VERSION + 1}, this cg4ctr_fast reads "
                                 f"version {SCHEMA_VERSION}")

    with pytest.raises(StoreError, match="not a creative store"):
        CreativeStore(tmp_path / "missing", create=False)
    assert not (tmp_path / "missing").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="not a folder"):
        CreativeStore(tmp_path / "file")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / DB_FILE).write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(StoreError) as err:
        CreativeStore(tmp_path / "junk")
    assert "not a readable SQLite database" in one_line(err)
    (tmp_path / "other").mkdir()
    with sqlite3.connect(tmp_path / "other" / DB_FILE) as conn:
        conn.execute("CREATE TABLE t (x)")
    with pytest.raises(StoreError, match="not a creative store"):
        CreativeStore(tmp_path / "other")


def test_verify_and_gc_find_leftovers_and_damage(store):
    rng = np.random.default_rng(5)
    store.put_product("p1", png_bytes(rng))
    ids = store.put_creatives(make_creatives(rng), reward_id=REWARD)
    report = store.verify_report()
    assert (report.problems, report.warnings, report.checked) == ([], [], len(ids) + 1)

    # What a crash leaves: a complete file no row names, and a hidden temporary file.
    orphan = png_bytes(rng)
    orphan_sha = hashlib.sha256(orphan).hexdigest()
    orphan_path = store.root / "images" / orphan_sha[:2] / f"{orphan_sha}.png"
    orphan_path.parent.mkdir(exist_ok=True)
    orphan_path.write_bytes(orphan)
    temp = store.root / "images" / ids[0][:2] / f".{ids[0]}.png.tmp-0123456789ab"
    temp.write_bytes(b"\x89PNG half")
    stranger = store.root / "images" / "notes.txt"
    stranger.write_text("mine")
    report = store.verify_report()
    assert report.problems == [] and len(report.warnings) == 3
    assert store.gc(temp_min_age_s=3600) == {"orphans_removed": 1, "orphan_bytes": len(orphan), "temp_removed": 0,
                                             "temp_bytes": 0, "kept_files": len(ids) + 1}
    assert store.gc(temp_min_age_s=0)["temp_removed"] == 1
    assert not orphan_path.exists() and not temp.exists() and stranger.exists()  # never touches unknown files
    assert all(store.image_path(i).is_file() for i in ids)

    # Damage: a truncated file and a missing one are problems, one line each.
    store.image_path(ids[0]).write_bytes(b"\x89PNG")
    os.unlink(store.image_path(ids[1]))
    problems = store.verify()
    assert len(problems) == 2 and all("\n" not in p for p in problems)
    assert any(ids[0] in p and "sha256 is" in p for p in problems)
    assert any(ids[1] in p and "missing" in p for p in problems)
    assert store.gc(temp_min_age_s=0)["orphans_removed"] == 0  # a damaged referenced file is kept for inspection


_WRITER = textwrap.dedent("""
    import io, json, sys
    import numpy as np
    from PIL import Image
    from cg4ctr_fast.serving.store import CreativeStore, NewCreative

    def png(rng):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(buffer, format="PNG")
        return buffer.getvalue()

    store = CreativeStore(sys.argv[1])
    per_batch = int(sys.argv[2])
    for batch in range(100000):
        rng = np.random.default_rng(batch)
        creatives = [NewCreative("p%d" % (batch % 3), "g%d" % (k % 2), "prompt %d" % k, k, batch, "m", png(rng),
                                 float(rng.random()), rng.standard_normal(5).astype(np.float32),
                                 {"g0": 0.5, "g1": 0.25}) for k in range(per_batch)]
        ids = store.put_creatives(creatives, reward_id="reward:x")
        print(json.dumps([batch, ids]), flush=True)
""")


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}


def test_sigkill_writer_mid_batch_leaves_a_consistent_store(tmp_path):
    root = tmp_path / "store"
    CreativeStore(root).close()
    per_batch = 6
    rng = random.Random()  # a random moment on purpose; the assertions hold for any
    child = subprocess.Popen([sys.executable, "-c", _WRITER, str(root), str(per_batch)], stdout=subprocess.PIPE,
                             text=True, env=_env(), cwd=ROOT)
    committed = {}
    try:
        for _ in range(rng.randint(3, 6)):
            line = child.stdout.readline()
            assert line, "the writer died early"
            batch, ids = json.loads(line)
            committed[batch] = ids
        # Somewhere in the next batch: files being written, or the transaction in flight.
        threading.Event().wait(rng.uniform(0.0, 0.05))
        child.send_signal(signal.SIGKILL)
        rest = child.stdout.read()
    finally:
        child.kill()
        child.wait()
    for line in rest.splitlines():  # batches it reported before dying also count
        batch, ids = json.loads(line)
        committed[batch] = ids
    assert child.returncode == -signal.SIGKILL

    with CreativeStore(root, create=False) as store:
        assert store.verify() == []
        stored = {}
        for product in ("p0", "p1", "p2"):
            for row in store.creatives(product):
                stored.setdefault(row.seed, []).append(row.creative_id)  # seed = batch number
        for batch, ids in committed.items():
            assert stored.get(batch) == ids, f"batch {batch} reported committed is not all there"
        # Whole batches only: a batch is stored with all its rows or none.
        assert all(len(v) == per_batch for v in stored.values())
        for ids in stored.values():
            assert all(store.image_path(i).is_file() for i in ids)
        store.gc(temp_min_age_s=0)
        report = store.verify_report()
        assert report.problems == [] and report.warnings == []  # leftovers (orphans, temp files) are gone
        assert report.checked == sum(len(set(v)) for v in stored.values())


_READER = textwrap.dedent("""
    import hashlib, json, sys
    from pathlib import Path
    from cg4ctr_fast.serving.store import CreativeStore

    store = CreativeStore(sys.argv[1], create=False)
    stop, per_batch = Path(sys.argv[2]), int(sys.argv[3])
    problems, counts, loops = [], [], 0
    print("ready", flush=True)
    while loops < 20000 and not (stop.exists() and loops > 0):
        loops += 1
        cand = store.candidates("p", "m", "g0", "reward:x")
        counts.append(len(cand.creative_ids))
        if len(cand.creative_ids) % per_batch:
            problems.append("saw a partial batch: %d rows" % len(cand.creative_ids))
        for i in cand.creative_ids[-per_batch:]:
            if hashlib.sha256(store.image_path(i).read_bytes()).hexdigest() != i:
                problems.append("file of %s does not match" % i)
        store.stats()
    print(json.dumps({"problems": problems[:5], "loops": loops, "monotonic": counts == sorted(counts),
                      "last": counts[-1]}))
""")


def test_readers_during_writes_never_see_partial_state(tmp_path):
    root = tmp_path / "store"
    stop = tmp_path / "stop"
    per_batch, batches = 4, 25
    rng = np.random.default_rng(6)
    with CreativeStore(root) as store:
        store.put_product("p", png_bytes(rng))
        reader = subprocess.Popen([sys.executable, "-c", _READER, str(root), str(stop), str(per_batch)],
                                  stdout=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
        assert reader.stdout.readline() == "ready\n"  # it reads while we write, not after
        done = threading.Event()
        seen: list = []

        def read():
            try:
                check()
            except Exception as exc:  # noqa: BLE001 - a reader's failure must fail the test, not only the thread
                seen.append(f"reader failed: {type(exc).__name__}: {exc}")

        def check():
            last = 0
            while not done.is_set() or last < per_batch * batches:
                cand = store.candidates("p", "m", "g0", REWARD)
                n = len(cand.creative_ids)
                # Whole batches only, never fewer than before, every file complete (its sha256 is its name).
                if n % per_batch or n < last:
                    seen.append(f"{n} rows after {last}")
                for i in cand.creative_ids[last:]:
                    if hashlib.sha256(store.image_path(i).read_bytes()).hexdigest() != i:
                        seen.append(f"{i}: partial file")
                if cand.embeddings.shape != (n, 5 if n else 0) or np.isnan(cand.scores).any():
                    seen.append(f"embeddings {cand.embeddings.shape} or scores {cand.scores} of {n} rows")
                store.stats()
                last = n

        def collect():  # gc while rows are being written must never remove a file a row names
            try:
                while not done.is_set():
                    store.gc()
            except Exception as exc:  # noqa: BLE001
                seen.append(f"gc failed: {type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=read) for _ in range(2)] + [threading.Thread(target=collect)]
        for t in threads:
            t.start()
        try:
            for b in range(batches):
                store.put_creatives([NewCreative("p", "g0", f"b{b}", k, b, "m", png_bytes(rng, 24, 20), 0.5,
                                                 rng.standard_normal(5).astype(np.float32), {"g0": 0.5})
                                     for k in range(per_batch)], reward_id=REWARD)
        finally:
            done.set()
            stop.write_text("")
            for t in threads:
                t.join()
            out, _ = reader.communicate(timeout=120)
        assert seen == []
        result = json.loads(out)
        assert result["problems"] == [] and result["monotonic"] and result["loops"] >= 1
        assert store.verify() == []


def test_export_parquet_round_trip(store, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    rng = np.random.default_rng(7)
    store.put_product("p1", png_bytes(rng))
    new = make_creatives(rng, dim=3) + make_creatives(rng, product_id="p2", model_id="m2", dim=3)
    new.append(NewCreative("p1", None, "none", 0, None, "m2", png_bytes(rng), None, None))
    store.put_creatives(new, reward_id=REWARD)
    out = tmp_path / "creatives.parquet"
    assert store.export_parquet(out) == len(new)
    table = pq.read_table(out)
    assert table.schema.field("embedding").type.value_type.bit_width == 32
    rows = table.to_pylist()
    stored = store.creatives("p1") + store.creatives("p2")
    assert len(rows) == len(stored)
    by_id = {(r["product_id"], r["creative_id"], r["index"]): r for r in rows}
    for s in stored:
        r = by_id[(s.product_id, s.creative_id, s.index)]
        assert (r["group_id"], r["prompt"], r["seed"], r["model_id"], r["reward"], r["created_at"]) == (
            s.group_id, s.prompt, s.seed, s.model_id, s.reward, s.created_at)
        if s.embedding is None:
            assert r["embedding"] is None
        else:
            assert np.array_equal(np.array(r["embedding"], np.float32), s.embedding)
        assert (store.root / r["file"]).read_bytes() == store.image_path(s.creative_id).read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left
    empty = CreativeStore(tmp_path / "empty")
    assert empty.export_parquet(tmp_path / "empty.parquet") == 0
    assert pq.read_table(tmp_path / "empty.parquet").num_rows == 0
    empty.close()


def _cli(argv, capsys):
    from cg4ctr_fast.cli.store import main

    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_exit_codes_and_one_line_errors(tmp_path, capsys):
    root = tmp_path / "store"
    rng = np.random.default_rng(8)
    with CreativeStore(root) as store:
        store.put_product("p1", png_bytes(rng))
        ids = store.put_creatives(make_creatives(rng), reward_id=REWARD)

    code, out, err = _cli(["stats", "--store", str(root), "--json"], capsys)
    stats = json.loads(out)
    assert code == 0 and stats["rows"] == len(ids) and stats["files"] == len(ids) + 1 and stats["products"] == 1
    assert stats["model_ids"] == {"preset:tiny:seed0": len(ids)}
    code, out, err = _cli(["stats", "--store", str(root)], capsys)
    assert code == 0 and "creative rows:" in out

    code, out, err = _cli(["verify", "--store", str(root)], capsys)
    assert (code, err) == (0, "") and out.count("\n") == 1 and out.startswith("OK:")

    pq_file = tmp_path / "x.parquet"
    code, out, err = _cli(["export", "--store", str(root), "--parquet", str(pq_file)], capsys)
    assert code == 0 and pq_file.is_file()
    code, out, err = _cli(["export", "--store", str(root), "--parquet", str(pq_file)], capsys)
    assert code == 2 and err.count("\n") == 1 and "--overwrite" in err
    code, out, err = _cli(["export", "--store", str(root), "--parquet", str(pq_file), "--overwrite"], capsys)
    assert code == 0

    code, out, err = _cli(["gc", "--store", str(root), "--json"], capsys)
    assert code == 0 and json.loads(out)["orphans_removed"] == 0

    # Problems: exit 1, each on its own line.
    with CreativeStore(root, create=False) as store:
        store.image_path(ids[0]).write_bytes(b"\x89PNG broken")
        os.unlink(store.image_path(ids[1]))
    code, out, err = _cli(["verify", "--store", str(root)], capsys)
    lines = out.splitlines()
    assert code == 1 and len(lines) == 3 and ids[0] in lines[0] + lines[1] and ids[1] in lines[0] + lines[1]

    # Not a store, another schema version, a bad flag: one line, exit 2, nothing created.
    for argv in (["stats", "--store", str(tmp_path / "nope")], ["verify", "--store", str(tmp_path / "nope")],
                 ["gc", "--store", str(root), "--temp-min-age-s", "-1"], ["stats"]):
        code, out, err = _cli(argv, capsys)
        assert code == 2 and err.count("\n") == 1 and err.startswith("cg4ctr store"), (argv, err)
    assert not (tmp_path / "nope").exists()
    with sqlite3.connect(root / DB_FILE) as conn:
        conn.execute("UPDATE meta SET value = 99 WHERE key = 'schema_version'")
    code, out, err = _cli(["verify", "--store", str(root)], capsys)
    assert code == 2 and err.count("\n") == 1 and "schema version 99" in err


def test_cli_as_a_subprocess(tmp_path):
    root = tmp_path / "store"
    CreativeStore(root).close()
    done = subprocess.run([sys.executable, "-m", "cg4ctr_fast.cli.store", "verify", "--store", str(root)],
                          capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("OK:") and done.stderr == ""


def test_creatives_of_a_replaced_product_image_are_not_candidates(store):
    import dataclasses

    rng = np.random.default_rng(21)
    first = store.put_product("p1", png_bytes(rng), scores={"g1": 0.5}, reward_id=REWARD)
    old = [dataclasses.replace(c, source_sha256=first) for c in make_creatives(rng, per_group=1)]
    unknown_source = make_creatives(rng, groups=("g3",), per_group=1)  # made before sources were recorded
    old_ids = store.put_creatives(old + unknown_source, reward_id=REWARD)
    cands = store.candidates("p1", "preset:tiny:seed0", "g1", REWARD)
    assert cands.creative_ids == old_ids
    second = store.put_product("p1", png_bytes(rng), scores={"g1": 0.5}, reward_id=REWARD)
    new = [dataclasses.replace(c, source_sha256=second) for c in make_creatives(rng, groups=("g1",), per_group=1)]
    new_ids = store.put_creatives(new, reward_id=REWARD)
    cands = store.candidates("p1", "preset:tiny:seed0", "g1", REWARD)
    # The old image's creatives are gone from the candidates (kept in the store); unrecorded sources stay.
    assert cands.creative_ids == [old_ids[-1], *new_ids]
    assert len(store.creatives("p1")) == 4
    with pytest.raises(InputError, match="source_sha256"):
        store.put_creatives([dataclasses.replace(new[0], source_sha256="../x")], reward_id=REWARD)


def test_the_product_mask_is_stored_verified_and_kept_by_gc(store):
    rng = np.random.default_rng(22)
    mask = io.BytesIO()
    Image.fromarray(np.where(rng.random((13, 9)) < 0.5, 255, 0).astype(np.uint8), "L").save(mask, format="PNG")
    store.put_product("p1", png_bytes(rng), mask_png=mask.getvalue())
    row = store.product("p1")
    assert row.mask_sha256 == hashlib.sha256(mask.getvalue()).hexdigest()
    assert store.image_path(row.mask_sha256).read_bytes() == mask.getvalue()
    assert store.gc()["orphans_removed"] == 0 and store.verify() == []
    store.image_path(row.mask_sha256).write_bytes(b"\x89PNG\r\n\x1a\ndamaged")
    assert any("mask of product 'p1'" in p for p in store.verify())
    store.put_product("p1", png_bytes(rng))  # re-put without a mask: the old mask file becomes an orphan
    assert store.product("p1").mask_sha256 is None and store.gc()["orphans_removed"] == 2
