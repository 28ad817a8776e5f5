"""Recommenders by name. Persona variants are the same models on the user–item–persona graph
(GPLR paper Section 6; for the item–item models, persona columns and persona pseudo-users);
the "AFD"/"A-" variants add the AFDGCF de-correlation penalty. EASE and RP3β are closed-form
(`trainable = False`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from recsys.graph import RecGraph
from recsys.models.base import BPRBatch, RankingModel, Recommender, pick_device
from recsys.models.ease import EASE
from recsys.models.itemitem import ItemItemModel
from recsys.models.lgcn import LGCN
from recsys.models.lightgcn import LightGCN
from recsys.models.mf import MF
from recsys.models.rp3beta import RP3Beta

__all__ = ["BPRBatch", "RankingModel", "Recommender", "ItemItemModel", "MF", "LightGCN", "LGCN", "EASE",
           "RP3Beta", "ModelSpec", "MODELS", "PLAIN_OF", "make_model", "pick_device"]


@dataclass(frozen=True)
class ModelSpec:
    """How to build a named model: its class, whether its graph has persona nodes, whether the
    AFD penalty is on."""

    cls: type[RankingModel]
    personas: bool = False
    afd: bool = False


MODELS: dict[str, ModelSpec] = {
    "mf": ModelSpec(MF),
    "lightgcn": ModelSpec(LightGCN),
    "lgcn": ModelSpec(LGCN),
    "afd-lightgcn": ModelSpec(LightGCN, afd=True),
    "lightgcn3": ModelSpec(LightGCN, personas=True),
    "lgcn3": ModelSpec(LGCN, personas=True),
    "a-lgcn3": ModelSpec(LGCN, personas=True, afd=True),
    "ease": ModelSpec(EASE),
    "ease-persona": ModelSpec(EASE, personas=True),
    "rp3beta": ModelSpec(RP3Beta),
    "rp3beta-persona": ModelSpec(RP3Beta, personas=True),
}
# Each persona model's counterpart without personas (same class, plain graph).
PLAIN_OF: dict[str, str] = {"lightgcn3": "lightgcn", "lgcn3": "lgcn", "a-lgcn3": "lgcn",
                            "ease-persona": "ease", "rp3beta-persona": "rp3beta"}


def make_model(name: str, graph: RecGraph, afd_weight: float = 0.1, **kwargs: Any) -> RankingModel:
    """Instantiate `name` (case-insensitive) on `graph`; kwargs the class does not take are an error."""
    key = name.lower()
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    spec = MODELS[key]
    if spec.personas and graph.n_personas == 0:
        raise ValueError(f"{name} needs a graph with persona nodes")
    if not spec.personas and graph.n_personas:
        raise ValueError(f"{name} is a plain model; build its graph without personas")
    if spec.cls.trainable:
        kwargs["afd_weight"] = afd_weight if spec.afd else 0.0
    model = spec.cls(graph, **kwargs)
    model.name = key
    return model
