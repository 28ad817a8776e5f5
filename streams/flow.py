"""Keeping the embedded broker alive through a long replay: purge consumed internal records.

Measured on the full Online Retail replay (382,853 purchases published at once,
bench/stream_quality.py): the embedded broker was OOM-killed (dmesg: noida-db, anon-rss 21.6 GB,
in its `autosave` thread). noida-db 0.2.3 keeps every record in memory and autosaves its whole
state as one JSON file in which record batches are arrays of decimal bytes (~3.5 characters per
byte); what a save holds grows with everything ever produced (300 MB of JSON after the purchases
alone, 1.7 GB broker RSS a few minutes in). Two remedies: the producers compress (gzip in
`streams.topic_io` and in the worker; 7× fewer bytes on purchase JSON), and `purge_consumed`
deletes the records of the worker's internal topics (user-ops, item-ops: the bulk; the few refit
requests are kept) below the group's
committed offsets (Kafka's DeleteRecords, as Kafka Streams does for its repartition topics):
nothing reads them again, and a restarted worker resumes at the committed offset. Only on the
embedded broker (a real Kafka has retention; it is left alone).

Not done here, measured: pausing the purchases while the internal topics lag (so that label
ops do not wait behind a user-ops backlog). Faust's `pause_partitions` only stops delivery and
drops records fetched meanwhile (a 30,000-purchase replay processed 9,984); pausing in aiokafka
kept every record but, with a bound of 32 queued messages, cut throughput to ~150 purchases/s on a
loaded machine (small batches). See docs/RESULTS.md §5b.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

import faust

from streams._compat import is_embedded_bootstrap
from streams.config import StreamConfig

__all__ = ["PURGE_INTERVAL_S", "register_purge", "purge_consumed"]

logger = logging.getLogger(__name__)

#: Seconds between two purges of consumed internal records.
PURGE_INTERVAL_S = 10.0


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


def register_purge(app: faust.App, config: StreamConfig, purgeable: list[str]) -> None:
    """On the embedded broker, purge `purgeable`'s consumed records every PURGE_INTERVAL_S."""
    if not is_embedded_bootstrap(config.kafka_bootstrap or ""):
        return

    @app.timer(interval=PURGE_INTERVAL_S)
    async def purge() -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(
                None, purge_consumed, config.kafka_bootstrap, config.app_id, purgeable)
        except Exception as exc:  # best effort: the next round tries again
            logger.debug("purge of consumed internal records failed: %s", exc)
