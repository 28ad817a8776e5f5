"""The recommender trainer's model side, with no Kafka: the purchase graph and personas rebuilt
from topic records (`GraphState`), one training cycle (`train_model`) and the top-K lists it
publishes (`recommend`, `recommendation_record`). The service that consumes the topics and
publishes the lists (`gplr trainer`) is `streams.trainer_service`.

A cycle is due after `GPLR_TRAIN_AFTER_EDGES` new edges or
`GPLR_TRAIN_INTERVAL_S` seconds with any change. By default (`auto`) each cycle fits EASE and,
when any user has personas, EASE-persona (persona columns), chooses their hyper-parameters on a
validation carve-out, keeps the better of the two on validation and re-solves it on every
purchase; the choice is cached and a cycle in between costs one closed-form solve
(`GPLR_TRAINER_RESELECT_EVERY`). A named model (`GPLR_TRAINER_MODEL`, e.g. lgcn3) is trained
with the BPR loop instead. Each cycle publishes `{user_id, items: [{item_id, item_name, score}],
model, model_version, ts}` keyed by user to `recommendations`, `model` naming the model that
ranked that user. Users known only by personas (no purchase yet) are ranked through the persona
nodes or columns (`cold_user_scores`) of the persona model.

Every setting is declared once on `TrainerConfig` (docs/operations.md shows the generated table).
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from core.events import InvalidEvent, parse_purchase
from core.personas import PersonaSet
from core.settings import PORT_RULE, check_all, check_settings, is_port, lower, read_env, setting
from recsys.data import carve_validation, interactions, persona_matrix
from recsys.evaluate import topk_items
from recsys.experiment import ModelConfig
from recsys.graph import build_graph
from recsys.models import EASE, MODELS, PLAIN_OF, ItemItemModel, RankingModel, make_model
from recsys.train import TrainConfig, fit, select

__all__ = [
    "TrainerConfig",
    "GraphState",
    "TrainedModel",
    "Selection",
    "AUTO_CANDIDATES",
    "choose_models",
    "train_model",
    "recommend",
    "recommendation_record",
]

log = logging.getLogger(__name__)


# -- configuration -----------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainerConfig:
    """Trainer settings (the stream's own — bootstrap, prefix, personas — come from
    `streams.config.StreamConfig` in the service)."""

    interval_s: float = setting(600.0, "GPLR_TRAIN_INTERVAL_S", "seconds between training cycles while anything "
                                "changed", parse=float, check=lambda v: v > 0, why="must be > 0")
    after_edges: int = setting(1000, "GPLR_TRAIN_AFTER_EDGES", "new user–item edges that trigger a cycle at once",
                               parse=int, check=lambda v: v >= 1, why="must be >= 1")
    model: str = setting("auto", "GPLR_TRAINER_MODEL", "`auto` (the better of EASE / EASE-persona on validation) "
                         "or a `recsys.models` name", parse=lower, check=lambda v: v == "auto" or v in MODELS,
                         why=f"must be auto or one of {sorted(MODELS)}")
    reselect_every: int = setting(10, "GPLR_TRAINER_RESELECT_EVERY", "cycles between model and hyper-parameter "
                                  "selections (`auto`, closed-form models); the cycles in between re-solve the "
                                  "chosen model once", parse=int, check=lambda v: v >= 1, why="must be >= 1")
    epochs: int = setting(30, "GPLR_TRAINER_EPOCHS", "most BPR epochs per cycle (early stopping on validation NDCG)",
                          parse=int, check=lambda v: v >= 1, why="must be >= 1")
    dim: int = setting(32, "GPLR_TRAINER_DIM", "embedding size", parse=int, check=lambda v: v >= 1,
                       why="must be >= 1")
    lr: float = setting(5e-3, "GPLR_TRAINER_LR", "Adam learning rate", parse=float, check=lambda v: v > 0,
                        why="must be > 0")
    max_seconds: float = setting(600.0, "GPLR_TRAINER_MAX_SECONDS", "wall-clock cap of one training run (the best "
                                 "model so far is kept)", parse=float, check=lambda v: v > 0, why="must be > 0")
    device: str | None = setting(None, "GPLR_TRAINER_DEVICE", "torch device; unset → CUDA when present, else CPU "
                                 "(`trainer-gpu` sets `cuda`)")
    top_k: int = setting(10, "GPLR_RECS_K", "recommendations per user", parse=int, check=lambda v: v >= 1,
                         why="must be >= 1")
    metrics_port: int = setting(9108, "GPLR_TRAINER_METRICS_PORT", "the trainer's `/metrics` port; the stack leaves "
                                "it unset so Prometheus finds the trainer on 9108", parse=int,
                                check=is_port, why=PORT_RULE,
                                fallback="GPLR_METRICS_PORT")
    batch_size: int = 4096
    n_eigen: int = 64
    patience: int = 5
    valid_frac: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        check_settings(self)
        check_all([(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1"),
                   (0.0 < self.valid_frac < 1.0, "valid_frac", self.valid_frac, "must be in (0, 1)")])

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TrainerConfig:
        """Read the declared variables; the metrics port falls back to `GPLR_METRICS_PORT` (one port
        per container in the compose stack)."""
        return cls(**read_env(cls, os.environ if env is None else env))


# -- state rebuilt from the topics -------------------------------------------------------------
class GraphState:
    """Users, items, edges and latest personas as read so far, plus what changed since the last
    publish. Duplicate events (same event_id) and repeat purchases add nothing."""

    def __init__(self, personas: PersonaSet) -> None:
        self.personas = personas
        self.user_ids: list[str] = []
        self.item_ids: list[str] = []
        self.item_names: list[str] = []
        self._user_index: dict[str, int] = {}
        self._item_index: dict[str, int] = {}
        self._edges: set[tuple[int, int]] = set()
        self._rows: list[int] = []
        self._cols: list[int] = []
        self._events: set[str] = set()
        self.user_personas: dict[int, tuple[int, ...]] = {}
        self.changed: set[int] = set()
        self.new_edges = 0
        self.rejected = 0

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_edges(self) -> int:
        return len(self._rows)

    def _user(self, user_id: str) -> int:
        if user_id not in self._user_index:
            self._user_index[user_id] = len(self.user_ids)
            self.user_ids.append(user_id)
        return self._user_index[user_id]

    def add_purchase(self, payload: bytes | str | Mapping[str, Any]) -> bool:
        """Apply one purchases record; True when it adds a new user–item edge. Invalid records
        are counted and skipped (the stream worker dead-letters them; the topic keeps them)."""
        try:
            event = parse_purchase(payload)
        except InvalidEvent as exc:
            self.rejected += 1
            log.debug("skipped purchase: %s", exc)
            return False
        if event.event_id in self._events:
            return False
        self._events.add(event.event_id)
        u = self._user(event.user_id)
        if event.item_id not in self._item_index:
            self._item_index[event.item_id] = len(self.item_ids)
            self.item_ids.append(event.item_id)
            self.item_names.append(event.item_name)
        i = self._item_index[event.item_id]
        if (u, i) in self._edges:
            return False
        self._edges.add((u, i))
        self._rows.append(u)
        self._cols.append(i)
        self.changed.add(u)
        self.new_edges += 1
        return True

    def set_personas(self, payload: bytes | str | Mapping[str, Any], key: str | None = None) -> bool:
        """Apply one persona-updates record (`{"user", "personas": [{"idx", "name", ...}]}`);
        True when the user's persona set changed. Names are matched first, indices second."""
        try:
            body = json.loads(payload) if isinstance(payload, (bytes, str)) else payload
            user = str(body.get("user") or body.get("user_id") or key or "").strip()
            entries = body.get("personas") or []
            if not user or not isinstance(entries, list):
                raise ValueError("needs a user and a personas list")
            # A "prior" update is a stand-in (the most common personas) for a user no prototype
            # reaches yet: it says nothing about the user, so it adds no persona edges.
            found = [] if body.get("reason") == "prior" else [self._persona_index(e) for e in entries]
        except (ValueError, TypeError, AttributeError, UnicodeDecodeError) as exc:
            self.rejected += 1
            log.warning("skipped persona update: %s", exc)
            return False
        personas = tuple(sorted({p for p in found if p is not None}))
        u = self._user(user)
        if self.user_personas.get(u, ()) == personas:
            return False
        if personas:
            self.user_personas[u] = personas
        else:
            self.user_personas.pop(u, None)
        self.changed.add(u)
        return True

    def _persona_index(self, entry: Any) -> int | None:
        if isinstance(entry, Mapping):
            name, idx = entry.get("name"), entry.get("idx")
        elif isinstance(entry, str):
            name, idx = entry, None
        else:
            name, idx = None, entry
        if name is not None:
            found = self.personas.index_of(str(name))
            if found is not None:
                return found
        if isinstance(idx, int) and not isinstance(idx, bool) and 0 <= idx < len(self.personas):
            return idx
        return None

    def interactions(self) -> sp.csr_matrix:
        """Binary users × items CSR of every edge so far."""
        return interactions(np.asarray(self._rows, dtype=np.int64), np.asarray(self._cols, dtype=np.int64),
                            self.n_users, self.n_items)

    def persona_matrix(self) -> sp.csr_matrix | None:
        """Binary users × personas CSR, or None when no user has personas."""
        if not self.user_personas:
            return None
        return persona_matrix([self.user_personas.get(u, ()) for u in range(self.n_users)], len(self.personas))


# -- one training cycle ------------------------------------------------------------------------
AUTO_CANDIDATES = ("ease", "ease-persona")  # `auto`: the plain strong model and its persona variant


@dataclass(frozen=True)
class Selection:
    """What the last selection chose: the winner, every candidate's hyper-parameters and
    validation NDCG. Cycles in between reuse it (one solve per cycle instead of a search)."""

    names: tuple[str, ...]
    winner: str
    params: dict[str, dict[str, float]]
    valid_ndcg: dict[str, float]
    version: int
    solves: int = 0  # closed-form solves the search took


@dataclass
class TrainedModel:
    model: RankingModel
    name: str
    version: int
    valid_ndcg: float
    epochs: int  # BPR epochs, or closed-form solves
    seconds: float
    known: sp.csr_matrix = field(repr=False)  # every purchase at training time: never recommended
    user_personas: sp.csr_matrix | None = field(default=None, repr=False)  # rows for the persona model
    # the persona model that ranks users known only by personas, when `model` has none
    cold_model: RankingModel | None = field(default=None, repr=False)
    cold_name: str | None = None
    selection: Selection | None = field(default=None, repr=False)

    def persona_model(self) -> tuple[RankingModel, str] | None:
        """The model (and its name) that ranks persona-only users, if any."""
        if self.cold_model is not None:
            return self.cold_model, str(self.cold_name)
        return (self.model, self.name) if MODELS[self.name].personas else None


def choose_models(config: TrainerConfig, has_personas: bool) -> tuple[str, ...]:
    """The candidates to compare on validation. `auto`: EASE, plus EASE-persona when personas
    are present; a named model alone, a persona model without personas falling back to its plain
    counterpart rather than failing."""
    if config.model == "auto":
        return AUTO_CANDIDATES if has_personas else AUTO_CANDIDATES[:1]
    if MODELS[config.model].personas and not has_personas:
        plain = PLAIN_OF[config.model]
        log.warning("%s needs personas and none arrived yet; training %s", config.model, plain)
        return (plain,)
    if not MODELS[config.model].personas and has_personas:
        log.info("%s ignores personas", config.model)
    return (config.model,)


def _train_config(config: TrainerConfig) -> TrainConfig:
    return TrainConfig(epochs=config.epochs, lr=config.lr, batch_size=config.batch_size, patience=config.patience,
                       seed=config.seed, max_seconds=config.max_seconds, device=config.device)


def _closed_form(name: str, matrix: sp.csr_matrix, personas: sp.csr_matrix | None, config: TrainerConfig,
                 params: dict[str, float]) -> ItemItemModel:
    """`name` on the graph of `matrix`, configured with `params` (not yet solved)."""
    graph = build_graph(matrix, personas if MODELS[name].personas else None)
    model = make_model(name, graph, device=config.device)
    assert isinstance(model, ItemItemModel)
    return model.configure(**params)


def _select(names: tuple[str, ...], fit_m: sp.csr_matrix, valid: sp.csr_matrix, personas: sp.csr_matrix | None,
            config: TrainerConfig, version: int) -> Selection:
    """Each candidate's hyper-parameters on validation. A persona variant starts from what its
    plain counterpart chose and searches only its persona weights (4 solves, not 11+)."""
    params: dict[str, dict[str, float]] = {}
    scores: dict[str, float] = {}
    solves = 0
    for name in names:
        model = _closed_form(name, fit_m, personas, config, {})
        space = model.search_space()
        plain = params.get(PLAIN_OF.get(name, ""), {})
        space = {k: ((plain[k],) if k in plain else v) for k, v in space.items()}
        result = select(model, fit_m, valid, _train_config(config), space=space)
        params[name], scores[name] = result.best_params, result.best_valid_ndcg
        solves += result.epochs_run + 1  # the search's solves and select's final re-solve
    winner = max(names, key=scores.__getitem__)
    log.info("selection: %s on validation NDCG@10 %s", winner, {n: round(v, 4) for n, v in scores.items()})
    return Selection(names, winner, params, scores, version, solves)


def train_model(state: GraphState, config: TrainerConfig, version: int,
                previous: TrainedModel | None = None) -> TrainedModel:
    """Train on a snapshot of `state` (validation carved out per user). Closed-form candidates:
    select on validation unless `previous`'s selection still holds (same candidates, fewer than
    `reselect_every` cycles ago), then solve the winner on every known purchase — as a low-rank
    update of the previous EASE when only a few users changed."""
    start = time.perf_counter()
    known = state.interactions()
    if known.nnz == 0:
        raise ValueError("no purchases yet: nothing to train on")
    personas = state.persona_matrix()
    names = choose_models(config, personas is not None)
    if all(not MODELS[n].cls.trainable for n in names):
        return _train_closed_form(names, known, personas, config, version, previous, start)
    (name,) = names
    fit_m, valid = carve_validation(known, config.valid_frac, config.seed)
    graph = build_graph(fit_m, personas if MODELS[name].personas else None)
    model_cfg = ModelConfig(dim=config.dim, n_eigen=config.n_eigen)
    model = make_model(name, graph, seed=config.seed, **model_cfg.kwargs_for(name))
    result = fit(model, fit_m, valid, _train_config(config))
    return TrainedModel(model, name, version, max(result.best_valid_ndcg, 0.0), result.epochs_run,
                        result.seconds, known, personas if MODELS[name].personas else None)


def _train_closed_form(names: tuple[str, ...], known: sp.csr_matrix, personas: sp.csr_matrix | None,
                       config: TrainerConfig, version: int, previous: TrainedModel | None,
                       start: float) -> TrainedModel:
    last = None if previous is None else previous.selection
    fresh = last is None or last.names != names or version - last.version >= config.reselect_every
    if fresh:
        fit_m, valid = carve_validation(known, config.valid_frac, config.seed)
        selection = _select(names, fit_m, valid, personas, config, version)
    else:
        assert last is not None
        selection = last
    winner = selection.winner
    model = _closed_form(winner, known, personas, config, selection.params[winner])
    if not fresh and isinstance(model, EASE) and previous is not None and isinstance(previous.model, EASE):
        model.solve_from(previous.model, known)
    else:
        model.solve(known)
    solves = selection.solves + 1 if fresh else 1
    cold_model, cold_name = None, None
    persona_only = personas is not None and bool(np.any((np.diff(known.indptr) == 0) & (np.diff(personas.indptr) > 0)))
    if persona_only and not MODELS[winner].personas:
        cold_name = next((n for n in names if MODELS[n].personas), None)
        if cold_name is not None:
            cold_model = _closed_form(cold_name, known, personas, config, selection.params[cold_name]).solve(known)
            solves += 1
    uses_personas = MODELS[winner].personas or cold_model is not None
    return TrainedModel(model, winner, version, max(selection.valid_ndcg[winner], 0.0), solves,
                        time.perf_counter() - start, known, personas if uses_personas else None,
                        cold_model, cold_name, selection)


def recommend(trained: TrainedModel, users: np.ndarray, k: int) -> dict[int, list[tuple[int, float]]]:
    """Top-k (item, score) of unbought items per user. Users with purchases are ranked by the
    model; users known only by personas through the persona nodes (cold start); others get none."""
    users = np.asarray(users, dtype=np.int64)
    known = trained.known
    degree = np.diff(known.indptr)
    n_items = known.shape[1]
    out: dict[int, list[tuple[int, float]]] = {}
    warm = users[degree[users] > 0]
    if len(warm):
        top, scores = topk_items(trained.model, warm, known, min(k, n_items), with_scores=True)
        for r, u in enumerate(warm):
            left = n_items - degree[u]
            out[int(u)] = [(int(i), float(s)) for i, s in zip(top[r][:left], scores[r][:left])]
    cold = users[degree[users] == 0]
    persona_model = trained.persona_model()
    if len(cold) and persona_model is not None and trained.user_personas is not None:
        model, _ = persona_model
        model.eval()
        with torch.no_grad():
            for u in cold:
                row = trained.user_personas[int(u)]
                if row.nnz == 0:
                    continue
                scores = model.cold_user_scores(row.indices.tolist()).cpu().numpy()
                best = np.argsort(-scores, kind="stable")[:k]
                out[int(u)] = [(int(i), float(scores[i])) for i in best]
    return out


def recommendation_record(state: GraphState, user: int, items: list[tuple[int, float]],
                          trained: TrainedModel) -> dict[str, Any]:
    """Body of a recommendations record (key: user id); `model` names the model that ranked
    this user (the persona model for a user known only by personas)."""
    warm = trained.known.shape[0] > user and trained.known.indptr[user + 1] > trained.known.indptr[user]
    persona_model = trained.persona_model()
    name = trained.name if warm or persona_model is None else persona_model[1]
    return {
        "user_id": state.user_ids[user],
        "items": [{"item_id": state.item_ids[i], "item_name": state.item_names[i], "score": round(s, 6)}
                  for i, s in items],
        "model": name,
        "model_version": trained.version,
        "ts": time.time(),
    }
