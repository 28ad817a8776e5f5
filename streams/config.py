r"""Every stream setting, read from the environment in one place and validated once.

Commands, the Faust app and the tests all build a `StreamConfig` (`from_env()`, then
`dataclasses.replace` for variations), so a setting has exactly one name, one default and one
check. `faust_settings(config)` turns it into the keyword arguments of `faust.App`.

| variable | default | meaning |
|---|---|---|
| `KAFKA_BOOTSTRAP` | "" | `host:port[,host:port]`; empty → commands that can start the embedded broker do |
| `GPLR_TOPIC_PREFIX` | `gplr.` | prefix of every topic name |
| `GPLR_PARTITIONS` | 4 | partitions of every topic (and so the parallelism ceiling) |
| `GPLR_EPS` | 0.2 | relative error bound ε: each user's persona distribution within ε (L1) of exact (see below) |
| `GPLR_HOPS` | 1 | ℓ̂, the number of (P P') hops propagated |
| `GPLR_BETA` | 0.5 | de-bias exponent β of c_m = (min Q̂ / Q̂_m)^β |
| `GPLR_DATA_DIR` | `.gplr-data` | RocksDB tables (`faust/`) and embedded broker data (`broker/`) |
| `GPLR_APP_ID` | `gplr-stream` | Faust app id = consumer group and changelog topic prefix |
| `GPLR_WORKER_PORT` | 6066 | Faust web port of the worker (0 disables the web server) |
| `GPLR_METRICS_PORT` | 9108 | Prometheus `/metrics` port (0 disables it) |
| `GPLR_PERSONAS` | (synthetic shop's set) | JSON persona set `[{"name", "definition"}, ...]` |
| `GPLR_LABELER` | `embedding` | `embedding`, `openai`, `replay` or `none` |
| `GPLR_REPLAY_LABELS` | (none) | CSV of recorded labels (`CustomerID`, `personas` joined by `\|`) for `replay` |
| `GPLR_LABEL_BUDGET` | 0.05 | share of users (seen so far) the labeler may label (per partition, rounded half up) |
| `GPLR_LABEL_RATE_PER_MIN` | 60 | most label calls per minute (0 = unlimited) |
| `GPLR_LABEL_MIN_PURCHASES` | 3 | a user needs this many distinct items before being a prototype candidate |
| `GPLR_LABEL_EXCLUDE` | (none) | file of user ids (one per line) never chosen as prototypes (e.g. a held-out set) |
| `GPLR_DU_QUANTILE` | 0.8 | a candidate is labelled when its DU score is above this quantile of recent scores |
| `GPLR_HYSTERESIS` | 0.02 | re-publish a user when its persona set changes or a share moves by more than this |
| `GPLR_TOP_K` | 5 | most personas per user |
| `GPLR_DECODER` | `model` | `model`: the calibrated persona model refitted on the stream's prototypes (as `gplr label`); `graph`: top-k of Ψ (the paper) |
| `GPLR_LOG_LEVEL` | `info` | worker log level |
| `GPLR_LABEL_SOURCES` | "" | comma-separated `labelled_by` names whose records on `labels` are applied besides the worker's own labeler (operator tools; docs/operations.md) |
| `GPLR_METRICS_BIND` | `127.0.0.1` | address the `/metrics` server listens on (`0.0.0.0` to expose it) |
| `GPLR_METRICS_MAX_CONNECTIONS` | 8 | `/metrics` connections served at once; more are closed at once |
| `GPLR_INSTANCE_ID` | "" | static consumer-group member id; empty → derived from the data dir (`streams.app.group_instance_id`) |

Both are scale-free, so one default serves shops whose scores differ by orders of magnitude (on
a sparse grocery catalogue the median Ψ entry was 0.0009, and the old absolute ε = 0.01 and
hysteresis 0.005 froze 73% of users on one persona set). ε: an item pushes when its told value
is off by more than ε/2 of its own mass (L1), which keeps every user's Ψ̂_raw within (ε/2)·‖Ψ_raw‖₁
and its normalised persona distribution within ε (proof in `core.incremental`); it costs about
2/ε value applications per purchase whatever the scores' scale (3.5 at ε = 0.2 on the 1,500-user
synthetic shop, where the old absolute ε = 0.01 cost 1.8 but left users up to 48% off).
Hysteresis: a user is re-published whenever its persona set changes, or when a published
persona's share of the user's total score moves by more than this.

LLM settings (endpoint, model, key) are read by `core.labelers.openai_labeler.LLMConfig.from_env()`
when `GPLR_LABELER=openai` (`llm` is None otherwise: importing the client costs seconds on every
command); the key never appears in `repr` or logs of this object.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from core.settings import ConfigError, EnvReader, check_all

__all__ = ["StreamConfig", "ConfigError", "LABELERS", "DECODERS", "faust_settings", "replace"]

logger = logging.getLogger(__name__)

LABELERS = ("embedding", "openai", "replay", "none")
DECODERS = ("model", "graph")
SAMPLINGS = ("random", "du")
_LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


@dataclass(frozen=True)
class StreamConfig:
    """Typed, validated stream settings; build with `from_env()`, vary with `replace()`."""

    kafka_bootstrap: str = ""
    topic_prefix: str = "gplr."
    partitions: int = 4
    eps: float = 0.2
    hops: int = 1
    beta: float = 0.5
    data_dir: Path = Path(".gplr-data")
    app_id: str = "gplr-stream"
    worker_port: int = 6066
    metrics_port: int = 9108
    personas_path: Path | None = None
    labeler: str = "embedding"
    replay_labels: Path | None = None
    label_budget: float = 0.05
    label_rate_per_min: float = 60.0
    label_min_purchases: int = 3
    label_exclude: Path | None = None
    du_quantile: float = 0.8
    sampling: str = "random"  # who is labelled: "random" (reproducible) or "du" (streams.labelling)
    hysteresis: float = 0.02
    top_k: int = 5
    decoder: str = "model"
    log_level: str = "info"
    llm: Any = field(default=None, repr=False, compare=False)
    # reliability (issue 9): who may label, and how /metrics is exposed
    label_sources: tuple[str, ...] = ()
    metrics_bind: str = "127.0.0.1"
    metrics_max_connections: int = 8
    instance_id: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        object.__setattr__(self, "label_sources", _names(self.label_sources))
        for name in ("personas_path", "replay_labels", "label_exclude"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        self.validate()

    # -- construction ------------------------------------------------------------------
    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "StreamConfig":
        """Read every `GPLR_*` / `KAFKA_BOOTSTRAP` variable; unset ones keep the defaults above."""
        env = os.environ if env is None else env
        d = cls()  # the defaults, validated

        get = EnvReader(env).read
        personas = env.get("GPLR_PERSONAS", "").strip()
        replay = env.get("GPLR_REPLAY_LABELS", "").strip()
        exclude = env.get("GPLR_LABEL_EXCLUDE", "").strip()
        return cls(
            kafka_bootstrap=env.get("KAFKA_BOOTSTRAP", "").strip(),
            topic_prefix=env.get("GPLR_TOPIC_PREFIX", d.topic_prefix),
            partitions=get("GPLR_PARTITIONS", d.partitions, int),
            eps=get("GPLR_EPS", d.eps, float),
            hops=get("GPLR_HOPS", d.hops, int),
            beta=get("GPLR_BETA", d.beta, float),
            data_dir=get("GPLR_DATA_DIR", d.data_dir, Path),
            app_id=get("GPLR_APP_ID", d.app_id, str),
            worker_port=get("GPLR_WORKER_PORT", d.worker_port, int),
            metrics_port=get("GPLR_METRICS_PORT", d.metrics_port, int),
            personas_path=Path(personas) if personas else None,
            labeler=get("GPLR_LABELER", d.labeler, str).lower(),
            replay_labels=Path(replay) if replay else None,
            label_budget=get("GPLR_LABEL_BUDGET", d.label_budget, float),
            label_rate_per_min=get("GPLR_LABEL_RATE_PER_MIN", d.label_rate_per_min, float),
            label_min_purchases=get("GPLR_LABEL_MIN_PURCHASES", d.label_min_purchases, int),
            label_exclude=Path(exclude) if exclude else None,
            du_quantile=get("GPLR_DU_QUANTILE", d.du_quantile, float),
            sampling=get("GPLR_SAMPLING", d.sampling, str).lower(),
            hysteresis=get("GPLR_HYSTERESIS", d.hysteresis, float),
            top_k=get("GPLR_TOP_K", d.top_k, int),
            decoder=get("GPLR_DECODER", d.decoder, str).lower(),
            log_level=get("GPLR_LOG_LEVEL", d.log_level, str).lower(),
            llm=_llm_from_env(env) if get("GPLR_LABELER", d.labeler, str).lower() == "openai" else None,
            label_sources=_names(env.get("GPLR_LABEL_SOURCES", "")),
            metrics_bind=get("GPLR_METRICS_BIND", d.metrics_bind, str),
            metrics_max_connections=get("GPLR_METRICS_MAX_CONNECTIONS", d.metrics_max_connections, int),
            instance_id=env.get("GPLR_INSTANCE_ID", "").strip(),
        )

    def validate(self) -> None:
        """Raise `ConfigError` naming the variable of the first bad value."""
        checks: list[tuple[bool, str, Any, str]] = [
            (self.partitions >= 1, "GPLR_PARTITIONS", self.partitions, "must be >= 1"),
            (0.0 < self.eps <= 1.0, "GPLR_EPS", self.eps, "must be in (0, 1]"),
            (self.hops >= 1, "GPLR_HOPS", self.hops, "must be >= 1"),
            (self.beta >= 0.0, "GPLR_BETA", self.beta, "must be >= 0"),
            (0 <= self.worker_port <= 65535, "GPLR_WORKER_PORT", self.worker_port, "must be a port"),
            (0 <= self.metrics_port <= 65535, "GPLR_METRICS_PORT", self.metrics_port, "must be a port"),
            (self.labeler in LABELERS, "GPLR_LABELER", self.labeler, f"must be one of {LABELERS}"),
            (self.labeler != "replay" or self.replay_labels is not None, "GPLR_REPLAY_LABELS",
             self.replay_labels, "must name a CSV when GPLR_LABELER=replay"),
            (0.0 <= self.label_budget <= 1.0, "GPLR_LABEL_BUDGET", self.label_budget, "must be in [0, 1]"),
            (self.label_rate_per_min >= 0, "GPLR_LABEL_RATE_PER_MIN", self.label_rate_per_min, "must be >= 0"),
            (self.label_min_purchases >= 1, "GPLR_LABEL_MIN_PURCHASES", self.label_min_purchases, "must be >= 1"),
            (self.label_exclude is None or self.label_exclude.is_file(), "GPLR_LABEL_EXCLUDE",
             self.label_exclude, "must name a file of user ids"),
            (0.0 <= self.du_quantile <= 1.0, "GPLR_DU_QUANTILE", self.du_quantile, "must be in [0, 1]"),
            (self.hysteresis >= 0.0, "GPLR_HYSTERESIS", self.hysteresis, "must be >= 0"),
            (self.top_k >= 1, "GPLR_TOP_K", self.top_k, "must be >= 1"),
            (self.sampling in SAMPLINGS, "GPLR_SAMPLING", self.sampling, f"must be one of {SAMPLINGS}"),
            (self.decoder in DECODERS, "GPLR_DECODER", self.decoder, f"must be one of {DECODERS}"),
            (bool(self.app_id.strip()), "GPLR_APP_ID", self.app_id, "must not be empty"),
            (self.log_level in _LOG_LEVELS, "GPLR_LOG_LEVEL", self.log_level, f"must be one of {_LOG_LEVELS}"),
            (_valid_prefix(self.topic_prefix), "GPLR_TOPIC_PREFIX", self.topic_prefix,
             "may only hold letters, digits, '.', '_' and '-'"),
            (_valid_bootstrap(self.kafka_bootstrap), "KAFKA_BOOTSTRAP", self.kafka_bootstrap,
             "must be host:port[,host:port...]"),
            (all(0 < len(n) <= 64 for n in self.label_sources), "GPLR_LABEL_SOURCES", self.label_sources,
             "names must be 1-64 characters"),
            (bool(self.metrics_bind.strip()), "GPLR_METRICS_BIND", self.metrics_bind, "must not be empty"),
            (1 <= self.metrics_max_connections <= 1024, "GPLR_METRICS_MAX_CONNECTIONS",
             self.metrics_max_connections, "must be in [1, 1024]"),
            (_valid_prefix(self.instance_id) and len(self.instance_id) <= 200, "GPLR_INSTANCE_ID",
             self.instance_id, "may only hold letters, digits, '.', '_' and '-' (at most 200)"),
        ]
        check_all(checks)

    # -- derived -----------------------------------------------------------------------
    @property
    def faust_dir(self) -> Path:
        """Where Faust keeps its RocksDB tables."""
        return self.data_dir / "faust"

    @property
    def broker_dir(self) -> Path:
        """Where the embedded broker keeps its log segments."""
        return self.data_dir / "broker"

    def personas(self):  # -> PersonaSet (imported lazily: core.synthetic is optional at import)
        """The persona set R: `GPLR_PERSONAS` if set, else the synthetic shop's set."""
        from core.personas import load_personas

        if self.personas_path is not None:
            if not self.personas_path.is_file():
                raise ConfigError(f"GPLR_PERSONAS={str(self.personas_path)!r}: no such file")
            return load_personas(self.personas_path)
        from core import synthetic

        return synthetic.default_personas()

    def as_env(self) -> dict[str, str]:
        """The variables that reproduce this config in a subprocess (LLM settings excluded)."""
        names = {
            "kafka_bootstrap": "KAFKA_BOOTSTRAP", "topic_prefix": "GPLR_TOPIC_PREFIX",
            "partitions": "GPLR_PARTITIONS", "eps": "GPLR_EPS", "hops": "GPLR_HOPS",
            "beta": "GPLR_BETA", "data_dir": "GPLR_DATA_DIR", "app_id": "GPLR_APP_ID",
            "worker_port": "GPLR_WORKER_PORT", "metrics_port": "GPLR_METRICS_PORT",
            "personas_path": "GPLR_PERSONAS", "labeler": "GPLR_LABELER",
            "replay_labels": "GPLR_REPLAY_LABELS",
            "label_budget": "GPLR_LABEL_BUDGET", "label_rate_per_min": "GPLR_LABEL_RATE_PER_MIN",
            "label_min_purchases": "GPLR_LABEL_MIN_PURCHASES", "du_quantile": "GPLR_DU_QUANTILE", "sampling": "GPLR_SAMPLING",
            "label_exclude": "GPLR_LABEL_EXCLUDE",
            "hysteresis": "GPLR_HYSTERESIS", "top_k": "GPLR_TOP_K", "log_level": "GPLR_LOG_LEVEL",
            "metrics_bind": "GPLR_METRICS_BIND", "metrics_max_connections": "GPLR_METRICS_MAX_CONNECTIONS",
            "instance_id": "GPLR_INSTANCE_ID",
            "decoder": "GPLR_DECODER",
        }
        out = {"GPLR_LABEL_SOURCES": ",".join(self.label_sources)}
        for f in fields(self):
            if f.name in names:
                value = getattr(self, f.name)
                out[names[f.name]] = "" if value is None else str(value)
        return out

    def accepts_labels_from(self, labelled_by: str) -> bool:
        """Whether a `labels` record from `labelled_by` may be applied: the worker's own labeler
        (and then only for users it asked about) or a configured operator source."""
        return labelled_by in self.label_sources or (self.labeler != "none" and labelled_by == self.labeler)


def _names(value: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """A comma-separated list (or a sequence) of names, stripped, blanks and repeats dropped."""
    parts = value.split(",") if isinstance(value, str) else value
    return tuple(dict.fromkeys(p.strip() for p in parts if p.strip()))


def _valid_prefix(prefix: str) -> bool:
    return all(c.isalnum() or c in "._-" for c in prefix)


def _valid_bootstrap(bootstrap: str) -> bool:
    if not bootstrap:
        return True
    for server in bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) <= 65535:
            return False
    return True


def _llm_from_env(env: Mapping[str, str]) -> Any:
    """The labelers package's `LLMConfig.from_env` (imported here: it pulls in the openai client)."""
    from core.labelers.openai_labeler import LLMConfig

    try:
        return LLMConfig.from_env(env)
    except ValueError as exc:
        raise ConfigError(f"LLM settings: {exc}") from None


def faust_settings(config: StreamConfig) -> dict[str, Any]:
    """Keyword arguments of `faust.App(config.app_id, **faust_settings(config))`.

    The session timeout is short because a local broker answers fast: with Faust's 60 s default a
    restarted worker waits that long for its old group member to expire. Offsets start at the
    earliest record so a fresh worker replays purchases already in the topic.
    """
    if not config.kafka_bootstrap:
        raise ConfigError("KAFKA_BOOTSTRAP is empty: start a broker (bootstrap_or_embedded) first")
    brokers = [f"kafka://{s.strip()}" for s in config.kafka_bootstrap.split(",")]
    return {
        "broker": brokers,
        "store": "rocksdb://",
        "datadir": str(config.faust_dir),
        "topic_partitions": config.partitions,
        "topic_replication_factor": 1,
        "topic_allow_declare": True,
        "consumer_auto_offset_reset": "earliest",
        "broker_session_timeout": 6.0,
        "broker_heartbeat_interval": 1.0,
        "broker_rebalance_timeout": 6.0,
        "broker_request_timeout": 30.0,
        "broker_commit_interval": 1.0,
        "web_enabled": config.worker_port > 0,
        "web_port": config.worker_port or 6066,
        "web_bind": "127.0.0.1",
        "web_host": "127.0.0.1",
        "table_standby_replicas": 0,
        "producer_linger": 0.005,
        "stream_wait_empty": False,
        "worker_redirect_stdouts": False,
    }
