"""Stream subcommands of `gplr`: worker, produce, watch, demo and broker.

Settings come from the environment (`StreamConfig.from_env()`); flags only choose what to do.
`publish_events` is the one producer loop, shared by `produce`, the demo and the benchmark.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator

from core.events import PurchaseEvent
from streams.config import ConfigError, StreamConfig

__all__ = ["register", "main", "publish_events", "synthetic_events", "run_worker", "format_update"]

logger = logging.getLogger(__name__)


# -- shared pieces ----------------------------------------------------------------------------
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
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "acks": "all", "log_level": 2,
                         "message.timeout.ms": int(timeout * 1000)})
    failed: list[str] = []

    def on_delivery(err, _msg) -> None:
        if err is not None:
            failed.append(str(err))

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
            while True:
                try:
                    producer.produce(topic, value=event.to_json(), key=event.user_id, on_delivery=on_delivery)
                    break
                except BufferError:  # local queue full: let deliveries drain
                    producer.poll(0.05)
            producer.poll(0)
            sent += 1
            if bar is not None and sent % 200 == 0:
                bar[0].update(bar[1], completed=sent)
    finally:
        remaining = producer.flush(timeout + 5)
        if bar is not None:
            bar[0].update(bar[1], completed=sent)
            bar[0].stop()
    if remaining or failed:
        raise RuntimeError(f"{remaining + len(failed)} of {sent} records not delivered"
                           f"{': ' + failed[0] if failed else ''}")
    return sent


def _progress(total: int | None):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("publishing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        transient=False)
    task = progress.add_task("publish", total=total)
    progress.start()
    return progress, task


def synthetic_events(n_users: int, seed: int = 0):
    """(SyntheticShop, its events in time order) for `n_users` users."""
    from core.data import iter_events
    from core.synthetic import make_shop

    shop = make_shop(n_users=n_users, n_items=max(60, (n_users * 3) // 10), seed=seed)
    return shop, iter_events(shop.frame)


def format_update(update: dict) -> str:
    """One persona update as a line of text: `user: A (0.41), B (0.22)  [reason]`."""
    personas = ", ".join(f"{p.get('name')} ({p.get('score', 0):.2f})" for p in update.get("personas", []))
    return f"{update.get('user')}: {personas or '-'}  [{update.get('reason', '')}]"


def _config() -> StreamConfig:
    try:
        return StreamConfig.from_env()
    except ConfigError as exc:
        raise SystemExit(f"gplr: configuration error: {exc}") from None


def _need_bootstrap(config: StreamConfig, command: str) -> None:
    if not config.kafka_bootstrap:
        raise SystemExit(f"gplr {command}: KAFKA_BOOTSTRAP is empty; set it (e.g. start `gplr broker` "
                         "and export KAFKA_BOOTSTRAP=127.0.0.1:9092) or run `gplr demo`")


# -- commands ---------------------------------------------------------------------------------
def run_worker(config: StreamConfig, loglevel: str = "info") -> int:
    """Run the Faust app as a worker until SIGTERM/SIGINT (Faust stops gracefully on both)."""
    import faust

    from streams.app import create_app
    from streams.metrics import install_lag_monitor, start_metrics_server
    from streams.topics import create_topics, topics_for

    app = create_app(config)  # importing the app registers its internal topics
    create_topics(config.kafka_bootstrap, topics_for(config).all(), config.partitions)
    start_metrics_server(config.metrics_port, config.metrics_bind, config.metrics_max_connections)
    install_lag_monitor(app, config.kafka_bootstrap)
    worker = faust.Worker(app, loglevel=loglevel, redirect_stdouts=False)
    worker.execute_from_commandline()  # raises SystemExit when the worker stops
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    config = _config()
    if args.loglevel:
        config = dataclasses.replace(config, log_level=args.loglevel)
    _need_bootstrap(config, "worker")
    return run_worker(config, config.log_level)


def _cmd_produce(args: argparse.Namespace) -> int:
    from streams.topics import create_topics, topics_for

    config = _config()
    _need_bootstrap(config, "produce")
    if args.synthetic:
        _, events = synthetic_events(args.synthetic, args.seed)
        total = None
    else:
        from core.data import iter_events, load_purchases

        path = Path(args.file)
        if not path.is_file():
            raise SystemExit(f"gplr produce: no such file {path}")
        frame, report = load_purchases(path, fmt=args.format)
        logger.info("loaded %d of %d rows (dropped %s)", report.rows_kept, report.rows_in, report.dropped)
        events, total = iter_events(frame), len(frame)
    if args.limit:
        events = _take(events, args.limit)
        total = args.limit if total is None else min(total, args.limit)
    topics = topics_for(config)
    create_topics(config.kafka_bootstrap, [topics.purchases], config.partitions)
    sent = publish_events(config.kafka_bootstrap, topics.purchases, events, rate=args.rate, total=total,
                          progress=not args.quiet, stamp_now=args.now)
    print(json.dumps({"published": sent, "topic": topics.purchases}))
    return 0


def _take(events: Iterable[PurchaseEvent], n: int) -> Iterator[PurchaseEvent]:
    for i, event in enumerate(events):
        if i >= n:
            return
        yield event


def _cmd_watch(args: argparse.Namespace) -> int:
    import uuid

    from confluent_kafka import Consumer
    from rich.console import Console

    config = _config()
    _need_bootstrap(config, "watch")
    from streams.topics import topics_for

    console = Console()
    topic = topics_for(config).persona_updates
    consumer = Consumer({
        "bootstrap.servers": config.kafka_bootstrap, "group.id": f"gplr-watch-{uuid.uuid4().hex[:8]}",
        "auto.offset.reset": "earliest" if args.from_beginning else "latest",
        "enable.auto.commit": False, "log_level": 3,
    })
    consumer.subscribe([topic])
    seen, last = 0, time.monotonic()
    try:
        while not args.limit or seen < args.limit:
            msg = consumer.poll(0.5)
            if msg is None:
                if args.idle and time.monotonic() - last > args.idle:
                    break
                continue
            if msg.error():
                console.print(f"[red]{msg.error()}[/red]")
                continue
            last = time.monotonic()
            seen += 1
            try:
                update = json.loads(msg.value())
            except (TypeError, ValueError):
                console.print(f"[yellow]unreadable record at offset {msg.offset()}[/yellow]")
                continue
            console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {format_update(update)}", highlight=False)
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from streams.demo import run_demo

    return run_demo(_config(), data=args.data, users=args.users, rate=args.rate, timeout=args.timeout,
                    live=not args.no_live, keep=args.keep, labeler=args.labeler)


def _cmd_broker(args: argparse.Namespace) -> int:
    from streams.broker import EmbeddedBroker

    config = _config()
    data_dir = Path(args.data_dir) if args.data_dir else config.broker_dir
    broker = EmbeddedBroker(port=args.port, data_dir=data_dir, fresh=False).start()
    print(f"embedded Kafka on {broker.bootstrap} (data {data_dir}); "
          f"export KAFKA_BOOTSTRAP={broker.bootstrap}; Ctrl-C stops it", flush=True)
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    while not stopped.wait(1.0):
        if not broker.is_running():
            print("broker exited:\n" + broker.log_tail(), file=sys.stderr)
            return 1
    broker.stop()
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the stream commands to `gplr` (entry point group gplr.commands)."""
    p = subparsers.add_parser("worker", help="run the streaming persona worker (Faust)")
    p.add_argument("--loglevel", choices=["critical", "error", "warning", "info", "debug"],
                   help="worker log level (default GPLR_LOG_LEVEL)")
    p.set_defaults(func=_cmd_worker)

    p = subparsers.add_parser("produce", help="publish a dataset's purchases in time order")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("file", nargs="?", help="CSV/Parquet purchases (Online Retail or canonical columns)")
    src.add_argument("--synthetic", type=int, metavar="N", help="a synthetic shop with N users")
    p.add_argument("--format", choices=["auto", "online-retail", "table"], default="auto")
    p.add_argument("--rate", type=float, default=None, metavar="EVENTS_PER_S", help="pace (default: as fast as possible)")
    p.add_argument("--limit", type=int, default=None, help="publish at most this many purchases")
    p.add_argument("--seed", type=int, default=0, help="synthetic shop seed")
    p.add_argument("--now", action="store_true", help="stamp each purchase with the send time")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_produce)

    p = subparsers.add_parser("watch", help="tail persona updates")
    p.add_argument("--from-beginning", action="store_true")
    p.add_argument("--limit", type=int, default=0, help="stop after this many updates")
    p.add_argument("--idle", type=float, default=0, help="stop after this many seconds without updates")
    p.set_defaults(func=_cmd_watch)

    p = subparsers.add_parser("demo", help="embedded broker + worker + replay with a live view")
    p.add_argument("--data", type=Path, default=None, help="purchases file instead of the synthetic shop")
    p.add_argument("--users", type=int, default=500, help="users to replay")
    p.add_argument("--rate", type=float, default=100.0, help="events per second (0: unpaced)")
    p.add_argument("--timeout", type=float, default=150.0, help="stop after this many seconds")
    p.add_argument("--labeler", default="replay", choices=("replay", "embedding", "openai"),
                   help="replay: recorded labels play a perfect LLM (default); embedding: the offline "
                        "MiniLM labeler; openai: the endpoint in OPENAI_BASE_URL")
    p.add_argument("--no-live", action="store_true", help="no live table (for logs and CI)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (worker log, state) afterwards")
    p.set_defaults(func=_cmd_demo)

    p = subparsers.add_parser("broker", help="run the embedded Kafka broker in the foreground")
    p.add_argument("--port", type=int, default=9092)
    p.add_argument("--data-dir", default=None, help="default: GPLR_DATA_DIR/broker")
    p.set_defaults(func=_cmd_broker)


def main(argv: list[str] | None = None) -> int:
    """`python -m streams.cli CMD`: the stream commands alone (how the demo and tests spawn workers,
    so a worker never depends on the batch or recsys command modules importing cleanly)."""
    parser = argparse.ArgumentParser(prog="python -m streams.cli")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
