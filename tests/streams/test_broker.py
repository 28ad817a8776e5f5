"""Stream infrastructure: config, topics, the embedded broker and metrics, against a real broker."""
from __future__ import annotations

import re
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

import streams.topics as topics_module
from streams import metrics
from streams.broker import BrokerError, EmbeddedBroker, bootstrap_or_embedded, free_port, wait_for_broker
from streams.config import SESSION_TIMEOUT_S, ConfigError, StreamConfig, faust_settings
from streams.topics import Topics, create_topics, internal_topics, register_internal

REPO = Path(__file__).resolve().parents[2]


# -- config -----------------------------------------------------------------------------------
def test_from_env_defaults_match_dataclass_defaults() -> None:
    config = StreamConfig.from_env({})
    assert config == StreamConfig()
    assert (config.topic_prefix, config.partitions, config.eps, config.label_budget) == ("gplr.", 4, 0.2, 0.05)
    assert config.kafka_bootstrap == ""


def test_from_env_reads_every_variable(tmp_path: Path) -> None:
    personas = tmp_path / "p.json"
    personas.write_text('[{"name": "Baker", "definition": "bakes"}]')
    env = {
        "KAFKA_BOOTSTRAP": "h1:9092,h2:9093", "GPLR_TOPIC_PREFIX": "x-", "GPLR_PARTITIONS": "8",
        "GPLR_EPS": "0.1", "GPLR_HOPS": "2", "GPLR_BETA": "0", "GPLR_DATA_DIR": str(tmp_path),
        "GPLR_APP_ID": "app", "GPLR_WORKER_PORT": "7000", "GPLR_METRICS_PORT": "0",
        "GPLR_PERSONAS": str(personas), "GPLR_LABELER": "Replay", "GPLR_LABEL_BUDGET": "0.1",
        "GPLR_REPLAY_LABELS": str(tmp_path / "labels.csv"),
        "GPLR_LABEL_RATE_PER_MIN": "5", "GPLR_LABEL_MIN_PURCHASES": "2", "GPLR_DU_QUANTILE": "0.5",
        "GPLR_HYSTERESIS": "0.2", "GPLR_TOP_K": "3", "GPLR_LOG_LEVEL": "DEBUG",
    }
    c = StreamConfig.from_env(env)
    assert c.kafka_bootstrap == "h1:9092,h2:9093" and c.topic_prefix == "x-" and c.partitions == 8
    assert (c.eps, c.hops, c.beta, c.data_dir, c.app_id) == (0.1, 2, 0.0, tmp_path, "app")
    assert (c.worker_port, c.metrics_port, c.labeler, c.label_budget) == (7000, 0, "replay", 0.1)
    assert (c.label_rate_per_min, c.label_min_purchases, c.du_quantile) == (5.0, 2, 0.5)
    assert (c.hysteresis, c.top_k, c.log_level) == (0.2, 3, "debug")
    assert c.replay_labels == tmp_path / "labels.csv"
    assert c.personas().names == ["Baker"]
    # the environment a subprocess gets reproduces the config
    assert StreamConfig.from_env(c.as_env()) == c


@pytest.mark.parametrize(
    "name, value, fragment",
    [
        ("GPLR_PARTITIONS", "0", "GPLR_PARTITIONS"),
        ("GPLR_PARTITIONS", "four", "expected int"),
        ("GPLR_EPS", "0", "GPLR_EPS"),
        ("GPLR_EPS", "nan", "GPLR_EPS"),
        ("GPLR_LABELER", "gpt", "GPLR_LABELER"),
        ("GPLR_LABELER", "replay", "GPLR_REPLAY_LABELS"),
        ("GPLR_LABEL_BUDGET", "1.5", "GPLR_LABEL_BUDGET"),
        ("GPLR_WORKER_PORT", "70000", "GPLR_WORKER_PORT"),
        ("GPLR_TOP_K", "0", "GPLR_TOP_K"),
        ("GPLR_DU_QUANTILE", "-0.1", "GPLR_DU_QUANTILE"),
        ("GPLR_TOPIC_PREFIX", "a b", "GPLR_TOPIC_PREFIX"),
        ("KAFKA_BOOTSTRAP", "localhost", "KAFKA_BOOTSTRAP"),
    ],
)
def test_bad_values_raise_a_clear_error(name: str, value: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        StreamConfig.from_env({name: value})


def test_missing_persona_file_is_a_config_error(tmp_path: Path) -> None:
    config = StreamConfig(personas_path=tmp_path / "absent.json")
    with pytest.raises(ConfigError, match="no such file"):
        config.personas()


def test_default_personas_are_the_synthetic_shops() -> None:
    from core.synthetic import default_personas

    assert StreamConfig().personas().names == default_personas().names


def test_api_key_never_in_repr() -> None:
    config = StreamConfig.from_env({"OPENAI_API_KEY": "sk-secret-123", "GPLR_LABELER": "openai"})
    assert config.llm.api_key == "sk-secret-123"
    assert StreamConfig.from_env({"OPENAI_API_KEY": "sk-secret-123"}).llm is None  # not needed, not loaded
    assert "sk-secret-123" not in repr(config)


def test_faust_settings_need_a_bootstrap_and_map_the_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="KAFKA_BOOTSTRAP"):
        faust_settings(StreamConfig())
    s = faust_settings(StreamConfig(kafka_bootstrap="a:1,b:2", data_dir=tmp_path, partitions=3))
    assert s["broker"] == ["kafka://a:1", "kafka://b:2"]
    assert s["datadir"] == str(tmp_path / "faust") and s["topic_partitions"] == 3
    # static members ride out a starved worker (30 s), heartbeats at most a third of the session
    assert s["broker_session_timeout"] == SESSION_TIMEOUT_S >= 20
    assert s["broker_heartbeat_interval"] * 3 <= s["broker_session_timeout"]


def test_faust_app_accepts_the_settings(tmp_path: Path) -> None:
    import faust

    app = faust.App("t", **faust_settings(StreamConfig(kafka_bootstrap="127.0.0.1:1", data_dir=tmp_path)))
    assert app.conf.broker_session_timeout == SESSION_TIMEOUT_S
    assert app.conf.topic_partitions == 4


# -- topics -----------------------------------------------------------------------------------
def test_topic_names_share_the_prefix(monkeypatch) -> None:
    monkeypatch.setattr(topics_module, "_internal", dict(topics_module._internal))  # no leak into later tests
    t = Topics("p.")
    assert t.purchases == "p.purchases" and t.purchases_dlq == "p.purchases-dlq"
    assert t.persona_updates == "p.persona-updates" and t.label_requests == "p.label-requests"
    assert set(t.public()) == {"p.purchases", "p.persona-updates", "p.label-requests", "p.labels",
                               "p.recommendations", "p.purchases-dlq"}
    register_internal("test-internal-topic")
    assert "test-internal-topic" in internal_topics()
    assert t.all()[-len(t.internal()):] == t.internal() and "p.test-internal-topic" in t.all()
    with pytest.raises(ValueError):
        register_internal("bad name")


def test_create_topics_is_idempotent(broker) -> None:
    names = Topics(f"c{free_port()}.").public()
    create_topics(broker.bootstrap, names, 3)
    create_topics(broker.bootstrap, names, 3)  # existing topics are fine
    meta = AdminClient({"bootstrap.servers": broker.bootstrap}).list_topics(timeout=10).topics
    assert all(len(meta[n].partitions) == 3 for n in names)


# -- embedded broker --------------------------------------------------------------------------
def test_restart_on_same_port_keeps_data(own_broker: EmbeddedBroker, produce, consume) -> None:
    topic = "restart-test"
    create_topics(own_broker.bootstrap, [topic], 2)
    produce(own_broker.bootstrap, topic, [f"m{i}".encode() for i in range(50)])
    port, pid = own_broker.port, own_broker.pid
    own_broker.restart()
    assert own_broker.port == port and own_broker.pid != pid
    values = consume(own_broker.bootstrap, topic, until=lambda r: len(r) >= 50, timeout=20)
    assert sorted(v.decode() if isinstance(v, bytes) else str(v) for v in values) == sorted(
        f"m{i}" for i in range(50))


def test_kill_then_start_recovers_committed_data(own_broker: EmbeddedBroker, produce) -> None:
    create_topics(own_broker.bootstrap, ["crash"], 1)
    produce(own_broker.bootstrap, "crash", [b"a", b"b", b"c"])
    time.sleep(2.5)  # noida-db persists about once a second; a SIGKILL loses only the last second
    own_broker.kill()
    assert not own_broker.is_running()
    with pytest.raises(BrokerError):
        wait_for_broker(own_broker.bootstrap, timeout=1)
    own_broker.start()
    consumer = Consumer({"bootstrap.servers": own_broker.bootstrap, "group.id": "w"})
    try:
        assert consumer.get_watermark_offsets(TopicPartition("crash", 0), timeout=10) == (0, 3)
    finally:
        consumer.close()


def test_stop_ends_the_process(tmp_path: Path) -> None:
    broker = EmbeddedBroker(data_dir=tmp_path / "b").start()
    proc = broker._proc
    broker.stop()
    assert proc.poll() is not None and broker.pid is None
    broker.stop()  # idempotent


def test_bootstrap_or_embedded(tmp_path: Path, broker) -> None:
    config = StreamConfig(data_dir=tmp_path)
    with bootstrap_or_embedded(config) as live:
        assert live.kafka_bootstrap.startswith("127.0.0.1:")
        wait_for_broker(live.kafka_bootstrap, timeout=5)
        assert (tmp_path / "broker").is_dir()
    with pytest.raises(BrokerError):
        wait_for_broker(live.kafka_bootstrap, timeout=1)
    given = replace(config, kafka_bootstrap=broker.bootstrap)
    with bootstrap_or_embedded(given) as live:
        assert live is given


# -- metrics ----------------------------------------------------------------------------------
def _design_metric_names() -> set[str]:
    text = (REPO / "docs" / "design.md").read_text()
    section = text[text.index("Metric names"):text.index("## recsys/")]
    return {f"gplr_{m}" for m in re.findall(r"`([a-z_]+)(?:\{[^}]*\})?`", section) if not m.endswith("_")}


def test_metric_names_are_exactly_the_design_names() -> None:
    assert set(metrics.metric_names()) == _design_metric_names()


def test_metrics_server_exports_every_name() -> None:
    port = free_port()
    server = metrics.start_metrics_server(port, addr="127.0.0.1")
    try:
        metrics.DLQ.labels(reason="malformed_json").inc()
        metrics.CONSUMER_LAG.labels(topic="t", partition="0").set(3)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        server.shutdown()
    for name in metrics.metric_names():
        assert re.search(rf"^# TYPE ({name}|{re.sub('_total$', '', name)}) ", body, re.M), name
    assert 'gplr_dlq_total{reason="malformed_json"}' in body
    assert metrics.start_metrics_server(0) is None


def test_consumer_lag_is_highwater_minus_committed(broker, produce) -> None:
    topic = f"lag{free_port()}"
    create_topics(broker.bootstrap, [topic], 2)
    produce(broker.bootstrap, topic, [b"x"] * 10, key=lambda _: None)
    group = f"g{free_port()}"
    consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": group})
    lows_highs = [consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10) for p in (0, 1)]
    assert sum(h for _, h in lows_highs) == 10
    # nothing committed: everything is lag
    monitor = metrics.LagMonitor(broker.bootstrap, group)
    lags = monitor.update([(topic, 0), (topic, 1)])
    assert lags == {(topic, 0): lows_highs[0][1], (topic, 1): lows_highs[1][1]}
    # commit 2 records on the fuller partition (unkeyed records may all land on one of them)
    part = max((0, 1), key=lambda p: lows_highs[p][1])
    high = lows_highs[part][1]
    assert high >= 5
    consumer.commit(offsets=[TopicPartition(topic, part, 2)], asynchronous=False)
    consumer.close()
    lags = monitor.update([(topic, 0), (topic, 1)])
    monitor.close()
    assert lags[(topic, part)] == high - 2
    sample = metrics.REGISTRY.get_sample_value("gplr_consumer_lag", {"topic": topic, "partition": str(part)})
    assert sample == high - 2


def test_make_config_isolates_tests(broker, tmp_path: Path, make_config) -> None:
    a, b = make_config(broker.bootstrap, tmp_path), make_config(broker.bootstrap, tmp_path)
    assert a.topic_prefix != b.topic_prefix and a.app_id != b.app_id
