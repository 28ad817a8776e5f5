"""core.stream_protocol: which purchase events a user row counts, with bounded state."""
from __future__ import annotations

import numpy as np

from core.incremental import UserState
from core.stream_protocol import RECENT_IDS, event_key, is_duplicate, remember


def test_a_retry_within_the_window_is_a_duplicate_and_one_beyond_it_is_not():
    state = UserState(2)
    remember(state, "first", None)
    for i in range(RECENT_IDS - 1):
        remember(state, f"e{i}", None)
    assert is_duplicate(state, "first", None)  # RECENT_IDS - 1 newer ids: still remembered
    remember(state, "one-more", None)
    assert not is_duplicate(state, "first", None)  # the documented limit of the window
    assert len(state.recent_ids) == RECENT_IDS


def test_purchases_offsets_catch_replays_of_any_length_per_partition():
    state = UserState(2)
    for off in range(5 * RECENT_IDS):
        assert not is_duplicate(state, f"e{off}", (0, off))
        remember(state, f"e{off}", (0, off))
    assert is_duplicate(state, "e0", (0, 0))  # long forgotten id, caught by its offset
    assert is_duplicate(state, "never-seen", (0, 17))  # an offset at or below the mark was counted
    assert not is_duplicate(state, "never-seen", (1, 0))  # another purchases partition
    assert not is_duplicate(state, "never-seen", (0, 5 * RECENT_IDS))
    assert not is_duplicate(state, "never-seen", (0, -1))  # unknown position: the ids decide
    assert state.sources == {0: 5 * RECENT_IDS - 1}


def test_row_state_is_bounded_whatever_the_history():
    state = UserState(2)
    rng = np.random.default_rng(0)
    for i in range(20 * RECENT_IDS):
        remember(state, f"evt-{i}", (int(rng.integers(4)), i))
    assert len(state.recent_ids) == RECENT_IDS and len(state.sources) == 4


def test_event_keys_are_stable_64_bit_and_accept_any_text():
    assert event_key("e1") == event_key("e1") != event_key("e2")
    assert -(2**63) <= event_key("\ud800 lone surrogate") < 2**63
    keys = {event_key(f"id-{i}") for i in range(100_000)}
    assert len(keys) == 100_000
