"""Customer segmentation by personas versus RFM (GPLR paper Section 7.4, Tables 8–9).

Two representations of each customer are clustered the same way — PCA to 3 dimensions, then
k-means for several k — and compared by silhouette score:

* persona: the multi-hot vector of the customer's personas (GPLR output or recorded labels);
* RFM: recency, frequency and monetary value, each cut into 10 quantile bins (scores 1..10),
  the 3-vector L2-normalised.

Robustness asks how often a representation survives time: the share of customers (present in
both halves) whose persona set, or RFM bin vector, is identical in the first and second half of
the purchase period. Personas for each half come from a separate GPLR run on that half's graph.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.stats import rankdata
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import silhouette_score
from threadpoolctl import threadpool_limits

from core.gplr import run_gplr
from core.graph import BipartiteGraph
from core.labelers.base import Labeler
from core.labelers.replay import normalise_id
from core.personas import PersonaSet
from recsys.data import load_persona_table, persona_matrix

__all__ = [
    "KS",
    "Segmentation",
    "load_persona_assignments",
    "quantile_bins",
    "rfm_table",
    "rfm_bins",
    "rfm_constant_note",
    "rfm_vectors",
    "segment",
    "consistent_share",
    "split_halves",
    "gplr_persona_sets",
    "persona_sets",
    "rfm_robustness",
    "persona_robustness",
    "write_segments",
    "plot_segments",
    "summary_json",
]

log = logging.getLogger(__name__)

KS: tuple[int, ...] = (5, 15, 25, 35)
_DAY = 86_400.0
_ID_COLUMNS = ("user_id", "CustomerID", "customer_id", "user")
_PERSONA_COLUMNS = ("personas", "gplr_personas")


# -- inputs ------------------------------------------------------------------------------------
def load_persona_assignments(path: str | Path, personas: PersonaSet) -> tuple[np.ndarray, sp.csr_matrix]:
    """(user ids, users × personas binary CSR) from a persona file.

    Accepts `gplr label` output (JSON lines `{"user_id", "personas": [names]}` or CSV
    `user_id, personas` with names joined by `|`) and recorded tables such as the paper's GPT-4
    labels (`CustomerID, personas`) or the authors' GPLR output (`gplr_personas`). Names outside
    the set are dropped (and logged), never invented.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such persona file")
    if path.name.lower().endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        frame = pd.read_json(path, lines=True, dtype={"user_id": str})
        if "user_id" not in frame or "personas" not in frame:
            raise ValueError(f"{path}: JSON lines need 'user_id' and 'personas'")
        users = frame["user_id"].map(normalise_id).to_numpy(dtype=object)
        rows, unknown = [], 0
        for names in frame["personas"]:
            if not isinstance(names, list):
                raise ValueError(f"{path}: 'personas' must be a list of names, got {names!r}")
            idx = [personas.index_of(str(n)) for n in names]
            unknown += sum(i is None for i in idx)
            rows.append(sorted({i for i in idx if i is not None}))
        if unknown:
            log.warning("%s: dropped %d persona names outside the persona set", path, unknown)
        return users, persona_matrix(rows, len(personas))
    header = pd.read_csv(path, nrows=0).columns
    key = next((c for c in _ID_COLUMNS if c in header), None)
    column = next((c for c in _PERSONA_COLUMNS if c in header), None)
    if key is None or column is None:
        raise ValueError(f"{path}: needs an id column {_ID_COLUMNS} and a persona column "
                         f"{_PERSONA_COLUMNS}; the file has {list(header)}")
    ids = pd.read_csv(path, usecols=[key], dtype=str)[key].dropna().map(normalise_id)
    users = ids.drop_duplicates().to_numpy(dtype=object)
    return users, load_persona_table(path, key, users, personas, persona_column=column)


# -- RFM ---------------------------------------------------------------------------------------
def quantile_bins(values: np.ndarray, n_bins: int = 10) -> np.ndarray:
    """Quantile bin 1..n_bins of each value: ceil(n_bins · rank / n) with average ranks for ties,
    so equal values share a bin and n distinct values spread evenly (n=10 → bins 1..10).

    >>> quantile_bins(np.array([5.0, 1.0, 3.0, 3.0]), 4).tolist()
    [4, 1, 3, 3]
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or not len(values):
        raise ValueError("quantile_bins needs a non-empty 1-d array")
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    ranks = rankdata(values, method="average")
    return np.clip(np.ceil(n_bins * ranks / len(values) - 1e-9), 1, n_bins).astype(np.int64)


def rfm_table(frame: pd.DataFrame, now: float | None = None) -> pd.DataFrame:
    """Per-user recency (days since the last purchase before `now`), frequency (distinct purchase
    times = orders) and monetary value (Σ quantity·price), indexed by user_id (sorted).

    `now` defaults to the latest timestamp in `frame`.
    """
    missing = {"user_id", "ts", "quantity", "price"} - set(frame.columns)
    if missing:
        raise ValueError(f"purchases frame lacks columns {sorted(missing)}")
    if frame.empty:
        raise ValueError("no purchases: RFM needs at least one")
    now = float(frame["ts"].max()) if now is None else float(now)
    spend = frame["quantity"].to_numpy(np.float64) * frame["price"].to_numpy(np.float64)
    g = frame.assign(_spend=spend).groupby("user_id", sort=True)
    return pd.DataFrame({
        "recency": (now - g["ts"].max()) / _DAY,
        "frequency": g["ts"].nunique().astype(np.float64),
        "monetary": g["_spend"].sum(),
    })


def rfm_constant_note(table: pd.DataFrame) -> str | None:
    """A sentence naming the RFM parts that are the same for every customer (a shop without prices
    has a constant monetary value), or None. Such a part adds no information to the segments.

    >>> rfm_constant_note(pd.DataFrame({"recency": [1.0, 2.0], "frequency": [1.0, 3.0], "monetary": [0.0, 0.0]}))
    'RFM monetary is constant (0 for every customer; no prices?): RFM segments rest on the other parts'
    """
    constant = [c for c in ("recency", "frequency", "monetary") if table[c].nunique(dropna=False) <= 1]
    if not constant:
        return None
    values = ", ".join(f"{table[c].iloc[0]:g}" for c in constant)
    why = "; no prices?" if "monetary" in constant and float(table["monetary"].iloc[0]) == 0.0 else ""
    return (f"RFM {' and '.join(constant)} {'is' if len(constant) == 1 else 'are'} constant ({values} for every "
            f"customer{why}): RFM segments rest on the other parts")


def rfm_bins(table: pd.DataFrame, n_bins: int = 10) -> np.ndarray:
    """users × 3 integer bins (1..n_bins) of recency, frequency and monetary."""
    return np.column_stack([quantile_bins(table[c].to_numpy(), n_bins)
                            for c in ("recency", "frequency", "monetary")])


def rfm_vectors(bins: np.ndarray) -> np.ndarray:
    """L2-normalised bin vectors (bins are ≥ 1, so no row is zero)."""
    bins = np.asarray(bins, dtype=np.float64)
    return bins / np.linalg.norm(bins, axis=1, keepdims=True)


# -- clustering --------------------------------------------------------------------------------
@dataclass
class Segmentation:
    """k-means labels and silhouette per k, on a PCA(3) projection of one representation."""

    projection: np.ndarray
    labels: dict[int, np.ndarray] = field(default_factory=dict)
    silhouette: dict[int, float] = field(default_factory=dict)


def segment(features: np.ndarray | sp.spmatrix, ks: Iterable[int] = KS, seed: int = 0,
            n_components: int = 3, sample_size: int | None = None) -> Segmentation:
    """PCA(`n_components`) then k-means for each k; silhouette on the projection.

    `sample_size` bounds the silhouette's O(n²) cost on large inputs (seeded sample).
    """
    x = sp.csr_matrix(features).toarray() if sp.issparse(features) else np.asarray(features, dtype=np.float64)
    ks = sorted(set(int(k) for k in ks))
    if x.ndim != 2 or x.shape[0] < 3:
        raise ValueError("segmentation needs a 2-d feature matrix with at least 3 rows")
    if not ks or ks[0] < 2 or ks[-1] >= x.shape[0]:
        raise ValueError(f"every k must be in [2, {x.shape[0] - 1}], got {ks}")
    n_components = min(n_components, x.shape[1], x.shape[0])
    # A few thousand 3-d points: OpenMP threads only add contention (40× slower on a busy box).
    with threadpool_limits(limits=1):
        return _segment(x, ks, seed, n_components, sample_size)


def _segment(x: np.ndarray, ks: list[int], seed: int, n_components: int,
             sample_size: int | None) -> Segmentation:
    proj = PCA(n_components=n_components, random_state=seed).fit_transform(x.astype(np.float64))
    out = Segmentation(proj)
    for k in ks:
        labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(proj)
        out.labels[k] = labels
        if len(np.unique(labels)) < 2:  # all points identical: no structure to score
            out.silhouette[k] = 0.0
            continue
        out.silhouette[k] = float(silhouette_score(
            proj, labels, sample_size=sample_size if sample_size and sample_size < len(proj) else None,
            random_state=seed))
        log.info("k=%d: silhouette %.3f", k, out.silhouette[k])
    return out


# -- robustness --------------------------------------------------------------------------------
def consistent_share(first: Mapping[str, object], second: Mapping[str, object]) -> tuple[float, int]:
    """(share of users in both mappings whose value is equal, number of such users)."""
    common = sorted(set(first) & set(second))
    if not common:
        return 0.0, 0
    same = sum(first[u] == second[u] for u in common)
    return same / len(common), len(common)


def split_halves(frame: pd.DataFrame, split_ts: float | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Purchases before / from `split_ts` (default: the midpoint of the time range)."""
    if frame.empty:
        raise ValueError("no purchases to split")
    if split_ts is None:
        split_ts = (float(frame["ts"].min()) + float(frame["ts"].max())) / 2
    early = frame["ts"].to_numpy() < split_ts
    return frame[early], frame[~early]


def rfm_robustness(frame: pd.DataFrame, split_ts: float | None = None,
                   n_bins: int = 10) -> tuple[float, int]:
    """Share of customers whose RFM bin vector is the same in both halves (each half binned on
    its own, recency measured from the end of that half)."""
    vectors = []
    for half in split_halves(frame, split_ts):
        table = rfm_table(half)
        vectors.append(dict(zip(table.index, map(tuple, rfm_bins(table, n_bins).tolist()))))
    return consistent_share(*vectors)


def persona_sets(users: Sequence[str] | np.ndarray, matrix: sp.spmatrix | np.ndarray) -> dict[str, frozenset[int]]:
    """user id → frozenset of persona indices (rows of a users × personas membership matrix)."""
    m = sp.csr_matrix(matrix)
    return {str(u): frozenset(m.indices[m.indptr[r]:m.indptr[r + 1]].tolist()) for r, u in enumerate(users)}


def gplr_persona_sets(frame: pd.DataFrame, personas: PersonaSet, labeler: Labeler,
                      **gplr_options) -> dict[str, frozenset[int]]:
    """GPLR (core.gplr.run_gplr) on the graph of `frame`: user id → assigned persona set."""
    graph = BipartiteGraph.from_frame(frame)
    result = run_gplr(graph, personas, labeler, **gplr_options)
    return persona_sets(graph.user_ids, result.assignment.as_matrix(len(personas)))


def persona_robustness(frame: pd.DataFrame, personas: PersonaSet, make_labeler: Callable[[], Labeler],
                       split_ts: float | None = None, **gplr_options) -> tuple[float, int]:
    """Share of customers with the same GPLR persona set in both halves; each half is a separate
    GPLR run with a fresh labeler from `make_labeler` (same oracle, same options and seed)."""
    sets = [gplr_persona_sets(half, personas, make_labeler(), **gplr_options)
            for half in split_halves(frame, split_ts)]
    return consistent_share(*sets)


# -- outputs -----------------------------------------------------------------------------------
def write_segments(path: str | Path, users: Sequence[str] | np.ndarray, columns: Mapping[str, np.ndarray]) -> int:
    """CSV `user_id, <column>...` (e.g. persona_k5, rfm_k5); written atomically."""
    path = Path(path)
    frame = pd.DataFrame({"user_id": list(users)})
    for name, values in columns.items():
        if len(values) != len(frame):
            raise ValueError(f"column {name} has {len(values)} rows for {len(frame)} users")
        frame[name] = values
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    frame.to_csv(tmp, index=False)
    tmp.replace(path)
    return len(frame)


def plot_segments(path: str | Path, memberships: sp.spmatrix | np.ndarray, labels: np.ndarray,
                  personas: PersonaSet, title: str = "") -> np.ndarray:
    """Heat map PNG of the persona distribution per segment: cell (s, m) is the share of segment
    s's customers holding persona m. Returns that segments × personas matrix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = sp.csr_matrix(memberships).toarray().astype(np.float64)
    labels = np.asarray(labels)
    segments = np.unique(labels)
    share = np.vstack([m[labels == s].mean(axis=0) for s in segments])
    sizes = np.array([(labels == s).sum() for s in segments])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(personas) + 3), max(4.5, 0.3 * len(segments) + 3.5)))
    image = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(personas)), [p.name for p in personas], rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(segments)), [f"{s} (n={n})" for s, n in zip(segments, sizes)], fontsize=7)
    ax.set_xlabel("persona")
    ax.set_ylabel("segment")
    ax.set_title(title or f"persona share per segment (k={len(segments)})")
    fig.colorbar(image, ax=ax, label="share of customers")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return share


def summary_json(persona: Segmentation, rfm: Segmentation | None = None,
                 consistent_persona: float | None = None, consistent_rfm: float | None = None) -> str:
    """The bench/CLI summary line: silhouette_persona{k}, silhouette_rfm{k}, consistent_*."""
    out: dict[str, float] = {f"silhouette_persona{k}": round(v, 4) for k, v in persona.silhouette.items()}
    if rfm is not None:
        out.update({f"silhouette_rfm{k}": round(v, 4) for k, v in rfm.silhouette.items()})
    if consistent_persona is not None:
        out["consistent_persona"] = round(consistent_persona, 4)
    if consistent_rfm is not None:
        out["consistent_rfm"] = round(consistent_rfm, 4)
    return json.dumps(out)
