"""Internal messages stay under what a broker accepts (`streams.records.MAX_OP_BYTES`).

At full Instacart scale one push message of a batch grew past 1 MB: the producer refused it and
the worker exited and would have replayed the same batch into the same failure. `bounded_ops`
splits such ops; the halves must carry exactly what the whole carried, in order, and a stream
whose every message is split (with duplicates and crash replays) must still converge to exact Ψ.
"""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from core.events import PurchaseEvent
from core.incremental import ItemValue, Membership
from streams.agents import Out, _send
from streams.records import (
    MAX_OP_BYTES,
    ItemOp,
    UserOp,
    bounded_ops,
    decode_memberships,
    decode_purchases,
    decode_values,
    encode_label,
    encode_memberships,
    encode_purchases,
    encode_values,
    split_op,
)
from tests.streams.test_batching import BatchLog, converge


def _events(n: int) -> list[PurchaseEvent]:
    return [PurchaseEvent(f"e{i}", f"user-{i % 37}", f"item-{i % 11}", f"name {i}", 1 + i % 3, 2.5, 1000.0 + i)
            for i in range(n)]


def _push(users: int, items: int = 1) -> UserOp:
    buyers = tuple(f"user-{u}" for u in range(users))
    return encode_values([(ItemValue(f"item-{k}", 3 + k, np.linspace(0, 1, 8) * k, buyers), buyers, 500.0 + k)
                          for k in range(items)])


def _deliveries(ops: list[UserOp]) -> list[tuple[str, int, str]]:
    """(item, seq, user) in the order the user side would apply them."""
    return [(item, seq, user) for op in ops for item, seq, _value, users, _ts in decode_values(op) for user in users]


@pytest.mark.parametrize("limit", [400, 2_000, 8_000])
def test_split_purchases_carry_the_same_events_in_order(limit):
    op = encode_purchases(_events(300))
    pieces = bounded_ops(op, limit)
    assert len(pieces) > 1 and all(len(p.dumps()) <= limit for p in pieces)
    assert [e for p in pieces for e in decode_purchases(p)] == decode_purchases(op)
    assert all(p.users == [e[1] for e in decode_purchases(p)] for p in pieces)
    assert min(p.source_ts for p in pieces) == op.source_ts


def test_one_push_to_many_buyers_is_split_by_buyer():
    op = _push(users=5_000)
    assert len(op.dumps()) > MAX_OP_BYTES // 4
    pieces = bounded_ops(op, 4_000)
    assert len(pieces) > 10 and all(len(p.dumps()) <= 4_000 for p in pieces)
    assert _deliveries(pieces) == _deliveries([op])  # each buyer once, in order, same item and seq
    values = {tuple(v) for p in pieces for _i, _s, v, _u, _t in decode_values(p)}
    assert values == {tuple(v) for _i, _s, v, _u, _t in decode_values(op)}
    assert all(p.users == [u for _i, _s, _v, us, _t in decode_values(p) for u in us] for p in pieces)


def test_many_pushes_and_memberships_are_split_in_order():
    op = _push(users=40, items=60)
    pieces = bounded_ops(op, 3_000)
    assert len(pieces) > 1 and all(len(p.dumps()) <= 3_000 for p in pieces)
    assert _deliveries(pieces) == _deliveries([op])
    members = encode_memberships([(Membership(f"u{i}", f"i{i % 9}", i % 4, None if i % 3 else np.ones(8) / 8), float(i))
                                  for i in range(400)])
    parts = bounded_ops(members, 2_000)
    assert len(parts) > 1 and all(len(p.dumps()) <= 2_000 for p in parts)
    flat = [(m.user, m.item, m.version, None if m.label is None else tuple(m.label), ts)
            for p in parts for m, ts in decode_memberships(p)]
    assert flat == [(m.user, m.item, m.version, None if m.label is None else tuple(m.label), ts)
                    for m, ts in decode_memberships(members)]


def test_what_cannot_be_split_is_sent_whole():
    label = encode_label("u1", [0, 2], [0.5, 0.5], "operator")
    assert split_op(label) is None and bounded_ops(label, 10) == [label]
    one = encode_purchases(_events(1))
    assert split_op(one) is None and bounded_ops(one, 10) == [one]
    assert split_op(_push(users=1)) is None
    assert split_op(ItemOp(members=[["u", "i", 1, None, 0.0]])) is None
    small = encode_purchases(_events(5))
    assert bounded_ops(small) == [small]  # under the limit: untouched, one message
    other = {"kind": "refresh", "users": ["u"] * 10_000}  # not an op: passed through as it is
    assert bounded_ops(other, 10) == [other]


def test_send_splits_internal_ops_and_nothing_else(monkeypatch):
    """`_send` (the worker's only way out) sends each piece to the op's partition, in order."""
    import streams.records

    monkeypatch.setattr(streams.records.bounded_ops, "__defaults__", (2_000,))
    sent: list[tuple[str, object, int | None]] = []

    class _Topic:
        def __init__(self, name: str) -> None:
            self.name = name

        async def send(self, key, value, partition=None, value_serializer=None):
            sent.append((self.name, value, partition))
            return None

    class _Topics:
        user_ops, item_ops, persona_updates = _Topic("user_ops"), _Topic("item_ops"), _Topic("persona_updates")

    op = _push(users=2_000)
    update = {"user": "u1", "personas": list(range(200))}
    asyncio.run(_send(_Topics(), [Out("user_ops", None, op, 2), Out("persona_updates", "u1", update)]))
    ops = [v for name, v, _p in sent if name == "user_ops"]
    assert len(ops) > 1 and {p for name, _v, p in sent if name == "user_ops"} == {2}
    assert _deliveries(ops) == _deliveries([op])
    assert [name for name, _v, _p in sent][-1] == "persona_updates" and len(sent) == len(ops) + 1


class SplitLog(BatchLog):
    """Every internal message split as small as it goes (as if each were over the limit)."""

    def append(self, outs, source=None) -> None:
        super().append([Out(o.topic, o.key, piece, o.partition)
                        for o in outs for piece in (bounded_ops(o.value, 1) if o.topic in ("user_ops", "item_ops")
                                                    else [o.value])], source)


@pytest.fixture(scope="module")
def shop():
    from core.synthetic import make_shop

    return make_shop(n_users=60, n_items=30, n_personas=5, seed=3, mean_purchases=6)


@pytest.mark.parametrize("seed", range(3))
def test_split_messages_with_duplicates_and_crashes_converge_to_exact(shop, seed):
    converge(shop, seed, SplitLog)
