"""Batched agents: several messages per call, one message per destination partition, one write
per touched row — and still exact within ε under duplicates, re-batching and crash replays.

The in-memory log of test_idempotence is driven with random batch sizes: a crash rewinds a
partition to a batch boundary or earlier (Faust acks a batch only after its body ran) and
loses part of what the rewound batches sent."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from core.data import iter_events
from core.events import PurchaseEvent
from core.incremental import ItemState, Membership, UserItem, UserState, psi_raw, told_value
from streams.agents import Out
from streams.records import (
    UserOp,
    decode_memberships,
    decode_purchases,
    decode_values,
    encode_label,
    encode_memberships,
    encode_purchases,
    encode_values,
    partition_for,
)
from streams.tables import StateTable, decode_state, encode_state, row_footprint
from tests.streams.test_idempotence import Log, _check, _labels, _logic, _roundtrip


class BatchLog(Log):
    """`Log` whose consumers take 1..max_batch messages at once, as `stream.take_events` does."""

    def __init__(self, logic, rng, max_batch: int = 8) -> None:
        super().__init__(logic, rng)
        self.max_batch = max_batch

    def step(self) -> bool:
        ready = [tp for tp, log in self.logs.items() if self.pos[tp] < len(log)]
        if not ready:
            return False
        tp = ready[int(self.rng.integers(len(ready)))]
        start = self.pos[tp]
        end = min(len(self.logs[tp]), start + int(self.rng.integers(1, self.max_batch + 1)))
        self.pos[tp] = end
        self.read[tp] = max(self.read[tp], end)
        batch = [(self.logs[tp][o], o) for o in range(start, end) if self.logs[tp][o] is not None]
        if batch:
            if tp[0] == "user_ops":
                outs = self.logic.on_user_ops(batch, tp[1])
            else:
                outs = self.logic.on_item_ops(batch)
            self.append(outs, source=(tp, start))  # lost only if a crash rewinds to <= start
        return True


def _purchases(logic, events) -> list[Out]:
    outs = logic.on_purchases_raw([(e.user_id.encode(), e.to_json()) for e in events])
    assert {o.topic for o in outs} <= {"user_ops"}
    return outs


@pytest.fixture(scope="module")
def shop():
    from core.synthetic import make_shop

    return make_shop(n_users=80, n_items=40, n_personas=5, seed=11, mean_purchases=6)


@pytest.mark.parametrize("seed", range(6))
def test_batched_duplicates_and_crash_replays_converge_to_exact(shop, seed):
    converge(shop, seed, BatchLog)


def converge(shop, seed: int, log_class: type[BatchLog]) -> None:
    """Stream the shop through `log_class` with duplicates, labels, random batches and crashes;
    the rows must end within ε of exact Ψ."""
    rng = np.random.default_rng(seed)
    logic = _logic()
    log = log_class(logic, rng)
    events = list(iter_events(shop.frame))
    labels = _labels(shop, seed)
    stream = events + [events[i] for i in rng.choice(len(events), len(events) // 4)]
    stream = [stream[i] for i in rng.permutation(len(stream))]
    pending = list(labels.items())
    i = 0
    while i < len(stream):
        n = int(rng.integers(1, 12))  # a purchases batch, duplicates within it included
        log.append(_purchases(logic, stream[i:i + n]))
        i += n
        if pending and rng.random() < 0.3:
            user, personas = pending.pop()
            log.append([Out("user_ops", user, encode_label(user, personas, [], "t"),
                            partition_for(user, logic.config.partitions))])
        for _ in range(int(rng.integers(0, 4))):
            log.step()
            if rng.random() < 0.1:
                log.crash()
    for user, personas in pending:
        log.append([Out("user_ops", user, encode_label(user, personas, [], "t"),
                        partition_for(user, logic.config.partitions))])
    log.drain(crashes=0.1)
    _check(logic, shop.frame, labels)


def test_batched_and_one_by_one_reach_the_same_state(shop):
    """Re-batching changes how many messages flow, never the rows they converge to."""
    events = list(iter_events(shop.frame))
    labels = _labels(shop, 5)
    states = []
    for max_batch in (1, 50):
        logic = _logic()
        log = BatchLog(logic, np.random.default_rng(0), max_batch=max_batch)
        for user, personas in labels.items():
            log.append([Out("user_ops", user, encode_label(user, personas, [], "t"),
                            partition_for(user, logic.config.partitions))])
        for k in range(0, len(events), 25):
            log.append(_purchases(logic, events[k:k + 25]))
        log.drain()
        rows = {u: logic.tables.users.get(u) for u in map(str, shop.frame.user_id.unique())}
        states.append({u: (s.degree, s.events, psi_raw(s)) for u, s in rows.items()})
    one, batched = states
    assert one.keys() == batched.keys()
    assert all(one[u][:2] == batched[u][:2] for u in one)  # same edges, same counts
    # each is within θ = ε/2 of the exact value, so of each other within ε
    assert max(np.abs(one[u][2] - batched[u][2]).max() for u in one) < 0.05 + 1e-9


def test_a_batch_sends_one_message_per_destination_partition():
    logic = _logic(partitions=3)
    events = [PurchaseEvent(f"e{i}", f"u{i % 7}", f"i{i % 5}", "x", 1, 1.0, float(i)) for i in range(40)]
    outs = _purchases(logic, events + events[:5])  # the repeats are dropped within the batch
    assert len(outs) == len({partition_for(e.user_id, 3) for e in events})
    assert sum(len(decode_purchases(o.value)) for o in outs) == 40
    item_ops = []
    for out in outs:
        item_ops += logic.on_user_ops([(_roundtrip(out.value), 0)], out.partition)
    assert all(o.topic == "item_ops" for o in item_ops)
    # one message per (source partition, destination partition), each item's buyers in one
    assert len(item_ops) <= len(outs) * 3
    members = [m for o in item_ops for m, _ in decode_memberships(_roundtrip(o.value))]
    assert sorted((m.user, m.item) for m in members) == sorted({(e.user_id, e.item_id) for e in events})


def test_item_pushes_are_coalesced_to_the_last_value_per_item():
    logic = _logic(eps=0.01, partitions=2)
    lab = [1.0, 0, 0, 0, 0]
    ops = [encode_memberships([(Membership(f"u{k}", "mug", 1 if k % 2 else 0, np.array(lab) if k % 2 else None), 0.0)])
           for k in range(12)]
    outs = logic.on_item_ops([(op, k) for k, op in enumerate(ops)])
    state = logic.tables.items.get("mug")
    pushes = [p for o in outs for p in decode_values(_roundtrip(o.value))]
    assert len(outs) <= 2 and len(pushes) == len(outs)  # one value of the item per partition
    assert {u for p in pushes for u in p[3]} == {f"u{k}" for k in range(12)}
    assert all(p[1] == state.seq and np.allclose(p[2], state.told) for p in pushes)
    assert state.seq >= 1  # it did push, yet sent only its final value


def test_user_rows_are_written_once_per_batch():
    class Counting(dict):
        writes = 0

        def __setitem__(self, key, value):
            Counting.writes += 1
            super().__setitem__(key, value)

    logic = _logic()
    logic.tables.users.table = Counting()
    events = [PurchaseEvent(f"e{i}", "u", f"i{i}", "x", 1, 1.0, 0.0) for i in range(10)]
    sent = _purchases(logic, events[:5]) + _purchases(logic, events[5:])
    ops = [(_roundtrip(o.value), k) for k, o in enumerate(sent)]
    outs = logic.on_user_ops(ops, 0)
    assert Counting.writes == 1
    state = logic.tables.users.get("u")
    assert state.events == 10 and len(state.items) == 10 and state.applied_offset == 1
    assert sum(len(decode_memberships(_roundtrip(o.value))) for o in outs) == 10
    # the same batch again (a crash before the ack): nothing counted twice, everything re-sent
    again = logic.on_user_ops(ops, 0)
    assert logic.tables.users.get("u").events == 10
    assert sum(len(decode_memberships(_roundtrip(o.value))) for o in again) == 10
    # the same event ids at a later offset: producer duplicates
    assert logic.on_user_ops([(ops[0][0], 7)], 0) == [] and logic.tables.users.get("u").events == 10


def test_a_purchases_replay_interleaved_with_new_events_counts_each_once():
    """The purchases reader crashed after sending and re-reads from its last commit: the re-sent
    events arrive at later user-ops offsets, re-cut and mixed with new ones, in any order; each
    counts once while fewer than RECENT_IDS newer events of the user came between, and the
    row stays bounded."""
    from core.stream_protocol import RECENT_IDS

    logic = _logic()
    n = RECENT_IDS // 2
    events = [PurchaseEvent(f"e{i}", "u", f"i{i % 7}", "x", 1, 1.0, 0.0) for i in range(2 * n)]
    first = logic.on_purchases_raw([(b"u", e.to_json()) for e in events[:n]])
    logic.on_user_ops([(_roundtrip(o.value), 0) for o in first], first[0].partition)
    mixed = events[n // 2:][::-1]  # half re-sent, half new, reversed
    again = logic.on_purchases_raw([(b"u", e.to_json()) for e in mixed])
    logic.on_user_ops([(_roundtrip(o.value), 1) for o in again], again[0].partition)
    state = logic.tables.users.get("u")
    assert state.events == 2 * n and sum(it.count for it in state.items.values()) == 2 * n
    many = [PurchaseEvent(f"x{i}", "u", "i0", "x", 1, 1.0, 0.0) for i in range(2 * RECENT_IDS)]
    for k, chunk in enumerate((many[:RECENT_IDS], many[RECENT_IDS:])):
        outs = logic.on_purchases_raw([(b"u", e.to_json()) for e in chunk])
        logic.on_user_ops([(_roundtrip(o.value), 2 + k) for o in outs], outs[0].partition)
    state = logic.tables.users.get("u")
    assert state.events == 2 * n + 2 * RECENT_IDS and len(state.recent_ids) == RECENT_IDS


def test_batched_records_survive_kafka():
    events = [PurchaseEvent("e1", "u", "i", "Mug", 2, 3.5, 10.0), PurchaseEvent("e2", "v", "j", "Cup", 1, 1.0, 11.0)]
    op = _roundtrip(encode_purchases(events))
    assert decode_purchases(op) == [("e1", "u", "i", "Mug", 2, 3.5, 10.0), ("e2", "v", "j", "Cup", 1, 1.0, 11.0)]
    from core.incremental import ItemValue

    vals = _roundtrip(encode_values([(ItemValue("a", 3, np.array([0.5, 0.5]), ()), ["u", "v"], 1.0),
                                 (ItemValue("b", 1, np.array([1.0, 0.0]), ()), ["u"], 2.0)]))
    assert decode_values(vals) == [("a", 3, [0.5, 0.5], ["u", "v"], 1.0), ("b", 1, [1.0, 0.0], ["u"], 2.0)]
    members = decode_memberships(_roundtrip(encode_memberships([(Membership("u", "a", 2, np.array([1.0, 0.0])), 5.0),
                                              (Membership("v", "a", 0, None), 6.0)])))
    assert [(m.user, m.item, m.version, None if m.label is None else m.label.tolist(), ts)
            for m, ts in members] == [("u", "a", 2, [1.0, 0.0], 5.0), ("v", "a", 0, None, 6.0)]
    assert json.loads(UserOp(kind="value", users=[]).dumps())["kind"] == "value"


def test_packed_states_roundtrip():
    user = UserState(3)
    user.items["i"] = UserItem(2, 4, np.array([0.1, 0.2, 0.7]), 5, "Mug")
    user.items["j"] = UserItem(1, -1, None, 1, "Cup")
    user.total += [0.1, 0.2, 0.7]
    user.label, user.label_personas = np.array([0.0, 1.0, 0.0]), (1,)
    user.recent_ids = [-5, 2**62]
    back = decode_state(encode_state(user))
    assert back.recent_ids == [-5, 2**62]
    assert back.items["i"].value.tolist() == [0.1, 0.2, 0.7]
    assert back.items["j"].value is None and back.label.tolist() == [0.0, 1.0, 0.0]
    back.total += 1.0  # decoded arrays are writable
    item = ItemState(3, {"u": (1, np.array([1.0, 0, 0])), "v": (0, None)}, np.array([1.0, 0, 0]))
    got = decode_state(encode_state(item))
    assert got.buyers["u"][1].tolist() == [1.0, 0, 0] and got.buyers["v"] == (0, None)
    got.s -= 1.0


def test_rows_of_the_first_layout_still_decode():
    """A changelog written before the compact layout (float64 told values and labels, int64
    counters and versions) recovers into the same states; a layout newer than the code fails."""
    user = decode_state(pickle.dumps((
        "user", 3, ["i", "j"], ["Mug", "Cup"], np.array([[2, 4, 5], [1, -1, 1]], dtype=np.int64).tobytes(),
        np.array([[0.1, 0.2, 0.7], [np.nan] * 3]).tobytes(), None, (), 0, np.array([0.1, 0.2, 0.7]).tobytes(), 3, 7,
        ((1, 0.5),), False, np.array([-5, 2**62], dtype=np.int64).tobytes(), 1, 0, None, 0, -1)))
    assert user.items["i"].value.tolist() == [0.1, 0.2, 0.7] and user.items["j"].value is None
    assert (user.items["i"].count, user.items["i"].seq, user.items["j"].name) == (2, 4, "Cup")
    assert user.recent_ids == [-5, 2**62] and user.applied_offset == 7 and user.published == {1: 0.5}
    item = decode_state(pickle.dumps(("item", 3, ["u", "v"], np.array([1, 0], dtype=np.int64).tobytes(), [0],
                                      np.array([[1 / 3, 2 / 3, 0.0]]).tobytes(), np.array([1 / 3, 2 / 3, 0]).tobytes(),
                                      np.zeros(3).tobytes(), 2, 9)))
    assert item.buyers["u"][1].tolist() == [1 / 3, 2 / 3, 0.0] and item.buyers["v"] == (0, None) and item.seq == 2
    assert decode_state(encode_state(user)).items["i"].value.tolist() == [0.1, 0.2, 0.7]  # re-encoded exactly
    with pytest.raises(ValueError, match="newer"):
        decode_state(pickle.dumps(("user/9", 3)))


def test_compact_rows_are_exact_and_smaller():
    """Float32-exact told values (`told_value`) and small counters take the compact encodings;
    the decoded row is the same state, bit for bit."""
    rng = np.random.default_rng(0)
    user = UserState(16)
    for k in range(40):
        value = told_value(np.where(rng.random(16) < 0.5, 0.0, rng.random(16)), 0.1)
        user.items[f"i{k}"] = UserItem(int(rng.integers(1, 50)), 1, value, int(rng.integers(1, 90)), f"item {k}")
        user.total += value
    raw = encode_state(user)
    back = decode_state(raw)
    assert encode_state(back) == raw and back.total.tobytes() == user.total.tobytes()
    assert all(a.value.tobytes() == b.value.tobytes() for a, b in zip(user.items.values(), back.items.values()))
    dense = 40 * (16 * 8 + 3 * 8)  # the first layout's per-item arrays
    assert len(raw) < 0.6 * dense


def test_state_cache_is_bounded_by_decoded_footprint():
    """Rows of 8 items (each ~0.5 kB decoded, ~100 B encoded) against a 16 kB bound: the cache
    counts what the decoded rows hold, never more than the bound, and a row it dropped is read
    back from the table, equal to what was put."""
    table = StateTable({}, cache_size=1000, cache_bytes=16384)

    def state(n: int) -> UserState:
        return UserState(16, {f"i{k}": UserItem(1, 0, np.zeros(16), 1, "x") for k in range(8)}, events=n)

    size = row_footprint(state(0), 0)
    assert 4096 < size < 8192 and len(encode_state(state(0))) < size / 5
    for n in range(10):
        table.put(f"u{n}", state(n))
        assert table._cached_bytes <= 16384 and len(table._cache) <= 16384 // size
    assert "u0" not in table._cache and table.get("u0").events == 0


def test_state_cache_is_write_through_and_clears():
    table = StateTable({})
    state = UserState(2)
    table.put("u", state)
    assert table.get("u") is state and decode_state(table.table["u"]).events == 0
    table.table["u"] = encode_state(UserState(2, events=5))  # changed behind the cache
    assert table.get("u").events == 0
    table.clear_cache()
    assert table.get("u").events == 5
