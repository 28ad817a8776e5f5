"""`gplr demo`: the whole stream on one machine, start to finish, with a live view.

An embedded broker (or KAFKA_BOOTSTRAP), one `gplr worker` subprocess, a replay of the synthetic
shop (or `--data`) stamped with the send time, a live table of persona updates, and a summary:
throughput, purchase-to-update latency, the cost of propagation (pushes and internal messages per
purchase, from the worker's metrics) and, where a truth is known, F1@k of the streamed personas
beside batch GPLR on the same purchases and the "most common personas" baseline
(`streams.quality`). Prototype labels come from
a replay of the planted truth (the synthetic shop's oracle, as the paper replays GPT-4's labels),
so the demo needs no model download and no API key.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from streams.config import StreamConfig
from streams.quality import f1_against_truth

__all__ = ["WorkerProcess", "LagWatcher", "run_demo", "UpdateLog", "f1_against_truth", "write_truth_csv"]

logger = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]
DEMO_LIMIT = 3000  # default `--limit`: purchases replayed from a `--data` file (a few minutes at 100/s)


@dataclass
class WorkerProcess:
    """`gplr worker` in a subprocess (own session) configured by `config.as_env()`."""

    config: StreamConfig
    log_path: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        env = {**os.environ, **self.config.as_env(), **self.extra_env, "PYTHONUNBUFFERED": "1"}
        env.setdefault("HF_HUB_OFFLINE", "1")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "streams.cli", "worker", "--loglevel", self.config.log_level],
                cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def wait_ready(self, timeout: float = 90.0) -> WorkerProcess:
        """Wait for Faust's "Ready" log line; raise with the log tail if the worker dies first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "Ready" in self.log():
                return self
            if not self.is_running():
                raise RuntimeError(f"worker exited ({self.returncode}):\n{self.log()[-4000:]}")
            time.sleep(0.2)
        raise RuntimeError(f"worker not ready after {timeout:.0f}s:\n{self.log()[-4000:]}")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the worker's process group (kill -9 by default) and reap it."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            proc.wait(30)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (Faust commits and closes its tables), SIGKILL after `timeout`."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning("worker %d did not stop in %.0fs; killing it", proc.pid, timeout)
            self.kill()
        except ProcessLookupError:
            pass


class UpdateLog:
    """Persona updates as they arrive: the latest per user, the last few, latencies."""

    def __init__(self, keep: int = 12) -> None:
        self.latest: dict[str, dict[str, Any]] = {}
        self.recent: deque[dict[str, Any]] = deque(maxlen=keep)
        self.latencies: list[float] = []
        self.count = 0
        self.last_at = time.monotonic()

    def add(self, update: Mapping[str, Any]) -> None:
        self.count += 1
        self.last_at = time.monotonic()
        user = str(update.get("user"))
        self.latest[user] = dict(update)
        self.recent.append(dict(update))
        ts, source = update.get("ts"), update.get("source_ts")
        if isinstance(ts, (int, float)) and isinstance(source, (int, float)) and source > 0:
            self.latencies.append(max(0.0, float(ts) - float(source)))

    def personas_of(self, user: str) -> list[int]:
        return [int(p["idx"]) for p in self.latest.get(user, {}).get("personas", [])]


def write_truth_csv(truth: Mapping[str, Sequence[int]], names: Sequence[str], path: Path) -> Path:
    """The planted truth in the replay labeler's format (CustomerID, personas joined by "|")."""
    rows = [{"CustomerID": u, "personas": "|".join(names[i] for i in ps)} for u, ps in truth.items()]
    pd.DataFrame(rows, columns=["CustomerID", "personas"]).to_csv(path, index=False)
    return path


def _first_users(frame: pd.DataFrame, n: int) -> pd.DataFrame:
    """Purchases of the first `n` users to appear (in time order)."""
    ordered = frame.sort_values("ts", kind="stable")
    keep = pd.unique(ordered["user_id"])[:n]
    return ordered[ordered["user_id"].isin(set(keep))]


@dataclass
class _Scenario:
    frame: pd.DataFrame
    config: StreamConfig
    truth: dict[str, tuple[int, ...]] | None
    source: str


def _scenario(config: StreamConfig, data: Path | None, users: int, workdir: Path,
              labeler: str = "replay", *, frame: pd.DataFrame | None = None, personas: Path | None = None,
              labels: Path | None = None, limit: int = DEMO_LIMIT, say=print) -> _Scenario:
    """The demo's purchases and settings. `labeler="replay"` lets the recorded labels (the planted
    truth, `labels`, or GPT-4's beside Online Retail) play a perfect LLM; any other name uses that
    labeler. A `data` file needs its own persona set (`personas`, GPLR_PERSONAS or personas.json
    beside it): the built-in set describes the synthetic shop only. `frame` is `data` already loaded
    (with the command's column mapping); `limit` caps the purchases replayed (0: all)."""
    from core.personas import load_personas, read_persona_labels
    from core.synthetic import make_shop

    if data is None:
        shop = make_shop(n_users=users, n_items=max(60, (users * 3) // 10), seed=0)
        personas_path = workdir / "personas.json"
        personas_path.write_text(shop.personas.to_json())
        truth_csv = write_truth_csv(shop.user_truth, shop.personas.names, workdir / "truth.csv")
        config = dataclasses.replace(config, personas_path=personas_path, labeler=labeler,
                                     replay_labels=truth_csv if labeler == "replay" else None)
        return _Scenario(shop.frame, config, dict(shop.user_truth), f"synthetic shop, {users} users")
    data = Path(data).resolve()  # the worker runs in the repo root: relative paths would break there
    if frame is None:
        from core.data import load_purchases

        if not data.is_file():
            raise SystemExit(f"gplr demo: no such file {data}")
        frame, _ = load_purchases(data)
    frame = _first_users(frame, users)
    if limit and len(frame) > limit:  # real shoppers buy a lot: keep the demo to a few minutes
        say(f"demo: replaying the first {limit:,} of {len(frame):,} purchases (--limit; 0 = all)")
        frame = frame.iloc[:limit]
    personas_path = _persona_set_for(data, personas, config, say)
    config = dataclasses.replace(config, personas_path=personas_path)
    given, origin = (labels, "--labels") if labels else (config.replay_labels, "GPLR_REPLAY_LABELS")
    found = Path(given).resolve() if given else data.parent / "user_personas_gpt4.csv.gz"
    if given is not None and not found.is_file():
        raise SystemExit(f"gplr demo: {origin} {given}: no such file")
    recorded = found if found.is_file() else None
    if recorded is not None and labels is None:
        say(f"demo: labels {recorded} ({origin if given else 'found beside the data'})")
    if labeler != "replay":
        config = dataclasses.replace(config, labeler=labeler)
    elif recorded is not None:
        config = dataclasses.replace(config, labeler="replay", replay_labels=recorded)
    else:
        say("demo: no recorded labels (--labels) to replay; labeling with the offline embedding labeler")
        config = dataclasses.replace(config, labeler="embedding", replay_labels=None)
    truth = None
    if recorded is not None:
        try:
            persona_set = load_personas(personas_path)
            table = read_persona_labels(recorded)
        except ValueError as exc:
            raise SystemExit(f"gplr demo: {exc}") from None
        truth = {}
        for uid, names in table.items():
            idx = [persona_set.index_of(n) for n in names]
            if any(i is not None for i in idx):
                truth[uid] = tuple(i for i in idx if i is not None)
        frame = frame.assign(user_id=frame["user_id"].map(_norm_id))
    logger.info("demo data: %d purchases", len(frame))
    return _Scenario(frame, config, truth, f"{data.name}, {frame['user_id'].nunique()} users")


def _persona_set_for(data: Path, personas: Path | None, config: StreamConfig, say) -> Path:
    """The persona set for a `--data` demo, as an absolute path, saying where it came from."""
    if personas is not None:
        chosen, origin = Path(personas), "--personas"
    elif config.personas_path is not None:
        chosen, origin = config.personas_path, "GPLR_PERSONAS"
    elif (data.parent / "personas.json").is_file():
        chosen, origin = data.parent / "personas.json", "found beside the data"
    else:
        raise SystemExit(f"gplr demo: {data.name} needs a persona set for this shop: pass --personas P.json "
                         "(or set GPLR_PERSONAS, or put personas.json beside the data); the built-in set "
                         "describes the synthetic shop only")
    chosen = chosen.resolve()
    if not chosen.is_file():
        raise SystemExit(f"gplr demo: persona set {chosen} ({origin}): no such file")
    try:
        from core.personas import load_personas

        load_personas(chosen)
    except ValueError as exc:
        raise SystemExit(f"gplr demo: {exc}") from None
    say(f"demo: persona set {chosen} ({origin})")
    return chosen


def _norm_id(value: object) -> str:
    from core.labelers.replay import normalise_id

    return normalise_id(value)


def _render(log: UpdateLog, published: list[int], total: int, started: float, source: str):
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    elapsed = time.monotonic() - started
    head = Text.assemble(
        ("GPLR stream demo ", "bold"), f"({source})  ",
        f"published {published[0]}/{total}  updates {log.count}  users with personas {len(log.latest)}  ",
        f"{elapsed:5.1f}s",
    )
    table = Table(expand=True, show_lines=False)
    table.add_column("user", no_wrap=True)
    table.add_column("personas (share of the shown scores)")
    table.add_column("why", no_wrap=True)
    for update in reversed(log.recent):
        names = _named_shares(update.get("personas", []))
        table.add_row(str(update.get("user")), names, str(update.get("reason", "")))
    return Group(head, table)


def _named_shares(personas: Sequence[Mapping[str, Any]]) -> str:
    """"Name (40%), ..." : Ψ's raw scale depends on the label budget (often 0.001–0.05), so the
    live view shows each persona's share of the listed scores instead."""
    total = sum(max(float(p.get("score", 0.0)), 0.0) for p in personas)
    return ", ".join(f"{p['name']} ({float(p.get('score', 0.0)) / total:.0%})" if total > 0 else str(p["name"])
                     for p in personas)


def run_demo(config: StreamConfig, data: Path | None = None, users: int = 500, rate: float | None = 100.0,
             timeout: float = 150.0, live: bool = True, quiet_s: float = 6.0, keep: bool = False,
             labeler: str = "replay", *, frame: pd.DataFrame | None = None, personas: Path | None = None,
             labels: Path | None = None, limit: int = DEMO_LIMIT) -> int:
    """Run the demo; returns 0 when persona updates arrived, 1 otherwise (see `_scenario`)."""
    from confluent_kafka import Consumer
    from rich.console import Console
    from rich.live import Live

    from streams.broker import bootstrap_or_embedded, free_port
    from streams.topic_io import publish_events
    from streams.topics import create_topics, topics_for

    console = Console()
    workdir = Path(tempfile.mkdtemp(prefix="gplr-demo-"))
    tag = uuid.uuid4().hex[:6]
    base = dataclasses.replace(config, data_dir=workdir, worker_port=free_port(), metrics_port=free_port())
    try:
        scenario = _scenario(base, data, users, workdir, labeler, frame=frame, personas=personas,
                             labels=labels, limit=limit,
                             say=lambda text: console.print(text, highlight=False, soft_wrap=True))
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    events_frame = scenario.frame
    worker: WorkerProcess | None = None
    stop = threading.Event()
    started = time.monotonic()
    try:
        with bootstrap_or_embedded(scenario.config) as cfg:
            if config.kafka_bootstrap:  # a shared broker: do not mix with earlier runs
                cfg = dataclasses.replace(cfg, topic_prefix=f"{cfg.topic_prefix}demo-{tag}.",
                                          app_id=f"{cfg.app_id}-demo-{tag}")
            topics = topics_for(cfg)
            create_topics(cfg.kafka_bootstrap, topics.public(), cfg.partitions)
            console.print(f"[bold]broker[/bold] {cfg.kafka_bootstrap}  "
                          f"[bold]worker log[/bold] {workdir / 'worker.log'}")
            worker = WorkerProcess(cfg, workdir / "worker.log").start()
            with console.status("starting the worker (Faust)..."):
                worker.wait_ready()
            from core.data import iter_events

            total = len(events_frame)
            published = [0]
            failure: list[BaseException] = []

            def publish() -> None:
                try:
                    published[0] = publish_events(cfg.kafka_bootstrap, topics.purchases,
                                                  _counting(iter_events(events_frame), published),
                                                  rate=rate, stamp_now=True, stop=stop)
                except BaseException as exc:  # reported below, never lost in the thread
                    failure.append(exc)

            consumer = Consumer({
                "bootstrap.servers": cfg.kafka_bootstrap, "group.id": f"gplr-demo-view-{tag}",
                "auto.offset.reset": "earliest", "enable.auto.commit": False, "log_level": 3,
            })
            consumer.subscribe([topics.persona_updates])
            log = UpdateLog()
            drained = LagWatcher(cfg)
            publisher = threading.Thread(target=publish, name="publisher", daemon=True)
            t_publish = time.monotonic()
            publisher.start()
            t_done: float | None = None
            try:
                with Live(_render(log, published, total, started, scenario.source), console=console,
                          refresh_per_second=4, transient=False, auto_refresh=live) as view:
                    while time.monotonic() - started < timeout:
                        msg = consumer.poll(0.2)
                        if msg is not None and not msg.error():
                            try:
                                log.add(json.loads(msg.value() or b""))
                            except (TypeError, ValueError):
                                pass
                        if live:
                            view.update(_render(log, published, total, started, scenario.source))
                        if not worker.is_running():
                            raise RuntimeError(f"worker died:\n{worker.log()[-3000:]}")
                        if not publisher.is_alive():
                            t_done = t_done or time.monotonic()
                            if failure:
                                raise failure[0]
                            if time.monotonic() - max(log.last_at, t_done) > quiet_s and drained.drained():
                                break
                    view.update(_render(log, published, total, started, scenario.source))
            finally:
                stop.set()
                consumer.close()
                drained.close()
            labeled = _labeled_users(cfg, topics.labels)
            from streams.quality import worker_metrics

            counters = worker_metrics(cfg.metrics_port)
            worker.stop(timeout=20)
            _summary(console, scenario, cfg, log, published[0], t_publish, t_done, labeled, counters)
            if not log.count:
                console.print(f"[red]no persona updates; worker log tail:[/red]\n{worker.log()[-3000:]}")
            return 0 if log.count else 1
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]")
        return 130
    finally:
        stop.set()
        if worker is not None:
            worker.stop(timeout=10)
        if keep:
            console.print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


class LagWatcher:
    """Total lag of the worker's consumer group over every topic it reads (the app's topics bar
    the ones it only writes), to tell when a replay has been fully processed."""

    WRITE_ONLY = ("persona-updates", "recommendations", "purchases-dlq")

    def __init__(self, cfg: StreamConfig) -> None:
        from streams.metrics import LagMonitor

        self.cfg = cfg
        self._monitor = LagMonitor(cfg.kafka_bootstrap, cfg.app_id)
        self._checked = 0.0
        self._last = -1

    def lag(self) -> int:
        from streams.topics import admin_client

        prefix = self.cfg.topic_prefix
        skip = {f"{prefix}{s}" for s in self.WRITE_ONLY}
        meta = admin_client(self.cfg.kafka_bootstrap).list_topics(timeout=10).topics
        parts = [(t, p) for t, m in meta.items() if t.startswith(prefix) and t not in skip for p in m.partitions]
        self._last = int(sum(self._monitor.update(parts).values()))
        return self._last

    def drained(self, every: float = 1.0) -> bool:
        """Lag is zero (measured at most once per `every` seconds; in between the last answer)."""
        if time.monotonic() - self._checked >= every:
            self._checked = time.monotonic()
            self.lag()
        return self._last == 0

    def wait_drained(self, timeout: float = 60.0, settle: float = 2.0) -> bool:
        """Block until the lag has stayed zero for `settle` seconds (True) or `timeout` (False)."""
        deadline, zero_since = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            if self.lag() == 0:
                zero_since = zero_since or time.monotonic()
                if time.monotonic() - zero_since >= settle:
                    return True
            else:
                zero_since = None
            time.sleep(0.25)
        return False

    def close(self) -> None:
        self._monitor.close()


def _counting(events: Iterable, counter: list[int]):
    for event in events:
        counter[0] += 1
        yield event


def _labeled_users(cfg: StreamConfig, topic: str) -> dict[str, list[int]]:
    """Users with a successful label on the labels topic (the prototypes) and their personas."""
    from streams.topic_io import read_topic

    users: dict[str, list[int]] = {}
    for record in read_topic(cfg.kafka_bootstrap, topic, timeout=10):
        if not record.get("error") and record.get("personas"):
            users[str(record.get("user"))] = [int(p) for p in record["personas"]]
    return users


def _summary(console, scenario: _Scenario, cfg: StreamConfig, log: UpdateLog, sent: int, t_publish: float,
             t_done: float | None, labeled: Mapping[str, Sequence[int]],
             counters: Mapping[str, float] | None = None) -> dict[str, Any]:
    from rich.table import Table

    n_users = int(scenario.frame["user_id"].nunique())
    span = (t_done or time.monotonic()) - t_publish
    lat = np.asarray(log.latencies) if log.latencies else np.zeros(1)
    rows: dict[str, Any] = {
        "purchases published": sent,
        "publish rate (events/s)": round(sent / span, 1) if span > 0 else None,
        "persona updates": log.count,
        "users with personas": f"{len(log.latest)} / {n_users}",
        "prototype users labeled": f"{len(labeled)} (budget {cfg.label_budget:.0%})",
        "update latency p50 / p99 (s)": f"{np.nanpercentile(lat, 50):.3f} / {np.nanpercentile(lat, 99):.3f}",
    }
    counters = counters or {}
    if counters.get("gplr_events_in_total"):
        n = counters["gplr_events_in_total"]
        rows[f"pushes / push messages per purchase (eps {cfg.eps:g})"] = (
            f"{counters.get('gplr_pushes_total', 0) / n:.2f} / {counters.get('gplr_push_messages_total', 0) / n:.2f}")
    if scenario.truth:
        rows.update(_accuracy(scenario, scenario.truth, cfg, log, labeled))
    table = Table(title="demo summary", show_header=False)
    for key, value in rows.items():
        table.add_row(key, str(value))
    console.print(table)
    return rows


def _accuracy(scenario: _Scenario, truth: Mapping[str, Sequence[int]], cfg: StreamConfig, log: UpdateLog,
              labeled: Mapping[str, Sequence[int]]) -> dict[str, Any]:
    """F1@k of the streamed personas beside the batch yardsticks and the popularity baseline."""
    from streams.labeling import build_labeler
    from streams.quality import batch_gplr, batch_same_prototypes, popularity_baseline

    k = cfg.top_k
    users = [u for u in pd.unique(scenario.frame["user_id"]) if u in truth and u not in labeled]

    def f1(predicted: Mapping[str, Sequence[int]], who: Sequence[str] = users) -> float:
        return round(f1_against_truth(predicted, truth, k, who), 3)

    rows: dict[str, Any] = {
        f"F1@{k} vs truth, streamed (unlabeled users)": f1({u: log.personas_of(u) for u in users}),
        f"F1@{k} batch Ψ from the stream's prototypes": f1(batch_same_prototypes(
            scenario.frame, labeled, len(cfg.personas()), k, cfg.beta, cfg.hops)),
    }
    if cfg.labeler == "replay":  # a recorded labeler costs nothing to run again in batch
        labeler = build_labeler(cfg, cfg.personas())
        if labeler is not None:
            predicted, protos = batch_gplr(scenario.frame, cfg.personas(), labeler, cfg.label_budget, k,
                                           cfg.eps, cfg.beta, cfg.hops, decoder=cfg.decoder, sampling=cfg.sampling)
            rows[f"F1@{k} batch GPLR, same labeler/budget ({len(protos)} prototypes)"] = f1(
                predicted, [u for u in pd.unique(scenario.frame["user_id"]) if u in truth and u not in protos])
    popular = popularity_baseline(truth, k)
    rows[f"F1@{k} 'most common personas' baseline"] = f1({u: popular for u in users})
    return rows
