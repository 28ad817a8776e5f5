"""Persona quality of the *stream* on real data: Online Retail replayed through a real worker.

Setup (all seeded, fixed):

* purchases: the paper's Online Retail graph (`load_online_retail(paper_filter=True)`), replayed
  in time order on the embedded broker (or KAFKA_BOOTSTRAP) into one `gplr worker`;
* oracle: the replay labeler over the recorded GPT-4 labels (GPLR_LABELER=replay), called by the
  stream itself: label requests chosen by the worker's default `random` sampling (one seeded coin
  per user, streams.labeling) within a 5% budget (GPLR_LABEL_BUDGET), no rate limit;
* split: the same fixed 20% of customers as bench/labels.py (SPLIT_SEED 2025, permutation of the
  paper graph's users) is **held out**: listed in GPLR_LABEL_EXCLUDE, so never a prototype, and
  the only users scored;
* stream result: each user's last persona-update once the worker has drained;
* batch: `gplr label` with its defaults (the CLI's own parser) on the same purchases and budget,
  held-out users excluded from labeling (`run_gplr(exclude=...)`);
* the same decision path on the stream's prototypes: the refit's model fitted on the stream's final
  prototypes, exact Ψ_raw (`stream_prototypes_batch_*`): the stream minus propagation's ε, so a
  stream–batch gap splits into "which prototypes" and "the stream's decisions";
* metrics (`core.gplr.score_sets`, the numbers bench/labels.py reports): per-user F1 of the persona
  set ("F1@5": at most 5 personas) and per-persona macro F1 against GPT-4's labels on held-out users
  that have one; the popularity baseline gives everyone the 5 personas most common among the
  stream's prototypes; `top_set_share` = share of scored users whose set is the most common set
  (`labels_top_set_share` the same for GPT-4's sets); `prevalence_tv` = total variation distance
  between the predicted and GPT-4 persona prevalence (persona mentions, normalised) over those
  users; `labeled_share` = prototypes / users seen by the stream; per-persona recall.

    python bench/stream_quality.py --data-dir /work/shared/data/online_retail
    python bench/stream_quality.py --quick    # the first 30,000 purchases: ~2 min at load 6-8, ~1 min
                                              # once MiniLM's vectors are cached (GPLR_EMBEDDING_CACHE)

`--workdir DIR` keeps the worker's RocksDB, the broker's data and both logs (default: a temporary
folder, removed); `label_requests` and `events_in` (purchases the worker counted) in the JSON
tell a stream that stopped short from one that decided badly.

Prints progress lines, then one JSON object as the last line.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from core.data import iter_events, load_online_retail  # noqa: E402
from core.gplr import run_gplr, score_sets  # noqa: E402
from core.graph import BipartiteGraph  # noqa: E402
from core.labelers import histories_for, make_labeler  # noqa: E402
from core.personas import PersonaSet, load_personas  # noqa: E402
from core.synthetic import top_set_share  # noqa: E402

logger = logging.getLogger("bench.stream_quality")
DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "online_retail"
SPLIT_SEED = 2025  # bench/labels.py's split
QUICK_EVENTS = 30_000
K = 5


# -- data and split --------------------------------------------------------------------------------
def held_out_users(graph: BipartiteGraph) -> set[str]:
    """bench/labels.py's held-out fold: the first 20% of a SPLIT_SEED permutation of the users."""
    order = np.random.default_rng(SPLIT_SEED).permutation(graph.n_users)
    return {str(graph.user_ids[u]) for u in order[: int(round(0.2 * graph.n_users))]}


def gpt4_truth(graph: BipartiteGraph, personas: PersonaSet, labels_path: Path) -> dict[str, tuple[int, ...]]:
    """GPT-4's persona set per user (users without a recorded label are left out)."""
    oracle = make_labeler("replay", personas, path=labels_path)
    out = {}
    for u, res in enumerate(oracle.label(histories_for(graph, range(graph.n_users)))):
        if res.personas:
            out[str(graph.user_ids[u])] = tuple(int(p) for p in res.personas)
    return out


# -- scoring ---------------------------------------------------------------------------------------
def _matrix(sets: Mapping[str, Sequence[int]], users: Sequence[str], m: int) -> np.ndarray:
    out = np.zeros((len(users), m), dtype=bool)
    for row, user in enumerate(users):
        out[row, [int(p) for p in sets.get(user, ())][:K]] = True
    return out


def prevalence_tv(pred: np.ndarray, truth: np.ndarray) -> float:
    """Total variation distance between the persona-mention distributions of two set matrices."""
    p, q = pred.sum(axis=0).astype(float), truth.sum(axis=0).astype(float)
    p, q = p / max(p.sum(), 1.0), q / max(q.sum(), 1.0)
    return float(0.5 * np.abs(p - q).sum())


def score(pred_sets: Mapping[str, Sequence[int]], truth: Mapping[str, Sequence[int]],
          users: Sequence[str], personas: PersonaSet) -> dict[str, Any]:
    """F1, macro F1, top-set share, prevalence TV and per-persona recall of `pred_sets`."""
    m = len(personas)
    pred, true = _matrix(pred_sets, users, m), _matrix(truth, users, m)
    s = score_sets(pred, true)
    carried = true.sum(axis=0)
    recall = {personas[j].name: round(float((pred[:, j] & true[:, j]).sum() / carried[j]), 3)
              for j in range(m) if carried[j]}
    return {"f1": round(s["f1"], 4), "macro_f1": round(s["macro_f1"], 4),
            "top_set_share": round(top_set_share(tuple(np.flatnonzero(r)) for r in pred), 4),
            "prevalence_tv": round(prevalence_tv(pred, true), 4),
            "personas_per_user": round(float(pred.sum(axis=1).mean()), 3), "recall": recall}


# -- the stream ------------------------------------------------------------------------------------
def _read_topic(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    """Every JSON record of `topic` from the beginning to its current end."""
    from streams.topic_io import read_topic

    return read_topic(bootstrap, topic, timeout=120.0)


def run_stream(frame, data_dir: Path, held: set[str], budget: float, partitions: int, workdir: Path,
               timeout: float, rate: float | None = None, zero_shot: bool | None = None) -> dict[str, Any]:
    """Replay `frame` through one worker; the last persona set per user, the prototypes, costs."""
    from streams.broker import bootstrap_or_embedded, free_port
    from streams.config import StreamConfig
    from streams.demo import LagWatcher, WorkerProcess
    from streams.quality import worker_metrics
    from streams.topic_io import publish_events
    from streams.topics import Topics, create_topics

    exclude = workdir / "held_out.txt"
    exclude.write_text("\n".join(sorted(held)) + "\n")
    tag = uuid.uuid4().hex[:6]
    base = dataclasses.replace(
        StreamConfig.from_env(), labeler="replay", replay_labels=data_dir / "user_personas_gpt4.csv.gz",
        personas_path=data_dir / "personas.json", label_budget=budget, label_rate_per_min=0,
        label_exclude=exclude, partitions=partitions, data_dir=workdir, metrics_port=free_port(),
        worker_port=0, topic_prefix=f"sq-{tag}.", app_id=f"sq-{tag}", log_level="info")
    if zero_shot is not None:
        base = dataclasses.replace(base, zero_shot=zero_shot)
    events = list(iter_events(frame.sort_values("ts", kind="stable")))
    with bootstrap_or_embedded(base) as cfg:
        topics = Topics(cfg.topic_prefix)
        create_topics(cfg.kafka_bootstrap, topics.public(), cfg.partitions)
        worker = WorkerProcess(cfg, workdir / "worker.log").start()
        watcher = LagWatcher(cfg)
        try:
            worker.wait_ready(120)
            t0 = time.monotonic()
            publish_events(cfg.kafka_bootstrap, topics.purchases, events, rate=rate or None)
            logger.info("published %d purchases in %.1fs", len(events), time.monotonic() - t0)
            if not watcher.wait_drained(timeout=timeout, settle=4.0):
                raise RuntimeError(f"stream not drained in {timeout}s (lag {watcher.lag()})")
            seconds = time.monotonic() - t0
            costs = worker_metrics(cfg.metrics_port)
            peak_rss = _peak_rss_mb(worker.proc.pid if worker.proc else None)
            updates = _read_topic(cfg.kafka_bootstrap, topics.persona_updates)
            labels = _read_topic(cfg.kafka_bootstrap, topics.labels)
            requests = _read_topic(cfg.kafka_bootstrap, topics.label_requests)
        finally:
            watcher.close()
            worker.stop()
            log = worker.log()
    last: dict[str, list[int]] = {}
    reasons: dict[str, str] = {}
    for update in updates:  # one partition per user: arrival order is publication order
        last[str(update["user"])] = [int(p["idx"]) for p in update["personas"]]
        reasons[str(update["user"])] = str(update.get("reason"))
    prototypes = {str(r["user"]): [int(p) for p in r["personas"]] for r in labels
                  if r.get("personas") and not r.get("error")}
    refits = [(float(s), int(b)) for s, b in _REFIT_LINE.findall(log)]
    return {"sets": last, "reasons": reasons, "prototypes": prototypes, "seconds": seconds,
            "events": len(events), "updates": len(updates), "costs": costs, "label_requests": len(requests),
            "peak_rss_mb": peak_rss, "refits": refits, "zero_shot": base.zero_shot}


_REFIT_LINE = re.compile(r"persona model v\d+ fitted in ([\d.]+)s \((\d+) bytes\)")  # streams.agents


def _peak_rss_mb(pid: int | None) -> float | None:
    """The worker's peak resident memory so far (Linux VmHWM), MB; None where unreadable."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (OSError, TypeError):
        return None
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    return round(int(match.group(1)) / 1024, 1) if match else None


# -- batch -----------------------------------------------------------------------------------------
def run_batch(graph: BipartiteGraph, personas: PersonaSet, data_dir: Path, held: set[str], budget: float
              ) -> dict[str, list[int]]:
    """`gplr label` with its defaults (parsed by the CLI's own parser), held-out users excluded."""
    from core.batch_cli import _run_kwargs
    from core.cli import build_parser

    args = build_parser().parse_args(["label", "--data", "-", "--personas", "-", "--out", "x.jsonl",
                                      "--budget", str(budget)])
    labeler = make_labeler("replay", personas, path=data_dir / "user_personas_gpt4.csv.gz")
    exclude = np.array([u for u, uid in enumerate(graph.user_ids) if str(uid) in held], dtype=np.int64)
    result = run_gplr(graph, personas, labeler, exclude=exclude, **_run_kwargs(args))
    return {str(uid): list(result.assignment.personas_of(u)) for u, uid in enumerate(graph.user_ids)}


def batch_on(frame, prototypes: Mapping[str, Sequence[int]], personas: PersonaSet, zero_shot: bool
             ) -> dict[str, list[int]]:
    """The refit's model fitted on the stream's own final prototypes (`streams.refit.fit_graph_model`,
    the batch functions), deciding every user on exact Ψ_raw: what the stream's final state would
    be without the ε of propagation — isolates the decision path from batch's other prototype draw."""
    from core.affinity import exact_affinity, prototype_matrix
    from core.decoder import PersonaModel
    from streams.agents import REFIT_RULE
    from streams.refit import fit_graph_model, history_graph

    graph = history_graph(frame)
    body = fit_graph_model(graph, prototypes, len(personas), REFIT_RULE, K, personas if zero_shot else None)
    if body is None:
        return {}
    index = {str(u): i for i, u in enumerate(graph.user_ids)}
    rows = {index[u]: tuple(p) for u, p in prototypes.items() if u in index and p}
    idx, _ = PersonaModel.from_dict(body).decide(graph, exact_affinity(
        graph, prototype_matrix(graph.n_users, rows, len(personas))))
    return {uid: [int(i) for i in idx[u] if i >= 0] for uid, u in index.items()}


def popularity(prototypes: Mapping[str, Sequence[int]], m: int) -> list[int]:
    """The K personas most common among the prototypes' labels (ties to the lower index)."""
    counts = np.bincount([p for ps in prototypes.values() for p in ps], minlength=m)
    return [int(p) for p in np.argsort(-counts, kind="stable")[:K]]


# -- main ------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"the first {QUICK_EVENTS:,} purchases, < 3 min")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA,
                        help="Online Retail folder (online_retail.csv.gz, personas.json, user_personas_gpt4.csv.gz)")
    parser.add_argument("--events", type=int, default=None, help="replay only the first N purchases")
    parser.add_argument("--budget", type=float, default=0.05)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds the stream may take to drain")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the worker's and broker's data and logs here (default: a temporary folder, removed)")
    parser.add_argument("--rate", type=float, default=None,
                        help="publish at most this many purchases/s (default: all at once, a backlog; with a "
                             "large backlog the worker labels only once it has caught up)")
    parser.add_argument("--no-zero-shot", action="store_true",
                        help="the worker without the zero-shot channel (GPLR_ZERO_SHOT=false); batch keeps its default")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the worker and broker on `kill` too
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("streams.broker", "streams.topics", "core.gplr", "core.labelers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    data_dir = args.data_dir.resolve()
    if not (data_dir / "online_retail.csv.gz").is_file():
        print(f"stream_quality: no online_retail.csv.gz in {data_dir} (use --data-dir)", file=sys.stderr)
        return 2
    t_start = time.monotonic()
    frame, _ = load_online_retail(data_dir / "online_retail.csv.gz", paper_filter=True)
    personas = load_personas(data_dir / "personas.json")
    full = BipartiteGraph.from_frame(frame)
    held = held_out_users(full)
    n_events = args.events or (QUICK_EVENTS if args.quick else None)
    if n_events:
        frame = frame.sort_values("ts", kind="stable").iloc[:n_events]
    graph = BipartiteGraph.from_frame(frame)
    truth = gpt4_truth(graph, personas, data_dir / "user_personas_gpt4.csv.gz")
    scored = [str(u) for u in graph.user_ids if str(u) in held and str(u) in truth]
    logger.info("%d purchases, %d users, %d held out and scored", len(frame), graph.n_users, len(scored))

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gplr-sq-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        stream = run_stream(frame, data_dir, held, args.budget, args.partitions, workdir, args.timeout, args.rate,
                            False if args.no_zero_shot else None)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    logger.info("stream: %d events in %.1fs, %d prototypes, %d updates", stream["events"], stream["seconds"],
                len(stream["prototypes"]), stream["updates"])
    t_batch = time.monotonic()
    batch = run_batch(graph, personas, data_dir, held, args.budget)
    logger.info("batch gplr label: %.1fs", time.monotonic() - t_batch)
    assert not set(stream["prototypes"]) & held, "a held-out user was labeled"

    m = len(personas)
    pop = popularity(stream["prototypes"], m)
    s_stream = score(stream["sets"], truth, scored, personas)
    s_batch = score(batch, truth, scored, personas)
    s_pop = score({u: pop for u in scored}, truth, scored, personas)
    s_labels = score(truth, truth, scored, personas)
    s_same = score(batch_on(frame, stream["prototypes"], personas, stream["zero_shot"]), truth, scored, personas)
    result: dict[str, Any] = {
        "bench": "stream_quality", "quick": bool(args.quick), "events": stream["events"],
        "users": graph.n_users, "scored_users": len(scored), "budget": args.budget,
        "stream_f1_at_5": s_stream["f1"], "batch_f1_at_5": s_batch["f1"], "popularity_f1_at_5": s_pop["f1"],
        "stream_macro_f1": s_stream["macro_f1"], "batch_macro_f1": s_batch["macro_f1"],
        "stream_prototypes_batch_f1_at_5": s_same["f1"], "stream_prototypes_batch_macro_f1": s_same["macro_f1"],
        "top_set_share": s_stream["top_set_share"], "batch_top_set_share": s_batch["top_set_share"],
        "labels_top_set_share": s_labels["top_set_share"],
        "prevalence_tv": s_stream["prevalence_tv"], "batch_prevalence_tv": s_batch["prevalence_tv"],
        "stream_personas_per_user": s_stream["personas_per_user"],
        "batch_personas_per_user": s_batch["personas_per_user"],
        "labels_personas_per_user": s_labels["personas_per_user"],
        "labeled_share": round(len(stream["prototypes"]) / max(graph.n_users, 1), 4),
        "prototypes": len(stream["prototypes"]), "label_requests": stream["label_requests"],
        "events_in": stream["costs"].get("gplr_events_in_total"), "persona_updates": stream["updates"],
        "unscored_no_update": sum(1 for u in scored if u not in stream["sets"]),
        "prior_updates_scored": sum(1 for u in scored if stream["reasons"].get(u) == "prior"),
        "stream_seconds": round(stream["seconds"], 1), "rate": args.rate,
        "pushes_per_purchase": round(stream["costs"].get("gplr_pushes_total", 0.0) / max(stream["events"], 1), 3),
        "push_messages_per_purchase": round(
            stream["costs"].get("gplr_push_messages_total", 0.0) / max(stream["events"], 1), 3),
        "decisions_frozen_share": stream["costs"].get("gplr_decisions_frozen_share"),
        "zero_shot": stream["zero_shot"], "worker_peak_rss_mb": stream["peak_rss_mb"],
        "refits": len(stream["refits"]), "refit_seconds": [s for s, _ in stream["refits"]],
        "model_bytes_max": max((b for _, b in stream["refits"]), default=None),
        "stream_recall": s_stream["recall"], "batch_recall": s_batch["recall"],
        "seconds": round(time.monotonic() - t_start, 1),
    }
    print(json.dumps(result, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
