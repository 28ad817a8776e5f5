"""Prometheus metrics of the stream and the trainer, named as in docs/design.md (prefix `gplr_`).

All metrics live in one registry, `REGISTRY`, so `/metrics` serves exactly them and
`metric_names()` lists exactly what the Grafana dashboard may query. Consumer lag is measured
from the broker (high watermark − the group's committed offset), not from Faust internals, so the
number is the one any other Kafka tool would report.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from http.server import ThreadingHTTPServer
from typing import Any, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import MetricsHandler
from prometheus_client.registry import Collector

__all__ = [
    "REGISTRY",
    "EVENTS_IN", "DLQ", "DUPLICATES", "EDGES", "PUSHES", "PUSH_MESSAGES", "RESIDUAL_MASS",
    "LABEL_REQUESTS", "LABEL_CALLS", "LABEL_ERRORS", "LABEL_LATENCY", "LABEL_BUDGET_REMAINING",
    "PERSONA_CHANGES", "EVENT_TO_UPDATE", "CONSUMER_LAG",
    "TRAINER_LAST_TRAIN", "TRAINER_EPOCHS", "TRAINER_VALIDATION_NDCG",
    "TRAINER_RECOMMENDATIONS", "TRAINER_LAST_SUCCESS",
    "metric_names", "start_metrics_server", "BoundedMetricsServer", "measure_lag", "LagMonitor", "install_lag_monitor",
]

logger = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
_LLM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)

# prometheus-client appends `_total` to counters: Counter("gplr_events_in") exports gplr_events_in_total.
EVENTS_IN = Counter("gplr_events_in", "Purchase records read from the purchases topic", registry=REGISTRY)
DLQ = Counter("gplr_dlq", "Records sent to the dead-letter topic", ["reason"], registry=REGISTRY)
DUPLICATES = Counter("gplr_duplicates", "Purchases skipped as already seen (same event_id)", registry=REGISTRY)
EDGES = Counter("gplr_edges", "New user-item edges added to the graph", registry=REGISTRY)
PUSHES = Counter("gplr_pushes", "Reverse-push operations applied", registry=REGISTRY)
PUSH_MESSAGES = Counter("gplr_push_messages", "Push messages sent between partitions", registry=REGISTRY)
RESIDUAL_MASS = Gauge("gplr_residual_mass", "Residual mass not yet pushed (bounds the error)", registry=REGISTRY)
LABEL_REQUESTS = Counter("gplr_label_requests", "Users selected for labelling (DU sampling)", registry=REGISTRY)
LABEL_CALLS = Counter("gplr_label_calls", "Labeler calls made (LLM HTTP requests, retries included)",
                      registry=REGISTRY)
LABEL_ERRORS = Counter("gplr_label_errors", "Labeler calls that failed or returned no persona", registry=REGISTRY)
LABEL_LATENCY = Histogram("gplr_label_latency_seconds", "Labeler call latency", buckets=_LLM_BUCKETS,
                          registry=REGISTRY)
LABEL_BUDGET_REMAINING = Gauge("gplr_label_budget_remaining", "Labels still allowed by the budget",
                               registry=REGISTRY)
PERSONA_CHANGES = Counter("gplr_persona_changes", "Persona updates published", registry=REGISTRY)
EVENT_TO_UPDATE = Histogram("gplr_event_to_update_seconds",
                            "Purchase timestamp to persona-update publication", buckets=_LATENCY_BUCKETS,
                            registry=REGISTRY)
CONSUMER_LAG = Gauge("gplr_consumer_lag", "High watermark minus committed offset",
                     ["topic", "partition"], registry=REGISTRY)
TRAINER_LAST_TRAIN = Gauge("gplr_trainer_last_train_seconds", "Duration of the last training run",
                           registry=REGISTRY)
TRAINER_EPOCHS = Gauge("gplr_trainer_epochs", "Epochs of the last training run", registry=REGISTRY)
TRAINER_VALIDATION_NDCG = Gauge("gplr_trainer_validation_ndcg", "Validation NDCG@K of the last model",
                                registry=REGISTRY)
TRAINER_RECOMMENDATIONS = Counter("gplr_trainer_recommendations", "Recommendation lists published",
                                  registry=REGISTRY)
TRAINER_LAST_SUCCESS = Gauge("gplr_trainer_last_success_timestamp_seconds",
                             "Unix time of the last successful training run", registry=REGISTRY)


def _exported_name(collector: Collector) -> str:
    kind = getattr(collector, "_type", "")
    name = getattr(collector, "_name")
    return f"{name}_total" if kind == "counter" else name


def metric_names() -> list[str]:
    """Every metric name a dashboard may query (counters with `_total`, histograms by base name)."""
    collectors = REGISTRY._collector_to_names.keys()  # noqa: SLF001 - the registry has no public list
    return sorted(_exported_name(c) for c in collectors)


class BoundedMetricsServer(ThreadingHTTPServer):
    """prometheus-client's handler behind at most `max_connections` handler threads.

    Why not `prometheus_client.start_http_server`: it starts a thread per connection and keeps
    it while the client idles, so 400 idle connections were 400 threads. Here a connection over
    the bound is closed at once, and a slow or idle client is cut after `timeout` seconds."""

    daemon_threads = True

    def __init__(self, addr: str, port: int, max_connections: int, timeout: float = 5.0) -> None:
        handler = type("Handler", (MetricsHandler.factory(REGISTRY),), {"timeout": timeout,
                                                                          "log_message": _quiet})
        super().__init__((addr, port), handler)
        self.slots = threading.BoundedSemaphore(max_connections)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)  # over the bound: refuse rather than queue a thread
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def _quiet(*_args: Any) -> None:
    """No access log line per scrape."""


def start_metrics_server(port: int, addr: str = "127.0.0.1", max_connections: int = 8) -> Any:
    """Serve `REGISTRY` on http://addr:port/metrics in a daemon thread; port 0 → nothing served.

    Loopback by default, like the Faust web port (GPLR_METRICS_BIND=0.0.0.0 exposes it, as the
    compose stack does for Prometheus); at most `max_connections` served at once."""
    if port <= 0:
        logger.info("metrics server disabled (port 0)")
        return None
    server = BoundedMetricsServer(addr, port, max_connections)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    logger.info("metrics on http://%s:%d/metrics (at most %d connections)", addr, port, max_connections)
    return server


def measure_lag(consumer: Any, partitions: Iterable[tuple[str, int]], timeout: float = 5.0) -> dict[tuple[str, int], int]:
    """Lag per (topic, partition): high watermark − committed offset of `consumer`'s group.

    `consumer` is a confluent_kafka.Consumer whose group.id is the app's; a partition with no
    committed offset yet counts from the low watermark (everything retained is unread).
    """
    from confluent_kafka import TopicPartition

    tps = [TopicPartition(t, p) for t, p in partitions]
    if not tps:
        return {}
    committed = consumer.committed(tps, timeout=timeout)
    out: dict[tuple[str, int], int] = {}
    for tp in committed:
        low, high = consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=timeout)
        start = tp.offset if tp.offset >= 0 else low
        out[(tp.topic, tp.partition)] = max(0, high - start)
    return out


class LagMonitor:
    """Sets `gplr_consumer_lag` for a group's partitions; one confluent consumer reused."""

    def __init__(self, bootstrap: str, group: str) -> None:
        from confluent_kafka import Consumer

        self._consumer = Consumer({
            "bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
            "log_level": 3,
        })

    def update(self, partitions: Iterable[tuple[str, int]]) -> dict[tuple[str, int], int]:
        lags = measure_lag(self._consumer, partitions)
        for (topic, partition), lag in lags.items():
            CONSUMER_LAG.labels(topic=topic, partition=str(partition)).set(lag)
        return lags

    def close(self) -> None:
        self._consumer.close()


def install_lag_monitor(app: Any, bootstrap: str, interval: float = 5.0) -> LagMonitor:
    """Register a Faust timer that measures the lag of the partitions assigned to this worker.

    Faust's own changelog topics are skipped; the broker calls run in a thread so the event
    loop never blocks on them.
    """
    monitor = LagMonitor(bootstrap, app.conf.id)

    @app.timer(interval)
    async def _consumer_lag() -> None:
        try:
            assigned = [(tp.topic, tp.partition) for tp in app.consumer.assignment()
                        if not tp.topic.endswith("-changelog")]
            await asyncio.get_running_loop().run_in_executor(None, monitor.update, assigned)
        except Exception as exc:  # the lag gauge must never take the worker down
            logger.warning("consumer lag not measured: %s", exc)

    return monitor


# -- decisions dominated by thresholds (issue 8) -------------------------------------------------
#: A user counts as frozen when its Ψ̂ moved this many times since its only published update.
FROZEN_AFTER = 5
#: Warn when more than this share of published users is frozen (once at least FROZEN_MIN_USERS).
FROZEN_WARN_SHARE, FROZEN_MIN_USERS = 0.5, 50
DECISIONS_FROZEN = Gauge(
    "gplr_decisions_frozen_share",
    "Share of published users whose Ψ̂ moved FROZEN_AFTER+ times since their only persona update "
    "(high = push threshold or hysteresis too coarse for this shop's scores)", registry=REGISTRY)


class FrozenWatch:
    """Per-worker counts behind `gplr_decisions_frozen_share`, and a rate-limited warning."""

    def __init__(self, clock: Any = None) -> None:
        import time

        self.users = 0  # users with at least one propagated update
        self.frozen = 0  # of those: published once, then FROZEN_AFTER+ silent Ψ̂ changes
        self._clock = clock or time.monotonic
        self._warned = -float("inf")

    @property
    def share(self) -> float:
        return self.frozen / self.users if self.users else 0.0

    def observe(self, first: bool, froze: bool, thawed: bool) -> None:
        self.users += first
        self.frozen += froze - thawed
        DECISIONS_FROZEN.set(self.share)
        if (self.users >= FROZEN_MIN_USERS and self.share > FROZEN_WARN_SHARE
                and self._clock() - self._warned > 60.0):
            self._warned = self._clock()
            logger.warning("persona decisions dominated by thresholds: %.0f%% of %d users never "
                           "re-published after %d Ψ̂ changes (lower GPLR_EPS / GPLR_HYSTERESIS)",
                           100 * self.share, self.users, FROZEN_AFTER)
