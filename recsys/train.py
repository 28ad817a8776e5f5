"""One entry point, `fit`, for every recommender. Trained models: a BPR loop with vectorised
negative sampling, Adam, early stopping on validation NDCG@10 (never on test), best weights
restored at the end. Closed-form models: a coordinate search of their hyper-parameters on the
same validation NDCG@10, the best solution kept."""
from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch

from recsys.evaluate import evaluate
from recsys.metrics import contains_pairs
from recsys.models.base import BPRBatch, RankingModel, Recommender, pick_device
from recsys.models.itemitem import ItemItemModel

__all__ = ["TrainConfig", "TrainResult", "sample_negatives", "bpr_batches", "fit", "select"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 200
    batch_size: int = 4096
    lr: float = 1e-3
    patience: int = 10          # evaluations without improvement before stopping
    eval_every: int = 1         # epochs between validation runs
    valid_k: int = 10
    seed: int = 0
    max_seconds: float | None = None  # wall-clock cap; the best model so far is kept
    device: str | None = None


@dataclass
class TrainResult:
    best_epoch: int = 0
    best_valid_ndcg: float = -1.0
    epochs_run: int = 0  # closed-form models: solves run
    best_params: dict[str, float] = field(default_factory=dict)  # closed-form models
    seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)


def sample_negatives(fit: sp.csr_matrix, users: np.ndarray, rng: np.random.Generator,
                     rounds: int = 20) -> np.ndarray:
    """One uniformly drawn item per user that the user has not bought (re-drawn where it has).

    A user who bought every item keeps an arbitrary draw after `rounds`; that never happens on
    real data and only weakens, never breaks, the loss.
    """
    n_items = fit.shape[1]
    neg = rng.integers(0, n_items, len(users))
    for _ in range(rounds):
        bad = contains_pairs(fit, users, neg)
        if not bad.any():
            break
        neg[bad] = rng.integers(0, n_items, int(bad.sum()))
    return neg


def bpr_batches(fit: sp.csr_matrix, batch_size: int, rng: np.random.Generator
                ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """One epoch: every training edge once as (user, positive), in random order, with a fresh
    negative each."""
    fit = sp.csr_matrix(fit)
    users = np.repeat(np.arange(fit.shape[0]), np.diff(fit.indptr))
    items = fit.indices
    order = rng.permutation(len(users))
    for lo in range(0, len(order), batch_size):
        idx = order[lo:lo + batch_size]
        u = users[idx]
        yield u, items[idx], sample_negatives(fit, u, rng)


def _valid_ndcg(model: RankingModel, valid: sp.csr_matrix, fit_matrix: sp.csr_matrix, k: int) -> float:
    return float(evaluate(model, valid, fit_matrix, ks=(k,)).mean()[f"ndcg@{k}"])


def select(model: ItemItemModel, fit_matrix: sp.csr_matrix, valid: sp.csr_matrix,
           config: TrainConfig = TrainConfig(), passes: int = 2,
           space: dict[str, tuple[float, ...]] | None = None) -> TrainResult:
    """Coordinate search on validation NDCG@K: sweep one hyper-parameter at a time over its
    candidates (the others at their best so far), up to `passes` rounds or until nothing moves.
    Each candidate is one solve; repeated points are not re-solved. Ends solved at the best.
    `space` narrows the model's own `search_space()` (the trainer's cheaper search)."""
    start = time.perf_counter()
    model.solve_device = pick_device(config.device)
    space = model.search_space() if space is None else space
    best = {k: v[0] for k, v in space.items()}
    seen: dict[tuple, float] = {}
    result = TrainResult()

    def score(point: dict[str, float]) -> float:
        key = tuple(sorted(point.items()))
        if key not in seen:
            model.configure(**point).solve(fit_matrix)
            seen[key] = _valid_ndcg(model, valid, fit_matrix, config.valid_k)
            result.history.append({**point, "valid_ndcg": seen[key]})
            log.debug("%s %s: valid NDCG@%d %.4f", model.name, point, config.valid_k, seen[key])
        return seen[key]

    best_score = score(best)
    for _ in range(passes):
        moved = False
        for name, values in space.items():
            for v in values:
                point = {**best, name: v}
                s = score(point)
                if s > best_score:
                    best, best_score, moved = point, s, True
        if not moved:
            break
    model.configure(**best).solve(fit_matrix)
    result.best_valid_ndcg, result.best_params, result.epochs_run = best_score, best, len(seen)
    result.seconds = time.perf_counter() - start
    log.info("%s: best valid NDCG@%d %.4f at %s (%d solves, %.1fs)", model.name, config.valid_k,
             best_score, best, len(seen), result.seconds)
    return result


def fit(model: RankingModel, fit_matrix: sp.csr_matrix, valid: sp.csr_matrix,
        config: TrainConfig = TrainConfig()) -> TrainResult:
    """Train `model` on `fit_matrix`; select the epoch (or, closed form, the hyper-parameters) by
    NDCG@K on `valid` (masking fit items)."""
    if fit_matrix.nnz == 0:
        raise ValueError("no training interactions")
    if isinstance(model, ItemItemModel):
        return select(model, fit_matrix, valid, config)
    assert isinstance(model, Recommender)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    device = pick_device(config.device)
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    result = TrainResult()
    best_state = copy.deepcopy(model.state_dict())
    stale = 0
    start = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        model.train()
        total, steps = 0.0, 0
        for u, p, n in bpr_batches(fit_matrix, config.batch_size, rng):
            batch = BPRBatch(*(torch.as_tensor(a, dtype=torch.long, device=device) for a in (u, p, n)))
            opt.zero_grad()
            loss = model.calculate_loss(batch)
            loss.backward()
            opt.step()
            total += float(loss.detach())
            steps += 1
        result.epochs_run = epoch
        row = {"epoch": epoch, "loss": total / max(steps, 1)}
        over_time = config.max_seconds is not None and time.perf_counter() - start > config.max_seconds
        if epoch % config.eval_every == 0 or epoch == config.epochs or over_time:
            score = _valid_ndcg(model, valid, fit_matrix, config.valid_k)
            row["valid_ndcg"] = score
            if score > result.best_valid_ndcg:
                result.best_valid_ndcg, result.best_epoch, stale = score, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
        result.history.append(row)
        log.debug("%s epoch %d: %s", model.name, epoch, row)
        if stale >= config.patience or over_time:
            break
    model.load_state_dict(best_state)
    model.eval()
    result.seconds = time.perf_counter() - start
    log.info("%s: best valid NDCG@%d %.4f at epoch %d of %d (%.1fs)", model.name, config.valid_k,
             result.best_valid_ndcg, result.best_epoch, result.epochs_run, result.seconds)
    return result
