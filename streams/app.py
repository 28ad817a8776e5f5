"""`create_app(config)`: the Faust app with every table and agent registered (`gplr worker` runs it)."""
from __future__ import annotations

import gc
import hashlib
import logging

import faust

from streams._compat import (
    check_hooks,
    commit_only_on_success,
    configure_fetch_pacing,
    fast_gzip,
    hold_deliveries_until_seek,
    rewind_dropped_heads,
    track_changelog_sends,
    widen_producer_buffer,
)
from streams.agents import StreamLogic, StreamTopics, register_agents
from streams.config import ConfigError, StreamConfig, faust_settings
from streams.flow import register_purge
from streams.labeling import LabelPolicy, register_labeling
from streams.tables import define_tables

__all__ = ["create_app", "group_instance_id", "require_lz4"]

logger = logging.getLogger(__name__)

#: Changelog records Faust may queue before it pauses delivery to flush (its default is 100).
PRODUCER_BUFFER_MESSAGES = 20_000
#: Batches send bursts (a row write per touched row, an update per changed user): bigger produce
#: batches (Faust's default is 16 KiB) mean fewer requests for the worker and the broker to handle.
#: gzip: the embedded broker holds every record in memory (streams.flow); aiokafka reads gzip natively.
PRODUCER_SETTINGS = {"producer_max_batch_size": 256 * 1024, "producer_compression_type": "gzip"}


def group_instance_id(config: StreamConfig) -> str:
    """A static group member id, stable across restarts of one worker (same data dir).

    Why: after a kill -9 the dead member stays in the consumer group until its session expires,
    and the embedded broker (noida-db 0.2.3) never completes the rebalance that should expel it,
    so a restarted worker would wait forever. With static membership (KIP-345) the restarted
    worker takes over its own slot at once. Each worker has its own RocksDB directory, so the
    directory identifies it. A replacement worker at another path (a new disk or host) must
    take the dead worker's id explicitly (GPLR_INSTANCE_ID), else it re-joins forever on
    noida-db (a real Kafka expels the dead member after the session timeout).
    """
    digest = hashlib.sha1(str(config.data_dir.resolve()).encode()).hexdigest()[:12]
    return f"{config.app_id}-{digest}"


def require_lz4() -> None:
    """Raise ConfigError unless aiokafka can read lz4 batches (`gplr backfill` writes them)."""
    from aiokafka.codec import has_lz4

    if not has_lz4():
        raise ConfigError("aiokafka cannot read lz4 batches, which gplr backfill writes: "
                          "pip install 'aiokafka[lz4]' (cramjam)")


def create_app(config: StreamConfig) -> faust.App:
    """Build the app for `config`; nothing connects until the worker starts."""
    if config.hops != 1:
        logger.warning("GPLR_HOPS=%d ignored: the stream propagates exactly one hop (ℓ̂ = 1)", config.hops)
    config.faust_dir.mkdir(parents=True, exist_ok=True)  # Faust creates only the last level
    check_hooks()  # fail at start-up, not mid-stream, when a library changed a private hook
    require_lz4()  # a backfilled changelog is lz4: fail here, not at the first batch of a recovery
    track_changelog_sends()  # batches are acked only once their rows are in the changelogs
    fast_gzip()  # changelog and op batches at zlib level 1, not aiokafka's 9
    commit_only_on_success()  # a commit refused during a rebalance must not count as done
    rewind_dropped_heads()  # records faust fetched but never delivered are read again
    hold_deliveries_until_seek()  # and none is dropped at the end of a recovery in the first place
    configure_fetch_pacing(config.kafka_bootstrap)  # the embedded broker answers empty fetches at once
    settings = faust_settings(config)
    settings.setdefault("consumer_group_instance_id", config.instance_id or group_instance_id(config))
    settings.update(PRODUCER_SETTINGS)
    app = faust.App(config.app_id, **settings)
    personas = config.personas()
    topics = StreamTopics.declare(app, config)
    tables = define_tables(app, config.partitions)
    logic = StreamLogic(config, personas, tables, LabelPolicy(config))
    register_agents(app, logic, topics)

    @app.task
    async def _widen_producer_buffer() -> None:
        # Table writes queue their changelog records in Faust's producer buffer; over 100 queued
        # the conductor stops delivering and flushes them one by one (asyncio.wait_for per
        # record). A batch writes hundreds of rows at once, so allow a batch's worth.
        widen_producer_buffer(app, PRODUCER_BUFFER_MESSAGES)

    # faust's stub wants `(sender, /, *args, signal=..., **kw)`; **kwargs takes `signal` just the same.
    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def _forget_revoked(sender: faust.App, revoked: object, **kwargs: object) -> None:
        tables.clear_caches()  # rows of partitions now elsewhere may change behind the cache

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def _forget_assigned(sender: faust.App, assigned: object, **kwargs: object) -> None:
        tables.clear_caches()  # rows recovered from the changelog replace what was cached

    register_labeling(app, config, personas, topics, users=tables.users)
    register_purge(app, config, [topics.user_ops.get_topic_name(), topics.item_ops.get_topic_name()])
    app.gplr = logic  # type: ignore[attr-defined]  # for tests and the web views
    # Faust's RocksDB store runs gc.collect() for every table on every rebalance; with numpy,
    # scipy and Faust loaded that is ~0.2 s each, seconds per assignment. Moving what exists now
    # (modules, the app) to the permanent generation keeps those collections short.
    gc.freeze()
    logger.info("app %s: %d personas, eps=%s, %d partitions", config.app_id, len(personas),
                config.eps, config.partitions)
    return app

