"""A real Prometheus (Debian's binary) scraping a real `gplr worker` and `gplr trainer` on the
embedded broker while `gplr produce --synthetic` feeds them: the counters arrive, the alert rules
of deploy/alerts.yml load and evaluate cleanly, and every dashboard query runs on the live server.

Also runs the compose file's one-shot topic-creation snippet against the broker.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka.admin import AdminClient

import streams.app  # noqa: F401  (importing the app registers the internal topic names)
from streams.broker import free_port
from streams.demo import WorkerProcess
from streams.topics import topics_for
from tests.deploy.deploy_helpers import (
    ALERTS,
    PROMETHEUS_CONFIG,
    REPO,
    alert_rules,
    compose_model,
    dashboard_targets,
    grafana_to_promql,
)

# The infra engineer's session broker fixture and isolated test config (shared, not copied).
from tests.kafka_fixtures import make_config

pytestmark = pytest.mark.broker

SYNTHETIC_USERS = 120


def _get(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


class PrometheusServer:
    """`prometheus` on a free loopback port with its own config and TSDB directory."""

    def __init__(self, binary: str, config: Path, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "prometheus.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def wait_ready(self, timeout: float = 30.0) -> None:
        wait_for(lambda: self._ready(), timeout, lambda: f"prometheus not ready:\n{self.log()}")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited ({self.proc.returncode}):\n{self.log()}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError):
            return False

    def query(self, expr: str) -> list[dict]:
        body = _get(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        assert body["status"] == "success", body
        return body["data"]["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


def wait_for(check: Callable[[], Any], timeout: float, message: Callable[[], str],
             interval: float = 0.5) -> Any:
    """Poll `check()` until it returns something truthy; fail with `message()` after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(message())


def scrape_config(ports: dict[str, int], path: Path) -> Path:
    """deploy/prometheus.yml with its DNS discovery swapped for local processes and 1 s intervals.

    `ports` maps job names (gplr-worker, gplr-trainer) to metrics ports. Global settings, rule
    files (the real alerts.yml) and job names stay as deployed.
    """
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(ALERTS)]
    jobs = [job for job in config["scrape_configs"] if job["job_name"] in ports]
    assert len(jobs) == len(ports)
    for job in jobs:
        job.pop("dns_sd_configs")
        job["static_configs"] = [{"targets": [f"127.0.0.1:{ports[job['job_name']]}"]}]
    config["scrape_configs"] = jobs
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def prometheus(prometheus_bin: str, tmp_path: Path) -> Iterator[Callable[[Path], PrometheusServer]]:
    servers: list[PrometheusServer] = []

    def start(config: Path) -> PrometheusServer:
        server = PrometheusServer(prometheus_bin, config, tmp_path)
        servers.append(server)
        server.wait_ready()
        return server

    yield start
    for server in servers:
        server.stop()


def _env(config) -> dict[str, str]:
    return {**os.environ, **config.as_env(), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def test_prometheus_scrapes_live_worker_and_trainer(broker, prometheus, tmp_path: Path) -> None:  # noqa: F811
    config = make_config(broker.bootstrap, tmp_path / "data", metrics_port=free_port())
    trainer_port = free_port()
    worker = WorkerProcess(config, tmp_path / "worker.log").start()
    # The trainer as the stack runs it: its metrics port falls back to GPLR_METRICS_PORT.
    trainer_log = open(tmp_path / "trainer.log", "wb")
    trainer = subprocess.Popen(
        [sys.executable, "-m", "core.cli", "trainer"], cwd=REPO, stdin=subprocess.DEVNULL,
        env={**_env(config), "GPLR_METRICS_PORT": str(trainer_port), "GPLR_TRAIN_INTERVAL_S": "3600"},
        stdout=trainer_log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        server = prometheus(scrape_config({"gplr-worker": config.metrics_port, "gplr-trainer": trainer_port},
                                          tmp_path / "prometheus.yml"))
        worker.wait_ready(timeout=60)  # Prometheus started meanwhile; its scrapes fail until now

        # The first scrapes must see the counters at 0, or rate() has no increase to show.
        wait_for(lambda: server.value('up{job="gplr-worker"}') == 1.0, 20,
                 lambda: f"worker never scraped; targets: {_get(server.url + '/api/v1/targets')}")
        assert server.value("sum(gplr_events_in_total)") == 0.0

        produced = subprocess.run(
            [sys.executable, "-m", "core.cli", "produce", "--synthetic", str(SYNTHETIC_USERS), "--quiet"],
            cwd=REPO, env=_env(config), capture_output=True, text=True, timeout=60,
        )
        assert produced.returncode == 0, produced.stderr[-3000:]
        published = json.loads(produced.stdout.strip().splitlines()[-1])["published"]
        assert published > SYNTHETIC_USERS

        rate = wait_for(lambda: server.value("sum(rate(gplr_events_in_total[15s]))"), 40,
                        lambda: f"no event rate in Prometheus; worker log:\n{worker.log()[-3000:]}")
        assert rate > 0
        # Every purchase is counted (at least once: the stream is at-least-once), as Prometheus sees it.
        wait_for(lambda: (server.value("sum(gplr_events_in_total)") or 0) >= published, 30,
                 lambda: f"events_in = {server.value('sum(gplr_events_in_total)')} != {published}")
        wait_for(lambda: (server.value("sum(increase(gplr_edges_total[1m]))") or 0) > 0, 20,
                 lambda: f"no new edges counted; worker log:\n{worker.log()[-3000:]}")

        # The deployed alert rules load and evaluate without errors on real series.
        def rules_evaluated() -> list[dict] | None:
            groups = _get(f"{server.url}/api/v1/rules")["data"]["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            return rules if rules and all(r["health"] == "ok" for r in rules) else None

        rules = wait_for(rules_evaluated, 15, lambda: f"rules: {_get(server.url + '/api/v1/rules')}")
        assert sorted(r["name"] for r in rules) == sorted(r["alert"] for r in alert_rules())
        firing = {a["labels"]["alertname"] for a in _get(f"{server.url}/api/v1/alerts")["data"]["alerts"]}
        assert not firing & {"GplrWorkerDown", "GplrDeadLetterRateHigh"}

        # The trainer is scraped on its own job, with only its own families.
        wait_for(lambda: server.value('up{job="gplr-trainer"}') == 1.0, 30,
                 lambda: f"trainer never scraped:\n{(tmp_path / 'trainer.log').read_text()[-3000:]}")
        assert server.query('gplr_trainer_epochs{job="gplr-trainer"}')
        assert not server.query('gplr_events_in_total{job="gplr-trainer"}')

        # Every dashboard query runs on the live server.
        for _title, expr in dashboard_targets():
            server.query(grafana_to_promql(expr))
        assert server.query(grafana_to_promql(next(e for t, e in dashboard_targets()
                                                   if "gplr_events_in_total" in e)))
    finally:
        worker.stop(timeout=20)
        if trainer.poll() is None:
            os.killpg(trainer.pid, signal.SIGTERM)
            try:
                trainer.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(trainer.pid, signal.SIGKILL)
                trainer.wait(5)
        trainer_log.close()


def test_compose_topic_snippet_creates_every_topic(broker, compose_bin: Path, tmp_path: Path) -> None:  # noqa: F811
    """The one-shot `topics` service's command, run here against the broker, creates the public
    and internal topics with GPLR_PARTITIONS partitions (re-runs keep existing topics: tested
    with streams.topics.create_topics itself)."""
    service = compose_model(compose_bin)["services"]["topics"]
    assert service["entrypoint"] == ["python", "-c"]
    config = make_config(broker.bootstrap, tmp_path / "data", partitions=3)
    run = subprocess.run([sys.executable, "-c", *service["command"]], cwd=tmp_path, env=_env(config),
                         capture_output=True, text=True, timeout=90)
    assert run.returncode == 0, run.stderr[-3000:]
    meta = AdminClient({"bootstrap.servers": broker.bootstrap}).list_topics(timeout=10).topics
    expected = topics_for(config).all()
    assert len(expected) > len(topics_for(config).public())  # internal topics were registered too
    for name in expected:
        assert name in meta, name
        assert len(meta[name].partitions) == 3, name
