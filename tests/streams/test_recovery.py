"""Issue 9, failure 3: a worker that lost its disk rebuilds every table from the changelogs.

A worker runs half the stream and is killed; its state directory is deleted; a new worker with
the same app id (same consumer group, same changelog topics) must become ready, rebuild the
users/items/stats/label-counts tables from the changelogs, process the rest of the stream, and
end with exactly the tables of an uninterrupted run (compared row by row from the changelogs).
"""
from __future__ import annotations

import shutil
import time

import numpy as np
import pytest

from core.data import iter_events
from core.incremental import psi_raw, threshold
from streams.demo import LagWatcher
from streams.tables import read_table
from streams.topics import Topics, create_topics
from tests.kafka_fixtures import assert_changelogs_compacted
from tests.streams.test_reliability import _exact_psi, _label_records, _labels_for, _shop

pytestmark = pytest.mark.broker


def _drain(config, timeout: float = 120.0) -> None:
    watcher = LagWatcher(config)
    try:
        assert watcher.wait_drained(timeout=timeout, settle=3.0), f"lag stuck at {watcher.lag()}"
    finally:
        watcher.close()


def _tables(config) -> tuple[dict[str, tuple], dict[str, np.ndarray], dict[str, tuple]]:
    """From the changelogs: per user (purchase count, edges with counts, label), per user Ψ̂,
    and per item its buyers with their edge versions."""
    users = read_table(config.kafka_bootstrap, config.app_id, "users")
    items = read_table(config.kafka_bootstrap, config.app_id, "items")
    graph = {u: (s.events, tuple(sorted((i, it.count, it.quantity) for i, it in s.items.items())), s.label_personas)
             for u, s in users.items()}
    return graph, {u: psi_raw(s) for u, s in users.items()}, {i: tuple(sorted(s.buyers)) for i, s in items.items()}


def assert_same_state(config, reference, frame, labels) -> None:
    """Graph, labels and buyers identical to `reference`; Ψ̂ within θ of exact Ψ (its bound:
    pushes may happen at other moments, so Ψ̂ itself need not be bit-identical)."""
    graph, psi, items = _tables(config)
    ref_graph, _, ref_items = _tables(reference)
    assert graph == ref_graph
    assert items == ref_items
    exact_graph, exact = _exact_psi(frame, labels, len(next(iter(psi.values()))))
    streamed = np.vstack([psi[str(u)] for u in exact_graph.user_ids])
    assert np.abs(streamed - exact).max() <= threshold(config.eps) + 1e-9


# Was flaky under load: rows missing from the changelog although their input offsets were
# committed (Faust's pre-commit flush can return early; agents now wait for changelog acks), and
# records faust fetched and dropped at the end of recovery, which stalled the purchases or lost
# one (repaired by streams._compat.rewind_dropped_heads; docs/operations.md).
def test_empty_state_dir_rebuilds_from_changelogs(
        broker, tmp_path, make_config, produce, worker_factory) -> None:
    shop = _shop(n_users=80, seed=11)
    labels = _labels_for(shop)
    events = list(iter_events(shop.frame))
    half = len(events) // 2
    base = dict(labeler="none", hysteresis=0.0, beta=0.0, eps=0.05, top_k=3, partitions=2,
                label_budget=0.0, label_sources=("test",))

    def deploy(name: str):
        config = make_config(broker.bootstrap, tmp_path / name, **base)
        create_topics(config.kafka_bootstrap, Topics(config.topic_prefix).all(), config.partitions)
        produce(config.kafka_bootstrap, Topics(config.topic_prefix).labels, _label_records(labels))
        return config

    reference = deploy("reference")
    worker_factory(reference).wait_ready()
    assert_changelogs_compacted(reference.kafka_bootstrap, reference.app_id)  # as the worker declares them
    produce(reference.kafka_bootstrap, Topics(reference.topic_prefix).purchases, events)
    _drain(reference)

    config = deploy("lost-disk")
    topics = Topics(config.topic_prefix)
    worker = worker_factory(config).wait_ready()
    produce(config.kafka_bootstrap, topics.purchases, events[:half])
    _drain(config)
    worker.kill()
    shutil.rmtree(config.data_dir)  # the disk is gone; the changelogs in Kafka are not
    produce(config.kafka_bootstrap, topics.purchases, events[half:])
    start = time.monotonic()
    fresh = worker_factory(config).wait_ready(120)
    _drain(config)
    print(f"recovered and drained in {time.monotonic() - start:.1f}s")
    log = fresh.log()
    assert log.count("Ready") == 1 and fresh.is_running()
    assert_same_state(config, reference, shop.frame, labels)


@pytest.mark.slow  # ~70 s, and not reliable yet: 1 of 3 runs counted purchases twice (see operations.md)
def test_replacement_at_another_path_takes_over_with_the_instance_id(
        broker, tmp_path, make_config, produce, worker_factory) -> None:
    """A new disk at a new path: with the dead worker's GPLR_INSTANCE_ID the replacement takes
    its slot and rebuilds from the changelogs (without it, noida-db never expels the dead member)."""
    import dataclasses

    from streams.app import group_instance_id

    shop = _shop(n_users=40, seed=12)
    events = list(iter_events(shop.frame))
    config = make_config(broker.bootstrap, tmp_path / "old-disk", labeler="none", partitions=2, label_budget=0.0)
    topics = Topics(config.topic_prefix)
    create_topics(config.kafka_bootstrap, topics.all(), config.partitions)
    worker = worker_factory(config).wait_ready()
    produce(config.kafka_bootstrap, topics.purchases, events[:150])
    _drain(config)
    worker.kill()
    replacement = dataclasses.replace(config, data_dir=tmp_path / "new-disk", instance_id=group_instance_id(config))
    produce(config.kafka_bootstrap, topics.purchases, events[150:])
    worker_factory(replacement).wait_ready(120)
    _drain(config)
    users = read_table(config.kafka_bootstrap, config.app_id, "users")
    assert {u: s.events for u, s in users.items()} == shop.frame.groupby("user_id").size().to_dict()
