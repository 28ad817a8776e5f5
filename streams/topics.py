"""Topic names (one prefix for all) and their idempotent creation through the admin API.

Public topics are the contract with producers and consumers outside the worker; internal topics
(the app's repartition / push streams) are registered by the module that uses them with
`register_internal`, so `create_topics(..., Topics(prefix).all())` creates every one up front and
a fresh broker never races a worker's first send.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

__all__ = [
    "Topics",
    "PUBLIC_TOPICS",
    "register_internal",
    "internal_topics",
    "topics_for",
    "create_topics",
    "admin_client",
]

logger = logging.getLogger(__name__)

PUBLIC_TOPICS: tuple[str, ...] = (
    "purchases",
    "persona-updates",
    "label-requests",
    "labels",
    "recommendations",
    "purchases-dlq",
)
_internal: dict[str, None] = {}  # insertion-ordered set of internal topic suffixes


def _check_suffix(suffix: str) -> str:
    if not suffix or not all(c.isalnum() or c in "._-" for c in suffix):
        raise ValueError(f"invalid topic suffix {suffix!r}")
    return suffix


def register_internal(*suffixes: str) -> None:
    """Declare internal topic suffixes (e.g. "item-pushes") so `Topics.all()` lists them."""
    for suffix in suffixes:
        _internal[_check_suffix(suffix)] = None


def internal_topics() -> tuple[str, ...]:
    """Registered internal suffixes, in registration order."""
    return tuple(_internal)


@dataclass(frozen=True)
class Topics:
    """Full topic names for one prefix, e.g. `Topics("gplr.").purchases == "gplr.purchases"`."""

    prefix: str = "gplr."

    def name(self, suffix: str) -> str:
        return f"{self.prefix}{_check_suffix(suffix)}"

    @property
    def purchases(self) -> str:
        return self.name("purchases")

    @property
    def persona_updates(self) -> str:
        return self.name("persona-updates")

    @property
    def label_requests(self) -> str:
        return self.name("label-requests")

    @property
    def labels(self) -> str:
        return self.name("labels")

    @property
    def recommendations(self) -> str:
        return self.name("recommendations")

    @property
    def purchases_dlq(self) -> str:
        return self.name("purchases-dlq")

    def public(self) -> list[str]:
        return [self.name(s) for s in PUBLIC_TOPICS]

    def internal(self) -> list[str]:
        return [self.name(s) for s in _internal]

    def all(self) -> list[str]:
        """Public then internal topics (every topic the worker reads or writes, bar Faust's own)."""
        return self.public() + self.internal()


def topics_for(config) -> Topics:  # config: streams.config.StreamConfig
    """The `Topics` of a `StreamConfig`."""
    return Topics(config.topic_prefix)


def admin_client(bootstrap: str) -> AdminClient:
    """An admin client that gives up quickly when the broker is absent."""
    return AdminClient({"bootstrap.servers": bootstrap, "socket.timeout.ms": 10000})


def create_topics(
    bootstrap: str, names: Iterable[str], partitions: int, timeout: float = 30.0
) -> None:
    """Create `names` with `partitions` partitions; topics that already exist are kept as they are.

    Returns once every topic is in the metadata with all partitions led, so a producer's first
    send cannot hit UNKNOWN_TOPIC_OR_PART. Raises `TimeoutError` or `KafkaException` otherwise.
    """
    names = list(dict.fromkeys(names))
    if not names:
        return
    admin = admin_client(bootstrap)
    deadline = time.monotonic() + timeout
    existing = admin.list_topics(timeout=timeout).topics
    missing = [n for n in names if n not in existing]
    if missing:
        futures = admin.create_topics(
            [NewTopic(n, num_partitions=partitions, replication_factor=1) for n in missing],
            operation_timeout=timeout,
        )
        for name, future in futures.items():
            try:
                future.result(timeout=max(1.0, deadline - time.monotonic()))
                logger.info("created topic %s (%d partitions)", name, partitions)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
    for name in names:
        if name in existing and len(existing[name].partitions) != partitions:
            logger.warning("topic %s exists with %d partitions (wanted %d); kept",
                           name, len(existing[name].partitions), partitions)
    _wait_ready(admin, names, deadline)


def _wait_ready(admin: AdminClient, names: list[str], deadline: float) -> None:
    while True:
        meta = admin.list_topics(timeout=max(1.0, deadline - time.monotonic())).topics
        pending = [
            n for n in names
            if n not in meta or meta[n].error is not None or not meta[n].partitions
            or any(p.leader < 0 for p in meta[n].partitions.values())
        ]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"topics not ready: {pending}")
        time.sleep(0.1)
