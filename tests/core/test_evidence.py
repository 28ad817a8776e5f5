"""Evidence shares are the exact per-item (and per-prototype) decomposition of a persona score,
checked against brute force on small random graphs; `gplr label` writes them and `gplr explain`
prints them."""
from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from core.affinity import exact_affinity, prototype_matrix
from core.cli import main
from core.decoder import fit_persona_model
from core.evidence import (
    TOP_ITEMS,
    batch_evidence,
    batch_prototypes,
    item_values,
    prototype_reach,
    shares,
    user_evidence,
    zero_shot_evidence,
)
from core.graph import BipartiteGraph
from core.synthetic import make_shop

M = 4


def _graph(seed: int, n_users: int = 30, n_items: int = 12) -> tuple[BipartiteGraph, dict[int, list[int]]]:
    rng = np.random.default_rng(seed)
    n = n_users * 4
    users = rng.integers(0, n_users, n)
    items = rng.integers(0, n_items, n)
    graph = BipartiteGraph.from_indices(users, items, n_users, n_items,
                                        item_ids=np.array([f"i{j:02d}" for j in range(n_items)], dtype=object),
                                        item_names=np.array([f"item {j}" for j in range(n_items)], dtype=object))
    protos = rng.choice(n_users, 8, replace=False)
    labels = {int(w): sorted(set(rng.integers(0, M, int(rng.integers(1, 3))).tolist())) for w in protos}
    return graph, labels


def _brute_item_contrib(graph: BipartiteGraph, labels: dict[int, list[int]], u: int, m: int) -> dict[int, float]:
    """ℓ̂ = 1, binary: item v adds (1/d_u)(1/d_v) Σ_{w∈N(v)} L[w, m], by loops over the edges."""
    dense = graph.user_item.toarray() > 0
    out = {}
    for v in np.flatnonzero(dense[u]):
        buyers = np.flatnonzero(dense[:, v])
        s = sum(labels[w].count(m) / len(labels[w]) for w in buyers if w in labels)
        out[int(v)] = s / dense[u].sum() / len(buyers)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_item_shares_are_the_exact_decomposition_of_the_graph_score(seed):
    graph, labels = _graph(seed)
    phi = prototype_matrix(graph.n_users, labels, M)
    psi = exact_affinity(graph, phi)
    values = item_values(graph, phi)
    idx = np.tile(np.arange(M), (graph.n_users, 1))
    found = batch_evidence(graph, idx, values, k=graph.n_items)
    checked = 0
    for u in range(graph.n_users):
        for m in range(M):
            contrib = _brute_item_contrib(graph, labels, u, m)
            assert sum(contrib.values()) == pytest.approx(psi[u, m], abs=1e-12)
            listed = {e["item_id"]: e["share"] for e in found[u][m]}
            want = {graph.item_ids[v]: c / psi[u, m] for v, c in contrib.items() if c > 0}
            assert listed.keys() == want.keys()
            for item, share in want.items():
                assert listed[item] == pytest.approx(share, abs=1e-6)
            if want:
                assert sum(listed.values()) == pytest.approx(1.0, abs=1e-5)
                checked += 1
            shares_in_order = [e["share"] for e in found[u][m]]
            assert shares_in_order == sorted(shares_in_order, reverse=True)
    assert checked > 30


@pytest.mark.parametrize("hops,weight", [(1, "count"), (2, "binary"), (3, "log")])
def test_item_values_and_prototype_reach_rebuild_the_affinity(hops, weight):
    graph, labels = _graph(5)
    phi = prototype_matrix(graph.n_users, labels, M)
    psi = exact_affinity(graph, phi, hops, weight)
    P, Pt = graph.transitions(weight)
    np.testing.assert_allclose(P @ item_values(graph, phi, hops, weight), psi, atol=1e-12)
    # brute force: K = (1/ℓ̂) Σ_ℓ (P P')^ℓ as a dense matrix
    step = (P @ Pt).toarray()
    k_full = sum(np.linalg.matrix_power(step, ell) for ell in range(1, hops + 1)) / hops
    protos = np.array(sorted(labels))
    np.testing.assert_allclose(prototype_reach(graph, protos, hops, weight).toarray(), k_full[:, protos], atol=1e-12)


def test_prototype_shares_equal_one_label_at_a_time():
    """Ψ_raw is linear in L: a prototype's share is the affinity with only its label, over Ψ_raw."""
    graph, labels = _graph(7)
    names = [f"p{m}" for m in range(M)]
    psi = exact_affinity(graph, prototype_matrix(graph.n_users, labels, M))
    alone = {w: exact_affinity(graph, prototype_matrix(graph.n_users, {w: labels[w]}, M)) for w in labels}
    idx = np.tile(np.arange(M), (graph.n_users, 1))
    found = batch_prototypes(graph, idx, labels, M, names, k=len(labels))
    for u in range(graph.n_users):
        for m in range(M):
            want = {str(graph.user_ids[w]): a[u, m] / psi[u, m] for w, a in alone.items() if a[u, m] > 0}
            got = {e["user_id"]: e["share"] for e in found[u][m]}
            assert got.keys() == want.keys()
            for w, share in want.items():
                assert got[w] == pytest.approx(share, abs=1e-6)
            for e in found[u][m]:
                assert f"p{m}" in e["labels"]


def test_top_items_keep_the_largest_shares_ties_by_id():
    contrib = np.array([[0.2], [0.2], [0.5], [0.1], [0.0]])
    found = user_evidence(["b", "a", "c", "d", "e"], list("BACDE"), contrib)[0]
    assert [e["item_id"] for e in found] == ["c", "a", "b"]
    assert len(found) == TOP_ITEMS
    assert [e["share"] for e in found] == [0.5, 0.2, 0.2]
    assert user_evidence([], [], np.zeros((0, 2))) == [[], []]


def test_text_channel_explains_a_persona_the_graph_does_not_reach():
    shop = make_shop(n_users=120, n_items=60, n_personas=M, seed=1, mean_purchases=6)
    graph = shop.graph()
    truth = {u: sorted(shop.user_truth[str(uid)]) for u, uid in enumerate(graph.user_ids)}
    labels = {u: truth[u] for u in range(0, graph.n_users, 4)}
    model = fit_persona_model(graph, labels, M)
    ch = model.channel
    s = ch.item_scores(list(graph.item_names))
    # text evidence ranks items by their own lift s(v) − b (the user's logit uses sublinear word
    # counts over all its items, core.item_channel; s(v) is one item's part of it)
    u = 1
    items = graph.user_item.indices[graph.user_item.indptr[u]: graph.user_item.indptr[u + 1]]
    # a persona no prototype reaches (values all zero): the text channel's positive lifts
    values = np.zeros((graph.n_items, M))
    found = batch_evidence(graph, np.tile(np.arange(M), (graph.n_users, 1)), values, s, ch.intercept, k=99)
    for m in range(M):
        pos = np.maximum(s[items, m] - ch.intercept[m], 0)
        want = {graph.item_ids[v]: p / pos.sum() for v, p in zip(items, pos) if p > 0}
        got = {e["item_id"]: e["share"] for e in found[u][m]}
        assert got.keys() == want.keys()
        assert all(e["channel"] == "text" for e in found[u][m])
        for item, share in want.items():
            assert got[item] == pytest.approx(share, abs=1e-6)


def test_zero_shot_evidence_is_the_decoders_own_term_and_the_names_that_vote_most():
    from core.personas import Persona, PersonaSet
    from core.zero_shot import FLOOR, zero_shot_channel

    class Votes:  # MiniLM's stand-in: fixed persona votes per item name (rows sum to 1)
        def __init__(self, names: list[str], seed: int) -> None:
            rng = np.random.default_rng(seed)
            self.votes = {n: rng.dirichlet(np.full(M, 0.5)) for n in names}

        def item_persona_scores(self, names):
            return np.stack([self.votes[str(n)] for n in names])

    checked = 0
    for seed in range(4):
        graph, labels = _graph(seed, n_users=40)
        names = [str(n) for n in graph.item_names]
        personas = PersonaSet([Persona(f"p{m}", f"persona {m}") for m in range(M)])
        channel = zero_shot_channel(names, personas, labeler=Votes(names, seed))
        model = fit_persona_model(graph, labels, M, zero_shot=channel)
        psi = exact_affinity(graph, prototype_matrix(graph.n_users, labels, M))
        idx, _ = model.decide(graph, psi)
        found = zero_shot_evidence(graph, idx, model)
        assert found is not None and zero_shot_evidence(graph, idx, replace(model, zero_shot=None)) is None
        slope = model.decoder.coef[:, 3]
        assert np.any(slope != 0)
        text = model.text_logits(graph)
        # the channel's part of each logit, by the decoder's own arithmetic: with it minus without it
        term = model.decoder.logits(psi, text, model.zero_shot_features(graph)) - model.decoder.logits(psi, text)
        dense = graph.user_item.toarray() > 0
        for u in range(graph.n_users):
            listed = [int(p) for p in idx[u] if p >= 0]
            assert len(found[u]) == len(listed)
            items = np.flatnonzero(dense[u])
            for p, e in zip(listed, found[u]):
                assert e["contribution"] == pytest.approx(term[u, p], abs=2e-6)
                lifts = channel.lift[items, p]  # brute force from the channel's table
                z = np.log((lifts.mean() if items.size else 1.0) + FLOOR)  # no item: an average basket
                assert e["feature"] == pytest.approx(z, abs=1e-6) and e["slope"] == pytest.approx(slope[p], abs=1e-6)
                assert e["mean_lift"] == pytest.approx(np.exp(z) - FLOOR, abs=1e-6)
                want = sorted((-round(float(lf), 9), str(graph.item_ids[v])) for v, lf in zip(items, lifts))[:TOP_ITEMS]
                assert [x["item_id"] for x in e["items"]] == [v for _, v in want]
                assert [x["lift"] for x in e["items"]] == pytest.approx([-lf for lf, _ in want], abs=1e-6)
                share = {str(graph.item_ids[v]): lf / lifts.sum() for v, lf in zip(items, lifts)}
                assert [x["share"] for x in e["items"]] == pytest.approx([share[x["item_id"]] for x in e["items"]],
                                                                       abs=1e-6)
                checked += 1
    assert checked > 100


def test_shares_of_mixed_signs_use_the_positive_part():
    out = shares(np.array([[1.0, -1.0], [3.0, -2.0], [-4.0, 0.0]]))
    assert out[:, 0].tolist() == [0.25, 0.75, 0.0]
    assert out[:, 1].tolist() == [0.0, 0.0, 0.0]


# -- gplr label writes it, gplr explain prints it ------------------------------------------------
from tests.core.test_batch_cli import label_args, shop_files  # noqa: E402,F401  (the fixture)


def test_label_output_carries_the_exact_evidence(shop_files):
    out = shop_files["tmp"] / "evidence.jsonl"
    assert main(label_args(shop_files, out, "--decoder", "graph")) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    graph = BipartiteGraph.from_frame(shop_files["shop"].frame)
    names = shop_files["shop"].personas.names
    row_of = {str(u): i for i, u in enumerate(graph.user_ids)}
    labels = {row_of[r["user_id"]]: [names.index(p) for p in r["personas"]] for r in rows if r["llm_labelled"]}
    psi = exact_affinity(graph, prototype_matrix(graph.n_users, labels, len(names)))
    checked = 0
    for r in rows:
        u = row_of[r["user_id"]]
        assert len(r["evidence"]) == len(r["personas"]) == len(r["prototypes"])
        for name, items, protos in zip(r["personas"], r["evidence"], r["prototypes"]):
            m = names.index(name)
            contrib = _brute_item_contrib(graph, labels, u, m)
            # largest share first; shares equal to 1e-9 (float noise) by item id
            want = sorted(((-round(c / psi[u, m], 9), str(graph.item_ids[v])) for v, c in contrib.items()
                           if c > 0))[:TOP_ITEMS]
            assert [e["item_id"] for e in items] == [v for _, v in want]
            assert [e["share"] for e in items] == pytest.approx([-s for s, _ in want], abs=1e-6)
            assert protos and all(name in p["labels"] and row_of[p["user_id"]] in labels for p in protos)
            checked += bool(items)
    assert checked > 40


def test_explain_prints_text_and_json_and_refuses_bad_input(shop_files, capsys, tmp_path):
    out = shop_files["tmp"] / "explain.jsonl"
    assert main(label_args(shop_files, out)) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    row = next(r for r in rows if not r["llm_labelled"] and r["evidence"] and r["evidence"][0])
    capsys.readouterr()
    assert main(["explain", row["user_id"], "--from", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"customer {row['user_id']} (batch; propagation)")
    for name, items in zip(row["personas"], row["evidence"]):
        assert name in text and all(e["name"] in text for e in items)
    # the zero-shot channel (`gplr label`'s default): its term and the names voting most, per persona
    assert len(row["zero_shot"]) == len(row["personas"])
    assert text.count("zero-shot:") == len(row["personas"])
    for z in row["zero_shot"]:
        assert f"{z['contribution']:+.3f} to the logit: the names' mean lift {z['mean_lift']:.2f}" in text
        assert all(f"lift {e['lift']:5.2f}  {e['name']}" in text for e in z["items"])
    assert main(["explain", row["user_id"], "--from", str(out), "--json"]) == 0
    view = json.loads(capsys.readouterr().out)
    assert [p["name"] for p in view["personas"]] == row["personas"]
    assert [p["evidence"] for p in view["personas"]] == row["evidence"]
    assert [p["prototypes"] for p in view["personas"]] == row["prototypes"]
    assert [p["zero_shot"] for p in view["personas"]] == row["zero_shot"]
    # a saved persona-updates record (`gplr watch --json`) is read too; the last one wins
    updates = tmp_path / "updates.jsonl"
    record = {"user": "u1", "personas": [{"idx": 0, "name": "p0", "score": 0.5, "evidence": [
        {"item_id": "i1", "name": "Mug", "share": 0.75, "channel": "graph"}]}], "labelled_by": "propagation"}
    updates.write_text(json.dumps({"user": "u1", "personas": []}) + "\n" + json.dumps(record) + "\n")
    assert main(["explain", "u1", "--from", str(updates)]) == 0
    text = capsys.readouterr().out
    assert "customer u1 (stream; propagation)" in text and "75.0%  Mug [i1] (graph)" in text
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(record) + "\nnot json\n")
    for args, message in ((["explain", "nobody", "--from", str(out)], "no customer 'nobody'"),
                          (["explain", "u1", "--from", str(bad)], "line 2 is not JSON"),
                          (["explain", "u1", "--from", str(tmp_path / "x.csv")], "CSV output carries no evidence"),
                          (["explain", "u1", "--from", str(tmp_path / "missing.jsonl")], "No such file")):
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert message in str(exc.value)


# -- the README example is what its commands print -------------------------------------------------
REPO = Path(__file__).resolve().parents[2]
RETAIL = Path(os.environ.get("ONLINE_RETAIL_DATA", REPO / ".." / "shared" / "data" / "online_retail"))


def _readme_example(data_dir: Path | None = None) -> tuple[list[list[str]], str]:
    """The commands (bash block; `$D` = `data_dir` when given) and the printed text of README's
    "Why this persona"."""
    section = (REPO / "README.md").read_text().split("## Why this persona", 1)[1]
    script, text = re.search(r"```bash\n(.*?)```\n```text\n(.*?)```", section, flags=re.S).groups()
    lines = script.replace("\\\n", " ").strip().splitlines()
    data = str(data_dir) if data_dir else lines[0].split("=", 1)[1]
    return [shlex.split(line.replace("$D", data))[1:] for line in lines[1:]], text


def test_readme_example_shows_the_commands_it_documents():
    commands, text = _readme_example()
    assert [c[0] for c in commands] == ["label", "explain"]
    assert text.startswith(f"customer {commands[1][1]} (batch; propagation)")


@pytest.mark.skipif(not (RETAIL / "online_retail.csv.gz").is_file(), reason="Online Retail data not present")
def test_readme_example_is_what_the_commands_print(tmp_path, monkeypatch, capsys):
    commands, text = _readme_example(RETAIL.resolve())
    monkeypatch.chdir(tmp_path)
    for args in commands:
        assert main(args) == 0
    assert capsys.readouterr().out == text, ("README's 'Why this persona' output is stale: run its commands "
                                             "from the repository root and paste what `gplr explain` prints")
