"""A shipped persona model is installed only once its zero-shot channel is warm, off the loop.

Loading MiniLM on the event loop froze a restarted worker for 20-40 s on a loaded host (timers,
commits and agents all stopped; the lost-disk test then sometimes stalled or came back one
purchase short). `upgrade_model` warms the channel in a thread and installs the model after.
"""
from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from streams.agents import upgrade_model


@dataclass
class SlowChannel:
    """Its warm-up lasts until the event loop has ticked a few times (or 5 s): run on the loop
    itself it would block the ticks and come back with `loop_ran` False."""

    warmed: threading.Event = field(default_factory=threading.Event)
    loop_ticked: threading.Event = field(default_factory=threading.Event)
    loop_ran: bool = False

    def warm(self) -> None:
        self.loop_ran = self.loop_ticked.wait(5.0)
        time.sleep(0.05)
        self.warmed.set()


@dataclass
class Model:
    zero_shot: Any


@dataclass
class Logic:
    """What `upgrade_model` uses of `StreamLogic`: the shipped model and the installed one."""

    shipped: tuple[int, Model] | None
    installed: list[tuple[int, bool]] = field(default_factory=list)
    model_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    model_version: int = 0

    def newer_model(self) -> tuple[int, Model] | None:
        if self.shipped is None or self.shipped[0] <= self.model_version:
            return None
        return self.shipped

    def install_model(self, version: int, model: Model) -> None:
        warm = model.zero_shot is None or model.zero_shot.warmed.is_set()
        self.installed.append((version, warm))
        self.model_version = version


def test_the_model_is_installed_warm_while_the_loop_keeps_running() -> None:
    channel = SlowChannel()

    async def scenario() -> tuple[list[tuple[int, bool]], int, bool, bool]:
        logic = Logic((7, Model(channel)))
        ticks, done = 0, False

        async def ticker() -> None:
            nonlocal ticks
            while not done:
                ticks += 1
                if ticks >= 3:
                    channel.loop_ticked.set()
                await asyncio.sleep(0.01)

        tick = asyncio.ensure_future(ticker())
        # two callers at once (the timer and the user-ops agent's first batch): one install
        first, second = await asyncio.gather(upgrade_model(logic), upgrade_model(logic))  # type: ignore[arg-type]
        again = await upgrade_model(logic)  # type: ignore[arg-type]
        done = True
        await tick
        return logic.installed, ticks, first or second, again

    installed, ticks, upgraded, again = asyncio.run(scenario())
    assert installed == [(7, True)]  # once, and only after the channel was warm
    assert upgraded and not again
    assert channel.loop_ran  # the loop kept running during the warm-up


def test_a_model_without_the_channel_is_installed_at_once() -> None:
    logic = Logic((3, Model(None)))
    assert asyncio.run(upgrade_model(logic))  # type: ignore[arg-type]
    assert logic.installed == [(3, True)]
    assert not asyncio.run(upgrade_model(Logic(None)))  # type: ignore[arg-type]
