"""Every `gplr` command given bad input: exit status != 0, one line naming the problem on stderr,
never a traceback (issue 11). Most cases run in-process through `core.cli.main` exactly as the
console script does; the ones that depend on the process (cwd, environment) run as subprocesses."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from core.cli import main
from streams.broker import free_port
from tests.shop_files import COLUMNS, write_grocery_shop

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    paths = write_grocery_shop(tmp_path_factory.mktemp("shop"), n_users=60)
    bad = paths["personas"].parent / "bad_personas.json"
    rows = json.loads(paths["personas"].read_text())
    bad.write_text(json.dumps([{"name": r["name"], "description": r["definition"]} for r in rows]))
    paths["bad_personas"] = bad
    return paths


def run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """(exit status, stderr) of `gplr ARGV` as the console script reports them. An exception other
    than SystemExit escapes: that is the traceback this file exists to catch."""
    try:
        status = main(argv)
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            status = 1
        else:
            status = exc.code or 0
    return status, capsys.readouterr().err


def label(shop: dict, out: Path, *extra: str) -> list[str]:
    return ["label", "--data", str(shop["orders"]), "--personas", str(shop["personas"]), "--out", str(out),
            "--columns", COLUMNS, *extra]


def last_line(err: str) -> str:
    return [line for line in err.splitlines() if line.strip()][-1]


def test_label_wrong_columns_lists_what_was_found_and_needed(shop, tmp_path, capsys) -> None:
    status, err = run(["label", "--data", str(shop["orders"]), "--personas", str(shop["personas"]),
                       "--out", str(tmp_path / "o.jsonl")], capsys)
    line = last_line(err)
    assert status != 0 and "Traceback" not in err
    assert "missing column(s) ['user_id', 'item_id']" in line and "'customer', 'order_number'" in line
    assert "--columns" in line


@pytest.mark.parametrize("change,message", [
    (["--columns", "customer"], "expected CANONICAL=SOURCE"),
    (["--columns", "user=customer"], "unknown canonical column(s) ['user']"),
    (["--columns", "user_id=client"], "missing column(s) ['client', 'item_id']"),
    (["--schema", "/nonexistent/schema.yaml"], "schema.yaml"),
])
def test_label_bad_mapping(shop, tmp_path, capsys, change, message) -> None:
    argv = label(shop, tmp_path / "o.jsonl")
    argv = argv[:argv.index("--columns")] + change
    status, err = run(argv, capsys)
    assert status != 0 and "Traceback" not in err and message in last_line(err)


def test_persona_file_with_unknown_keys_is_refused(shop, tmp_path, capsys) -> None:
    argv = label(shop, tmp_path / "o.jsonl")
    argv[argv.index("--personas") + 1] = str(shop["bad_personas"])
    status, err = run(argv, capsys)
    assert status != 0 and "unknown key(s) ['description']" in last_line(err) and "'definition'" in last_line(err)
    assert not (tmp_path / "o.jsonl").exists()


def test_openai_labeler_without_an_endpoint_names_the_url(shop, tmp_path, capsys, monkeypatch) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    monkeypatch.setenv("OPENAI_BASE_URL", url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    status, err = run(label(shop, tmp_path / "o.jsonl", "--labeler", "openai"), capsys)
    assert status != 0 and f"no answer from {url}" in last_line(err)
    assert not (tmp_path / "o.jsonl").exists()  # never a file of empty persona lists
    monkeypatch.delenv("OPENAI_BASE_URL")
    monkeypatch.delenv("OPENAI_API_KEY")
    status, err = run(label(shop, tmp_path / "o.jsonl", "--labeler", "openai"), capsys)
    assert status != 0 and "OPENAI_API_KEY is unset" in last_line(err)


def test_openai_labeler_failing_every_call_writes_nothing(shop, tmp_path, capsys, monkeypatch, fake_openai) -> None:
    fake_openai.script(fake_openai.fail(500, times=1000))
    for key, value in {"OPENAI_BASE_URL": fake_openai.base_url, "OPENAI_API_KEY": "sk-test",
                       "GPLR_LLM_MAX_RETRIES": "0"}.items():
        monkeypatch.setenv(key, value)
    status, err = run(label(shop, tmp_path / "o.jsonl", "--labeler", "openai"), capsys)
    assert status != 0 and "labeled none of" in last_line(err) and "server_error" in last_line(err)
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("command", ["personas-generate", "demo"])
def test_llm_commands_without_an_endpoint(shop, tmp_path, capsys, monkeypatch, command) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    monkeypatch.setenv("OPENAI_BASE_URL", url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    argv = {"personas-generate": ["personas-generate", "--data", str(shop["orders"]), "--columns", COLUMNS,
                                  "--out", str(tmp_path / "p.json")],
            "demo": ["demo", "--data", str(shop["orders"]), "--columns", COLUMNS, "--personas",
                     str(shop["personas"]), "--labeler", "openai", "--no-live"]}[command]
    status, err = run(argv, capsys)
    assert status != 0 and f"no answer from {url}" in last_line(err) and not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("argv,message", [
    (["produce", "{orders}"], "missing column(s) ['user_id', 'item_id', 'ts']"),
    (["produce", "{orders}", "--columns", "user_id=customer,item_id=product_id"], "missing column(s) ['ts']"),
    (["demo", "--data", "{orders}", "--columns", COLUMNS, "--limit", "-1"], "--limit must be >= 0"),
    (["demo", "--data", "{orders}", "--columns", COLUMNS, "--personas", "{bad_personas}"], "unknown key(s)"),
    (["demo", "--data", "{orders}", "--columns", COLUMNS, "--personas", "{personas}", "--labels", "/nonexistent.csv"],
     "no such file"),
    (["export", "--out", "personas.json"], "must end in .csv or .parquet"),
    (["train-recsys", "--purchases", "{orders}", "--model", "mf"], "missing column(s)"),
    (["train-recsys", "--purchases", "{orders}", "--columns", COLUMNS, "--model", "lgcn3", "--personas",
      "{personas}", "--user-labels", "/nonexistent.jsonl"], "nonexistent.jsonl"),
    (["segment", "--personas-file", "{truth}", "--persona-set", "{bad_personas}", "--out", "s.csv"], "unknown key(s)"),
    (["segment", "--personas-file", "{orders}", "--persona-set", "{personas}", "--out", "s.csv"], "needs an id column"),
    (["segment", "--personas-file", "{truth}", "--persona-set", "{personas}", "--data", "{orders}", "--out", "s.csv"],
     "missing column(s)"),
    (["batch-demo", "--k", "0"], "at least 1"),
])
def test_every_command_refuses_bad_input_in_one_line(shop, tmp_path, capsys, monkeypatch, argv, message) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP", f"127.0.0.1:{free_port()}")  # never reached: the input is refused first
    monkeypatch.chdir(tmp_path)
    status, err = run([a.format(**{k: str(v) for k, v in shop.items()}) for a in argv], capsys)
    assert status != 0 and "Traceback" not in err
    assert message in last_line(err), err[-2000:]


def _gplr(argv: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **env}
    environ.pop("GPLR_PERSONAS", None)
    return subprocess.run([sys.executable, "-m", "core.cli", *argv], cwd=cwd, env=environ, capture_output=True,
                          text=True, timeout=120)


def test_demo_data_without_a_persona_set_stops_before_streaming(shop, tmp_path) -> None:
    """A relative --data path, no persona set anywhere: one line, no synthetic personas, no traceback."""
    (tmp_path / "shop").mkdir()
    (tmp_path / "shop" / "orders.csv").write_text(shop["orders"].read_text())
    out = _gplr(["demo", "--data", "shop/orders.csv", "--columns", COLUMNS, "--no-live"], tmp_path)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "needs a persona set" in last_line(out.stderr) and "--personas" in last_line(out.stderr)
    assert "Home Chef" not in out.stdout + out.stderr


def test_broker_port_clash_names_the_option(tmp_path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = _gplr(["broker", "--port", str(port), "--data-dir", str(tmp_path / "b")], tmp_path)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert f"port {port} is already in use" in out.stderr and "--port" in out.stderr
    assert "--kafka-port" not in out.stderr


def test_uncaught_user_errors_still_end_in_one_line(capsys, monkeypatch) -> None:
    """The safety net in `core.cli.run_command`: a ValueError no command caught is its message and
    status 2, the traceback only with -v."""
    import argparse

    from core.cli import run_command

    def boom(_args):
        raise ValueError("bad value\nsecond line")

    status = run_command(argparse.Namespace(func=boom, command="x", verbose=False))
    assert status == 2 and capsys.readouterr().err == "gplr x: bad value\nsecond line\n(-v shows the traceback)\n"
    with pytest.raises(ValueError):
        run_command(argparse.Namespace(func=boom, command="x", verbose=True))
