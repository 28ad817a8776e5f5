"""The backfill's bulk rows are the worker's rows, byte for byte (no Kafka).

`streams.backfill` builds user and item rows for many users at once (`StateBuilder.user_columns`,
`item_columns`, `_bulk_published`); the worker encodes its row objects with
`streams.tables.encode_state`. Every record the bulk path writes must equal what the object path
(`StateBuilder.user_row` / `item_rows`, `_decide`, `encode_state`) writes for the same history:
prototypes with labeler scores, users decided on the prior (no prototype reaches them), ties
between personas, de-biasing, a user beyond the remembered-id window, non-ASCII ids.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.backfill import HistoryIndex, StateBuilder
from core.stream_protocol import RECENT_IDS, event_key
from core.synthetic import make_shop
from streams import backfill
from streams.backfill import write_rows
from streams.tables import changelog_topic, decode_state, encode_packed, encode_state, item_tuple
from tests.streams.test_backfill import _Capture, replay_config


def _history(seed: int) -> tuple[pd.DataFrame, object]:
    """A sparse shop (many users no prototype reaches) plus one heavy user past the id window,
    ids with non-ASCII characters, and single-item users (every persona tied on one value)."""
    shop = make_shop(n_users=300, n_items=80, n_personas=6, seed=seed, mean_purchases=3)
    frame = shop.frame.copy()
    rng = np.random.default_rng(seed)
    heavy = frame.iloc[rng.integers(0, len(frame), RECENT_IDS + 90)].copy()
    heavy["user_id"] = "heavy-é"
    heavy["event_id"] = [f"h-{k}-漢" for k in range(len(heavy))]
    heavy["ts"] = np.sort(rng.uniform(frame["ts"].min(), frame["ts"].max(), len(heavy)))
    return pd.concat([frame, heavy], ignore_index=True).sort_values("ts", kind="stable"), shop


@pytest.mark.parametrize("seed", [3, 11])
def test_bulk_rows_equal_the_worker_encoder(seed, tmp_path, monkeypatch) -> None:
    frame, shop = _history(seed)
    config = replay_config(shop, tmp_path, label_budget=0.08, label_min_purchases=2, beta=0.7, decoder="graph")
    bulk = _Capture()
    write_rows(config, frame, None, bulk, updates=False)
    monkeypatch.setattr(backfill, "_bulk_rows", lambda b, lg, s0, s1, sc, rq: backfill._object_rows(
        b, lg, s0, s1, sc, rq, 0.0, False))
    reference = _Capture()
    write_rows(config, frame, None, reference, updates=False)
    assert len(bulk.records) == len(reference.records)
    for got, want in zip(bulk.records, reference.records):
        assert got == want, (got[:2], decode_state(got[2]), decode_state(want[2]))

    users = [decode_state(v) for t, _k, v, _p in bulk.records if t == changelog_topic("bf", "users")]
    unreached = [s for s in users if s.label is None and not np.any(s.total > 0)]
    assert unreached and all(s.published for s in unreached)  # decided on the prior Q̂
    assert sum(s.label is not None for s in users) >= 5
    assert any(len(set(s.published.values())) < len(s.published) for s in users)  # tied scores
    heavy = next(s for s in users if s.events == RECENT_IDS + 90)
    ids = frame.loc[frame["user_id"] == "heavy-é", "event_id"]
    assert heavy.recent_ids == [event_key(i) for i in ids.iloc[-RECENT_IDS:]]


def test_item_columns_equal_the_worker_encoder() -> None:
    frame, shop = _history(5)
    index = HistoryIndex.from_frame(frame)
    prototypes = {u: shop.user_truth.get(str(index.user_ids[u]), (0,)) for u in range(0, index.n_users, 7)}
    builder = StateBuilder(index, prototypes, len(shop.personas))
    objects = list(builder.item_rows())
    columns = list(builder.item_columns())
    assert [c.item for c in columns] == [item for item, _ in objects]
    assert any(c.labeled for c in columns) and any(not c.labeled for c in columns)
    for c, (_item, state) in zip(columns, objects):
        packed = item_tuple(builder.m, c.users, c.versions, c.labeled, c.label_mask, c.labels, c.s, c.told, c.seq,
                            state.applied_offset)
        assert encode_packed(packed) == encode_state(state)


def test_counting_sink_sizes_records_per_topic() -> None:
    """What `bench/scale.py` reports as mean and largest row bytes (key included)."""
    from streams.backfill import CountingSink

    sink = CountingSink()
    for topic, key, value in [("a", b"k1", b"x" * 10), ("a", None, b"y" * 30), ("b", b"key", b"z")]:
        sink.send(topic, key, value, 0)
    assert (sink.records, sink.bytes) == (3, 12 + 30 + 4)
    assert sink.by_topic == {"a": [2, 42, 30], "b": [1, 4, 4]}
