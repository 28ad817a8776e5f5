"""streams._compat: the private hooks of faust/aiokafka, checked and exercised against the real
installed classes (aiokafka's own `Fetcher._proc_fetch_request` answers the fetches)."""
from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

import pytest
from aiokafka.consumer.fetcher import Fetcher, FetchError
from aiokafka.errors import TopicAuthorizationFailedError
from aiokafka.structs import TopicPartition
from mode.utils.logging import CompositeLogger

from streams import _compat
from streams._compat import (
    CompatError,
    check_hooks,
    configure_fetch_pacing,
    install_fetch_pacing,
    is_embedded_bootstrap,
)

PACE = 0.05


class _Client:
    """The one call the real method makes on its client for these responses: `send`."""

    def __init__(self, response: object) -> None:
        self.response = response

    async def send(self, node_id: int, request: object) -> object:
        return self.response


def _fetcher(error_code: int) -> Fetcher:
    """A real Fetcher (its real methods) with the attributes `_proc_fetch_request` reads; built
    without __init__, which would start the fetch loop against a live cluster."""
    fetcher = Fetcher.__new__(Fetcher)
    response = SimpleNamespace(API_VERSION=0, topics=[("t", [(0, error_code, 10, b"")])])
    fetcher._client = _Client(response)  # noqa: SLF001
    fetcher._client_rack = None  # noqa: SLF001
    fetcher._rack_warning_logged = False  # noqa: SLF001
    fetcher._records = {}  # noqa: SLF001
    fetcher._preferred_read_replica = {}  # noqa: SLF001
    fetcher._prefetch_backoff = 0.1  # noqa: SLF001
    return fetcher


def _fetch(fetcher: Fetcher) -> tuple[bool, float]:
    request = SimpleNamespace(topics=[("t", [(0, 5, 1 << 20)])])
    position = SimpleNamespace(has_valid_position=True, position=5, highwater=None, lso=None, timestamp=None)
    assignment = SimpleNamespace(active=True, state_value=lambda tp: position)

    async def timed() -> tuple[bool, float]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        got = await Fetcher._proc_fetch_request(fetcher, assignment, 0, request)
        return got, loop.time() - start

    return asyncio.run(timed())


@pytest.fixture
def paced():
    install_fetch_pacing(PACE)
    try:
        yield
    finally:
        install_fetch_pacing(0)
    assert Fetcher._proc_fetch_request is _compat._ORIGINAL  # noqa: SLF001 - restored


def test_installed_libraries_have_the_hooks() -> None:
    check_hooks()


def test_empty_fetch_is_paced_by_the_real_fetcher(paced) -> None:
    woke, took = _fetch(_fetcher(error_code=0))  # no error, no records: aiokafka's empty answer
    assert woke is False and took >= PACE * 0.9


def test_fetch_that_wakes_the_consumer_is_not_delayed(paced) -> None:
    fetcher = _fetcher(error_code=TopicAuthorizationFailedError.errno)
    woke, took = _fetch(fetcher)
    assert woke is True and took < PACE * 0.8
    assert isinstance(fetcher._records[TopicPartition("t", 0)], FetchError)  # noqa: SLF001 - the error waits for the consumer


def test_unpaced_fetcher_answers_at_once() -> None:
    install_fetch_pacing(0)
    woke, took = _fetch(_fetcher(error_code=0))
    assert woke is False and took < PACE * 0.8


def test_a_changed_signature_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    async def changed(self, assignment, node_id, request, extra):  # a future aiokafka
        return False

    monkeypatch.setattr(_compat, "_ORIGINAL", changed)
    with pytest.raises(CompatError, match=r"_proc_fetch_request.*extra.*streams/_compat.py"):
        install_fetch_pacing()

    def not_async(self, assignment, node_id, request):
        return False

    monkeypatch.setattr(_compat, "_ORIGINAL", not_async)
    with pytest.raises(CompatError, match="coroutine"):
        check_hooks()


@pytest.mark.parametrize("bootstrap, embedded", [
    ("127.0.0.1:9092", True), ("localhost:1234", True), ("127.0.0.1:1,[::1]:2", True),
    ("kafka:9092", False), ("10.0.0.5:9092", False), ("127.0.0.1:1,kafka.prod:9092", False), ("", False),
])
def test_pacing_only_for_the_embedded_broker(bootstrap: str, embedded: bool) -> None:
    try:
        assert configure_fetch_pacing(bootstrap, PACE) is embedded
        assert is_embedded_bootstrap(bootstrap) is embedded
        assert (Fetcher._proc_fetch_request is not _compat._ORIGINAL) is embedded  # noqa: SLF001
    finally:
        install_fetch_pacing(0)


def test_producer_buffer_is_widened_on_a_real_faust_app(tmp_path) -> None:
    import faust

    app = faust.App("compat-test", broker="kafka://127.0.0.1:1", datadir=str(tmp_path))  # nothing connects
    assert app.producer.buffer.max_messages < 20_000
    _compat.widen_producer_buffer(app, 20_000)
    assert app.producer.buffer.max_messages == 20_000
    with pytest.raises(CompatError, match="buffer.max_messages"):
        _compat.widen_producer_buffer(SimpleNamespace(producer=SimpleNamespace()), 1)


THIRD_PARTY = ("faust", "mode", "aiokafka")
PRIVATE_ATTRIBUTES = {"max_messages"}  # private in spirit: Faust's producer buffer has no setter


def _private_uses(path) -> list[str]:
    """Private names of faust/mode/aiokafka a module imports or reads off an imported name."""
    import ast

    tree = ast.parse(path.read_text())
    bound: set[str] = set()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in THIRD_PARTY:
            for alias in node.names:
                bound.add(alias.asname or alias.name)
                if alias.name.startswith("_"):
                    found.append(f"{node.module}.{alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in THIRD_PARTY:
                    bound.add((alias.asname or alias.name).split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            private = node.attr.startswith("_") and not node.attr.startswith("__")
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if (private and isinstance(root, ast.Name) and root.id in bound) or node.attr in PRIVATE_ATTRIBUTES:
                found.append(node.attr)
    return found


def test_private_hooks_live_only_in_compat(tmp_path) -> None:
    from pathlib import Path

    probe = tmp_path / "probe.py"
    probe.write_text("from faust.streams import _current_event\nfrom aiokafka.consumer.fetcher import Fetcher\n"
                     "Fetcher._proc_fetch_request = None\napp.producer.buffer.max_messages = 1\n")
    assert _private_uses(probe) == ["faust.streams._current_event", "_proc_fetch_request", "max_messages"]
    repo = Path(__file__).resolve().parents[2]
    offenders = {str(p.relative_to(repo)): _private_uses(p) for package in ("core", "streams", "recsys")
                 for p in sorted((repo / package).rglob("*.py")) if p.name != "_compat.py"}
    assert not {k: v for k, v in offenders.items() if v}


def test_fast_gzip_builds_level_one_batches_that_read_back() -> None:
    """The producers' batch builder (aiokafka's Cython one where built) compresses at the level
    `fast_gzip` sets — the gzip header's XFL byte is 4 for the fastest level, 2 for level 9 —
    and the batch still reads back record for record."""
    import aiokafka.codec
    from aiokafka.record import default_records
    from aiokafka.record.default_records import DefaultRecordBatchBuilder
    from aiokafka.record.memory_records import MemoryRecords

    values = [bytes(range(256)) * 20 + bytes([i]) for i in range(40)]

    def xfl() -> int:
        builder = DefaultRecordBatchBuilder(magic=2, compression_type=1, is_transactional=False, producer_id=-1,
                                            producer_epoch=-1, base_sequence=-1, batch_size=1 << 20)
        for i, value in enumerate(values):
            builder.append(i, timestamp=None, key=b"k", value=value, headers=[])
        raw = bytes(builder.build())
        batch = MemoryRecords(raw).next_batch()
        assert [r.value for r in batch] == values
        start = raw.find(b"\x1f\x8b")
        return raw[start + 8]

    saved = [(m, m.gzip_encode) for m in (default_records, _compat._c_default_records) if m is not None]
    try:
        for module, _ in saved:
            module.gzip_encode = aiokafka.codec.gzip_encode
        assert xfl() == 2
        _compat.fast_gzip()
        assert xfl() == 4
    finally:
        for module, original in saved:
            module.gzip_encode = original


# -- committed-offset bookkeeping -------------------------------------------------------------
def _consumer(broker_accepts: bool):
    """A real faust Consumer (its real `_commit_offsets`, `_should_commit`, `ack` bookkeeping)
    with the attributes a commit reads; `_commit` answers as the broker would."""
    from collections import defaultdict

    from faust.transport.drivers.aiokafka import Consumer  # the driver the worker runs

    consumer = Consumer.__new__(Consumer)
    tp = TopicPartition("t", 0)
    commits: list[dict] = []

    async def flush() -> None:
        return None

    async def _commit(offsets: dict) -> bool:
        commits.append(dict(offsets))
        return broker_accepts

    consumer._committed_offset = defaultdict(lambda: None)  # noqa: SLF001
    consumer._committed_offset[tp] = 4  # noqa: SLF001  # what the broker holds
    consumer.in_transaction = False
    consumer.log = CompositeLogger(logging.getLogger(__name__))
    consumer.assignment = lambda: {tp}
    consumer._commit = _commit  # noqa: SLF001
    consumer.app = SimpleNamespace(producer=SimpleNamespace(flush=flush),
                                   tables=SimpleNamespace(on_commit=lambda offsets: None),
                                   monitor=SimpleNamespace(on_tp_commit=lambda offsets: None))
    return consumer, tp, commits


def test_a_refused_commit_is_not_recorded_as_committed() -> None:
    """A commit the broker refuses (a rebalance: UnknownMemberId) leaves the bookkeeping where
    the broker is, so the same offsets are committed again next time; faust 0.15.3 recorded them
    and then skipped every commit up to them (the restarted worker whose lag never fell)."""
    from faust.transport.consumer import Consumer

    _compat.commit_only_on_success()
    consumer, tp, commits = _consumer(broker_accepts=False)
    assert asyncio.run(Consumer._commit_offsets(consumer, {tp: 10})) is False
    assert consumer._committed_offset[tp] == 4  # noqa: SLF001
    assert Consumer._should_commit(consumer, tp, 10)  # retried at the next commit
    consumer, tp, commits = _consumer(broker_accepts=True)
    assert asyncio.run(Consumer._commit_offsets(consumer, {tp: 10})) is True
    assert consumer._committed_offset[tp] == 10 and commits == [{tp: 10}]  # noqa: SLF001
    assert not Consumer._should_commit(consumer, tp, 10)


def test_the_original_commit_bookkeeping_is_the_bug_the_hook_fixes() -> None:
    """Guards the reason for the hook: if an upgraded faust stops advancing on a refused commit,
    this fails and the hook can go."""
    consumer, tp, _ = _consumer(broker_accepts=False)
    asyncio.run(_compat._ORIGINAL_COMMIT_OFFSETS(consumer, {tp: 10}))  # noqa: SLF001
    assert consumer._committed_offset[tp] == 10  # noqa: SLF001


# -- records fetched but never delivered --------------------------------------------------------
class _Consumer:
    """What faust's `Consumer._new_offset` and the rewind use: the ack bookkeeping and `seek`."""

    def __init__(self, committed: int, acked: list[int], gap: list[tuple[int, int]] = ()) -> None:
        from collections import defaultdict

        from intervaltree import IntervalTree

        self.tp = TopicPartition("purchases", 1)
        self._committed_offset = defaultdict(lambda: None, {self.tp: committed})
        self._acked = defaultdict(list, {self.tp: list(acked)})
        self._acked_index = defaultdict(set, {self.tp: set(acked)})
        self._gap = defaultdict(IntervalTree)
        for start, end in gap:
            self._gap[self.tp].addi(start, end)
        self.seeks: list[tuple[TopicPartition, int]] = []

    async def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))


def _new_offset(consumer: _Consumer, rule=_compat._new_offset) -> int | None:
    async def run() -> int | None:
        out = rule(consumer, consumer.tp)
        await asyncio.sleep(0)  # let a scheduled seek run
        await asyncio.sleep(0)
        return out
    return asyncio.run(run())


def test_faust_commits_over_one_dropped_record_and_never_over_two() -> None:
    """The two faces of the drop this hook repairs: faust's own rule."""
    assert _new_offset(_Consumer(10, [11, 12]), _compat._ORIGINAL_NEW_OFFSET) == 13  # 10 lost
    assert _new_offset(_Consumer(10, [13, 14]), _compat._ORIGINAL_NEW_OFFSET) is None  # stuck for good


@pytest.mark.parametrize("acked", [[11, 12], [13, 14]])
def test_a_dropped_head_is_read_again_from_the_committed_offset(acked: list[int]) -> None:
    consumer = _Consumer(10, acked)
    assert _new_offset(consumer) is None  # nothing committed over the missing records
    assert consumer.seeks == [(consumer.tp, 10)]
    assert _new_offset(consumer) is None  # waiting for them: no second seek, no commit
    assert consumer.seeks == [(consumer.tp, 10)]
    consumer._acked[consumer.tp] = [10, *range(11, 15)]  # read again and processed
    consumer._acked_index[consumer.tp] = set(consumer._acked[consumer.tp])
    assert _new_offset(consumer) == 15 and consumer.seeks == [(consumer.tp, 10)]


def test_no_rewind_without_a_dropped_head(monkeypatch: pytest.MonkeyPatch) -> None:
    in_order = _Consumer(10, [10, 11, 12])
    assert _new_offset(in_order) == 13 and not in_order.seeks
    recorded_gap = _Consumer(10, [10, 12, 13], gap=[(11, 12)])  # faust's own gap after a processed head
    assert _new_offset(recorded_gap) == 14 and not recorded_gap.seeks
    def missing_before_a_gap() -> _Consumer:  # 10 never delivered, then a jump from 11 to 13
        return _Consumer(10, [13, 14], gap=[(11, 13)])

    assert _new_offset(missing_before_a_gap(), _compat._ORIGINAL_NEW_OFFSET) == 15  # faust: over all of it
    consumer = missing_before_a_gap()
    assert _new_offset(consumer) is None and consumer.seeks == [(consumer.tp, 10)]
    gone = _Consumer(10, [11, 12])  # records that never come back: faust's rule after the patience
    monkeypatch.setattr(_compat, "REWIND_PATIENCE_S", 0.0)
    assert _new_offset(gone) is None and _new_offset(gone) == 13
    assert gone.seeks == [(gone.tp, 10)]


def test_recovery_resumes_streams_with_deliveries_held(monkeypatch: pytest.MonkeyPatch) -> None:
    """faust's end of recovery resumes the stream partitions, seeks, then resumes the flow control
    (clearing the stream queues); the hook suspends the flow control before it starts, so a record
    fetched in between waits for the seek instead of being queued and then cleared."""
    from mode.utils.queues import FlowControlEvent, FlowControlQueue

    seen: list[tuple[str, bool]] = []

    async def original(self, generation_id: int = 0) -> None:  # faust's order of steps
        seen.append(("resume partitions", self.app.flow_control.is_active()))
        delivery = asyncio.ensure_future(self.deliver("a record fetched before the seek"))
        await asyncio.sleep(0.01)
        seen.append(("seek", delivery.done()))
        self.app.flow_control.resume()  # clears the queues
        await delivery

    async def scenario() -> list[str]:
        flow = FlowControlEvent()
        queue: FlowControlQueue = FlowControlQueue(flow_control=flow, clear_on_resume=True)

        class Recovering:
            app = SimpleNamespace(flow_control=flow)

            async def deliver(self, record: str) -> None:  # the conductor: acquire, then queue
                await flow.acquire()
                queue.put_nowait(record)

        monkeypatch.setitem(_compat._ORIGINAL_RESUMES, "_resume_streams", original)
        await _compat._held("_resume_streams")(Recovering())
        return [queue.get_nowait() for _ in range(queue.qsize())]

    assert asyncio.run(scenario()) == ["a record fetched before the seek"]  # unheld: cleared, []
    assert seen == [("resume partitions", False), ("seek", False)]
