"""docs/your-data.md, run as written: a grocery export with foreign column names, no price and no
timestamps goes through `label`, `demo --no-live`, `broker` + `worker` + `produce` + `export`,
`watch --json`, `trainer`, `train-recsys` and `segment` with one mapping; then the outputs are
checked against the planted personas (issue 11)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from core.personas import load_personas, read_persona_labels
from streams.broker import free_port

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "your-data.md"


def doc_commands() -> str:
    """Every ```bash block of the page, in order, as one script."""
    return "\n".join(re.findall(r"```bash\n(.*?)```", DOC.read_text(), flags=re.S))


def test_the_page_shows_every_command() -> None:
    script = doc_commands()
    for command in ("gplr label", "gplr demo", "gplr broker", "gplr worker", "gplr produce", "gplr export",
                    "gplr watch", "gplr trainer", "gplr train-recsys", "gplr segment"):
        assert command in script
    assert "docs/your-data.md" in (REPO / "README.md").read_text()


@pytest.mark.broker
def test_your_data_page_runs_as_written(tmp_path: Path) -> None:
    port = free_port()
    script = doc_commands().replace("9092", str(port))
    bin_dir = tmp_path / "bin"  # `gplr` and `python` as programs (exec), so `kill %1` reaches them
    bin_dir.mkdir()
    for name, command in (("gplr", f'exec "{sys.executable}" -m core.cli "$@"'),
                          ("python", f'exec "{sys.executable}" "$@"')):
        (bin_dir / name).write_text(f"#!/bin/sh\n{command}\n")
        (bin_dir / name).chmod(0o755)
    prelude = "set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPLR_", "KAFKA_", "OPENAI_"))}
    env.update(PATH=f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1",
               GPLR_WORKER_PORT=str(free_port()), GPLR_METRICS_PORT=str(free_port()))
    out = subprocess.run(["bash", "-c", prelude + script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=900)
    shop = tmp_path / "shop"
    log = out.stdout[-6000:] + out.stderr[-6000:]
    for name in ("worker.log", "broker.log"):
        if out.returncode and (shop / name).is_file():
            log += f"\n--- {name}\n" + (shop / name).read_text()[-3000:]
    assert out.returncode == 0, log

    personas = load_personas(shop / "personas.json")
    truth = read_persona_labels(shop / "truth.csv")
    orders = pd.read_csv(shop / "orders.csv", dtype=str)
    users = set(orders["customer"])
    # the mapping and the cleaning report come first, with what the loader assumed, as the page shows
    shown = re.findall(r"```text\n(.*?)```", DOC.read_text(), flags=re.S)[0]
    assert all(line in out.stderr.splitlines() for line in shown.splitlines())

    # 1. batch: every customer, names from the set, the prototypes carry their recorded labels
    rows = [json.loads(line) for line in (shop / "labels.jsonl").read_text().splitlines()]
    assert {r["user_id"] for r in rows} == users
    assert all(personas.index_of(n) is not None for r in rows for n in r["personas"])
    prototypes = [r for r in rows if r["llm_labelled"]]
    assert prototypes and all(set(r["personas"]) == set(truth[r["user_id"]]) for r in prototypes)

    # 2. the demo scored its streamed personas against the labels
    assert "demo summary" in out.stdout and "F1@5 vs truth, streamed" in out.stdout
    assert f"purchases published                                 │ {len(orders)}" in out.stdout

    # 3. the stream's export: the latest personas of most customers (the rest never moved past the
    #    push threshold), one row each, all names from the set
    export = pd.read_csv(shop / "personas.csv", dtype=str, keep_default_na=False)
    assert list(export.columns[:3]) == ["user_id", "personas", "scores"]
    assert export["user_id"].is_unique and set(export["user_id"]) <= users and len(export) >= len(users) // 2
    named = [n for joined in export["personas"] for n in joined.split("|") if n]
    assert named and all(personas.index_of(n) is not None for n in named)
    watched = [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{"user":')]
    assert len(watched) == 3 and all(w["user"] in users for w in watched)

    # 4. recommendations from the trainer, items of this shop; offline metrics from train-recsys
    printed = [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{"user_id":')]
    assert [r["user_id"] for r in printed if "llm_labelled" in r] == [r["user_id"] for r in rows[:2]]  # head -2
    recs = [r for r in printed if "items" in r]
    assert len(recs) == 3 and all(r["items"] and {i["item_id"] for i in r["items"]} <= set(orders["product_id"])
                                  for r in recs)
    metrics = json.loads((shop / "metrics.json").read_text())
    assert metrics["model"] == "lgcn3" and metrics["dataset"]["users"] == len(users)
    assert 0 < metrics["test"]["ndcg@10"] <= 1

    # 5. segments of the exported customers; RFM says its monetary part is constant (no prices)
    segments = pd.read_csv(shop / "segments.csv", dtype={"user_id": str})
    assert {"persona_k3", "persona_k5", "rfm_k3", "rfm_k5"} <= set(segments.columns)
    assert set(segments["user_id"]) == set(export["user_id"])
    assert "RFM monetary is constant" in out.stderr
