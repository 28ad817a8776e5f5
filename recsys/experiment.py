"""Train-and-evaluate one named model on one seed, with the persona matrices its graph needs.

Persona sources (user × persona and item × persona binary CSRs, aligned with `RecData`):
recorded tables (the paper's GPT-4 labels), GPLR at a budget with a replay labeler on the
fit graph (core.gplr.run_gplr), or core's embedding labeler for item names.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import scipy.sparse as sp

from core.gplr import run_gplr
from core.labelers import make_labeler
from core.personas import PersonaSet
from recsys.data import RecData, persona_matrix
from recsys.evaluate import KS, Evaluation, evaluate
from recsys.graph import RecGraph, build_graph
from recsys.models import MODELS, ItemItemModel, RankingModel, make_model
from recsys.train import TrainConfig, TrainResult, fit

__all__ = ["ModelConfig", "RunResult", "GraphCache", "gplr_user_personas", "embedding_item_personas",
           "run_model"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters shared by all models (each class takes the ones it knows)."""

    dim: int = 64
    reg: float = 1e-4
    n_layers: int = 3       # LightGCN
    n_eigen: int = 128      # LGCN: low-pass basis size
    afd_weight: float = 0.1
    train: TrainConfig = field(default_factory=TrainConfig)

    def kwargs_for(self, name: str) -> dict[str, Any]:
        """Closed-form models take none of these (their own are searched on validation)."""
        if not MODELS[name.lower()].cls.trainable:
            return {}
        cls = MODELS[name.lower()].cls.__name__
        extra = {"LightGCN": {"n_layers": self.n_layers}, "LGCN": {"n_eigen": self.n_eigen}}.get(cls, {})
        return {"dim": self.dim, "reg": self.reg, "afd_weight": self.afd_weight, **extra}


@dataclass
class RunResult:
    model: str
    seed: int
    train: TrainResult
    test: Evaluation
    recommender: RankingModel = field(repr=False)


class GraphCache:
    """One `RecGraph` per persona source, so LGCN's eigendecomposition is paid once per graph."""

    def __init__(self, data: RecData) -> None:
        self.data = data
        self._graphs: dict[str, RecGraph] = {}

    def get(self, key: str, user_personas: sp.spmatrix | None = None,
            item_personas: sp.spmatrix | None = None) -> RecGraph:
        if key not in self._graphs:
            self._graphs[key] = build_graph(self.data.fit, user_personas, item_personas)
        return self._graphs[key]


def gplr_user_personas(data: RecData, personas: PersonaSet, labels_path: str | Path,
                       budget: float = 0.05, seed: int = 0, **gplr_options: Any) -> sp.csr_matrix:
    """GPLR personas for every user: replay the recorded labels of a `budget` of prototype users
    (DU sampling) on the fit graph and propagate to the rest (paper Algorithm 1)."""
    labeler = make_labeler("replay", personas, path=labels_path)
    result = run_gplr(data.fit_graph(), personas, labeler, budget=budget, seed=seed, **gplr_options)
    log.info("GPLR: %d prototypes labeled, %d failed", len(result.prototypes), len(result.failed))
    return sp.csr_matrix(result.assignment.as_matrix(len(personas)), dtype="float32")


def embedding_item_personas(names: list[str], personas: PersonaSet, **options: Any) -> sp.csr_matrix:
    """Item personas from product names with core's embedding labeler (no LLM needed)."""
    from core.labelers.embedding import EmbeddingLabeler

    labeler = make_labeler("embedding", personas, **options)
    assert isinstance(labeler, EmbeddingLabeler)  # make_labeler's registry maps "embedding" to it
    return persona_matrix(labeler.label_items(names), len(personas))


def run_model(name: str, data: RecData, graph: RecGraph, config: ModelConfig = ModelConfig(),
              seed: int = 0, ks: tuple[int, ...] = KS) -> RunResult:
    """Build `name` on `graph`, train with early stopping on validation (closed form: choose the
    hyper-parameters on validation, then re-solve on all of train — a cheap refit the trained
    models do not get), evaluate on test once."""
    model = make_model(name, graph, seed=seed, **config.kwargs_for(name))
    trained = fit(model, data.fit, data.valid, replace(config.train, seed=seed))
    if isinstance(model, ItemItemModel):
        model.solve(data.train)
    test = evaluate(model, data.test, data.train, ks=ks)
    return RunResult(name.lower(), seed, trained, test, model)
