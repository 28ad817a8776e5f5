"""Issue 9, failure 2: exact after kill -9.

The worker is killed (SIGKILL) three times at random moments — once right after a restart —
while the stream runs. At the end, compared with what an uninterrupted run gives (exact Ψ
computed in batch from the same events and labels, which an uninterrupted run stays within ε of):

* the last published persona update of every user is within θ = ε/2 (+ hysteresis, 0 here) of
  exact Ψ, replays included (an uninterrupted run's bound);
* the tables rebuilt from the changelogs alone hold exactly the graph (every purchase counted
  once, every edge confirmed), the labels, and Ψ̂ within θ of exact Ψ.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from core.data import iter_events
from core.incremental import psi_raw, threshold
from streams.demo import LagWatcher
from streams.tables import read_table
from streams.topics import Topics
from tests.streams.test_reliability import (
    _check_against_exact,
    _config,
    _exact_psi,
    _label_records,
    _labels_for,
    _last_updates,
    _shop,
    _updates,
)

pytestmark = pytest.mark.broker


def max_published_deviation(updates, frame, labels, n_personas: int) -> float:
    """Largest |published score − exact Ψ| over every user's last update (priors excluded)."""
    graph, psi = _exact_psi(frame, labels, n_personas)
    row = {str(u): i for i, u in enumerate(graph.user_ids)}
    worst = 0.0
    for user, update in _last_updates(updates).items():
        if user in labels or update["reason"] == "prior" or user not in row:
            continue
        for p in update["personas"]:
            worst = max(worst, abs(float(p["score"]) - psi[row[user], int(p["idx"])]))
    return worst


def check_changelog_state(config, frame, labels, n_personas: int) -> float:
    """The changelog-rebuilt users/items tables against the events; returns max |Ψ̂ − Ψ|."""
    users = read_table(config.kafka_bootstrap, config.app_id, "users")
    items = read_table(config.kafka_bootstrap, config.app_id, "items")
    graph, exact = _exact_psi(frame, labels, n_personas)
    expected_events = frame.groupby("user_id").size().to_dict()
    assert {u: s.events for u, s in users.items() if s.events} == {str(u): n for u, n in expected_events.items()}
    edges = frame.groupby(["user_id", "item_id"]).size().to_dict()
    assert {(u, i): it.count for u, s in users.items() for i, it in s.items.items()} == \
        {(str(u), str(i)): n for (u, i), n in edges.items()}
    assert all(it.seq >= 0 for s in users.values() for it in s.items.values())  # every edge confirmed
    assert {(u, i) for i, s in items.items() for u in s.buyers} == {(str(u), str(i)) for u, i in edges}
    assert {u: s.label_personas for u, s in users.items() if s.label is not None} == \
        {u: tuple(p) for u, p in labels.items()}
    streamed = np.vstack([psi_raw(users[str(u)]) for u in graph.user_ids])
    return float(np.abs(streamed - exact).max())


def test_three_kill_9s_at_random_moments_end_exact(
        broker, tmp_path, make_config, produce, consume, worker_factory) -> None:
    rng = np.random.default_rng()
    shop = _shop(n_users=90, seed=13)
    labels = _labels_for(shop)
    config = _config(make_config, broker, tmp_path)
    topics = Topics(config.topic_prefix)
    produce(config.kafka_bootstrap, topics.labels, _label_records(labels))
    events = list(iter_events(shop.frame))
    chunks = np.array_split(np.arange(len(events)), 4)
    pauses = [0.0, *rng.uniform(0.2, 2.5, size=2)]  # the first kill comes right after a restart
    for chunk, pause in zip(chunks[:3], rng.permutation(pauses)):
        worker = worker_factory(config).wait_ready()
        produce(config.kafka_bootstrap, topics.purchases, [events[i] for i in chunk])
        time.sleep(pause)
        worker.kill()
    worker_factory(config).wait_ready()
    produce(config.kafka_bootstrap, topics.purchases, [events[i] for i in chunks[3]])
    watcher = LagWatcher(config)
    assert watcher.wait_drained(timeout=120, settle=3.0), f"lag stuck at {watcher.lag()}"
    watcher.close()
    updates = _updates(consume, config)
    n_personas = len(config.personas())
    bound = threshold(config.eps) + config.hysteresis
    deviation = max_published_deviation(updates, shop.frame, labels, n_personas)
    psi_deviation = check_changelog_state(config, shop.frame, labels, n_personas)
    print(f"kill -9 x3 (pauses {np.round(pauses, 2).tolist()}): max published deviation {deviation:.4f}, "
          f"changelog Ψ̂ deviation {psi_deviation:.4f}, bound {bound}")
    assert deviation <= bound + 1e-6
    assert psi_deviation <= threshold(config.eps) + 1e-9
    assert _check_against_exact(updates, shop.frame, labels, n_personas, config.top_k) > len(shop.user_truth) // 2
