"""End-to-end stream benchmark: GPLR workers beside a no-op Faust agent on the same broker.

For each setting (a no-op agent; GPLR with 1 and with 2 workers) a fresh set of topics on one
broker (embedded noida-db unless KAFKA_BOOTSTRAP is set) is loaded with the same backlog of
synthetic purchases (plus 5% prototype labels on the labels topic), then the workers start:

* throughput = backlog events / (last output − worker ready): the no-op agent's last event, or
  the last persona update once the GPLR group has no lag left on any topic it reads;
* latency: afterwards the rest of the purchases are published at a fixed rate (half the no-op
  ceiling, capped by what 1 worker sustained), stamped with the send time; p50/p99 of
  update.ts − purchase.ts over the persona updates they cause;
* CPU: CPU ms per backlog event of the worker process(es) between ready and drained, beside
  the no-op agent's (`cpu_ratio_vs_noop`: the throughput ratio with the machine's other load
  mostly taken out);
* max_abs_error_vs_exact: every user's last published scores against core's exact Ψ on the
  whole stream (β = 0, hysteresis 0, so the last update is the current Ψ̂ row; must be ≤ ε).

    python bench/stream.py            # 2,000 users (~24k purchases)
    python bench/stream.py --quick    # 250 users, < 2 min

Prints progress lines, then one JSON object as the last line.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from core.affinity import compute_affinity, prototype_matrix  # noqa: E402
from core.data import iter_events  # noqa: E402
from core.graph import BipartiteGraph  # noqa: E402
from core.synthetic import make_shop  # noqa: E402
from streams.broker import bootstrap_or_embedded, free_port  # noqa: E402
from streams.config import StreamConfig, faust_settings  # noqa: E402
from streams.demo import LagWatcher, UpdateLog, WorkerProcess  # noqa: E402
from streams.records import label_record  # noqa: E402
from streams.topic_io import publish_events, publish_records  # noqa: E402
from streams.topics import Topics, create_topics  # noqa: E402

logger = logging.getLogger("bench.stream")
NOOP_DONE = "NOOP_DONE "


# -- the no-op ceiling -----------------------------------------------------------------------------
def noop_worker(count: int) -> None:
    """(subprocess) A Faust app with one agent that only counts the purchases topic's records."""
    import faust

    from streams._compat import configure_fetch_pacing

    config = StreamConfig.from_env()
    configure_fetch_pacing(config.kafka_bootstrap)  # the same consumer behaviour as the GPLR worker
    config.faust_dir.mkdir(parents=True, exist_ok=True)
    app = faust.App(config.app_id, **faust_settings(config))
    topic = app.topic(Topics(config.topic_prefix).purchases, key_type=bytes, key_serializer="raw",
                      value_type=bytes, value_serializer="raw", partitions=config.partitions)
    seen = {"n": 0}

    @app.agent(topic)
    async def count_events(stream) -> None:
        async for _event in stream.events():
            seen["n"] += 1
            if seen["n"] == count:
                print(NOOP_DONE + json.dumps({"last": time.time()}), flush=True)

    faust.Worker(app, loglevel="info", redirect_stdouts=False).execute_from_commandline()


class _NoopProcess(WorkerProcess):
    def start(self, count: int = 0) -> _NoopProcess:  # type: ignore[override]
        import subprocess

        env = {**os.environ, **self.config.as_env(), "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, "--noop-worker", str(count)], env=env, stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        return self


def _cpu_s(worker: WorkerProcess) -> float:
    """CPU seconds (user + system) the worker process has used so far (0 where /proc is missing).

    Why: on a shared machine events/s swing with other load; CPU per event does much less."""
    try:
        fields = Path(f"/proc/{worker.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, TypeError):
        return 0.0


def _wait_ready_at(worker: WorkerProcess, marker: str = "Ready", timeout: float = 90.0) -> float:
    """Wall time at which `marker` appeared in the worker's log (polled every 50 ms)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if marker in worker.log():
            return time.time()
        if not worker.is_running():
            raise RuntimeError(f"worker exited:\n{worker.log()[-3000:]}")
        time.sleep(0.05)
    raise RuntimeError(f"no {marker!r} after {timeout}s:\n{worker.log()[-3000:]}")


def run_noop(cfg: StreamConfig, backlog: list, workdir: Path) -> tuple[float, float]:
    """(events/s, CPU ms per event) of the no-op agent over the backlog."""
    cfg = _isolated(cfg, "noop", workdir)
    create_topics(cfg.kafka_bootstrap, [Topics(cfg.topic_prefix).purchases], cfg.partitions)
    publish_events(cfg.kafka_bootstrap, Topics(cfg.topic_prefix).purchases, backlog)
    worker = _NoopProcess(cfg, workdir / "noop.log").start(len(backlog))
    try:
        t_ready = _wait_ready_at(worker)
        cpu_ready = _cpu_s(worker)
        deadline = time.monotonic() + 120
        while NOOP_DONE not in worker.log():
            if not worker.is_running() or time.monotonic() > deadline:
                raise RuntimeError(f"no-op worker failed:\n{worker.log()[-3000:]}")
            time.sleep(0.05)
        cpu = _cpu_s(worker) - cpu_ready
        line = next(x for x in worker.log().splitlines() if x.startswith(NOOP_DONE))
        last = json.loads(line[len(NOOP_DONE):])["last"]
    finally:
        worker.kill()
    return len(backlog) / max(1e-6, last - t_ready), 1000 * cpu / len(backlog)


# -- GPLR workers ----------------------------------------------------------------------------------
def _isolated(cfg: StreamConfig, name: str, workdir: Path) -> StreamConfig:
    tag = uuid.uuid4().hex[:6]
    return dataclasses.replace(cfg, topic_prefix=f"bench-{name}-{tag}.", app_id=f"bench-{name}-{tag}",
                               data_dir=workdir / name)


class _Collector(threading.Thread):
    """Reads persona-updates into an UpdateLog until stopped."""

    def __init__(self, cfg: StreamConfig) -> None:
        super().__init__(daemon=True, name="updates")
        from confluent_kafka import Consumer

        self.log = UpdateLog()
        self.all: list[dict[str, Any]] = []
        self._stop_evt = threading.Event()
        self._consumer = Consumer({"bootstrap.servers": cfg.kafka_bootstrap, "group.id": f"bench-{uuid.uuid4().hex}",
                                   "auto.offset.reset": "earliest", "enable.auto.commit": False, "log_level": 3})
        self._consumer.subscribe([Topics(cfg.topic_prefix).persona_updates])
        self.lock = threading.Lock()

    def run(self) -> None:
        while not self._stop_evt.is_set():
            msg = self._consumer.poll(0.1)
            if msg is None or msg.error():
                continue
            update = json.loads(msg.value())
            with self.lock:
                self.all.append(update)
                self.log.add(update)
        self._consumer.close()

    def stop(self) -> None:
        self._stop_evt.set()
        self.join(10)

    def snapshot(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.all)


def run_gplr(cfg: StreamConfig, n_workers: int, backlog: list, live: list, labels: dict, rate_cap: float,
             fixed_rate: float | None, workdir: Path) -> dict[str, Any]:
    """Backlog throughput, then latency at `fixed_rate` (else min(rate_cap, 80% of throughput))."""
    cfg = _isolated(cfg, f"w{n_workers}", workdir)
    topics = Topics(cfg.topic_prefix)
    create_topics(cfg.kafka_bootstrap, topics.public(), cfg.partitions)
    _publish_labels(cfg, labels)
    publish_events(cfg.kafka_bootstrap, topics.purchases, backlog)
    collector = _Collector(cfg)
    collector.start()
    workers = [WorkerProcess(dataclasses.replace(cfg, data_dir=workdir / f"w{n_workers}-{i}",
                                                 worker_port=free_port()),
                             workdir / f"w{n_workers}-{i}.log").start() for i in range(n_workers)]
    watcher = LagWatcher(cfg)
    try:
        t_ready = min(_wait_ready_at(w) for w in workers)
        cpu_ready = sum(_cpu_s(w) for w in workers)
        if not watcher.wait_drained(timeout=600, settle=2.0):
            raise RuntimeError(f"backlog not drained (lag {watcher.lag()})")
        cpu = sum(_cpu_s(w) for w in workers) - cpu_ready
        updates = collector.snapshot()
        t_last = max(u["ts"] for u in updates) if updates else time.time()
        throughput = len(backlog) / max(1e-6, t_last - t_ready)
        logger.info("%d worker(s): %d backlog events in %.1fs -> %.0f/s", n_workers, len(backlog),
                    t_last - t_ready, throughput)
        live_start = time.time()
        rate = fixed_rate or min(rate_cap, 0.8 * throughput)
        if live:
            publish_events(cfg.kafka_bootstrap, topics.purchases, live, rate=rate, stamp_now=True)
            if not watcher.wait_drained(timeout=300, settle=2.0):
                raise RuntimeError(f"live phase not drained (lag {watcher.lag()})")
        time.sleep(0.5)
        updates = collector.snapshot()
        lat = np.array([u["ts"] - u["source_ts"] for u in updates
                        if u.get("source_ts", 0) >= live_start and u.get("reason") != "replay"])
        return {
            "events_per_s": round(throughput, 1),
            "cpu_ms_per_event": round(1000 * cpu / len(backlog), 3),
            "p50_s": round(float(np.percentile(lat, 50)), 4) if lat.size else None,
            "p99_s": round(float(np.percentile(lat, 99)), 4) if lat.size else None,
            "live_rate_events_per_s": round(rate, 1),
            "updates": len(updates),
            "latency_samples": int(lat.size),
            "_updates": updates,
        }
    finally:
        collector.stop()
        watcher.close()
        for w in workers:
            w.kill()


def _publish_labels(cfg: StreamConfig, labels: dict[str, tuple[int, ...]]) -> None:
    """Labels keyed by user with the commands' producer (murmur2, as `gplr produce`)."""
    publish_records(cfg.kafka_bootstrap, Topics(cfg.topic_prefix).labels,
                    ((user, json.dumps(label_record(user, personas, [1.0] * len(personas), "bench")).encode())
                     for user, personas in labels.items()))


def max_abs_error(updates: list[dict[str, Any]], frame, labels: dict, n_personas: int) -> float:
    """max |published score − exact Ψ| over every unlabeled user's last update."""
    graph = BipartiteGraph.from_frame(frame)
    row = {u: i for i, u in enumerate(graph.user_ids)}
    phi = prototype_matrix(graph.n_users, {row[u]: p for u, p in labels.items()}, n_personas)
    psi = compute_affinity(graph, phi, method="exact", hops=1, beta=0.0)
    last: dict[str, dict[str, Any]] = {}
    for u in updates:
        last[str(u["user"])] = u
    err = 0.0
    for user, update in last.items():
        if user in labels or user not in row:
            continue
        if update.get("reason") == "prior":  # streamed Ψ̂ is zero: the stand-in scores are Q̂ shares
            err = max(err, float(psi[row[user]].max()))
            continue
        for p in update["personas"]:
            err = max(err, abs(float(p["score"]) - psi[row[user], int(p["idx"])]))
    return err


# -- main ------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="250 users, < 2 min")
    parser.add_argument("--users", type=int, default=None)
    parser.add_argument("--workers", default="1,2", help="worker counts to run, e.g. 1,2")
    parser.add_argument("--live-share", type=float, default=0.25, help="share of purchases for the latency phase")
    parser.add_argument("--live-rate", type=float, default=None,
                        help="events/s of the latency phase "
                             "(default: half the no-op ceiling, at most 80%% of 1 worker)")
    parser.add_argument("--noop-worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.noop_worker is not None:
        noop_worker(args.noop_worker)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("streams.broker", "streams.topics"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    users = args.users or (250 if args.quick else 2000)
    n_personas = 12
    base = dataclasses.replace(StreamConfig.from_env(), labeler="none", hysteresis=0.0, beta=0.0, decoder="graph",
                               metrics_port=0, label_budget=0.0, log_level="info", label_sources=("bench",))
    shop = make_shop(n_users=users, n_items=max(60, users * 3 // 10), n_personas=n_personas, seed=0)
    events = list(iter_events(shop.frame))
    cut = int(len(events) * (1 - args.live_share))
    backlog, live = events[:cut], events[cut:]
    rng = np.random.default_rng(0)
    ids = sorted(shop.user_truth)
    chosen = rng.choice(len(ids), size=max(2, len(ids) // 20), replace=False)
    labels = {ids[i]: tuple(shop.user_truth[ids[i]]) for i in chosen}
    workdir = Path(tempfile.mkdtemp(prefix="gplr-bench-"))
    result: dict[str, Any] = {"bench": "stream", "quick": args.quick, "users": users, "events": len(events),
                              "backlog_events": len(backlog), "live_events": len(live), "eps": base.eps,
                              "partitions": base.partitions}
    t_start = time.monotonic()
    try:
        with bootstrap_or_embedded(dataclasses.replace(base, data_dir=workdir)) as cfg:
            noop, noop_cpu = run_noop(cfg, backlog, workdir)
            result["noop_events_per_s"] = round(noop, 1)
            result["noop_cpu_ms_per_event"] = round(noop_cpu, 3)
            logger.info("no-op agent: %.0f events/s", noop)
            rate = args.live_rate
            errors = []
            for n in [int(x) for x in args.workers.split(",") if x.strip()]:
                # latency rate: half the ceiling, at most 80% of what the first setting sustained
                out = run_gplr(cfg, n, backlog, live, labels, noop * 0.5, rate, workdir)
                rate = rate or out["live_rate_events_per_s"]
                errors.append(max_abs_error(out.pop("_updates"), shop.frame, labels, n_personas))
                result[f"workers_{n}"] = out
                logger.info("%d worker(s): %s", n, out)
            if "workers_1" in result:
                result["ratio_vs_noop"] = round(result["workers_1"]["events_per_s"] / noop, 3)
                # the same comparison in CPU per event, which other load on the machine moves less
                result["cpu_ratio_vs_noop"] = round(noop_cpu / max(1e-9, result["workers_1"]["cpu_ms_per_event"]), 3)
            result["max_abs_error_vs_exact"] = round(max(errors), 6) if errors else None
            result["within_eps"] = bool(errors and max(errors) <= base.eps + 1e-9)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["wall_s"] = round(time.monotonic() - t_start, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
