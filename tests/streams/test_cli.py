"""The stream commands: produce, watch, worker/demo wiring, against the session broker."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from core.events import parse_purchase
from streams import cli, topic_io
from streams.topics import Topics

REPO = Path(__file__).resolve().parents[2]


def _env(monkeypatch, config) -> None:
    for key, value in config.as_env().items():
        monkeypatch.setenv(key, value)


def test_every_stream_command_is_registered() -> None:
    out = subprocess.run([sys.executable, "-m", "streams.cli", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0
    for command in ("worker", "produce", "watch", "demo", "broker"):
        assert command in out.stdout


@pytest.mark.parametrize("command", [["produce", "--synthetic", "5"], ["watch"], ["worker"]])
def test_commands_without_a_broker_say_how_to_get_one(monkeypatch, command) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP", "")
    with pytest.raises(SystemExit, match="KAFKA_BOOTSTRAP is empty"):
        cli.main(command)


def test_bad_setting_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setenv("GPLR_PARTITIONS", "zero")
    with pytest.raises(SystemExit, match="GPLR_PARTITIONS"):
        cli.main(["produce", "--synthetic", "5"])


def test_produce_synthetic_publishes_every_purchase_keyed_by_user(
        stream_config, monkeypatch, consume, capsys) -> None:
    _env(monkeypatch, stream_config)
    assert cli.main(["produce", "--synthetic", "40", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    shop, events = cli.synthetic_events(40)
    expected = list(events)
    assert summary["published"] == len(expected) == len(shop.frame)
    topic = Topics(stream_config.topic_prefix).purchases
    msgs = consume(stream_config.kafka_bootstrap, topic, until=lambda r: len(r) >= len(expected), raw=True)
    got = [parse_purchase(m.value()) for m in msgs]
    assert sorted(e.event_id for e in got) == sorted(e.event_id for e in expected)
    assert all(m.key().decode() == parse_purchase(m.value()).user_id for m in msgs)
    # per user (one partition each) the purchases arrive in time order
    by_user: dict[str, list[float]] = {}
    for event in got:
        by_user.setdefault(event.user_id, []).append(event.ts)
    assert all(ts == sorted(ts) for ts in by_user.values())


def test_produce_file_with_limit_and_rate(stream_config, monkeypatch, consume, tmp_path, capsys) -> None:
    _env(monkeypatch, stream_config)
    rows = [{"user_id": f"u{i % 4}", "item_id": f"i{i % 7}", "item_name": f"Item {i % 7}", "quantity": 1,
             "price": 1.0, "ts": 1_700_000_000 + i} for i in range(30)]
    path = tmp_path / "purchases.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    start = time.monotonic()
    assert cli.main(["produce", str(path), "--limit", "20", "--rate", "100", "--quiet", "--now"]) == 0
    assert time.monotonic() - start >= 0.18  # 20 events at 100/s: paced, not a burst
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["published"] == 20
    topic = Topics(stream_config.topic_prefix).purchases
    values = consume(stream_config.kafka_bootstrap, topic, until=lambda r: len(r) >= 20)
    assert len(values) == 20
    assert all(v["ts"] > time.time() - 120 for v in values)  # --now stamps the send time


def test_produce_missing_file_fails_clearly(stream_config, monkeypatch, tmp_path) -> None:
    _env(monkeypatch, stream_config)
    with pytest.raises(SystemExit, match="no such file"):
        cli.main(["produce", str(tmp_path / "absent.csv")])


def test_watch_prints_persona_updates(stream_config, monkeypatch, produce, capsys) -> None:
    _env(monkeypatch, stream_config)
    topic = Topics(stream_config.topic_prefix).persona_updates
    updates = [{"user": f"user{i}", "personas": [{"idx": 0, "name": "Gardener", "score": 0.5 + i / 10}],
                "reason": "propagated", "ts": time.time(), "source_ts": 0} for i in range(3)]
    produce(stream_config.kafka_bootstrap, topic, [json.dumps(u).encode() for u in updates] + [b"not json"],
            key=lambda _: "k")
    assert cli.main(["watch", "--from-beginning", "--limit", "4", "--idle", "20"]) == 0
    captured = capsys.readouterr()
    for i in range(3):
        assert f"user{i}: Gardener ({0.5 + i / 10:.2f})" in captured.out
    assert "unreadable record" in captured.err  # diagnostics on stderr: stdout stays the updates
    assert cli.main(["watch", "--from-beginning", "--limit", "4", "--idle", "20", "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line) for line in lines] == updates  # one event per line, exactly as published


def test_export_writes_the_latest_personas_of_every_user(stream_config, monkeypatch, produce, tmp_path,
                                                        capsys) -> None:
    _env(monkeypatch, stream_config)
    topic = Topics(stream_config.topic_prefix).persona_updates
    with pytest.raises(SystemExit, match="no persona updates"):
        cli.main(["export", "--out", str(tmp_path / "none.csv")])

    def update(user: str, names: list[str], reason: str) -> dict:
        return {"user": user, "personas": [{"idx": i, "name": n, "score": 0.5 - i / 10} for i, n in enumerate(names)],
                "reason": reason, "labelled_by": "", "ts": time.time(), "source_ts": 0}

    history = [update("a", ["Gardener"], "propagated"), update("b", ["Book Lover"], "propagated"),
               update("a", ["Home Chef", "Gardener"], "labelled"), update("c", [], "propagated")]
    produce(stream_config.kafka_bootstrap, topic, [json.dumps(u).encode() for u in history] + [b"not json"],
            key=lambda r: json.loads(r)["user"] if r != b"not json" else "a")
    for suffix in (".csv", ".parquet"):
        out = tmp_path / f"personas{suffix}"
        assert cli.main(["export", "--out", str(out)]) == 0
        assert json.loads(capsys.readouterr().out.splitlines()[-1])["users"] == 3
        frame = pd.read_csv(out, dtype=str, keep_default_na=False) if suffix == ".csv" else pd.read_parquet(out)
        assert frame["user_id"].tolist() == ["a", "b", "c"]
        assert frame["personas"].tolist() == ["Home Chef|Gardener", "Book Lover", ""]  # the latest update wins
        assert frame["reason"].tolist() == ["labelled", "propagated", "propagated"]
    with pytest.raises(SystemExit, match="must end in .csv or .parquet"):
        cli.main(["export", "--out", str(tmp_path / "x.json")])


def test_format_update_handles_empty_lists() -> None:
    assert cli.format_update({"user": "u", "personas": [], "reason": "r"}) == "u: -  [r]"


def test_publish_events_raises_when_the_broker_is_gone(tmp_path) -> None:
    from core.events import PurchaseEvent
    from streams.broker import free_port

    event = PurchaseEvent("e", "u", "i", "I", 1, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="not delivered"):
        topic_io.publish_events(f"127.0.0.1:{free_port()}", "t", [event], timeout=1.0)


@pytest.mark.slow
def test_demo_runs_end_to_end(broker, monkeypatch) -> None:
    """`gplr demo` on a small shop: persona updates arrive and the summary is printed."""
    env = {"KAFKA_BOOTSTRAP": broker.bootstrap, "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "streams.cli", "demo", "--users", "80", "--rate", "0",
                          "--no-live", "--timeout", "120"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "demo summary" in out.stdout and "F1@5 vs truth" in out.stdout


SHARED = REPO / ".." / "shared" / "data" / "online_retail"


@pytest.mark.skipif(not (SHARED / "online_retail.csv.gz").is_file(), reason="shared Online Retail data absent")
def test_produce_online_retail_in_time_order(stream_config, monkeypatch, consume, capsys) -> None:
    _env(monkeypatch, stream_config)
    assert cli.main(["produce", str(SHARED / "online_retail.csv.gz"), "--limit", "300", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["published"] == 300
    topic = Topics(stream_config.topic_prefix).purchases
    events = [parse_purchase(m.value()) for m in
              consume(stream_config.kafka_bootstrap, topic, until=lambda r: len(r) >= 300, raw=True)]
    assert len(events) == 300 and len({e.event_id for e in events}) == 300
    assert min(e.ts for e in events) >= 1291161600  # 2010-12-01: the file's first day


def test_demo_persona_set_for_a_data_file_is_explicit_and_absolute(tmp_path, monkeypatch, capsys) -> None:
    """Issue 11: never the synthetic set for a shop's file; relative paths reach the worker (whose
    cwd is the repo) as absolute ones; the demo says where the set came from."""
    from streams.config import StreamConfig
    from streams.demo import _persona_set_for

    monkeypatch.chdir(tmp_path)
    (tmp_path / "shop").mkdir()
    data = Path("shop/orders.csv")
    said: list[str] = []
    with pytest.raises(SystemExit, match="needs a persona set for this shop: pass --personas"):
        _persona_set_for(data, None, StreamConfig(), said.append)
    (tmp_path / "shop" / "personas.json").write_text('[{"name": "A", "definition": "a"}]')
    found = _persona_set_for(data, None, StreamConfig(), said.append)
    assert found == tmp_path / "shop" / "personas.json" and "found beside the data" in said[-1]
    (tmp_path / "mine.json").write_text('[{"name": "B", "definition": "b"}]')
    env_set = _persona_set_for(data, None, StreamConfig(personas_path=Path("mine.json")), said.append)
    assert env_set == tmp_path / "mine.json" and "GPLR_PERSONAS" in said[-1]
    flag = _persona_set_for(data, Path("mine.json"), StreamConfig(), said.append)
    assert flag.is_absolute() and "--personas" in said[-1]
    with pytest.raises(SystemExit, match="no such file"):
        _persona_set_for(data, Path("absent.json"), StreamConfig(), said.append)


def test_produce_takes_the_mapping_and_needs_ts_or_now(stream_config, monkeypatch, consume, tmp_path,
                                                       capsys) -> None:
    _env(monkeypatch, stream_config)
    path = tmp_path / "orders.csv"
    path.write_text("customer,product_id,order_number\nu1,p1,2\nu1,p2,1\nu2,p1,1\n")
    with pytest.raises(SystemExit, match=r"missing column\(s\) \['ts'\]"):
        cli.main(["produce", str(path), "--columns", "user_id=customer,item_id=product_id", "--quiet"])
    assert cli.main(["produce", str(path), "--columns", "user_id=customer,item_id=product_id,ts=order_number",
                     "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "ts <- order_number" in captured.err and json.loads(captured.out.splitlines()[-1])["published"] == 3
    topic = Topics(stream_config.topic_prefix).purchases
    events = consume(stream_config.kafka_bootstrap, topic, until=lambda r: len(r) >= 3)
    u1 = [(e["item_id"], e["ts"]) for e in events if e["user_id"] == "u1"]
    assert u1 == [("p2", 1.0), ("p1", 2.0)]  # published in order-number order, price 0
    assert cli.main(["produce", str(path), "--columns", "user_id=customer,item_id=product_id", "--now",
                     "--quiet"]) == 0  # no ts column: --now stamps the send time


def test_demo_scenario_for_a_data_file(tmp_path, monkeypatch) -> None:
    """--limit caps the replay; labels come from --labels, else GPLR_REPLAY_LABELS, as absolute
    paths, and score the summary; without any the demo labels with the embedding labeler."""
    from core.data import load_table
    from streams.config import StreamConfig
    from streams.demo import _scenario

    monkeypatch.chdir(tmp_path)
    (tmp_path / "orders.csv").write_text("c,p,n\n" + "".join(f"u{i % 5},p{i % 7},{i}\n" for i in range(40)))
    (tmp_path / "p.json").write_text('[{"name": "A", "definition": "a"}, {"name": "B", "definition": "b"}]')
    (tmp_path / "labels.jsonl").write_text('{"user_id": "u1", "personas": ["B"]}\n{"user_id": "u2", "personas": []}\n')
    frame, _ = load_table("orders.csv", {"user_id": "c", "item_id": "p", "ts": "n"})
    said: list[str] = []
    common = dict(frame=frame, personas=Path("p.json"), say=said.append)
    s = _scenario(StreamConfig(), Path("orders.csv"), 500, tmp_path, "replay", labels=Path("labels.jsonl"),
                  limit=25, **common)
    assert len(s.frame) == 25 and s.frame["ts"].tolist() == list(range(25)) and "first 25 of 40" in said[0]
    assert s.config.labeler == "replay" and s.config.replay_labels == tmp_path / "labels.jsonl"
    assert s.config.personas_path == tmp_path / "p.json" and s.truth == {"u1": (1,)}
    s = _scenario(StreamConfig(labeler="replay", replay_labels=Path("labels.jsonl")), Path("orders.csv"), 500,
                  tmp_path, "replay", limit=0, **common)
    assert len(s.frame) == 40 and s.config.replay_labels == tmp_path / "labels.jsonl"
    assert "GPLR_REPLAY_LABELS" in said[-1]
    s = _scenario(StreamConfig(), Path("orders.csv"), 500, tmp_path, "replay", **common)
    assert s.config.labeler == "embedding" and s.truth is None and "embedding labeler" in said[-1]
