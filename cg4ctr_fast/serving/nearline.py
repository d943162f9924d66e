"""Nearline generation on Ray Data: products in, every (product, group) creative generated, scored and stored.

    from cg4ctr_fast.serving.nearline import NearlineJob, run_nearline
    job = NearlineJob.build(products="products/", store="out/store", source={"kind": "preset", "name": "tiny"},
                            reward=..., groups="groups.json", prompt_model=..., actors=2, batch=4)
    summary = run_nearline(job)          # a NearlineSummary: creatives/s, per-actor utilisation, retries

Data flow (Ray's own machinery, no home-made scheduler):
  1. the driver lists the products: a folder of images (`ray.data.from_items` over the listing) or Parquet with
     an `image` column of paths/URLs (read on the driver, `ray.data.from_arrow`), plus optional `product_id`,
     `mask`, `title`;
  2. the driver reads which (product, group) keys the store already holds for this model id and puts that set in
     Ray's object store; each actor skips them BEFORE generating;
  3. `Dataset.map_batches(NearlineWorker, concurrency=N)`: an actor pool, one `CreativeRuntime` per actor
     (num_gpus=1 per actor on GPU clusters), `batch` products per task; the runtime generates, scores every
     creative for every group and hands the rows to a `ShardWriter`: PNG files go to the shared image path
     (content addressed: a retried task rewrites the same bytes under the same name, a no-op) and the rows to
     one Parquet shard per task, written atomically once the task's files are all written;
  4. the driver (the ONE writer of the SQLite index) merges each shard as its task's output row arrives,
     skipping keys already stored, then deletes the shard. A killed driver leaves shards: the next run merges
     them first, then generates only what is still missing.

Idempotence: a creative's key is (product_id, group_id, index, model_id). Actors (max_restarts=-1,
max_task_retries=-1, Ray Data's defaults for actor pools) retry a task whose actor died; its files are rewritten
unchanged and its shard replaces the half-written one; the merge inserts a key only when the store lacks it, so
neither a retried task nor a re-run job writes a duplicate row.

Nothing here imports ray at module import; `import cg4ctr_fast` stays ray-free.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from cg4ctr_fast.errors import InputError

__all__ = ["NearlineJob", "NearlineSummary", "NearlineWorker", "ShardWriter", "run_nearline", "merge_shards",
           "list_products", "model_id_for", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MASK_SUFFIX = ".mask.png"  # products/<stem>.mask.png is the repaint mask of products/<stem>.<ext>
SHARDS_DIR = "nearline-shards"  # under the store folder (verify scans images/ only, so shards are never orphans)
# Creatives per denoising batch inside an actor: a task of 4 products × 8 groups fills one batch of 32.
DEFAULT_MAX_BATCH = 32
# The runtime's wait for a batch to fill, ms. Submitting a task's products decodes each image in the caller
# (~1-3 ms for 64 px, ~20 ms for 512 px), so the runtime's serving default (2 ms) would start the first product
# alone; 50 ms is < 1 % of one sd15 batch (~5 s on an H200 at batch 32, see docs/scaleout/nearline.md).
DEFAULT_MAX_WAIT_MS = 50.0


def model_id_for(source: dict) -> str:
    """The model id `CreativeRuntime.from_*` gives this generator (the store keys creatives by it)."""
    from cg4ctr_fast.export.manifest import folder_sha256, sha256_file

    if source["kind"] == "engines":
        return f"engines:{sha256_file(Path(source['path']) / 'manifest.json')[:16]}"
    if source["kind"] == "model":
        return f"model:{folder_sha256(source['path'])[:16]}"
    return f"preset:{source['name']}:seed0"


# --------------------------------------------------------------------------------------------- shared files
class SharedFiles:
    """Bytes under a root that every node sees: a local folder or any fsspec URL (s3://, gs://, file://, ...).

    put(rel, data): atomic (temporary name + rename on a local folder; fsspec's whole-object put elsewhere,
    which object stores commit atomically); a file of that size already there is left alone (content addressed).
    """

    def __init__(self, root: str):
        self.root = str(root)
        self.local = "://" not in self.root or self.root.startswith("file://")
        if self.local:
            self._path = Path(self.root[len("file://"):] if self.root.startswith("file://") else self.root)
            self.fs = None
        else:
            import fsspec

            self.fs, self._url = fsspec.core.url_to_fs(self.root)

    def _join(self, rel: str) -> str:
        return f"{self._url.rstrip('/')}/{rel}"

    def put(self, rel: str, data: bytes, *, overwrite: bool = False) -> None:
        if self.local:
            from cg4ctr_fast.fileio import atomic_write_bytes

            path = self._path / rel
            if not overwrite:
                with contextlib.suppress(FileNotFoundError):
                    if path.stat().st_size == len(data):
                        return
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, data)
            return
        target = self._join(rel)
        if not overwrite and self.fs.exists(target) and self.fs.size(target) == len(data):
            return
        self.fs.pipe_file(target, data)

    def get(self, rel: str) -> bytes:
        if self.local:
            return (self._path / rel).read_bytes()
        return self.fs.cat_file(self._join(rel))

    def exists(self, rel: str) -> bool:
        return (self._path / rel).exists() if self.local else self.fs.exists(self._join(rel))

    def remove(self, rel: str) -> None:
        if self.local:
            with contextlib.suppress(FileNotFoundError):
                (self._path / rel).unlink()
        elif self.fs.exists(self._join(rel)):
            self.fs.rm_file(self._join(rel))

    def listdir(self, suffix: str) -> list[str]:
        """Names (relative to the root) of the files directly under it that end with `suffix`, sorted."""
        if self.local:
            if not self._path.is_dir():
                return []
            return sorted(p.name for p in self._path.iterdir() if p.name.endswith(suffix) and p.is_file())
        if not self.fs.exists(self._url):
            return []
        return sorted(Path(p).name for p in self.fs.ls(self._url, detail=False) if p.endswith(suffix))


def read_source_bytes(path: str) -> bytes:
    """A product's image or mask file: a local path or an fsspec URL. InputError (one line) when unreadable."""
    try:
        if "://" in path and not path.startswith("file://"):
            import fsspec

            with fsspec.open(path, "rb") as handle:
                return handle.read()
        return Path(path[len("file://"):] if path.startswith("file://") else path).read_bytes()
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read it ({' '.join(str(exc).split())})") from None


def image_rel(sha256: str) -> str:
    """A store image's path relative to the image root (the store's own layout: images/<ab>/<sha256>.png)."""
    return f"{sha256[:2]}/{sha256}.png"


# --------------------------------------------------------------------------------------------- the shard writer
def _shard_writer_class():
    from cg4ctr_fast.serving.store import CreativeStore

    class _ShardWriter(CreativeStore):
        """What an actor's `CreativeRuntime` writes to instead of the SQLite store: PNG files to the shared image
        root, rows kept in memory until `take()`; no database (one writer, the driver, owns the index).

        A subclass only because the runtime accepts a `CreativeStore`; none of the parent's state is used.
        """

        def __init__(self, images: SharedFiles):  # noqa: D401 - deliberately not calling the parent
            self.images = images
            self.root = Path(".")
            self._products: list[dict] = []
            self._creatives: list[dict] = []

        def put_product(self, product_id, png, *, title="", embedding=None, scores={}, reward_id="",
                        mask_png=None) -> str:
            sha = hashlib.sha256(png).hexdigest()
            self.images.put(image_rel(sha), png)
            mask_sha = None
            if mask_png is not None:
                mask_sha = hashlib.sha256(mask_png).hexdigest()
                self.images.put(image_rel(mask_sha), mask_png)
            self._products.append({
                "product_id": product_id, "sha256": sha, "mask_sha256": mask_sha, "title": title,
                "embedding": None if embedding is None else np.asarray(embedding, np.float32).tolist(),
                "scores_json": json.dumps({str(k): float(v) for k, v in dict(scores).items()}, sort_keys=True),
                "reward_id": reward_id})
            return sha

        def put_creatives(self, creatives, *, reward_id="") -> list:
            ids = []
            for c in creatives:
                sha = hashlib.sha256(c.png).hexdigest()
                self.images.put(image_rel(sha), c.png)
                ids.append(sha)
                self._creatives.append({
                    "creative_id": sha, "product_id": c.product_id, "group_id": c.group_id or "",
                    "prompt": c.prompt, "index": int(c.index), "seed": None if c.seed is None else int(c.seed),
                    "model_id": c.model_id, "reward": c.reward,
                    "embedding": None if c.embedding is None else np.asarray(c.embedding, np.float32).tolist(),
                    "scores_json": json.dumps({str(k): float(v) for k, v in dict(c.scores).items()},
                                              sort_keys=True),
                    "source_sha256": c.source_sha256, "reward_id": reward_id})
            return ids

        def product(self, product_id):
            return None  # nearline requests always carry their image

        def product_version(self, product_id) -> int:
            return 0

        def take(self) -> tuple[list, list]:
            products, creatives = self._products, self._creatives
            self._products, self._creatives = [], []
            return products, creatives

        def close(self) -> None:
            pass

        def __repr__(self) -> str:
            return f"ShardWriter({self.images.root!r})"

    return _ShardWriter


def ShardWriter(images: SharedFiles):  # noqa: N802 - a factory named like the class it builds
    """A `CreativeStore` look-alike that writes files to `images` and keeps rows for a Parquet shard."""
    return _shard_writer_class()(images)


def _write_shard(shards: SharedFiles, name: str, products: list, creatives: list) -> None:
    """<name>.products.parquet then <name>.creatives.parquet (the latter last: its presence commits the shard)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for kind, rows in (("products", products), ("creatives", creatives)):
        buffer = io.BytesIO()
        table = pa.Table.from_pylist(rows) if rows else pa.table({"product_id": pa.array([], pa.string())})
        pq.write_table(table, buffer)
        shards.put(f"{name}.{kind}.parquet", buffer.getvalue(), overwrite=True)


# --------------------------------------------------------------------------------------------- the job
@dataclass
class NearlineJob:
    """Everything an actor needs, plain data (it is shipped to every actor).

    source: the generator, as `serving.sources.check_source` returns it ({"kind": "preset"|"model"|"engines", ...}).
    reward/groups/prompt_model: folders/files as `CreativeRuntime` takes them. group_ids: the groups to make
    creatives for (each gets `images_per_group` images, index 0..n-1). store: the SQLite store folder (driver
    only); images_url: where actors write PNG files (default: the store's images/ folder); shards_url: the
    Parquet shards (default: <store>/nearline-shards). actors: the actor pool size; batch: products per task;
    gpus_per_actor / cpus_per_actor: Ray resources of one actor. fault: a test hook, see `NearlineWorker`.
    """

    products: str
    store: str
    source: dict
    reward: str
    groups: Optional[str]
    prompt_model: Optional[str]
    group_ids: tuple
    model_id: str
    images_per_group: int = 1
    seed: int = 0
    steps: Optional[int] = None
    max_batch: int = DEFAULT_MAX_BATCH
    max_wait_ms: float = DEFAULT_MAX_WAIT_MS
    actors: int = 2
    batch: int = 4
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    images_url: Optional[str] = None
    shards_url: Optional[str] = None
    max_restarts: int = -1
    fault: Optional[dict] = None

    def __post_init__(self):
        for name in ("actors", "batch", "images_per_group", "max_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        if not self.group_ids:
            raise InputError("no user groups to generate for")
        if len(self.group_ids) * self.images_per_group > 64:
            raise InputError(f"{len(self.group_ids)} groups × {self.images_per_group} images is over the 64 "
                             "creatives one request makes; pass fewer --group-ids")
        if self.images_url is None:
            self.images_url = str(Path(self.store) / "images")
        if self.shards_url is None:
            self.shards_url = str(Path(self.store) / SHARDS_DIR)


@dataclass
class NearlineSummary:
    """One job's outcome. creatives: rows merged into the store by this run; skipped_creatives: keys already
    stored (never generated); duplicates_dropped: keys a merge found stored (a retried task's second shard);
    wall_s: from the job's start (actors load their models in it) to the last shard merged; creatives_per_s = creatives / wall_s;
    busy_s per actor (sum of its tasks' seconds) and utilisation = busy_s / wall_s; retried_tasks: tasks started
    again after their actor died; refused: (product_id, one-line reason) the runtime refused (bad image, ...)."""

    products: int = 0
    products_generated: int = 0
    creatives: int = 0
    skipped_creatives: int = 0
    duplicates_dropped: int = 0
    leftover_shards_merged: int = 0
    tasks: int = 0
    retried_tasks: int = 0
    wall_s: float = 0.0
    creatives_per_s: float = 0.0
    merge_s: float = 0.0  # the driver's time in merge_shards (the one SQLite writer), s
    actors: dict = field(default_factory=dict)
    refused: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        out = [f"{self.creatives} creatives stored for {self.products_generated} of {self.products} products in "
               f"{self.wall_s:.1f} s: {self.creatives_per_s:.2f} creatives/s; {self.skipped_creatives} already "
               f"stored (skipped), {self.duplicates_dropped} duplicates dropped at merge"]
        out.append(f"{self.tasks} tasks, {self.retried_tasks} retried after an actor failure; the driver merged "
                   f"shards for {self.merge_s:.2f} s"
                   + (f", {self.leftover_shards_merged} shards of an earlier run merged first"
                      if self.leftover_shards_merged else ""))
        for actor, stats in sorted(self.actors.items()):
            out.append(f"actor {actor}: {stats['tasks']} tasks, {stats['creatives']} creatives, busy "
                       f"{stats['busy_s']:.1f} s = {100 * stats['utilisation']:.0f} % of the wall time")
        for product_id, why in self.refused[:10]:
            out.append(f"refused {product_id!r}: {why}")
        return out


def list_products(path: str) -> tuple[str, list[dict]]:
    """("folder", rows) or ("parquet", []) for `path`; InputError (one line) when it holds no products.

    A folder: every *.png/*.jpg/*.jpeg/*.webp file is a product (product id = file stem; <stem>.mask.png beside it
    is its repaint mask). Parquet (a .parquet file, or a folder of them): an `image` column of paths or URLs,
    optional `product_id` (default: the image's file stem), `mask`, `title`.
    """
    root = Path(path)
    if not root.exists():
        raise InputError(f"--products {path}: no such file or folder")
    if root.is_file():
        if root.suffix != ".parquet":
            raise InputError(f"--products {path}: expected a folder of images or a .parquet file")
        _check_parquet(root)
        return "parquet", []
    parquet = sorted(root.glob("*.parquet"))
    if parquet:
        _check_parquet(parquet[0])
        return "parquet", []
    rows = []
    names = {p.name for p in root.iterdir()}
    for file in sorted(root.iterdir()):
        if not file.is_file() or file.name.endswith(MASK_SUFFIX) or file.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        mask = file.with_name(file.stem + MASK_SUFFIX)
        rows.append({"product_id": file.stem, "image": str(file), "title": "",
                     "mask": str(mask) if mask.name in names else ""})
    if not rows:
        raise InputError(f"--products {path}: no images ({', '.join(IMAGE_SUFFIXES)}) and no .parquet files in it")
    return "folder", rows


def _check_parquet(path: Path) -> None:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        raise InputError(f"--products {path}: not a readable Parquet file ({' '.join(str(exc).split())[:200]})") \
            from None
    if "image" not in schema.names:
        raise InputError(f"--products {path}: no `image` column (paths or URLs of the product images); columns: "
                         f"{', '.join(schema.names) or 'none'}")


def _stored_groups(store, model_id: str, group_ids: Sequence[str], images_per_group: int) -> dict:
    """product_id → sorted list of groups whose every index 0..n-1 is stored for `model_id` (one read)."""
    wanted = set(group_ids)
    with store._read() as conn:  # noqa: SLF001 - one snapshot; the store exposes no bulk key listing
        rows = conn.execute("SELECT product_id, group_id, count(DISTINCT idx) FROM creatives WHERE model_id = ? AND "
                            "idx < ? GROUP BY product_id, group_id", (model_id, images_per_group)).fetchall()
    done: dict = {}
    for product_id, group_id, count in rows:
        if group_id in wanted and count >= images_per_group:
            done.setdefault(product_id, []).append(group_id)
    return {p: sorted(g) for p, g in done.items()}


def merge_shards(store, shards: SharedFiles, images: SharedFiles, names: Optional[Sequence[str]] = None) -> dict:
    """Merge committed shards (those whose .creatives.parquet exists) into the SQLite store; the ONE writer.

    Per shard: the products (put_product: a primary key, re-puts replace), then the creatives whose key
    (product, group, index, model id) the store lacks, in one transaction (put_creatives); then the shard's files
    are deleted. A merge repeated after a crash between the commit and the delete writes nothing new.
    Returns {"shards", "creatives", "duplicates"}.
    """
    import pyarrow.parquet as pq

    from cg4ctr_fast.serving.store import NewCreative

    if names is None:
        names = [n[: -len(".creatives.parquet")] for n in shards.listdir(".creatives.parquet")]
    merged = written = duplicates = 0
    for name in names:
        if not shards.exists(f"{name}.creatives.parquet"):
            continue
        products = pq.read_table(io.BytesIO(shards.get(f"{name}.products.parquet"))).to_pylist() \
            if shards.exists(f"{name}.products.parquet") else []
        creatives = pq.read_table(io.BytesIO(shards.get(f"{name}.creatives.parquet"))).to_pylist()
        for p in products:
            if "sha256" not in p:
                continue
            store.put_product(p["product_id"], images.get(image_rel(p["sha256"])), title=p["title"],
                              embedding=None if p["embedding"] is None else np.asarray(p["embedding"], np.float32),
                              scores=json.loads(p["scores_json"]), reward_id=p["reward_id"],
                              mask_png=None if p["mask_sha256"] is None else images.get(image_rel(p["mask_sha256"])))
        by_reward: dict = {}
        stored: dict = {}
        for c in creatives:
            if "creative_id" not in c:
                continue
            pid, model = c["product_id"], c["model_id"]
            if (pid, model) not in stored:
                stored[(pid, model)] = {(r.group_id or "", r.index) for r in store.creatives(pid, model)}
            key = (c["group_id"], c["index"])
            if key in stored[(pid, model)]:
                duplicates += 1
                continue
            stored[(pid, model)].add(key)
            by_reward.setdefault(c["reward_id"], []).append(NewCreative(
                product_id=pid, group_id=c["group_id"] or None, prompt=c["prompt"], index=c["index"],
                seed=c["seed"], model_id=model, png=images.get(image_rel(c["creative_id"])), reward=c["reward"],
                embedding=None if c["embedding"] is None else np.asarray(c["embedding"], np.float32),
                scores=json.loads(c["scores_json"]), source_sha256=c["source_sha256"]))
        for reward_id, rows in by_reward.items():
            store.put_creatives(rows, reward_id=reward_id)
            written += len(rows)
        for suffix in (".products.parquet", ".creatives.parquet", ".started"):
            shards.remove(name + suffix)
        merged += 1
    return {"shards": merged, "creatives": written, "duplicates": duplicates}


class NearlineWorker:
    """The Ray Data actor: one `CreativeRuntime` (torch threads 1 on CPU), called on batches of products.

    Input batch (numpy format): product_id, image (path/URL), and optional mask, title columns, [B] each.
    Output batch, one row per task: shard (str), actor (str "host:pid"), products, creatives, skipped (creatives
    already stored), busy_s (float, s), started_at / ended_at (unix s, the task's own clock), retried (1 when this task had started before: its actor died), refused
    (JSON list of [product_id, reason]).

    fault (tests only): {"die_on_task": k, "flag": PATH}: the actor's k-th task (1-based) hard-exits the process
    (os._exit) after writing its image files but before its shard, once (the flag file records it fired).
    """

    def __init__(self, job: dict, done_ref: list):
        import ray
        import torch

        # One thread per actor process: N actors on N cores; more threads per process oversubscribe (measured in
        # bench/results/cpu/tiny_ort_t2_*: 2 torch processes × 2 threads on 2 cores ran 3-10× slower).
        torch.set_num_threads(max(1, int(os.environ.get("CG4CTR_ACTOR_THREADS", "1"))))
        self.job = NearlineJob(**job)
        self.done = {p: set(g) for p, g in ray.get(done_ref[0]).items()}
        self.images = SharedFiles(self.job.images_url)
        self.shards = SharedFiles(self.job.shards_url)
        self.writer = ShardWriter(self.images)
        self.runtime = _build_runtime(self.job, self.writer)
        if self.runtime.model_id != self.job.model_id:
            raise RuntimeError(f"actor model id {self.runtime.model_id} != the driver's {self.job.model_id}")
        self.actor = f"{socket.gethostname()}:{os.getpid()}"
        self.tasks = 0

    def __call__(self, batch: dict) -> dict:
        started = time.perf_counter()
        started_at = time.time()
        self.tasks += 1
        ids = [str(p) for p in batch["product_id"]]
        name = hashlib.sha256(json.dumps([self.job.model_id, ids]).encode()).hexdigest()[:32]
        retried = self.shards.exists(f"{name}.started")
        self.shards.put(f"{name}.started", self.actor.encode(), overwrite=True)
        futures, refused, skipped = [], [], 0
        from cg4ctr_fast.serving.runtime import GenerateRequest

        n = len(ids)
        column = lambda key: [str(v) if v is not None else "" for v in batch[key]] if key in batch else [""] * n  # noqa: E731
        images, masks, titles = column("image"), column("mask"), column("title")
        for pid, image, mask, title in zip(ids, images, masks, titles):
            done = self.done.get(pid, set())
            missing = tuple(g for g in self.job.group_ids if g not in done)
            skipped += (len(self.job.group_ids) - len(missing)) * self.job.images_per_group
            if not missing:
                continue
            try:
                request = GenerateRequest(pid, image=read_source_bytes(image), group_ids=missing, title=title,
                                          mask_image=read_source_bytes(mask) if mask else None,
                                          num_images_per_prompt=self.job.images_per_group, seed=self.job.seed)
                futures.append((pid, self.runtime.submit(request, block=True)))
            except InputError as exc:
                refused.append([pid, " ".join(str(exc).split())])
        generated = 0
        for pid, future in futures:
            try:
                generated += len(future.result().creatives)
            except InputError as exc:
                refused.append([pid, " ".join(str(exc).split())])
        products, creatives = self.writer.take()
        fault = self.job.fault
        if fault and self.tasks == fault.get("die_on_task") and not Path(fault["flag"]).exists():
            Path(fault["flag"]).write_text(self.actor)
            os._exit(1)  # the files are written, the shard is not: as a node lost mid-task
        _write_shard(self.shards, name, products, creatives)
        return {"shard": [name], "actor": [self.actor], "products": [len(futures)], "creatives": [generated],
                "skipped": [skipped], "busy_s": [time.perf_counter() - started], "retried": [int(retried)],
                "started_at": [started_at], "ended_at": [time.time()],
                "refused": [json.dumps(refused)]}


def _build_runtime(job: NearlineJob, store):
    from cg4ctr_fast.serving.runtime import CreativeRuntime

    source = job.source
    options = dict(store=store, reward=job.reward, groups=job.groups, prompt_model=job.prompt_model,
                   max_batch=job.max_batch, max_queue=max(64, job.batch), max_wait_ms=job.max_wait_ms,
                   num_inference_steps=job.steps, model_id=job.model_id)
    if source["kind"] == "engines":
        return CreativeRuntime.from_engines(source["path"], backend=source.get("backend", "onnxruntime"),
                                            saliency=source.get("saliency"), **options)
    if source["kind"] == "model":
        return CreativeRuntime.from_pretrained(source["path"], saliency=source.get("saliency"), **options)
    return CreativeRuntime.from_preset(source["name"], random_weights=True, saliency=source.get("saliency"),
                                       **options)


def run_nearline(job: NearlineJob, *, progress: bool = True, on_task=None) -> NearlineSummary:
    """Run the job on the Ray cluster this process is connected to (`ray.init` first); returns its summary.

    progress: Ray Data's own progress bars. on_task(row): called on the driver for each finished task's output
    row (after its shard is merged). Raises InputError for bad input found on the driver; Ray's errors
    (a task that failed past its retries) propagate after the shards finished so far are merged.
    """
    import ray

    from cg4ctr_fast.serving.store import CreativeStore

    kind, rows = list_products(job.products)
    store = CreativeStore(job.store)
    images, shards = SharedFiles(job.images_url), SharedFiles(job.shards_url)
    summary = NearlineSummary()
    try:
        leftovers = merge_shards(store, shards, images)  # a killed earlier run's committed shards
        for name in shards.listdir(".started"):
            shards.remove(name)  # tasks of an earlier run that never committed: they run again below
        summary.leftover_shards_merged = leftovers["shards"]
        done = _stored_groups(store, job.model_id, job.group_ids, job.images_per_group)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = progress
        # Products with every group stored never reach an actor (a re-run of a finished job loads no model);
        # a product with some groups stored is filtered inside the actor, per group.
        complete = {p for p, groups in done.items() if len(groups) == len(job.group_ids)}
        per_product = len(job.group_ids) * job.images_per_group
        summary.products = _count_products(kind, rows, job.products)
        if kind == "folder":
            rows = [r for r in rows if r["product_id"] not in complete]
            summary.skipped_creatives = (summary.products - len(rows)) * per_product
            if not rows:
                return summary
            dataset = ray.data.from_items(rows, override_num_blocks=_blocks(len(rows), job.batch))
        else:
            # The product list (paths, not pixels: ~100 B a row, 100 MB for a million products) is read on the
            # driver and handed to Ray Data as Arrow blocks. `ray.data.read_parquet` would list and read files in
            # tasks that each need a CPU, which an actor pool holding every CPU for the whole job starves: on
            # 2 CPUs with 2 actors its ListFiles task waited forever (measured, Ray 2.60).
            import pyarrow as pa
            import pyarrow.compute as pc

            table = _read_product_table(job.products)
            if complete:
                table = table.filter(pc.invert(pc.is_in(table["product_id"], value_set=pa.array(sorted(complete)))))
            summary.skipped_creatives = (summary.products - table.num_rows) * per_product
            if table.num_rows == 0:
                return summary
            step = -(-table.num_rows // _blocks(table.num_rows, job.batch))
            dataset = ray.data.from_arrow([table.slice(i, step) for i in range(0, table.num_rows, step)] or [table])
        remote = {"max_restarts": job.max_restarts}
        if job.max_restarts == 0:
            remote["max_task_retries"] = 0
        mapped = dataset.map_batches(
            NearlineWorker, batch_size=job.batch, batch_format="numpy", concurrency=job.actors,
            num_cpus=job.cpus_per_actor, num_gpus=job.gpus_per_actor or None,
            fn_constructor_kwargs={"job": asdict(job), "done_ref": [ray.put(done)]}, **remote)
        started = time.perf_counter()
        actors: dict = {}
        try:
            for row in mapped.iter_rows():
                name = str(row["shard"])
                merging = time.perf_counter()
                result = merge_shards(store, shards, images, [name])
                summary.merge_s += time.perf_counter() - merging
                summary.creatives += result["creatives"]
                summary.duplicates_dropped += result["duplicates"]
                summary.tasks += 1
                summary.retried_tasks += int(row["retried"])
                summary.products_generated += int(row["products"])
                summary.skipped_creatives += int(row["skipped"])
                summary.refused.extend(tuple(r) for r in json.loads(str(row["refused"])))
                stats = actors.setdefault(str(row["actor"]), {"tasks": 0, "creatives": 0, "busy_s": 0.0})
                stats["tasks"] += 1
                stats["creatives"] += int(row["creatives"])
                stats["busy_s"] += float(row["busy_s"])
                if on_task is not None:
                    on_task(row)
        finally:
            summary.wall_s = time.perf_counter() - started
            merge_shards(store, shards, images)  # whatever committed before a failure
        summary.creatives_per_s = summary.creatives / summary.wall_s if summary.wall_s > 0 else 0.0
        for stats in actors.values():
            stats["utilisation"] = stats["busy_s"] / summary.wall_s if summary.wall_s > 0 else 0.0
        summary.actors = actors
        return summary
    finally:
        store.close()


def _blocks(rows: int, batch: int) -> int:
    """Input blocks: one per task (`batch` rows) so every actor gets work (one block feeds one actor: a single
    block of 4 products ran on 1 of 2 actors), at most 10,000 (Ray Data's per-block overhead ~ms each)."""
    return max(1, min(-(-rows // batch), 10_000))


def _read_product_table(path: str):
    """The Parquet product list with the columns an actor reads (image; product_id, mask, title when present)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    root = Path(path)
    files = [root] if root.is_file() else sorted(root.glob("*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")
    names = table.column_names
    columns = {"image": table["image"].cast(pa.string())}
    if "product_id" in names:
        columns["product_id"] = table["product_id"].cast(pa.string())
    else:  # the image's file stem, as for a folder
        stems = [Path(str(p)).stem for p in table["image"].to_pylist()]
        columns["product_id"] = pa.array(stems, pa.string())
    for name in ("mask", "title"):
        if name in names:
            columns[name] = pc.fill_null(table[name].cast(pa.string()), "")
    return pa.table(columns)


def _count_products(kind: str, rows: list, path: str) -> int:
    if kind == "folder":
        return len(rows)
    import pyarrow.parquet as pq

    root = Path(path)
    files = [root] if root.is_file() else sorted(root.glob("*.parquet"))
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def init_ray(address: str, *, num_cpus: Optional[int] = None) -> None:
    """Connect to Ray: "local" starts an in-process local cluster (no dashboard); "auto" joins the cluster
    `ray start` set up on this node; any other string is passed to ray.init(address=...). InputError (one
    line) when no cluster answers."""
    import ray

    if ray.is_initialized():
        return
    try:
        if address == "local":
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
        else:
            ray.init(address=address, include_dashboard=False)
    except ConnectionError as exc:
        raise InputError(f"--ray-address {address}: no Ray cluster answers ({' '.join(str(exc).split())[:200]})") \
            from None
