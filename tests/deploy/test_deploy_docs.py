"""docs/operations.md stays true: every variable the code or the compose file reads is in the
configuration reference, with the default the code (or compose file) really uses."""
from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from core.labelers.openai_labeler import LLMConfig
from streams.config import StreamConfig
from tests.deploy.deploy_helpers import COMPOSE_FILE, REPO, compose_model, config_variables, trainer_variables

OPERATIONS = REPO / "docs" / "operations.md"
_LLM_FIELDS = {"OPENAI_BASE_URL": "base_url", "OPENAI_API_KEY": "api_key", "GPLR_LLM_MODEL": "model",
               "GPLR_LLM_TIMEOUT_S": "timeout_s", "GPLR_LLM_MAX_RETRIES": "max_retries",
               "GPLR_LLM_CONCURRENCY": "concurrency", "GPLR_LLM_MAX_CALLS": "max_calls",
               "GPLR_LLM_MAX_TOKENS": "max_tokens", "GPLR_LLM_BACKOFF_S": "backoff_s"}
_TRAINER_FIELDS = {"GPLR_TRAIN_INTERVAL_S": "interval_s", "GPLR_TRAIN_AFTER_EDGES": "after_edges",
                   "GPLR_TRAINER_MODEL": "model", "GPLR_TRAINER_EPOCHS": "epochs", "GPLR_TRAINER_DIM": "dim",
                   "GPLR_TRAINER_LR": "lr", "GPLR_TRAINER_MAX_SECONDS": "max_seconds",
                   "GPLR_TRAINER_DEVICE": "device", "GPLR_RECS_K": "top_k",
                   "GPLR_TRAINER_RESELECT_EVERY": "reselect_every"}
_COMPOSE_DEFAULT = re.compile(r"\$\{([A-Z][A-Z0-9_]*)(?::-([^}]*))?\}")


def _rows() -> dict[str, list[str]]:
    """Variable → its cells, from every table row of operations.md that starts with a name."""
    rows = {}
    for line in OPERATIONS.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) >= 3:
            rows[cells[0].strip("`")] = cells
    return rows


def documented() -> dict[str, str]:
    """Variable → its "default" cell."""
    return {name: cells[1] for name, cells in _rows().items()}


def _cell(value: object) -> str:
    return "(unset)" if value in (None, "") else f"`{value}`"


def code_defaults() -> dict[str, str]:
    stream = StreamConfig().as_env()
    llm = LLMConfig()
    defaults = {name: _cell(value) for name, value in stream.items()}
    defaults.update({name: _cell(getattr(llm, attr)) for name, attr in _LLM_FIELDS.items()})
    from recsys.trainer import TrainerConfig

    trainer = TrainerConfig()
    defaults.update({name: _cell(getattr(trainer, attr)) for name, attr in _TRAINER_FIELDS.items()})
    return defaults


def test_field_maps_are_current() -> None:
    """The LLM and trainer variables checked below are read, and name real config fields."""
    from recsys.trainer import TrainerConfig

    assert set(_LLM_FIELDS.values()) <= {f.name for f in fields(LLMConfig)}
    assert set(_LLM_FIELDS) <= config_variables()
    assert set(_TRAINER_FIELDS.values()) <= {f.name for f in fields(TrainerConfig)}
    assert set(_TRAINER_FIELDS) <= trainer_variables()


def test_every_setting_is_documented_with_its_default() -> None:
    docs = documented()
    missing = sorted((config_variables() | trainer_variables()) - set(docs))
    assert not missing, f"operations.md does not document {missing}"
    defaults = code_defaults()
    wrong = {name: (docs[name], defaults[name]) for name in defaults if docs[name] != defaults[name]}
    assert not wrong, f"documented default != code default: {wrong}"


def test_every_compose_variable_is_documented_with_its_default() -> None:
    docs = documented()
    config_vars = config_variables() | trainer_variables()
    for name, default in _COMPOSE_DEFAULT.findall(COMPOSE_FILE.read_text()):
        assert name in docs, f"operations.md does not document {name} (docker-compose.yml)"
        if name in config_vars or name == "KAFKA_CLUSTER_ID":
            continue  # code defaults are checked above; the cluster id is not worth repeating
        assert docs[name] == _cell(default), f"{name}: documented {docs[name]}, compose uses {default!r}"


@pytest.mark.parametrize("section", ["## Running the compose stack", "## Configuration reference",
                                     "## Scaling out", "## Running against an existing Kafka",
                                     "## Using an LLM", "## Upgrading and resetting state"])
def test_operations_sections(section: str) -> None:
    assert section in OPERATIONS.read_text()


def test_compose_column_matches_the_stack(compose_bin: Path) -> None:
    """The stream table's "compose stack" column shows what the worker really gets."""
    worker_env = compose_model(compose_bin)["services"]["worker"]["environment"]
    shown = {name: cells[2] for name, cells in _rows().items() if len(cells) == 4 and cells[2]}
    assert {"KAFKA_BOOTSTRAP", "GPLR_PARTITIONS", "GPLR_DATA_DIR", "GPLR_METRICS_PORT"} <= set(shown)
    for name, cell in shown.items():
        assert cell == f"`{worker_env[name]}`", f"{name}: documented {cell}, stack sets {worker_env[name]!r}"
