"""Batch commands of `gplr`: `label` (GPLR over a purchases file) and `batch-demo` (synthetic shop).

Core stays free of rich; this module owns the terminal: progress bars fed by `run_gplr`'s
`progress` callback, and a closing summary of what was loaded, spent and assigned.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from core.decoder import DEFAULT_RULE, PREVALENCE_MATCH, RULES, ZERO_SHOT
from core.gplr import DECODERS, GPLRResult, run_gplr, score_sets
from core.gplr import Progress as ProgressCallback
from core.graph import BipartiteGraph, EdgeWeight
from core.personas import PersonaSet

if TYPE_CHECKING:
    from core.labelers.base import Labeler
    from core.labelers.embedding import EmbeddingLabeler

__all__ = ["register", "cmd_label", "cmd_batch_demo", "write_assignments"]

logger = logging.getLogger(__name__)

OUTPUT_SUFFIXES = (".jsonl", ".csv")


# -- shared pieces ---------------------------------------------------------------------------
def _add_gplr_options(p: argparse.ArgumentParser, k: int, budget: float) -> None:
    p.add_argument("--budget", type=_budget, default=budget,
                   help="LLM label requests: a fraction of users (<1) or a count (default %(default)s)")
    p.add_argument("--method", choices=("exact", "revaff"), default="exact")
    p.add_argument("--hops", type=int, default=1, help="walk length ℓ̂ (default 1)")
    p.add_argument("--eps", type=float, default=0.05, help="RevAff error bound ε (default 0.05)")
    p.add_argument("--beta", type=float, default=0.5, help="de-bias strength β (default 0.5)")
    p.add_argument("--weight", choices=("binary", "count", "log"), default="binary",
                   help="edge weight for the transition matrices")
    p.add_argument("--k", type=int, default=k,
                   help="personas per unlabeled user (the cap with --decoder model or --adaptive)")
    p.add_argument("--adaptive", nargs="?", type=float, const=0.5, default=None, metavar="RATIO",
                   help="keep personas scoring >= RATIO x the user's best (default ratio 0.5), up to --k")
    p.add_argument("--decoder", choices=DECODERS, default="model",
                   help="model: calibrated per-persona decoder over graph share + item-name channel (default, "
                        "core.decoder); graph: top personas of Ψ (the paper); words: word classifiers")
    p.add_argument("--rule", choices=RULES, default=DEFAULT_RULE,
                   help="--decoder model: keep the top personas maximising expected F1 (default), or per-"
                        "persona thresholds fitted for F1 or for the prototypes' prevalence")
    p.add_argument("--prevalence-match", type=float, default=PREVALENCE_MATCH, metavar="S",
                   help="--decoder model: move decisions this share (0..1) of the way towards the "
                        "prototypes' persona prevalence (default %(default)s; 0 = pure expected F1)")
    p.add_argument("--zero-shot", action=argparse.BooleanOptionalAction, default=ZERO_SHOT,
                   help="--decoder model: add the label-free zero-shot channel (MiniLM votes of the item names "
                        "for each persona's definition, core.zero_shot) to the decoder (default on)")
    p.add_argument("--min-score", type=float, default=None,
                   help="drop personas scoring below this (use ~0.35 with --decoder words)")
    p.add_argument("--rounds", type=int, default=5, help="labeling rounds T (default 5)")
    p.add_argument("--sampling", choices=("du", "random"), default="random",
                   help="how rounds after the first pick prototypes (default random: measured best with "
                        "--decoder model on Online Retail; du = the paper's distribution uncertainty)")
    p.add_argument("--seed", type=int, default=0)


def _budget(text: str) -> float | int:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("budget must be positive")
    return value if value < 1 else int(value) if value.is_integer() else value


@contextmanager
def _progress_bars(console: Console) -> Iterator[ProgressCallback]:
    """A `run_gplr` progress callback drawing one rich bar per stage."""
    tasks: dict[str, Any] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=False) as bars:
        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bars.add_task(stage, total=max(total, 1))
            bars.update(tasks[stage], completed=done, total=max(total, 1))

        yield update


def _run_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(budget=args.budget, rounds=args.rounds, hops=args.hops, eps=args.eps, beta=args.beta,
                method=args.method, weight=args.weight, k=args.k, adaptive=args.adaptive,
                min_score=args.min_score, decoder=args.decoder, rule=args.rule,
                prevalence=args.prevalence_match, sampling=args.sampling, seed=args.seed,
                zero_shot=args.zero_shot and args.decoder == "model")


def _check_args(args: argparse.Namespace) -> None:
    if args.k < 1 or args.rounds < 1 or args.hops < 1:
        raise SystemExit("gplr: --k, --rounds and --hops must be at least 1")
    if args.adaptive is not None and not 0 < args.adaptive <= 1:
        raise SystemExit("gplr: --adaptive RATIO must be in (0, 1]")
    if not 0 <= args.prevalence_match <= 1:
        raise SystemExit("gplr: --prevalence-match must be in [0, 1]")


def write_assignments(path: Path, graph: BipartiteGraph, personas: PersonaSet, result: GPLRResult,
                      hops: int = 1, weight: EdgeWeight = "binary") -> int:
    """Write one row per user (id, persona names, scores, llm_labelled) as JSON lines or CSV; JSON
    lines also carry, per persona, its evidence items and prototypes and, with a zero-shot
    channel, that channel's part of the decision (`core.evidence`, what `gplr explain` prints).
    `hops`/`weight` must be those the affinity was computed with."""
    suffix = path.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise ValueError(f"{path}: output must end in .jsonl or .csv")
    names = personas.names
    a = result.assignment
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")  # a crash never leaves half a file under the name
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        if suffix == ".jsonl":
            from core.evidence import result_evidence, zero_shot_evidence

            items, protos = result_evidence(graph, result, names, hops, weight)
            zero_shot = None if result.model is None else zero_shot_evidence(graph, a.idx, result.model)
            for u in range(graph.n_users):
                row = {"user_id": str(graph.user_ids[u]),
                       "personas": [names[p] for p in a.personas_of(u)],
                       "scores": [round(s, 6) for s in a.scores_of(u)],
                       "llm_labelled": bool(a.llm_labelled[u]),
                       "evidence": items[u], "prototypes": protos[u]}
                if zero_shot is not None:
                    row["zero_shot"] = zero_shot[u]
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        else:
            out = csv.writer(fh)
            out.writerow(["user_id", "personas", "scores", "llm_labelled"])
            for u in range(graph.n_users):
                out.writerow([graph.user_ids[u], "|".join(names[p] for p in a.personas_of(u)),
                              "|".join(f"{s:.6g}" for s in a.scores_of(u)), int(a.llm_labelled[u])])
    tmp.replace(path)
    return graph.n_users


def _summary(console: Console, graph: BipartiteGraph, personas: PersonaSet, result: GPLRResult,
             seconds: float) -> None:
    stats = result.labeler_stats
    table = Table(title="GPLR summary", show_header=False)
    table.add_row("graph", f"{graph.n_users:,} users, {graph.n_items:,} items, {graph.n_edges:,} edges")
    reasons = Counter(result.failed.values()).most_common(3)
    why = f" ({', '.join(f'{r} {n:,}' for r, n in reasons)})" if reasons else ""
    table.add_row("prototypes", f"{len(result.prototypes):,} labeled, {len(result.failed):,} failed{why}")
    table.add_row("LLM calls", f"{stats.get('calls', 0):,} (errors {stats.get('errors', 0):,}, "
                  f"retries {stats.get('retries', 0):,})")
    table.add_row("tokens", f"prompt {stats.get('prompt_tokens', 0):,}, "
                            f"completion {stats.get('completion_tokens', 0):,}")
    dropped = ", ".join(f"{n} ×{c}" for n, c in sorted(result.dropped_names.items(), key=lambda kv: -kv[1])[:5])
    table.add_row("dropped personas", f"{stats.get('dropped_personas', 0):,}" + (f" ({dropped})" if dropped else ""))
    counts = result.assignment.counts()
    table.add_row("personas per user", f"mean {counts.mean():.2f}, none {int((counts == 0).sum()):,}")
    table.add_row("time", f"{seconds:.1f} s")
    console.print(table)
    dist = result.assignment.as_matrix(len(personas)).sum(axis=0)
    top = Table(title="persona distribution (all users)")
    top.add_column("persona")
    top.add_column("users", justify="right")
    top.add_column("share", justify="right")
    for p in np.argsort(-dist, kind="stable"):
        if dist[p]:
            top.add_row(personas[p].name, f"{dist[p]:,}", f"{dist[p] / graph.n_users:.1%}")
    console.print(top)


# -- gplr label ------------------------------------------------------------------------------
def cmd_label(args: argparse.Namespace) -> int:
    from core.data_options import load_data
    from core.personas import load_personas

    _check_args(args)
    console = Console(stderr=True)
    out = Path(args.out)
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise SystemExit(f"gplr: --out {out} must end in .jsonl or .csv")
    fmt = args.format
    if args.paper_filter:
        if fmt == "table":
            raise SystemExit("gplr: --paper-filter applies to Online Retail files only")
        fmt = "online-retail"
    opts: dict[str, Any] = {"paper_filter": True} if args.paper_filter else {}
    try:
        personas = load_personas(args.personas)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"gplr label: {exc}") from None
    frame, _ = load_data(args, args.data, "label", fmt, require_ts=False, **opts)
    graph = BipartiteGraph.from_frame(frame)
    labeler = _labeler(args, personas, graph)
    t0 = time.perf_counter()
    with _progress_bars(console) as progress:
        result = run_gplr(graph, personas, labeler, progress=progress, **_run_kwargs(args))
    if not result.prototypes:  # every label call failed: an empty persona list for everyone is no answer
        reasons = ", ".join(f"{r} {n:,}" for r, n in Counter(result.failed.values()).most_common(3))
        raise SystemExit(f"gplr label: the {args.labeler} labeler labeled none of {len(result.failed):,} "
                         f"prototype users ({reasons or 'no calls'}); nothing written to {out}")
    n = write_assignments(out, graph, personas, result, args.hops, args.weight)
    _summary(console, graph, personas, result, time.perf_counter() - t0)
    console.print(f"wrote {n:,} users to {out}")
    return 0


def embedding_labeler(personas: PersonaSet, graph: BipartiteGraph, preset: str = "auto") -> EmbeddingLabeler:
    """The offline labeler calibrated on the whole shop: the catalogue (every item, not just the
    prototypes') and its persona prior fitted on every user's purchases (unlabeled; see
    `EmbeddingLabeler.fit_prior`), as bench/labels.py measures it; `preset` names one of
    `core.labelers.embedding.PRESETS`."""
    from core.labelers import histories_for
    from core.labelers.embedding import PRESETS, EmbeddingLabeler

    labeler = EmbeddingLabeler(personas, catalogue=[str(n) for n in graph.item_names], **PRESETS[preset])
    labeler.fit_prior(histories_for(graph, range(graph.n_users)))
    return labeler


def _labeler(args: argparse.Namespace, personas: PersonaSet, graph: BipartiteGraph) -> Labeler:
    """The labeler `--labeler` names; an LLM endpoint is probed first so that a missing key or
    server fails in seconds, naming the URL, instead of labeling nobody. The embedding labeler
    calibrates on the whole shop (`embedding_labeler`), not just the prototypes."""
    from core.labelers import make_labeler

    options: dict[str, Any] = {}
    try:
        if args.labeler == "replay":
            if not args.replay_file:
                raise SystemExit("gplr label: --labeler replay needs --replay-file")
            options["path"] = args.replay_file
        elif args.labeler == "embedding":
            return embedding_labeler(personas, graph, args.embedding_preset)
        elif args.labeler == "openai":
            from core.labelers.openai_labeler import LLMConfig, LLMError, check_endpoint

            options["config"] = LLMConfig.from_env()
            try:
                check_endpoint(options["config"])
            except LLMError as exc:
                raise SystemExit(f"gplr label: {exc}") from None
        return make_labeler(args.labeler, personas, **options)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"gplr label: {exc}") from None


# -- gplr batch-demo -------------------------------------------------------------------------
def cmd_batch_demo(args: argparse.Namespace) -> int:
    from core.synthetic import make_shop

    _check_args(args)
    console = Console()
    shop = make_shop(n_users=args.users, n_items=args.items, n_personas=args.n_personas, seed=args.seed)
    graph = shop.graph()
    personas = shop.personas
    console.print(f"synthetic shop: {graph.n_users:,} users, {graph.n_items:,} items, "
                  f"{graph.n_edges:,} edges, {len(personas)} planted personas")
    labeler = embedding_labeler(personas, graph)
    t0 = time.perf_counter()
    with _progress_bars(console) as progress:
        result = run_gplr(graph, personas, labeler, progress=progress, **_run_kwargs(args))
    seconds = time.perf_counter() - t0
    truth = np.zeros((graph.n_users, len(personas)), dtype=bool)
    for u, uid in enumerate(graph.user_ids):
        truth[u, list(shop.user_truth[str(uid)])] = True
    pred = result.assignment.as_matrix(len(personas))
    rest = ~result.assignment.llm_labelled
    sample = Table(title="sample of users (planted vs assigned)")
    for col in ("user", "planted", "assigned", "by"):
        sample.add_column(col)
    rng = np.random.default_rng(args.seed)
    for u in sorted(rng.choice(graph.n_users, size=min(args.show, graph.n_users), replace=False)):
        sample.add_row(str(graph.user_ids[u]),
                       ", ".join(personas[p].name for p in np.flatnonzero(truth[u])),
                       ", ".join(personas[p].name for p in result.assignment.personas_of(u)),
                       "labeler" if result.assignment.llm_labelled[u] else "GPLR")
    console.print(sample)
    _summary(console, graph, personas, result, seconds)
    quality = Table(title="against the planted personas")
    for col in ("users", "precision", "recall", "F1", "macro F1"):
        quality.add_column(col, justify="right")
    for name, mask in (("labeled by the labeler", ~rest), ("propagated by GPLR", rest)):
        if mask.any():
            s = score_sets(pred[mask], truth[mask])
            quality.add_row(f"{name} ({s['users']:,})", f"{s['precision']:.3f}", f"{s['recall']:.3f}",
                            f"{s['f1']:.3f}", f"{s['macro_f1']:.3f}")
    console.print(quality)
    if args.out:
        write_assignments(Path(args.out), graph, personas, result, args.hops, args.weight)
        console.print(f"wrote {graph.n_users:,} users to {args.out}")
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `label`, `batch-demo` (and `generate` when persona generation is installed)."""
    from core.data_options import add_data_options

    p = subparsers.add_parser("label", help="assign personas to every user of a purchases file (GPLR)")
    p.add_argument("--data", required=True, help="purchases file (Online Retail CSV, or CSV/Parquet table)")
    p.add_argument("--format", choices=("auto", "online-retail", "table"), default="auto")
    p.add_argument("--paper-filter", action="store_true",
                   help="Online Retail: rebuild the paper's graph (4,297 users, 3,846 items)")
    add_data_options(p)  # --columns / --schema, shared by every command that reads purchases
    p.add_argument("--personas", required=True, help="persona set JSON [{name, definition}, ...]")
    p.add_argument("--labeler", choices=("embedding", "openai", "replay"), default="embedding")
    p.add_argument("--replay-file", help="recorded labels for --labeler replay: a CustomerID,personas CSV "
                   "or `gplr label`/`gplr export` output")
    p.add_argument("--embedding-preset", choices=("auto", "niche", "shop-themes"), default="auto",
                   help="--labeler embedding: auto (default: the catalogue chooses), niche personas, or a "
                        "shop whose whole catalogue shares a few themes (gift shop; docs/RESULTS.md §6)")
    p.add_argument("--out", required=True, help="output file, .jsonl or .csv")
    _add_gplr_options(p, k=5, budget=0.05)
    p.set_defaults(func=cmd_label)

    d = subparsers.add_parser("batch-demo", help="GPLR on a synthetic shop with the embedding labeler")
    d.add_argument("--users", type=int, default=2000)
    d.add_argument("--items", type=int, default=600)
    d.add_argument("--n-personas", type=int, default=8)
    d.add_argument("--show", type=int, default=8, help="users to print")
    d.add_argument("--out", help="also write the assignments (.jsonl or .csv)")
    _add_gplr_options(d, k=3, budget=0.05)
    d.set_defaults(func=cmd_batch_demo)

    if find_spec("core.persona_generation") is not None:
        from core import persona_generation

        persona_generation.add_generate_command(subparsers)
