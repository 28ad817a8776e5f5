"""`gplr train-recsys` end to end on a synthetic purchases file (parser built from recsys.cli)."""
from __future__ import annotations

import argparse
import json

import pytest

from recsys import cli


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gplr")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def files(persona_shop, tmp_path_factory):
    shop = persona_shop.shop
    root = tmp_path_factory.mktemp("cli")
    shop.frame.to_csv(root / "purchases.csv", index=False)
    (root / "personas.json").write_text(shop.personas.to_json())
    names = shop.frame.drop_duplicates("item_id").set_index("item_id")["item_name"]
    users = ["CustomerID,personas"] + [f"{u},{'|'.join(shop.personas[p].name for p in ps)}"
                                       for u, ps in shop.user_truth.items()]
    items = ["Description,personas"] + [f"\"{names[i]}\",{'|'.join(shop.personas[p].name for p in ps)}"
                                        for i, ps in shop.item_personas.items() if i in names.index]
    (root / "users.csv").write_text("\n".join(users) + "\n")
    (root / "items.csv").write_text("\n".join(items) + "\n")
    return root


def test_train_recsys_plain_model(files, capsys) -> None:
    out = files / "metrics.json"
    code = _run(["train-recsys", "--purchases", str(files / "purchases.csv"), "--model", "mf",
                 "--epochs", "3", "--dim", "8", "--out", str(out)])
    assert code == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads(out.read_text())
    assert printed["model"] == "mf" and 0.0 <= printed["test"]["ndcg@10"] <= 1.0
    assert set(printed["test"]) >= {f"{m}@{k}" for m in ("ndcg", "f1") for k in (2, 5, 10, 20, 50, 100)}


def test_train_recsys_persona_model_with_gplr(files, capsys) -> None:
    code = _run(["train-recsys", "--purchases", str(files / "purchases.csv"), "--model", "lightgcn3",
                 "--personas", str(files / "personas.json"), "--user-labels", str(files / "users.csv"),
                 "--item-labels", str(files / "items.csv"), "--budget", "0.1", "--epochs", "3", "--dim", "8"])
    assert code == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["model"] == "lightgcn3"


def test_bad_input_is_a_clear_exit(files) -> None:
    with pytest.raises(SystemExit, match="needs --personas"):
        _run(["train-recsys", "--purchases", str(files / "purchases.csv"), "--model", "lgcn3"])
    with pytest.raises(SystemExit, match="gplr train-recsys"):
        _run(["train-recsys", "--split", str(files / "missing.csv.gz")])


def test_user_labels_in_every_format_gplr_label_writes(files, capsys) -> None:
    """`--user-labels` takes `gplr label` output (.jsonl and .csv keyed by user_id) as it takes a
    recorded table: the same personas, so the same model and the same metrics."""
    recorded = [line.split(",", 1) for line in (files / "users.csv").read_text().splitlines()[1:]]
    with (files / "labels.jsonl").open("w") as fh:
        for user, names in recorded:
            fh.write(json.dumps({"user_id": user, "personas": [n for n in names.split("|") if n],
                                 "scores": [], "llm_labelled": False}) + "\n")
    (files / "labels.csv").write_text("user_id,personas,scores,llm_labelled\n"
                                      + "".join(f"{u},{n},,0\n" for u, n in recorded))
    from core.personas import load_personas
    from recsys.data import load_persona_table

    personas, keys = load_personas(files / "personas.json"), [u for u, _ in recorded]
    tables = [load_persona_table(files / p, "CustomerID", keys, personas).toarray()
              for p in ("users.csv", "labels.jsonl", "labels.csv")]
    assert tables[0].sum() > len(keys) // 2 and (tables[0] == tables[1]).all() and (tables[0] == tables[2]).all()
    results = []
    for path in ("users.csv", "labels.jsonl", "labels.csv"):
        code = _run(["train-recsys", "--purchases", str(files / "purchases.csv"), "--model", "lightgcn3",
                     "--personas", str(files / "personas.json"), "--user-labels", str(files / path),
                     "--user-personas", "recorded", "--epochs", "2", "--dim", "8"])
        assert code == 0
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["test"])
    assert results[0] == results[1] == results[2]
