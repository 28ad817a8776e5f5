"""A restarted worker on a busy machine keeps consuming.

On a loaded host a worker can go seconds without running (the kill -9 test failed once in CI
with its lag stuck after the restart; a recovering worker at load 8–12 missed its heartbeats,
docs/RESULTS.md §9a). Here the restarted worker is frozen (SIGSTOP) for longer than the old 6 s
session timeout while it works through the backlog: it must keep its group slot (no second
join, so no rebalance in the middle of its restart) and drain everything, exactly.
"""
from __future__ import annotations

import os
import signal
import time

import pytest

from streams.config import SESSION_TIMEOUT_S
from streams.demo import LagWatcher
from tests.streams.test_reliability import (
    _check_against_exact,
    _config,
    _crash_at_first_update,
    _labels_for,
    _shop,
    _updates,
)

pytestmark = pytest.mark.broker

#: How long the restarted worker is starved: over the old 6 s session timeout, under the new one.
FROZEN_S = 10.0


def _freeze(pid: int, seconds: float) -> None:
    """Stop the worker's process group for `seconds` (what a starved process looks like to the
    broker: no heartbeat, no fetch), then let it run again."""
    os.killpg(pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        os.killpg(pid, signal.SIGCONT)


def test_a_restarted_worker_frozen_mid_backlog_keeps_its_slot_and_drains(
        broker, tmp_path, make_config, produce, consume, worker_factory) -> None:
    assert FROZEN_S < SESSION_TIMEOUT_S
    shop = _shop(n_users=90)
    labels = _labels_for(shop)
    config = _config(make_config, broker, tmp_path)
    _crash_at_first_update(config, produce, consume, worker_factory, shop, labels)
    restarted = worker_factory(config).wait_ready()
    assert restarted.pid is not None
    _freeze(restarted.pid, FROZEN_S)  # right after Ready: in the middle of the backlog and its first commits
    watcher = LagWatcher(config)
    try:
        assert watcher.wait_drained(timeout=90, settle=2.0), f"lag stuck at {watcher.lag()}"
    finally:
        watcher.close()
    joins = restarted.log().count("Joined group")
    assert joins == 1, f"the frozen worker lost its group slot ({joins} joins):\n{restarted.log()[-3000:]}"
    checked = _check_against_exact(_updates(consume, config), shop.frame, labels, 6, config.top_k)
    assert checked > len(shop.user_truth) // 2
