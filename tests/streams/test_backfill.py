"""`gplr backfill`: a worker started on a backfilled deployment recovers the history's state from
the changelogs and continues with live purchases, and the invariant holds on history + live.

Through the real broker: backfill 70% of a synthetic shop (history also published to `purchases`,
the group's start committed at its end), start a worker, stream the other 30% plus a few history
events sent again (producer retries). The worker must count every event exactly once (no history
event re-consumed or re-counted), and every user's Ψ̂_raw must be within the relative bound of
exact Ψ_raw on the whole graph with the backfill's prototypes.
"""
from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.backfill import HistoryIndex, StateBuilder
from core.data import iter_events
from core.graph import BipartiteGraph
from core.incremental import psi_raw
from core.synthetic import make_shop
from streams.backfill import run_backfill
from streams.records import partition_for
from streams.tables import changelog_topic, read_table
from streams.topics import Topics
from tests.kafka_fixtures import assert_changelogs_compacted, consume
from tests.streams.test_invariant import _labels_for, assert_within_bound, wait_drained
from tests.streams.test_reliability import _exact_psi

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def shop():
    return make_shop(n_users=120, n_items=60, n_personas=6, seed=7, mean_purchases=6)


def test_rows_hold_exact_state(shop) -> None:
    """Without Kafka: the rows' Ψ̂_raw is exact Ψ_raw (core.affinity), counts match the history,
    every edge is answered, and a repeated event id is counted once."""
    frame = pd.concat([shop.frame, shop.frame.iloc[:5]])  # five producer retries in the file
    labels = _labels_for(shop.user_truth, 0.2, 0)
    index = HistoryIndex.from_frame(frame)
    assert index.duplicates == 5 and index.events == len(shop.frame)
    code = {u: i for i, u in enumerate(index.user_ids)}
    builder = StateBuilder(index, {code[u]: p for u, p in labels.items()}, len(shop.personas))
    rows = {str(index.user_ids[u]): builder.user_row(u) for u in range(index.n_users)}
    graph, exact = _exact_psi(shop.frame, labels, len(shop.personas))
    streamed = np.vstack([psi_raw(rows[str(u)]) for u in graph.user_ids])
    np.testing.assert_allclose(streamed, exact, atol=1e-12)
    assert exact.max() > 0.05
    counts = shop.frame.groupby("user_id").size().to_dict()
    assert {u: s.events for u, s in rows.items()} == counts
    assert all(it.seq >= 0 for s in rows.values() for it in s.items.values())
    items = dict(builder.item_rows())
    assert sum(len(s.buyers) for s in items.values()) == graph.n_edges
    assert all(s.relative_residual == 0 for s in items.values())
    for state in items.values():  # S[v] is the sum of the labels its buyers carry, versions match
        labeled = [lab for _v, lab in state.buyers.values() if lab is not None]
        np.testing.assert_allclose(sum(labeled, np.zeros(len(shop.personas))), state.s, atol=1e-12)
        assert all((v == 1) == (u in labels) for u, (v, _lab) in state.buyers.items())
    assert sum(len([1 for v, _ in s.buyers.values() if v]) for s in items.values()) == sum(
        len(rows[u].items) for u in labels)


@pytest.mark.broker
def test_backfill_then_live(stream_config, worker_factory, produce, shop, tmp_path) -> None:
    path = tmp_path / "personas.json"
    path.write_text(shop.personas.to_json())
    config = replace(stream_config, personas_path=path, worker_port=0, label_sources=("test",), eps=0.1,
                     partitions=2, decoder="graph")
    events = list(iter_events(shop.frame))
    cut = int(0.7 * len(events))
    history = shop.frame.sort_values("ts", kind="stable").iloc[:cut]
    labels = {u: p for u, p in _labels_for(shop.user_truth, 0.15, 0).items() if u in set(history["user_id"])}
    report = run_backfill(config, history, labels, publish_history=True)
    assert report.history_events == cut and report.published_history == cut
    assert sum(report.start_offsets.values()) == cut

    # rows sit in the partition the worker's agents own them in
    names = Topics(config.topic_prefix)
    raw = consume(config.kafka_bootstrap, changelog_topic(config.app_id, "users"), raw=True)
    assert raw and all(m.partition() == partition_for(m.key().decode().strip('"'), config.partitions) for m in raw)
    assert_changelogs_compacted(config.kafka_bootstrap, config.app_id)

    worker = worker_factory(config)
    worker.wait_ready(90)
    retries = events[:25]  # history events sent again live: producer duplicates
    produce(config.kafka_bootstrap, names.purchases, events[cut:] + retries)
    graph = BipartiteGraph.from_frame(shop.frame)
    users = wait_drained(config, graph.n_users, timeout=120)

    counts = {str(u): s.events for u, s in users.items()}
    assert counts == shop.frame.groupby("user_id").size().astype(int).to_dict()  # nothing counted twice
    assert {u: sum(it.count for it in s.items.values()) for u, s in users.items()} == counts
    _, exact = _exact_psi(shop.frame, labels, len(shop.personas))
    streamed = np.vstack([psi_raw(users[str(u)]) for u in graph.user_ids])
    assert_within_bound(streamed, exact, config.eps)
    assert exact.max() > 0.05
    live_users = {e.user_id for e in events[cut:]}
    updates = [r for r in consume(config.kafka_bootstrap, names.persona_updates) if isinstance(r, dict)]
    assert {r["user"] for r in updates if r["reason"] == "backfill"}  # the backfill's own updates
    assert {r["user"] for r in updates if r["reason"] == "propagated"} & live_users  # live ones after it
    labeled = read_table(config.kafka_bootstrap, config.app_id, "label-counts")
    assert sum(np.asarray(c).sum() for c in labeled.values()) == sum(len(p) for p in labels.values())
    # the refits' source of labels: one row per prototype, as in its user row
    protos = read_table(config.kafka_bootstrap, config.app_id, "prototypes")
    assert {u: tuple(p) for u, p in protos.items()} == {
        u: tuple(s.label_personas) for u, s in users.items() if s.label is not None}
    assert protos


def _gplr(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    full = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "streams.cli", "backfill", *args], capture_output=True,
                          text=True, env=full, timeout=120)


def test_cli_bad_input_one_line(tmp_path) -> None:
    """No broker, a missing file, a file without the needed columns: one line, non-zero exit."""
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    cases = [
        ((["--data", str(tmp_path / "nope.csv")]), {"KAFKA_BOOTSTRAP": "127.0.0.1:1"}, "no such file"),
        ((["--data", str(bad)]), {"KAFKA_BOOTSTRAP": "127.0.0.1:1"}, "missing column"),
        ((["--data", str(bad)]), {"KAFKA_BOOTSTRAP": ""}, "KAFKA_BOOTSTRAP is empty"),
    ]
    for argv, env, expected in cases:
        proc = _gplr(*argv, env=env)
        assert proc.returncode != 0
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert "Traceback" not in proc.stderr
        assert expected in lines[-1] and lines[-1].startswith("gplr backfill:"), proc.stderr


@pytest.mark.broker
def test_backfill_refuses_a_running_deployment(stream_config, shop, tmp_path) -> None:
    path = tmp_path / "personas.json"
    path.write_text(shop.personas.to_json())
    config = replace(stream_config, personas_path=path, decoder="graph")
    history = shop.frame.iloc[:200]
    run_backfill(config, history, {})
    from streams.backfill import BackfillError

    with pytest.raises(BackfillError, match="already holds rows"):
        run_backfill(config, history, {})


class _Capture:
    """A sink keeping what `write_rows` sends: (topic, key, value, partition)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, bytes | None, bytes, int]] = []

    def send(self, topic: str, key: bytes | None, value: bytes, partition: int) -> None:
        self.records.append((topic, key, value, partition))

    def flush(self) -> None:
        pass


def test_held_out_users_are_counted_as_the_worker_counts_them(shop, tmp_path) -> None:
    """With GPLR_LABEL_EXCLUDE, the stats rows carry `excluded` per partition (the worker's
    admit probability divides the budget by seen − excluded) and no held-out user is labeled."""
    from streams.backfill import write_rows
    from streams.tables import decode_state

    user_ids = sorted({str(u) for u in shop.frame["user_id"]})
    held_out = set(user_ids[::3])
    exclude = tmp_path / "held_out.txt"
    exclude.write_text("\n".join(sorted(held_out)))
    config = replay_config(shop, tmp_path, label_budget=0.2, label_exclude=exclude)
    sink = _Capture()
    write_rows(config, shop.frame, None, sink)
    users = {decode_key(k): decode_state(v) for t, k, v, _ in sink.records if t == changelog_topic("bf", "users")}
    stats = {decode_key(k): decode_state(v) for t, k, v, _ in sink.records if t == changelog_topic("bf", "stats")}
    for p in range(config.partitions):
        members = [u for u in users if partition_for(u, config.partitions) == p]
        assert stats[f"p{p}"]["seen"] == len(members)
        assert stats[f"p{p}"]["excluded"] == sum(u in held_out for u in members) > 0
    assert not any(users[u].label is not None for u in held_out)
    assert any(s.label is not None for s in users.values())


def test_fresh_budget_and_model_as_the_worker_would(shop, tmp_path) -> None:
    """No labels given: per user partition, budget × users (rounded half up) prototypes through
    the configured (replay) labeler, counted in the stats rows; the shipped persona model is the
    one a refit fits on the same purchases (`streams.refit.fit_stream_model`), at the milestone."""
    import math

    from streams.agents import REFIT_RULE
    from streams.backfill import write_rows
    from streams.refit import decode_model, fit_stream_model, milestone
    from streams.tables import decode_state

    config = replay_config(shop, tmp_path, label_budget=0.2, label_min_purchases=3)
    sink = _Capture()
    summary = write_rows(config, shop.frame, None, sink)
    users = {decode_key(k): decode_state(v) for t, k, v, _ in sink.records if t == changelog_topic("bf", "users")}
    stats = {decode_key(k): decode_state(v) for t, k, v, _ in sink.records if t == changelog_topic("bf", "stats")}
    per_part: dict[int, list[str]] = {}
    for user in users:
        per_part.setdefault(partition_for(user, 3), []).append(user)
    for p, members in per_part.items():
        eligible = sum(len(users[u].items) >= 3 for u in members)
        wanted = min(eligible, math.floor(0.2 * len(members) + 0.5))
        labeled = [u for u in members if users[u].label is not None]
        assert len(labeled) == wanted == stats[f"p{p}"]["requested"]
        assert stats[f"p{p}"]["seen"] == len(members)
        assert all(users[u].requested and users[u].label_personas == tuple(shop.user_truth[u]) for u in labeled)
    prototypes = {u: s.label_personas for u, s in users.items() if s.label is not None}
    assert summary["prototypes"] == len(prototypes)
    mentions = sum(len(p) for p in prototypes.values())
    (model_rec,) = [v for t, _k, v, p in sink.records if t == changelog_topic("bf", "persona-model") and p == 0]
    version, model = decode_model(model_rec)
    assert version == milestone(mentions) > 0
    refit = fit_stream_model([e.to_json() for e in iter_events(shop.frame)], prototypes, len(shop.personas),
                             REFIT_RULE, 3, config.personas() if config.zero_shot else None)
    assert config.zero_shot and model.zero_shot is not None  # GPLR_ZERO_SHOT's default, as the refit
    assert model.to_dict() == refit
    unlabeled = [s for s in users.values() if s.label is None]
    assert all(s.text_version == version and s.published for s in unlabeled)  # decided by the model


def replay_config(shop, tmp_path: Path, **settings):
    """A broker-less config whose replay labeler plays the shop's planted truth (app "bf", 3
    partitions, top 3), with `settings` on top."""
    from streams.config import StreamConfig

    personas = tmp_path / "personas.json"
    personas.write_text(shop.personas.to_json())
    truth = tmp_path / "truth.csv"
    pd.DataFrame({"CustomerID": list(shop.user_truth),
                  "personas": ["|".join(shop.personas[p].name for p in ps) for ps in shop.user_truth.values()]}
                 ).to_csv(truth, index=False)
    return StreamConfig(kafka_bootstrap="127.0.0.1:1", app_id="bf", personas_path=personas, labeler="replay",
                        replay_labels=truth, partitions=3, top_k=3, **settings)


def decode_key(key: bytes) -> str:
    import json

    return json.loads(key)


def test_worker_refuses_to_start_without_lz4(monkeypatch) -> None:
    """The backfill's changelog batches are lz4: a worker that could not read them must say so at
    start-up (one line), not crash in the middle of a recovery."""
    import aiokafka.codec

    from streams.app import require_lz4
    from streams.backfill import CHANGELOG_COMPRESSION
    from streams.config import ConfigError

    assert CHANGELOG_COMPRESSION == "lz4"
    require_lz4()  # installed with the project (aiokafka[lz4])
    monkeypatch.setattr(aiokafka.codec, "has_lz4", lambda: False)
    with pytest.raises(ConfigError, match="lz4"):
        require_lz4()
