"""core.stream_protocol: which purchase events a user row counts, with bounded state."""
from __future__ import annotations

import numpy as np

from core.incremental import UserState
from core.stream_protocol import RECENT_IDS, event_key, is_duplicate, remember


def test_a_retry_within_the_window_is_a_duplicate_and_one_beyond_it_is_not():
    state = UserState(2)
    remember(state, "first")
    for i in range(RECENT_IDS - 1):
        remember(state, f"e{i}")
    assert is_duplicate(state, "first")  # RECENT_IDS - 1 newer ids: still remembered
    remember(state, "one-more")
    assert not is_duplicate(state, "first")  # the documented limit of the window
    assert len(state.recent_ids) == RECENT_IDS


def test_row_state_is_bounded_whatever_the_history():
    state = UserState(2)
    for i in range(20 * RECENT_IDS):
        remember(state, f"evt-{i}")
    assert len(state.recent_ids) == RECENT_IDS


def test_event_keys_are_stable_64_bit_and_accept_any_text():
    assert event_key("e1") == event_key("e1") != event_key("e2")
    assert -(2**63) <= event_key("\ud800 lone surrogate") < 2**63
    keys = {event_key(f"id-{i}") for i in range(100_000)}
    assert len(keys) == 100_000


# -- batches -------------------------------------------------------------------------------------
from core.incremental import ItemState, Membership, item_upsert, label_vector  # noqa: E402
from core.stream_protocol import UserBatch, apply_item_batch, count_labels  # noqa: E402


def _user_batch(rows: dict) -> UserBatch:
    return UserBatch(rows.get, 2)


def test_user_batch_counts_once_and_replays_resend_without_counting():
    rows: dict = {}
    work = _user_batch(rows)
    assert work.purchase(5, "e1", "u", "mug", "Mug", 1, 1.0) == "edge"
    assert work.purchase(5, "e2", "u", "mug", "Mug", 2, 2.0) == "repeat"
    assert work.purchase(6, "e1", "u", "mug", "Mug", 1, 1.0) == "duplicate"  # producer retry
    rows.update(work.rows_to_write())
    assert rows["u"].applied_offset == 5 and rows["u"].events == 2
    assert [(m.user, m.item, ts) for m, ts in work.memberships()] == [("u", "mug", 1.0)]
    again = _user_batch(rows)  # offset 5 again after a crash: re-sent, not counted, row rewritten
    assert again.purchase(5, "e1", "u", "mug", "Mug", 1, 1.0) == "replay"
    assert again.purchase(5, "e2", "u", "mug", "Mug", 2, 2.0) == "replay"
    assert list(again.rows_to_write()) == ["u"] and rows["u"].events == 2 and again.replays == 2
    assert [m.item for m, _ in again.memberships()] == ["mug"]


def test_user_batch_values_apply_by_seq_and_replayed_users_resend():
    rows: dict = {}
    work = _user_batch(rows)
    work.purchase(0, "e1", "u", "mug", "Mug", 1, 1.0)
    assert work.value(1, "mug", 1, np.array([1.0, 0.0]), ["u", "ghost"], 3.0) == ["ghost"]
    assert work.changed == {"u": 3.0}  # a purchase alone does not move Ψ̂; the value does
    work.rows["u"].published = {0: 1.0}
    rows.update(work.rows_to_write())
    replay = _user_batch(rows)
    replay.value(1, "mug", 1, np.array([1.0, 0.0]), ["u"], 3.0)
    assert replay.replayed == {"u"} and not replay.changed
    late = _user_batch(rows)
    late.value(2, "mug", 1, np.array([0.0, 1.0]), ["u"], 3.0)  # an old seq at a new offset: stale
    assert not late.changed and not late.replayed and rows["u"].total.tolist() == [1.0, 0.0]


def test_labels_move_counts_and_a_repeated_label_is_a_noop():
    rows: dict = {}
    work = _user_batch(rows)
    work.purchase(0, "e1", "p", "mug", "Mug", 1, 1.0)
    assert not work.label_is_noop(1, "p", (1,), 2.0)
    state = work.set_label(1, "p", (1,), 2.0)
    assert state.label.tolist() == [0.0, 1.0] and work.label_moves == [((), (1,))]
    rows.update(work.rows_to_write())
    assert _user_batch(rows).label_is_noop(2, "p", (1,), 2.0)  # the same label again
    assert _user_batch(rows).label_is_noop(1, "p", (0,), 2.0)  # a replay
    counts = count_labels(None, (), (1,), 2)
    assert counts.tolist() == [0.0, 1.0]
    assert count_labels(counts, (1,), (0,), 2).tolist() == [1.0, 0.0]
    assert count_labels(np.zeros(2), (1,), (), 2).tolist() == [0.0, 0.0]  # never negative


def test_item_batch_coalesces_to_the_final_value_and_equals_one_at_a_time():
    theta = 0.05
    lab = label_vector([0], 2)
    members = [Membership(f"u{k}", "mug", 1 if k % 3 == 0 else 0, lab if k % 3 == 0 else None) for k in range(20)]
    rows: dict = {}
    done = apply_item_batch(rows.get, [(k, [(m, float(k))]) for k, m in enumerate(members)], 2, theta)
    reference = ItemState(2)
    pushes = sum(item_upsert(reference, "mug", m, theta).pushed for m in members)
    state = done.rows["mug"]
    assert done.pushes == pushes > 1 and state.seq == reference.seq and state.applied_offset == 19
    assert len(done.values) == 1  # one value for the item, its last one, to every buyer
    value, ts = done.values[0]
    assert value.seq == state.seq and np.allclose(value.value, state.told) and ts == 0.0
    assert set(value.users) == {m.user for m in members}
    rows.update(done.rows)
    replay = apply_item_batch(rows.get, [(4, [(members[4], 4.0)])], 2, theta)  # re-told to all
    assert set(replay.values[0][0].users) == set(value.users) and replay.pushes == 0
    assert replay.rows["mug"].applied_offset == 19
    fresh = apply_item_batch(rows.get, [(20, [(members[4], 20.0)])], 2, theta)  # a duplicate upsert
    assert [v.users for v, _ in fresh.values] == [("u4",)]
