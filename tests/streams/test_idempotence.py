"""Idempotence: duplicated event ids change nothing, a repeat purchase adds a count and not an
edge, and replaying messages after a crash (same offsets, outputs partly lost) converges to the
same state. The agent bodies (`StreamLogic`) run first over in-memory tables with a simulated
partitioned log (fast, exact), then once through the real broker."""
from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from core.affinity import exact_affinity, prototype_matrix
from core.data import iter_events
from core.events import PurchaseEvent
from core.graph import BipartiteGraph
from core.incremental import Membership, psi_raw, threshold
from core.personas import Persona, PersonaSet
from core.synthetic import make_shop
from streams.agents import Out, StreamLogic
from streams.config import StreamConfig
from streams.labeling import LabelPolicy
from streams.records import ItemOp, UserOp, decode_values, encode_label, encode_memberships, label_record, partition_for
from streams.tables import StateTable, Tables, changelog_entry, changelog_topic, decode_state
from streams.topics import Topics, create_topics

M = 5


def _logic(eps: float = 0.05, partitions: int = 3) -> StreamLogic:
    config = StreamConfig(eps=eps, partitions=partitions, labeler="none", label_budget=0.0, label_sources=("t",))
    personas = PersonaSet(Persona(f"p{i}", "") for i in range(M))
    tables = Tables(users=StateTable({}), items=StateTable({}), stats=StateTable({}), labels={})
    return StreamLogic(config, personas, tables, LabelPolicy(config))


def _roundtrip(value: Any) -> Any:
    """What Kafka does to a record: serialise and parse again."""
    if isinstance(value, (UserOp, ItemOp)):
        return type(value).from_data(json.loads(value.dumps()))
    return json.loads(json.dumps(value))


class Log:
    """Partitioned topics in memory: outputs get offsets; consumers read per partition in order.

    `crash()` models a kill -9 of the owner of one user-ops/item-ops partition: its position goes
    back a few messages (they are processed again, with their original offsets), and about half
    of the outputs those messages produced the first time and nobody read yet are lost.
    """

    def __init__(self, logic: StreamLogic, rng: np.random.Generator) -> None:
        self.logic, self.rng = logic, rng
        self.logs: dict[tuple[str, int], list[Any]] = defaultdict(list)
        self.pos: dict[tuple[str, int], int] = defaultdict(int)
        self.read: dict[tuple[str, int], int] = defaultdict(int)  # furthest position ever read
        self.other: dict[str, list[Any]] = defaultdict(list)
        self.produced: dict[tuple[tuple[str, int], int], list[tuple[tuple[str, int], int]]] = {}

    def append(self, outs, source=None) -> None:
        for out in outs:
            if out.topic in ("user_ops", "item_ops"):
                dest = (out.topic, out.partition)
                self.logs[dest].append(_roundtrip(out.value))
                if source is not None:
                    self.produced.setdefault(source, []).append((dest, len(self.logs[dest]) - 1))
            else:
                self.other[out.topic].append(_roundtrip(out.value))

    def step(self) -> bool:
        ready = [tp for tp, log in self.logs.items() if self.pos[tp] < len(log)]
        if not ready:
            return False
        tp = ready[int(self.rng.integers(len(ready)))]
        offset = self.pos[tp]
        self.pos[tp] += 1
        self.read[tp] = max(self.read[tp], self.pos[tp])
        msg = self.logs[tp][offset]
        if msg is None:  # lost in a crash
            return True
        if tp[0] == "user_ops":
            outs = self.logic.on_user_ops([(msg, offset)], tp[1])
        else:
            outs = self.logic.on_item_ops([(msg, offset)])
        self.append(outs, source=(tp, offset))
        return True

    def crash(self) -> None:
        tps = [tp for tp in self.logs if self.pos[tp] > 0]
        tp = tps[int(self.rng.integers(len(tps)))]
        start = max(0, self.pos[tp] - int(self.rng.integers(1, 6)))
        for offset in range(start, self.pos[tp]):
            for dest, idx in self.produced.pop((tp, offset), []):
                if idx >= self.read[dest] and self.rng.random() < 0.5:  # never read: may be lost
                    self.logs[dest][idx] = None
        self.pos[tp] = start

    def drain(self, crashes: float = 0.0) -> None:
        while self.step():
            if crashes and self.rng.random() < crashes:
                self.crash()


def _purchase(logic: StreamLogic, event: PurchaseEvent):
    outs = logic.on_purchase_raw(event.user_id.encode(), event.to_json())
    assert [o.topic for o in outs] == ["user_ops"]
    return outs


def _exact(frame, labels: dict[str, list[int]]):
    graph = BipartiteGraph.from_frame(frame)
    row = {str(u): i for i, u in enumerate(graph.user_ids)}
    phi = prototype_matrix(graph.n_users, {row[u]: p for u, p in labels.items() if u in row}, M)
    return graph, exact_affinity(graph, phi, hops=1)


def _check(logic: StreamLogic, frame, labels) -> None:
    graph, exact = _exact(frame, labels)
    users = logic.tables.users.table
    streamed = np.vstack([psi_raw(logic.tables.users.get(str(u))) for u in graph.user_ids])
    assert np.abs(streamed - exact).max() < threshold(logic.config.eps) + 1e-9
    assert exact.max() > 0.05
    for u, deg in zip(graph.user_ids, graph.user_degree):
        state = logic.tables.users.get(str(u))
        assert state.degree == deg
    counts = frame.groupby("user_id").size().to_dict()
    assert {u: sum(it.count for it in logic.tables.users.get(u).items.values()) for u in map(str, users)} == counts
    for item, _raw in logic.tables.items.table.items():
        assert logic.tables.items.get(item).residual < threshold(logic.config.eps)


@pytest.fixture(scope="module")
def shop():
    return make_shop(n_users=80, n_items=40, n_personas=M, seed=11, mean_purchases=6)


def _labels(shop, seed=0, share=0.2) -> dict[str, list[int]]:
    rng = np.random.default_rng(seed)
    users = sorted(shop.user_truth)
    pick = rng.choice(len(users), int(share * len(users)), replace=False)
    return {users[i]: list(shop.user_truth[users[i]]) for i in pick if shop.user_truth[users[i]]}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_duplicates_repeats_and_crash_replays_converge_to_exact(shop, seed):
    rng = np.random.default_rng(seed)
    logic = _logic()
    log = Log(logic, rng)
    events = list(iter_events(shop.frame))
    labels = _labels(shop, seed)
    dupes = [events[i] for i in rng.choice(len(events), len(events) // 4)]  # producer re-sends
    stream = events + dupes
    order = rng.permutation(len(stream))
    label_at = set(rng.choice(len(stream), len(labels), replace=False).tolist())
    pending = list(labels.items())
    for n, i in enumerate(order):
        log.append(_purchase(logic, stream[i]))
        if n in label_at and pending:
            user, personas = pending.pop()
            log.append([Out("user_ops", user, encode_label(user, personas, [], "t"),
                            partition_for(user, logic.config.partitions))])
        for _ in range(int(rng.integers(0, 4))):
            log.step()
            if rng.random() < 0.02:
                log.crash()
    log.drain(crashes=0.01)
    _check(logic, shop.frame, labels)


def test_duplicate_event_id_changes_nothing():
    logic = _logic()
    ev = PurchaseEvent("e1", "u", "mug", "Mug", 2, 3.0, 0.0)
    op = _purchase(logic, ev)[0].value
    assert [o.topic for o in logic.on_user_ops([(op, 0)], 0)] == ["item_ops"]
    before = logic.tables.users.table["u"]
    assert logic.on_user_ops([(op, 7)], 0) == []  # same event id at another offset: a duplicate
    assert logic.tables.users.table["u"] == before
    replay = logic.on_user_ops([(op, 0)], 0)  # same offset after a crash: re-sent, not re-counted
    assert [o.topic for o in replay] == ["item_ops"]
    assert logic.tables.users.get("u").items["mug"].count == 1


def test_repeat_purchase_adds_count_not_edge():
    logic = _logic()
    for off, eid in enumerate(["e1", "e2", "e3"]):
        event = PurchaseEvent(eid, "u", "mug", "Mug", 1, 3.0, 0.0)
        outs = logic.on_user_ops([(_purchase(logic, event)[0].value, off)], 0)
        assert [o.topic for o in outs] == (["item_ops"] if off == 0 else [])
    state = logic.tables.users.get("u")
    assert state.items["mug"].count == 3 and state.items["mug"].quantity == 3 and len(state.items) == 1


def test_item_replay_retells_every_buyer():
    logic = _logic(eps=0.01)
    ops = [encode_memberships([(Membership(u, "mug", v, None if lab is None else np.array(lab)), 0.0)]) for u, v, lab in
           [("p", 1, [1.0, 0, 0, 0, 0]), ("x", 0, None), ("y", 0, None)]]
    for off, op in enumerate(ops):
        logic.on_item_ops([(op, off)])
    state = logic.tables.items.get("mug")
    replay = logic.on_item_ops([(ops[1], 1)])
    pushes = [p for o in replay for p in decode_values(o.value)]
    assert {u for p in pushes for u in p[3]} == {"p", "x", "y"} and all(p[1] == state.seq for p in pushes)
    assert logic.tables.items.get("mug").s.tolist() == state.s.tolist()


def test_a_batch_retried_one_message_at_a_time_counts_metrics_once():
    """A batch with a record that raises is applied again message by message (`guarded`): the
    records applied count once in the metrics, the bad one once as a dead letter."""
    from types import SimpleNamespace

    from streams import metrics
    from streams.agents import guarded

    logic = _logic()
    users = [u for u in (f"u{i}" for i in range(30)) if partition_for(u, 3) == 0][:2]
    ops = [_purchase(logic, PurchaseEvent(f"e{u}", u, "mug", "Mug", 1, 1.0, 0.0))[0].value for u in users]
    bad = UserOp(kind="value", users=["x"], pushes=[{"item": "mug", "seq": "not-a-number", "value": [], "users": []}])
    batch = [ops[0], bad, ops[1]]
    class Event(SimpleNamespace):  # (weak-referenceable, as Faust's events are)
        pass

    events = [Event(value=op, message=SimpleNamespace(offset=k, value=b"{}", key=b"k", partition=0))
              for k, op in enumerate(batch)]

    def sample(name: str, labels: dict | None = None) -> float:
        return metrics.REGISTRY.get_sample_value(name, labels or {}) or 0.0

    edges, dead = sample("gplr_edges_total"), sample("gplr_dlq_total", {"reason": "internal_error"})
    outs = guarded(logic, events, 0, logic.on_user_ops, "user-ops")
    assert sorted(o.topic for o in outs) == ["dlq", "item_ops", "item_ops"]
    assert sample("gplr_edges_total") - edges == 2
    assert sample("gplr_dlq_total", {"reason": "internal_error"}) - dead == 1
    assert all(logic.tables.users.get(u).events == 1 for u in users)


def test_invalid_purchase_goes_to_dlq_with_reason():
    logic = _logic()
    outs = logic.on_purchase_raw(b"k", b'{"event_id": 1')
    assert [o.topic for o in outs] == ["dlq"] and outs[0].value["reason"] == "malformed_json"
    assert outs[0].value["payload"] == '{"event_id": 1'


# -- through the broker ------------------------------------------------------------------------
@pytest.mark.broker
def test_duplicates_and_repeats_through_the_broker(stream_config, worker_factory, produce, shop, tmp_path):
    from tests.streams.test_invariant import wait_drained

    path = tmp_path / "personas.json"
    path.write_text(shop.personas.to_json())
    config = replace(stream_config, personas_path=path, eps=0.1, worker_port=0, label_sources=("t",))
    names = Topics(config.topic_prefix)
    create_topics(config.kafka_bootstrap, names.all(), config.partitions)
    worker_factory(config).wait_ready(90)
    events = list(iter_events(shop.frame))
    labels = _labels(shop, 3)
    produce(config.kafka_bootstrap, names.labels, [label_record(u, p, [], "t") for u, p in labels.items()],
            key=lambda r: r["user"])
    produce(config.kafka_bootstrap, names.purchases, events + events[::3] + events[:20])
    graph = BipartiteGraph.from_frame(shop.frame)
    users = wait_drained(config, graph.n_users)
    _, exact = _exact(shop.frame, labels)
    streamed = np.vstack([psi_raw(users[str(u)]) for u in graph.user_ids])
    assert np.abs(streamed - exact).max() < threshold(config.eps) + 1e-9
    counts = {u: sum(it.count for it in s.items.values()) for u, s in users.items()}
    assert counts == shop.frame.groupby("user_id").size().to_dict()
    assert [users[str(u)].degree for u in graph.user_ids] == graph.user_degree.tolist()
    # the worker's changelog records are what `changelog_entry` builds (a backfill writes these)
    last = _last_changelog_records(config, "users")
    assert set(last) == set(users)
    for user, (partition, key, value) in last.items():
        assert partition == partition_for(user, config.partitions)
        assert changelog_entry(user, decode_state(value)) == (key, value)


def _last_changelog_records(config, table: str) -> dict[str, tuple[int, bytes, bytes]]:
    """Per key, the (partition, raw key, raw value) of its last record in `table`'s changelog."""
    from confluent_kafka import Consumer, TopicPartition

    topic = changelog_topic(config.app_id, table)
    consumer = Consumer({"bootstrap.servers": config.kafka_bootstrap, "group.id": "raw-changelog",
                         "enable.auto.commit": False, "log_level": 3})
    try:
        parts = [TopicPartition(topic, p, 0) for p in range(config.partitions)]
        ends = {p.partition: consumer.get_watermark_offsets(p, timeout=10)[1] for p in parts}
        todo = {p for p, end in ends.items() if end > 0}
        consumer.assign(parts)
        out: dict[str, tuple[int, bytes, bytes]] = {}
        deadline = time.monotonic() + 60
        while todo and time.monotonic() < deadline:
            for msg in consumer.consume(1000, 5.0):
                if msg.error():
                    continue
                out[json.loads(msg.key())] = (msg.partition(), msg.key(), msg.value())
                if msg.offset() + 1 >= ends[msg.partition()]:
                    todo.discard(msg.partition())
        assert not todo, f"{topic}: partitions {sorted(todo)} not read"
        return out
    finally:
        consumer.close()
