"""The label-free zero-shot channel: how much each item's name speaks for a persona by its definition alone.

Why: the item channel (`core.item_channel`) learns words from the prototypes' labels, and ~215
prototypes hold only a handful of positives for a persona that 2–8% of customers have (pets,
stationery, eco goods, art, education, fashion, outdoor, health): it cannot learn them. The
offline embedding labeler already knows what "Animal and Pet Advocates" buy without any label —
MiniLM similarity between a product name and the persona's "name: definition". Per item v,

    s(v)[m] = vote(v)[m] / base[m],

with vote(v) the softmax over personas of the raw cosine similarities / `TEMPERATURE`
(`EmbeddingLabeler.item_persona_scores` with calibration 0) and base the catalogue's mean vote
per persona, so s(v) = 1 is "as much as an average item of this shop". A user's feature is

    z[u, m] = ln(mean over u's distinct items of s(v)[m] + FLOOR),

a running mean of s(v): the stream can keep Σ s(v) and the number of distinct items and add an
item when it is first bought (`add_items`, `feature`). The decoder (`core.decoder`) takes z as its
fourth feature, with one slope shared by all personas fitted on the prototypes like the others,
so a persona no prototype holds still ranks its users by z.

What a model ships (`ZeroShotChannel.to_dict`) is not the per-item lifts (3,846 names × 20
floats came to ~0.95 MB on Online Retail, near Kafka's 1 MB message limit, and would not fit a
20k-item shop) but what computes them from any name (`CatalogueVotes`): the persona definitions,
the catalogue's size and word document frequencies (what `EmbeddingLabeler.item_vectors` reads:
IDF weights, frequent words) and the catalogue's mean vote `base` (|R| floats) — 30 kB on Online
Retail. Every process turns names into raw votes through one process-wide cache (one MiniLM per
persona set, votes cached per name and catalogue), so the stream's refit, which computes every
known name's vote in its executor thread, leaves the worker only the names first seen after it;
those are voted (not counted neutral) when first needed, as batch run on the grown catalogue would
vote them. The vote is the same function of (name, catalogue statistics) in `gplr label` and in
the worker, to the bit: MiniLM's vectors do not depend on what else is embedded in the call, and
they persist on disk between processes (`core.embedding_cache`, `GPLR_EMBEDDING_CACHE`), so
`gplr label` and a worker on the same machine embed a name once, and a run that finds every name
there never loads MiniLM.

Measured on Online Retail (bench/persona_quality.py, docs/RESULTS.md §2b, 5% budget, 3 seeds):
validation F1@5 0.690 → 0.72, macro F1 0.42 → 0.50 at the same prevalence shift; of the variants
tried (the lift's log / itself, the set model's posterior log-odds, mean or summed log-likelihood
ratios, temperature 0.02 / 0.05 / 0.1, calibration 0 / 0.5) the log of the mean lift at T = 0.05,
calibration 0 was best.
"""
from __future__ import annotations

import base64
import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from core.graph import BipartiteGraph
from core.personas import PersonaSet

__all__ = ["TEMPERATURE", "CALIBRATION", "FLOOR", "CatalogueVotes", "ZeroShotChannel", "item_lift",
           "lift_feature", "zero_shot_channel"]

TEMPERATURE = 0.05  # softmax temperature of the item votes (chosen on validation among 0.02, 0.05, 0.1)
CALIBRATION = 0.0  # no per-persona standardisation of the similarities (0 and 0.5 measured; 0 best;
# `CatalogueVotes` computes the votes of calibration 0: the per-persona moments are not shipped)
FLOOR = 1e-3  # keeps ln finite for a persona no item of the user speaks for


def item_lift(votes: np.ndarray, base: np.ndarray) -> np.ndarray:
    """s(v): items' persona votes over the catalogue's mean vote per persona (1 = an average item)."""
    lift: np.ndarray = np.asarray(votes, dtype=np.float64) / np.maximum(np.asarray(base, dtype=np.float64), 1e-12)
    return lift


def lift_feature(lift_sum: np.ndarray, count: np.ndarray | float) -> np.ndarray:
    """z = ln(Σ s(v) / n + FLOOR) from a sum of n items' lifts; a user with no item gets the
    neutral ln(1 + FLOOR) (an average item)."""
    total = np.asarray(lift_sum, dtype=np.float64)
    n = np.asarray(count, dtype=np.float64)
    if total.ndim == 2 and n.ndim == 1:
        n = n[:, None]
    mean = np.divide(total, n, out=np.ones_like(total), where=n > 0)
    out: np.ndarray = np.log(mean + FLOOR)
    return out


PersonaKey = tuple[tuple[str, str], ...]  # (name, definition) per persona: what MiniLM reads of them


@dataclass(frozen=True)
class CatalogueVotes:
    """MiniLM's raw persona votes of any item name under one catalogue's word statistics
    (`EmbeddingLabeler.raw_votes`, temperature `TEMPERATURE`, calibration 0): tens of kB to ship
    where the votes themselves are |items| × |R| floats. Votes are cached per process (`votes`)."""

    personas: PersonaKey
    size: int  # names in the catalogue
    words: tuple[tuple[str, int], ...]  # (word, names it occurs in), sorted by word
    key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.size < 1 or not self.personas:
            raise ValueError("catalogue votes need at least one name and one persona")
        body = json.dumps([self.personas, self.size, self.words], separators=(",", ":")).encode()
        object.__setattr__(self, "key", hashlib.sha256(body).hexdigest())

    @classmethod
    def of(cls, names: Sequence[str], personas: PersonaSet | PersonaKey) -> CatalogueVotes:
        """The statistics of the catalogue `names` (distinct) for these personas."""
        from core.labelers.embedding import word_counts

        key = tuple((p.name, p.definition) for p in personas) if isinstance(personas, PersonaSet) \
            else tuple((str(n), str(d)) for n, d in personas)
        return cls(key, len(names), tuple(sorted(word_counts(names).items())))

    def votes(self, names: Sequence[str]) -> np.ndarray:
        """Raw votes (rows sum to 1) per name; names this process has not voted for under this
        catalogue are embedded together, once."""
        with _LOCK:
            cached = _VOTES.get(self.key)
            if cached is None:
                cached = _VOTES[self.key] = {}
                while len(_VOTES) > _CATALOGUES:  # the model in use and the one a refit fits
                    _VOTES.popitem(last=False)
            _VOTES.move_to_end(self.key)
        missing = [n for n in dict.fromkeys(str(n) for n in names) if n not in cached]
        if missing:
            labeler, calib = _labeler(self)
            for name, row in zip(missing, labeler.raw_votes(missing, calib)):
                cached[name] = row
        if not len(names):
            return np.zeros((0, len(self.personas)))
        return np.vstack([cached[str(n)] for n in names])

    def to_dict(self) -> dict[str, Any]:
        return {"personas": [list(p) for p in self.personas], "size": self.size,
                "words": [w for w, _ in self.words], "counts": [c for _, c in self.words]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CatalogueVotes:
        words, counts = list(d["words"]), list(d["counts"])
        if len(words) != len(counts):
            raise ValueError("catalogue words and counts differ in length")
        return cls(tuple((str(n), str(df)) for n, df in d["personas"]), int(d["size"]),
                   tuple((str(w), int(c)) for w, c in zip(words, counts)))


_LOCK = threading.Lock()
_CATALOGUES = 2
_VOTES: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()  # catalogue key → name → vote
_LABELERS: dict[PersonaKey, Any] = {}  # one EmbeddingLabeler (its embedding cache) per persona set
_CALIBS: OrderedDict[str, Any] = OrderedDict()  # catalogue key → its word calibration


def _labeler(catalogue: CatalogueVotes) -> tuple[Any, Any]:
    """The process's labeler for the catalogue's personas and the catalogue's word calibration.

    Built outside `_LOCK` (it embeds the catalogue's words: seconds): a refit thread building the
    next catalogue's calibration must not hold up the worker's event loop voting a new name under
    the current one. Two threads may build the same one at once; the first stored wins."""
    from core.labelers.embedding import EmbeddingLabeler  # sentence-transformers only when asked for
    from core.personas import Persona

    with _LOCK:
        labeler = _LABELERS.get(catalogue.personas)
    if labeler is None:
        personas = PersonaSet([Persona(n, d) for n, d in catalogue.personas])
        built = EmbeddingLabeler(personas, temperature=TEMPERATURE, calibration=CALIBRATION)
        with _LOCK:
            labeler = _LABELERS.setdefault(catalogue.personas, built)
    with _LOCK:
        calib = _CALIBS.get(catalogue.key)
    if calib is None:
        built_calib = labeler.word_calibration(catalogue.size, dict(catalogue.words))
        with _LOCK:
            calib = _CALIBS.setdefault(catalogue.key, built_calib)
            _CALIBS.move_to_end(catalogue.key)
            while len(_CALIBS) > _CATALOGUES:
                _CALIBS.popitem(last=False)
    return labeler, calib


@dataclass(frozen=True)
class ZeroShotChannel:
    """Per item name its lift s(v) (`item_lift`): a table for a fixed catalogue (`names`, `lift`),
    and, when fitted from MiniLM (`zero_shot_channel`), the `catalogue` and its mean vote `base`
    that compute the lift of any name — names outside the table are then voted, not neutral.
    Without a catalogue (a table built from other votes) an unknown name is neutral (ones)."""

    names: tuple[str, ...]
    lift: np.ndarray  # len(names) × personas
    catalogue: CatalogueVotes | None = None
    base: np.ndarray | None = None  # (personas,) the catalogue's mean vote, with `catalogue`
    _row: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        lift = np.asarray(self.lift, dtype=np.float64)
        if self.catalogue is not None:
            base = np.asarray(self.base, dtype=np.float64).reshape(-1)
            if base.size != len(self.catalogue.personas) or not np.all(np.isfinite(base)) or np.any(base <= 0):
                raise ValueError(f"the catalogue's base must be {len(self.catalogue.personas)} positive floats")
            object.__setattr__(self, "base", base)
            if lift.size == 0:
                lift = np.zeros((0, base.size))
        if lift.ndim != 2 or lift.shape[0] != len(self.names):
            raise ValueError(f"lift {lift.shape} must be one row per name ({len(self.names)})")
        if not np.all(np.isfinite(lift)) or np.any(lift < 0):
            raise ValueError("lifts must be finite and non-negative")
        object.__setattr__(self, "lift", lift)
        object.__setattr__(self, "_row", {n: i for i, n in enumerate(self.names)})

    @property
    def n_personas(self) -> int:
        return int(self.lift.shape[1])

    def item_lifts(self, names: Sequence[str]) -> np.ndarray:
        """s(v) per name (rows): the table's row, else the catalogue's vote over `base`, else
        ones (no evidence either way)."""
        out = np.ones((len(names), self.n_personas))
        rows = np.fromiter((self._row.get(str(n), -1) for n in names), dtype=np.int64, count=len(names))
        known = rows >= 0
        out[known] = self.lift[rows[known]]
        if self.catalogue is not None and self.base is not None and not known.all():
            unknown = np.flatnonzero(~known)
            out[unknown] = item_lift(self.catalogue.votes([str(names[int(i)]) for i in unknown]), self.base)
        return out

    def warm(self) -> None:
        """Load this process's MiniLM and persona embeddings now (a worker calls it in a thread
        when a model arrives, so its event loop does not pay the load at the first new name)."""
        if self.catalogue is not None:
            _labeler(self.catalogue)[0].persona_vectors()

    def shipped(self) -> ZeroShotChannel:
        """The channel without its table (catalogue and base only): what a model ships to the
        stream; it computes the same lifts (the table's are the catalogue's votes over `base`)."""
        if self.catalogue is None:
            return self
        return ZeroShotChannel((), np.zeros((0, self.n_personas)), self.catalogue, self.base)

    def user_features(self, graph: BipartiteGraph) -> np.ndarray:
        """Every user's z (users × personas) over its distinct items, as one sparse product."""
        ui = sp.csr_matrix(graph.user_item, copy=True)
        ui.data[:] = 1.0
        total = np.asarray(ui @ self.item_lifts([str(n) for n in graph.item_names]))
        return lift_feature(total, np.diff(ui.indptr))

    def add_items(self, state: np.ndarray | None, names: Sequence[str]) -> np.ndarray:
        """A user's running state [Σ s(v) …, n] after the new *distinct* items `names`."""
        out = np.zeros(self.n_personas + 1) if state is None else np.array(state, dtype=np.float64)
        out[:-1] += self.item_lifts(names).sum(axis=0)
        out[-1] += len(names)
        return out

    def feature(self, state: np.ndarray | None) -> np.ndarray:
        """z of a running state (`add_items`); None: no item yet."""
        if state is None:
            return lift_feature(np.zeros(self.n_personas), 0.0)
        state = np.asarray(state, dtype=np.float64)
        return lift_feature(state[:-1], float(state[-1]))

    def to_dict(self) -> dict[str, Any]:
        """The table (names, base64 lifts) and, when fitted from MiniLM, the catalogue and base;
        `shipped()` first leaves the table out."""
        raw = base64.b64encode(np.ascontiguousarray(self.lift, dtype="<f8").tobytes()).decode("ascii")
        out = {"kind": "zero_shot", "names": list(self.names), "lift": raw, "personas": self.n_personas}
        if self.catalogue is not None and self.base is not None:
            out |= {"catalogue": self.catalogue.to_dict(), "base": self.base.tolist()}
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ZeroShotChannel:
        if d.get("kind") != "zero_shot":
            raise ValueError("not a zero-shot channel dict (kind != 'zero_shot')")
        names = tuple(str(n) for n in d["names"])
        lift = np.frombuffer(base64.b64decode(d["lift"]), dtype="<f8").reshape(len(names), int(d["personas"]))
        catalogue = CatalogueVotes.from_dict(d["catalogue"]) if "catalogue" in d else None
        return cls(names, lift.copy(), catalogue, None if catalogue is None else np.asarray(d["base"]))


def zero_shot_channel(names: Iterable[str], personas: PersonaSet, *, labeler: Any = None) -> ZeroShotChannel:
    """The channel for a catalogue: MiniLM votes of each name (`CatalogueVotes`: the
    `EmbeddingLabeler` pinned to this catalogue, calibration `CALIBRATION`, temperature
    `TEMPERATURE`) over their catalogue mean; the channel keeps the catalogue, so it votes for
    names first seen later too.

    `labeler` may instead be any object with `item_persona_scores(names)` (a test double): the
    channel is then the table of these names only (unknown names neutral).
    """
    names = list(dict.fromkeys(str(n) for n in names))
    if not names:
        raise ValueError("the zero-shot channel needs a catalogue of at least one item name")
    key = (tuple(names), tuple((p.name, p.definition) for p in personas))
    if labeler is None and key in _LAST:  # the same catalogue again (seeds of a benchmark, refits)
        return _LAST[key]
    catalogue = None
    if labeler is None:  # MiniLM through the process-wide vote cache, as the stream's workers
        catalogue = CatalogueVotes.of(names, personas)
        votes = catalogue.votes(names)
    else:
        votes = np.asarray(labeler.item_persona_scores(names), dtype=np.float64)
    if votes.shape != (len(names), len(personas)):
        raise ValueError(f"item votes {votes.shape} do not match {len(names)} names × {len(personas)} personas")
    base = votes.mean(axis=0)
    channel = ZeroShotChannel(tuple(names), item_lift(votes, base), catalogue, None if catalogue is None else base)
    if catalogue is not None:
        _LAST.clear()  # one catalogue kept: a process labels one shop
        _LAST[key] = channel
    return channel


_LAST: dict[tuple[tuple[str, ...], PersonaKey], ZeroShotChannel] = {}
