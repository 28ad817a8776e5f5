"""`gplr label` / `gplr batch-demo` through core.cli.main on tiny synthetic data."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from core.cli import main
from core.synthetic import make_shop


@pytest.fixture(scope="module")
def shop_files(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("shop")
    shop = make_shop(n_users=60, n_items=80, n_personas=4, seed=3)
    data = tmp / "purchases.csv"
    shop.frame.to_csv(data, index=False)
    personas = tmp / "personas.json"
    personas.write_text(json.dumps([{"name": p.name, "definition": p.definition} for p in shop.personas]))
    replay = tmp / "labels.csv"
    names = shop.personas.names
    with replay.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["CustomerID", "personas"])
        for uid, ps in shop.user_truth.items():
            w.writerow([uid, "|".join([names[p] for p in ps] + (["Made-Up Persona"] if uid.endswith("7") else []))])
    return {"shop": shop, "data": data, "personas": personas, "replay": replay, "tmp": tmp}


def label_args(f: dict, out: Path, *extra: str) -> list[str]:
    return ["label", "--data", str(f["data"]), "--format", "table", "--personas", str(f["personas"]),
            "--labeler", "replay", "--replay-file", str(f["replay"]), "--budget", "0.25",
            "--rounds", "3", "--k", "2", "--beta", "0", "--out", str(out), *extra]


def test_label_jsonl_keeps_prototype_labels_and_ranks_the_rest(shop_files: dict) -> None:
    out = shop_files["tmp"] / "out.jsonl"
    assert main(label_args(shop_files, out)) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    shop = shop_files["shop"]
    names = shop.personas.names
    assert sorted(r["user_id"] for r in rows) == sorted(shop.user_truth)
    labeled = [r for r in rows if r["llm_labelled"]]
    assert len(labeled) == 15  # 25% of 60 users
    for r in labeled:  # the replayed truth, minus the name outside the set
        assert r["personas"] == [names[p] for p in shop.user_truth[r["user_id"]]]
    for r in rows:
        if not r["llm_labelled"]:
            assert 1 <= len(r["personas"]) <= 2
            assert r["scores"] == sorted(r["scores"], reverse=True) and min(r["scores"]) > 0
            assert set(r["personas"]) <= set(names)


def test_label_csv_adaptive_and_revaff(shop_files: dict) -> None:
    out = shop_files["tmp"] / "out.csv"
    assert main(label_args(shop_files, out, "--adaptive", "0.9", "--method", "revaff", "--eps", "0.01")) == 0
    with out.open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 60 and sum(r["llm_labelled"] == "1" for r in rows) == 15
    counts = [len(r["personas"].split("|")) for r in rows if r["llm_labelled"] == "0" and r["personas"]]
    assert counts and min(counts) >= 1 and max(counts) <= 2
    assert not (shop_files["tmp"] / "out.csv.part").exists()


def test_label_word_decoder_uses_calibrated_cut(shop_files: dict) -> None:
    out = shop_files["tmp"] / "words.jsonl"
    assert main(label_args(shop_files, out, "--decoder", "words", "--min-score", "0.4")) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    rest = [r for r in rows if not r["llm_labelled"]]
    assert len(rest) == 45 and all(1 <= len(r["personas"]) <= 2 for r in rest)
    # beyond the always-kept best persona, every persona passes the cut
    assert all(s >= 0.4 for r in rest for s in r["scores"][1:])
    assert all(0 < s <= 1 for r in rest for s in r["scores"])


@pytest.mark.parametrize("change,message", [
    ({"--out": "x.txt"}, "must end in .jsonl or .csv"),
    ({"--replay-file": "/nonexistent/labels.csv"}, "labels.csv"),
    ({"--data": "/nonexistent/p.csv"}, "p.csv"),
    ({"--k": "0"}, "at least 1"),
])
def test_label_bad_input_gives_clear_error(shop_files: dict, change: dict, message: str) -> None:
    args = label_args(shop_files, shop_files["tmp"] / "bad.jsonl")
    for flag, value in change.items():
        args[args.index(flag) + 1] = value
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert message in str(exc.value)
    assert not (shop_files["tmp"] / "bad.jsonl").exists()


def test_paper_filter_refuses_table_format(shop_files: dict) -> None:
    with pytest.raises(SystemExit, match="Online Retail"):
        main(label_args(shop_files, shop_files["tmp"] / "o.jsonl", "--paper-filter"))


class PlantedLabeler:
    """Fast stand-in for the embedding labeler: answers each synthetic user's planted personas."""

    name = "planted"

    def __init__(self, personas, truth) -> None:
        from core.labelers.base import LabelerStats

        self.personas, self.truth, self.stats = personas, truth, LabelerStats()

    def label(self, histories):
        from core.labelers.base import LabelResult

        self.stats.add(calls=len(histories))
        return [LabelResult(h.user_id, self.truth[h.user_id]) for h in histories]


def test_batch_demo_scores_against_planted_truth(capsys: pytest.CaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import core.batch_cli
    import core.synthetic

    made = {}

    def fake(personas, graph):
        assert graph.n_users == 150
        shop = core.synthetic.make_shop(n_users=150, n_items=120, n_personas=4, seed=0)
        made["labeler"] = PlantedLabeler(personas, shop.user_truth)
        return made["labeler"]

    monkeypatch.setattr(core.batch_cli, "embedding_labeler", fake)
    assert main(["batch-demo", "--users", "150", "--items", "120", "--n-personas", "4", "--seed", "0",
                 "--budget", "0.2", "--rounds", "2", "--show", "3"]) == 0
    text = capsys.readouterr().out
    assert made["labeler"].stats.calls == 30
    # the labeler answered the planted truth, so the labeled users' row is perfect
    line = next(ln for ln in text.splitlines() if "labeled by the labeler" in ln)
    assert line.count("1.000") == 4
    assert "propagated by GPLR (120)" in text


def test_batch_demo_with_the_real_embedding_labeler(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    pytest.importorskip("core.labelers.embedding")
    out = tmp_path / "demo.jsonl"
    assert main(["batch-demo", "--users", "150", "--items", "120", "--n-personas", "4",
                 "--budget", "0.1", "--rounds", "2", "--show", "3", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "against the planted personas" in text and "propagated by GPLR" in text
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 150 and sum(r["llm_labelled"] for r in rows) == 15
    assert np.mean([len(r["personas"]) for r in rows]) > 0


def test_the_embedding_labeler_of_the_batch_commands_fits_its_prior_on_the_shop() -> None:
    pytest.importorskip("core.labelers.embedding")
    from core.batch_cli import embedding_labeler
    from core.labelers import histories_for
    from core.labelers.embedding import RHO0
    from core.synthetic import make_shop

    shop = make_shop(n_users=120, n_items=100, n_personas=4, seed=3)
    graph = shop.graph()
    labeler = embedding_labeler(shop.personas, graph)
    prior = labeler.persona_prior()
    assert prior.shape == (4,) and not np.allclose(prior, RHO0)  # fitted, not the flat default
    # the same prior as fitting it by hand on every user's purchases
    np.testing.assert_allclose(labeler.fit_prior(histories_for(graph, range(graph.n_users))), prior)


def test_the_shop_themes_preset_reaches_the_labeler_and_the_cli_offers_every_preset() -> None:
    pytest.importorskip("core.labelers.embedding")
    import argparse

    from core.batch_cli import embedding_labeler, register
    from core.labelers.embedding import PRESETS
    from core.synthetic import make_shop

    shop = make_shop(n_users=60, n_items=80, n_personas=4, seed=5)
    graph = shop.graph()
    themes = embedding_labeler(shop.personas, graph, "shop-themes")
    niche = embedding_labeler(shop.personas, graph)
    assert (themes.shop_prior, themes.evidence, themes.calibration) == (1.0, 0.5, 0.0)
    assert (niche.shop_prior, niche.evidence) == (0.0, 1.0)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    action = next(a for a in parser._subparsers._group_actions[0].choices["label"]._actions  # type: ignore[union-attr]
                  if a.dest == "embedding_preset")
    assert set(action.choices) == set(PRESETS)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_label_output_replays_as_recorded_labels(shop_files: dict, suffix: str) -> None:
    """What `gplr label` writes (either format, keyed by user_id) is a label file every reader takes:
    replayed, each prototype gets exactly the personas the first run wrote for it."""
    first = shop_files["tmp"] / f"first{suffix}"
    assert main(label_args(shop_files, first)) == 0
    from core.personas import read_persona_labels

    written = read_persona_labels(first)
    assert len(written) == 60 and all(written.values())
    second = shop_files["tmp"] / f"second{suffix}.jsonl"
    args = label_args(shop_files, second, "--seed", "7")
    args[args.index("--replay-file") + 1] = str(first)
    assert main(args) == 0
    rows = [json.loads(line) for line in second.read_text().splitlines()]
    prototypes = [r for r in rows if r["llm_labelled"]]
    assert len(prototypes) == 15 and all(tuple(r["personas"]) == written[r["user_id"]] for r in prototypes)


def test_label_without_ts_or_price_and_with_a_mapping(shop_files: dict, capsys: pytest.CaptureFixture) -> None:
    shop = shop_files["shop"]
    foreign = shop_files["tmp"] / "foreign.csv"
    shop.frame.rename(columns={"user_id": "client", "item_id": "sku"}).drop(columns=["ts", "price"]).to_csv(
        foreign, index=False)
    out = shop_files["tmp"] / "foreign.jsonl"
    args = label_args(shop_files, out, "--columns", "user_id=client,item_id=sku")
    args[args.index("--data") + 1] = str(foreign)
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "user_id <- client" in err and "ts <- (file order)" in err and "price <- (none)" in err
    assert sorted(json.loads(line)["user_id"] for line in out.read_text().splitlines()) == sorted(shop.user_truth)
