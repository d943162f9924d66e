"""The creative store: SQLite in WAL mode plus content-addressed PNG files, embedded (no server to install).

Layout of a store folder ``ROOT``::

    ROOT/store.sqlite3            rows: products, creatives, scores (SQLite, WAL journal: -wal and -shm beside it)
    ROOT/images/<ab>/<sha256>.png the PNG files, named by the sha256 of their bytes (<ab> = its first 2 hex digits)

Atomicity: a writer writes every image file first (temporary file, fsync, rename; content addressed, so writing a
file that exists is a no-op) and only then commits the rows that name them, all of one call in ONE transaction.
A crash (SIGKILL, power cut) therefore leaves no row without its file and no visible partial file: at worst
complete files that no row names yet ("orphans") and hidden temporary files ``.<sha256>.png.tmp-<hex>``, which
`verify` reports as warnings and `gc` removes.  Readers run while a writer writes (WAL: a reader sees the last
commit before its read began).  Thread-safe: each thread gets its own sqlite3 connection.

Nothing here imports torch, pyarrow (only `export_parquet`, lazily) or the HTTP layer.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence

import numpy as np

from cg4ctr_fast.errors import InputError, check_utf8
from cg4ctr_fast.fileio import _fsync_dir, atomic_path, atomic_write_bytes, path_label
from cg4ctr_fast.serving.errors import NotFound, RuntimeClosed

__all__ = ["SCHEMA_VERSION", "StoreError", "NewCreative", "CreativeRow", "ProductRow", "Candidates",
           "VerifyReport", "CreativeStore", "check_creative_id"]

SCHEMA_VERSION = 1
DB_FILE = "store.sqlite3"
IMAGES_DIR = "images"
# A writer that waits for another's transaction waits this long before "database is locked": a batch commit
# of 64 creatives takes milliseconds, a gc chunk of 256 unlinks well under a second, so 30 s only trips on a
# stuck process.
BUSY_TIMEOUT_MS = 30_000
# A temporary image file lives for the few ms of one write + fsync; one older than this is a crash's leftover
# that gc may remove (removing a live one would only fail that writer's call, never corrupt the store).
TEMP_MIN_AGE_S = 300.0
# gc deletes orphans in chunks, each under the write lock, so writers wait at most one chunk.
_GC_CHUNK = 256
# Limits on identifiers (see the serving spec): product and group ids are user supplied.
MAX_ID_CHARS = 200
MAX_MODEL_ID_CHARS = 1000
MAX_EMBEDDING_DIM = 65_536
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_IMAGE_NAME = re.compile(r"([0-9a-f]{64})\.png")
# fileio.atomic_write_bytes names its temporary file ".<final name>.tmp-<12 hex>" beside the final one.
_TEMP_NAME = re.compile(r"\.[0-9a-f]{64}\.png\.tmp-[0-9a-f]+")
_BAD_CREATIVE_ID = "creative id must be 64 lowercase hex characters (a sha256)"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value NOT NULL
);
CREATE TABLE IF NOT EXISTS products (
    product_id TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL,                -- the original image's file: images/<ab>/<sha256>.png
    title TEXT NOT NULL,
    embedding BLOB,                      -- float32 little-endian, dim values; NULL when none
    dim INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,            -- unix s
    mask_sha256 TEXT                     -- the repaint mask the product was generated with (a PNG file), or NULL
);
CREATE INDEX IF NOT EXISTS products_by_sha256 ON products (sha256);
CREATE TABLE IF NOT EXISTS creatives (
    id INTEGER PRIMARY KEY,              -- insertion order
    creative_id TEXT NOT NULL,           -- sha256 of the PNG file
    product_id TEXT NOT NULL,
    group_id TEXT NOT NULL,              -- '' for none: UNIQUE treats NULLs as distinct, which would break idempotence
    prompt TEXT NOT NULL,
    idx INTEGER NOT NULL,                -- the creative's index within its prompt ("index" is an SQL keyword)
    seed INTEGER,
    model_id TEXT NOT NULL,
    reward REAL,                         -- calibrated CTR for its own group, NULL when none
    embedding BLOB,
    dim INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    source_sha256 TEXT,                  -- the product image it was made from; NULL when not recorded
    -- The idempotence key: its index (product_id, model_id, ...) also serves candidates() by prefix.
    UNIQUE (product_id, model_id, group_id, idx, creative_id)
);
CREATE INDEX IF NOT EXISTS creatives_by_sha256 ON creatives (creative_id);
CREATE TABLE IF NOT EXISTS scores (
    product_id TEXT NOT NULL,
    group_id TEXT NOT NULL,
    reward_id TEXT NOT NULL,
    creative_id TEXT NOT NULL,
    score REAL NOT NULL,                 -- calibrated CTR in [0, 1]
    PRIMARY KEY (product_id, group_id, reward_id, creative_id)
) WITHOUT ROWID;
-- The generation of the last write touching each product: the selector's cache compares it, so a write to one
-- product does not make every other product's cached index stale (a store-wide counter did: each select then
-- re-read its rows, 0.5–0.9 ms instead of 0.02 ms, for as long as nearline writes went on).
CREATE TABLE IF NOT EXISTS product_versions (
    product_id TEXT PRIMARY KEY,
    version INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS product_scores (
    product_id TEXT NOT NULL,
    group_id TEXT NOT NULL,
    reward_id TEXT NOT NULL,
    score REAL NOT NULL,
    PRIMARY KEY (product_id, group_id, reward_id)
) WITHOUT ROWID;
"""


class StoreError(InputError):
    """A folder that is not a creative store, or one of another schema version; the message is one line."""


@dataclass(frozen=True)
class NewCreative:
    """One creative to store.  png: the encoded PNG file; embedding: float32 [D] reward-model image embedding;
    reward: calibrated CTR in [0, 1] for its own group (None if none); scores: group_id -> calibrated CTR."""

    product_id: str
    group_id: Optional[str]
    prompt: str
    index: int
    seed: Optional[int]
    model_id: str
    png: bytes
    reward: Optional[float]
    embedding: Optional[np.ndarray]
    scores: Mapping[str, float] = field(default_factory=dict)
    # The sha256 of the product image it was made from (`put_product`'s return): once the product's image is
    # replaced, creatives of the old image stop being candidates. None: not recorded (always a candidate).
    source_sha256: Optional[str] = None


@dataclass(frozen=True)
class CreativeRow:
    """A stored creative; embedding float32 [D] or None; created_at unix s."""

    creative_id: str
    product_id: str
    group_id: Optional[str]
    prompt: str
    index: int
    seed: Optional[int]
    model_id: str
    reward: Optional[float]
    embedding: Optional[np.ndarray]
    created_at: float


@dataclass(frozen=True)
class ProductRow:
    """A stored product: its original image's sha256, title, float32 [D] embedding or None, unix s, and the sha256
    of the repaint mask (mode "L" PNG, 255 = repaint) it was generated with, or None."""

    product_id: str
    sha256: str
    title: str
    embedding: Optional[np.ndarray]
    created_at: float
    mask_sha256: Optional[str] = None


@dataclass(frozen=True)
class Candidates:
    """What selection reads for (product, model id, group, reward id), in one call.

    creative_ids/prompts: N distinct creatives in insertion order; embeddings: float32 [N, D] (NaN rows for a
    creative stored without one; D = 0 when none has one); scores: float32 [N], the stored score for the group,
    NaN where none is stored; original_*: the product's original image (its score NaN when none is stored).
    """

    creative_ids: list
    prompts: list
    embeddings: np.ndarray
    scores: np.ndarray
    original_sha256: str
    original_embedding: Optional[np.ndarray]
    original_score: float


@dataclass(frozen=True)
class VerifyReport:
    """problems: errors (a row without its file, a file whose hash differs, a damaged database), [] = ok;
    warnings: files no row names and leftover temporary files (gc removes both); checked: files hashed."""

    problems: list
    warnings: list
    checked: int


def check_creative_id(creative_id) -> str:
    """The id unchanged if it is 64 lowercase hex characters (a sha256); else InputError (no path traversal)."""
    if not isinstance(creative_id, str) or not _HEX64.fullmatch(creative_id):
        raise InputError(_BAD_CREATIVE_ID)
    return creative_id


def _check_id(value, what: str) -> str:
    # Ints from JSON become str (the spec's identifiers); bool is an int in Python but never an id.
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise InputError(f"{what} must be a string, got {type(value).__name__}")
    if not value:
        raise InputError(f"{what} must not be empty")
    if len(value) > MAX_ID_CHARS:
        raise InputError(f"{what} has {len(value)} characters, at most {MAX_ID_CHARS} allowed")
    return check_utf8(value, what)


def _check_model_id(value) -> str:
    if not isinstance(value, str) or not value:
        raise InputError("model id must be a non-empty string")
    if len(value) > MAX_MODEL_ID_CHARS:
        raise InputError(f"model id has {len(value)} characters, at most {MAX_MODEL_ID_CHARS} allowed")
    return check_utf8(value, "model id")


def _check_reward_id(value, *, required: bool) -> str:
    if not isinstance(value, str):
        raise InputError(f"reward id must be a string, got {type(value).__name__}")
    if required and not value:
        raise InputError("scores need the reward id of the model that computed them (reward_id='reward:...')")
    return check_utf8(value, "reward id")


def _check_score(value, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a number, got {type(value).__name__}") from None
    if not (math.isfinite(number) and 0.0 <= number <= 1.0):
        raise InputError(f"{what} must be a calibrated CTR in [0, 1], got {number}")
    return number


def _check_png(png, what: str) -> bytes:
    if isinstance(png, (bytearray, memoryview)):
        png = bytes(png)
    if not isinstance(png, bytes):
        raise InputError(f"{what} must be PNG file bytes, got {type(png).__name__}")
    if not png.startswith(_PNG_SIGNATURE):
        raise InputError(f"{what} is not a PNG file (no PNG signature)")
    return png


def _embedding_blob(embedding, what: str) -> tuple[Optional[bytes], int]:
    if embedding is None:
        return None, 0
    array = np.asarray(embedding)
    if array.ndim != 1 or not 1 <= array.size <= MAX_EMBEDDING_DIM:
        raise InputError(f"{what} must be a 1-D vector of 1 to {MAX_EMBEDDING_DIM} values, got shape "
                         f"{tuple(array.shape)}")
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise InputError(f"{what} must hold real numbers, got dtype {array.dtype}")
    array = array.astype("<f4")
    if not np.isfinite(array).all():
        raise InputError(f"{what} holds NaN or Inf")
    return array.tobytes(), int(array.size)


def _embedding(blob: Optional[bytes], dim: int) -> Optional[np.ndarray]:
    if blob is None:
        return None
    return np.frombuffer(blob, dtype="<f4", count=dim).astype(np.float32)


class CreativeStore:
    """The creative store at `root` (see the module docstring for the layout and the atomicity guarantee).

    root: a folder; with `create` (default) a missing store is created there, else StoreError.
    Raises StoreError (one line) when `root` is not a folder, holds a file that is not an SQLite database or a
    database that is not a creative store, or a store of another schema version.  Thread-safe: every thread
    gets its own sqlite3 connection (closed by `close()`); all methods may be called from any thread.
    """

    def __init__(self, root, *, create: bool = True):
        self.root = Path(root)
        self._label = path_label(root)
        self._images = self.root / IMAGES_DIR
        self._db = self.root / DB_FILE
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._closed = False
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"{self._label}: is not a folder, so not a creative store")
        if not self._db.exists():
            if not create:
                raise StoreError(f"{self._label}: not a creative store (no {DB_FILE} in it)")
            try:
                self._images.mkdir(parents=True, exist_ok=True)
                _fsync_dir(self.root)
            except OSError as exc:
                raise StoreError(f"{self._label}: cannot create a store there ({exc.strerror or exc})") from None
        self._open_schema(create)
        if create:
            self._images.mkdir(exist_ok=True)

    # -- connections -------------------------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        if self._closed:
            raise RuntimeClosed(f"{self._label}: the store is closed")
        # isolation_level=None: no implicit transactions; every write takes BEGIN IMMEDIATE itself (see _write).
        # check_same_thread=False only so that close() may close every thread's connection.
        conn = sqlite3.connect(self._db, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                               check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"{self._label}: SQLite cannot use WAL mode here (journal mode {mode}); "
                                 "a store needs a local file system")
            # FULL, not NORMAL: in WAL mode NORMAL may lose the last commits on a power cut (never on a process
            # crash).  A commit covers a whole batch whose files were already fsynced one by one (~33 fsyncs for
            # 32 creatives), so FULL's one WAL fsync per commit costs ~3 % more fsyncs, and a batch the caller
            # was told is stored stays stored.
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = OFF")
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StoreError(f"{self._label}: {DB_FILE} is not a readable SQLite database ({exc})") from None
        except BaseException:
            conn.close()
            raise
        with self._lock:
            if self._closed:
                conn.close()
                raise RuntimeClosed(f"{self._label}: the store is closed")
            self._connections.append(conn)
        self._local.conn = conn
        return conn

    def _open_schema(self, create: bool) -> None:
        conn = self._conn()
        try:
            version = self._schema_version(conn)
            if version is None:
                tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
                if tables or not create:
                    raise StoreError(f"{self._label}: {DB_FILE} is not a creative store (no schema version)")
                # One transaction, IF NOT EXISTS / OR IGNORE: two processes creating the same store both succeed.
                try:
                    conn.executescript(
                        f"BEGIN IMMEDIATE; {_SCHEMA}; INSERT OR IGNORE INTO meta (key, value) VALUES "
                        f"('schema_version', {SCHEMA_VERSION}); INSERT OR IGNORE INTO meta (key, value) VALUES "
                        "('generation', 0); COMMIT;")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                    raise
                version = self._schema_version(conn)
        except sqlite3.DatabaseError as exc:
            self.close()
            raise StoreError(f"{self._label}: {DB_FILE} is not a readable SQLite database ({exc})") from None
        except BaseException:
            self.close()
            raise
        if version != SCHEMA_VERSION:
            self.close()
            raise StoreError(f"{self._label}: store schema version {version}, this cg4ctr_fast reads version "
                             f"{SCHEMA_VERSION}")

    @staticmethod
    def _schema_version(conn: sqlite3.Connection):
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return None
            raise
        return None if row is None else row[0]

    @contextlib.contextmanager
    def _write(self, *, bump: bool = True, products: Sequence[str] = ()) -> Iterator[sqlite3.Connection]:
        """One write transaction.  BEGIN IMMEDIATE takes the write lock up front: a deferred transaction that
        upgrades from read to write can fail with SQLITE_BUSY at once, which busy_timeout does not retry.
        products: the product ids the write touches; their `product_version` moves with the generation."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            if bump:
                conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")
                conn.executemany("INSERT INTO product_versions (product_id, version) SELECT ?, value FROM meta "
                                 "WHERE key = 'generation' ON CONFLICT (product_id) DO UPDATE SET "
                                 "version = excluded.version", [(p,) for p in sorted(set(products))])
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: every statement in it sees the same snapshot (WAL)."""
        conn = self._conn()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("COMMIT")

    def close(self) -> None:
        """Close every thread's connection; later calls raise RuntimeClosed.  Idempotent."""
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for conn in connections:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        self._local = threading.local()

    def __enter__(self) -> "CreativeStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CreativeStore({str(self.root)!r})"

    # -- files -------------------------------------------------------------------------------------------------
    def _file(self, sha256: str) -> Path:
        return self._images / sha256[:2] / f"{sha256}.png"

    def _write_file(self, sha256: str, png: bytes) -> None:
        path = self._file(sha256)
        try:
            if path.stat().st_size == len(png):
                return  # content addressed: the same name holds the same bytes (verify checks the hash)
        except FileNotFoundError:
            pass
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True, exist_ok=True)
            # The new shard's own name must survive a power cut too, or a committed row could lose its file:
            # at most 256 such fsyncs over a store's life.
            _fsync_dir(self._images)
        atomic_write_bytes(path, png)

    def _ensure_files(self, files: Mapping[str, bytes]) -> None:
        # Called under the write lock, after the files were first written without it: gc deletes orphans only
        # while it holds that lock, so a file gc removed in between (it had no row yet) is written again here,
        # and from this commit on a row names it.
        for sha256, png in files.items():
            if not self._file(sha256).exists():
                self._write_file(sha256, png)

    # -- writes ------------------------------------------------------------------------------------------------
    def put_product(self, product_id, png: bytes, *, title: str = "", embedding=None,
                    scores: Mapping[str, float] = {}, reward_id: str = "", mask_png: Optional[bytes] = None) -> str:
        """Store a product's original image (PNG bytes) with its title, float32 [D] embedding and its scores
        (group_id -> calibrated CTR in [0, 1], computed by `reward_id`); returns the PNG's sha256.
        mask_png: the repaint mask it was generated with (PNG), kept so a later request by product id reuses it.

        The file first, then the row and scores in one transaction.  Re-putting replaces the row; when the image
        or title changed, the scores stored for the old one are dropped.  InputError on bad input.
        """
        product_id = _check_id(product_id, "product id")
        png = _check_png(png, f"product {product_id!r} image")
        if not isinstance(title, str):
            raise InputError(f"product title must be a string, got {type(title).__name__}")
        check_utf8(title, "product title")
        blob, dim = _embedding_blob(embedding, f"product {product_id!r} embedding")
        checked = {_check_id(g, "group id"): _check_score(s, f"product {product_id!r} score for group {g!r}")
                   for g, s in dict(scores).items()}
        reward_id = _check_reward_id(reward_id, required=bool(checked))
        sha256 = hashlib.sha256(png).hexdigest()
        files = {sha256: png}
        mask_sha256 = None
        if mask_png is not None:
            mask_png = _check_png(mask_png, f"product {product_id!r} mask")
            mask_sha256 = hashlib.sha256(mask_png).hexdigest()
            files[mask_sha256] = mask_png
        for digest, data in files.items():
            self._write_file(digest, data)
        with self._write(products=(product_id,)) as conn:
            self._ensure_files(files)
            old = conn.execute("SELECT sha256, title FROM products WHERE product_id = ?", (product_id,)).fetchone()
            if old is not None and tuple(old) != (sha256, title):
                conn.execute("DELETE FROM product_scores WHERE product_id = ?", (product_id,))
            conn.execute("INSERT INTO products (product_id, sha256, title, embedding, dim, created_at, mask_sha256) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (product_id) DO UPDATE SET "
                         "sha256 = excluded.sha256, title = excluded.title, embedding = excluded.embedding, "
                         "dim = excluded.dim, mask_sha256 = excluded.mask_sha256",
                         (product_id, sha256, title, blob, dim, time.time(), mask_sha256))
            conn.executemany("INSERT OR REPLACE INTO product_scores (product_id, group_id, reward_id, score) "
                             "VALUES (?, ?, ?, ?)", [(product_id, g, reward_id, s) for g, s in checked.items()])
        return sha256

    def put_creatives(self, creatives: Sequence[NewCreative], *, reward_id: str = "") -> list:
        """Store creatives; returns their ids (sha256 of each PNG), in order.

        Every file first (temporary file + fsync + rename; content addressed, so re-writes are no-ops), then all
        rows and scores in ONE transaction: after a crash either the whole call is stored or none of its rows.
        Idempotent on (product_id, group_id, model_id, creative_id, index): a re-put keeps the first row (and its
        created_at) and replaces the scores.  Scores (each creative's `scores`, and its `reward` for its own
        group) are stored under `reward_id`, which they then require.  InputError on bad input, nothing stored.
        """
        if isinstance(creatives, NewCreative):
            creatives = [creatives]
        reward_id = _check_reward_id(reward_id, required=False)
        rows, score_rows, files, ids = [], [], {}, []
        now = time.time()
        for n, c in enumerate(creatives):
            if not isinstance(c, NewCreative):
                raise InputError(f"creative {n} must be a NewCreative, got {type(c).__name__}")
            product_id = _check_id(c.product_id, f"creative {n} product id")
            group_id = None if c.group_id is None else _check_id(c.group_id, f"creative {n} group id")
            if not isinstance(c.prompt, str):
                raise InputError(f"creative {n} prompt must be a string, got {type(c.prompt).__name__}")
            check_utf8(c.prompt, f"creative {n} prompt")
            if isinstance(c.index, bool) or not isinstance(c.index, (int, np.integer)) or c.index < 0:
                raise InputError(f"creative {n} index must be an integer ≥ 0, got {c.index!r}")
            if c.seed is not None and (isinstance(c.seed, bool) or not isinstance(c.seed, (int, np.integer))
                                       or not -2**63 <= c.seed < 2**63):
                raise InputError(f"creative {n} seed must be None or a 64-bit integer, got {c.seed!r}")
            model_id = _check_model_id(c.model_id)
            png = _check_png(c.png, f"creative {n} image")
            reward = None if c.reward is None else _check_score(c.reward, f"creative {n} reward")
            blob, dim = _embedding_blob(c.embedding, f"creative {n} embedding")
            scores = {_check_id(g, f"creative {n} score group id"): _check_score(s, f"creative {n} score for {g!r}")
                      for g, s in dict(c.scores).items()}
            if reward is not None and group_id is not None:
                scores.setdefault(group_id, reward)
            if scores:
                _check_reward_id(reward_id, required=True)
            if c.source_sha256 is not None and not _HEX64.fullmatch(str(c.source_sha256)):
                raise InputError(f"creative {n} source_sha256 must be None or a sha256 (64 lowercase hex)")
            sha256 = hashlib.sha256(png).hexdigest()
            files[sha256] = png
            ids.append(sha256)
            rows.append((sha256, product_id, group_id or "", c.prompt, int(c.index),
                         None if c.seed is None else int(c.seed), model_id, reward, blob, dim, now, c.source_sha256))
            score_rows.extend((product_id, g, reward_id, sha256, s) for g, s in scores.items())
        if not rows:
            return []
        with self._read() as conn:  # refuse before writing any file; checked again under the write lock
            self._check_dims(conn, rows)
        for sha256, png in files.items():
            self._write_file(sha256, png)
        with self._write(products=[row[1] for row in rows]) as conn:
            self._check_dims(conn, rows)
            self._ensure_files(files)
            conn.executemany("INSERT OR IGNORE INTO creatives (creative_id, product_id, group_id, prompt, idx, seed, "
                             "model_id, reward, embedding, dim, created_at, source_sha256) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            conn.executemany("INSERT OR REPLACE INTO scores (product_id, group_id, reward_id, creative_id, score) "
                             "VALUES (?, ?, ?, ?, ?)", score_rows)
        return ids

    def _check_dims(self, conn: sqlite3.Connection, rows: list) -> None:
        # Selection stacks one product's embeddings of one model id into a [N, D] matrix: one D per pair.
        dims: dict = {}
        for row in rows:
            if row[9]:
                dims.setdefault((row[1], row[6]), set()).add(row[9])
        for (product_id, model_id), mine in dims.items():
            stored = {r[0] for r in conn.execute("SELECT DISTINCT dim FROM creatives WHERE product_id = ? AND "
                                                 "model_id = ? AND dim > 0", (product_id, model_id))}
            if len(mine | stored) > 1:
                raise InputError(f"product {product_id!r}, model {model_id!r}: embeddings of {sorted(mine)} values, "
                                 f"but every creative of one product and model needs the same size "
                                 f"(stored: {sorted(stored) or 'none'})")

    def put_scores(self, product_id, model_id, reward_id, group_id, creative_ids: Sequence[str], scores) -> None:
        """Store scores (calibrated CTR in [0, 1], one per creative id) for one group, computed by `reward_id`.

        NotFound when a creative id is not stored for this product and model id; InputError on bad input.
        """
        product_id = _check_id(product_id, "product id")
        model_id = _check_model_id(model_id)
        reward_id = _check_reward_id(reward_id, required=True)
        group_id = _check_id(group_id, "group id")
        ids = [check_creative_id(i) for i in creative_ids]
        values = np.asarray(scores, dtype=np.float64).reshape(-1)
        if values.size != len(ids):
            raise InputError(f"{len(ids)} creative ids but {values.size} scores")
        checked = [_check_score(v, f"score of creative {i}") for i, v in zip(ids, values)]
        if not ids:
            return
        with self._write(products=(product_id,)) as conn:
            known = set()
            unique = sorted(set(ids))
            for start in range(0, len(unique), 500):  # SQLite's default limit is 32766 host parameters
                part = unique[start:start + 500]
                known.update(r[0] for r in conn.execute(
                    f"SELECT creative_id FROM creatives WHERE product_id = ? AND model_id = ? AND creative_id IN "
                    f"({','.join('?' * len(part))})", (product_id, model_id, *part)))
            missing = [i for i in ids if i not in known]
            if missing:
                raise NotFound(f"creative {missing[0]} is not stored for product {product_id!r} and model "
                               f"{model_id!r}")
            conn.executemany("INSERT OR REPLACE INTO scores (product_id, group_id, reward_id, creative_id, score) "
                             "VALUES (?, ?, ?, ?, ?)", [(product_id, group_id, reward_id, i, s)
                                                        for i, s in zip(ids, checked)])

    # -- reads -------------------------------------------------------------------------------------------------
    def product(self, product_id) -> Optional[ProductRow]:
        """The stored product, or None.  InputError for an invalid id."""
        product_id = _check_id(product_id, "product id")
        row = self._conn().execute("SELECT product_id, sha256, title, embedding, dim, created_at, mask_sha256 "
                                   "FROM products WHERE product_id = ?", (product_id,)).fetchone()
        if row is None:
            return None
        return ProductRow(row[0], row[1], row[2], _embedding(row[3], row[4]), row[5], row[6])

    def creatives(self, product_id, model_id: Optional[str] = None) -> list:
        """The product's stored creatives (of `model_id` only, when given) as CreativeRows, in insertion order."""
        product_id = _check_id(product_id, "product id")
        query = ("SELECT creative_id, product_id, group_id, prompt, idx, seed, model_id, reward, embedding, dim, "
                 "created_at FROM creatives WHERE product_id = ?")
        params: tuple = (product_id,)
        if model_id is not None:
            query += " AND model_id = ?"
            params += (_check_model_id(model_id),)
        return [CreativeRow(r[0], r[1], r[2] or None, r[3], r[4], r[5], r[6], r[7], _embedding(r[8], r[9]), r[10])
                for r in self._conn().execute(query + " ORDER BY id", params)]

    def candidates(self, product_id, model_id, group_id, reward_id) -> Candidates:
        """Everything selection needs for one (product, model id, group, reward id), from one snapshot.

        Only creatives of `model_id` (never another model's); each creative id once (its first row).  NotFound for
        an unknown product; InputError for an invalid id.  Two indexed queries (products by primary key;
        creatives by the (product_id, model_id) prefix of their unique index, left-joined to scores by key).
        """
        product_id = _check_id(product_id, "product id")
        model_id = _check_model_id(model_id)
        group_id = _check_id(group_id, "group id")
        reward_id = _check_reward_id(reward_id, required=False)
        with self._read() as conn:
            product = conn.execute(
                "SELECT p.sha256, p.embedding, p.dim, s.score FROM products AS p LEFT JOIN product_scores AS s "
                "ON s.product_id = p.product_id AND s.group_id = ? AND s.reward_id = ? WHERE p.product_id = ?",
                (group_id, reward_id, product_id)).fetchone()
            if product is None:
                raise NotFound(f"unknown product id {product_id!r}")
            rows = conn.execute(
                "SELECT c.creative_id, c.prompt, c.embedding, c.dim, s.score FROM creatives AS c "
                "LEFT JOIN scores AS s ON s.product_id = c.product_id AND s.group_id = ? AND s.reward_id = ? "
                "AND s.creative_id = c.creative_id WHERE c.product_id = ? AND c.model_id = ? "
                # A creative made from an earlier image of this product is not a candidate for the current one.
                "AND (c.source_sha256 IS NULL OR c.source_sha256 = ?) ORDER BY c.id",
                (group_id, reward_id, product_id, model_id, product[0])).fetchall()
        seen: dict = {}
        for row in rows:
            seen.setdefault(row[0], row)
        unique = list(seen.values())
        dims = {r[3] for r in unique if r[2] is not None}
        if len(dims) > 1:
            raise StoreError(f"{self._label}: product {product_id!r}, model {model_id!r}: creatives hold embeddings "
                             f"of different sizes {sorted(dims)}")
        dim = dims.pop() if dims else 0
        if unique and all(r[2] is not None for r in unique):
            embeddings = np.frombuffer(b"".join(r[2] for r in unique), dtype="<f4").astype(np.float32)
            embeddings = embeddings.reshape(len(unique), dim)
        else:
            embeddings = np.full((len(unique), dim), np.nan, dtype=np.float32)
            for n, r in enumerate(unique):
                if r[2] is not None:
                    embeddings[n] = np.frombuffer(r[2], dtype="<f4")
        scores = np.array([np.nan if r[4] is None else r[4] for r in unique], dtype=np.float32)
        return Candidates(
            creative_ids=[r[0] for r in unique], prompts=[r[1] for r in unique], embeddings=embeddings,
            scores=scores, original_sha256=product[0], original_embedding=_embedding(product[1], product[2]),
            original_score=float("nan") if product[3] is None else float(product[3]))

    def image_path(self, creative_id) -> Path:
        """The PNG file of a creative or product original, by its sha256.  InputError unless `creative_id` is 64
        lowercase hex characters (so never a path outside the store); NotFound when no such file is stored."""
        path = self._file(check_creative_id(creative_id))
        if not path.is_file():
            raise NotFound(f"no creative {creative_id}")
        return path

    def product_version(self, product_id: str) -> int:
        """A counter that moves with every committed write touching this product (its row, creatives or scores),
        from any thread or process; 0 for a product never written.  One primary-key lookup (≈ 5 µs)."""
        row = self._conn().execute("SELECT version FROM product_versions WHERE product_id = ?",
                                   (product_id,)).fetchone()
        return 0 if row is None else int(row[0])

    def data_version(self) -> int:
        """A counter every committed write of rows or scores (from any thread or process) increases; equal values
        mean nothing changed (what an in-memory cache compares)."""
        return int(self._conn().execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])

    # -- maintenance -------------------------------------------------------------------------------------------
    def _scan_files(self):
        """(images, temps, unknown): {sha256: (path, bytes)}, [(path, bytes, mtime)], [path] under images/."""
        images, temps, unknown = {}, [], []
        if not self._images.is_dir():
            return images, temps, unknown
        for shard in sorted(os.scandir(self._images), key=lambda e: e.name):
            if not shard.is_dir(follow_symlinks=False) or not re.fullmatch(r"[0-9a-f]{2}", shard.name):
                unknown.append(Path(shard.path))
                continue
            for entry in sorted(os.scandir(shard.path), key=lambda e: e.name):
                try:
                    info = entry.stat(follow_symlinks=False)
                except FileNotFoundError:  # removed meanwhile (gc, a finished temp file)
                    continue
                match = _IMAGE_NAME.fullmatch(entry.name)
                if match and entry.is_file(follow_symlinks=False) and match.group(1)[:2] == shard.name:
                    images[match.group(1)] = (Path(entry.path), info.st_size)
                elif _TEMP_NAME.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                    temps.append((Path(entry.path), info.st_size, info.st_mtime))
                else:
                    unknown.append(Path(entry.path))
        return images, temps, unknown

    def _referenced(self, conn: sqlite3.Connection) -> set:
        return {r[0] for r in conn.execute("SELECT creative_id FROM creatives UNION SELECT sha256 FROM products "
                                           "UNION SELECT mask_sha256 FROM products WHERE mask_sha256 IS NOT NULL")}

    def _relative(self, path: Path) -> str:
        return path_label(path.relative_to(self.root))

    def stats(self) -> dict:
        """Counts and sizes: rows (creatives), creative_ids (distinct), products, model_ids {id: rows}, scores,
        product_scores, files and bytes (image files), temp_files, unknown_files, db_bytes, wal_bytes, schema."""
        with self._read() as conn:
            rows = conn.execute("SELECT count(*), count(DISTINCT creative_id) FROM creatives").fetchone()
            models = dict(conn.execute("SELECT model_id, count(*) FROM creatives GROUP BY model_id ORDER BY model_id"))
            products = conn.execute("SELECT count(*) FROM products").fetchone()[0]
            scores = conn.execute("SELECT count(*) FROM scores").fetchone()[0]
            product_scores = conn.execute("SELECT count(*) FROM product_scores").fetchone()[0]
            generation = conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0]
        images, temps, unknown = self._scan_files()

        def size(path: Path) -> int:
            try:
                return path.stat().st_size
            except FileNotFoundError:
                return 0

        return {
            "root": str(self.root), "schema_version": SCHEMA_VERSION, "data_version": int(generation),
            "rows": rows[0], "creative_ids": rows[1], "products": products, "model_ids": models,
            "scores": scores, "product_scores": product_scores,
            "files": len(images), "bytes": sum(s for _, s in images.values()),
            "temp_files": len(temps), "unknown_files": len(unknown),
            "db_bytes": size(self._db), "wal_bytes": size(self._db.with_name(DB_FILE + "-wal")),
        }

    def verify_report(self) -> VerifyReport:
        """Check the database (PRAGMA quick_check), that every creative's and product's file exists and its
        sha256 matches its name, and every stored embedding's size; files no row names and leftover temporary
        files are warnings.  Safe while writers run (rows come from one snapshot, files written later are at
        worst reported as orphans)."""
        problems: list[str] = []
        warnings: list[str] = []
        with self._read() as conn:
            check = [r[0] for r in conn.execute("PRAGMA quick_check")]
            if check != ["ok"]:
                problems.extend(f"{DB_FILE}: {line}" for line in check[:20])
            owners: dict = {}
            for sha256, what in conn.execute(
                    "SELECT creative_id, min('creative of product ' || quote(product_id) || ', model ' || "
                    "quote(model_id)) FROM creatives GROUP BY creative_id "
                    "UNION ALL SELECT sha256, min('original of product ' || quote(product_id)) FROM products "
                    "GROUP BY sha256 UNION ALL SELECT mask_sha256, min('mask of product ' || quote(product_id)) "
                    "FROM products WHERE mask_sha256 IS NOT NULL GROUP BY mask_sha256"):
                owners.setdefault(sha256, what)
            for table, key in (("creatives", "creative_id"), ("products", "product_id")):
                for ident, in conn.execute(f"SELECT {key} FROM {table} WHERE embedding IS NOT NULL AND "
                                           f"length(embedding) != 4 * dim OR (embedding IS NULL AND dim != 0)"):
                    problems.append(f"{table} row {ident}: its embedding does not hold its dim float32 values")
        for sha256, what in sorted(owners.items()):
            if not _HEX64.fullmatch(str(sha256)):
                problems.append(f"{what}: id {sha256!r} is not a sha256")
                continue
            path = self._file(sha256)
            try:
                digest = hashlib.sha256()
                with open(path, "rb") as handle:
                    for chunk in iter(lambda: handle.read(1 << 20), b""):
                        digest.update(chunk)
            except FileNotFoundError:
                problems.append(f"{self._relative(path)}: missing ({what})")
                continue
            except OSError as exc:
                problems.append(f"{self._relative(path)}: cannot be read ({exc.strerror or exc}) ({what})")
                continue
            if digest.hexdigest() != sha256:
                problems.append(f"{self._relative(path)}: sha256 is {digest.hexdigest()}, not its name ({what})")
        images, temps, unknown = self._scan_files()
        for sha256, (path, _) in sorted(images.items()):
            if sha256 not in owners:
                warnings.append(f"{self._relative(path)}: no row names it (`cg4ctr store gc` removes it)")
        for path, _, _ in temps:
            warnings.append(f"{self._relative(path)}: temporary file left by an interrupted write "
                            "(`cg4ctr store gc` removes it)")
        for path in unknown:
            warnings.append(f"{self._relative(path)}: not a store file (left alone)")
        return VerifyReport(problems=problems, warnings=warnings, checked=len(owners))

    def verify(self) -> list:
        """The problems `verify_report` finds, one line each; [] = ok (warnings are not problems)."""
        return self.verify_report().problems

    def gc(self, *, temp_min_age_s: float = TEMP_MIN_AGE_S) -> dict:
        """Remove image files no row names, and temporary files older than `temp_min_age_s` seconds.

        Never removes a file a row names: each chunk of orphans is checked again and unlinked under the write lock,
        and writers re-check their files under that lock before committing (so a file written for a row not yet
        committed is rewritten, never lost).  Safe while readers and writers run.  Returns counts and bytes:
        {"orphans_removed", "orphan_bytes", "temp_removed", "temp_bytes", "kept_files"}.
        """
        if not (isinstance(temp_min_age_s, (int, float)) and temp_min_age_s >= 0):
            raise InputError(f"temp_min_age_s must be a number ≥ 0, got {temp_min_age_s!r}")
        images, temps, _ = self._scan_files()
        with self._read() as conn:
            referenced = self._referenced(conn)
        orphans = sorted(sha for sha in images if sha not in referenced)
        removed = removed_bytes = 0
        for start in range(0, len(orphans), _GC_CHUNK):
            part = orphans[start:start + _GC_CHUNK]
            with self._write(bump=False) as conn:
                named = {r[0] for r in conn.execute(
                    f"SELECT creative_id FROM creatives WHERE creative_id IN ({','.join('?' * len(part))}) "
                    f"UNION SELECT sha256 FROM products WHERE sha256 IN ({','.join('?' * len(part))})", part + part)}
                for sha256 in part:
                    if sha256 in named:
                        continue
                    path, size = images[sha256]
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                        removed += 1
                        removed_bytes += size
        temp_removed = temp_bytes = 0
        cutoff = time.time() - temp_min_age_s
        for path, size, mtime in temps:
            if mtime <= cutoff:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                    temp_removed += 1
                    temp_bytes += size
        if removed or temp_removed:
            for shard in {p.parent for p, _ in images.values()} | {p.parent for p, _, _ in temps}:
                _fsync_dir(shard)
        return {"orphans_removed": removed, "orphan_bytes": removed_bytes, "temp_removed": temp_removed,
                "temp_bytes": temp_bytes, "kept_files": len(images) - removed}

    def export_parquet(self, path) -> int:
        """Write every creative row to a Parquet file (pyarrow), atomically (temporary file, fsync, rename); returns
        the number of rows.  Columns: creative_id, product_id, group_id (null for none), prompt, index (int64), seed,
        model_id, reward (float64, null for none), embedding (list<float32>, null for none), created_at (float64,
        unix s), file (the PNG's path relative to the store).  One snapshot, in insertion order."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([
            ("creative_id", pa.string()), ("product_id", pa.string()), ("group_id", pa.string()),
            ("prompt", pa.string()), ("index", pa.int64()), ("seed", pa.int64()), ("model_id", pa.string()),
            ("reward", pa.float64()), ("embedding", pa.list_(pa.float32())), ("created_at", pa.float64()),
            ("file", pa.string())])
        count = 0
        with atomic_path(path) as tmp, self._read() as conn, pq.ParquetWriter(tmp, schema) as writer:
            cursor = conn.execute("SELECT creative_id, product_id, group_id, prompt, idx, seed, model_id, reward, "
                                  "embedding, dim, created_at FROM creatives ORDER BY id")
            while True:
                rows = cursor.fetchmany(4096)  # row groups of 4096 rows: memory stays bounded
                if not rows:
                    break
                count += len(rows)
                writer.write_table(_arrow_table(rows, schema, pa))
        return count


def _arrow_table(rows, schema, pa):
    columns = list(zip(*rows))
    blobs, dims = columns[8], columns[9]
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    offsets[1:] = np.cumsum([d if b is not None else 0 for b, d in zip(blobs, dims)])
    values = np.frombuffer(b"".join(b for b in blobs if b is not None), dtype="<f4").astype(np.float32)
    embedding = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.float32()),
                                         mask=pa.array([b is None for b in blobs]))
    files = [f"{IMAGES_DIR}/{sha[:2]}/{sha}.png" for sha in columns[0]]
    return pa.Table.from_arrays([
        pa.array(columns[0], pa.string()), pa.array(columns[1], pa.string()),
        pa.array([g or None for g in columns[2]], pa.string()), pa.array(columns[3], pa.string()),
        pa.array(columns[4], pa.int64()), pa.array(columns[5], pa.int64()), pa.array(columns[6], pa.string()),
        pa.array(columns[7], pa.float64()), embedding, pa.array(columns[10], pa.float64()),
        pa.array(files, pa.string())], schema=schema)
