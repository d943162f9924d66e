"""The serving engine: a bounded queue, batches that fill across requests, deadlines; no HTTP in here.

    runtime = CreativeRuntime.from_preset("tiny", store="out/store", reward="models/reward", groups="groups.json")
    future = runtime.submit(GenerateRequest("sku-1", image="product.png", group_ids=("3", "5")))
    result = future.result()                           # GenerateResult: stored creative ids and scores
    runtime.select("sku-1", "3")                       # Selection: a stored creative, or the original and why

Nearline path, one worker thread, top to bottom:
  1. `submit` checks the request in the caller's thread (ids, prompts, the image decoded with the same checks
     as `cg4ctr generate`), so bad input fails at once and nothing is queued; a full queue raises QueueFull.
  2. the worker takes the oldest request and every waiting request of the same working size, up to
     `max_batch` creatives (waiting up to `max_wait_ms` for the batch to fill); a request whose deadline has
     passed, or that its batch (timed on recent batches) cannot finish by then, is answered DeadlineExceeded and
     never run; a cancelled one is dropped; requests batch together only under one plan;
  3. `CreativePipeline.generate_batch`: each product encoded once, ONE denoising loop for all of them;
  4. the reward model embeds every creative and the original once; the numpy reward head (`select.RewardHead`)
     scores each of them for every known user group;
  5. the store writes the files, then the rows and scores in one transaction; each request's future resolves.
Online path: `select` reads the stored scores (`select.Selector`); the original photo is always a candidate.

Plans (`cg4ctr_fast.planner`): given a cost table (`cost_table=`, measured by `cg4ctr-bench --calibrate`), a
request with a deadline gets, at submit, the plan (scheduler, steps, guidance, cut-off, cache interval) with the
best measured quality (`quality_table=`) whose predicted p99 fits the time left after the work queued ahead; a
deadline no plan fits is refused at once with `planner.DeadlineInfeasible` (a DeadlineExceeded: HTTP 504)
naming the fastest feasible time, never run late. Requests without a deadline run the runtime's defaults.

Metrics are taken at this boundary through a `RuntimeObserver` (the HTTP layer plugs Prometheus in);
the runtime never imports the HTTP layer.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import io
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from cg4ctr_fast.errors import InputError, check_utf8
from cg4ctr_fast.serving.errors import DeadlineExceeded, NotFound, QueueFull, RuntimeClosed
from cg4ctr_fast.serving.store import MAX_ID_CHARS  # one id rule for the store, the runtime and HTTP

__all__ = [
    "GenerateRequest",
    "StoredCreative",
    "GenerateResult",
    "RuntimeObserver",
    "CreativeRuntime",
    "MAX_CREATIVES_PER_REQUEST",
    "MAX_ID_CHARS",
]

# The same cap as `cg4ctr generate`: one request's creatives share one denoising batch (2× with guidance).
MAX_CREATIVES_PER_REQUEST = 64
# CLIP reads 77 tokens (≈ 300 characters of English); 1,000 leaves room for other scripts and stops a 100 kB
# prompt or title from being stored in every row.
MAX_TEXT_CHARS = 1000
MAX_SEED = 2**63 - 1
# Batches the deadline estimate is fitted on (seconds ≈ a + b · creatives).
_TIMING_WINDOW = 32


@dataclass(frozen=True)
class GenerateRequest:
    """One product to generate creatives for.

    product_id: the caller's id (non-empty, ≤ 200 characters); the store keys everything by it.
    image: the product photo (a path, raw file bytes or a PIL image; the checks of `imaging.load_product`:
        ≤ 4096 × 4096 px, ≤ 64 MiB); None: the original already stored for product_id.
    prompts: one per creative group; empty: the prompt model proposes one per entry of group_ids (or per
        known group when group_ids is empty too).
    group_ids: the user group each prompt is for (known to the runtime); may be empty when prompts are given
        (the creatives are then for no group in particular; they are still scored for every group).
    title: the product title the reward model scores with; mask_image: as `CreativePipeline.__call__`.
    num_images_per_prompt, seed: as `CreativePipeline.__call__` (same seeds, same pixels in any process).
    deadline: absolute `time.monotonic()` seconds; a request that has not started by then, or that would start
        too late to finish by then (its batch timed on recent batches), is never run. None: none.
    """

    product_id: str
    image: Any = None
    prompts: tuple = ()
    group_ids: tuple = ()
    title: str = ""
    mask_image: Any = None
    num_images_per_prompt: int = 1
    seed: int = 0
    deadline: Optional[float] = None


@dataclass(frozen=True)
class StoredCreative:
    """A creative as stored: creative_id is the sha256 (hex) of its PNG file.

    reward: its calibrated CTR in [0, 1] for its own group (None when made for no group);
    scores: group_id → calibrated CTR in [0, 1], for every group the runtime knows.
    """

    creative_id: str
    group_id: Optional[str]
    prompt: str
    index: int
    seed: Optional[int]
    reward: Optional[float]
    scores: dict


@dataclass(frozen=True)
class GenerateResult:
    """What one request produced: its stored creatives and the original's score per group.

    queued_ms: from submit to the start of its batch; run_ms: its batch's generate + score + store time;
    batch_creatives / batch_requests: the denoising batch it ran in (creatives, and requests sharing it).
    plan: the name of the plan it ran under (`planner.Plan.name`), None for the runtime's defaults.
    """

    product_id: str
    model_id: str
    creatives: tuple
    original_scores: dict
    queued_ms: float
    run_ms: float
    batch_creatives: int
    batch_requests: int = 1
    plan: Optional[str] = None  # the planner's plan name when the request had a deadline and the runtime a cost table

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class RuntimeObserver:
    """Hooks at the runtime's boundary; the default does nothing. Called from the worker and caller threads.

    stage names: "queue", "generate", "reward", "store", "select"; rejection reasons: "queue_full",
    "deadline", "bad_input", "closed", "cancelled", "failed". Seconds are wall-clock.
    """

    def queue_depth(self, depth: int) -> None:  # requests waiting, after each change
        pass

    def batch(self, creatives: int, requests: int) -> None:  # one denoising batch
        pass

    def stage(self, name: str, seconds: float) -> None:
        pass

    def rejected(self, reason: str) -> None:
        pass

    def completed(self, status: str, seconds: float) -> None:  # "ok" or a rejection reason, submit → answer
        pass


@dataclass
class _Pending:
    request: GenerateRequest
    product: Any  # imaging.ProductImage
    prompts: list
    group_ids: list
    future: concurrent.futures.Future
    size: tuple  # the working (height, width): requests batch together only at one size
    mask_image: Any  # the request's mask, or the one stored with the product
    creatives: int
    original_png: Optional[bytes] = None  # the stored original's file, when the request named a stored product
    submitted: float = field(default_factory=time.monotonic)
    started: float = 0.0  # time.monotonic() when its batch started
    plan: Any = None  # planner.Plan chosen for its deadline; None: the runtime's defaults

    @property
    def batch_key(self) -> tuple:
        # One denoising loop runs one working size and one plan (steps, guidance and scheduler are per loop).
        return (self.size, self.plan)


def _check_id(value: Any, what: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InputError(f"{what} must be a string, got {type(value).__name__}")
    text = str(value)
    if not text.strip():
        raise InputError(f"{what} must not be empty")
    if len(text) > MAX_ID_CHARS:
        raise InputError(f"{what} is {len(text)} characters, over the {MAX_ID_CHARS} allowed")
    return check_utf8(text, what)


def _check_text(text: str, what: str) -> str:
    """UTF-8, at most MAX_TEXT_CHARS, and no control characters but tab and line breaks."""
    import unicodedata

    check_utf8(text, what)
    if len(text) > MAX_TEXT_CHARS:
        raise InputError(f"{what} is {len(text)} characters, over the {MAX_TEXT_CHARS} allowed")
    for position, char in enumerate(text):
        if char not in "\t\n\r" and unicodedata.category(char) == "Cc":
            raise InputError(f"{what} holds the control character U+{ord(char):04X} at character {position + 1}")
    return text


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _load_groups(groups, group_dim: int) -> tuple[list[str], np.ndarray]:
    """(ids, float32 [n, group_dim]) from a groups.json path, a mapping id → features, or None (one neutral group)."""
    if groups is None:
        # The neutral row `cg4ctr generate` uses: [1.0] for models trained without groups, zeros otherwise.
        row = np.ones((1, 1), np.float32) if group_dim == 1 else np.zeros((1, group_dim), np.float32)
        return ["default"], row
    if isinstance(groups, (str, os.PathLike)):
        from cg4ctr_fast.training.data import _load_groups_json

        ids, features = _load_groups_json(Path(groups))
        ids = [str(g) for g in ids]
    else:
        ids = [_check_id(g, "group id") for g in groups]
        features = np.stack([np.asarray(groups[g], dtype=np.float32).reshape(-1) for g in groups])
    if features.shape[1] != group_dim:
        raise InputError(f"groups have {features.shape[1]} features each, the reward model expects {group_dim}")
    return ids, np.asarray(features, dtype=np.float32)


class CreativeRuntime:
    """Thread-safe serving engine over a `CreativePipeline`, a reward model and a `CreativeStore`.

    Args:
        pipeline: the generator (any backend: torch, compile, onnxruntime, tensorrt slots).
        store: a `store.CreativeStore` or a folder (created if missing).
        reward: a `RewardModel` or a folder written by `cg4ctr-train reward` (required: every creative is
            scored for every group when it is stored, so online selection only reads scores).
        groups: the user groups: a groups.json path (`cg4ctr-sim`'s format), a mapping group_id → features,
            or None for one neutral group "default".
        prompt_model: a `PromptModel` (or its folder) that proposes a prompt per group when a request names
            groups but no prompts; None: such a request is refused.
        model_id: names the generator in the store (selection never mixes model ids).
        max_batch: creatives per denoising batch (requests fill it together; a larger request runs alone).
        max_queue: requests that may wait; one more raises QueueFull.
        max_wait_ms: how long the oldest request waits for others to fill its batch (ms).
        num_inference_steps / guidance_scale: per batch; None: the pipeline's preset defaults (20 / 7.5).
        observer: a `RuntimeObserver` for metrics.
        cost_table: a `planner.CostTable` or its JSON path: requests with a deadline get a plan that fits it
            (see the module doc); None: no planning, deadlines only admit or refuse.
        quality_table: a `planner.QualityTable` or its JSON path, the planner's quality side (None: plans are
            ranked by UNet work).
    Raises InputError for a bad reward folder, groups file or option.
    """

    def __init__(
        self,
        pipeline,
        *,
        store,
        reward,
        groups=None,
        prompt_model=None,
        model_id: str,
        reward_id: Optional[str] = None,
        max_batch: int = 32,
        max_queue: int = 64,
        max_wait_ms: float = 2.0,
        num_inference_steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        observer: Optional[RuntimeObserver] = None,
        cost_table=None,
        quality_table=None,
    ):
        from cg4ctr_fast.models.reward import RewardModel
        from cg4ctr_fast.serving.select import RewardHead, Selector
        from cg4ctr_fast.serving.store import CreativeStore

        for name, value in (("max_batch", max_batch), ("max_queue", max_queue)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        if not (max_wait_ms >= 0 and np.isfinite(max_wait_ms)):
            raise InputError(f"max_wait_ms must be ≥ 0, got {max_wait_ms!r}")
        if reward is None:
            raise InputError("a reward model is needed: every stored creative is scored for every user group")
        if isinstance(reward, (str, os.PathLike)):
            from cg4ctr_fast.export.manifest import folder_sha256

            reward_id = reward_id or f"reward:{folder_sha256(reward)[:16]}"
            reward = RewardModel.load(reward)
        elif reward_id is None:
            reward_id = f"reward:{_state_sha256(reward)[:16]}"
        if isinstance(prompt_model, (str, os.PathLike)):
            from cg4ctr_fast.models.prompt import PromptModel

            prompt_model = PromptModel.load(prompt_model)
        self.pipeline = pipeline
        # The runtime scores with its own reward model (embeddings + head for every group), not the pipeline's.
        self.pipeline.reward = None
        self.store = store if isinstance(store, CreativeStore) else CreativeStore(store)
        self.reward = reward.eval()
        self.reward_id = reward_id
        self.head = RewardHead.from_model(reward)
        ids, features = _load_groups(groups, reward.config.group_dim)
        self.group_ids: tuple[str, ...] = tuple(ids)
        self.group_features = features
        self._group_row = {g: i for i, g in enumerate(ids)}
        self.prompt_model = prompt_model
        self.model_id = _check_id(model_id, "model_id")
        self.selector = Selector(self.store, self.head, dict(zip(ids, features)), model_id=self.model_id,
                                 reward_id=reward_id)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_wait_s = max_wait_ms / 1000.0
        self.num_inference_steps = num_inference_steps or 20
        self.guidance_scale = 7.5 if guidance_scale is None else guidance_scale
        self.observer = observer or RuntimeObserver()
        self._set_planner(cost_table, quality_table)
        self.ready = False
        self._queue: "collections.deque[_Pending]" = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._running = 0  # creatives in the batch being run
        # Seconds per creative of recent batches (EWMA), for deadline admission; None until a batch has run.
        self._timings: "collections.deque[tuple[int, float]]" = collections.deque(maxlen=_TIMING_WINDOW)
        self._worker = threading.Thread(target=self._work, name="cg4ctr-runtime", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_preset(cls, name: str, *, store, reward, seed: int = 0, random_weights: bool = False,
                    scheduler: Optional[str] = None, saliency: Optional[str] = None, backend: str = "torch",
                    lora: Optional[str] = None, lora_scale: float = 1.0, **options) -> "CreativeRuntime":
        """A runtime over `CreativePipeline.from_preset(name, ...)`; model_id "preset:<name>:seed<seed>"."""
        from cg4ctr_fast.pipeline import CreativePipeline

        pipe = CreativePipeline.from_preset(name, seed=seed, random_weights=random_weights, scheduler=scheduler,
                                            saliency=saliency, backend=backend, lora=lora, lora_scale=lora_scale)
        model_id = options.pop("model_id", None) or _with_lora(f"preset:{name}:seed{seed}", lora, lora_scale)
        return cls(pipe, store=store, reward=reward, model_id=model_id, **options)

    @classmethod
    def from_pretrained(cls, path: str, *, store, reward, scheduler: Optional[str] = None,
                        saliency: Optional[str] = None, backend: str = "torch", lora: Optional[str] = None,
                        lora_scale: float = 1.0, **options) -> "CreativeRuntime":
        """A runtime over a local diffusers folder; model_id "model:<sha256 of the folder's files>"."""
        from cg4ctr_fast.export.manifest import folder_sha256
        from cg4ctr_fast.pipeline import CreativePipeline

        pipe = CreativePipeline.from_pretrained(path, scheduler=scheduler, saliency=saliency, backend=backend,
                                                lora=lora, lora_scale=lora_scale, **_pipeline_options(options))
        model_id = options.pop("model_id", None) or _with_lora(f"model:{folder_sha256(path)[:16]}", lora, lora_scale)
        return cls(pipe, store=store, reward=reward, model_id=model_id, **options)

    @classmethod
    def from_engines(cls, path: str, *, store, reward, backend: str = "onnxruntime",
                     scheduler: Optional[str] = None, saliency: Optional[str] = None, **options) -> "CreativeRuntime":
        """A runtime over a `cg4ctr-export` folder (ONNX Runtime or TensorRT); model_id from its manifest."""
        from cg4ctr_fast.export.manifest import sha256_file
        from cg4ctr_fast.pipeline import CreativePipeline

        pipe = CreativePipeline.from_engines(path, backend=backend, scheduler=scheduler, saliency=saliency,
                                             reward=False)
        model_id = options.pop("model_id", None) or f"engines:{sha256_file(Path(path) / 'manifest.json')[:16]}"
        return cls(pipe, store=store, reward=reward, model_id=model_id, **options)

    # ------------------------------------------------------------------ nearline
    def submit(self, request: GenerateRequest, *, block: bool = False) -> concurrent.futures.Future:
        """Queue one request; returns a Future of its `GenerateResult`.

        The request is checked here, in the caller's thread: InputError (bad ids, prompts, counts or image),
        NotFound (image None and no stored product), RuntimeClosed (closing), DeadlineExceeded (the work queued
        ahead, at the measured seconds per creative, cannot finish by its deadline). A full queue raises QueueFull,
        or with block=True waits for room. `future.cancel()` before the request starts means it never runs.
        """
        started = time.monotonic()
        try:
            pending = self._check(request)
        except InputError:
            self.observer.rejected("bad_input")
            self.observer.completed("bad_input", time.monotonic() - started)
            raise
        with self._cond:
            while True:
                if self._closing:
                    self.observer.rejected("closed")
                    raise RuntimeClosed("the runtime is shutting down and takes no new requests")
                if self.cost_table is not None and pending.request.deadline is not None:
                    self._choose_plan(pending, started)
                else:
                    self._refuse_if_late(pending, started)
                if len(self._queue) < self.max_queue:
                    break
                if not block:
                    self.observer.rejected("queue_full")
                    self.observer.completed("queue_full", time.monotonic() - started)
                    raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later",
                                    retry_after_s=self._retry_after())
                self._cond.wait(0.05)
            self._queue.append(pending)
            self.observer.queue_depth(len(self._queue))
            self._cond.notify_all()
        return pending.future

    def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        """Submit every request (waiting for queue room), wait for all; raises the first request's error."""
        futures = [self.submit(r, block=True) for r in requests]
        return [f.result() for f in futures]

    async def agenerate(self, request: GenerateRequest) -> GenerateResult:
        """`submit` for asyncio; cancelling the awaiting task before the request starts means it never runs.

        The checks of `submit` (decoding the image: up to 64 MiB) run in the default executor, not on the
        event loop, so one large upload does not stall every other connection.
        """
        loop = asyncio.get_running_loop()
        submitted = loop.run_in_executor(None, self.submit, request)
        try:
            future = await asyncio.shield(submitted)
        except asyncio.CancelledError:
            # The submit may still finish in its thread: cancel what it queued, so it never runs.
            submitted.add_done_callback(lambda f: f.cancelled() or f.exception() is not None or f.result().cancel())
            raise
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.cancel()
            raise

    # ------------------------------------------------------------------ online
    def select(self, product_id, group_id, k: int = 1, budget_ms: Optional[float] = None):
        """The best stored creative(s) of this product for this group, or the original and why (`Selection`).

        Ranks by the scores stored at generation time (the head runs live only for missing ones) among this
        runtime's model id; the original photo is always a candidate. Raises NotFound for an unknown product,
        InputError for an unknown group, k < 1 or budget_ms ≤ 0.
        """
        started = time.perf_counter()
        product_id = _check_id(product_id, "product_id")
        group_id = _check_id(group_id, "group_id")
        selection = self.selector.select(product_id, group_id, k=k, budget_ms=budget_ms)
        self.observer.stage("select", time.perf_counter() - started)
        return selection

    def queue_depth(self) -> int:
        with self._cond:
            return len(self._queue)

    def warmup(self) -> None:
        """One throwaway generation (nothing stored) and one head call, so the first request pays no set-up."""
        from PIL import Image

        from cg4ctr_fast.pipeline import ProductJob

        side = self.pipeline.max_side
        image = Image.new("RGB", (side, side), (200, 180, 160))
        mask = Image.new("L", (side, side), 255)
        mask.paste(0, (side // 4, side // 4, 3 * side // 4, 3 * side // 4))
        creatives = self.pipeline.generate_batch([ProductJob("warmup", image, mask_image=mask)],
                                                 num_inference_steps=self.num_inference_steps,
                                                 guidance_scale=self.guidance_scale, show_progress=False)[0]
        self._score([c.image for c in creatives], [""], [c.prompt for c in creatives])
        self.ready = True

    def close(self, drain: bool = True, timeout: Optional[float] = None) -> None:
        """Stop taking requests. drain: finish what is queued and running first; else queued requests fail
        with RuntimeClosed. Waits up to `timeout` seconds (None: until done)."""
        with self._cond:
            self._closing = True
            if not drain:
                while self._queue:
                    pending = self._queue.popleft()
                    if pending.future.set_running_or_notify_cancel():
                        pending.future.set_exception(RuntimeClosed("the runtime closed before this request ran"))
                    self.observer.rejected("closed")
                self.observer.queue_depth(0)
            self._cond.notify_all()
        self._worker.join(timeout)

    def __enter__(self) -> "CreativeRuntime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _batch_cost(self) -> Optional[tuple[float, float]]:
        """(a, b): a batch of n creatives takes about a + b·n seconds, least squares over recent batches (a fixed
        cost per batch: the text encoder, the product encodes, Python per step; b per creative). None before any
        batch ran. One batch size seen so far: a = 0, b = its seconds per creative."""
        if not self._timings:
            return None
        n = np.array([t[0] for t in self._timings], dtype=np.float64)
        seconds = np.array([t[1] for t in self._timings], dtype=np.float64)
        if np.ptp(n) == 0:
            return 0.0, float(np.mean(seconds / n))
        b, a = np.polyfit(n, seconds, 1)
        if a < 0 or b <= 0:  # noise on few points: fall back to proportional
            return 0.0, float(np.sum(seconds) / np.sum(n))
        return float(a), float(b)

    def _refuse_if_late(self, pending: _Pending, started: float) -> None:
        """DeadlineExceeded at once when the work queued ahead plus this request's own, at the measured batch
        cost, would not let it finish by its deadline: answering now beats answering late, and frees the slot.
        The batch running now counts half (on average half done). Called with the lock held."""
        deadline = pending.request.deadline
        cost = self._batch_cost()
        if deadline is None or cost is None:
            return
        a, b = cost
        ahead = sum(p.creatives for p in self._queue)
        work = ahead + pending.creatives
        batches = -(-work // self.max_batch)
        running = (a + b * self._running) / 2 if self._running else 0.0
        expected = running + batches * a + b * work
        now = time.monotonic()
        if now + expected > deadline:
            self.observer.rejected("deadline")
            self.observer.completed("deadline", now - started)
            raise DeadlineExceeded(
                f"the deadline leaves {1000 * max(0.0, deadline - now):.0f} ms; {ahead} creatives queued ahead and "
                f"this request's {pending.creatives} need about {1000 * expected:.0f} ms; not queued")

    def _set_planner(self, cost_table, quality_table) -> None:
        """Load the planner's tables (paths or objects) and the levers this pipeline offers; InputError when
        malformed. The UNet weights are the runtime's own (plans needing other weights are not considered)
        and the runtime scores with its own reward model (the pipeline has none, so no preview ranking)."""
        from cg4ctr_fast import planner

        self.cost_table = self.quality_table = self.levers = None
        if cost_table is None:
            if quality_table is not None:
                raise InputError("quality_table needs cost_table: plans are chosen by predicted latency")
            return
        self.cost_table = (cost_table if isinstance(cost_table, planner.CostTable)
                           else planner.CostTable.load(cost_table))
        self.quality_table = (quality_table if quality_table is None or isinstance(quality_table, planner.QualityTable)
                              else planner.QualityTable.load(quality_table))
        self.levers = planner.detect_levers(backend=self.pipeline.components.backend, reward=False, unet="base")
        self._schedulers: dict = {}

    def _scheduler(self, name: str):
        """The pipeline's noise schedule under the sampler `name`, built once per name."""
        if name not in self._schedulers:
            from cg4ctr_fast.models.diffusion import swap_scheduler

            self._schedulers[name] = swap_scheduler(self.pipeline.scheduler, name)
        return self._schedulers[name]

    def _predict_s(self, plan, batch: Sequence[_Pending], *, stat: str) -> float:
        """Predicted seconds for one batch under `plan`: every creative in one UNet batch; the per-product stages
        (saliency, VAE encode) once per request."""
        creatives = sum(p.creatives for p in batch)
        groups = max(1, creatives // plan.images_per_prompt)
        one = self.cost_table.predict(plan, groups, reward=True, saliency=False, stat=stat)
        salient = sum(1 for p in batch if _needs_saliency(p))
        return (one.total_ms + (len(batch) - 1) * one.stages.get("vae_encode", 0.0)
                + salient * self.cost_table.stage_ms("saliency", stat)) / 1000.0

    def _choose_plan(self, pending: _Pending, started: float) -> None:
        """The plan for a request with a deadline: the best-quality one whose predicted p99 fits the time left
        after the work queued ahead (at the fitted batch cost; 0 before any batch ran). Refuses at once with
        DeadlineInfeasible (naming the fastest feasible time, queue wait included) when none fits. Called with
        the lock held."""
        from cg4ctr_fast.planner import DeadlineInfeasible, plan_for

        now = time.monotonic()
        cost = self._batch_cost()
        wait = 0.0
        if cost is not None:
            a, b = cost
            ahead = sum(p.creatives for p in self._queue)
            running = (a + b * self._running) / 2 if self._running else 0.0
            wait = running + (-(-ahead // self.max_batch)) * a + b * ahead
        left_ms = 1000 * (pending.request.deadline - now - wait)
        try:
            if left_ms <= 0:
                raise DeadlineInfeasible(self._fastest_ms(pending), 1000 * (pending.request.deadline - now),
                                         where="after the queue wait")
            plan, _why = plan_for(left_ms, len(pending.group_ids), self.cost_table, self.quality_table,
                                  served_per_group=pending.request.num_images_per_prompt, reward=True,
                                  saliency=_needs_saliency(pending), levers=self.levers)
        except DeadlineInfeasible as exc:
            self.observer.rejected("deadline")
            self.observer.completed("deadline", now - started)
            fastest = exc.fastest_ms + 1000 * wait
            raise DeadlineInfeasible(fastest, 1000 * (pending.request.deadline - now), exc.plan,
                                     where=f"{self.cost_table.where()}, {1000 * wait:.0f} ms of queued work ahead"
                                     ) from None
        pending.plan = plan

    def _fastest_ms(self, pending: _Pending) -> float:
        """The fastest feasible plan's predicted p99 (ms) for this request, ignoring the deadline."""
        from cg4ctr_fast.planner import DeadlineInfeasible, plan_for

        try:
            plan_for(1e-9, len(pending.group_ids), self.cost_table, self.quality_table,
                     served_per_group=pending.request.num_images_per_prompt, reward=True,
                     saliency=_needs_saliency(pending), levers=self.levers)
        except DeadlineInfeasible as exc:
            return exc.fastest_ms
        return 0.0

    def _retry_after(self) -> float:
        # One batch's worth of work ahead of the caller is a fair first retry; at least 1 s (HTTP's unit).
        return 1.0

    def _check(self, request: GenerateRequest) -> _Pending:
        """Every check that needs no model: ids, prompts, groups, counts, deadline, the image itself."""
        from cg4ctr_fast.imaging import load_product, working_size

        if not isinstance(request, GenerateRequest):
            raise InputError(f"expected a GenerateRequest, got {type(request).__name__}")
        product_id = _check_id(request.product_id, "product_id")
        prompts = list(request.prompts)
        for p in prompts:
            if not isinstance(p, str):
                raise InputError(f"prompts must be strings, got {type(p).__name__}")
            _check_text(p, "prompt")
            if not p.strip():
                raise InputError("a prompt must not be empty")
        group_ids = [None if g is None else _check_id(g, "group id") for g in request.group_ids]
        for g in group_ids:
            if g is not None and g not in self._group_row:
                known = ", ".join(self.group_ids[:10]) + (" …" if len(self.group_ids) > 10 else "")
                raise InputError(f"unknown group id {g!r}; known: {known}")
        if not prompts:
            if self.prompt_model is None:
                raise InputError("no prompts: pass prompts (this server has no prompt model to propose them)")
            group_ids = group_ids or list(self.group_ids)
            if any(g is None for g in group_ids):
                raise InputError("a prompt can only be proposed for a known group id")
        elif group_ids and len(group_ids) != len(prompts):
            raise InputError(f"{len(group_ids)} group ids for {len(prompts)} prompts; give one per prompt or none")
        elif not group_ids:
            group_ids = [None] * len(prompts)
        per_prompt = request.num_images_per_prompt
        if isinstance(per_prompt, bool) or not isinstance(per_prompt, int) or per_prompt <= 0:
            raise InputError(f"num_images_per_prompt must be a positive integer, got {per_prompt!r}")
        creatives = len(group_ids) * per_prompt
        if creatives > MAX_CREATIVES_PER_REQUEST:
            raise InputError(f"{len(group_ids)} prompts × {per_prompt} images per prompt is over the "
                             f"{MAX_CREATIVES_PER_REQUEST} creatives one request makes; split it")
        if isinstance(request.seed, bool) or not isinstance(request.seed, int) or not 0 <= request.seed <= MAX_SEED:
            raise InputError(f"seed must be an integer from 0 to 2**63 - 1, got {request.seed!r}")
        if not isinstance(request.title, str):
            raise InputError(f"title must be a string, got {type(request.title).__name__}")
        _check_text(request.title, "title")
        if request.deadline is not None and not np.isfinite(request.deadline):
            raise InputError(f"deadline must be a finite time.monotonic() value, got {request.deadline!r}")
        image, mask_image = request.image, request.mask_image
        if image is None:
            row = self.store.product(product_id)
            if row is None:
                raise NotFound(f"unknown product id {product_id!r}: send its image first")
            image = self.store.image_path(row.sha256).read_bytes()
            if mask_image is None and row.mask_sha256 is not None:
                mask_image = self.store.image_path(row.mask_sha256)  # the mask its creatives were made with
        product = load_product(image, what="image")
        if mask_image is not None and request.mask_image is None and product.alpha_mask is not None:
            mask_image = None  # a cut-out's own alpha decides, as it did the first time
        if mask_image is None and product.alpha_mask is None and self.pipeline.saliency is None:
            # The pipeline would refuse it too, but only in the worker, after the request waited its turn.
            raise InputError("no mask: send a mask image (white = background to repaint), an image with "
                             "transparency, or serve with a saliency model")
        width, height = working_size(product.model_rgb.width, product.model_rgb.height, self.pipeline.max_side)
        return _Pending(request=dataclasses.replace(request, product_id=product_id), product=product,
                        prompts=prompts, group_ids=group_ids, future=concurrent.futures.Future(),
                        size=(height, width), creatives=creatives, mask_image=mask_image,
                        original_png=image if request.image is None else None)

    def _take_batch(self) -> Optional[list[_Pending]]:
        """The oldest request and every waiting one of its size, up to max_batch creatives; None: stop."""
        with self._cond:
            while not self._queue:
                if self._closing:
                    return None
                self._cond.wait()
            head = self._queue[0]
            # Wait briefly for others to fill the batch: at 2 ms this costs < 1 % of a 64 px generation.
            fill_until = head.submitted + self.max_wait_s
            while True:
                room = self.max_batch - sum(p.creatives for p in self._queue if p.batch_key == head.batch_key)
                now = time.monotonic()
                if room <= 0 or now >= fill_until or self._closing:
                    break
                self._cond.wait(fill_until - now)
            batch, used = [], 0
            for pending in list(self._queue):
                if pending.batch_key != head.batch_key:
                    continue
                if batch and used + pending.creatives > self.max_batch:
                    break
                batch.append(pending)
                used += pending.creatives
            for pending in batch:
                self._queue.remove(pending)
            self._running = used
            self.observer.queue_depth(len(self._queue))
            self._cond.notify_all()
        return batch

    def _work(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            live = []
            now = time.monotonic()
            # A request that cannot finish by its deadline is answered now rather than served late: its batch
            # would take about this long (measured on recent batches; 0 until one has run).
            cost = self._batch_cost()
            estimate = 0.0 if cost is None else cost[0] + cost[1] * sum(p.creatives for p in batch)
            if batch[0].plan is not None:
                # A planned batch: the cost table's expected (p50) time for it; the plan's p99 was checked
                # against the deadline at submit, with the queue wait then expected.
                estimate = self._predict_s(batch[0].plan, batch, stat="p50")
            for pending in batch:
                if not pending.future.set_running_or_notify_cancel():
                    self.observer.rejected("cancelled")
                    self.observer.completed("cancelled", now - pending.submitted)
                    continue
                deadline = pending.request.deadline
                if deadline is not None and now + estimate >= deadline:
                    why = (f"the deadline passed {1000 * (now - deadline):.0f} ms before the request could start"
                           if now >= deadline else
                           f"the deadline leaves {1000 * (deadline - now):.0f} ms and a batch takes about "
                           f"{1000 * estimate:.0f} ms; it was not started")
                    pending.future.set_exception(DeadlineExceeded(why))
                    self.observer.rejected("deadline")
                    self.observer.completed("deadline", now - pending.submitted)
                    continue
                self.observer.stage("queue", now - pending.submitted)
                pending.started = now
                live.append(pending)
            if live:
                self._run(live)
                with self._cond:
                    self._timings.append((sum(p.creatives for p in live), time.monotonic() - now))
            with self._cond:
                self._running = 0
                self._cond.notify_all()

    def _run(self, batch: list[_Pending]) -> None:
        """Generate, score and store one batch; each request's future gets its result or its own error."""
        try:
            outputs = self._generate(batch)
        except Exception:  # noqa: BLE001 - isolate the failing request: rerun each alone
            if len(batch) == 1:
                self._fail(batch[0])
                return
            outputs = None
        if outputs is None:
            for pending in batch:
                try:
                    self._finish([pending], self._generate([pending]), 1)
                except Exception:  # noqa: BLE001
                    self._fail(pending)
            return
        try:
            self._finish(batch, outputs, len(batch))
        except Exception:  # noqa: BLE001
            for pending in batch:
                if not pending.future.done():
                    self._fail(pending)

    def _fail(self, pending: _Pending) -> None:
        import sys

        exc = sys.exc_info()[1]
        reason = "bad_input" if isinstance(exc, InputError) else "failed"
        self.observer.rejected(reason)
        self.observer.completed(reason, time.monotonic() - pending.submitted)
        pending.future.set_exception(exc)

    def _generate(self, batch: list[_Pending]) -> list:
        from cg4ctr_fast.pipeline import ProductJob

        started = time.perf_counter()
        jobs = []
        for pending in batch:
            prompts = pending.prompts or self._propose(pending.group_ids)
            pending.prompts = prompts
            jobs.append(ProductJob(prompts, pending.product, mask_image=pending.mask_image,
                                   num_images_per_prompt=pending.request.num_images_per_prompt,
                                   seed=pending.request.seed))
        self.observer.batch(sum(p.creatives for p in batch), len(batch))
        plan = batch[0].plan
        if plan is None:
            outputs = self.pipeline.generate_batch(jobs, num_inference_steps=self.num_inference_steps,
                                                   guidance_scale=self.guidance_scale, show_progress=False)
        else:
            default = self.pipeline.scheduler
            self.pipeline.scheduler = self._scheduler(plan.scheduler)
            try:
                outputs = self.pipeline.generate_batch(jobs, num_inference_steps=plan.steps,
                                                       guidance_scale=plan.guidance_scale, show_progress=False,
                                                       **plan.pipeline_kwargs())
            finally:
                self.pipeline.scheduler = default
        self.observer.stage("generate", time.perf_counter() - started)
        return outputs

    def _propose(self, group_ids: list) -> list[str]:
        """The prompt model's prompt for each group; item features unknown for a new photo: the logged mean (0)."""
        rows = np.stack([self.group_features[self._group_row[g]] for g in group_ids])
        items = np.zeros((len(group_ids), self.prompt_model.config.item_dim), np.float32)
        return list(self.prompt_model.propose(rows, items))

    def _score(self, images: list, titles: list, captions: list) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings float32 [N, D], calibrated CTR float32 [N, n_groups]) for PIL images."""
        import torch

        with torch.inference_mode():
            embeddings = self.reward.embed_images(self.reward.prepare_images(images)).float().numpy()
        n, groups = len(images), len(self.group_ids)
        title_ids = self.head.encode_titles(titles if len(titles) == n else titles * n)
        caption_ids = self.head.encode_captions(captions)
        scores = self.head.score(
            np.repeat(embeddings, groups, axis=0), np.repeat(title_ids, groups, axis=0),
            np.repeat(caption_ids, groups, axis=0), np.tile(self.group_features, (n, 1)),
        ).reshape(n, groups)
        return embeddings, scores.astype(np.float32)

    def _finish(self, batch: list[_Pending], outputs: list, batch_requests: int) -> None:
        from cg4ctr_fast.serving.store import NewCreative

        batch_creatives = sum(len(c) for c in outputs)
        for pending, creatives in zip(batch, outputs):
            started = time.perf_counter()
            request = pending.request
            # The original is scored with its title and no caption (no prompt made it), as the demo scores it.
            images = [c.image for c in creatives] + [_original_image(pending.product)]
            captions = [c.prompt for c in creatives] + [""]
            embeddings, scores = self._score(images, [request.title], captions)
            self.observer.stage("reward", time.perf_counter() - started)
            started = time.perf_counter()
            by_group = [dict(zip(self.group_ids, map(float, row))) for row in scores]
            per_prompt = request.num_images_per_prompt
            new = []
            for k, c in enumerate(creatives):
                group_id = pending.group_ids[c.group]
                new.append(NewCreative(
                    product_id=request.product_id, group_id=group_id, prompt=c.prompt, index=c.index,
                    seed=c.seed, model_id=self.model_id, png=_png(c.image),
                    reward=None if group_id is None else by_group[k][group_id],
                    embedding=embeddings[k], scores=by_group[k],
                ))
            assert len(new) == len(pending.group_ids) * per_prompt
            # A stored product keeps its very file (so its sha256, which its earlier creatives name as their
            # source); a new upload is stored as decoded: oriented, sRGB, alpha kept.
            original = pending.original_png or _png(_original_image(pending.product, alpha=True))
            source = self.store.put_product(request.product_id, original, title=request.title,
                                            embedding=embeddings[-1], scores=by_group[-1], reward_id=self.reward_id,
                                            mask_png=_png(creatives[0].mask))
            new = [dataclasses.replace(n, source_sha256=source) for n in new]
            ids = self.store.put_creatives(new, reward_id=self.reward_id)
            self.selector.invalidate(request.product_id)
            self.observer.stage("store", time.perf_counter() - started)
            result = GenerateResult(
                product_id=request.product_id, model_id=self.model_id,
                creatives=tuple(StoredCreative(creative_id=cid, group_id=n.group_id, prompt=n.prompt, index=n.index,
                                               seed=n.seed, reward=n.reward, scores=dict(n.scores))
                                for cid, n in zip(ids, new)),
                original_scores=by_group[-1],
                queued_ms=1000 * (pending.started - pending.submitted),
                run_ms=1000 * (time.monotonic() - pending.started),
                batch_creatives=batch_creatives, batch_requests=batch_requests,
                plan=None if pending.plan is None else pending.plan.name,
            )
            self.observer.completed("ok", time.monotonic() - pending.submitted)
            pending.future.set_result(result)


def _needs_saliency(pending: _Pending) -> bool:
    """Whether the saliency net finds this request's product: no mask sent or stored, no transparency."""
    return pending.mask_image is None and pending.product.alpha_mask is None


def _original_image(product, alpha: bool = False):
    """The original photo: as the model saw it (RGB, over white where transparent), or with its alpha."""
    from PIL import Image

    if alpha and product.alpha is not None:
        rgba = np.dstack([np.asarray(product.rgb), product.alpha])
        return Image.fromarray(rgba, "RGBA")
    return product.model_rgb if not alpha else product.rgb


def _with_lora(model_id: str, lora: Optional[str], scale: float) -> str:
    if lora is None:
        return model_id
    from cg4ctr_fast.export.manifest import folder_sha256, sha256_file

    digest = folder_sha256(lora) if Path(lora).is_dir() else sha256_file(lora)
    return f"{model_id}+lora:{digest[:16]}@{scale:g}"


def _pipeline_options(options: dict) -> dict:
    """Pop the `CreativePipeline` keyword arguments out of the runtime options."""
    names = ("saliency_threshold", "saliency_dilate_px", "saliency_size", "max_side", "device", "dtype")
    return {name: options.pop(name) for name in names if name in options}


def _state_sha256(model) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
