"""docker-compose.yml, validated offline by the real Compose binary (no Docker engine needed):
it parses, a broken copy does not, the services are wired as operations.md says, and every
variable it hands the gplr services is one that `StreamConfig.from_env` / `LLMConfig.from_env`
really read.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, start_http_server

from streams.broker import free_port
from streams.config import StreamConfig
from tests.deploy.deploy_helpers import (
    COMPOSE_FILE,
    PROMETHEUS_CONFIG,
    REPO,
    compose_model,
    config_variables,
    run_compose,
    trainer_variables,
)


def test_compose_file_is_valid(compose_bin: Path) -> None:
    result = run_compose(compose_bin, "config", "--quiet")
    assert result.returncode == 0, result.stderr
    for profile in ("gpu", "llm"):
        result = run_compose(compose_bin, "--profile", profile, "config", "--quiet")
        assert result.returncode == 0, f"profile {profile}: {result.stderr}"


@pytest.mark.parametrize("breakage", [
    # YAML that does not parse
    lambda text: text.replace("services:\n", "services:\n  - [unbalanced\n", 1),
    # a dependency on a service that does not exist
    lambda text: text.replace("condition: service_completed_successfully",
                              "condition: service_completed_successfully\n      nosuch:\n"
                              "        condition: service_started", 1),
    # an unknown key in a service
    lambda text: text.replace("  worker:\n", "  worker:\n    replicaz: 3\n", 1),
], ids=["yaml-syntax", "undefined-dependency", "unknown-key"])
def test_broken_compose_file_fails(compose_bin: Path, tmp_path: Path, breakage) -> None:
    broken = tmp_path / "docker-compose.yml"
    text = COMPOSE_FILE.read_text()
    broken.write_text(breakage(text))
    assert broken.read_text() != text
    result = run_compose(compose_bin, "config", "--quiet", file=broken)
    assert result.returncode != 0
    assert result.stderr.strip()


def test_default_stack_services(compose_bin: Path) -> None:
    services = compose_model(compose_bin)["services"]
    assert set(services) == {"kafka", "topics", "worker", "trainer", "prometheus", "grafana"}
    assert services["kafka"]["image"].startswith("apache/kafka:")
    env = services["kafka"]["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert len(env["CLUSTER_ID"]) == 22  # a base64 UUID, as kafka-storage format expects


def test_services_start_in_order(compose_bin: Path) -> None:
    services = compose_model(compose_bin)["services"]
    assert services["topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert "healthcheck" in services["kafka"]
    for name in ("worker", "trainer"):
        assert services[name]["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    assert services["topics"]["restart"] == "no"


def test_worker_can_scale(compose_bin: Path) -> None:
    """`--scale worker=N` needs no fixed name, no host port and no volume shared by replicas."""
    worker = compose_model(compose_bin)["services"]["worker"]
    assert "container_name" not in worker
    assert not worker.get("ports")
    assert not [v for v in worker.get("volumes", []) if v.get("type") == "volume"]
    assert worker["command"] == ["worker"]
    port = worker["environment"]["GPLR_METRICS_PORT"]
    assert f"127.0.0.1:{port}/metrics" in " ".join(worker["healthcheck"]["test"])
    assert compose_model(compose_bin)["services"]["trainer"]["command"] == ["trainer"]


def test_compose_commands_exist_in_the_cli(compose_bin: Path) -> None:
    """Each gplr service's command is a real `gplr` subcommand (entry points of streams and recsys)."""
    from core.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]  # noqa: SLF001 - argparse has no public list
    services = compose_model(compose_bin, "gpu")["services"]
    for name in ("worker", "trainer", "trainer-gpu"):
        command = services[name]["command"][0]
        assert command in sub.choices, f"{name}: `gplr {command}` does not exist"


def test_gpu_only_behind_profile(compose_bin: Path) -> None:
    """A CPU-only host runs the default stack: no service outside the gpu profile reserves a GPU."""
    def gpu_services(model: dict) -> set[str]:
        return {name for name, svc in model["services"].items()
                if svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")}

    assert gpu_services(compose_model(compose_bin)) == set()
    assert gpu_services(compose_model(compose_bin, "gpu")) == {"trainer-gpu"}
    gpu = compose_model(compose_bin, "gpu")["services"]["trainer-gpu"]
    assert gpu["build"]["args"]["TORCH_VARIANT"].startswith("cu")
    assert gpu["command"] == ["trainer"]


def test_llm_profile_serves_openai_api(compose_bin: Path) -> None:
    services = compose_model(compose_bin, "llm")["services"]
    assert {"ollama", "ollama-pull"} <= set(services)
    assert "ollama" not in compose_model(compose_bin)["services"]


# Fixed by the stack rather than passed through: the trainer falls back to GPLR_METRICS_PORT,
# the port deploy/prometheus.yml scrapes.
_FIXED = {"GPLR_TRAINER_METRICS_PORT"}


def test_every_gplr_variable_is_read_by_the_config(compose_bin: Path) -> None:
    """No typo'd or stale variable in the compose file, and none of the settings is missing."""
    stream, trainer = config_variables(), trainer_variables()
    services = compose_model(compose_bin, "gpu")["services"]
    for name in ("topics", "worker", "trainer", "trainer-gpu"):
        known = stream | trainer if name.startswith("trainer") else stream
        env = set(services[name]["environment"])
        stray = {v for v in env - known if v.startswith(("GPLR_", "KAFKA_", "OPENAI_"))}
        assert not stray, f"{name} sets variables nothing reads: {sorted(stray)}"
        assert not (known - env - _FIXED), f"{name} does not pass through {sorted(known - env - _FIXED)}"


def test_compose_environment_is_a_valid_config(compose_bin: Path) -> None:
    worker_env = compose_model(compose_bin)["services"]["worker"]["environment"]
    config = StreamConfig.from_env({k: v or "" for k, v in worker_env.items()})
    assert config.kafka_bootstrap == "kafka:9092"
    assert str(config.data_dir) == "/var/lib/gplr"
    assert config.topic_prefix == "gplr."
    assert "OPENAI_API_KEY" in worker_env and not worker_env["OPENAI_API_KEY"]


def test_trainer_environment_is_a_valid_config(compose_bin: Path) -> None:
    from recsys.trainer import TrainerConfig

    services = compose_model(compose_bin, "gpu")["services"]
    prom = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "gplr-trainer"]
    for name, device in (("trainer", None), ("trainer-gpu", "cuda")):
        env = {k: v or "" for k, v in services[name]["environment"].items()}
        config = TrainerConfig.from_env(env)
        assert config.metrics_port == job["dns_sd_configs"][0]["port"]
        assert config.device == device
        assert StreamConfig.from_env(env).kafka_bootstrap == "kafka:9092"
    host = {"GPLR_TRAINER_EPOCHS": "7", "GPLR_RECS_K": "20"}
    env = compose_model(compose_bin, env=host)["services"]["trainer"]["environment"]
    config = TrainerConfig.from_env({k: v or "" for k, v in env.items()})
    assert (config.epochs, config.top_k) == (7, 20)


def test_host_settings_reach_the_workers(compose_bin: Path) -> None:
    host = {"GPLR_PARTITIONS": "16", "GPLR_EPS": "0.1", "GPLR_LABELER": "openai",
            "OPENAI_BASE_URL": "http://ollama:11434/v1", "GPLR_LLM_MODEL": "qwen2.5:7b-instruct",
            "GPLR_TOPIC_PREFIX": "shop1."}
    worker_env = compose_model(compose_bin, env=host)["services"]["worker"]["environment"]
    config = StreamConfig.from_env({k: v or "" for k, v in worker_env.items()})
    assert (config.partitions, config.eps, config.labeler, config.topic_prefix) == (16, 0.1, "openai", "shop1.")
    assert config.llm.base_url == "http://ollama:11434/v1"
    assert config.llm.model == "qwen2.5:7b-instruct"


def test_api_key_comes_only_from_the_environment() -> None:
    text = COMPOSE_FILE.read_text()
    assert re.search(r"OPENAI_API_KEY:\s*\$\{OPENAI_API_KEY:-\}\s*$", text, re.M)
    assert not re.search(r"sk-[A-Za-z0-9]{8,}", text)


def test_prometheus_scrapes_the_port_workers_serve(compose_bin: Path) -> None:
    """prometheus.yml's DNS discovery targets the service names and GPLR_METRICS_PORT of compose."""
    services = compose_model(compose_bin, "gpu")["services"]
    prom = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in prom["scrape_configs"]}
    for job, names in (("gplr-worker", {"worker"}), ("gplr-trainer", {"trainer", "trainer-gpu"})):
        (sd,) = jobs[job]["dns_sd_configs"]
        assert set(sd["names"]) == names and sd["type"] == "A"
        for name in names:
            assert sd["port"] == int(services[name]["environment"]["GPLR_METRICS_PORT"])


def test_mounted_files_exist(compose_bin: Path) -> None:
    for name, svc in compose_model(compose_bin)["services"].items():
        for volume in svc.get("volumes", []):
            if volume["type"] == "bind":
                source = Path(volume["source"])
                assert source.exists(), f"{name} mounts missing {source}"
                assert source.resolve().is_relative_to(REPO)


def test_metrics_healthcheck_tells_up_from_down(compose_bin: Path) -> None:
    """The healthcheck command itself, run here against a live and a closed /metrics port."""
    worker = compose_model(compose_bin)["services"]["worker"]
    cmd_type, executable, *args = worker["healthcheck"]["test"]
    assert (cmd_type, executable) == ("CMD", "python")
    port = worker["environment"]["GPLR_METRICS_PORT"]
    live, closed = free_port(), free_port()
    server, thread = start_http_server(live, addr="127.0.0.1", registry=CollectorRegistry())
    try:
        for target, healthy in ((live, True), (closed, False)):
            argv = [sys.executable, *(a.replace(f":{port}/", f":{target}/") for a in args)]
            result = subprocess.run(argv, capture_output=True, timeout=30)
            assert (result.returncode == 0) == healthy, result.stderr
    finally:
        server.shutdown()
        thread.join(5)
