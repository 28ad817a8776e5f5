"""Broker-backed fixtures, a pytest plugin loaded by tests/conftest.py so that every test package
shares ONE embedded broker per session: per-test topic prefixes, worker subprocesses, and helpers to
produce and consume records.

Set KAFKA_BOOTSTRAP to run against an existing broker instead of the embedded one; tests that must
restart the broker then skip.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from core.events import PurchaseEvent
from streams.broker import BrokerError, EmbeddedBroker, free_port, noida_command
from streams.config import StreamConfig
from streams.demo import WorkerProcess
from streams.topics import Topics, create_topics

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO / ".." / "shared" / "data" / "online_retail"


@dataclass
class ExternalBroker:
    """A broker someone else runs (KAFKA_BOOTSTRAP): it cannot be restarted from here."""

    bootstrap: str

    def restart(self) -> None:
        pytest.skip("cannot restart an external broker (KAFKA_BOOTSTRAP is set)")


def _start_embedded(data_dir: Path) -> EmbeddedBroker:
    try:
        noida_command()
    except BrokerError as exc:
        pytest.skip(str(exc))
    return EmbeddedBroker(data_dir=data_dir, fresh=True).start()


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker | ExternalBroker]:
    """One broker for the whole session (fresh data dir); KAFKA_BOOTSTRAP wins when set."""
    external = os.environ.get("KAFKA_BOOTSTRAP", "").strip()
    if external:
        yield ExternalBroker(external)
        return
    embedded = _start_embedded(tmp_path_factory.mktemp("broker") / "data")
    try:
        yield embedded
    finally:
        embedded.stop()


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    """A private embedded broker for tests that restart or kill it (never the shared one)."""
    embedded = _start_embedded(tmp_path / "broker")
    try:
        yield embedded
    finally:
        embedded.stop()


def make_config(bootstrap: str, data_dir: Path, **overrides: Any) -> StreamConfig:
    """A config isolated from every other test: own topic prefix, app id, data dir and ports."""
    tag = uuid.uuid4().hex[:8]
    base = StreamConfig(
        kafka_bootstrap=bootstrap,
        topic_prefix=f"t{tag}.",
        app_id=f"gplr-test-{tag}",
        data_dir=data_dir,
        worker_port=free_port(),
        metrics_port=0,
        labeler="none",
        partitions=2,
    )
    return replace(base, **overrides)


@pytest.fixture
def stream_config(broker, tmp_path: Path) -> StreamConfig:
    """A `StreamConfig` on the session broker with this test's own topics (already created)."""
    config = make_config(broker.bootstrap, tmp_path / "data")
    create_topics(config.kafka_bootstrap, Topics(config.topic_prefix).public(), config.partitions)
    return config


# -- worker subprocess ------------------------------------------------------------------------
@pytest.fixture
def worker_factory(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """`worker_factory(config, **env)` starts a worker; every one is stopped at teardown."""
    started: list[WorkerProcess] = []

    def start(config: StreamConfig, **extra_env: str) -> WorkerProcess:
        """Start `gplr worker` for `config` (extra environment variables win); call .wait_ready()."""
        worker = WorkerProcess(config, tmp_path / f"worker-{len(started)}.log", dict(extra_env))
        started.append(worker.start())
        return worker

    yield start
    for worker in started:  # the test is over: no need for a graceful (5 s) shutdown
        worker.kill()


# -- produce / consume ------------------------------------------------------------------------
def produce(bootstrap: str, topic: str, records: Iterable[PurchaseEvent | bytes | str | dict],
            key: Callable[[Any], str | None] | None = None) -> int:
    """Publish events (keyed by user_id), raw bytes/str or dicts (as JSON); returns the count."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "log_level": 3})
    n = 0
    for record in records:
        if isinstance(record, PurchaseEvent):
            value, k = record.to_json(), record.user_id
        elif isinstance(record, dict):
            value, k = json.dumps(record).encode(), str(record.get("user_id", "")) or None
        else:
            value, k = (record.encode() if isinstance(record, str) else record), None
        if key is not None:
            k = key(record)
        producer.produce(topic, value=value, key=k)
        producer.poll(0)
        n += 1
    if producer.flush(30) != 0:
        raise AssertionError("producer could not deliver every record")
    return n


def decode(value: bytes | None) -> Any:
    """JSON when it parses (also Faust's envelope-free json serializer), else the raw bytes."""
    if value is None:
        return None
    try:
        return json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return value


def consume(bootstrap: str, topic: str, until: Callable[[list[Any]], bool] | None = None,
            timeout: float = 30.0, raw: bool = False) -> list[Any]:
    """Read `topic` from the beginning until `until(records)` holds or `timeout` passes.

    Records are decoded JSON values (raw confluent messages with `raw=True`). Without `until`,
    reads until the end of every partition.
    """
    consumer = Consumer({
        "bootstrap.servers": bootstrap, "group.id": f"test-{uuid.uuid4().hex}",
        "enable.auto.commit": False, "auto.offset.reset": "earliest", "log_level": 3,
    })
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        parts = [TopicPartition(topic, p, 0) for p in meta.partitions]
        consumer.assign(parts)
        ends = {p.partition: consumer.get_watermark_offsets(p, timeout=10)[1] for p in parts}
        records: list[Any] = []
        deadline = time.monotonic() + timeout
        positions = {p: 0 for p in ends}
        while time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is not None and not msg.error():
                records.append(msg if raw else decode(msg.value()))
                positions[msg.partition()] = msg.offset() + 1
            if until is not None:
                if until(records):
                    break
            elif all(positions[p] >= end for p, end in ends.items()):
                break
        return records
    finally:
        consumer.close()


def topic_configs(bootstrap: str, topics: Iterable[str]) -> dict[str, dict[str, str]]:
    """Each topic's configuration as the broker describes it (name → value)."""
    from confluent_kafka.admin import AdminClient, ConfigResource

    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 3})
    futures = admin.describe_configs([ConfigResource(ConfigResource.Type.TOPIC, t) for t in topics])
    return {res.name: {k: v.value for k, v in fut.result(30).items()} for res, fut in futures.items()}


def assert_changelogs_compacted(bootstrap: str, app_id: str) -> None:
    """Every table's changelog is compacted in segments of `CHANGELOG_TOPIC_CONFIG` (the broker compacts
    closed segments only: the default 1 GiB would keep every version of a row)."""
    from streams.backfill import TABLES
    from streams.tables import CHANGELOG_TOPIC_CONFIG, changelog_topic

    configs = topic_configs(bootstrap, [changelog_topic(app_id, t) for t in TABLES])
    assert len(configs) == len(TABLES)
    for topic, config in configs.items():
        assert config["cleanup.policy"] == "compact", topic
        assert {k: config.get(k) for k in CHANGELOG_TOPIC_CONFIG} == CHANGELOG_TOPIC_CONFIG, topic


@pytest.fixture(name="produce")
def produce_fixture() -> Callable[..., int]:
    """`produce(bootstrap, topic, records, key=None) -> count` (see `produce` above)."""
    return produce


@pytest.fixture(name="consume")
def consume_fixture() -> Callable[..., list[Any]]:
    """`consume(bootstrap, topic, until=None, timeout=30, raw=False) -> records`."""
    return consume


@pytest.fixture(name="make_config")
def make_config_fixture() -> Callable[..., StreamConfig]:
    """`make_config(bootstrap, data_dir, **overrides)`: an isolated `StreamConfig`."""
    return make_config


@pytest.fixture
def repo_root() -> Path:
    return REPO
