"""Every use of a private attribute of faust, mode or aiokafka, fenced in one module.

The stream needs these things the libraries do not offer publicly:

- **Fetch pacing** (aiokafka `Fetcher._proc_fetch_request`). Kafka long-polls an empty fetch (the
  broker holds it up to `fetch_max_wait_ms`), but the embedded broker (noida-db 0.2.3) answers at
  once, and aiokafka's fetcher then sends the next fetch immediately: an idle consumer spins at
  ~85% of a core (measured), and a busy worker spends a large share of its CPU on empty fetches of
  quiet partitions. Making every fetch cycle that woke nobody last at least `min_cycle_s` bounds
  that to a few dozen requests per second, at the cost of at most `min_cycle_s` extra latency
  when data arrives during the pause. The method returns aiokafka's `needs_wakeup`: True when the
  response buffered records *or* an error for the consumer to raise; neither is delayed. It is
  installed only when the bootstrap names the embedded broker (loopback addresses only): an
  external Kafka long-polls and is left alone.
- **The current event** (`faust.streams._current_event`): a table files each write under the
  partition of the event being processed; a batch from `stream.take_events` is processed outside
  `async for`, so the agent sets it itself (`current_event`).
- **The producer buffer** (`app.producer.buffer.max_messages`): Faust's default of 100 queued
  changelog records makes a batch's writes flush one by one (`widen_producer_buffer`).
- **Changelog acknowledgements** (`faust.tables.base.Collection.send_changelog`). A table write
  queues its changelog record in Faust's producer buffer, and Faust flushes that buffer before it
  commits offsets — but `ProducerBuffer.flush` returns as soon as one record takes over 0.1 s to
  leave the buffer (an event loop busy with a batch is enough), and a record being handed to the
  client is in neither the buffer nor the client's queue. So offsets could be committed while
  the rows they produced had not reached the changelog: after a kill -9 a worker rebuilt from
  the changelogs missed them, and Faust's restart recovery could even roll the local row back to
  an older changelog record (the cause of the rare wrong scores and counts after kill -9, issue 9).
  `track_changelog_sends` keeps each record's future, and `changelog_written` waits until all are
  acknowledged; the agents call it before a batch is acked.

- **Batch compression level** (`gzip_encode` of aiokafka's batch builders). aiokafka compresses
  gzip batches at zlib level 9 (`aiokafka.codec.gzip_encode`'s default, with no setting): on the
  stream's pickled rows ~8 MB/s of CPU, a quarter of a busy worker's time in the changelog writes
  (py-spy, bench/scale.py live phase). `fast_gzip` makes it level 1: ~100 MB/s, batches ~10%
  larger (3.0× instead of 3.3× on user rows).

- **Committed-offset bookkeeping** (`faust.transport.consumer.Consumer._commit_offsets`). Faust
  0.15.3 records the offsets of a commit as committed even when the broker refused it
  (`did_commit` False: an `UnknownMemberIdError` while the group rebalances, which a worker that
  missed its session timeout on a loaded host always meets). Its consumer then holds back every
  later ack below that offset and skips every commit up to it (`Consumer.ack`, `_should_commit`),
  so a partition the group never committed before stays uncommitted for good after the rebalance
  (its lag never falls: `perform_seek` resets the bookkeeping only for partitions with a broker
  commit). `commit_only_on_success` advances it only for a commit the broker accepted — the fix
  faust-streaming merged upstream (PR 692); real Kafka and the embedded broker alike.

- **Records fetched but never delivered** (`faust.transport.consumer.Consumer._new_offset`). A
  restarted worker sometimes acks offsets N+k.. of a partition while N..N+k-1 (one fetched
  batch) never reached the agent (see the next hook for the likely path; `Consumer.getmany`
  itself dropped none of them, instrumented). Faust then either never commits that partition again (k ≥ 2: the lag stays
  flat for good, the "stall" of the lost-disk test) or commits past the missing record (k = 1: a
  purchase silently lost). Each agent acks its partition in offset order, so acked offsets above
  a missing head are proof of a drop. `rewind_dropped_heads` holds that commit back and seeks
  the partition to its committed offset once: the missing records are fetched again and the ones
  after them replayed, as after a kill -9 (the stream is idempotent; `streams.agents`).

- **Deliveries held until the seek** (`faust.tables.recovery.Recovery._resume_streams` and
  `on_recovery_completed`). Those resume the stream partitions, seek them to the committed
  offsets, then resume the app's flow control, which clears the stream queues. Records fetched
  between the first and the last step are delivered, cleared and marked read — the likely source
  of the drops above. `hold_deliveries_until_seek` suspends the flow control first, so such a
  record waits at the queue's door until the seek is done and is then delivered, not cleared.

`check_hooks()` verifies at start-up that each hook still has the shape this module was written
against (aiokafka 0.14, faust-streaming 0.15) and raises `CompatError` naming what changed.
"""
from __future__ import annotations

import asyncio
import contextvars
import inspect
import ipaddress
import logging
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from aiokafka import codec
from aiokafka.consumer.fetcher import Fetcher
from aiokafka.record import default_records

try:  # the Cython batch builder producers use when aiokafka's extensions are built
    from aiokafka.record._crecords import default_records as _c_default_records
except ImportError:  # pragma: no cover - pure-Python aiokafka
    _c_default_records = None
from faust.tables.base import Collection
from faust.tables.recovery import Recovery
from faust.transport.consumer import Consumer

__all__ = ["CompatError", "check_hooks", "install_fetch_pacing", "configure_fetch_pacing", "is_embedded_bootstrap",
           "current_event", "widen_producer_buffer", "track_changelog_sends", "changelog_written",
           "DEFAULT_MIN_CYCLE_S", "fast_gzip", "GZIP_LEVEL", "commit_only_on_success", "rewind_dropped_heads",
           "hold_deliveries_until_seek"]

logger = logging.getLogger(__name__)

DEFAULT_MIN_CYCLE_S = 0.01
#: The parameters of `Fetcher._proc_fetch_request` the pacing wrapper forwards.
FETCH_PARAMETERS = ("self", "assignment", "node_id", "request")
_ORIGINAL = Fetcher._proc_fetch_request


#: zlib level of the batches aiokafka producers compress (`fast_gzip`).
GZIP_LEVEL = 1

_ORIGINAL_SEND_CHANGELOG = Collection.send_changelog
SEND_CHANGELOG_PARAMETERS = ("self", "partition", "key", "value", "key_serializer", "value_serializer")
_UNACKED: list[Any] = []  # changelog records' futures not yet awaited (`changelog_written`)

_ORIGINAL_COMMIT_OFFSETS = Consumer._commit_offsets
COMMIT_OFFSETS_PARAMETERS = ("self", "offsets", "start_new_transaction")

_ORIGINAL_NEW_OFFSET = Consumer._new_offset
_ORIGINAL_RESUMES = {name: getattr(Recovery, name) for name in ("_resume_streams", "on_recovery_completed")}
RESUME_PARAMETERS = ("self", "generation_id")
NEW_OFFSET_PARAMETERS = ("self", "tp")


class CompatError(RuntimeError):
    """An installed faust/mode/aiokafka no longer has the private hook this project relies on."""


def _check_parameters(method: Any, expected: tuple[str, ...], name: str, feature: str) -> None:
    """Raise CompatError naming `name` and the hook (`feature`) when its parameters changed."""
    params = tuple(inspect.signature(method).parameters)
    if params != expected:
        raise CompatError(f"{name}{params} differs from {expected}: {feature} (streams/_compat.py) needs updating")


def check_hooks() -> None:
    """Raise CompatError unless every private hook has the expected shape."""
    method = _ORIGINAL
    if not inspect.iscoroutinefunction(method):
        raise CompatError("aiokafka Fetcher._proc_fetch_request is no longer a coroutine function: "
                          "fetch pacing (streams/_compat.py) needs updating")
    _check_parameters(method, FETCH_PARAMETERS, "aiokafka Fetcher._proc_fetch_request", "fetch pacing")
    import faust.streams

    if not isinstance(getattr(faust.streams, "_current_event", None), contextvars.ContextVar):
        raise CompatError("faust.streams._current_event is gone or not a ContextVar: "
                          "batch table writes (streams/_compat.py current_event) need updating")
    _check_parameters(_ORIGINAL_SEND_CHANGELOG, SEND_CHANGELOG_PARAMETERS, "faust Collection.send_changelog",
                      "changelog acknowledgements")
    _check_parameters(_ORIGINAL_COMMIT_OFFSETS, COMMIT_OFFSETS_PARAMETERS, "faust Consumer._commit_offsets",
                      "committed-offset bookkeeping")
    for name in ("_committed_offset", "_commit"):
        if name not in Consumer.__annotations__ and not hasattr(Consumer, name):
            raise CompatError(f"faust Consumer.{name} is gone: the committed-offset bookkeeping "
                              "(streams/_compat.py commit_only_on_success) needs updating")
    _check_parameters(_ORIGINAL_NEW_OFFSET, NEW_OFFSET_PARAMETERS, "faust Consumer._new_offset",
                      "dropped-record rewinds")
    for name, method in _ORIGINAL_RESUMES.items():
        _check_parameters(method, RESUME_PARAMETERS, f"faust Recovery.{name}", "deliveries held until the seek")
    for name in ("_acked", "_gap", "seek"):
        if name not in Consumer.__annotations__ and not hasattr(Consumer, name):
            raise CompatError(f"faust Consumer.{name} is gone: the dropped-record rewinds "
                              "(streams/_compat.py rewind_dropped_heads) needs updating")
    if not callable(getattr(default_records, "gzip_encode", None)):
        raise CompatError("aiokafka.record.default_records.gzip_encode is gone: the batch compression "
                          "level (streams/_compat.py fast_gzip) needs updating")


def fast_gzip(level: int = GZIP_LEVEL) -> None:
    """Compress aiokafka's gzip batches at `level` instead of 9 (process-wide, idempotent)."""
    check_hooks()

    def gzip_encode(payload: Any, compresslevel: int | None = None) -> bytes:
        return codec.gzip_encode(payload, compresslevel or level)

    for module in (default_records, _c_default_records):
        if module is not None:
            module.gzip_encode = gzip_encode


def is_embedded_bootstrap(bootstrap: str) -> bool:
    """True when every `host:port` of `bootstrap` is a loopback address (where the embedded
    broker listens); a named or remote host is taken to be a real Kafka."""
    hosts = [part.strip().rsplit(":", 1)[0].strip("[]") for part in bootstrap.split(",") if part.strip()]
    if not hosts:
        return False
    for host in hosts:
        if host == "localhost":
            continue
        try:
            if not ipaddress.ip_address(host).is_loopback:
                return False
        except ValueError:
            return False
    return True


def install_fetch_pacing(min_cycle_s: float = DEFAULT_MIN_CYCLE_S) -> None:
    """Patch `aiokafka.consumer.fetcher.Fetcher` process-wide (idempotent; 0 restores it)."""
    check_hooks()
    if min_cycle_s <= 0:
        Fetcher._proc_fetch_request = _ORIGINAL
        return

    async def _paced(self: Any, assignment: Any, node_id: int, request: Any) -> bool:
        loop = asyncio.get_running_loop()
        start = loop.time()
        woke = await _ORIGINAL(self, assignment, node_id, request)
        if not woke:
            rest = min_cycle_s - (loop.time() - start)
            if rest > 0:
                try:
                    await asyncio.sleep(rest)
                except asyncio.CancelledError:  # closing or unassigned: as the original does
                    return False
        return bool(woke)

    _paced.min_cycle_s = min_cycle_s  # type: ignore[attr-defined]
    Fetcher._proc_fetch_request = _paced
    logger.debug("aiokafka empty fetches paced to >= %.3fs", min_cycle_s)


def configure_fetch_pacing(bootstrap: str, min_cycle_s: float = DEFAULT_MIN_CYCLE_S) -> bool:
    """Pace fetches for the embedded broker, restore aiokafka's own loop otherwise; returns
    whether pacing is on."""
    embedded = is_embedded_bootstrap(bootstrap)
    install_fetch_pacing(min_cycle_s if embedded else 0)
    return embedded


@contextmanager
def current_event(event: Any) -> Iterator[None]:
    """Make `event` Faust's current event for the block (no public setter in faust-streaming 0.15)."""
    from faust.streams import _current_event

    token = _current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _current_event.reset(token)


def widen_producer_buffer(app: Any, max_messages: int) -> None:
    """Let Faust's producer queue `max_messages` changelog records before it flushes them one
    by one (its default is 100)."""
    buffer = getattr(app.producer, "buffer", None)
    if buffer is None or not hasattr(buffer, "max_messages"):
        raise CompatError("faust producer has no buffer.max_messages: streams/_compat.py needs updating")
    buffer.max_messages = max_messages


def track_changelog_sends() -> None:
    """Keep the future of every changelog record a table write queues (idempotent)."""
    check_hooks()
    if getattr(Collection.send_changelog, "tracked", False):
        return

    def send_changelog(self: Any, *args: Any, **kwargs: Any) -> Any:
        fut = _ORIGINAL_SEND_CHANGELOG(self, *args, **kwargs)
        _UNACKED.append(fut)
        return fut

    send_changelog.tracked = True  # type: ignore[attr-defined]
    Collection.send_changelog = send_changelog  # type: ignore[method-assign]


async def changelog_written() -> None:
    """Wait until the broker acknowledged every changelog record queued so far (raises the send
    error of one that failed). Call before a batch is acked, so its offsets are committed only
    after the rows it wrote are in the changelogs."""
    while _UNACKED:
        futs = _UNACKED[:]
        del _UNACKED[:len(futs)]
        await asyncio.gather(*futs)


async def _commit_offsets(self: Any, offsets: Any, start_new_transaction: bool = True) -> bool:
    """faust 0.15.3's `Consumer._commit_offsets` (its debug log table and flight recorder left
    out), with the bookkeeping of a commit moved under `did_commit` (`commit_only_on_success`)."""
    assignment = self.assignment()
    committable = {tp: offset for tp, offset in offsets.items() if tp in assignment}
    revoked = {tp: offset for tp, offset in offsets.items() if tp not in assignment}
    if revoked:
        self.log.info("Discarded commit for revoked partitions that will be eventually processed again: %r",
                      revoked)
    if not committable:
        return False
    if self.in_transaction:
        did_commit = await self.transactions.commit(committable, start_new_transaction=start_new_transaction)
    else:
        await self.app.producer.flush()
        did_commit = await self._commit(committable)
    if did_commit:
        self.app.tables.on_commit(committable)
        self._committed_offset.update(committable)
        self.app.monitor.on_tp_commit(committable)
    return bool(did_commit)


def commit_only_on_success() -> None:
    """Make faust record offsets as committed only when the broker accepted the commit
    (process-wide, idempotent)."""
    check_hooks()
    Consumer._commit_offsets = _commit_offsets  # type: ignore[method-assign]


def dropped_head(consumer: Any, tp: Any) -> tuple[int, int] | None:
    """(committed, first done) when the offsets `tp` has done — acked, or in a gap faust recorded
    (a jump between two delivered offsets, which faust takes for compaction) — start above its
    committed offset: records fetched and never processed. Else None."""
    acked, committed = consumer._acked[tp], consumer._committed_offset[tp]
    if not acked or committed is None:
        return None
    head = min(acked)
    gaps = consumer._gap[tp]
    if gaps:
        head = min(head, min(interval.begin for interval in gaps))
    return (committed, head) if head > committed else None


#: Seconds a rewound partition waits for its missing head before faust's own rule applies again
#: (records that truly no longer exist, e.g. compacted away, must not hold its commits forever).
REWIND_PATIENCE_S = 60.0
_PENDING: set[Any] = set()  # rewind tasks in flight (a reference, so they are not collected)


def _new_offset(self: Any, tp: Any) -> int | None:
    """faust's `_new_offset`, except that a dropped head is re-read instead of committed over or
    waited for forever: seek back to the committed offset once per (partition, offset), and
    commit nothing on that partition until the head is back (or REWIND_PATIENCE_S passed)."""
    dropped = dropped_head(self, tp)
    if dropped is not None:
        committed, head = dropped
        rewound: dict[Any, float] = self.__dict__.setdefault("_gplr_rewound", {})
        since = rewound.get((tp, committed))
        if since is None:
            rewound[(tp, committed)] = time.monotonic()
            logger.warning("%s: offsets %d..%d were fetched but never processed (faust dropped them); "
                           "reading again from %d", tp, committed, head - 1, committed)
            task = asyncio.ensure_future(self.seek(tp, committed))
            _PENDING.add(task)
            task.add_done_callback(_PENDING.discard)
            return None
        if time.monotonic() - since < REWIND_PATIENCE_S:
            return None
        logger.error("%s: offsets %d..%d still missing %.0f s after a rewind; committing past them",
                     tp, committed, head - 1, REWIND_PATIENCE_S)
    return _ORIGINAL_NEW_OFFSET(self, tp)


def rewind_dropped_heads() -> None:
    """Make faust re-read records it fetched but dropped (process-wide, idempotent)."""
    check_hooks()
    Consumer._new_offset = _new_offset  # type: ignore[method-assign]


def _held(name: str) -> Any:
    original = _ORIGINAL_RESUMES[name]

    async def resume(self: Any, generation_id: int = 0) -> None:
        self.app.flow_control.suspend()  # resumed (queues cleared, then filled) by the original after its seek
        await original(self, generation_id)
    return resume


def hold_deliveries_until_seek() -> None:
    """Make faust's end of recovery hold stream deliveries until its seek (process-wide, idempotent)."""
    check_hooks()
    for name in _ORIGINAL_RESUMES:
        setattr(Recovery, name, _held(name))
