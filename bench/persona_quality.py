"""Batch persona quality of the calibrated decoder (`core.decoder`) on Online Retail and a synthetic shop.

Protocol (the same split as bench/labels.py, imported from it): the paper-filtered graph, the
recorded GPT-4 labels replayed for the prototypes, a fixed 20% of customers held out (never
labeled, the only scored set), another 20% for validation (never labeled, the only set the
configuration is chosen on), prototypes from the rest; budget 5% of all users; 3 seeds.

Grid: prototype sampling (random / DU) × decoder: the paper's top-5 of Ψ (β = 0.5), and the
persona model (item channel + decoder) with each decision rule and prevalence-matching
strength, with the label-free zero-shot channel (`core.zero_shot`, "model+zero-shot") and
without it ("model", expected-F1 rule only). The choice is the best validation F1@5 among
configurations whose validation prevalence TV is ≤ 0.10 (the issue's target), F1 compared to 3
decimals with ties going to the lower top set share (the issue's other degeneracy target);
`gplr label`'s defaults are set by hand (docs/RESULTS.md §2b says where they depart from it),
and their held-out numbers come from `run_gplr` called with exactly the keyword arguments the
CLI passes when given no option.

Metrics on held-out users: F1@5 (mean per-user F1, ≤ 5 personas), macro F1, `top_set_share`
(share of users whose set equals the most common set) next to the labels' own, `prevalence_tv`
(total variation between predicted and labeled persona prevalence), per-persona recall; means
over seeds, and for `gplr label`'s defaults also the medians (`batch_median_over_seeds`).

Synthetic check: `core.synthetic.make_shop` with planted personas as the labeler; the persona
model must not do worse than the graph decoder there.

    python bench/persona_quality.py [--quick] [--data DIR] [--zero-shot-cache FILE]
                                                                # DIR or $ONLINE_RETAIL_DATA

Prints a table, then one JSON object as the last line.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from bench.labels import DEFAULT_DATA, Setup, load_setup  # noqa: E402
from core.affinity import debias_weights  # noqa: E402
from core.batch_cli import _run_kwargs, register  # noqa: E402
from core.decoder import fit_persona_model, match_prevalence  # noqa: E402
from core.gplr import assign_personas, run_gplr, score_sets, with_prototypes  # noqa: E402
from core.labelers import make_labeler  # noqa: E402
from core.zero_shot import ZeroShotChannel, zero_shot_channel  # noqa: E402

BUDGET = 0.05
BETA = 0.5
TV_TARGET = 0.10
RULE_GRID = ("expected_f1", "f1", "prevalence")
STRENGTHS = (0.0, 0.25, 0.4, 0.5, 0.55, 0.6, 0.7, 0.75, 1.0)


def quality(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """F1@5 & co. plus the degeneracy measures, on boolean users × personas matrices."""
    s = score_sets(pred, truth)

    def top_share(sets: np.ndarray) -> float:
        return Counter(map(bytes, np.packbits(sets, axis=1))).most_common(1)[0][1] / sets.shape[0]

    pp, tp = pred.sum(axis=0), truth.sum(axis=0)
    tv = 0.5 * float(np.abs(pp / max(pp.sum(), 1) - tp / max(tp.sum(), 1)).sum())
    return {"f1": s["f1"], "macro_f1": s["macro_f1"], "micro_f1": s["micro_f1"], "top_set_share": top_share(pred),
            "labels_top_set_share": top_share(truth), "prevalence_tv": tv,
            "mean_personas": float(pred.sum(axis=1).mean())}


def as_matrix(idx: np.ndarray, m: int) -> np.ndarray:
    out = np.zeros((idx.shape[0], m), dtype=bool)
    rows, cols = np.nonzero(idx >= 0)
    out[rows, idx[rows, cols]] = True
    return out


def evaluate(setup: Setup, samplings: tuple[str, ...], seeds: list[int], console: Console,
             zero_shot: ZeroShotChannel) -> tuple[list[dict], dict]:
    """Every decoder configuration on the same prototypes per (sampling, seed)."""
    g, m = setup.graph, len(setup.personas)
    acc: dict[tuple, dict[str, list[float]]] = {}
    recall: dict[tuple, list[np.ndarray]] = {}
    popularity: list[float] = []

    def record(key: tuple, pred: np.ndarray) -> None:
        cell = acc.setdefault(key, {})
        for split, users in (("valid", setup.valid), ("heldout", setup.held)):
            for name, value in quality(pred[users], setup.truth[users]).items():
                cell.setdefault(f"{split}_{name}", []).append(value)
        t, p = setup.truth[setup.held], pred[setup.held]
        recall.setdefault(key, []).append((t & p).sum(axis=0) / np.maximum(t.sum(axis=0), 1))

    for sampling in samplings:
        for seed in seeds:
            t0 = time.perf_counter()
            labeler = make_labeler("replay", setup.personas, path=setup.labels_path)
            res = run_gplr(g, setup.personas, labeler, budget=BUDGET, beta=BETA, sampling=sampling, seed=seed,
                           exclude=setup.excluded)
            protos = res.prototypes
            record((sampling, "graph top-5", None, None),
                   assign_personas(res.psi, 5, prototypes=protos, prior=res.q_hat).as_matrix(m))
            pop = np.zeros((g.n_users, m), dtype=bool)
            pop[:, np.argsort(-res.q_hat, kind="stable")[:5]] = True
            popularity.append(score_sets(pop[setup.held], setup.truth[setup.held])["f1"])
            psi_raw = res.psi / debias_weights(res.q_hat, BETA)
            rest = np.setdiff1d(np.arange(g.n_users), np.fromiter(protos, dtype=np.int64))
            for rule, zs in [(r, zero_shot) for r in RULE_GRID] + [("expected_f1", None)]:
                model = fit_persona_model(g, protos, m, psi_raw, rule=rule, seed=seed, prevalence=0.0, zero_shot=zs)
                text, feats = model.text_logits(g), model.zero_shot_features(g)
                for strength in STRENGTHS if rule == "expected_f1" else (0.0,):
                    dec = match_prevalence(model.decoder, psi_raw[rest], text[rest], g.user_degree[rest], strength,
                                           zero_shot=None if feats is None else feats[rest])
                    idx, scores = dec.decide(psi_raw, text, g.user_degree, feats)
                    probs = dec.probabilities(psi_raw, text, g.user_degree, zero_shot=feats)
                    record((sampling, "model" if zs is None else "model+zero-shot", rule, strength),
                           with_prototypes(idx, scores, probs, protos).as_matrix(m))
            console.log(f"{sampling} seed {seed}: {len(protos)} prototypes, {time.perf_counter() - t0:.1f}s")
    rows = []
    for (sampling, decoder, rule, strength), cell in acc.items():
        row = {"sampling": sampling, "decoder": decoder, "rule": rule, "prevalence_match": strength,
               "seeds": len(seeds)}
        row.update({k: round(float(np.mean(v)), 4) for k, v in cell.items()})
        row["heldout_f1_std"] = round(float(np.std(cell["heldout_f1"])), 4)
        row["heldout_recall_per_persona"] = {
            setup.personas[j].name: round(float(r), 3)
            for j, r in enumerate(np.mean(recall[(sampling, decoder, rule, strength)], axis=0))}
        rows.append(row)
    return rows, {"popularity_f1_at_5": round(float(np.mean(popularity)), 4)}


def label_defaults() -> dict:
    """The `run_gplr` keyword arguments `gplr label` uses when given no option."""
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["label", "--data", "purchases.csv", "--personas", "personas.json", "--out", "out.jsonl"])
    return _run_kwargs(args)


def default_batch(setup: Setup, seeds: list[int], console: Console, zero_shot: ZeroShotChannel) -> dict:
    """`gplr label`'s defaults, run as the CLI runs them, scored on the held-out users (the CLI's
    `zero_shot=True` computes exactly `zero_shot`, the channel of the graph's item names)."""
    m = len(setup.personas)
    cells: dict[str, list[float]] = {}
    for seed in seeds:
        labeler = make_labeler("replay", setup.personas, path=setup.labels_path)
        kwargs = {**label_defaults(), "seed": seed}
        kwargs["zero_shot"] = zero_shot if kwargs["zero_shot"] is True else kwargs["zero_shot"]
        res = run_gplr(setup.graph, setup.personas, labeler, exclude=setup.excluded, **kwargs)
        pred = res.assignment.as_matrix(m)
        for k, v in quality(pred[setup.held], setup.truth[setup.held]).items():
            cells.setdefault(k, []).append(v)
    out = {k: round(float(np.mean(v)), 4) for k, v in cells.items()}
    out["median"] = {k: round(float(np.median(v)), 4) for k, v in cells.items()}  # the targets
    console.log(f"gplr label defaults, held out: {out}")
    return out


def synthetic_check(seeds: list[int], console: Console) -> dict:
    """Planted personas as the labeler: persona model (with and without the zero-shot channel)
    vs graph decoder at a 5% budget."""
    from core.labelers.base import LabelerStats, LabelResult
    from core.synthetic import make_shop

    class Planted:
        name = "planted"

        def __init__(self, truth: dict[str, tuple[int, ...]]) -> None:
            self.truth, self.stats = truth, LabelerStats()

        def label(self, histories):  # noqa: ANN001 - the Labeler protocol
            self.stats.add(calls=len(histories))
            return [LabelResult(h.user_id, self.truth[h.user_id]) for h in histories]

    out: dict[str, list[float]] = {}
    for seed in seeds:
        shop = make_shop(n_users=2000, n_items=600, n_personas=12, seed=seed)
        g = shop.graph()
        m = len(shop.personas)
        truth = np.zeros((g.n_users, m), dtype=bool)
        for u, uid in enumerate(g.user_ids):
            truth[u, list(shop.user_truth[str(uid)])] = True
        for name, kw in (("graph", dict(decoder="graph", k=3, sampling="du")),
                         ("model", dict(decoder="model", k=5, sampling="random", zero_shot=True)),
                         ("model_no_zero_shot", dict(decoder="model", k=5, sampling="random"))):
            res = run_gplr(g, shop.personas, Planted(shop.user_truth), budget=BUDGET, seed=seed, **kw)
            rest = ~res.assignment.llm_labelled
            for k, v in quality(res.assignment.as_matrix(m)[rest], truth[rest]).items():
                out.setdefault(f"{name}_{k}", []).append(v)
    summary = {k: round(float(np.mean(v)), 4) for k, v in out.items()}
    console.log(f"synthetic shop: {summary}")
    return summary


def load_zero_shot(setup: Setup, cache: Path | None, console: Console) -> ZeroShotChannel:
    """The zero-shot channel of the graph's item names, from `cache` when it holds these names."""
    names = [str(n) for n in setup.graph.item_names]
    if cache is not None and cache.exists():
        channel = ZeroShotChannel.from_dict(json.loads(cache.read_text()))
        if list(channel.names) == list(dict.fromkeys(names)):
            return channel
        console.log(f"{cache}: another catalogue, recomputing the zero-shot channel")
    t0 = time.perf_counter()
    channel = zero_shot_channel(names, setup.personas)
    console.log(f"zero-shot channel: {len(channel.names)} names in {time.perf_counter() - t0:.1f}s")
    if cache is not None:
        cache.write_text(json.dumps(channel.to_dict()))
    return channel


def print_table(console: Console, rows: list[dict]) -> None:
    show = Table(title=f"Online Retail, {BUDGET:.0%} budget, vs GPT-4 labels (mean over seeds)")
    for c in ("sampling", "decoder", "valid F1", "held-out F1", "macro F1", "top set", "TV", "#personas"):
        show.add_column(c, justify="left" if c in ("sampling", "decoder") else "right")
    for r in sorted(rows, key=lambda r: -r["valid_f1"]):
        what = r["decoder"] if r["rule"] is None else f"{r['decoder']} {r['rule']} match {r['prevalence_match']}"
        show.add_row(r["sampling"], what, f"{r['valid_f1']:.3f}", f"{r['heldout_f1']:.3f}",
                     f"{r['heldout_macro_f1']:.3f}", f"{r['heldout_top_set_share']:.3f}",
                     f"{r['heldout_prevalence_tv']:.3f}", f"{r['heldout_mean_personas']:.2f}")
    console.print(show)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("ONLINE_RETAIL_DATA", DEFAULT_DATA)),
                        help="folder with the Online Retail files (default $ONLINE_RETAIL_DATA or ../shared/...)")
    parser.add_argument("--quick", action="store_true", help="one seed, random sampling only")
    parser.add_argument("--seeds", type=int, default=None, help="seeds (default 3, quick 1)")
    parser.add_argument("--zero-shot-cache", type=Path, default=None, metavar="FILE",
                        help="JSON file keeping the zero-shot channel of the catalogue between runs (MiniLM "
                             "encodes 3,846 names once); recomputed when its names differ")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    console = Console(stderr=True, width=150)
    data_dir = args.data.resolve()
    if not (data_dir / "online_retail.csv.gz").exists():
        console.print(f"no Online Retail data under {data_dir}")
        print(json.dumps({"error": f"data not found under {data_dir}"}))
        return 2
    t0 = time.perf_counter()
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    setup = load_setup(data_dir, console)
    zero_shot = load_zero_shot(setup, args.zero_shot_cache, console)
    rows, baselines = evaluate(setup, ("random",) if args.quick else ("random", "du"), seeds, console, zero_shot)
    print_table(console, rows)
    ok = [r for r in rows if r["valid_prevalence_tv"] <= TV_TARGET] or rows
    # validation F1 equal to 3 decimals (well inside the seeds' spread) is a tie: the lower top set share wins
    best = max(ok, key=lambda r: (round(r["valid_f1"], 3), -r["valid_top_set_share"]))
    best_f1 = max(rows, key=lambda r: r["valid_f1"])
    graph = max((r for r in rows if r["rule"] is None), key=lambda r: r["valid_f1"])
    batch = default_batch(setup, seeds, console, zero_shot)
    synthetic = synthetic_check(seeds[:1] if args.quick else seeds, console)
    keys = ("sampling", "decoder", "rule", "prevalence_match")
    summary = {
        "batch_f1_at_5": batch["f1"],
        "batch_macro_f1": batch["macro_f1"],
        "batch_top_set_share": batch["top_set_share"],
        "labels_top_set_share": batch["labels_top_set_share"],
        "batch_prevalence_tv": batch["prevalence_tv"],
        "batch_mean_personas": batch["mean_personas"],
        "batch_median_over_seeds": batch["median"],
        "batch_defaults": {k: v for k, v in label_defaults().items() if k != "seed"},
        "chosen_on_validation": {k: best[k] for k in keys},
        "chosen_heldout": {k: v for k, v in best.items() if k.startswith("heldout")},
        "best_f1_any_tv": {**{k: best_f1[k] for k in keys}, "heldout_f1": best_f1["heldout_f1"],
                           "heldout_prevalence_tv": best_f1["heldout_prevalence_tv"]},
        "graph_top5_f1_at_5": graph["heldout_f1"],
        **baselines,
        "synthetic": synthetic,
        "selection": f"best validation F1@5 (3 decimals; ties: lower top set share) among configurations "
                     f"with validation prevalence TV <= {TV_TARGET}",
        "seeds": len(seeds),
        "held_out_users": int(setup.held.size),
        "quick": bool(args.quick),
        "seconds": round(time.perf_counter() - t0, 1),
        "table": rows,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
