"""Online DU sampling and the labeller agent: which users the LLM labels, and calling it safely.

Trigger (on the user side, whenever Ψ̂[u] moves): u is not labelled or requested yet, has bought
at least `label_min_purchases` distinct items, its DU score (core.du.du_scores, Eq. 1 against the
current Q̂) is at or above the `du_quantile` of recently seen scores, the partition has budget
left (requests ≤ `label_budget` × users seen in that partition, rounded half up; per partition so
the count is kept in the partition's own table and survives restarts), and the worker-wide call
rate allows it. Rounding half up, not down: a floor lost about half a label per partition, a third
of the budget on a small shop (5 instead of 7 prototypes for 145 users on 4 partitions), while
rounding keeps the total within partitions/2 of budget × users, as batch GPLR spends it.

Labeller: batches label-requests (`stream.take`), runs the core labeler in a thread pool with
bounded concurrency and a timeout, and publishes each result on `labels`; the labels agent turns
those into user-side label ops. The stream never waits on the LLM: requests sit in their own
topic, and a failed, empty or timed-out call is counted and dropped (the user simply stays
unlabelled), so an outage degrades labelling without stalling propagation.
"""
from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import faust
import numpy as np

from core.du import du_scores
from core.incremental import UserState, user_history
from core.labelers import Labeler, LabelResult, UserHistory, make_labeler
from core.personas import PersonaSet
from streams import metrics
from streams.config import StreamConfig
from streams.records import label_op, label_record, label_request, partition_for

__all__ = ["OnlineQuantile", "RateLimiter", "LabelPolicy", "build_labeler", "label_batch",
           "register_labelling"]

logger = logging.getLogger(__name__)


class OnlineQuantile:
    """The q-quantile of the last `window` observations (exact over the window, O(window))."""

    def __init__(self, q: float, window: int = 512, warmup: int = 8) -> None:
        self.q, self.warmup = q, warmup
        self.values: deque[float] = deque(maxlen=window)

    def observe(self, x: float) -> bool:
        """Record x; True when x is at or above the quantile (always True while warming up)."""
        self.values.append(float(x))
        if len(self.values) < self.warmup:
            return True
        return x >= float(np.quantile(np.fromiter(self.values, float), self.q)) - 1e-12


class RateLimiter:
    """Token bucket: at most `per_minute` acquisitions per minute (0 = unlimited)."""

    def __init__(self, per_minute: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, per_minute / 60.0 * 5)  # a five-second burst
        self.tokens = self.capacity
        self.clock = clock
        self.last = clock()

    def try_acquire(self) -> bool:
        if self.rate <= 0:
            return True
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@dataclass
class LabelPolicy:
    """Decides, per Ψ̂ change, whether a user gets a label request (see the module docstring)."""

    config: StreamConfig
    quantile: OnlineQuantile = field(init=False)
    limiter: RateLimiter = field(init=False)

    def __post_init__(self) -> None:
        self.quantile = OnlineQuantile(self.config.du_quantile)
        self.limiter = RateLimiter(self.config.label_rate_per_min)
        path = self.config.label_exclude  # GPLR_LABEL_EXCLUDE: never prototypes (held-out users)
        self.excluded = frozenset(path.read_text().split()) if path is not None else frozenset()

    @property
    def enabled(self) -> bool:
        return self.config.labeler != "none" and self.config.label_budget > 0

    def allowed(self, stats: dict[str, int]) -> int:
        """Requests the partition's budget allows so far: budget × users seen, rounded half up."""
        return math.floor(self.config.label_budget * stats["seen"] + 0.5 + 1e-9)

    def consider(self, user: str, state: UserState, psi: np.ndarray, q_hat: np.ndarray,
                 stats: dict[str, int]) -> dict[str, Any] | None:
        """A label-requests body when u should be labelled now, else None."""
        if not self.enabled or state.requested or state.label is not None or user in self.excluded:
            return None
        if len(state.items) < self.config.label_min_purchases:
            return None
        score = float(du_scores(psi[None, :], q_hat)[0])
        if not self.quantile.observe(score):
            return None
        remaining = self.allowed(stats) - stats["requested"]
        metrics.LABEL_BUDGET_REMAINING.set(max(remaining, 0))
        if remaining <= 0 or not self.limiter.try_acquire():
            return None
        metrics.LABEL_REQUESTS.inc()
        return label_request(user, user_history(state), score)


def build_labeler(config: StreamConfig, personas: PersonaSet) -> Labeler | None:
    """The configured core labeler, or None (labelling off, or it cannot be built)."""
    if config.labeler == "none":
        return None
    options: dict[str, Any] = {}
    if config.labeler == "openai" and config.llm is not None:
        options["config"] = config.llm
    if config.labeler == "replay" and config.replay_labels is not None:  # GPLR_REPLAY_LABELS
        options["path"] = config.replay_labels
    try:
        return make_labeler(config.labeler, personas, **options)
    except Exception as exc:  # a missing model or endpoint must not stop propagation
        logger.error("labeler %r unavailable (%s); labelling disabled", config.labeler, exc)
        return None


def label_batch(labeler: Labeler, requests: Sequence[dict[str, Any]]) -> list[LabelResult]:
    """Run the labeler on request bodies (synchronous: call it in an executor)."""
    histories = [UserHistory(str(r["user"]), tuple((str(n), int(q)) for n, q in r.get("history", [])))
                 for r in requests]
    return labeler.label(histories)


class _LabellerRuntime:
    """Lazy labeler + thread pool + concurrency bound shared by the labeller agent."""

    def __init__(self, config: StreamConfig, personas: PersonaSet, concurrency: int, timeout: float) -> None:
        self.config, self.personas = config, personas
        self.pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="labeler")
        self.slots = asyncio.Semaphore(concurrency)
        self.timeout = timeout
        self._labeler: Labeler | None = None
        self._built = False
        self._lock = threading.Lock()

    def labeler(self) -> Labeler | None:
        """Build once (in the pool: loading a model must not block the event loop)."""
        with self._lock:
            if not self._built:
                self._labeler, self._built = build_labeler(self.config, self.personas), True
        return self._labeler

    def _call(self, requests: list[dict[str, Any]]) -> list[LabelResult]:
        labeler = self.labeler()
        if labeler is None:
            raise RuntimeError("no labeler")
        return label_batch(labeler, requests)

    async def run(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Label a batch; every failure becomes error records, never an exception."""
        loop = asyncio.get_running_loop()
        if not self._built:  # loading a model is not a labeler call: no timeout for it
            await loop.run_in_executor(self.pool, self.labeler)
        start = time.monotonic()
        metrics.LABEL_CALLS.inc()
        try:
            results = await asyncio.wait_for(loop.run_in_executor(self.pool, self._call, requests),
                                             self.timeout)
        except Exception as exc:  # timeout, endpoint down, bad answer
            metrics.LABEL_ERRORS.inc()
            logger.warning("labeler failed for %d users: %s", len(requests), exc)
            return [label_record(r["user"], [], [], self.config.labeler, error=str(exc)[:200] or "error")
                    for r in requests]
        finally:
            metrics.LABEL_LATENCY.observe(time.monotonic() - start)
        out = []
        for req, res in zip(requests, results):
            if not res.ok:
                metrics.LABEL_ERRORS.inc()
            out.append(label_record(req["user"], res.personas, res.scores or [1.0] * len(res.personas),
                                    self.config.labeler, error=None if res.ok else (res.error or "empty")))
        return out


def register_labelling(app: faust.App, config: StreamConfig, personas: PersonaSet, topics: Any,
                       concurrency: int = 2, timeout: float = 60.0, batch: int = 8) -> None:
    """Attach the labeller (label-requests → labels) and the labels → user-ops agents."""

    @app.agent(topics.labels, name="labels")
    async def labels(stream: faust.StreamT) -> None:
        async for body in stream:
            try:
                user, chosen = str(body["user"]), [int(p) for p in body.get("personas") or []]
            except (KeyError, TypeError, ValueError):
                logger.warning("malformed labels record skipped: %r", body)
                continue
            if not chosen:
                continue
            op = label_op(user, chosen, body.get("scores") or [], str(body.get("labelled_by", "")))
            await topics.user_ops.send(key=user, value=op,
                                       partition=partition_for(user, config.partitions))

    if config.labeler == "none":
        return
    runtime = _LabellerRuntime(config, personas, concurrency, timeout)

    async def label_and_publish(requests: list[dict[str, Any]]) -> None:
        try:
            for record in await runtime.run(requests):
                await topics.labels.send(key=record["user"], value=record)
        finally:
            runtime.slots.release()

    @app.task
    async def warm_labeler() -> None:
        """Load the labeler (e.g. the embedding model) in the pool as the worker starts."""
        await asyncio.get_running_loop().run_in_executor(runtime.pool, runtime.labeler)

    @app.agent(topics.label_requests, name="labeller")
    async def labeller(stream: faust.StreamT) -> None:
        async for requests in stream.take(batch, within=1.0):
            valid = [r for r in requests if isinstance(r, dict) and "user" in r]
            if not valid:
                continue
            await runtime.slots.acquire()  # bounded concurrency; the user side never waits here
            asyncio.ensure_future(label_and_publish(valid))
