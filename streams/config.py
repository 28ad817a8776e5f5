"""Every stream setting, declared once and read from the environment in one place.

Commands, the Faust app and the tests all build a `StreamConfig` (`from_env()`, then
`dataclasses.replace` for variations), so a setting has exactly one name, one default, one check
and one doc line (`core.settings.setting`); the table in docs/operations.md is generated from these
declarations (`python -m streams.config_docs --write`). `faust_settings(config)` turns a config
into the keyword arguments of `faust.App`.

ε and hysteresis are scale-free, so one default serves shops whose scores differ by orders of
magnitude (on a sparse grocery catalogue the median Ψ entry was 0.0009, and the old absolute
ε = 0.01 and hysteresis 0.005 froze 73% of users on one persona set). ε: an item pushes when its
told value is off by more than ε/2 of its own mass (L1), which keeps every user's Ψ̂_raw within
(ε/2)·‖Ψ_raw‖₁ and its normalised persona distribution within ε (proof in `core.incremental`); it
costs about 2/ε value applications per purchase whatever the scores' scale (3.5 at ε = 0.2 on the
1,500-user synthetic shop, where the old absolute ε = 0.01 cost 1.8 but left users up to 48% off).
Hysteresis: a user is re-published whenever its persona set changes, or when a published
persona's share of the user's total score moves by more than this.

LLM settings (endpoint, model, key) are read by `core.labelers.openai_labeler.LLMConfig.from_env()`
when `GPLR_LABELER=openai` (`llm` is None otherwise: importing the client costs seconds on every
command); the key never appears in `repr` or logs of this object.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.settings import (
    PORT_RULE,
    ConfigError,
    check_all,
    check_settings,
    is_port,
    lower,
    names,
    read_env,
    setting,
    to_env,
)

__all__ = ["StreamConfig", "ConfigError", "LABELERS", "DECODERS", "faust_settings", "replace", "SESSION_TIMEOUT_S",
           "HEARTBEAT_INTERVAL_S", "REBALANCE_TIMEOUT_S"]

if TYPE_CHECKING:
    from core.gplr import Decoder, Sampling
    from core.personas import PersonaSet

logger = logging.getLogger(__name__)

LABELERS = ("embedding", "openai", "replay", "none")
DECODERS = ("model", "graph")
SAMPLINGS = ("random", "du")
_LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def _path(raw: str) -> Path:
    return Path(raw)


_NAME_CHARS = "may only hold letters, digits, '.', '_' and '-'"


def boolean(raw: str) -> bool:
    """`true`/`1`/`yes`/`on` or `false`/`0`/`no`/`off` (any case); anything else does not parse."""
    word = raw.strip().lower()
    if word not in ("true", "1", "yes", "on", "false", "0", "no", "off"):
        raise ValueError(raw)
    return word in ("true", "1", "yes", "on")


@dataclass(frozen=True)
class StreamConfig:
    """Typed, validated stream settings; build with `from_env()`, vary with `replace()`."""

    kafka_bootstrap: str = setting(
        "", "KAFKA_BOOTSTRAP", "`host:port[,host:port]`; unset → `gplr demo` starts an embedded broker, "
        "other commands refuse to run", check=lambda v: _valid_bootstrap(v), why="must be host:port[,host:port...]")
    topic_prefix: str = setting(
        "gplr.", "GPLR_TOPIC_PREFIX", "prefix of every topic name; a new prefix is a fresh, separate pipeline",
        check=lambda v: _valid_prefix(v), why=_NAME_CHARS)
    partitions: int = setting(
        4, "GPLR_PARTITIONS", "partitions of every topic: the most worker replicas that do work",
        parse=int, check=lambda v: v >= 1, why="must be >= 1")
    eps: float = setting(
        0.2, "GPLR_EPS", "relative error bound ε: ‖Ψ̂_raw[u] − Ψ_raw[u]‖₁ ≤ (ε/2)‖Ψ_raw[u]‖₁, so each user's "
        "persona distribution is within ε (L1)", parse=float, check=lambda v: 0.0 < v <= 1.0, why="must be in (0, 1]")
    hops: int = setting(1, "GPLR_HOPS", "ℓ̂, the number of (P P′) hops propagated",
                        parse=int, check=lambda v: v >= 1, why="must be >= 1")
    beta: float = setting(0.5, "GPLR_BETA", "de-bias exponent β of c_m = (min Q̂ / Q̂_m)^β",
                          parse=float, check=lambda v: v >= 0.0, why="must be >= 0")
    data_dir: Path = setting(
        Path(".gplr-data"), "GPLR_DATA_DIR",
        "local state: RocksDB tables (`faust/`), embedded broker data (`broker/`)", parse=_path)
    app_id: str = setting("gplr-stream", "GPLR_APP_ID",
                          "Faust app id = Kafka consumer group and prefix of the changelog topics",
                          check=lambda v: bool(v.strip()), why="must not be empty")
    worker_port: int = setting(6066, "GPLR_WORKER_PORT",
                               "Faust web port of a worker, bound to 127.0.0.1 (0 disables it)",
                               parse=int, check=is_port, why=PORT_RULE)
    metrics_port: int = setting(
        9108, "GPLR_METRICS_PORT", "Prometheus `/metrics` port (0 disables it); `deploy/prometheus.yml` "
        "scrapes this port", parse=int, check=is_port, why=PORT_RULE)
    personas_path: Path | None = setting(
        None, "GPLR_PERSONAS", "JSON persona set `[{\"name\", \"definition\"}, ...]`; unset → the synthetic "
        "shop's set (a warning says so at start)", parse=_path)
    labeler: str = setting(
        "embedding", "GPLR_LABELER", "`embedding` (local sentence model), `openai` (any OpenAI-compatible "
        "endpoint), `replay` or `none`", parse=lower, check=lambda v: v in LABELERS, why=f"must be one of {LABELERS}")
    replay_labels: Path | None = setting(
        None, "GPLR_REPLAY_LABELS", "CSV of recorded labels (`CustomerID`, `personas` joined by `\\|`) for "
        "`replay`", parse=_path)
    label_budget: float = setting(
        0.05, "GPLR_LABEL_BUDGET", "share of the users seen so far that may be labeled (per partition, "
        "rounded half up)", parse=float, check=lambda v: 0.0 <= v <= 1.0, why="must be in [0, 1]")
    label_rate_per_min: float = setting(
        60.0, "GPLR_LABEL_RATE_PER_MIN", "most labeler calls per minute per worker (0 = unlimited)",
        parse=float, check=lambda v: v >= 0, why="must be >= 0")
    label_min_purchases: int = setting(
        3, "GPLR_LABEL_MIN_PURCHASES", "distinct items a user needs before it can be a prototype",
        parse=int, check=lambda v: v >= 1, why="must be >= 1")
    label_exclude: Path | None = setting(
        None, "GPLR_LABEL_EXCLUDE", "file of user ids, one per line, never chosen as prototypes (a held-out "
        "set, as `bench/stream_quality.py` uses)", parse=_path,
        check=lambda v: v is None or v.is_file(), why="must name a file of user ids")
    sampling: Sampling = setting(
        "random", "GPLR_SAMPLING", "who is labeled: `random` (decided once per user, at the purchase that "
        "brings it to `GPLR_LABEL_MIN_PURCHASES` distinct items, with a seeded coin; the only reproducible "
        "choice, see \"Reproducibility\") or `du` "
        "(DU scores, decided when Ψ̂ moves; depends on timing)",
        parse=lower, check=lambda v: v in SAMPLINGS, why=f"must be one of {SAMPLINGS}")
    du_quantile: float = setting(
        0.8, "GPLR_DU_QUANTILE", "`du`: a candidate is labeled when its DU score is above this quantile of "
        "recent scores (`random` sampling does not use it: one seeded coin per user, below 2 × the budget "
        "× seen / users not held out)",
        parse=float, check=lambda v: 0.0 <= v <= 1.0, why="must be in [0, 1]")
    hysteresis: float = setting(
        0.02, "GPLR_HYSTERESIS", "a user is re-published when its persona set changes or a persona's share "
        "of its score moves by more than this", parse=float, check=lambda v: v >= 0.0, why="must be >= 0")
    top_k: int = setting(5, "GPLR_TOP_K", "personas per user", parse=int, check=lambda v: v >= 1, why="must be >= 1")
    decoder: Decoder = setting(
        "model", "GPLR_DECODER", "`model`: personas from the calibrated persona model (item-name channel + "
        "graph share, refitted on the stream's prototypes at label milestones, the same model as `gplr "
        "label`); `graph`: top-k of de-biased Ψ", parse=lower, check=lambda v: v in DECODERS,
        why=f"must be one of {DECODERS}")
    zero_shot: bool = setting(
        True, "GPLR_ZERO_SHOT", "`GPLR_DECODER=model`: refits also fit the label-free zero-shot channel "
        "(MiniLM votes of item names for the persona definitions, as `gplr label`; MiniLM in the worker: "
        "peak RSS 961 MB against 547 MB on the quick Online Retail replay); `false`: the model without it "
        "(`gplr label --no-zero-shot`)",
        parse=boolean, show=lambda v: str(v).lower())
    log_level: str = setting("info", "GPLR_LOG_LEVEL", "`critical`, `error`, `warning`, `info` or `debug`",
                             parse=lower, check=lambda v: v in _LOG_LEVELS, why=f"must be one of {_LOG_LEVELS}")
    llm: Any = field(default=None, repr=False, compare=False)
    # reliability (issue 9): who may label, and how /metrics is exposed
    label_sources: tuple[str, ...] = setting(
        (), "GPLR_LABEL_SOURCES", "comma-separated `labelled_by` names whose records on `labels` are applied, "
        "besides the worker's own labeler (see \"Reliability and delivery\")", parse=names, show=",".join,
        check=lambda v: all(0 < len(n) <= 64 for n in v), why="names must be 1-64 characters")
    metrics_bind: str = setting(
        "127.0.0.1", "GPLR_METRICS_BIND", "address `/metrics` listens on; the stack exposes it to "
        "Prometheus's container", check=lambda v: bool(v.strip()), why="must not be empty")
    metrics_max_connections: int = setting(
        8, "GPLR_METRICS_MAX_CONNECTIONS", "`/metrics` connections served at once (more are closed at once; "
        "idle ones are cut after 5 s)", parse=int, check=lambda v: 1 <= v <= 1024, why="must be in [1, 1024]")
    instance_id: str = setting(
        "", "GPLR_INSTANCE_ID", "static consumer-group member id of this worker; unset → derived from the data "
        "dir path (see \"Losing a worker's disk\")",
        check=lambda v: _valid_prefix(v) and len(v) <= 200, why=_NAME_CHARS + " (at most 200)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        object.__setattr__(self, "label_sources", names(self.label_sources))
        for name in ("personas_path", "replay_labels", "label_exclude"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        self.validate()

    # -- construction ------------------------------------------------------------------
    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> StreamConfig:
        """Read every declared variable; unset or blank ones keep their defaults."""
        env = os.environ if env is None else env
        values = read_env(cls, env)
        if values.get("labeler", cls.labeler) == "openai":
            values["llm"] = _llm_from_env(env)
        return cls(**values)

    def validate(self) -> None:
        """Raise `ConfigError` naming the variable of the first bad value."""
        check_settings(self)
        check_all([(self.labeler != "replay" or self.replay_labels is not None, "GPLR_REPLAY_LABELS",
                    self.replay_labels, "must name a CSV when GPLR_LABELER=replay")])

    # -- derived -----------------------------------------------------------------------
    @property
    def faust_dir(self) -> Path:
        """Where Faust keeps its RocksDB tables."""
        return self.data_dir / "faust"

    @property
    def broker_dir(self) -> Path:
        """Where the embedded broker keeps its log segments."""
        return self.data_dir / "broker"

    def personas(self) -> PersonaSet:
        """The persona set R: `GPLR_PERSONAS` if set, else the synthetic shop's set.

        The fallback is logged as a warning: it is right for `gplr demo` and the synthetic shop,
        but a worker on real purchases with the synthetic set would label every customer with
        personas that describe another shop, and nothing else would say so.
        """
        from core.personas import load_personas

        if self.personas_path is not None:
            if not self.personas_path.is_file():
                raise ConfigError(f"GPLR_PERSONAS={str(self.personas_path)!r}: no such file")
            return load_personas(self.personas_path)
        from core import synthetic

        personas = synthetic.default_personas()
        logger.warning("GPLR_PERSONAS is unset: using the synthetic shop's %d personas (%s); set it to a "
                       "JSON persona file for a real shop", len(personas), ", ".join(personas.names[:3]) + ", ...")
        return personas

    def as_env(self) -> dict[str, str]:
        """The variables that reproduce this config in a subprocess (LLM settings excluded)."""
        return to_env(self)

    def accepts_labels_from(self, labelled_by: str) -> bool:
        """Whether a `labels` record from `labelled_by` may be applied: the worker's own labeler
        (and then only for users it asked about) or a configured operator source."""
        return labelled_by in self.label_sources or (self.labeler != "none" and labelled_by == self.labeler)


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

    return LLMConfig.from_env(env)


#: Consumer-group timeouts, seconds. The session timeout is how long a worker may go without a
#: heartbeat before the broker drops it from the group; it was 6 s, so that a restarted worker
#: did not wait for its dead predecessor to expire, but every worker is a static member
#: (`streams.app.group_instance_id`): a restart takes over its own slot at once, whatever the
#: timeout. What a short one cost: a worker starved of CPU on a loaded host (load 8–12 on 2 cores;
#: a large recovery; a stop-the-world pause) missed it, the group rebalanced under it, and
#: rebalances in the middle of a restart or a recovery are where the worker stopped consuming
#: (docs/operations.md, "A restarted worker that stops consuming"). 30 s rides out such stalls; a
#: worker that really died leaves its partitions idle that long on a real Kafka (noida-db never
#: expels a static member). Heartbeats stay at 1 s (≤ a third of the session, cheap on a LAN).
SESSION_TIMEOUT_S = 30.0
HEARTBEAT_INTERVAL_S = 1.0
#: How long a rebalance waits for members to re-join (a loaded member re-joins late as well).
REBALANCE_TIMEOUT_S = 30.0
#: Client request timeout: above both (Faust refuses a session longer than it, and a JoinGroup
#: may be held for the whole rebalance timeout).
REQUEST_TIMEOUT_S = 40.0
#: Records one poll of the consumer decodes and hands over at most (aiokafka's `max_poll_records`;
#: Faust leaves it unbounded, so a poll decoded all of a fetch response at once, and the embedded
#: broker answers a fetch with a whole partition: a worker recovering a full Instacart-scale
#: history peaked at 3.6-4.7 GB). With 1,000 and lz4 changelog batches (`streams.backfill`):
#: 2.4 GB (docs/RESULTS.md §9b). An agent's batch takes up to 1,000 messages as well.
MAX_POLL_RECORDS = 1000


def faust_settings(config: StreamConfig) -> dict[str, Any]:
    """Keyword arguments of `faust.App(config.app_id, **faust_settings(config))`.

    Group timeouts (`SESSION_TIMEOUT_S`, `REBALANCE_TIMEOUT_S`): see there. Offsets start at the
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
        "broker_session_timeout": SESSION_TIMEOUT_S,
        "broker_heartbeat_interval": HEARTBEAT_INTERVAL_S,
        "broker_rebalance_timeout": REBALANCE_TIMEOUT_S,
        "broker_request_timeout": REQUEST_TIMEOUT_S,
        "broker_commit_interval": 1.0,
        "broker_max_poll_records": MAX_POLL_RECORDS,
        "web_enabled": config.worker_port > 0,
        "web_port": config.worker_port or 6066,
        "web_bind": "127.0.0.1",
        "web_host": "127.0.0.1",
        "table_standby_replicas": 0,
        "producer_linger": 0.005,
        "stream_wait_empty": False,
        "worker_redirect_stdouts": False,
    }
