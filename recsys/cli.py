"""`gplr` subcommands of the recommender package (registered through the `gplr.commands`
entry point). Each command is one `_add_<name>(sub)` function plus its `cmd_<name>(args)`;
add new commands the same way and list them in `register`.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["register", "cmd_train_recsys", "cmd_segment"]

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the recsys commands to the `gplr` parser."""
    _add_train_recsys(subparsers)
    _add_segment(subparsers)


# -- gplr train-recsys -------------------------------------------------------------------------
def _add_train_recsys(sub: argparse._SubParsersAction) -> None:
    from core.data_options import add_data_options

    # The model name is checked by make_model when the command runs: importing recsys.models
    # here would load torch for every `gplr` invocation.
    p = sub.add_parser("train-recsys", help="train a (persona-aware) recommender and report test metrics",
                       description="Train on a purchases file or the paper's split; early stopping on a "
                                   "validation split carved out of train; metrics on test.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--split", type=Path, help="paper split file (CustomerID, Description, split)")
    src.add_argument("--purchases", type=Path, help="purchases CSV/Parquet (split per user at random)")
    add_data_options(p)  # --columns / --schema for --purchases
    p.add_argument("--model", default="lgcn",
                   help="mf, lightgcn, lgcn, afd-lightgcn, lightgcn3, lgcn3, a-lgcn3, ease, ease-persona, "
                        "rp3beta or rp3beta-persona (default lgcn)")
    p.add_argument("--personas", type=Path, help="persona set JSON (persona models)")
    p.add_argument("--user-labels", type=Path,
                   help="user personas: `gplr label`/`gplr export` output (.jsonl/.csv) or a recorded CSV "
                        "(key, '|'-joined names); used directly or replayed by GPLR")
    p.add_argument("--user-personas", choices=("gplr", "recorded"), default="gplr",
                   help="GPLR from --user-labels at --budget (default), or the recorded labels of every user")
    p.add_argument("--user-key", default="CustomerID", help="key column of --user-labels")
    p.add_argument("--item-labels", default=None,
                   help="recorded item personas CSV keyed by product name, or 'embedding' (core's labeler)")
    p.add_argument("--item-key", default="Description", help="key column of --item-labels")
    p.add_argument("--budget", type=float, default=0.05, help="GPLR labeling budget (default 5%%)")
    p.add_argument("--test-frac", type=float, default=0.2, help="with --purchases: test share per user")
    p.add_argument("--valid-frac", type=float, default=0.1, help="validation share of each user's train")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--patience", type=int, default=5)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--n-eigen", type=int, default=128, help="LGCN low-pass basis size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--out", type=Path, help="also write the metrics JSON here")
    p.set_defaults(func=cmd_train_recsys)


def _load(args: argparse.Namespace):
    from core.data_options import load_data
    from recsys.data import load_paper_split, split_frame

    if args.split is not None:
        return load_paper_split(args.split, valid_frac=args.valid_frac, seed=args.seed)
    frame, _ = load_data(args, args.purchases, "train-recsys", require_ts=False)
    return split_frame(frame, test_frac=args.test_frac, valid_frac=args.valid_frac, seed=args.seed)


def _persona_matrices(args: argparse.Namespace, data) -> tuple[Any, Any]:
    from core.personas import load_personas
    from recsys.data import load_persona_table
    from recsys.experiment import embedding_item_personas, gplr_user_personas

    if args.personas is None or args.user_labels is None:
        raise ValueError(f"{args.model} needs --personas and --user-labels")
    personas = load_personas(args.personas)
    if args.user_personas == "gplr":
        users = gplr_user_personas(data, personas, args.user_labels, budget=args.budget, seed=args.seed)
    else:
        users = load_persona_table(args.user_labels, args.user_key, data.user_ids, personas)
    if args.item_labels is None:
        items = None
    elif args.item_labels == "embedding":
        items = embedding_item_personas([str(n) for n in data.item_names], personas)
    else:
        items = load_persona_table(args.item_labels, args.item_key, data.item_names, personas)
    return users, items


def cmd_train_recsys(args: argparse.Namespace) -> int:
    from recsys.experiment import GraphCache, ModelConfig, run_model
    from recsys.models import MODELS
    from recsys.train import TrainConfig

    console = Console(stderr=True)
    if args.model not in MODELS:
        console.print(f"[red]error:[/] unknown model {args.model!r}; choose from {', '.join(sorted(MODELS))}")
        return 2
    try:
        data = _load(args)
        persona_mats = _persona_matrices(args, data) if MODELS[args.model].personas else (None, None)
        train = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                            patience=args.patience, device=args.device)
        config = ModelConfig(dim=args.dim, n_eigen=args.n_eigen, train=train)
        graph = GraphCache(data).get(args.model, *persona_mats)
        result = run_model(args.model, data, graph, config, seed=args.seed)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"gplr train-recsys: {exc}") from None
    means = result.test.mean()
    report = {"model": args.model, "dataset": data.summary(), "best_epoch": result.train.best_epoch,
              "valid_ndcg_at_10": result.train.best_valid_ndcg, "test": means,
              "train_seconds": result.train.seconds}
    table = Table(title=f"{args.model}: test metrics ({len(result.test.users)} users)")
    table.add_column("K", justify="right")
    table.add_column("NDCG@K", justify="right")
    table.add_column("F1@K", justify="right")
    for key in sorted((k for k in means if k.startswith("ndcg@")), key=lambda k: int(k.split("@")[1])):
        k = key.split("@")[1]
        table.add_row(k, f"{means[key]:.4f}", f"{means['f1@' + k]:.4f}")
    console.print(table)
    text = json.dumps(report)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)
    return 0


# -- gplr segment ------------------------------------------------------------------------------
def _add_segment(sub: argparse._SubParsersAction) -> None:
    from core.data_options import add_data_options

    p = sub.add_parser("segment", help="segment customers by personas vs RFM (PCA(3) + k-means, silhouette)",
                       description="Paper Section 7.4: persona multi-hot vectors and RFM bins, each reduced "
                                   "by PCA(3) and clustered by k-means; silhouette per k; optional robustness "
                                   "across the two halves of the purchase period.")
    p.add_argument("--personas-file", required=True, type=Path,
                   help="persona assignments: `gplr label` or `gplr export` output (.jsonl/.csv) or a "
                        "recorded table (CustomerID, personas)")
    p.add_argument("--persona-set", required=True, type=Path, help="persona set JSON [{name, definition}, ...]")
    p.add_argument("--data", type=Path, help="purchases file for RFM (and --robustness)")
    p.add_argument("--format", choices=("auto", "online-retail", "table"), default="auto")
    add_data_options(p)  # --columns / --schema for --data
    p.add_argument("--paper-filter", action="store_true", help="Online Retail: the paper's graph")
    p.add_argument("--ks", default="5,15,25,35", help="cluster counts, comma separated (default %(default)s)")
    p.add_argument("--robustness", action="store_true",
                   help="also: share of customers unchanged between halves (GPLR per half; needs --data)")
    p.add_argument("--replay-file", type=Path,
                   help="--robustness: recorded labels replayed as the labeler (default: embedding labeler)")
    p.add_argument("--budget", type=float, default=0.05, help="--robustness: GPLR budget per half")
    p.add_argument("--out", required=True, type=Path, help="segments CSV (user_id, persona_k*, rfm_k*)")
    p.add_argument("--plot", type=Path, help="PNG: persona share per segment for the first k")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_segment)


def cmd_segment(args: argparse.Namespace) -> int:
    import numpy as np

    from core.labelers import make_labeler
    from core.personas import load_personas
    from recsys import segmentation as seg

    try:
        ks = sorted({int(k) for k in args.ks.split(",") if k.strip()})
        personas = load_personas(args.persona_set)
        users, onehot = seg.load_persona_assignments(args.personas_file, personas)
        frame = None
        if args.data is not None:
            from core.data_options import load_data

            opts = {"paper_filter": True} if args.paper_filter else {}
            frame, _ = load_data(args, args.data, "segment", "online-retail" if args.paper_filter else args.format,
                                 require_ts=False, **opts)
        elif args.robustness:
            raise ValueError("--robustness needs --data")
        rfm = None
        if frame is not None:
            table = seg.rfm_table(frame)
            note = seg.rfm_constant_note(table)
            if note:
                print(f"note: {note}", file=sys.stderr, flush=True)
            keep = np.isin(users, table.index.to_numpy())
            if not keep.all():
                log.warning("%d customers of the persona file have no purchases; segmented without them",
                            int((~keep).sum()))
            users, onehot = users[keep], onehot[np.flatnonzero(keep)]
            rfm = seg.segment(seg.rfm_vectors(seg.rfm_bins(table.reindex(users))), ks=ks, seed=args.seed)
        persona_seg = seg.segment(onehot, ks=ks, seed=args.seed)
        consistent_persona = consistent_rfm = None
        if args.robustness:
            def labeler():
                if args.replay_file is not None:
                    return make_labeler("replay", personas, path=args.replay_file)
                return make_labeler("embedding", personas)

            consistent_persona, _ = seg.persona_robustness(frame, personas, labeler, budget=args.budget,
                                                           seed=args.seed)
            consistent_rfm, _ = seg.rfm_robustness(frame)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"gplr segment: {exc}") from None
    columns = {f"persona_k{k}": persona_seg.labels[k] for k in ks}
    if rfm is not None:
        columns.update({f"rfm_k{k}": rfm.labels[k] for k in ks})
    n = seg.write_segments(args.out, users, columns)
    if args.plot is not None:
        seg.plot_segments(args.plot, onehot, persona_seg.labels[ks[0]], personas)
    table = Table(title=f"silhouette ({n:,} customers)")
    for col in ("k", "persona", "RFM"):
        table.add_column(col, justify="right")
    for k in ks:
        table.add_row(str(k), f"{persona_seg.silhouette[k]:.3f}", f"{rfm.silhouette[k]:.3f}" if rfm else "-")
    Console(stderr=True).print(table)
    print(seg.summary_json(persona_seg, rfm, consistent_persona, consistent_rfm))
    return 0
