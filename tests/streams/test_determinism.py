"""Issue 9, failure 4: reproducible labeling.

* `random` sampling (the default) decides at purchases, in each user partition's offset order, with
  a seeded coin: the same input chooses the same users whatever the batching or the clock;
* the call-rate limit delays labeler calls, it never decides who is labeled;
* `du` sampling: each partition's DU quantile window sees only that partition's users (still
  timing-dependent through Ψ̂, see docs/operations.md, "Reproducibility");
* end to end: the same events replayed into two fresh deployments (fake LLM in keyword mode)
  choose the same prototypes and end with the same personas (the final refit, streams.refit).
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import numpy as np
import pytest

from core.incremental import UserState, user_purchase
from streams import labeling
from streams.config import StreamConfig
from streams.labeling import LabelPolicy, RateLimiter
from streams.records import partition_for
from tests.streams.test_labeling_sampling import _replay

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

    monkeypatch.setattr(labeling.asyncio, "sleep", fake_sleep)
    limiter = RateLimiter(600, clock=lambda: now[0])  # 10/s, burst 50
    asyncio.run(limiter.wait(55))  # all 55 granted: 50 at once, 5 more at 10/s
    assert 0.45 <= now[0] <= 0.6


# -- random sampling ---------------------------------------------------------------------------
def _purchase_stream(seed: int, n_users: int = 300, n_events: int = 2000) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    return [(f"u{rng.integers(n_users)}", f"i{rng.integers(60)}") for _ in range(n_events)]


def _random_decisions(config: StreamConfig, events: list[tuple[str, str]]) -> list[str]:
    """Replay purchases through `consider_purchase` as the user side does (per partition, in order)."""
    return _replay(config, events)[0]


def test_random_sampling_is_a_function_of_each_partitions_purchase_order():
    config = StreamConfig(labeler="openai", label_budget=0.1, label_min_purchases=3, du_quantile=0.5,
                          partitions=4, sampling="random")
    events = _purchase_stream(1)
    first = _random_decisions(config, events)
    by_part: dict[int, list] = {}
    for ev in events:
        by_part.setdefault(partition_for(ev[0], config.partitions), []).append(ev)
    regrouped = [e for p in sorted(by_part, reverse=True) for e in by_part[p]]  # another interleaving
    assert sorted(first) == sorted(_random_decisions(config, regrouped))
    users = len({u for u, _ in events})
    assert abs(len(first) - 0.1 * users) <= config.partitions  # the budget is spent, not exceeded
    # the coin matters: users are asked only when their own coin is below the admit probability
    # (exactly: tests/streams/test_labeling_sampling.py), so the asked have low coins
    others = {u for u, _ in events} - set(first)
    assert np.mean([labeling.seeded_unit(u, 0) for u in first]) < 0.6 * np.mean(
        [labeling.seeded_unit(u, 0) for u in others])
    # a partition that sees another order of its own purchases may choose others (no hidden global state)
    shuffled = list(events)
    np.random.default_rng(5).shuffle(shuffled)
    assert set(_random_decisions(config, shuffled)) != set(first)


def test_seeded_unit_is_uniform_and_stable():
    values = np.array([labeling.seeded_unit(f"u{i}", 3) for i in range(4000)])
    assert values.min() >= 0.0 and values.max() < 1.0
    assert abs(values.mean() - 0.5) < 0.03 and abs((values < 0.2).mean() - 0.2) < 0.03
    assert labeling.seeded_unit("u1", 3) == labeling.seeded_unit("u1", 3) != labeling.seeded_unit("u1", 4)


def test_du_sampling_is_not_asked_at_purchases():
    config = StreamConfig(labeler="openai", label_budget=1.0, label_min_purchases=1, sampling="du", du_quantile=0.0)
    state = UserState(M)
    user_purchase(state, "i0", 1, "Item 0")
    assert LabelPolicy(config).consider_purchase("u", state, {"seen": 10, "requested": 0}) is None
    assert LabelPolicy(replace(config, sampling="random")).consider_purchase("u", state, {"seen": 10, "requested": 0})


# -- end to end: replay twice --------------------------------------------------------------------
def _deployment(broker, make_config, tmp_path, tag: str, shop, **overrides):
    from streams.topics import Topics, create_topics

    path = tmp_path / "personas.json"
    path.write_text(shop.personas.to_json())
    config = make_config(broker.bootstrap, tmp_path / f"data-{tag}", personas_path=path, worker_port=0,
                         labeler="openai", label_budget=0.2, label_min_purchases=2, du_quantile=0.5,
                         label_rate_per_min=0, eps=1e-6, hysteresis=0.0, sampling="random", **overrides)
    create_topics(config.kafka_bootstrap, Topics(config.topic_prefix).all(), config.partitions)
    return config


def _final_state(config, consume, n_users: int, timeout: float = 150.0):
    """(requests, prototypes, last persona-updates personas per user) once the stream has settled:
    every request answered, drained, and the final refit (streams.refit) applied to everyone."""
    from streams.topics import Topics
    from tests.streams.test_invariant import wait_drained, wait_settled

    names = Topics(config.topic_prefix)
    deadline = time.monotonic() + timeout
    seen = -1
    while True:  # drained, every request answered, and no new request since the last look
        wait_drained(config, n_users, timeout=max(10.0, deadline - time.monotonic()))
        requests = consume(config.kafka_bootstrap, names.label_requests, timeout=10)
        labels = consume(config.kafka_bootstrap, names.labels, timeout=10)
        if requests and len(labels) >= len(requests) and len(requests) == seen:
            break
        seen = len(requests)
        assert time.monotonic() < deadline, f"{len(requests)} requests, {len(labels)} labels"
        time.sleep(1.0)
    model, users = wait_settled(config, n_users, timeout=max(10.0, deadline - time.monotonic()))
    assert model is not None  # the final refit shipped
    updates = consume(config.kafka_bootstrap, names.persona_updates, timeout=20)
    # personas and scores; not the evidence, a snapshot of Ψ̂'s top items when the update was sent
    last = {u["user"]: tuple((p["idx"], round(p["score"], 6)) for p in u["personas"])
            for u in updates if isinstance(u, dict) and "user" in u}
    prototypes = {u: tuple(s.label_personas) for u, s in users.items() if s.label is not None}
    # what the refits read (streams.refit.prototype_labels) is exactly the labels in the user rows
    from streams.tables import read_table

    assert {u: tuple(p) for u, p in read_table(config.kafka_bootstrap, config.app_id, "prototypes").items()} \
        == prototypes
    return sorted((r["user"], str(r["history"])) for r in requests), prototypes, last


@pytest.mark.broker
def test_replaying_the_same_events_into_two_fresh_deployments_gives_the_same_personas(
        broker, make_config, worker_factory, consume, fake_openai, tmp_path):
    from core.data import iter_events
    from core.synthetic import make_shop
    from streams.cli import publish_events
    from streams.topics import Topics

    shop = make_shop(n_users=100, n_items=50, n_personas=6, seed=11, mean_purchases=6)
    events = list(iter_events(shop.frame))
    env = {"OPENAI_BASE_URL": fake_openai.base_url, "OPENAI_API_KEY": "test", "GPLR_LLM_TIMEOUT_S": "5",
           "GPLR_LLM_MAX_RETRIES": "0"}
    configs = [_deployment(broker, make_config, tmp_path, tag, shop) for tag in ("a", "b")]
    workers = [worker_factory(c, **env) for c in configs]  # side by side: two fresh deployments
    for worker in workers:
        worker.wait_ready(90)
    for config in configs:  # the project's publisher: keyed by user, murmur2 (each user on its own partition)
        publish_events(config.kafka_bootstrap, Topics(config.topic_prefix).purchases, events)
    placed = consume(configs[0].kafka_bootstrap, Topics(configs[0].topic_prefix).purchases, raw=True)
    assert all(m.partition() == partition_for(m.key().decode(), configs[0].partitions) for m in placed)
    n_users = shop.frame["user_id"].nunique()
    (req_a, proto_a, last_a), (req_b, proto_b, last_b) = (_final_state(c, consume, n_users) for c in configs)
    assert len(req_a) >= 5 and len(proto_a) >= 5  # labeling happened
    assert req_a == req_b  # the same users asked, with the same histories ...
    assert proto_a == proto_b  # ... hence the same prototypes and labels
    assert set(last_a) == set(last_b) and len(last_a) == n_users
    differ = sorted(u for u in last_a if last_a[u] != last_b[u])
    assert not differ, f"{len(differ)} users end with other personas, e.g. {differ[:3]}"


# -- the refit: a function of its input, trained only on applied labels ---------------------------
def test_prototype_labels_keep_only_known_persona_indices():
    from streams.refit import prototype_labels

    rows = {"a": [0, 2], "b": [7], "c": "x", "d": [1, "2", None, -1, 2.0], "e": (3,), 5: [1]}
    assert prototype_labels(rows, 4) == {"a": (0, 2), "d": (1,), "e": (3,), "5": (1,)}


def test_refit_ignores_read_order_and_rows_without_an_applied_label():
    from core.data import iter_events
    from core.decoder import DEFAULT_RULE
    from core.synthetic import make_shop
    from streams.refit import applied_labels, fit_stream_model

    shop = make_shop(n_users=60, n_items=40, n_personas=5, seed=2, mean_purchases=5)
    raw = [e.to_json() for e in iter_events(shop.frame)]
    rows = {}
    for i, (user, personas) in enumerate(sorted(shop.user_truth.items())[:24]):
        state = UserState(5)
        state.label_personas = tuple(personas)
        if i % 4:  # a labeled row; every fourth only names personas (no label applied): ignored
            state.label = np.ones(5)
        rows[user] = state
    prototypes = applied_labels(rows, 5)
    assert len(prototypes) == 18 and all(rows[u].label is not None for u in prototypes)
    first = fit_stream_model(raw, prototypes, 5, DEFAULT_RULE, 3)
    shuffled = list(raw)
    np.random.default_rng(0).shuffle(shuffled)
    assert fit_stream_model(shuffled + raw[:50], dict(reversed(list(prototypes.items()))), 5, DEFAULT_RULE, 3) == first
    fewer = dict(list(prototypes.items())[:12])
    assert fit_stream_model(raw, fewer, 5, DEFAULT_RULE, 3) != first  # the labels do matter


def test_sampling_setting_is_read_and_checked():
    from streams.config import ConfigError

    assert StreamConfig.from_env({}).sampling == "random"
    assert StreamConfig.from_env({"GPLR_SAMPLING": "DU"}).sampling == "du"
    with pytest.raises(ConfigError, match="GPLR_SAMPLING"):
        StreamConfig.from_env({"GPLR_SAMPLING": "clock"}).validate()
    assert StreamConfig(sampling="du").as_env()["GPLR_SAMPLING"] == "du"
