"""The recommender trainer service (`gplr trainer`): consume `purchases` and `persona-updates`,
retrain on a schedule, publish top-K recommendations for users whose graph or personas changed.

It runs as its own process, never inside the stream worker: training is CPU/GPU heavy and would
stall the worker's event loop. State is rebuilt from the start of `purchases` and
`persona-updates` on every start (the topics are the truth; no consumer group offsets are kept),
then the service keeps consuming. The model side (state, training, ranking, settings) is
`recsys.trainer`; this module adds the Kafka consumer/producer loop and the trainer's metrics.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.registry import Collector

from core.settings import ConfigError
from recsys.trainer import GraphState, TrainedModel, TrainerConfig, recommend, recommendation_record, train_model
from streams import metrics
from streams.config import StreamConfig
from streams.topics import Topics, create_topics

__all__ = ["TrainerService", "trainer_metric_names", "start_trainer_metrics", "service_from_env"]

log = logging.getLogger(__name__)

_TRAINER_PREFIX = "gplr_trainer_"


# -- metrics -----------------------------------------------------------------------------------
def trainer_metric_names() -> list[str]:
    """The metric names the trainer exports (a subset of `streams.metrics.metric_names()`)."""
    return [n for n in metrics.metric_names() if n.startswith(_TRAINER_PREFIX)]


class _TrainerMetrics(Collector):
    """Only the trainer's families of the shared registry: a trainer scrape shows no idle stream
    counters that would read as a second, silent worker."""

    def collect(self):
        for family in metrics.REGISTRY.collect():
            if family.name.startswith(_TRAINER_PREFIX):
                yield family


def start_trainer_metrics(port: int, addr: str = "0.0.0.0") -> Any:
    """Serve the trainer metrics on http://addr:port/metrics (port 0: nothing served)."""
    if port <= 0:
        log.info("trainer metrics server disabled (port 0)")
        return None
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_TrainerMetrics())
    try:
        server, _thread = start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:
        raise ConfigError(f"GPLR_TRAINER_METRICS_PORT={port}: cannot listen ({exc})") from None
    log.info("trainer metrics on http://%s:%d/metrics", addr, port)
    return server


# -- the service -------------------------------------------------------------------------------
class TrainerService:
    """Consume → (maybe) train → publish, in one thread of its own process."""

    def __init__(self, stream: StreamConfig, config: TrainerConfig) -> None:
        if not stream.kafka_bootstrap:
            raise ConfigError("KAFKA_BOOTSTRAP is empty: the trainer needs a broker")
        self.stream = stream
        self.config = config
        self.topics = Topics(stream.topic_prefix)
        self.state = GraphState(stream.personas())
        self.trained: TrainedModel | None = None
        self.version = 0
        self.published = 0
        self._last_cycle = float("-inf")
        self._retry_at = float("-inf")  # after a failed cycle: not before this (monotonic s)
        self._consumer: Any = None
        self._producer: Any = None

    # kafka plumbing
    def _connect(self) -> dict[tuple[str, int], int]:
        """Assign every partition of the input topics from the beginning; returns the high
        watermarks now (the backlog to read before the first cycle)."""
        from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

        bootstrap = self.stream.kafka_bootstrap
        create_topics(bootstrap, [self.topics.purchases, self.topics.persona_updates,
                                  self.topics.recommendations], self.stream.partitions)
        self._consumer = Consumer({
            "bootstrap.servers": bootstrap, "group.id": f"{self.stream.app_id}-trainer",
            "enable.auto.commit": False, "auto.offset.reset": "earliest", "log_level": 3,
        })
        self._producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "log_level": 3,
                                   "enable.idempotence": True})
        parts, ends = [], {}
        for topic in (self.topics.purchases, self.topics.persona_updates):
            meta = self._consumer.list_topics(topic, timeout=10).topics[topic]
            for p in meta.partitions:
                tp = TopicPartition(topic, p, OFFSET_BEGINNING)
                parts.append(tp)
                ends[(topic, p)] = self._consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
        self._consumer.assign(parts)
        return ends

    def _poll(self, positions: dict[tuple[str, int], int], timeout: float = 0.5) -> int:
        msgs = self._consumer.consume(num_messages=2000, timeout=timeout)
        for msg in msgs:
            if msg.error():
                log.warning("consumer error: %s", msg.error())
                continue
            positions[(msg.topic(), msg.partition())] = msg.offset() + 1
            if msg.topic() == self.topics.purchases:
                self.state.add_purchase(msg.value())
            else:
                key = msg.key().decode("utf-8", "replace") if msg.key() else None
                self.state.set_personas(msg.value(), key)
        return len(msgs)

    def _due(self, caught_up: bool) -> bool:
        if not self.state.changed or not caught_up or time.monotonic() < self._retry_at:
            return False
        if self.trained is None or self.state.new_edges >= self.config.after_edges:
            return True
        return time.monotonic() - self._last_cycle >= self.config.interval_s

    # one cycle
    def cycle(self) -> int:
        """Train on the current state and publish recommendations for the changed users;
        returns how many were published. A failed training keeps the previous model."""
        self._last_cycle = time.monotonic()
        self.version += 1
        started = time.perf_counter()
        new_edges = self.state.new_edges
        self.state.new_edges = 0
        try:
            trained = train_model(self.state, self.config, self.version, self.trained)
        except Exception:  # a bad cycle must not kill the service; the next one retries
            self.state.new_edges += new_edges
            self._retry_at = time.monotonic() + self.config.interval_s
            log.exception("training cycle %d failed; keeping the previous model, retrying in %.0fs",
                          self.version, self.config.interval_s)
            return 0
        self.trained = trained
        metrics.TRAINER_LAST_TRAIN.set(time.perf_counter() - started)
        metrics.TRAINER_EPOCHS.set(trained.epochs)
        metrics.TRAINER_VALIDATION_NDCG.set(trained.valid_ndcg)
        users = np.array(sorted(self.state.changed), dtype=np.int64)
        recs = recommend(trained, users, self.config.top_k)
        for u, items in recs.items():
            body = recommendation_record(self.state, u, items, trained)
            self._producer.produce(self.topics.recommendations, key=body["user_id"],
                                   value=json.dumps(body).encode())
            self._producer.poll(0)
        if self._producer.flush(30) != 0:
            log.error("recommendations not all delivered; the users stay marked as changed")
            return 0
        self.state.changed.difference_update(int(u) for u in users)
        metrics.TRAINER_RECOMMENDATIONS.inc(len(recs))
        metrics.TRAINER_LAST_SUCCESS.set(time.time())
        self.published += len(recs)
        log.info("cycle %d: %s on %d users, %d items, %d edges; valid NDCG@10 %.4f; %d epochs in %.1fs; "
                 "published %d", self.version, trained.name, self.state.n_users, self.state.n_items,
                 self.state.n_edges, trained.valid_ndcg, trained.epochs, trained.seconds, len(recs))
        return len(recs)

    def run(self, once: bool = False, stop: threading.Event | None = None) -> int:
        """Consume until stopped (or, with `once`, until the backlog present at start is read,
        then run one cycle and return). Returns the number of recommendation lists published."""
        stop = stop or threading.Event()
        ends = self._connect()
        positions = {tp: 0 for tp in ends}
        caught_up = False
        try:
            while not stop.is_set():
                self._poll(positions)
                if not caught_up:
                    caught_up = all(positions[tp] >= end for tp, end in ends.items())
                    if caught_up:
                        log.info("read the backlog: %d users, %d items, %d edges, %d users with personas",
                                 self.state.n_users, self.state.n_items, self.state.n_edges,
                                 len(self.state.user_personas))
                if once and caught_up:
                    if self.state.changed:
                        self.cycle()
                    return self.published
                if self._due(caught_up):
                    self.cycle()
        finally:
            self.close()
        return self.published

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
        if self._producer is not None:
            self._producer.flush(10)
            self._producer = None


def service_from_env(env: Mapping[str, str] | None = None, **overrides: Any) -> TrainerService:
    """A service configured from the environment (`overrides` replace TrainerConfig fields)."""
    config = TrainerConfig.from_env(env)
    if overrides:
        config = replace(config, **overrides)
    return TrainerService(StreamConfig.from_env(env), config)
