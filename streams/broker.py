"""An embedded Kafka broker (noida-db) for the demo, the tests and benchmarks.

`EmbeddedBroker` runs `noida-db start --only kafka` on a loopback port as a child process in its
own session, waits until the admin API answers, and stops it by PID (SIGTERM, then SIGKILL).
It can be started again on the same port and data directory, which is how the tests restart the
broker under a running worker. `bootstrap_or_embedded(config)` uses `KAFKA_BOOTSTRAP` when set
and starts an embedded broker otherwise.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from importlib.resources import files
from pathlib import Path

from confluent_kafka.admin import AdminClient

__all__ = ["EmbeddedBroker", "BrokerError", "free_port", "noida_command", "wait_for_broker",
           "bootstrap_or_embedded"]

logger = logging.getLogger(__name__)


class BrokerError(RuntimeError):
    """The embedded broker could not be started or did not answer in time."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def noida_command() -> list[str]:
    """The noida-db executable: the packaged binary itself (so its PID is the server's),
    else the console script beside this interpreter or on PATH."""
    try:
        binary = files("noida_db").joinpath("noida-db")
        if binary.is_file():
            path = Path(str(binary))
            if not os.access(path, os.X_OK):
                path.chmod(0o755)
            return [str(path)]
    except (ModuleNotFoundError, OSError):
        pass
    for candidate in (Path(sys.executable).parent / "noida-db", shutil.which("noida-db")):
        if candidate and Path(candidate).is_file():
            return [str(candidate)]
    raise BrokerError("noida-db is not installed (pip install noida-db) and KAFKA_BOOTSTRAP is empty")


def wait_for_broker(bootstrap: str, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    """Block until the broker at `bootstrap` answers a metadata request (or raise BrokerError)."""
    deadline = time.monotonic() + timeout
    admin = AdminClient({"bootstrap.servers": bootstrap, "socket.timeout.ms": 2000, "log_level": 2})
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BrokerError(f"broker exited with status {proc.returncode}")
        try:
            meta = admin.list_topics(timeout=2.0)
            if meta.brokers:
                return
        except Exception as exc:  # KafkaException while the port is not yet open
            last = exc
        time.sleep(0.1)
    raise BrokerError(f"broker at {bootstrap} did not answer within {timeout:.0f}s ({last})")


class EmbeddedBroker:
    """One noida-db Kafka process on `host:port` storing its log under `data_dir`.

    >>> with EmbeddedBroker() as broker:  # doctest: +SKIP
    ...     print(broker.bootstrap)
    127.0.0.1:40123
    """

    def __init__(
        self,
        port: int | None = None,
        data_dir: str | Path | None = None,
        host: str = "127.0.0.1",
        fresh: bool = True,
        start_timeout: float = 30.0,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="gplr-broker-"))
        self.fresh = fresh
        self.start_timeout = start_timeout
        self.log_path = self.data_dir.with_name(self.data_dir.name + ".log")
        self._proc: subprocess.Popen | None = None
        self._started_once = False

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> EmbeddedBroker:
        """Start the broker (wiping the data dir on the first start when `fresh`) and wait for it."""
        if self.is_running():
            return self
        if self.fresh and not self._started_once and self.data_dir.exists():
            shutil.rmtree(self.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = noida_command() + [
            "start", "--only", "kafka", "--host", self.host,
            "--kafka-port", str(self.port), "--data-dir", str(self.data_dir),
        ]
        logger.info("starting embedded broker on %s (data %s)", self.bootstrap, self.data_dir)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._started_once = True
        atexit.register(self.stop)
        try:
            wait_for_broker(self.bootstrap, self.start_timeout, self._proc)
        except BrokerError as exc:
            self.stop()
            raise BrokerError(f"{exc}; log tail:\n{self.log_tail()}") from None
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the broker's process group, SIGKILL it if still alive after `timeout`."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        atexit.unregister(self.stop)
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("broker %d ignored SIGTERM; killing it", proc.pid)
                _signal_group(proc, signal.SIGKILL)
                proc.wait(5)
        logger.info("embedded broker on %s stopped", self.bootstrap)

    def kill(self) -> None:
        """SIGKILL at once (a crash, for the reliability tests); data dir and port are kept."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            _signal_group(proc, signal.SIGKILL)
            proc.wait(5)
        self.stop()

    def restart(self) -> EmbeddedBroker:
        """Stop and start again on the same port and data directory (data is kept)."""
        self.stop()
        return self.start()

    def cleanup(self) -> None:
        """Stop and delete the data directory if this object created it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.log_path.unlink(missing_ok=True)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Signal the broker's own process group (it runs in a session of its own)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


@contextlib.contextmanager
def bootstrap_or_embedded(config, fresh: bool = True) -> Iterator:
    """Yield `config` with `kafka_bootstrap` set: as given, or an embedded broker's address.

    The embedded broker stores its data under `config.broker_dir` and stops when the block ends.
    """
    if config.kafka_bootstrap:
        wait_for_broker(config.kafka_bootstrap, timeout=30.0)
        yield config
        return
    broker = EmbeddedBroker(data_dir=config.broker_dir, fresh=fresh)
    broker.start()
    try:
        yield replace(config, kafka_bootstrap=broker.bootstrap)
    finally:
        broker.stop()
