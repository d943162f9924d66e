"""The serving runtime: batches that fill across products equal per-product calls; deadlines; the queue bound.

Reference: `CreativePipeline.__call__` for one product (itself tested against diffusers in test_parity.py).
Tolerance 1e-4 on float outputs (output_type="np"): a larger UNet batch changes the summation order of the
CPU kernels, measured ≤ 2e-6 here; the same bound as test_pipeline's batch-composition test.
"""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from cg4ctr_fast.errors import InputError
from cg4ctr_fast.pipeline import CreativePipeline, ProductJob
from tests.conftest import make_product

TOL = 1e-4


@pytest.fixture(scope="module")
def pipe9():
    return CreativePipeline.from_preset("tiny")


@pytest.fixture(scope="module")
def pipe4():
    return CreativePipeline.from_preset("tiny", unet_in_channels=4, scheduler="euler")


def _products():
    # Odd boxes and seeds: every product has its own mask, so a mixed-up row would show.
    return [
        make_product(seed=3, box=(5, 9, 41, 50)),
        make_product(seed=4, box=(20, 3, 61, 30)),
        make_product(seed=5, box=(11, 17, 29, 59)),
    ]


@pytest.mark.parametrize("which, guidance, strength", [("pipe9", 7.5, 1.0), ("pipe9", 1.0, 1.0),
                                                        ("pipe4", 5.0, 1.0), ("pipe9", 7.5, 0.7)])
def test_cross_product_batch_equals_per_product_calls(request, which, guidance, strength):
    pipe = request.getfixturevalue(which)
    products = _products()
    prompts = [["warm beach"], ["cool studio", "neon city"], ["green moss", "red brick", "warm beach"]]
    per_prompt = [2, 1, 1]
    jobs = [ProductJob(p, image, mask_image=mask, num_images_per_prompt=n, seed=7)
            for p, (image, mask), n in zip(prompts, products, per_prompt)]
    common = dict(num_inference_steps=3, guidance_scale=guidance, strength=strength, show_progress=False)
    batched = pipe.generate_batch(jobs, output_type="np", **common)
    worst = 0.0
    for job, got in zip(jobs, batched):
        alone = pipe(job.prompt, job.image, job.mask_image, num_images_per_prompt=job.num_images_per_prompt,
                     seed=job.seed, output_type="np", **common)
        assert [(c.prompt, c.group, c.index, c.seed) for c in got] == \
               [(c.prompt, c.group, c.index, c.seed) for c in alone]
        for a, b in zip(alone, got):
            worst = max(worst, float(np.abs(a.image - b.image).max()))
            assert np.array_equal(np.asarray(a.mask), np.asarray(b.mask))
    assert worst < TOL, worst
    # Product pixels bit-exact in every product of the batch (8-bit output: a copy, not a computation).
    pil = pipe.generate_batch(jobs, output_type="pil", **common)
    for (image, mask), creatives in zip(products, pil):
        keep = np.asarray(mask) < 128
        for c in creatives:
            assert np.array_equal(np.asarray(c.image)[keep], np.asarray(image)[keep])


def test_batch_of_other_working_sizes_is_refused(pipe9):
    (a, ma), _, _ = _products()
    wide, wide_mask = make_product(width=96, height=48, seed=9)
    jobs = [ProductJob("x", a, mask_image=ma), ProductJob("y", wide, mask_image=wide_mask)]
    with pytest.raises(InputError, match="different working sizes"):
        pipe9.generate_batch(jobs, num_inference_steps=1, show_progress=False)


def test_each_product_is_encoded_once(pipe9, monkeypatch):
    calls = []
    original = pipe9._encode_image

    def counting(image, generator):
        calls.append(image.shape[0])
        return original(image, generator)

    monkeypatch.setattr(pipe9, "_encode_image", counting)
    jobs = [ProductJob(["a", "b", "c"], image, mask_image=mask) for image, mask in _products()]
    pipe9.generate_batch(jobs, num_inference_steps=1, show_progress=False, output_type="latent")
    # 9-channel UNet at strength 1: one masked-image encode per product, of one image, whatever its groups.
    assert calls == [1, 1, 1]


# ---------------------------------------------------------------------------------------------- the runtime
from cg4ctr_fast.models.reward import RewardConfig, RewardModel  # noqa: E402
from cg4ctr_fast.serving.errors import DeadlineExceeded, NotFound, QueueFull, RuntimeClosed  # noqa: E402
from cg4ctr_fast.serving.runtime import CreativeRuntime, GenerateRequest, RuntimeObserver  # noqa: E402

GROUPS = {"a": [1.0, 0.0, 0.0], "b": [0.0, 1.0, 0.0], "c": [0.0, 0.0, 1.0]}
STEPS = 2


def _reward():
    torch.manual_seed(11)
    return RewardModel(RewardConfig(group_dim=3, title_vocab_size=7, caption_vocab_size=9)).eval()


class _Recorder(RuntimeObserver):
    def __init__(self):
        self.batches, self.rejections, self.depths = [], [], []

    def batch(self, creatives, requests):
        self.batches.append((creatives, requests))

    def rejected(self, reason):
        self.rejections.append(reason)

    def queue_depth(self, depth):
        self.depths.append(depth)


def _runtime(tmp_path, **options):
    options.setdefault("num_inference_steps", STEPS)
    return CreativeRuntime(CreativePipeline.from_preset("tiny"), store=tmp_path / "store", reward=_reward(),
                           groups=GROUPS, model_id="preset:tiny:seed0", **options)


def _png_bytes(image):
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class _Gate:
    """Holds the worker inside generate_batch until released, so the queue fills deterministically."""

    def __init__(self, runtime):
        self.entered, self.release, self.calls = threading.Event(), threading.Event(), 0
        inner = runtime.pipeline.generate_batch

        def gated(jobs, **kwargs):
            self.calls += 1
            self.entered.set()
            assert self.release.wait(60)
            return inner(jobs, **kwargs)

        runtime.pipeline.generate_batch = gated


def test_requests_submitted_together_share_one_batch_and_equal_single_calls(tmp_path):
    observer = _Recorder()
    runtime = _runtime(tmp_path, max_batch=16, max_wait_ms=0.0, observer=observer)
    gate = _Gate(runtime)
    try:
        products = _products()
        # The first request occupies the worker; the next three wait in the queue and then share ONE batch.
        first = runtime.submit(GenerateRequest("p0", image=products[0][0], mask_image=products[0][1],
                                               prompts=("warm beach",), group_ids=("a",)))
        assert gate.entered.wait(60)
        requests = [GenerateRequest(f"p{k}", image=image, mask_image=mask, prompts=prompts, group_ids=groups, seed=k)
                    for k, ((image, mask), prompts, groups) in enumerate(
                        zip(products, [("cool studio",), ("neon city", "red brick"), ("green moss",)],
                            [("b",), ("a", "c"), (None,)]), start=1)]
        futures = [runtime.submit(r) for r in requests]
        gate.release.set()
        results = [f.result(120) for f in futures]
        first.result(120)
    finally:
        runtime.close()
    assert observer.batches == [(1, 1), (4, 3)]
    assert [r.batch_requests for r in results] == [3, 3, 3]
    pipe = CreativePipeline.from_preset("tiny")
    for request, result in zip(requests, results):
        alone = pipe(list(request.prompts), request.image, request.mask_image, seed=request.seed,
                     num_inference_steps=STEPS, output_type="np", show_progress=False)
        assert [c.seed for c in alone] == [c.seed for c in result.creatives]
        for single, stored in zip(alone, result.creatives):
            pixels = np.asarray(Image.open(runtime.store.image_path(stored.creative_id)), np.float32) / 255
            # The store holds 8-bit PNGs: at most one 8-bit step from the float reference (rounding).
            assert np.abs(pixels - single.image).max() <= 1 / 255 + 1e-6
        assert set(result.original_scores) == set(GROUPS)
        for stored, group in zip(result.creatives, request.group_ids):
            assert stored.group_id == group
            assert set(stored.scores) == set(GROUPS)
            assert stored.reward == (None if group is None else stored.scores[group])


def test_scores_match_the_torch_reward_model(tmp_path):
    runtime = _runtime(tmp_path)
    try:
        image, mask = _products()[0]
        result = runtime.generate([GenerateRequest("p", image=image, mask_image=mask, prompts=("warm beach",),
                                                   group_ids=("b",), title="red mug")])[0]
    finally:
        runtime.close()
    creative = result.creatives[0]
    stored = Image.open(runtime.store.image_path(creative.creative_id)).convert("RGB")
    reward = runtime.reward
    expected = reward.score_images([stored] * 3, ["red mug"] * 3, ["warm beach"] * 3, np.asarray(list(GROUPS.values())))
    got = np.asarray([creative.scores[g] for g in GROUPS])
    assert np.abs(got - expected).max() < 1e-5
    original = reward.score_images([image] * 3, ["red mug"] * 3, [""] * 3, np.asarray(list(GROUPS.values())))
    assert np.abs(np.asarray([result.original_scores[g] for g in GROUPS]) - original).max() < 1e-5


def test_expired_deadline_is_answered_and_never_run(tmp_path):
    observer = _Recorder()
    runtime = _runtime(tmp_path, observer=observer)
    gate = _Gate(runtime)
    image, mask = _products()[0]
    try:
        blocker = runtime.submit(GenerateRequest("p0", image=image, mask_image=mask, prompts=("x",)))
        assert gate.entered.wait(60)
        late = runtime.submit(GenerateRequest("p1", image=image, mask_image=mask, prompts=("y",),
                                              deadline=time.monotonic() + 0.05))
        time.sleep(0.1)  # the deadline passes while the worker is busy: the request must not start
        gate.release.set()
        with pytest.raises(DeadlineExceeded):
            late.result(60)
        blocker.result(60)
    finally:
        runtime.close()
    assert gate.calls == 1
    assert "deadline" in observer.rejections
    assert runtime.store.product("p1") is None


def test_full_queue_is_refused_and_cancelled_requests_never_run(tmp_path):
    observer = _Recorder()
    runtime = _runtime(tmp_path, max_queue=2, observer=observer)
    gate = _Gate(runtime)
    image, mask = _products()[0]
    req = lambda pid: GenerateRequest(pid, image=image, mask_image=mask, prompts=("x",))  # noqa: E731
    try:
        running = runtime.submit(req("run"))
        assert gate.entered.wait(60)
        waiting = [runtime.submit(req("w0")), runtime.submit(req("w1"))]
        with pytest.raises(QueueFull, match="queue is full"):
            runtime.submit(req("w2"))
        assert runtime.queue_depth() == 2
        assert waiting[0].cancel()
        gate.release.set()
        running.result(60)
        waiting[1].result(60)
    finally:
        runtime.close()
    assert max(observer.depths) == 2
    assert observer.rejections.count("queue_full") == 1 and "cancelled" in observer.rejections
    assert runtime.store.product("w0") is None and runtime.store.product("w2") is None
    assert runtime.store.product("w1") is not None


def test_async_cancel_before_start_never_runs(tmp_path):
    runtime = _runtime(tmp_path)
    gate = _Gate(runtime)
    image, mask = _products()[0]

    async def scenario():
        busy = asyncio.ensure_future(runtime.agenerate(GenerateRequest("busy", image=image, mask_image=mask,
                                                                       prompts=("x",))))
        await asyncio.get_running_loop().run_in_executor(None, gate.entered.wait, 60)
        gone = asyncio.ensure_future(runtime.agenerate(GenerateRequest("gone", image=image, mask_image=mask,
                                                                       prompts=("y",))))
        await asyncio.sleep(0.01)
        gone.cancel()
        gate.release.set()
        result = await busy
        with pytest.raises(asyncio.CancelledError):
            await gone
        return result

    try:
        result = asyncio.run(scenario())
    finally:
        runtime.close()
    assert result.product_id == "busy" and gate.calls == 1
    assert runtime.store.product("gone") is None


@pytest.mark.parametrize("fields, needle", [
    (dict(prompts=("x",), group_ids=("zz",)), "unknown group id 'zz'"),
    (dict(prompts=()), "no prompts"),
    (dict(prompts=("",)), "must not be empty"),
    (dict(prompts=("x", "y"), group_ids=("a",)), "1 group ids for 2 prompts"),
    (dict(prompts=("x",), num_images_per_prompt=65), "over the 64 creatives"),
    (dict(prompts=("x",), image=b"not an image"), "image"),
    (dict(product_id="", prompts=("x",)), "product_id must not be empty"),
    (dict(prompts=("x",), deadline=float("nan")), "deadline"),
    (dict(prompts=("x",), mask_image=None), "no mask: send a mask image"),
    (dict(prompts=("a\x00b",)), "control character U\\+0000 at character 2"),
    (dict(prompts=("x" * 1001,)), "1001 characters, over the 1000 allowed"),
    (dict(prompts=("x",), title="t" * 1001), "title is 1001 characters"),
    (dict(prompts=("x",), seed=-1), "seed must be an integer from 0 to 2\\*\\*63 - 1"),
    (dict(prompts=("x",), seed=2**63), "seed must be an integer from 0"),
])
def test_bad_requests_fail_at_submit_and_store_nothing(tmp_path, fields, needle):
    runtime = _runtime(tmp_path)
    image, mask = _products()[0]
    base = dict(product_id="p", image=image, mask_image=mask)
    try:
        with pytest.raises(InputError, match=needle):
            runtime.submit(GenerateRequest(**{**base, **fields}))
    finally:
        runtime.close()
    assert runtime.store.stats()["rows"] == 0 and runtime.store.stats()["files"] == 0


def test_unknown_stored_product_is_not_found_and_a_known_one_regenerates(tmp_path):
    runtime = _runtime(tmp_path)
    image, mask = _products()[0]
    try:
        with pytest.raises(NotFound, match="unknown product id 'nope'"):
            runtime.submit(GenerateRequest("nope", prompts=("x",)))
        runtime.generate([GenerateRequest("p", image=image, prompts=("x",), mask_image=mask)])
        again = runtime.generate([GenerateRequest("p", prompts=("y",), mask_image=mask)])[0]
    finally:
        runtime.close()
    assert again.creatives[0].prompt == "y"


def test_close_drains_then_refuses(tmp_path):
    runtime = _runtime(tmp_path)
    image, mask = _products()[0]
    futures = [runtime.submit(GenerateRequest(f"p{k}", image=image, mask_image=mask, prompts=("x",)))
               for k in range(3)]
    runtime.close(drain=True)
    assert all(f.result(0).product_id == f"p{k}" for k, f in enumerate(futures))
    with pytest.raises(RuntimeClosed):
        runtime.submit(GenerateRequest("late", image=image, mask_image=mask, prompts=("x",)))


def test_select_after_generate_and_readers_during_writes(tmp_path):
    runtime = _runtime(tmp_path)
    image, mask = _products()[0]
    errors = []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            try:
                runtime.select("p", "a")
            except NotFound:
                pass  # not stored yet
            except Exception as exc:  # noqa: BLE001 - any other error fails the test below
                errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        result = runtime.generate([GenerateRequest("p", image=image, mask_image=mask,
                                                   prompts=("warm beach", "cool studio"), group_ids=("a", "b"),
                                                   num_images_per_prompt=2)])[0]
        selection = runtime.select("p", "a", k=2)
    finally:
        stop.set()
        for t in threads:
            t.join()
        runtime.close()
    assert errors == []
    best = max([(c.scores["a"], c.creative_id) for c in result.creatives])
    if best[0] > result.original_scores["a"]:
        assert selection.fallback is None and selection.chosen[0].creative_id == best[1]
    else:
        assert selection.fallback == "original_better" and selection.chosen[0].creative_id is None
    assert selection.candidates == 5  # 4 creatives + the original


def test_a_deadline_the_queue_cannot_meet_is_refused_at_submit(tmp_path):
    runtime = _runtime(tmp_path)
    image, mask = _products()[0]
    calls = []
    inner = runtime.pipeline.generate_batch
    runtime.pipeline.generate_batch = lambda jobs, **kw: calls.append(len(jobs)) or inner(jobs, **kw)
    try:
        runtime._timings.append((1, 30.0))  # a recent batch took 30 s for 1 creative: 5 s cannot be met
        with pytest.raises(DeadlineExceeded, match="0 creatives queued ahead and this request's 1 need about 30000 ms"):
            runtime.submit(GenerateRequest("p", image=image, mask_image=mask, prompts=("x",),
                                           deadline=time.monotonic() + 5.0))
        runtime.submit(GenerateRequest("q", image=image, mask_image=mask, prompts=("x",))).result(60)
    finally:
        runtime.close()
    assert calls == [1] and runtime.store.product("p") is None
    assert runtime._batch_cost()[1] < 30.0  # the estimate follows the batch that ran


def test_a_deadline_its_batch_cannot_meet_is_refused_before_it_runs(tmp_path):
    runtime = _runtime(tmp_path)
    gate = _Gate(runtime)
    image, mask = _products()[0]
    try:
        blocker = runtime.submit(GenerateRequest("b", image=image, mask_image=mask, prompts=("x",)))
        assert gate.entered.wait(60)
        late = runtime.submit(GenerateRequest("p", image=image, mask_image=mask, prompts=("x",),
                                              deadline=time.monotonic() + 5.0))  # no estimate yet: queued
        runtime._timings.append((1, 30.0))
        gate.release.set()
        blocker.result(60)
        with pytest.raises(DeadlineExceeded, match="a batch takes about"):
            late.result(60)
    finally:
        runtime.close()
    assert gate.calls == 1 and runtime.store.product("p") is None


def test_batch_cost_is_a_line_through_recent_batches(tmp_path):
    runtime = _runtime(tmp_path)
    runtime.close()
    assert runtime._batch_cost() is None
    runtime._timings.extend([(2, 1.0), (8, 2.2), (4, 1.4)])  # 0.6 s per batch + 0.2 s per creative, exactly
    a, b = runtime._batch_cost()
    assert a == pytest.approx(0.6) and b == pytest.approx(0.2)
    runtime._timings.clear()
    runtime._timings.extend([(4, 2.0), (4, 1.0)])  # one size only: proportional
    assert runtime._batch_cost() == pytest.approx((0.0, 0.375))


def test_a_stored_product_regenerates_with_its_stored_mask_and_file(tmp_path):
    runtime = _runtime(tmp_path)  # the tiny preset has no saliency net: without the stored mask this would fail
    image, mask = _products()[1]
    try:
        first = runtime.generate([GenerateRequest("p", image=image, mask_image=mask, prompts=("warm",))])[0]
        sha = runtime.store.product("p").sha256
        again = runtime.generate([GenerateRequest("p", prompts=("cool",))])[0]
        selection = runtime.select("p", "a", k=5)
    finally:
        runtime.close()
    assert runtime.store.product("p").sha256 == sha  # the stored file itself, not a re-encoding
    keep = np.asarray(mask) < 128
    pixels = np.asarray(Image.open(runtime.store.image_path(again.creatives[0].creative_id)).convert("RGB"))
    assert np.array_equal(pixels[keep], np.asarray(image)[keep])  # the same product region kept, bit for bit
    assert selection.candidates == 3  # both creatives + the original
    assert first.creatives[0].creative_id != again.creatives[0].creative_id


def test_creatives_of_a_replaced_image_are_no_longer_selected(tmp_path):
    runtime = _runtime(tmp_path)
    (old, old_mask), (new, new_mask), _ = _products()
    try:
        runtime.generate([GenerateRequest("p", image=old, mask_image=old_mask, prompts=("a", "b"))])
        fresh = runtime.generate([GenerateRequest("p", image=new, mask_image=new_mask, prompts=("c",))])[0]
        selection = runtime.select("p", "b", k=5)
    finally:
        runtime.close()
    assert selection.candidates == 2  # the new image's creative + the new original
    assert {c.creative_id for c in selection.chosen} <= {fresh.creatives[0].creative_id, None}
