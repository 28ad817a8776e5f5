"""`gplr_decisions_frozen_share`: users published once, then silent for FROZEN_AFTER Ψ̂ changes."""
from __future__ import annotations

import logging

import numpy as np

from core.incremental import UserState, decide, rank_personas
from streams import metrics
from streams.agents import _frozen


def test_decide_counts_publications_and_silent_changes():
    state = UserState(4)
    first = rank_personas(np.array([0.5, 0.3, 0.2, 0.0]), None, 2)
    assert decide(state, first, 0.02) and (state.publishes, state.quiet) == (1, 0)
    for _ in range(metrics.FROZEN_AFTER):
        assert not decide(state, first, 0.02)
    assert state.quiet == metrics.FROZEN_AFTER and _frozen(state)
    moved = rank_personas(np.array([0.5, 0.2, 0.3, 0.0]), None, 2)  # set {0, 2}: published
    assert decide(state, moved, 0.02) and (state.publishes, state.quiet) == (2, 0) and not _frozen(state)


def test_frozen_share_gauge_and_warning(caplog):
    now = [0.0]
    watch = metrics.FrozenWatch(clock=lambda: now[0])
    for _ in range(metrics.FROZEN_MIN_USERS):
        watch.observe(first=True, froze=False, thawed=False)
    with caplog.at_level(logging.WARNING, logger="streams.metrics"):
        for _ in range(metrics.FROZEN_MIN_USERS // 2):
            watch.observe(first=False, froze=True, thawed=False)
        assert watch.share == 0.5 and not caplog.records  # at the limit: no warning yet
        watch.observe(first=False, froze=True, thawed=False)
        assert len(caplog.records) == 1 and "dominated by thresholds" in caplog.text
        watch.observe(first=False, froze=True, thawed=False)
        assert len(caplog.records) == 1  # rate-limited
        now[0] = 61.0
        watch.observe(first=False, froze=False, thawed=True)
        assert len(caplog.records) == 2
    assert metrics.DECISIONS_FROZEN._value.get() == watch.share
