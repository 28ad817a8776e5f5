"""Segmentation (paper Section 7.4): hand-checked RFM binning, clustering on synthetic shops,
robustness shares against brute force, persona file formats and the written outputs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.labelers.replay import ReplayLabeler
from core.personas import Persona, PersonaSet
from core.synthetic import make_shop
from recsys.segmentation import (
    consistent_share,
    load_persona_assignments,
    persona_robustness,
    persona_sets,
    plot_segments,
    quantile_bins,
    rfm_bins,
    rfm_robustness,
    rfm_table,
    rfm_vectors,
    segment,
    split_halves,
    summary_json,
    write_segments,
)

DAY = 86_400.0


def _frame(rows: list[tuple[str, float, int, float]]) -> pd.DataFrame:
    """(user, day, quantity, price) rows as a canonical-enough purchases frame."""
    return pd.DataFrame({"user_id": [r[0] for r in rows], "ts": [r[1] * DAY for r in rows],
                         "quantity": [r[2] for r in rows], "price": [r[3] for r in rows],
                         "item_id": "i", "event_id": [f"e{j}" for j in range(len(rows))]})


def test_quantile_bins_by_hand() -> None:
    assert quantile_bins(np.arange(10.0)).tolist() == list(range(1, 11))
    assert quantile_bins(np.arange(20.0)).tolist() == [b for b in range(1, 11) for _ in range(2)]
    # ties share their average rank: [1, 2, 2, 4] → ranks 1, 2.5, 2.5, 4 → ceil(2·r/4) = 1, 2, 2, 2
    assert quantile_bins(np.array([1.0, 2.0, 2.0, 4.0]), 2).tolist() == [1, 2, 2, 2]
    assert quantile_bins(np.full(7, 3.0)).tolist() == [6] * 7  # all equal: the middle bin
    with pytest.raises(ValueError):
        quantile_bins(np.array([]))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=80), st.integers(1, 12))
def test_quantile_bins_are_monotone_and_in_range(values: list[float], n_bins: int) -> None:
    x = np.array(values)
    b = quantile_bins(x, n_bins)
    assert b.min() >= 1 and b.max() <= n_bins
    order = np.argsort(x, kind="stable")
    assert np.all(np.diff(b[order]) >= 0)  # a larger value never gets a lower bin
    assert np.all(b[x == x.max()] == b.max())


def test_rfm_table_and_bins_by_hand() -> None:
    frame = _frame([
        ("a", 0, 1, 10.0), ("a", 0, 2, 5.0), ("a", 9, 1, 1.0),  # 2 orders, spend 21, last day 9
        ("b", 10, 3, 2.0),                                       # 1 order, spend 6, last day 10
        ("c", 2, 1, 100.0), ("c", 5, 1, 1.0), ("c", 7, 1, 1.0),  # 3 orders, spend 102, last day 7
        ("d", 1, 1, 0.5),                                        # 1 order, spend 0.5, last day 1
    ])
    table = rfm_table(frame)
    assert list(table.index) == ["a", "b", "c", "d"]
    assert table["recency"].tolist() == [1.0, 0.0, 3.0, 9.0]
    assert table["frequency"].tolist() == [2.0, 1.0, 3.0, 1.0]
    assert table["monetary"].tolist() == [21.0, 6.0, 102.0, 0.5]
    bins = rfm_bins(table, n_bins=4)
    # recency ranks 2,1,3,4; frequency ranks 3,1.5,4,1.5 → ceil(r) 3,2,4,2; monetary 3,2,4,1
    assert bins.tolist() == [[2, 3, 3], [1, 2, 2], [3, 4, 4], [4, 2, 1]]
    vec = rfm_vectors(bins)
    assert np.allclose(np.linalg.norm(vec, axis=1), 1.0)
    assert np.allclose(vec[0], np.array([2, 3, 3]) / np.sqrt(22))
    assert rfm_table(frame, now=20 * DAY)["recency"].tolist() == [11.0, 10.0, 13.0, 19.0]


def test_rfm_rejects_bad_frames() -> None:
    with pytest.raises(ValueError, match="lacks columns"):
        rfm_table(pd.DataFrame({"user_id": ["a"]}))
    with pytest.raises(ValueError, match="no purchases"):
        rfm_table(_frame([]).astype({"ts": float, "quantity": int, "price": float}))


def test_consistent_share_against_brute_force() -> None:
    first = {"a": (1, 2), "b": (3,), "c": (1,), "x": (9,)}
    second = {"a": (1, 2), "b": (1,), "c": (1,), "y": (9,)}
    assert consistent_share(first, second) == (2 / 3, 3)
    assert consistent_share({"a": 1}, {"b": 1}) == (0.0, 0)


def test_rfm_robustness_by_hand() -> None:
    # halves split at day 50; in each half users are binned alone (4 users, 2 bins)
    rows = [("a", 1, 1, 1.0), ("b", 2, 1, 2.0), ("c", 3, 1, 3.0), ("d", 4, 1, 4.0),
            ("a", 91, 1, 1.0), ("b", 92, 1, 2.0), ("c", 93, 1, 3.0), ("d", 94, 1, 4.0)]
    share, n = rfm_robustness(_frame(rows), split_ts=50 * DAY, n_bins=2)
    assert (share, n) == (1.0, 4)  # the same pattern in both halves
    rows[-1] = ("d", 94, 1, 0.1)   # d now spends least in the second half
    share, n = rfm_robustness(_frame(rows), split_ts=50 * DAY, n_bins=2)
    # second half monetary ranks a2 b3 c4 d1 → bins 1,2,2,1; first half 1,1,2,2: b and d change
    assert (share, n) == (0.5, 4)


def test_split_halves_midpoint() -> None:
    frame = _frame([("a", 0, 1, 1.0), ("a", 4, 1, 1.0), ("b", 6, 1, 1.0), ("b", 10, 1, 1.0)])
    early, late = split_halves(frame)
    assert early["ts"].max() < 5 * DAY <= late["ts"].min()
    assert len(early) + len(late) == len(frame)


def test_planted_personas_segment_better_than_noise() -> None:
    shop = make_shop(n_users=400, n_items=150, n_personas=6, seed=3)
    users = sorted(shop.user_truth)
    truth = persona_matrix_of(shop.user_truth, users, 6)
    seg = segment(truth, ks=(5, 8), seed=0)
    assert set(seg.labels) == {5, 8}
    assert all(len(seg.labels[k]) == len(users) for k in seg.labels)
    assert all(len(np.unique(seg.labels[k])) == k for k in seg.labels)
    noise = np.random.default_rng(0).random((len(users), 6))
    noisy = segment(noise, ks=(5, 8), seed=0)
    for k in (5, 8):
        assert -1.0 <= seg.silhouette[k] <= 1.0
        assert seg.silhouette[k] > noisy.silhouette[k]
    again = segment(truth, ks=(5,), seed=0)
    assert np.array_equal(again.labels[5], seg.labels[5])  # seeded


def test_segment_separates_obvious_clusters() -> None:
    x = np.repeat(np.eye(4), 25, axis=0) + np.random.default_rng(1).normal(0, 0.01, (100, 4))
    seg = segment(x, ks=(4,), seed=0)
    assert seg.silhouette[4] > 0.95
    for block in range(4):  # each planted block is exactly one cluster
        assert len(np.unique(seg.labels[4][block * 25:(block + 1) * 25])) == 1


def test_segment_rejects_bad_k() -> None:
    with pytest.raises(ValueError, match="every k"):
        segment(np.random.default_rng(0).random((10, 3)), ks=(1,))
    with pytest.raises(ValueError, match="every k"):
        segment(np.random.default_rng(0).random((10, 3)), ks=(10,))


def persona_matrix_of(truth: dict[str, tuple[int, ...]], users: list[str], n: int) -> np.ndarray:
    m = np.zeros((len(users), n))
    for r, u in enumerate(users):
        m[r, list(truth[u])] = 1.0
    return m


def test_persona_robustness_with_an_oracle_labeler(tmp_path: Path) -> None:
    shop = make_shop(n_users=300, n_items=120, n_personas=5, seed=7)
    labels = tmp_path / "truth.csv"
    pd.DataFrame({"CustomerID": list(shop.user_truth),
                  "personas": ["|".join(shop.personas[m].name for m in ps) for ps in shop.user_truth.values()]}
                 ).to_csv(labels, index=False)
    # labeling everyone with the planted truth: every user's set is the same in both halves
    share, n = persona_robustness(shop.frame, shop.personas, lambda: ReplayLabeler(shop.personas, labels),
                                  budget=1.0, rounds=1, seed=0)
    early, late = split_halves(shop.frame)
    assert n == len(set(early["user_id"]) & set(late["user_id"])) > 0
    assert share == 1.0
    partial, _ = persona_robustness(shop.frame, shop.personas, lambda: ReplayLabeler(shop.personas, labels),
                                    budget=0.1, rounds=2, seed=0, k=3)
    assert 0.0 <= partial < 1.0


def test_load_persona_assignments_formats(tmp_path: Path) -> None:
    ps = PersonaSet([Persona("A", ""), Persona("B", ""), Persona("C", "")])
    jsonl = tmp_path / "out.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in [
        {"user_id": "u1", "personas": ["B", "A"], "scores": [1, 1], "llm_labelled": True},
        {"user_id": "u2", "personas": ["Ghost", "C"], "scores": [1, 1], "llm_labelled": False},
        {"user_id": "u3", "personas": [], "scores": [], "llm_labelled": False}]) + "\n")
    users, m = load_persona_assignments(jsonl, ps)
    assert users.tolist() == ["u1", "u2", "u3"]
    assert m.toarray().tolist() == [[1, 1, 0], [0, 0, 1], [0, 0, 0]]
    csv = tmp_path / "gpt.csv"
    csv.write_text("CustomerID,uidx,personas,note\n12346.0,0,C,\n12347,1,A|B|Nope,\n12348,2,,x\n")
    users, m = load_persona_assignments(csv, ps)
    assert users.tolist() == ["12346", "12347", "12348"]
    assert m.toarray().tolist() == [[0, 0, 1], [1, 1, 0], [0, 0, 0]]
    assert persona_sets(users, m) == {"12346": frozenset({2}), "12347": frozenset({0, 1}),
                                      "12348": frozenset()}
    bad = tmp_path / "bad.csv"
    bad.write_text("who,what\n1,A\n")
    with pytest.raises(ValueError, match="id column"):
        load_persona_assignments(bad, ps)
    with pytest.raises(FileNotFoundError):
        load_persona_assignments(tmp_path / "missing.csv", ps)


def test_outputs_written(tmp_path: Path) -> None:
    ps = PersonaSet([Persona("A", ""), Persona("B", "")])
    m = np.array([[1, 0], [1, 0], [0, 1], [1, 1]])
    labels = np.array([0, 0, 1, 1])
    share = plot_segments(tmp_path / "plot.png", m, labels, ps)
    assert share.tolist() == [[1.0, 0.0], [0.5, 1.0]]
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    n = write_segments(tmp_path / "seg.csv", ["a", "b", "c", "d"], {"persona_k2": labels})
    assert n == 4
    assert pd.read_csv(tmp_path / "seg.csv").to_dict("list") == {
        "user_id": ["a", "b", "c", "d"], "persona_k2": [0, 0, 1, 1]}
    with pytest.raises(ValueError, match="rows"):
        write_segments(tmp_path / "x.csv", ["a"], {"persona_k2": labels})
    seg = segment(np.repeat(np.eye(3), 5, axis=0), ks=(3,), seed=0)
    line = json.loads(summary_json(seg, seg, 0.25, 0.5))
    assert line == {"silhouette_persona3": round(seg.silhouette[3], 4),
                    "silhouette_rfm3": round(seg.silhouette[3], 4),
                    "consistent_persona": 0.25, "consistent_rfm": 0.5}


def test_segment_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from core.cli import main

    shop = make_shop(n_users=150, n_items=80, n_personas=4, seed=2)
    data = tmp_path / "purchases.csv"
    shop.frame.to_csv(data, index=False)
    (tmp_path / "personas.json").write_text(shop.personas.to_json())
    assignments = tmp_path / "labels.jsonl"
    assignments.write_text("".join(json.dumps({"user_id": u, "personas": [shop.personas[m].name for m in ps]}) + "\n"
                                   for u, ps in shop.user_truth.items()))
    out = tmp_path / "segments.csv"
    code = main(["segment", "--personas-file", str(assignments), "--persona-set", str(tmp_path / "personas.json"),
                 "--data", str(data), "--format", "table", "--ks", "3,5", "--out", str(out),
                 "--plot", str(tmp_path / "plot.png"), "--robustness",
                 "--replay-file", str(_truth_csv(shop, tmp_path))])
    assert code == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(line) == {"silhouette_persona3", "silhouette_persona5", "silhouette_rfm3", "silhouette_rfm5",
                         "consistent_persona", "consistent_rfm"}
    segments = pd.read_csv(out, dtype={"user_id": str})
    assert list(segments.columns) == ["user_id", "persona_k3", "persona_k5", "rfm_k3", "rfm_k5"]
    assert sorted(segments["user_id"]) == sorted(shop.user_truth)
    assert segments["persona_k5"].nunique() == 5
    assert (tmp_path / "plot.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="needs --data"):
        main(["segment", "--personas-file", str(assignments), "--persona-set", str(tmp_path / "personas.json"),
              "--robustness", "--out", str(out)])


def _truth_csv(shop, tmp_path: Path) -> Path:
    path = tmp_path / "truth.csv"
    pd.DataFrame({"CustomerID": list(shop.user_truth),
                  "personas": ["|".join(shop.personas[m].name for m in ps) for ps in shop.user_truth.values()]}
                 ).to_csv(path, index=False)
    return path
