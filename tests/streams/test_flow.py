"""streams.flow: the purge of consumed internal records (through the real embedded broker), and
the producer every command shares (murmur2 by key)."""
from __future__ import annotations

import json
from collections import Counter

import pytest
from confluent_kafka import Consumer, TopicPartition

from core.events import PurchaseEvent
from streams.broker import free_port
from streams.flow import purge_consumed
from streams.records import partition_for
from streams.topic_io import publish_events, publish_records, read_topic
from streams.topics import create_topics


def _committed_group(bootstrap: str, topic: str, group: str, offsets: dict[int, int]) -> None:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    consumer.commit(offsets=[TopicPartition(topic, p, o) for p, o in offsets.items()], asynchronous=False)
    consumer.close()


def _low_high(bootstrap: str, topic: str, partition: int) -> tuple[int, int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"wm{free_port()}"})
    try:
        return consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
    finally:
        consumer.close()


def test_purge_deletes_only_below_the_groups_committed_offsets(broker) -> None:
    internal, public = f"flow-int{free_port()}", f"flow-pub{free_port()}"
    create_topics(broker.bootstrap, [internal, public], 2)
    keys = [f"u{i}" for i in range(40)]
    for topic in (internal, public):
        publish_records(broker.bootstrap, topic, ((k, json.dumps({"k": k}).encode()) for k in keys))
    highs = {p: _low_high(broker.bootstrap, internal, p)[1] for p in (0, 1)}
    assert sum(highs.values()) == 40 and min(highs.values()) >= 5
    group = f"g{free_port()}"
    _committed_group(broker.bootstrap, internal, group, {0: 3, 1: highs[1]})
    _committed_group(broker.bootstrap, public, group, {0: 3})
    assert purge_consumed(broker.bootstrap, group, [internal]) == 2
    assert _low_high(broker.bootstrap, internal, 0) == (3, highs[0])  # the uncommitted rest is kept
    assert _low_high(broker.bootstrap, internal, 1) == (highs[1], highs[1])
    assert _low_high(broker.bootstrap, public, 0)[0] == 0  # a topic not named is never touched
    assert len(read_topic(broker.bootstrap, internal)) == highs[0] - 3
    assert purge_consumed(broker.bootstrap, f"nobody{free_port()}", [internal]) == 0


def test_publish_records_and_events_partition_by_murmur2_of_the_key(broker) -> None:
    topic = f"flow-keys{free_port()}"
    create_topics(broker.bootstrap, [topic], 4)
    users = [f"user-{i}" for i in range(60)]
    publish_events(broker.bootstrap, topic, [PurchaseEvent(f"e{u}", u, "item", "an item", 1, 1.0, 0.0) for u in users])
    publish_records(broker.bootstrap, topic, ((u, b"{}") for u in users))
    expected = Counter(partition_for(u, 4) for u in users)
    assert len(expected) == 4  # the check below can tell partitioners apart
    assert {p: _low_high(broker.bootstrap, topic, p)[1] for p in range(4)} == {p: 2 * n for p, n in expected.items()}


@pytest.mark.parametrize("bad", [-1, 0])
def test_purge_ignores_partitions_without_a_positive_commit(broker, bad: int) -> None:
    topic = f"flow-none{free_port()}"
    create_topics(broker.bootstrap, [topic], 1)
    publish_records(broker.bootstrap, topic, [("k", b"v")] * 3)
    group = f"g{free_port()}"
    if bad == 0:
        _committed_group(broker.bootstrap, topic, group, {0: 0})
    assert purge_consumed(broker.bootstrap, group, [topic]) == 0
    assert _low_high(broker.bootstrap, topic, 0) == (0, 3)
