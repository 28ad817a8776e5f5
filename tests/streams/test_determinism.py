"""Issue 9, failure 4 (the part that is fixed): who is asked for a label does not depend on the
wall clock or on how partitions interleave in a worker.

* the call-rate limit delays labeller calls, it never decides who is labelled;
* each partition's DU quantile window sees only that partition's users, so the decisions of a
  partition are a function of that partition's own sequence of Ψ̂ changes.

(What is not fixed: Ψ̂ at the moment of a decision still depends on when item values arrive,
see docs/operations.md, "Reproducibility".)
"""
from __future__ import annotations

import asyncio
import numpy as np

from core.incremental import UserState, user_purchase
from streams import labelling
from streams.config import StreamConfig
from streams.labelling import LabelPolicy, RateLimiter
from streams.records import partition_for

M = 4


def _user(n_items: int) -> UserState:
    state = UserState(M)
    for i in range(n_items):
        user_purchase(state, f"i{i}", 1, f"Item {i}")
    return state


def _sequence(seed: int, n: int = 400) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(f"u{i}", rng.dirichlet(np.ones(M)) * rng.uniform(0.1, 1.0)) for i in range(n)]


def _decide(policy: LabelPolicy, calls: list[tuple[str, np.ndarray]], partitions: int) -> set[str]:
    q = np.full(M, 1.0 / M)
    stats = {p: {"seen": 0, "requested": 0} for p in range(partitions)}
    chosen = set()
    for user, psi in calls:
        st = stats[partition_for(user, partitions)]
        st["seen"] += 1
        if policy.consider(user, _user(3), psi, q, st) is not None:
            st["requested"] += 1
            chosen.add(user)
    return chosen


def test_decisions_do_not_depend_on_partition_interleaving_or_the_clock():
    config = StreamConfig(labeler="embedding", label_budget=0.3, label_min_purchases=2, du_quantile=0.7,
                          label_rate_per_min=1.0, partitions=4)  # a rate that would have dropped most
    calls = _sequence(0)
    first = _decide(LabelPolicy(config), calls, config.partitions)
    # the same per-partition order, partitions interleaved differently (another batching)
    by_part: dict[int, list] = {}
    for call in calls:
        by_part.setdefault(partition_for(call[0], config.partitions), []).append(call)
    regrouped = [c for p in sorted(by_part, reverse=True) for c in by_part[p]]
    second = _decide(LabelPolicy(config), regrouped, config.partitions)
    assert first == second
    assert len(first) > 0.3 * len(calls) * 0.5  # the rate limit (1/min) did not drop requests


def test_rate_limiter_wait_delays_but_never_refuses(monkeypatch):
    now = [0.0]

    async def fake_sleep(seconds: float) -> None:  # simulated time: no timing in the test
        now[0] += seconds

    monkeypatch.setattr(labelling.asyncio, "sleep", fake_sleep)
    limiter = RateLimiter(600, clock=lambda: now[0])  # 10/s, burst 50
    asyncio.run(limiter.wait(55))  # all 55 granted: 50 at once, 5 more at 10/s
    assert 0.45 <= now[0] <= 0.6
