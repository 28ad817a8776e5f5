"""Sentence embeddings that are a function of the text alone, kept on disk between processes.

Why: `bench/stream_quality.py --quick` spent most of its time in MiniLM (load and encode), and
paid it twice for the same product names — once in the bench's `gplr label`, once in the
worker's refit — and again on every run. And two processes did not even agree: sentence-
transformers pads each batch to its longest text, and the padded shapes change the float
rounding (~1e-7 per coordinate, ~1e-6 in the votes), so the stream's zero-shot state could only be
compared with batch's at rtol 1e-5.

Two parts:

* **Exact embeddings** (`encode_exact`): texts are grouped by their token count and encoded in
  batches of exactly `ROWS` texts (a short batch is filled up with copies of its last text), so
  every call of the model has the shape (`ROWS`, length) and no padding: a text's vector is the
  same bits whatever else is encoded with it, alone or among thousands (tested; the torch thread
  count does not change it either). Cost: at most `ROWS` − 1 spare rows per token length. One
  torch thread while encoding: on the shared 2-core host (load 8–11) two threads took 5× as long
  (600 names: 26.1 s against 5.0 s, docs/RESULTS.md §5b).
* **A persistent cache** (`EmbeddingCache`): text → float32 vector in one SQLite file per model
  (`model_key`: the model files' contents, the versions of torch / transformers /
  sentence-transformers, `ROWS`), in the folder `GPLR_EMBEDDING_CACHE` names (unset: the user's
  cache folder; `off`: none). SQLite serialises the writers (the bench and its worker write at
  once) and a crash mid-write leaves the last committed state. A hit is the bits a miss would
  compute, so results are identical with and without the cache; a process that finds every text
  there never loads the model. A file that is not a readable cache (corrupt, truncated, another
  format) or a row of the wrong size reads as a miss: it is recomputed, never an error, and a
  broken file is replaced.

`embed(texts, model_path)` is what `core.labelers.embedding.EmbeddingLabeler.encode` calls.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from core.settings import check_settings, read_env, setting

__all__ = ["ROWS", "FORMAT", "EmbeddingCacheConfig", "EmbeddingCache", "model_key", "encode_exact", "embed",
           "cache_for"]

log = logging.getLogger(__name__)

ROWS = 32  # texts per model call: every call has the shape (ROWS, token count)
FORMAT = 1  # the file layout and what a key covers; a new value starts new files
_OFF = ("off", "none", "false", "0", "no")


def _location(raw: str) -> str:
    return raw.strip()


@dataclass(frozen=True)
class EmbeddingCacheConfig:
    """Where the persistent embedding cache lives (read once per process from the environment)."""

    location: str = setting(
        "", "GPLR_EMBEDDING_CACHE", "folder of the persistent sentence-embedding cache (item names → MiniLM "
        "vectors, one SQLite file per model, `core.embedding_cache`), shared by `gplr label` and the workers: "
        "a process that finds every name there never loads MiniLM; unset → `$XDG_CACHE_HOME/gplr` (else "
        "`~/.cache/gplr`); `off` → no cache", parse=_location,
        check=lambda v: "\0" not in v, why="must be a folder path or `off`")

    def __post_init__(self) -> None:
        check_settings(self)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> EmbeddingCacheConfig:
        return cls(**read_env(cls, os.environ if env is None else env))

    def directory(self) -> Path | None:
        """The cache folder, None when the cache is off."""
        if self.location.lower() in _OFF:
            return None
        if self.location:
            return Path(self.location).expanduser()
        base = os.environ.get("XDG_CACHE_HOME", "").strip()
        if base:
            return Path(base) / "gplr"
        try:
            return Path.home() / ".cache" / "gplr"
        except RuntimeError:  # no home folder (a bare container user): no cache rather than a crash
            return None


# -- the model's identity ----------------------------------------------------------------------
_KEYS: dict[str, str] = {}
_KEYS_LOCK = threading.Lock()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return ""


def model_key(model_path: str | Path) -> str:
    """A digest of what a vector depends on: every file of the model folder (path, content), the
    versions of the libraries that run it, `ROWS` and `FORMAT`. Once per process per folder
    (hashing MiniLM's 91 MB takes a fraction of a second, loading it seconds)."""
    root = Path(model_path).resolve()
    with _KEYS_LOCK:
        if str(root) in _KEYS:
            return _KEYS[str(root)]
        digest = hashlib.sha256(json.dumps(
            [FORMAT, ROWS] + [_version(p) for p in ("torch", "transformers", "sentence-transformers")]).encode())
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            digest.update(str(path.relative_to(root)).encode() + b"\0")
            with path.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
            digest.update(b"\0")
        _KEYS[str(root)] = key = digest.hexdigest()[:32]
        return key


# -- exact encoding ----------------------------------------------------------------------------
def encode_exact(model: Any, texts: Sequence[str], rows: int = ROWS) -> np.ndarray:
    """Unit-norm float32 embeddings (len(texts), dim) from a sentence-transformers `model`, each
    a function of its text alone: texts of one token count go through the model `rows` at a time,
    a short batch filled with copies of its last text (see the module docstring)."""
    texts = [str(t) for t in texts]
    if not texts:
        return np.zeros((0, 0), np.float32)
    import torch

    tokenize = getattr(model, "preprocess", None) or getattr(model, "tokenize", None)  # `tokenize` before 5.0
    # token counts (an encoder without a tokenizer, a test's stand-in: one group)
    lengths = np.asarray(tokenize(texts)["attention_mask"].sum(dim=1)) if tokenize else np.zeros(len(texts))
    out: np.ndarray | None = None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see the module docstring: the same bits, and no spinning on a loaded host
    try:
        for length in np.unique(lengths):
            group = np.flatnonzero(lengths == length)
            for start in range(0, group.size, rows):
                chunk = group[start:start + rows]
                batch = [texts[i] for i in chunk] + [texts[chunk[-1]]] * (rows - chunk.size)
                vectors = np.asarray(model.encode(batch, batch_size=rows, normalize_embeddings=True,
                                                  convert_to_numpy=True, show_progress_bar=False), dtype=np.float32)
                if out is None:
                    out = np.empty((len(texts), vectors.shape[1]), np.float32)
                out[chunk] = vectors[:chunk.size]
    finally:
        torch.set_num_threads(threads)
    assert out is not None
    return out


# -- the persistent cache ----------------------------------------------------------------------
class EmbeddingCache:
    """text → float32 vector of one model in an SQLite file (see the module docstring). Every
    failure to read is a miss and every failure to write is skipped (logged once): a cache never
    stops a computation. Thread-safe (one connection, one lock)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.dim: int | None = None  # vector length: the file's (its first put fixes it)
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._broken = False  # could not open or create the file: a miss for everything, silently
        self._warned = False

    def _connect(self) -> sqlite3.Connection | None:
        if self._db is not None or self._broken:
            return self._db
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = self._open()
        except (OSError, sqlite3.Error) as exc:  # not a cache file: replace it, once
            self._warn(f"embedding cache {self.path} unreadable ({exc}); starting it afresh")
            try:
                self.path.unlink(missing_ok=True)
                self._db = self._open()
            except (OSError, sqlite3.Error) as again:
                self._warn(f"embedding cache {self.path} off for this process ({again})")
                self._broken = True
        return self._db

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=10.0, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA synchronous=OFF")  # a cache: a torn write is detected and recomputed
            db.execute("CREATE TABLE IF NOT EXISTS vectors (text TEXT PRIMARY KEY, vec BLOB NOT NULL)")
            db.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL)")
            row = db.execute("SELECT v FROM meta WHERE k = 'dim'").fetchone()
            if row is not None:
                self.dim = int(row[0])
            check = db.execute("PRAGMA quick_check(1)").fetchone()
            if check is None or check[0] != "ok":
                raise sqlite3.DatabaseError(f"integrity check: {check}")
        except (sqlite3.Error, ValueError):
            db.close()
            raise
        return db

    def _warn(self, message: str) -> None:
        if not self._warned:
            log.warning(message)
            self._warned = True

    def _reset(self, exc: Exception) -> None:
        """The file went bad under us (a torn page, a truncation): start it afresh."""
        if self._db is not None:
            self._db.close()
            self._db = None
        self.dim = None
        self._warn(f"embedding cache {self.path} unreadable ({exc}); starting it afresh")
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            self._broken = True

    def get(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """The cached vectors of those `texts` that have a valid one (missing or damaged: left out)."""
        wanted = [t for t in dict.fromkeys(str(t) for t in texts) if _storable(t)]
        found: dict[str, np.ndarray] = {}
        with self._lock:
            db = self._connect()
            if db is None or not wanted:
                return found
            try:
                for start in range(0, len(wanted), 500):
                    part = wanted[start:start + 500]
                    query = f"SELECT text, vec FROM vectors WHERE text IN ({','.join('?' * len(part))})"
                    for text, blob in db.execute(query, part):
                        vec = self._vector(blob)
                        if vec is not None:
                            found[str(text)] = vec
            except sqlite3.Error as exc:
                self._reset(exc)
                return {}
        return found

    def _vector(self, blob: Any) -> np.ndarray | None:
        if not isinstance(blob, bytes) or self.dim is None or len(blob) != 4 * self.dim:
            return None
        vec = np.frombuffer(blob, dtype="<f4").astype(np.float32)
        return vec if np.all(np.isfinite(vec)) else None

    def put(self, vectors: Mapping[str, np.ndarray]) -> None:
        """Store `vectors` (text → vector of this cache's length; the first put fixes the length)."""
        if not vectors:
            return
        rows = [(str(t), np.ascontiguousarray(v, dtype="<f4").tobytes()) for t, v in vectors.items()
                if _storable(str(t))]
        if not rows:
            return
        dim = len(rows[0][1]) // 4
        with self._lock:
            db = self._connect()
            if db is None:
                return
            try:
                db.execute("INSERT OR IGNORE INTO meta VALUES ('dim', ?)", (str(dim),))  # the file's first put
                self.dim = int(db.execute("SELECT v FROM meta WHERE k = 'dim'").fetchone()[0])
                rows = [r for r in rows if len(r[1]) == 4 * self.dim]
                db.execute("BEGIN IMMEDIATE")
                db.executemany("INSERT OR REPLACE INTO vectors VALUES (?, ?)", rows)
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                if db.in_transaction:
                    db.rollback()
                if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                    self._warn(f"embedding cache {self.path} busy; {len(rows)} vectors not stored")
                else:
                    self._reset(exc)

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


def _storable(text: str) -> bool:
    """Whether SQLite can key a text (UTF-8; a lone surrogate, e.g. from a badly decoded file, is
    not): such a text is always computed, never cached."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_CACHES: dict[tuple[str, str], EmbeddingCache] = {}
_CACHES_LOCK = threading.Lock()


def cache_for(model_path: str | Path, config: EmbeddingCacheConfig | None = None) -> EmbeddingCache | None:
    """The process's cache of this model under `config` (default: `GPLR_EMBEDDING_CACHE`); None when off."""
    folder = (config or EmbeddingCacheConfig.from_env()).directory()
    if folder is None:
        return None
    key = (str(folder.resolve()), model_key(model_path))
    with _CACHES_LOCK:
        if key not in _CACHES:
            _CACHES[key] = EmbeddingCache(folder / f"embeddings-{key[1]}.sqlite")
        return _CACHES[key]


def embed(texts: Sequence[str], model_path: str | Path, load: Any,
          config: EmbeddingCacheConfig | None = None) -> dict[str, np.ndarray]:
    """text → unit vector for the distinct `texts`: from the cache, the rest computed by
    `encode_exact(load())` and stored. `load` returns the model (called only on a miss)."""
    wanted = list(dict.fromkeys(str(t) for t in texts))
    cache = cache_for(model_path, config)
    found = cache.get(wanted) if cache is not None else {}
    rest = [t for t in wanted if t not in found]
    if rest:
        computed = dict(zip(rest, encode_exact(load(), rest)))
        if cache is not None:
            cache.put(computed)
        found.update(computed)
    if cache is not None and rest != wanted:
        log.debug("embedding cache: %d of %d texts found", len(wanted) - len(rest), len(wanted))
    return found
