"""Does the stream's choice of prototypes cost quality? Batch GPLR (`gplr label` defaults) on Online
Retail with the prototypes each `random` sampling rule would choose, against uniform ones.

The stream decides whom to label at purchases, in time order (streams.labeling.LabelPolicy); batch
draws its 5% uniformly. This replays the purchases through the policy's rule without a broker,
then runs batch GPLR with exactly those prototypes (everyone else excluded from sampling), so the
only difference between the rows is who was labeled. Rules: `per_item` (the first rule: a seeded
coin at every new distinct item, admitting 1 − 0.8 of the points: heavy customers get more
chances), `per_user` (the second: one seeded coin per user, below 1.25 × the budget, asked again
at each new item while the budget cap refuses), `share_of_eligible` (one decision per user as it
reaches 3 distinct items, coin below 2 × budget × seen / users eligible so far: tried, greedy where
users qualify slowly) and `share_of_candidates` (the rule, called as the worker calls it:
`LabelPolicy.consider_purchase`, one decision per user as it qualifies, coin below
RANDOM_OVERSAMPLE × budget × seen / users not held out); `uniform`: as many users as the budget
allows, uniformly among the eligible ones (held-out users never; ≥ 3 distinct items).
Scored on the held-out 20% of bench/labels.py (never prototypes) against GPT-4's labels.

    python bench/sampling_bias.py [--data-dir DIR] [--seeds 5] [--quick]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stream_quality import DEFAULT_DATA, gpt4_truth, held_out_users, score  # noqa: E402

from core.batch_cli import _run_kwargs  # noqa: E402
from core.cli import build_parser  # noqa: E402
from core.data import iter_events, load_online_retail  # noqa: E402
from core.gplr import run_gplr  # noqa: E402
from core.graph import BipartiteGraph  # noqa: E402
from core.incremental import UserState, user_purchase  # noqa: E402
from core.labelers import make_labeler  # noqa: E402
from core.personas import load_personas  # noqa: E402
from streams.config import StreamConfig  # noqa: E402
from streams.labeling import LabelPolicy, admit_probability, seeded_unit  # noqa: E402
from streams.records import partition_for  # noqa: E402

PARTITIONS = 4  # bench/stream_quality.py's default
RULES = ("per_item", "per_user", "share_of_eligible", "share_of_candidates")


def choose(events: list, config: StreamConfig, m: int, rule: str, salt: str) -> tuple[list[str], int]:
    """The users the stream would ask, replaying purchases per partition in time order. `salt`
    renames every user (another draw of the coins and partitions, as another shop would be).
    Also returns the requests the partitions' budgets allow at the end (what full spending is)."""
    policy = LabelPolicy(config)
    policy.excluded = frozenset(salt + u for u in policy.excluded)
    rows: dict[str, UserState] = {}
    stats = {p: {"seen": 0, "excluded": 0, "requested": 0} for p in range(config.partitions)}
    eligible = dict.fromkeys(stats, 0)  # `share_of_eligible`'s own counter
    chosen = []
    for event in events:
        user, item = salt + str(event.user_id), str(event.item_id)
        part = partition_for(user, config.partitions)
        st = stats[part]
        state = rows.get(user)
        if state is None:
            state = rows[user] = UserState(m)
            policy.count_user(user, st)
        if not user_purchase(state, item, 1, ""):
            continue
        if rule == "share_of_candidates":  # the stream's rule, as the worker calls it
            admit = policy.consider_purchase(user, state, st) is not None
        elif rule == "share_of_eligible":
            first = len(state.items) == config.label_min_purchases and user not in policy.excluded
            eligible[part] += first
            admit = (first and policy._eligible(user, state) and policy._within_budget(st)
                     and seeded_unit(user, 0) < admit_probability(config.label_budget, st["seen"], eligible[part]))
        else:
            coin = (seeded_unit(user, len(state.items)) >= 0.8 if rule == "per_item"
                    else seeded_unit(user, 0) < 1.25 * config.label_budget)
            admit = policy._eligible(user, state) and coin and policy._within_budget(st)
        if admit:
            state.requested = True
            st["requested"] += 1
            chosen.append(user[len(salt):])
    return chosen, sum(policy.allowed(st) for st in stats.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one seed")
    args = parser.parse_args(argv)
    data = args.data_dir.resolve()
    if not (data / "online_retail.csv.gz").is_file():
        print(f"sampling_bias: no online_retail.csv.gz in {data} (use --data-dir)", file=sys.stderr)
        return 2
    frame, _ = load_online_retail(data / "online_retail.csv.gz", paper_filter=True)
    personas = load_personas(data / "personas.json")
    graph = BipartiteGraph.from_frame(frame)
    held = held_out_users(graph)
    truth = gpt4_truth(graph, personas, data / "user_personas_gpt4.csv.gz")
    scored = [str(u) for u in graph.user_ids if str(u) in held and str(u) in truth]
    excluded = Path(tempfile.mkdtemp(prefix="gplr-sb-")) / "held_out.txt"
    excluded.write_text("\n".join(sorted(held)))
    config = StreamConfig(labeler="replay", replay_labels=data / "user_personas_gpt4.csv.gz", label_budget=0.05,
                          sampling="random", partitions=PARTITIONS, label_exclude=excluded)
    events = list(iter_events(frame.sort_values("ts", kind="stable")))
    kwargs = _run_kwargs(build_parser().parse_args(["label", "--data", "-", "--personas", "-", "--out", "x.jsonl"]))
    labeler = make_labeler("replay", personas, path=data / "user_personas_gpt4.csv.gz")
    index = {str(u): i for i, u in enumerate(graph.user_ids)}
    degrees = np.diff(graph.user_item.indptr)
    candidates = [u for u in index if u not in held and degrees[index[u]] >= config.label_min_purchases]

    def batch_with(protos: list[str]) -> dict:
        keep = np.zeros(graph.n_users, dtype=bool)
        keep[[index[u] for u in protos]] = True
        result = run_gplr(graph, personas, labeler, exclude=np.flatnonzero(~keep),
                          **{**kwargs, "budget": len(protos)})
        pred = {str(uid): list(result.assignment.personas_of(u)) for u, uid in enumerate(graph.user_ids)}
        s = score(pred, truth, scored, personas)
        return {"f1": s["f1"], "macro_f1": s["macro_f1"], "top_set_share": s["top_set_share"],
                "prototypes": len(protos), "mean_degree": round(float(degrees[[index[u] for u in protos]].mean()), 1)}

    runs: dict[str, list[dict]] = {rule: [] for rule in (*RULES, "uniform")}
    for seed in range(1 if args.quick else args.seeds):
        salt = "" if seed == 0 else f"s{seed}:"
        for rule in RULES:
            protos, n = choose(events, config, len(personas), rule, salt)
            runs[rule].append({**batch_with(protos), "budget": n})
        runs["uniform"].append({**batch_with(list(np.random.default_rng(seed).choice(candidates, n, replace=False))),
                                "budget": n})
        print(seed, {k: v[-1] for k, v in runs.items()}, flush=True)
    summary = {rule: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for rule, rs in runs.items()}
    for rule in RULES:  # paired with the uniform draw of the same seed: seeds vary by ±0.01 F1
        for key in ("f1", "macro_f1"):
            summary[rule][f"{key}_minus_uniform_mean"] = round(statistics.mean(
                r[key] - u[key] for r, u in zip(runs[rule], runs["uniform"])), 4)
    print(json.dumps({"bench": "sampling_bias", "quick": args.quick, "seeds": len(runs["uniform"]),
                      "all_users_mean_degree": round(float(degrees.mean()), 1), "median": summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
