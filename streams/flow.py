"""Flow control for a worker that starts behind (a backlog, a replay, a restart after an outage).

Two measured failures of the full Online Retail replay (382,853 purchases published at once,
bench/stream_quality.py) and what this module does about each:

* **Label ops waited behind the whole backlog.** The purchases agent only regroups events, so it
  turned the purchase backlog into a `user-ops` backlog within minutes (349k of 383k purchases
  consumed, 18.7k user-ops messages queued, 3.5 min in) while the user side ran at its own pace.
  A label, its item upserts and every item value then waited behind all of it (87 label requests
  unanswered, no persona update published), because a topic is a queue and Faust delivers to the
  agents from one consumer: a full user-ops channel holds up every other topic's records too.
  `register_flow_control` pauses fetching the purchases partitions (in aiokafka:
  `streams._compat.set_fetching`) while the internal topics of this
  worker's partitions (user-ops + item-ops, records the broker holds that the consumer has not
  fetched: highwater − position) hold more than `FLOW_HIGH` messages, and resumes below
  `FLOW_LOW`: the backlog stays in `purchases`, the internal queues stay short, and a label is
  applied a few batches after it is answered, whatever the backlog.
* **The embedded broker was OOM-killed** (dmesg: noida-db, anon-rss 21.6 GB, in its `autosave`
  thread). noida-db 0.2.3 keeps every record in memory and autosaves its whole state as one JSON
  file whose record batches are arrays of decimal bytes (~3.5 characters per byte); the memory
  of a save grows with everything ever produced. Besides compressing (gzip: the producer of
  `streams.topic_io` and the worker's; 7× fewer bytes on purchase JSON), `purge_consumed` deletes
  the records of the worker's internal topics (user-ops, item-ops, refit) below the group's
  committed offsets (Kafka's DeleteRecords, as Kafka Streams does for its repartition topics):
  nothing reads them again, a restarted worker resumes at the committed offset. Only on the
  embedded broker (a real Kafka has retention; it is left alone).
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Iterable

import faust

from streams import metrics
from streams._compat import is_embedded_bootstrap, set_fetching
from streams.config import StreamConfig

__all__ = ["FlowGate", "FLOW_HIGH", "FLOW_LOW", "FLOW_INTERVAL_S", "PURGE_INTERVAL_S", "register_flow_control",
           "purge_consumed"]

logger = logging.getLogger(__name__)

#: Internal messages (user-ops + item-ops of this worker's partitions) waiting in the broker above
#: which the purchases partitions pause, and below which they resume. A purchases batch of
#: BATCH_MAX events becomes one user-ops message per partition, so FLOW_HIGH is a few thousand
#: purchases of look-ahead: enough to keep the user side busy, short enough that a label op is
#: applied within a few batches.
FLOW_HIGH = 32
FLOW_LOW = 8
FLOW_INTERVAL_S = 0.2
PURGE_INTERVAL_S = 10.0


@dataclass
class FlowGate:
    """Hysteresis between `low` and `high` on the internal backlog: `update` says True (pause
    the purchases), False (resume them) or None (no change)."""

    high: int = FLOW_HIGH
    low: int = FLOW_LOW
    paused: bool = False

    def update(self, backlog: int) -> bool | None:
        if not self.paused and backlog > self.high:
            self.paused = True
            return True
        if self.paused and backlog < self.low:
            self.paused = False
            return False
        return None


async def internal_backlog(consumer: Any, tps: Iterable[Any]) -> int:
    """Records the broker holds on `tps` that `consumer` has not fetched yet (highwater − position)."""
    backlog = 0
    for tp in tps:
        high = consumer.highwater(tp)
        position = await consumer.position(tp)
        if high is not None and position is not None:
            backlog += max(0, int(high) - int(position))
    return backlog


def purge_consumed(bootstrap: str, group: str, topics: Iterable[str], timeout: float = 10.0) -> int:
    """Delete the records of `topics` below `group`'s committed offsets; returns how many
    partitions were purged (blocking: call it in an executor)."""
    from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 2})
    wanted = set(topics)
    request = [ConsumerGroupTopicPartitions(group)]
    committed = admin.list_consumer_group_offsets(request, request_timeout=timeout)[group].result()
    marks = [TopicPartition(tp.topic, tp.partition, tp.offset) for tp in committed.topic_partitions
             if tp.topic in wanted and tp.offset > 0]
    if not marks:
        return 0
    done = 0
    for future in admin.delete_records(marks, request_timeout=timeout).values():
        future.result()
        done += 1
    return done


def register_flow_control(app: faust.App, config: StreamConfig, purchases: str, internal: list[str],
                          purgeable: list[str]) -> None:
    """Attach the purchases backpressure (`internal`: the topics whose backlog pauses `purchases`)
    and, on the embedded broker only, the purge of `purgeable`'s consumed records to `app`."""
    gate = FlowGate()

    @app.timer(interval=FLOW_INTERVAL_S)
    async def flow_control() -> None:
        if app.in_recovery or app.rebalancing:  # Faust pauses and resumes partitions itself then
            return
        consumer = app.consumer
        assigned = consumer.assignment()
        backlog = await internal_backlog(consumer, [tp for tp in assigned if tp.topic in internal])
        metrics.INTERNAL_BACKLOG.set(backlog)
        own = [tp for tp in assigned if tp.topic == purchases]
        change = gate.update(backlog)
        if gate.paused or change is False:  # (re-asserted while paused: a rebalance resets it)
            await set_fetching(consumer, own, paused=gate.paused)
        if change is not None:
            metrics.PURCHASES_PAUSED.set(int(gate.paused))
            logger.debug("purchases %s (internal backlog %d)", "paused" if gate.paused else "resumed", backlog)

    if not is_embedded_bootstrap(config.kafka_bootstrap or ""):
        return

    @app.timer(interval=PURGE_INTERVAL_S)
    async def purge() -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(
                None, purge_consumed, config.kafka_bootstrap, config.app_id, purgeable)
        except Exception as exc:  # best effort: the next round tries again
            logger.debug("purge of consumed internal records failed: %s", exc)
