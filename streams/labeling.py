"""Online label sampling and the labeler agent: which users the LLM labels, and calling it safely.

Two samplings (GPLR_SAMPLING). `random` (the default, and the only reproducible one): each user is
decided exactly once, at the purchase that gives u its `label_min_purchases`-th distinct item (in
the user partition's offset order), when u is eligible (not excluded, not labeled or requested
yet): u is asked when its own seeded coin (a hash of u alone) is below `admit_probability` and the
partition has budget left (below). The admit probability is RANDOM_OVERSAMPLE × budget × seen /
candidates, with the partition's counters as they stand: `seen` users (the budget's base, held-out
and light users included, as batch GPLR counts them) and `excluded` users among them (held out,
never prototypes; candidates = seen − excluded). A fixed threshold (coin below 1.25 × budget)
left the budget underspent by the share that can never be prototypes (at most 208 of 215 on
Online Retail with 20% held out). The oversample covers users who never reach
`label_min_purchases` (unknown until the stream ends) and the few asked when the budget is spent.
Not the share of users eligible *so far*: where users qualify slowly (one item per order), that
share lags, the probability reaches 1 and the first to qualify — the heaviest buyers — take the
budget. One decision per user, not per new item: a coin per new distinct item gave customers with
many items more chances (prototypes' mean degree 92 against 61 for all customers), and so did
asking again a user the spent budget had refused; a model calibrated on that heavier sample loses
F1 on Online Retail (bench/sampling_bias.py, batch with each rule's prototypes; docs/RESULTS.md
§5b). The price: budget that accrues after the users who could spend it have qualified stays
unspent. Every input of the decision evolves in the partition's offset order, so the same input
chooses the same users in every deployment; and the request carries u's history at that point,
so a deterministic labeler gives the same label. (bench/persona_quality.py: random beats DU for
the persona model, which is why `gplr label` defaults to it too.)

`du` (whenever Ψ̂[u] moves): the same eligibility, then u's DU score (core.du.du_scores, Eq. 1
against the current Q̂) is at or above the `du_quantile` of recently seen scores, the partition has budget
left (requests ≤ `label_budget` × users seen in that partition, rounded half up; per partition so
the count is kept in the partition's own table and survives restarts); the call rate
only delays calls (RateLimiter.wait), it never decides. Rounding half up, not down: a floor lost
about half a label per partition, a third
of the budget on a small shop (5 instead of 7 prototypes for 145 users on 4 partitions), while
rounding keeps the total within partitions/2 of budget × users, as batch GPLR spends it.

Labeler: batches label-requests (`stream.take`), runs the core labeler in a thread pool with
bounded concurrency and a timeout, and publishes each result on `labels`; the labels agent turns
those into user-side label ops. The stream never waits on the LLM: requests sit in their own
topic, and a failed, empty or timed-out call is counted and dropped (the user simply stays
unlabeled), so an outage degrades labeling without stalling propagation.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import faust
import numpy as np

from core.du import du_scores
from core.events import InvalidEvent, check_text, decode_json
from core.incremental import UserState, user_history
from core.labelers import Labeler, LabelResult, UserHistory, make_labeler
from core.personas import PersonaSet
from streams import metrics
from streams.config import StreamConfig
from streams.records import encode_label, error_summary, label_record, label_request, partition_for

__all__ = ["OnlineQuantile", "RateLimiter", "LabelPolicy", "admit_probability", "seeded_unit", "build_labeler",
           "label_batch", "register_labeling"]

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

    async def wait(self, n: int = 1) -> None:
        """Take `n` tokens, sleeping until they have accrued (calls are delayed, never dropped)."""
        for _ in range(n):
            while not self.try_acquire():
                await asyncio.sleep(max(0.01, (1.0 - self.tokens) / self.rate))


@dataclass
class LabelPolicy:
    """Decides, per Ψ̂ change, whether a user gets a label request (see the module docstring)."""

    config: StreamConfig
    quantiles: dict[int, OnlineQuantile] = field(init=False, default_factory=dict)

    def quantile(self, user: str) -> OnlineQuantile:
        """The DU-score window of the user's partition: each partition's decisions depend only on
        that partition's own order of changes, not on how partitions interleave in a worker."""
        part = partition_for(user, self.config.partitions)
        window = self.quantiles.get(part)
        if window is None:
            window = self.quantiles[part] = OnlineQuantile(self.config.du_quantile)
        return window

    def __post_init__(self) -> None:
        path = self.config.label_exclude  # GPLR_LABEL_EXCLUDE: never prototypes (held-out users)
        self.excluded = frozenset(path.read_text().split()) if path is not None else frozenset()

    @property
    def enabled(self) -> bool:
        return self.config.labeler != "none" and self.config.label_budget > 0

    def allowed(self, stats: dict[str, int]) -> int:
        """Requests the partition's budget allows so far: budget × users seen, rounded half up."""
        return math.floor(self.config.label_budget * stats["seen"] + 0.5 + 1e-9)

    def _eligible(self, user: str, state: UserState) -> bool:
        return (self.enabled and not state.requested and state.label is None and user not in self.excluded
                and len(state.items) >= self.config.label_min_purchases)

    def _within_budget(self, stats: dict[str, int]) -> bool:
        remaining = self.allowed(stats) - stats["requested"]
        metrics.LABEL_BUDGET_REMAINING.set(max(remaining, 0))
        return remaining > 0  # (the call rate is enforced by the labeler, which delays calls)

    def count_user(self, user: str, stats: dict[str, int]) -> None:
        """A user's first purchase in the partition: one more `seen` (the budget's base) and, when
        u is held out, one more `excluded` (the share of `seen` that can never be a prototype)."""
        stats["seen"] += 1
        if user in self.excluded:
            stats["excluded"] = stats.get("excluded", 0) + 1

    def consider_purchase(self, user: str, state: UserState, stats: dict[str, int]) -> dict[str, Any] | None:
        """`random` sampling: a label-requests body when u should be labeled now, else None.

        Called when a purchase gives u a new distinct item, in the partition's offset order, with
        that partition's counters as they stand at that offset; u is decided once, at its
        `label_min_purchases`-th distinct item: the decision is a function of the partition's
        purchase sequence alone (reproducible), never of Ψ̂ or the clock."""
        if self.config.sampling != "random" or len(state.items) != self.config.label_min_purchases \
                or not self._eligible(user, state):
            return None
        chance = admit_probability(self.config.label_budget, stats["seen"], stats["seen"] - stats.get("excluded", 0))
        if seeded_unit(user, 0) >= chance or not self._within_budget(stats):
            return None
        metrics.LABEL_REQUESTS.inc()
        return label_request(user, user_history(state), 0.0)

    def consider(self, user: str, state: UserState, psi: np.ndarray, q_hat: np.ndarray,
                 stats: dict[str, int]) -> dict[str, Any] | None:
        """`du` sampling: a label-requests body when u should be labeled now (Ψ̂[u] moved), else None."""
        if not self._eligible(user, state):
            return None
        score = float(du_scores(psi[None, :], q_hat)[0])
        if not self.quantile(user).observe(score):
            return None
        if not self._within_budget(stats):
            return None
        metrics.LABEL_REQUESTS.inc()
        return label_request(user, user_history(state), score)


#: `random` sampling's margin over the budget's share of the candidates: it covers the users who
#: never reach `label_min_purchases` and those asked while the partition's budget is spent
#: (bench/sampling_bias.py measured the choice; docs/RESULTS.md §5b).
RANDOM_OVERSAMPLE = 2.0


def admit_probability(budget: float, seen: int, candidates: int, oversample: float | None = None) -> float:
    """The share of qualifying users `random` sampling asks: oversample × budget × seen / candidates.

    The budget is a share of all users seen (batch's base), but held-out users cannot spend it,
    so each candidate is asked with that ratio (capped at 1); with one uniform coin per user, taken
    once, the prototypes are a uniform sample of the eligible users, whatever their degree."""
    if candidates <= 0:
        return 0.0
    margin = RANDOM_OVERSAMPLE if oversample is None else oversample
    return min(1.0, margin * budget * seen / candidates)


def seeded_unit(user: str, n_items: int) -> float:
    """A uniform number in [0, 1) fixed by (user, distinct items): `random` sampling's coin, the
    same in every deployment and on every replay (blake2b, not Python's salted `hash`)."""
    digest = hashlib.blake2b(f"{user}\x00{n_items}".encode("utf-8", "surrogatepass"), digest_size=8,
                             person=b"gplr-sampling").digest()
    return int.from_bytes(digest, "big") / 2.0**64


def build_labeler(config: StreamConfig, personas: PersonaSet) -> Labeler | None:
    """The configured core labeler, or None (labeling off, or it cannot be built)."""
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
        logger.error("labeler %r unavailable (%s); labeling disabled", config.labeler, exc)
        return None


def label_batch(labeler: Labeler, requests: Sequence[dict[str, Any]]) -> list[LabelResult]:
    """Run the labeler on request bodies (synchronous: call it in an executor)."""
    histories = [UserHistory(str(r["user"]), tuple((str(n), int(q)) for n, q in r.get("history", [])))
                 for r in requests]
    return labeler.label(histories)


class _LabelerRuntime:
    """Lazy labeler + thread pool + concurrency bound shared by the labeler agent."""

    def __init__(self, config: StreamConfig, personas: PersonaSet, concurrency: int, timeout: float) -> None:
        self.config, self.personas = config, personas
        self.pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="labeler")
        self.slots = asyncio.Semaphore(concurrency)
        self.timeout = timeout
        self._labeler: Labeler | None = None
        self._built = False
        self._lock = threading.Lock()
        self._reported = 0  # labeler calls already added to the metric

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

    def _count_calls(self, fallback: int) -> None:
        """Add the labeler's own call count (HTTP requests for the LLM, retries included) to
        `gplr_label_calls_total` — calls, not batches; `fallback` for a labeler without stats."""
        calls = getattr(getattr(self._labeler, "stats", None), "calls", None)
        if not isinstance(calls, int):
            metrics.LABEL_CALLS.inc(fallback)
            return
        with self._lock:
            delta, self._reported = calls - self._reported, calls
        metrics.LABEL_CALLS.inc(max(0, delta))

    async def run(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Label a batch; every failure becomes error records, never an exception."""
        loop = asyncio.get_running_loop()
        if not self._built:  # loading a model is not a labeler call: no timeout for it
            await loop.run_in_executor(self.pool, self.labeler)
        start = time.monotonic()
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
            self._count_calls(len(requests))
        out = []
        for req, res in zip(requests, results):
            if not res.ok:
                metrics.LABEL_ERRORS.inc()
            out.append(label_record(req["user"], res.personas, res.scores or [1.0] * len(res.personas),
                                    self.config.labeler, error=None if res.ok else (res.error or "empty")))
        return out


#: Bounds of a labels / label-requests record (a user history of a few hundred items fits).
MAX_LABEL_BYTES = 64 * 1024
_MAX_LIST = 1000
_MAX_SCORE = 1e6


@dataclass(frozen=True)
class LabelMessage:
    """A validated `labels` record."""

    user: str
    personas: tuple[int, ...]
    scores: tuple[float, ...]
    labelled_by: str
    error: str | None


def _object(value: bytes | None, max_depth: int) -> dict[str, Any]:
    body = decode_json(value if value is not None else b"", MAX_LABEL_BYTES, max_depth)
    if not isinstance(body, dict):
        raise InvalidEvent("not_an_object", type(body).__name__)
    return body


def _int_in(value: Any, low: int, high: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or isinstance(value, str):
        raise InvalidEvent("wrong_type", f"{what} must be an integer")
    if not low <= value < high:
        raise InvalidEvent("out_of_range", f"{what} outside [{low}, {high})")
    return value


def _list(body: dict[str, Any], key: str) -> list[Any]:
    value = body.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidEvent("wrong_type", f"{key} must be a list")
    if len(value) > _MAX_LIST:
        raise InvalidEvent("field_too_long", key)
    return value


def parse_label(value: bytes | None, n_personas: int) -> LabelMessage:
    """Validate a `labels` record like a purchase: raises only `InvalidEvent`.

    user: a non-empty string (no lone surrogates, ≤ 512 characters); personas: distinct ints in
    [0, |R|); scores: empty (→ 1.0 each) or one finite number per persona; labelled_by: a name."""
    body = _object(value, max_depth=3)
    user = check_text(body.get("user"), "user")
    personas = tuple(dict.fromkeys(_int_in(p, 0, n_personas, "persona index") for p in _list(body, "personas")))
    scores_in = _list(body, "scores")
    scores: list[float] = []
    for s in scores_in:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or isinstance(s, str):
            raise InvalidEvent("wrong_type", "scores must be numbers")
        if not (math.isfinite(s) and abs(s) <= _MAX_SCORE):
            raise InvalidEvent("out_of_range", "scores must be finite and at most 1e6")
        scores.append(float(s))
    if scores and len(scores) != len(_list(body, "personas")):
        raise InvalidEvent("wrong_type", "one score per persona")
    if len(scores) != len(personas):  # duplicates dropped above, or no scores given
        scores = [1.0] * len(personas)
    by = body.get("labelled_by") or ""
    labelled_by = check_text(by, "labelled_by", max_len=64) if by else ""
    error = body.get("error")
    return LabelMessage(user, personas, tuple(scores), labelled_by,
                        None if error is None else str(error)[:200])


def parse_label_request(value: bytes | None) -> tuple[str, tuple[tuple[str, int], ...]]:
    """(user, history) of a `label-requests` record; raises only `InvalidEvent`."""
    body = _object(value, max_depth=3)
    user = check_text(body.get("user"), "user")
    history = []
    for entry in _list(body, "history"):
        if not isinstance(entry, list) or len(entry) != 2:
            raise InvalidEvent("wrong_type", "history entries must be [name, quantity]")
        history.append((check_text(entry[0], "item name"), _int_in(entry[1], 0, 2**31, "quantity")))
    return user, tuple(history)


def request_rejection(state: UserState | None, history: Sequence[tuple[str, int]]) -> str | None:
    """Why a label request must not reach the labeler, or None: the worker asked for it (the
    user's row on this worker says `requested` and has no label yet) and every item it names
    is one the user bought (a forged history cannot steer the labeler)."""
    if state is None or not state.requested:
        return "unrequested"
    if state.label is not None:
        return "already_labelled"
    bought = {it.name for it in state.items.values()}
    if any(name not in bought for name, _ in history):
        return "history_mismatch"
    return None


def register_labeling(app: faust.App, config: StreamConfig, personas: PersonaSet, topics: Any,
                       users: Any = None, concurrency: int = 2, timeout: float = 60.0, batch: int = 8) -> None:
    """Attach the labeler (label-requests → labels) and the labels → user-ops agents.

    `users` (user id → UserState, e.g. `Tables.users`) lets the labeler check that a request
    was made by this worker; without it every well-formed request is labeled.
    Malformed or refused records on either topic are dead-lettered on the DLQ topic with
    `source` "labels" / "label-requests" and the reason; nothing there raises."""
    from streams.agents import Out, dead_letter, send_or_die  # (agents imports this module)

    m = len(personas)

    def dead(event: Any, reason: str, detail: str, source: str) -> Out:
        return dead_letter(event.message.value, event.message.key, reason, detail, source)

    def label_outs(event: Any) -> list[Out]:
        try:
            msg = parse_label(event.message.value, m)
        except InvalidEvent as exc:
            return [dead(event, exc.reason, exc.detail, "labels")]
        if not msg.personas:  # a failed labeling: counted where it failed, nothing to apply
            return []
        if not config.accepts_labels_from(msg.labelled_by):
            return [dead(event, "unknown_labeler", f"labelled_by={msg.labelled_by!r}", "labels")]
        op = encode_label(msg.user, msg.personas, msg.scores, msg.labelled_by)
        return [Out("user_ops", msg.user, op, partition_for(msg.user, config.partitions))]

    @app.agent(topics.labels, name="labels")
    async def labels(stream: faust.StreamT) -> None:
        async for events in stream.take_events(64, within=0.05):  # type: ignore[attr-defined]  # not in faust's StreamT stub
            outs: list[Out] = []
            for event in events:
                try:
                    outs.extend(label_outs(event))
                except Exception as exc:  # last resort: this record, not the stream
                    logger.exception("labels record dead-lettered as internal_error")
                    outs.append(dead(event, "internal_error", error_summary(exc), "labels"))
            await send_or_die(topics, outs)

    if config.labeler == "none":
        return
    runtime = _LabelerRuntime(config, personas, concurrency, timeout)
    pacer = RateLimiter(config.label_rate_per_min)

    async def label_and_publish(requests: list[dict[str, Any]]) -> None:
        try:
            await pacer.wait(len(requests))  # a rate limit delays calls; it never picks who
            for record in await runtime.run(requests):
                await topics.labels.send(key=record["user"].encode("utf-8"), value=_dumps(record))
        finally:
            runtime.slots.release()

    def request_or_dead(event: Any) -> dict[str, Any] | Out:
        try:
            user, history = parse_label_request(event.message.value)
        except InvalidEvent as exc:
            return dead(event, exc.reason, exc.detail, "label-requests")
        reason = None if users is None else request_rejection(users.get(user), history)
        if reason is not None:
            return dead(event, reason, f"user={user[:64]!r}", "label-requests")
        return {"user": user, "history": [list(h) for h in history]}

    @app.task
    async def warm_labeler() -> None:
        """Load the labeler (e.g. the embedding model) in the pool as the worker starts."""
        await asyncio.get_running_loop().run_in_executor(runtime.pool, runtime.labeler)

    @app.agent(topics.label_requests, name="labeler")
    async def labeler(stream: faust.StreamT) -> None:
        async for events in stream.take_events(batch, within=1.0):  # type: ignore[attr-defined]  # not in faust's StreamT stub
            valid: list[dict[str, Any]] = []
            outs: list[Out] = []
            for event in events:
                try:
                    got = request_or_dead(event)
                except Exception as exc:
                    logger.exception("label request dead-lettered as internal_error")
                    got = dead(event, "internal_error", error_summary(exc), "label-requests")
                if isinstance(got, Out):
                    outs.append(got)
                else:
                    valid.append(got)
            await send_or_die(topics, outs)
            if valid:
                await runtime.slots.acquire()  # bounded concurrency; the user side never waits here
                asyncio.ensure_future(label_and_publish(valid))


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()
