"""Scale: start the stream warm from an Instacart-Full-sized history (`gplr backfill`), then live.

A synthetic history at the paper's Instacart Full shape (206,209 users, 49,677 items, 15M
purchase events; `--quick`: 1/10 of each) from `core.synthetic.make_shop` (16 planted personas,
5% of users labeled from the planted truth as operator labels), on an embedded broker:

1. backfill (`streams.backfill.run_backfill`): index, rows, changelogs, start offsets;
2. a fresh worker recovers the tables from the changelogs; `recovery_seconds` = worker start →
   Faust's last "Recovery complete", `first_update_seconds` = worker start → the first persona
   update caused by a live purchase sent at worker start (backfill + these = time to live);
3. live phase: `--live` purchases (≥ 100,000 in the full run) sent unpaced (throughput = events /
   (last update − first send)), then `--paced` more at half that rate, stamped with the send
   time (p99 purchase → update); the worker's peak RSS (VmHWM) and RocksDB size on disk after it;
4. `max_abs_error_vs_exact`: every user's last update in the live phase against exact Ψ on
   history + live (β = 0, hysteresis 0: the last update is the current Ψ̂ row; bound ε/2),
   skipping users whose last update was decided on the prior (no Ψ̂ to compare);
5. replay estimate: a fresh deployment replays the first `--replay-slice` history events through
   one worker (labels first, as a live stream would have had them); history / its rate.

    python bench/scale.py --quick     # 1.5M events, ~15 min on 2 busy cores
    python bench/scale.py             # 15M events
    python bench/scale.py --rows-only # no broker: the backfill's rows at 15M events, sized and timed

`--rows-only` builds and encodes every row (`streams.backfill.write_rows` into a counting sink)
and reports their time, bytes per user/item row and the process's peak RSS: the full-scale
numbers that need no broker (the embedded broker keeps its log in memory, which a 2-core, 23 GB
machine shared with other work cannot give a 15M-event history plus a live phase).

Prints progress lines, then one JSON object as the last line.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from bench.stream import _wait_ready_at, max_abs_error  # noqa: E402
from core.data import iter_events  # noqa: E402
from core.graph import BipartiteGraph  # noqa: E402
from core.synthetic import make_shop  # noqa: E402
from streams.backfill import CountingSink, end_offsets, run_backfill, write_rows  # noqa: E402
from streams.broker import EmbeddedBroker, free_port  # noqa: E402
from streams.config import StreamConfig  # noqa: E402
from streams.demo import LagWatcher, WorkerProcess  # noqa: E402
from streams.topic_io import publish_events  # noqa: E402
from streams.topics import Topics, create_topics  # noqa: E402

logger = logging.getLogger("bench.scale")

#: Instacart Full (paper Table 1) and the issue's event count.
FULL = {"users": 206_209, "items": 49_677, "events": 15_000_000}
LABEL_SHARE = 0.05


def _status_kb(pid: int | None, field: str) -> int:
    if pid is None:
        return 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _du_mb(path: Path) -> float:
    out = subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True).stdout.split()
    return int(out[0]) / 1024 if out else 0.0


def _history(scale: float, seed: int):
    """(shop, frame in ts order): the planted shop with enough events for history + live."""
    users, items = int(FULL["users"] * scale), int(FULL["items"] * scale)
    # make_shop's Pareto counts are capped, so the mean comes out ~8% under `mean_purchases`
    mean = 1.2 * FULL["events"] / FULL["users"]
    shop = make_shop(n_users=users, n_items=items, n_personas=16, seed=seed, mean_purchases=mean,
                     zipf=0.5, repeat=0.05)
    ordered = shop.frame.sort_values("ts", kind="stable").reset_index(drop=True)
    # one copy of the 18M-row frame, not two: at full scale each is ~2 GB beside the broker's log
    return dataclasses.replace(shop, frame=ordered), ordered


def _labels(shop, users: set[str], seed: int) -> dict[str, tuple[int, ...]]:
    rng = np.random.default_rng(seed)
    pool = sorted(users)
    chosen = rng.choice(len(pool), size=max(2, int(LABEL_SHARE * len(pool))), replace=False)
    return {pool[i]: tuple(shop.user_truth[pool[i]]) for i in sorted(chosen)}


class RssTimeline:
    """Resident memory of the worker (and the broker) sampled each `period` s, tagged with the
    bench's phase, so the peak can be placed: recovery, live, paced."""

    def __init__(self, pids: dict[str, int | None], period: float = 0.5) -> None:
        import threading

        self.phase = "start"
        self.peaks: dict[str, dict[str, float]] = {}
        self._pids, self._period = pids, period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            for name, pid in self._pids.items():
                try:
                    mb = _status_kb(pid, "VmRSS") / 1024
                except OSError:  # the process is gone
                    continue
                phase = self.peaks.setdefault(self.phase, {})
                phase[name] = max(phase.get(name, 0.0), round(mb, 1))

    def close(self) -> dict[str, dict[str, float]]:
        self._stop.set()
        self._thread.join(5)
        return self.peaks


class _Updates:
    """Persona updates from `start` offsets (a background consumer)."""

    def __init__(self, config: StreamConfig, start: dict[int, int]) -> None:
        import threading

        from confluent_kafka import Consumer, TopicPartition

        topic = Topics(config.topic_prefix).persona_updates
        self._consumer = Consumer({"bootstrap.servers": config.kafka_bootstrap, "group.id": f"scale-{uuid.uuid4().hex}",
                                   "enable.auto.commit": False, "log_level": 3})
        self._consumer.assign([TopicPartition(topic, p, o) for p, o in start.items()])
        self.items: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for msg in self._consumer.consume(2000, 0.2):
                if not msg.error():
                    update = json.loads(msg.value() or b"null")
                    update["_seen"] = time.time()
                    self.items.append(update)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._consumer.close()


def _changelog_records(config: StreamConfig) -> dict[str, int]:
    """Records in the users and items changelogs (sum of end offsets: every row write is one)."""
    from streams.tables import changelog_topic

    return {t: sum(end_offsets(config.kafka_bootstrap, changelog_topic(config.app_id, t)).values())
            for t in ("users", "items")}


def _config(bootstrap: str, work: Path, name: str, partitions: int, eps: float, personas: Path) -> StreamConfig:
    tag = uuid.uuid4().hex[:6]
    return StreamConfig(kafka_bootstrap=bootstrap, topic_prefix=f"scale-{name}-{tag}.", app_id=f"scale-{name}-{tag}",
                        data_dir=work / name, worker_port=0, metrics_port=0, labeler="none", label_budget=0.0,
                        partitions=partitions, eps=eps, beta=0.0, hysteresis=0.0, decoder="graph",
                        personas_path=personas, label_sources=("bench",))


def live_run(config: StreamConfig, hist, live, paced, labels, work: Path, with_updates: bool,
             broker_pid: int | None = None) -> dict[str, Any]:
    """Backfill, recover, live: the warm start's numbers."""
    t0 = time.monotonic()
    report = run_backfill(config, hist, {u: list(p) for u, p in labels.items()}, updates=with_updates,
                          progress=lambda msg: logger.info("backfill: %s", msg))
    backfill_s = time.monotonic() - t0
    logger.info("backfill %.1fs %s", backfill_s, report.seconds)
    topics = Topics(config.topic_prefix)
    updates = _Updates(config, end_offsets(config.kafka_bootstrap, topics.persona_updates))
    live_events = list(iter_events(live))
    paced_events = list(iter_events(paced))
    worker = WorkerProcess(config, work / "live-worker.log").start()
    t_start = time.time()
    timeline = RssTimeline({"worker": worker.pid, "broker": broker_pid})
    timeline.phase = "recovery"
    probe, rest = live_events[:200], live_events[200:]
    watcher = None
    try:
        publish_events(config.kafka_bootstrap, topics.purchases, probe, stamp_now=True)
        while not [u for u in updates.items if u.get("source_ts", 0) >= t_start]:
            if not worker.is_running():
                raise RuntimeError(f"worker exited:\n{worker.log()[-3000:]}")
            if time.time() - t_start > 900:
                raise RuntimeError("no live update within 900 s")
            time.sleep(0.05)
        first = min(u["_seen"] for u in updates.items if u.get("source_ts", 0) >= t_start)
        recovered = _last_marker_time(worker, t_start)
        logger.info("recovery %.1fs, first live update %.1fs after worker start", recovered - t_start, first - t_start)
        watcher = LagWatcher(config)
        if not watcher.wait_drained(timeout=600, settle=2.0):
            raise RuntimeError(f"probe not drained (lag {watcher.lag()})")
        before = _changelog_records(config)
        timeline.phase = "live"
        t_live = time.time()
        publish_events(config.kafka_bootstrap, topics.purchases, rest, stamp_now=True)
        if not watcher.wait_drained(timeout=1800, settle=2.0):
            raise RuntimeError(f"live phase not drained (lag {watcher.lag()})")
        after = _changelog_records(config)
        per_purchase = {t: round((after[t] - before[t]) / len(rest), 2) for t in after}
        t_last = max(u["ts"] for u in updates.items)
        throughput = len(rest) / max(1e-6, t_last - t_live)
        rate = 0.5 * throughput
        timeline.phase = "paced"
        t_paced = time.time()
        publish_events(config.kafka_bootstrap, topics.purchases, paced_events, rate=rate, stamp_now=True)
        if not watcher.wait_drained(timeout=900, settle=2.0):
            raise RuntimeError(f"paced phase not drained (lag {watcher.lag()})")
        time.sleep(1.0)
        lat = np.array([u["ts"] - u["source_ts"] for u in updates.items
                        if u.get("source_ts", 0) >= t_paced and u.get("reason") != "replay"])
        peak_rss = _status_kb(worker.pid, "VmHWM") / 1024
        rss = _status_kb(worker.pid, "VmRSS") / 1024
    finally:
        rss_by_phase = timeline.close()
        updates.close()
        if watcher is not None:
            watcher.close()
        worker.kill()
    return {"backfill": report, "backfill_seconds": backfill_s, "recovery_seconds": recovered - t_start,
            "first_update_seconds": first - t_start, "live_events_per_s": throughput, "paced_rate": rate,
            "live_p50_s": float(np.percentile(lat, 50)) if lat.size else None,
            "live_p99_s": float(np.percentile(lat, 99)) if lat.size else None, "latency_samples": int(lat.size),
            "changelog_records_per_purchase": per_purchase, "worker_peak_rss_mb": peak_rss, "worker_rss_mb": rss,
            "rss_by_phase_mb": rss_by_phase,
            "state_mb": _du_mb(config.data_dir),
            "updates": [u for u in updates.items if u.get("source_ts", 0) >= t_start]}


def _last_marker_time(worker: WorkerProcess, t_start: float) -> float:
    """Wall time of the worker's last "Recovery complete" log line (Faust's own timestamps)."""
    import datetime as dt

    stamps = []
    for line in worker.log().splitlines():
        if "Recovery complete" in line and line.startswith("["):
            try:
                stamps.append(dt.datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f").timestamp())
            except ValueError:
                continue
    return max(stamps) if stamps else t_start


def replay_rate(config: StreamConfig, slice_frame, labels, work: Path) -> dict[str, float]:
    """Events/s of one worker replaying `slice_frame` from an empty state (labels published first)."""
    from confluent_kafka import Producer

    from streams.records import label_record

    topics = Topics(config.topic_prefix)
    create_topics(config.kafka_bootstrap, topics.public(), config.partitions)
    producer = Producer({"bootstrap.servers": config.kafka_bootstrap, "log_level": 3})
    for user, personas in labels.items():
        producer.produce(topics.labels, key=user, value=json.dumps(label_record(user, personas, [1.0] * len(personas),
                                                                                 "bench")))
    producer.flush(30)
    t_pub = time.monotonic()
    publish_events(config.kafka_bootstrap, topics.purchases, iter_events(slice_frame))
    publish_s = time.monotonic() - t_pub
    worker = WorkerProcess(config, work / "replay-worker.log").start()
    watcher = LagWatcher(config)
    try:
        t_ready = _wait_ready_at(worker, "Ready", 300)
        if not watcher.wait_drained(timeout=1800, settle=2.0):
            raise RuntimeError(f"replay slice not drained (lag {watcher.lag()})")
        elapsed = time.time() - t_ready - 2.0  # wait_drained's settle
    finally:
        watcher.close()
        worker.kill()
    return {"events_per_s": len(slice_frame) / max(1e-6, elapsed), "publish_events_per_s": len(slice_frame) / publish_s}


def affinity_updates(updates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each user's last update, unless it was decided on the prior (no prototype reached the
    user yet: its scores are Q̂ shares, not Ψ̂), so `max_abs_error` measures the affinity."""
    last = {str(u["user"]): u for u in updates}
    return [u for u in last.values() if u.get("reason") != "prior"]


def _row_bytes(by_topic: dict[str, list[int]], app_id: str) -> dict[str, int]:
    """Mean and largest encoded bytes of a user row and an item row (key included): the largest
    must stay under what the broker and the worker's producer accept (~1 MB by default)."""
    from streams.tables import changelog_topic

    out = {}
    for table in ("users", "items"):
        records, size, largest = by_topic.get(changelog_topic(app_id, table), [0, 0, 0])
        out[f"{table[:-1]}_row_bytes"] = round(size / max(records, 1))
        out[f"{table[:-1]}_row_bytes_max"] = largest
    return out


def rows_only(config: StreamConfig, hist, labels, args) -> dict[str, Any]:
    """The backfill's rows without a broker: seconds per stage, bytes per row, peak RSS."""
    import resource

    from streams.backfill import _laps

    sink = CountingSink()
    seconds, lap = _laps()
    t0 = time.monotonic()
    summary = write_rows(config, hist, {u: list(p) for u, p in labels.items()}, sink, updates=False,
                         say=lambda msg: logger.info("rows: %s", msg), lap=lap)
    total = time.monotonic() - t0
    scale = args.scale or (0.1 if args.quick else 1.0)
    counts = {k: summary[k] for k in ("users", "items", "history_events", "edges", "prototypes")}
    return {"bench": "scale-rows", "quick": args.quick, "scale": scale, **counts,
            "personas": 16, "rows_seconds": round(total, 1), "stages_s": seconds,
            "changelog_mb": round(sink.bytes / 1e6, 1), **_row_bytes(sink.by_topic, config.app_id),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "load_avg_1m": round(os.getloadavg()[0], 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1/10 of Instacart Full")
    parser.add_argument("--scale", type=float, default=None,
                        help="share of Instacart Full (default 1, --quick 0.1): the embedded broker holds 2.3-5.5x the "
                             "changelog in memory, more while a worker reads it (docs/RESULTS.md §9a), so a full run "
                             "needs a real Kafka or ~32 GB")
    parser.add_argument("--live", type=int, default=None, help="unpaced live purchases (default 100,000; quick 20,000)")
    parser.add_argument("--paced", type=int, default=None,
                        help="paced live purchases for latency (default 20,000; quick 5,000)")
    parser.add_argument("--replay-slice", type=int, default=None,
                        help="history events replayed (default 60,000; quick 20,000)")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--eps", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows-only", action="store_true", help="no broker: build and size the backfill's rows")
    parser.add_argument("--updates", action="store_true",
                        help="backfill also publishes a persona update per user (gplr backfill's default)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    for noisy in ("faust", "mode", "aiokafka"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    scale = args.scale or (0.1 if args.quick else 1.0)
    if not 0 < scale <= 1:
        raise SystemExit(f"bench/scale: --scale must be in (0, 1], got {scale}")
    n_live = args.live or (20_000 if args.quick else 100_000)
    n_paced = args.paced or (5_000 if args.quick else 20_000)
    n_slice = args.replay_slice or (20_000 if args.quick else 60_000)
    n_hist = int(FULL["events"] * scale)

    t = time.monotonic()
    shop, frame = _history(scale, args.seed)
    if len(frame) < n_hist + n_live + n_paced:
        raise SystemExit(f"bench/scale: the shop has {len(frame)} events, need {n_hist + n_live + n_paced}")
    hist, live = frame.iloc[:n_hist], frame.iloc[n_hist:n_hist + n_live]
    paced = frame.iloc[n_hist + n_live:n_hist + n_live + n_paced]
    labels = _labels(shop, set(hist["user_id"]), args.seed)
    logger.info("history generated in %.1fs: %d events, %d users, %d items", time.monotonic() - t, len(hist),
                hist["user_id"].nunique(), hist["item_id"].nunique())

    work = Path(tempfile.mkdtemp(prefix="gplr-scale-"))
    personas = work / "personas.json"
    personas.write_text(shop.personas.to_json())
    if args.rows_only:
        print(json.dumps(rows_only(_config("127.0.0.1:1", work, "rows", args.partitions, args.eps, personas),
                                   hist, labels, args)))
        return 0
    with EmbeddedBroker(data_dir=work / "broker", port=free_port()) as broker:
        cfg = _config(broker.bootstrap, work, "live", args.partitions, args.eps, personas)
        out = live_run(cfg, hist, live, paced, labels, work, args.updates, broker.pid)
        broker_mb = _du_mb(work / "broker")
        replay = replay_rate(_config(broker.bootstrap, work, "replay", args.partitions, args.eps, personas),
                             hist.iloc[:n_slice], labels, work)
    seen = frame.iloc[:n_hist + n_live + n_paced]
    err = max_abs_error(affinity_updates(out["updates"]), seen, labels, len(shop.personas))
    report = out["backfill"]
    to_live = out["backfill_seconds"] + out["first_update_seconds"]
    replay_estimate = n_hist / replay["events_per_s"]
    result = {
        "bench": "scale", "quick": args.quick, "scale": scale, "users": report.users, "items": report.items,
        "history_events": report.history_events, "edges": int(BipartiteGraph.from_frame(hist).n_edges),
        "personas": len(shop.personas), "prototypes": report.prototypes, "partitions": args.partitions,
        "backfill_updates": args.updates, "backfill_seconds": round(out["backfill_seconds"], 1),
        "backfill_stages_s": report.seconds,
        "changelog_mb": round(report.changelog_bytes / 1e6, 1), "changelog_records": report.changelog_records,
        **_row_bytes(report.bytes_by_topic, cfg.app_id),
        "recovery_seconds": round(out["recovery_seconds"], 1),
        "first_update_seconds": round(out["first_update_seconds"], 1),
        "time_to_live_seconds": round(to_live, 1),
        "replay_estimate_seconds": round(replay_estimate, 1), "replay_slice_events": n_slice,
        "replay_events_per_s": round(replay["events_per_s"], 1),
        "publish_events_per_s": round(replay["publish_events_per_s"], 1),
        "speedup_vs_replay": round(replay_estimate / to_live, 1),
        "state_mb": round(out["state_mb"], 1), "broker_mb": round(broker_mb, 1),
        "worker_peak_rss_mb": round(out["worker_peak_rss_mb"], 1), "worker_rss_mb": round(out["worker_rss_mb"], 1),
        "rss_by_phase_mb": out["rss_by_phase_mb"],
        "live_events": n_live, "live_events_per_s": round(out["live_events_per_s"], 1),
        "changelog_records_per_live_purchase": out["changelog_records_per_purchase"],
        "paced_events": n_paced, "paced_rate": round(out["paced_rate"], 1),
        "live_p50_s": out["live_p50_s"] and round(out["live_p50_s"], 3),
        "live_p99_s": out["live_p99_s"] and round(out["live_p99_s"], 3),
        "max_abs_error_vs_exact": round(err, 5), "eps": args.eps,
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
