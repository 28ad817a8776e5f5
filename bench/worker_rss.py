"""Worker memory: RSS of one `gplr worker` as a synthetic stream is processed, and when idle.

One worker (labeler none, 5% prototype labels published up front) on an embedded broker; the
events are published in quarters and the worker's RSS (VmRSS of its process) is read once each
quarter is drained, then again after `--idle` seconds without input. Reports MB per 100k events
and per user / edge. `--repo` runs another checkout's worker (a side-by-side "before").

    python bench/worker_rss.py            # 10,000 users (~100k events)
    python bench/worker_rss.py --quick    # 1,000 users

Prints progress lines, then one JSON object as the last line.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--idle", type=float, default=10.0)
    parser.add_argument("--lose-disk", action="store_true",
                        help="then kill -9 the worker, delete its state dir and time a fresh worker's recovery")
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1])
    args = parser.parse_args()
    sys.path.insert(0, str(args.repo.resolve()))
    from core.data import iter_events
    from core.synthetic import make_shop
    from streams.broker import EmbeddedBroker
    from streams.config import StreamConfig
    from streams.demo import LagWatcher, WorkerProcess
    from streams.records import label_record
    from streams.topic_io import publish_events, publish_records
    from streams.topics import Topics, create_topics

    users = args.users or (1000 if args.quick else 10_000)
    shop = make_shop(n_users=users, n_items=max(200, users // 5), seed=1, mean_purchases=10.0)
    events = list(iter_events(shop.frame))
    work = Path(tempfile.mkdtemp(prefix="gplr-rss-"))
    with EmbeddedBroker(data_dir=work / "broker") as broker:
        tag = uuid.uuid4().hex[:8]
        config = StreamConfig(kafka_bootstrap=broker.bootstrap, topic_prefix=f"rss{tag}.", app_id=f"rss-{tag}",
                              data_dir=work / "worker", worker_port=0, metrics_port=0, labeler="none",
                              label_budget=0.0, partitions=4)
        if hasattr(config, "label_sources"):
            config = dataclasses.replace(config, label_sources=("bench",))
        topics = Topics(config.topic_prefix)
        create_topics(broker.bootstrap, topics.all(), config.partitions)
        truth = sorted(shop.user_truth)[:: 20]
        publish_records(broker.bootstrap, topics.labels,  # murmur2 by user, as `gplr produce`
                        ((u, json.dumps(label_record(u, shop.user_truth[u], [], "bench")).encode()) for u in truth))
        worker = WorkerProcess(config, work / "worker.log").start().wait_ready(120)
        rss = [round(_rss_mb(worker.pid), 1)]
        print(f"ready: {rss[0]} MB", flush=True)
        watcher = LagWatcher(config)
        quarter = -(-len(events) // 4)
        start = time.monotonic()
        for q in range(4):
            publish_events(broker.bootstrap, topics.purchases, events[q * quarter:(q + 1) * quarter])
            if not watcher.wait_drained(timeout=900, settle=2.0):
                raise SystemExit(f"not drained, lag {watcher.lag()}")
            rss.append(round(_rss_mb(worker.pid), 1))
            print(f"{min(len(events), (q + 1) * quarter)} events: {rss[-1]} MB", flush=True)
        elapsed = time.monotonic() - start
        time.sleep(args.idle)
        idle = round(_rss_mb(worker.pid), 1)
        recovery = None
        if args.lose_disk:
            import shutil

            worker.kill()
            shutil.rmtree(config.data_dir)
            t0 = time.monotonic()
            fresh = WorkerProcess(config, work / "fresh.log").start().wait_ready(900)
            ready_s = time.monotonic() - t0
            extra = events[-200:]  # the same events again: de-duplicated, so nothing changes
            publish_events(broker.bootstrap, topics.purchases, extra)
            drained = watcher.wait_drained(timeout=600, settle=2.0)
            log = fresh.log()
            recovery = {"ready_s": round(ready_s, 1), "drained": drained,
                        "joins": log.count("Joined group"), "rss_mb": round(_rss_mb(fresh.pid), 1)}
            print(f"lost disk: ready in {ready_s:.1f}s, drained={drained}", flush=True)
            worker = fresh
        watcher.close()
        worker.stop()
    edges = int(shop.frame[["user_id", "item_id"]].drop_duplicates().shape[0])
    grown = rss[-1] - rss[0]
    print(json.dumps({"repo": str(args.repo), "events": len(events), "users": users, "edges": edges,
                      "rss_mb": rss, "rss_idle_mb": idle, "growth_mb": round(grown, 1),
                      "growth_mb_per_100k_events": round(grown / len(events) * 1e5, 1),
                      "kb_per_edge": round(grown * 1024 / edges, 2), "seconds": round(elapsed, 1),
                      "lost_disk_recovery": recovery}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
