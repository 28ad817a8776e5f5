"""docs/operations.md stays true: every variable the code or the compose file reads is in the
configuration reference, with the default the code (or compose file) really uses."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from core.embedding_cache import EmbeddingCacheConfig
from core.labelers.openai_labeler import LLMConfig
from core.settings import declared, table_rows
from streams.config import StreamConfig
from tests.deploy.deploy_helpers import COMPOSE_FILE, REPO, compose_model, config_variables, trainer_variables

OPERATIONS = REPO / "docs" / "operations.md"
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
    """Variable → its default cell, from the declarations (`core.settings.table_rows`)."""
    from recsys.trainer import TrainerConfig

    return {env: cell for cls in (StreamConfig, LLMConfig, TrainerConfig) for env, cell, _ in table_rows(cls)}


def test_declarations_are_what_the_readers_read() -> None:
    """The variables `from_env` really looks up are exactly the declared ones (plus a fallback)."""
    from recsys.trainer import TrainerConfig

    readers = (StreamConfig, LLMConfig, EmbeddingCacheConfig)
    assert config_variables() == {meta.env for cls in readers for _, meta, _ in declared(cls)}
    assert trainer_variables() == {meta.env for _, meta, _ in declared(TrainerConfig)} | {"GPLR_METRICS_PORT"}


def test_every_setting_is_documented_with_its_default() -> None:
    docs = documented()
    missing = sorted((config_variables() | trainer_variables()) - set(docs))
    assert not missing, f"operations.md does not document {missing}"
    defaults = code_defaults()
    assert {"KAFKA_BOOTSTRAP", "OPENAI_API_KEY", "GPLR_RECS_K"} <= set(defaults)
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
