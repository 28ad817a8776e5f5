"""Stream subcommands of `gplr`: worker, produce, watch, export, demo, broker, trainer and backfill.

Settings come from the environment (`StreamConfig.from_env()`); flags only choose what to do.
The producer loop and the topic reader they share with the demo and the benchmarks live in
`streams.topic_io`.
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
from collections.abc import Iterable, Iterator
from pathlib import Path

from core.events import PurchaseEvent
from streams.config import ConfigError, StreamConfig
from streams.topic_io import latest_personas, publish_events, read_topic

__all__ = ["register", "main", "synthetic_events", "run_worker", "format_update"]

logger = logging.getLogger(__name__)


# -- shared pieces ----------------------------------------------------------------------------
def synthetic_events(n_users: int, seed: int = 0):
    """(SyntheticShop, its events in time order) for `n_users` users."""
    from core.data import iter_events
    from core.synthetic import make_shop

    shop = make_shop(n_users=n_users, n_items=max(60, (n_users * 3) // 10), seed=seed)
    return shop, iter_events(shop.frame)


def format_update(update: dict) -> str:
    """One persona update (or recommendation list) as a line of text:
    `user: A (0.41), B (0.22)  [reason]`, `user -> Item (0.93), Other (0.80)  [lgcn3]`."""
    if "items" in update:
        items = ", ".join(f"{i.get('item_name') or i.get('item_id')} ({i.get('score', 0):.2f})"
                          for i in update.get("items", []))
        return f"{update.get('user_id')} -> {items or '-'}  [{update.get('model', '')}]"
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


def _llm_problem(config: StreamConfig) -> str | None:
    """Why the configured LLM endpoint cannot answer (URL named), or None when it can or is unused."""
    if config.labeler != "openai" or config.llm is None:
        return None
    from core.labelers.openai_labeler import LLMError, check_endpoint

    try:
        check_endpoint(config.llm)
    except LLMError as exc:
        return str(exc)
    return None


def _cmd_worker(args: argparse.Namespace) -> int:
    config = _config()
    if args.loglevel:
        config = dataclasses.replace(config, log_level=args.loglevel)
    _need_bootstrap(config, "worker")
    problem = _llm_problem(config)
    if problem:  # a service may start before its LLM endpoint: say so loudly, keep running
        logger.warning("GPLR_LABELER=openai but %s; label requests will fail until it answers", problem)
    return run_worker(config, config.log_level)


def _cmd_produce(args: argparse.Namespace) -> int:
    from streams.topics import create_topics, topics_for

    config = _config()
    _need_bootstrap(config, "produce")
    if args.synthetic:
        _, events = synthetic_events(args.synthetic, args.seed)
        total = None
    else:
        from core.data import iter_events
        from core.data_options import load_data

        # purchases are published in ts order: a file without one needs --now (send-time stamps)
        frame, _ = load_data(args, Path(args.file), "produce", args.format, require_ts=not args.now)
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
    topics = topics_for(config)
    topic = topics.recommendations if args.recommendations else topics.persona_updates
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
                print(f"gplr watch: {msg.error()}", file=sys.stderr)
                continue
            last = time.monotonic()
            seen += 1
            try:
                update = json.loads(msg.value() or b"")
            except (TypeError, ValueError):
                print(f"gplr watch: unreadable record at offset {msg.offset()}", file=sys.stderr)
                continue
            if args.json:  # one event per line, never wrapped: for jq and scripts
                print(json.dumps(update, ensure_ascii=False, separators=(",", ":")), flush=True)
            else:
                console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {format_update(update)}",
                              highlight=False, soft_wrap=True)
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
    return 0


EXPORT_SUFFIXES = (".csv", ".parquet")


def _cmd_export(args: argparse.Namespace) -> int:
    """Write the current personas of every user (the latest persona update each) as CSV/Parquet:
    `user_id, personas, scores` ('|'-joined, the `gplr label` CSV layout) plus labelled_by, reason
    and ts, so `segment` and `train-recsys --user-labels` read it as they read `gplr label` output."""
    import pandas as pd

    from streams.topics import topics_for

    out = Path(args.out)
    if out.suffix.lower() not in EXPORT_SUFFIXES:
        raise SystemExit(f"gplr export: --out {out} must end in .csv or .parquet")
    config = _config()
    _need_bootstrap(config, "export")
    topic = topics_for(config).persona_updates
    if args.wait > 0:
        from streams.demo import LagWatcher

        watcher = LagWatcher(config)
        try:
            if not watcher.wait_drained(timeout=args.wait):
                raise SystemExit(f"gplr export: the worker (group {config.app_id}) has not caught up after "
                                 f"{args.wait:g}s (lag {watcher.lag()}); is `gplr worker` running?")
        finally:
            watcher.close()
    latest = latest_personas(read_topic(config.kafka_bootstrap, topic, timeout=args.timeout))
    if not latest:
        raise SystemExit(f"gplr export: no persona updates in {topic} (is a worker running with the same "
                         "KAFKA_BOOTSTRAP and GPLR_TOPIC_PREFIX?)")
    rows = [{"user_id": user,
             "personas": "|".join(str(p.get("name")) for p in u.get("personas", [])),
             "scores": "|".join(f"{float(p.get('score', 0.0)):.6g}" for p in u.get("personas", [])),
             "labelled_by": u.get("labelled_by", ""), "reason": u.get("reason", ""), "ts": u.get("ts")}
            for user, u in sorted(latest.items())]
    frame = pd.DataFrame(rows, columns=["user_id", "personas", "scores", "labelled_by", "reason", "ts"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")  # a crash never leaves half a file under the name
    if out.suffix.lower() == ".csv":
        frame.to_csv(tmp, index=False)
    else:
        frame.to_parquet(tmp, index=False)
    tmp.replace(out)
    print(json.dumps({"users": len(frame), "out": str(out), "topic": topic}))
    return 0


def _explain_source(user: str, timeout: float) -> dict | None:
    """The user's latest persona-updates record (its personas with their evidence), or None."""
    from streams.topics import topics_for

    config = _config()
    _need_bootstrap(config, "explain")
    return latest_personas(read_topic(config.kafka_bootstrap, topics_for(config).persona_updates,
                                      timeout=timeout)).get(user)


def _cmd_demo(args: argparse.Namespace) -> int:
    from streams.demo import run_demo

    config = _config()
    if args.labeler == "openai":
        from core.labelers.openai_labeler import LLMConfig

        try:
            problem = _llm_problem(dataclasses.replace(config, labeler="openai", llm=LLMConfig.from_env()))
        except ValueError as exc:
            problem = str(exc)
        if problem:
            raise SystemExit(f"gplr demo: --labeler openai: {problem}")
    frame = None
    if args.data is not None:
        from core.data_options import load_data

        if args.limit < 0:
            raise SystemExit("gplr demo: --limit must be >= 0")
        # the demo stamps each purchase with its send time: ts only orders the replay
        frame, _ = load_data(args, args.data, "demo", require_ts=False)
    return run_demo(config, data=args.data, users=args.users, rate=args.rate, timeout=args.timeout,
                    live=not args.no_live, keep=args.keep, labeler=args.labeler, frame=frame,
                    personas=args.personas, labels=args.labels, limit=args.limit)


def _cmd_broker(args: argparse.Namespace) -> int:
    from streams.broker import EmbeddedBroker, free_port

    config = _config()
    data_dir = Path(args.data_dir) if args.data_dir else config.broker_dir
    if not _port_free(args.port):
        raise SystemExit(f"gplr broker: port {args.port} is already in use (another broker?); "
                         f"pick another with --port N, e.g. --port {free_port()}")
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


# -- gplr trainer ------------------------------------------------------------------------------
def _add_trainer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("trainer", help="recommender trainer service: topics in, recommendations out",
                       description="Rebuild the graph and personas from the purchases and persona-updates "
                                   "topics, retrain on a schedule (GPLR_TRAIN_INTERVAL_S) or after "
                                   "GPLR_TRAIN_AFTER_EDGES new edges, publish top-K recommendations for "
                                   "changed users. Settings: recsys/trainer.py and streams/config.py; "
                                   "service: streams/trainer_service.py.")
    p.add_argument("--once", action="store_true", help="read the backlog, train and publish once, exit")
    p.add_argument("--model", help="override GPLR_TRAINER_MODEL (auto, ease, ease-persona, lgcn3, lightgcn, ...)")
    p.add_argument("--epochs", type=int, help="override GPLR_TRAINER_EPOCHS")
    p.add_argument("--k", type=int, help="override GPLR_RECS_K")
    p.set_defaults(func=_cmd_trainer)


def _cmd_trainer(args: argparse.Namespace) -> int:
    from streams.trainer_service import service_from_env, start_trainer_metrics

    overrides = {k: v for k, v in (("model", args.model and args.model.lower()), ("epochs", args.epochs),
                                   ("top_k", args.k)) if v is not None}
    try:
        service = service_from_env(**overrides)
        server = None if args.once else start_trainer_metrics(service.config.metrics_port)
    except (ConfigError, OSError, ValueError) as exc:
        raise SystemExit(f"gplr trainer: {exc}") from None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        published = service.run(once=args.once, stop=stop)
    finally:
        if server is not None:
            server.shutdown()
    logger.info("trainer stopped: %d recommendation lists published", published)
    return 0


def _port_free(port: int, host: str = "127.0.0.1") -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the stream commands to `gplr` (entry point group gplr.commands)."""
    from core.data_options import add_data_options
    from streams.demo import DEMO_LIMIT

    p = subparsers.add_parser("worker", help="run the streaming persona worker (Faust)")
    p.add_argument("--loglevel", choices=["critical", "error", "warning", "info", "debug"],
                   help="worker log level (default GPLR_LOG_LEVEL)")
    p.set_defaults(func=_cmd_worker)

    p = subparsers.add_parser("produce", help="publish a dataset's purchases in time order")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("file", nargs="?", help="CSV/Parquet purchases (Online Retail or canonical columns)")
    src.add_argument("--synthetic", type=int, metavar="N", help="a synthetic shop with N users")
    p.add_argument("--format", choices=["auto", "online-retail", "table"], default="auto")
    add_data_options(p)
    p.add_argument("--rate", type=float, default=None, metavar="EVENTS_PER_S",
                   help="pace (default: as fast as possible)")
    p.add_argument("--limit", type=int, default=None, help="publish at most this many purchases")
    p.add_argument("--seed", type=int, default=0, help="synthetic shop seed")
    p.add_argument("--now", action="store_true",
                   help="stamp each purchase with the send time (then the file needs no ts column)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_produce)

    p = subparsers.add_parser("watch", help="tail persona updates (or --recommendations)")
    p.add_argument("--from-beginning", action="store_true")
    p.add_argument("--limit", type=int, default=0, help="stop after this many updates")
    p.add_argument("--idle", type=float, default=0, help="stop after this many seconds without updates")
    p.add_argument("--json", action="store_true", help="one persona update per line as JSON (no wrapping)")
    p.add_argument("--recommendations", action="store_true",
                   help="tail the recommendations `gplr trainer` publishes instead")
    p.set_defaults(func=_cmd_watch)

    p = subparsers.add_parser("export", help="write every user's current personas (from the stream) to CSV/Parquet")
    p.add_argument("--out", required=True, help="personas.csv or personas.parquet")
    p.add_argument("--timeout", type=float, default=60.0, help="most seconds to read the topic")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="first wait (up to SECONDS) until the worker has processed every purchase")
    p.set_defaults(func=_cmd_export)

    explain = subparsers.choices.get("explain")  # `gplr explain` (core) without --from reads the topic
    if explain is not None:
        explain.set_defaults(stream_source=_explain_source)

    p = subparsers.add_parser("demo", help="embedded broker + worker + replay with a live view")
    p.add_argument("--data", type=Path, default=None, help="purchases file instead of the synthetic shop")
    add_data_options(p)
    p.add_argument("--personas", type=Path, default=None,
                   help="persona set for --data (default: GPLR_PERSONAS, else personas.json beside the data)")
    p.add_argument("--labels", type=Path, default=None,
                   help="recorded user labels for --data (`gplr label` output or CustomerID,personas CSV): "
                        "replayed as the labeler and used to score quality (default: "
                        "user_personas_gpt4.csv.gz beside the data)")
    p.add_argument("--limit", type=int, default=DEMO_LIMIT,
                   help="purchases replayed from --data (default %(default)s; 0: all)")
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

    _add_trainer(subparsers)
    from streams.backfill import add_parser as add_backfill

    add_backfill(subparsers)


def main(argv: list[str] | None = None) -> int:
    """`python -m streams.cli CMD`: the stream commands alone (how the demo and tests spawn workers,
    so a worker never depends on the batch or recsys command modules importing cleanly)."""
    parser = argparse.ArgumentParser(prog="python -m streams.cli")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from core.cli import run_command

    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
