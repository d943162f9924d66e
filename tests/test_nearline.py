"""`cg4ctr nearline` on local Ray (2 CPUs): the same creatives as the local runtime; kill and re-run; bad input.

Reference: `CreativeRuntime` in this process, over the same generator (tiny preset, random weights seeded 0),
the toy reward model, groups and prompt model, for the same requests (one per product, every group, seed 0).
Tolerance: decoded PNG pixels within 1 level of 8 bits (the runtime's float parity bound, 1e-4 on [0, 1]
outputs, can move a rounding by one level when a task batches other products together); embeddings and
rewards within 1e-4 for byte-identical PNGs, 1e-3 where a pixel moved one level. Keys, prompts and seeds must be equal.
"""
from __future__ import annotations

import dataclasses
import io
import os

import numpy as np
import pytest
from PIL import Image

from cg4ctr_fast.cli.main import build_parser, main
from tests.conftest import make_product

ray = pytest.importorskip("ray")

STEPS = 2
PRODUCTS = 4
TOL = 1e-4
PIXEL_LEVEL_TOL = 1e-3


@pytest.fixture(scope="module")
def ray_local():
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _write_products(folder, parquet: bool):
    """4 products with masks, as a folder (<id>.png + <id>.mask.png) and optionally a Parquet listing."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(PRODUCTS):
        image, mask = make_product(seed=20 + k, box=(6 + 3 * k, 9, 40 + 2 * k, 52))
        image.save(folder / f"sku-{k}.png")
        mask.save(folder / f"sku-{k}.mask.png")
        rows.append({"product_id": f"sku-{k}", "image": str(folder / f"sku-{k}.png"),
                     "mask": str(folder / f"sku-{k}.mask.png"), "title": f"product {k}"})
    if not parquet:
        return str(folder)
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = folder.parent / "products.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def _job(products: str, store, *extra: str):
    from cg4ctr_fast.cli.nearline import build_job

    args = build_parser().parse_args(["nearline", "--products", products, "--store", str(store), "--preset", "tiny",
                                      "--steps", str(STEPS), "--actors", "2", "--batch", "2", *extra])
    return build_job(args)


def _reference(job, products_folder, store, titles: bool):
    """The local runtime's creatives for the same requests: {(product, group, index): CreativeRow}."""
    from cg4ctr_fast.serving.runtime import CreativeRuntime, GenerateRequest

    runtime = CreativeRuntime.from_preset("tiny", random_weights=True, store=store, reward=job.reward,
                                          groups=job.groups, prompt_model=job.prompt_model, num_inference_steps=STEPS)
    try:
        requests = [GenerateRequest(f"sku-{k}", image=(products_folder / f"sku-{k}.png").read_bytes(),
                                    mask_image=(products_folder / f"sku-{k}.mask.png").read_bytes(),
                                    group_ids=job.group_ids, title=f"product {k}" if titles else "", seed=job.seed)
                    for k in range(PRODUCTS)]
        runtime.generate(requests)
        assert runtime.model_id == job.model_id
        return _rows(runtime.store, job.model_id), runtime.store
    finally:
        runtime.close()


def _rows(store, model_id):
    rows = {}
    for k in range(PRODUCTS):
        for row in store.creatives(f"sku-{k}", model_id):
            key = (row.product_id, row.group_id, row.index)
            assert key not in rows, f"duplicated key {key}"
            rows[key] = row
    return rows


def _pixels(store, creative_id):
    return np.asarray(Image.open(io.BytesIO(store.image_path(creative_id).read_bytes())).convert("RGB"), np.int16)


def _assert_same_creatives(got_store, want_store, got, want):
    assert sorted(got) == sorted(want)  # no key missing, none extra
    worst = 0
    for key, row in want.items():
        mine = got[key]
        assert (mine.prompt, mine.seed, mine.model_id) == (row.prompt, row.seed, row.model_id), key
        diff = int(np.abs(_pixels(got_store, mine.creative_id) - _pixels(want_store, row.creative_id)).max())
        worst = max(worst, diff)
        # Same PNG bytes: the reward model saw the same pixels (only its batch differs). One level moved in some
        # pixels moved embeddings by up to 1.2e-4 here; 1e-3 bounds that with room.
        tol = TOL if mine.creative_id == row.creative_id else PIXEL_LEVEL_TOL
        np.testing.assert_allclose(mine.embedding, row.embedding, atol=tol, err_msg=str(key))
        assert mine.reward == pytest.approx(row.reward, abs=tol), key
    assert worst <= 1, worst


def test_nearline_equals_local_runtime(ray_local, tmp_path):
    from cg4ctr_fast.serving.nearline import run_nearline
    from cg4ctr_fast.serving.store import CreativeStore

    products = _write_products(tmp_path / "products", parquet=True)
    job = _job(products, tmp_path / "store")
    assert len(job.group_ids) == 8
    summary = run_nearline(job, progress=False)
    assert (summary.creatives, summary.products, summary.refused) == (PRODUCTS * 8, PRODUCTS, [])
    want, want_store = _reference(job, tmp_path / "products", tmp_path / "reference", titles=True)
    with CreativeStore(tmp_path / "store", create=False) as store:
        _assert_same_creatives(store, want_store, _rows(store, job.model_id), want)
        assert store.verify_report().problems == []
        assert store.verify_report().warnings == []
        # every creative scored for every group, and each product once
        stats = store.stats()
        assert (stats["rows"], stats["products"], stats["scores"]) == (32, PRODUCTS, 32 * 8)
    want_store.close()
    assert not list((tmp_path / "store" / "nearline-shards").iterdir())  # every shard merged and removed


@pytest.mark.slow
def test_killed_actor_then_rerun(ray_local, tmp_path):
    """An actor dies mid-task (after writing its files, before its shard): Ray restarts it and retries the task;
    then a job whose actors may not restart dies part-way; each re-run writes only what is missing."""
    from cg4ctr_fast.serving.nearline import run_nearline
    from cg4ctr_fast.serving.store import CreativeStore

    products = _write_products(tmp_path / "products", parquet=False)
    job = _job(products, tmp_path / "store")
    # 1. retried inside the job: max_restarts=-1, max_task_retries=-1 (Ray Data's actor-pool defaults)
    flag = tmp_path / "fired"
    summary = run_nearline(dataclasses.replace(job, fault={"die_on_task": 1, "flag": str(flag)}), progress=False)
    print("killed actor:", *summary.lines(), sep="\n  ")
    assert flag.exists()
    assert summary.retried_tasks >= 1
    assert summary.creatives == PRODUCTS * 8
    # 2. the re-run generates nothing: every key is stored
    again = run_nearline(job, progress=False)
    assert (again.creatives, again.skipped_creatives, again.products_generated) == (0, PRODUCTS * 8, 0)
    want, want_store = _reference(job, tmp_path / "products", tmp_path / "reference", titles=False)
    with CreativeStore(tmp_path / "store", create=False) as store:
        _assert_same_creatives(store, want_store, _rows(store, job.model_id), want)
        assert store.verify_report().problems == []
    # 3. a killed job (no restarts: the task's failure ends the job), then a re-run of the same command
    flag2 = tmp_path / "fired2"
    broken = dataclasses.replace(job, store=str(tmp_path / "store2"), images_url=None, shards_url=None,
                                 max_restarts=0, fault={"die_on_task": 2, "flag": str(flag2)}, actors=1)
    broken.__post_init__()
    with pytest.raises(Exception):
        run_nearline(broken, progress=False)
    with CreativeStore(tmp_path / "store2", create=False) as store:
        first = store.stats()["rows"]
    assert 0 < first < PRODUCTS * 8
    rerun = run_nearline(dataclasses.replace(broken, max_restarts=-1, fault=None), progress=False)
    print(f"killed job stored {first} of {PRODUCTS * 8}; re-run:", *rerun.lines(), sep="\n  ")
    assert rerun.skipped_creatives == first
    assert rerun.creatives == PRODUCTS * 8 - first
    with CreativeStore(tmp_path / "store2", create=False) as store:
        _assert_same_creatives(store, want_store, _rows(store, job.model_id), want)
        assert store.verify_report().problems == []
    want_store.close()
    assert main(["store", "verify", "--store", str(tmp_path / "store2")]) == 0


def test_bad_inputs_are_one_line_exit_2(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "empty").mkdir()
    pq.write_table(pa.table({"path": ["x.png"]}), tmp_path / "nocol.parquet")
    (tmp_path / "afile").write_text("x")
    products = _write_products(tmp_path / "products", parquet=False)
    base = ["nearline", "--store", str(tmp_path / "s"), "--preset", "tiny", "--steps", "2"]
    cases = [
        (["--products", str(tmp_path / "missing")], "no such file or folder"),
        (["--products", str(tmp_path / "empty")], "no images"),
        (["--products", str(tmp_path / "nocol.parquet")], "no `image` column"),
        (["--products", products, "--group-ids", "0,99"], "unknown group id '99'"),
        (["--products", products, "--actors", "0"], "--actors must be a positive integer"),
        (["--products", products, "--store", str(tmp_path / "afile")], "is a file"),
        (["--products", products, "--preset", "nope"], "unknown preset"),
        (["--products", products, "--ray-address", "garbage"], "want local, auto, ray://HOST:PORT"),
        (["--products", products, "--images-url", "nosuchproto://bucket/x"], "--images-url"),
    ]
    for extra, message in cases:
        code = main(base + extra)
        err = capsys.readouterr().err.strip()
        assert code == 2, (extra, err)
        assert len(err.splitlines()) == 1 and message in err, (extra, err)
    assert not (tmp_path / "s").exists()  # nothing created before the checks pass
