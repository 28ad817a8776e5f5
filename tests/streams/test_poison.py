"""Issue 9, failure 1: poison records never take valid ones down.

Through the real broker: every poison kind of tests/core/poison.py (the ten the attack found,
plus our own) is published on `purchases` between valid events, hostile records go to `labels`,
and forged internal messages that crash a handler go to `user-ops` / `item-ops`. Every valid
event must end up in the users table (changelog), every poison record in the DLQ with its
reason, and /metrics must count each record once.
"""
from __future__ import annotations

import base64
import hashlib
import json
import time
from collections import Counter

import pytest

from core.events import MAX_PAYLOAD_BYTES
from streams.agents import ITEM_OPS, USER_OPS
from streams.broker import free_port
from streams.records import DLQ_PAYLOAD_BYTES, label_record, partition_for
from streams.tables import read_table
from streams.topics import Topics, create_topics
from tests.core.poison import POISON, valid
from tests.streams.test_invariant import group_lag
from tests.streams.test_reliability import _sample, _scrape

pytestmark = pytest.mark.broker

#: Hostile `labels` records: (kind, bytes, reason).
LABEL_POISON: list[tuple[str, bytes, str]] = [
    ("invalid_bytes", b"\xff\x00\xfe{", "malformed_json"),
    ("index_1e400", b'{"user": "v1", "personas": [1e400], "scores": [], "labelled_by": "test"}', "wrong_type"),
    ("index_huge_int", b'{"user": "v1", "personas": [' + b"9" * 500 + b'], "labelled_by": "test"}', "wrong_type"),
    ("index_out_of_range", b'{"user": "v1", "personas": [99], "labelled_by": "test"}', "out_of_range"),
    ("scores_not_a_list", b'{"user": "v1", "personas": [1], "scores": "high", "labelled_by": "test"}', "wrong_type"),
    ("score_nan", b'{"user": "v1", "personas": [1], "scores": [NaN], "labelled_by": "test"}', "out_of_range"),
    ("user_surrogate", b'{"user": "\\ud800", "personas": [1], "labelled_by": "test"}', "invalid_text"),
    ("user_object", b'{"user": {"a": 1}, "personas": [1], "labelled_by": "test"}', "wrong_type"),
    ("deep", b'{"user": "v1", "personas": ' + b"[" * 5000 + b"]" * 5000 + b"}", "too_deep"),
    ("forged_labeler", json.dumps(label_record("v2", [2], [1.0], "mallory")).encode(), "unknown_labeler"),
]


def _forged_ops(prefix: str, partitions: int) -> list[tuple[str, int, bytes, str]]:
    """Well-formed JSON on the internal topics that makes a handler raise: (topic, partition,
    value, source)."""
    user_op = {"kind": "purchase", "users": ["crash-u"],
               "events": [["crash-e", "crash-u", "crash-i", "n", "not-a-number", 1.0, 0.0]]}
    item_op = {"members": [["crash-u", "crash-i", "not-a-version", None, 0.0]]}
    return [(f"{prefix}{USER_OPS}", partition_for("crash-u", partitions), json.dumps(user_op).encode(), USER_OPS),
            (f"{prefix}{ITEM_OPS}", partition_for("crash-i", partitions), json.dumps(item_op).encode(), ITEM_OPS)]


def test_poison_between_valid_events_costs_only_the_poison(
        broker, tmp_path, make_config, produce, consume, worker_factory) -> None:
    from confluent_kafka import Producer

    config = make_config(broker.bootstrap, tmp_path / "data", metrics_port=free_port(), label_sources=("test",),
                         hysteresis=0.0, beta=0.0, eps=0.05, top_k=3)
    topics = Topics(config.topic_prefix)
    create_topics(config.kafka_bootstrap, topics.all(), config.partitions)
    worker_factory(config).wait_ready()
    produce(config.kafka_bootstrap, topics.labels, [label_record("proto", [1], [1.0], "test")])
    # valid events, one new user each, around every poison record, all keyed alike (one batch)
    records: list[bytes] = [json.dumps(valid("v0", "proto", "it0")).encode()]
    valid_users: dict[str, str] = {}
    for n, (_kind, payload, _reason) in enumerate(POISON):
        records.append(payload)
        user, item = f"v{n + 1}", f"it{n % 4}"
        valid_users[user] = item
        records.append(json.dumps(valid(f"ok{n}", user, item)).encode())
    produce(config.kafka_bootstrap, topics.purchases, records, key=lambda r: b"k")
    label_bad = [b for _, b, _ in LABEL_POISON]
    produce(config.kafka_bootstrap, topics.labels, label_bad, key=lambda r: b"v1")
    producer = Producer({"bootstrap.servers": config.kafka_bootstrap, "log_level": 3})
    forged = _forged_ops(config.topic_prefix, config.partitions)
    for topic, part, value, _source in forged:
        producer.produce(topic, value=value, key=b"crash", partition=part)
    producer.flush(10)
    # a valid purchase after everything: the stream is still alive
    produce(config.kafka_bootstrap, topics.purchases, [json.dumps(valid("last", "v-last", "it1")).encode()])
    valid_users["v-last"] = "it1"

    expected = Counter(r for _, _, r in POISON) + Counter(r for _, _, r in LABEL_POISON)
    expected["internal_error"] += len(forged)
    n_dead = sum(expected.values())
    dead = consume(config.kafka_bootstrap, topics.purchases_dlq, until=lambda r: len(r) >= n_dead, timeout=90)
    assert Counter(d["reason"] for d in dead) == expected
    by_source = Counter(d["source"] for d in dead)
    assert by_source == {"purchases": len(POISON), "labels": len(LABEL_POISON), USER_OPS: 1, ITEM_OPS: 1}
    poison_bytes = {hashlib.sha256(p).hexdigest(): p for _, p, _ in POISON + LABEL_POISON}
    for d in dead:
        if d["reason"] == "internal_error":
            assert "at " in d["detail"] and ("ValueError" in d["detail"] or "TypeError" in d["detail"])
            continue
        original = poison_bytes[d["sha256"]]
        kept = base64.b64decode(d["payload"]) if d["encoding"] == "base64" else d["payload"].encode()
        assert d["size"] == len(original)
        assert kept == original[:DLQ_PAYLOAD_BYTES] and d["truncated"] == (len(original) > DLQ_PAYLOAD_BYTES)
    assert any(d["truncated"] and d["size"] > MAX_PAYLOAD_BYTES for d in dead)  # the 1 MB record

    # every valid event was applied: the users table (changelog) holds each with its item
    deadline = time.monotonic() + 60
    while True:
        users = read_table(config.kafka_bootstrap, config.app_id, "users")
        if all(u in users for u in valid_users) or time.monotonic() > deadline:
            break
        time.sleep(1)
    for user, item in valid_users.items():
        assert user in users, user
        assert users[user].events == 1 and list(users[user].items) == [item], user
    assert "crash-u" not in users and "{'a': 1}" not in users
    assert users["v2"].label is None and users["v1"].label is None  # hostile labels changed nothing
    assert users["proto"].label_personas == (1,)
    # metrics: each purchases record counted once, dead letters by reason as on the topic
    deadline = time.monotonic() + 30
    while group_lag(config, [topics.purchases, topics.labels]) and time.monotonic() < deadline:
        time.sleep(0.5)
    body = _scrape(config.metrics_port)
    assert _sample(body, "gplr_events_in_total") == len(records) + 1
    for reason, n in expected.items():
        assert _sample(body, "gplr_dlq_total", f'{{reason="{reason}"}}') == n, reason
