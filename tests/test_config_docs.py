"""Settings are declared once (`core.settings.setting`): the docs tables are generated from the
declarations, every declared variable is read and checked the same way, and `as_env` reproduces
a config."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from core.labelers.openai_labeler import LLMConfig
from core.settings import ConfigError, declared, read_env, to_env
from recsys.trainer import TrainerConfig
from streams import config_docs
from streams.config import StreamConfig

CONFIGS = (StreamConfig, LLMConfig, TrainerConfig)


def test_operations_tables_match_the_declarations() -> None:
    assert config_docs.stale_tables() == [], "run `python -m streams.config_docs --write`"


def test_a_changed_declaration_makes_the_table_stale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check can fail: a different doc line or default in the code no longer matches the file."""
    copy = tmp_path / "operations.md"
    shutil.copy(config_docs.OPERATIONS, copy)
    assert config_docs.stale_tables(copy) == []
    copy.write_text(copy.read_text().replace("| `GPLR_PARTITIONS` | `4` |", "| `GPLR_PARTITIONS` | `5` |"))
    assert config_docs.stale_tables(copy) == ["stream"]
    monkeypatch.setattr(config_docs, "OPERATIONS", copy)
    assert config_docs.main([]) == 1
    config_docs.main(["--write"])
    assert config_docs.main([]) == 0 and "| `GPLR_PARTITIONS` | `4` |" in copy.read_text()


def test_compose_column_reads_literals_and_defaults() -> None:
    values = config_docs.compose_worker_values()
    assert values["KAFKA_BOOTSTRAP"] == "kafka:9092" and values["GPLR_PARTITIONS"] == "8"
    assert "GPLR_EPS" not in values  # `${GPLR_EPS:-}`: the code default applies


def test_every_variable_is_declared_once() -> None:
    names = [meta.env for cls in CONFIGS for _, meta, _ in declared(cls)]
    assert len(names) == len(set(names)) > 40
    assert all(meta.doc.strip() for cls in CONFIGS for _, meta, _ in declared(cls))


@pytest.mark.parametrize("cls", CONFIGS)
def test_defaults_round_trip_through_the_environment(cls: type) -> None:
    config = cls()
    assert cls(**read_env(cls, to_env(config))) == config


@pytest.mark.parametrize("cls, name, env", [(cls, name, meta.env) for cls in CONFIGS
                                            for name, meta, _ in declared(cls) if meta.parse in (int, float)])
def test_a_number_that_does_not_parse_names_its_variable(cls: type, name: str, env: str) -> None:
    with pytest.raises(ConfigError, match=f"^{env}='many': expected (int|float)$"):
        cls.from_env({env: "many"})


@pytest.mark.parametrize("cls", CONFIGS)
def test_a_failed_check_names_its_variable(cls: type) -> None:
    """-1 breaks every numeric check here (ports, counts, rates, budgets); each names its variable."""
    checked = [(name, meta.env) for name, meta, default in declared(cls)
               if meta.check is not None and isinstance(default, (int, float)) and not isinstance(default, bool)]
    assert checked
    for name, env in checked:
        with pytest.raises(ConfigError, match=f"^{env}=-1(\\.0)? "):
            dataclasses.replace(cls(), **{name: -1})
        with pytest.raises(ConfigError, match=f"^{env}=-1(\\.0)? "):
            cls.from_env({env: "-1"})


def test_blank_means_default_and_secrets_stay_out() -> None:
    assert StreamConfig.from_env({"GPLR_PARTITIONS": "  ", "GPLR_TOPIC_PREFIX": ""}) == StreamConfig()
    llm = LLMConfig.from_env({"OPENAI_API_KEY": "sk-secret"})
    assert llm.api_key == "sk-secret" and "OPENAI_API_KEY" not in to_env(llm) and "sk-secret" not in repr(llm)


def test_unset_personas_is_a_logged_default(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="streams.config"):
        personas = StreamConfig().personas()
    assert len(personas) > 0
    assert "GPLR_PERSONAS is unset" in caplog.text
