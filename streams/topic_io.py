"""Records in and out of a topic for the commands, the demo and the benchmarks: `publish_events`
is the one producer loop (paced, delivery-checked), `read_values`/`read_topic` read a topic start to end.
"""
from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Iterable

from core.events import PurchaseEvent

__all__ = ["publish_events", "publish_records", "read_topic", "latest_personas", "PRODUCER_CONFIG",
           "READER_CONFIG"]

#: Readers of a whole topic: noida-db 0.2.3 answers a fetch with more than librdkafka's 100 MB
#: response limit once a partition is large (measured: 105 MB from the users changelog during the
#: full Online Retail replay: "Invalid response size … increase receive.message.max.bytes"), so
#: allow the largest response librdkafka accepts.
READER_CONFIG = {"enable.auto.commit": False, "log_level": 3, "receive.message.max.bytes": 2**31 - 1}

#: The one producer configuration of the commands, the demo and the benchmarks.
#: murmur2 (Kafka's Java default, = streams.records.partition_for): a user's purchases land on its
#: own user partition, so each user partition sees them in one order (reproducible labeling).
#: gzip: the embedded broker keeps every record in memory and autosaves them as JSON (streams.flow);
#: purchase JSON compresses about 7× (measured on noida-db 0.2.3), and aiokafka reads gzip natively
#: (lz4/zstd would need extra packages in the worker).
PRODUCER_CONFIG = {"linger.ms": 5, "acks": "all", "log_level": 2, "partitioner": "murmur2_random",
                   "compression.type": "gzip"}


def _producer(bootstrap: str, timeout: float):
    from confluent_kafka import Producer

    return Producer({**PRODUCER_CONFIG, "bootstrap.servers": bootstrap, "message.timeout.ms": int(timeout * 1000)})


def publish_records(bootstrap: str, topic: str, records: Iterable[tuple[str, bytes]], timeout: float = 30.0) -> int:
    """Publish (key, value) records with `publish_events`' producer (murmur2 by key, gzip);
    returns how many were delivered, RuntimeError if any was not within `timeout` seconds."""
    producer = _producer(bootstrap, timeout)
    failed: list[str] = []
    sent = 0
    for key, value in records:
        _produce(producer, topic, key, value, failed)
        sent += 1
    _flush(producer, sent, failed, timeout)
    return sent


def _produce(producer, topic: str, key: str, value: bytes, failed: list[str]) -> None:
    def on_delivery(err, _msg) -> None:
        if err is not None:
            failed.append(str(err))

    while True:
        try:
            producer.produce(topic, value=value, key=key, on_delivery=on_delivery)
            break
        except BufferError:  # local queue full: let deliveries drain
            producer.poll(0.05)
    producer.poll(0)


def _flush(producer, sent: int, failed: list[str], timeout: float) -> None:
    remaining = producer.flush(timeout + 5)
    if remaining or failed:
        raise RuntimeError(f"{remaining + len(failed)} of {sent} records not delivered"
                           f"{': ' + failed[0] if failed else ''}")


def publish_events(
    bootstrap: str,
    topic: str,
    events: Iterable[PurchaseEvent],
    rate: float | None = None,
    total: int | None = None,
    progress: bool = False,
    stamp_now: bool = False,
    stop: threading.Event | None = None,
    timeout: float = 30.0,
) -> int:
    """Publish events keyed by user_id, at most `rate` per second; returns how many were delivered.

    `stamp_now` replaces each event's `ts` by the send time, so purchase-to-update latency can be
    read off the persona updates. Raises RuntimeError if any record was not delivered within
    `timeout` seconds.
    """
    producer = _producer(bootstrap, timeout)
    failed: list[str] = []
    bar = _progress(total) if progress else None
    start = time.monotonic()
    sent = 0
    try:
        for event in events:
            if stop is not None and stop.is_set():
                break
            if rate:
                ahead = start + sent / rate - time.monotonic()
                if ahead > 0.002:
                    time.sleep(ahead)
            if stamp_now:
                event = dataclasses.replace(event, ts=time.time())
            _produce(producer, topic, event.user_id, event.to_json(), failed)
            sent += 1
            if bar is not None and sent % 200 == 0:
                bar[0].update(bar[1], completed=sent)
    finally:
        if bar is not None:
            bar[0].update(bar[1], completed=sent)
            bar[0].stop()
    _flush(producer, sent, failed, timeout)
    return sent


def read_values(bootstrap: str, topic: str, timeout: float = 30.0) -> list[bytes]:
    """Every record value now in `topic` (log start to the end offsets at call time), in offset order
    per partition. An absent topic reads as empty; TimeoutError if the end is not reached in time."""
    import uuid

    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({**READER_CONFIG, "bootstrap.servers": bootstrap, "group.id": f"gplr-read-{uuid.uuid4().hex}"})
    out: list[bytes] = []
    try:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None:
            return out
        marks = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10) for p in meta.partitions}
        ends = {p: high for p, (_, high) in marks.items()}
        todo = {p for p, (low, high) in marks.items() if high > low}  # (records below low were purged)
        consumer.assign([TopicPartition(topic, p, low) for p, (low, _) in marks.items()])
        deadline = time.monotonic() + timeout
        while todo and time.monotonic() < deadline:
            for msg in consumer.consume(5000, 0.5):
                offset, part, value = msg.offset(), msg.partition(), msg.value()
                if msg.error() or offset is None or part is None or offset >= ends[part]:
                    continue
                if value is not None:
                    out.append(value)
                if offset + 1 >= ends[part]:
                    todo.discard(part)
        if todo:
            raise TimeoutError(f"reading {topic}: partitions {sorted(todo)} did not reach their end "
                               f"within {timeout:.0f}s")
    finally:
        consumer.close()
    return out


def read_topic(bootstrap: str, topic: str, timeout: float = 30.0) -> list[dict]:
    """Every JSON object now in `topic` (see `read_values`); unreadable records are skipped."""
    records: list[dict] = []
    for value in read_values(bootstrap, topic, timeout):
        try:
            record = json.loads(value)
        except (TypeError, ValueError):
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def latest_personas(updates: Iterable[dict]) -> dict[str, dict]:
    """The last persona update of each user (updates are keyed by user, so one partition holds
    all of a user's updates in order)."""
    latest: dict[str, dict] = {}
    for update in updates:
        if "user" in update:
            latest[str(update["user"])] = update
    return latest


def _progress(total: int | None):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("publishing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        transient=False)
    task = progress.add_task("publish", total=total)
    progress.start()
    return progress, task
