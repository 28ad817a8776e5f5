"""A batch is acknowledged only once the broker acknowledged every record it sends (issue 9).

Faust's `Topic.send` returns when the record is handed to the producer; the broker's answer
comes later through the returned future. `send_or_die` must wait for those futures (else a
kill -9 after the offset commit loses persona updates and dead letters) and end the process when
one of them fails (else Faust acks the batch in a `finally` and the records are gone)."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from streams import agents
from streams.agents import Out, send_or_die


class _Topic:
    """Records each send and answers with a delivery future the test settles."""

    def __init__(self) -> None:
        self.reports: list[asyncio.Future] = []

    async def send(self, *, key, value, partition=None, value_serializer=None):
        report = asyncio.get_running_loop().create_future()
        self.reports.append(report)
        return report


@pytest.fixture(autouse=True)
def _no_changelog_wait(monkeypatch):
    async def written() -> None:
        return None

    monkeypatch.setattr(agents, "changelog_written", written)


def _outs() -> list[Out]:
    return [Out("persona_updates", "u1", {"user_id": "u1"}), Out("dlq", None, {"reason": "x"}),
            Out("user_ops", "u2", {"kind": "refresh"}, partition=1)]


def test_waits_for_every_delivery_report():
    async def run() -> list[bool]:
        topics = SimpleNamespace(persona_updates=_Topic(), dlq=_Topic(), user_ops=_Topic())
        task = asyncio.create_task(send_or_die(topics, _outs()))  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        reports = [f for t in (topics.persona_updates, topics.dlq, topics.user_ops) for f in t.reports]
        assert len(reports) == 3
        done = []
        for report in reports:
            done.append(task.done())
            report.set_result(None)
            await asyncio.sleep(0.01)
        await asyncio.wait_for(task, 1)
        return done

    assert asyncio.run(run()) == [False, False, False]  # still waiting until the last report


def test_a_failed_delivery_ends_the_process(monkeypatch):
    exits: list[int] = []

    def fake_exit(status: int) -> None:
        exits.append(status)
        raise SystemExit(status)

    monkeypatch.setattr(agents.os, "_exit", fake_exit)

    async def run() -> None:
        topics = SimpleNamespace(persona_updates=_Topic(), dlq=_Topic(), user_ops=_Topic())
        task = asyncio.create_task(send_or_die(topics, _outs()))  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        topics.persona_updates.reports[0].set_result(None)
        topics.dlq.reports[0].set_exception(RuntimeError("broker said no"))
        topics.user_ops.reports[0].set_result(None)
        await task

    with pytest.raises(SystemExit):
        asyncio.run(run())
    assert exits == [agents.EXIT_SEND_FAILED]
