"""The stream's delivery protocol, without Kafka: what a batch of messages does to the rows of
one partition, and what it must send. Any runtime (the Faust agents in `streams.agents`, the
in-memory logs of the tests) drives these; `core.incremental` holds the arithmetic.

The stream is at-least-once: after a crash the messages since the last commit are handled
again, their outputs may or may not have left, and rows may or may not hold their effect.

* **Replays** are detected per row by offset: a row keeps `applied_offset`, the last offset of
  its partition whose effect it holds. A message at or below the row's offset *from before the
  batch* is a replay: it changes nothing, but what it sent is sent again (an item re-tells all
  its buyers, a user re-sends its memberships and last update), and the row is written again
  (its changelog record may have been lost while the local store kept it).
* **Push coalescing** (`apply_item_batch`): every upsert is applied in order, but a batch sends
  one value per touched item, its final M̃ and seq — to every buyer when it pushed or replays,
  else to the buyers it owes a reply. Values are absolute with a seq, so the last subsumes the
  earlier ones.
* **Label counts** (`count_labels`): Q̂'s numerator, one row per partition, moved when a user's
  label personas change.
* **Purchase de-duplication** (below).

Purchase counts are the one non-idempotent effect in the stream (everything else is an
absolute upsert, `core.incremental`), so each event must be counted once although the stream
is at-least-once. Two guards, kept *inside* the user row so they are written atomically with
the counts they protect, and bounded in size:

1. **Replay of the user-side message** (the user worker crashed after writing the row, before
   committing its input offset): `UserState.applied_offset` is the last user-ops offset the row
   reflects; a message at or below it changes nothing (the runtime re-sends its outputs). Exact.
2. **The same event again at another offset**: the purchases reader re-sending a batch after a
   crash (read again from its last commit), or the shop's producer retrying an event. The last
   `RECENT_IDS` event ids of the user (64-bit hashes, `event_key`) are kept; an id among them is
   a duplicate. Order-free: it holds however the re-sent events interleave with new ones.

What is *not* guaranteed: an event arriving again after `RECENT_IDS` newer events of the same
user were counted is counted again (a retry comes within a producer's delivery timeout,
minutes; a reader's replay covers what it read since its last commit, seconds — both far fewer
purchases of one customer). Two distinct ids colliding in 64 bits within one user's window
(probability ~ RECENT_IDS² / 2⁶⁵) would drop one event. (A high-water mark of purchases offsets
per user would make reader replays exact for any length, but it assumes a partition's events
reach the row in offset order; a rebuilt worker lost a purchase with it, so it is not used.)
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, overload

import numpy as np

from core.incremental import (
    ItemState,
    ItemValue,
    Membership,
    UserState,
    item_upsert,
    item_value,
    label_vector,
    user_apply_value,
    user_membership,
    user_purchase,
    user_set_label,
)

__all__ = ["RECENT_IDS", "event_key", "is_duplicate", "remember", "UserBatch", "ItemBatch", "apply_item_batch",
           "count_labels"]

#: Event ids remembered per user for de-duplication (8 bytes each in the row, at most 4 KiB).
RECENT_IDS = 512


def event_key(event_id: str) -> int:
    """64-bit hash of an event id (what a row keeps instead of the id: fixed 8 bytes)."""
    digest = hashlib.blake2b(event_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def is_duplicate(state: UserState, event_id: str) -> bool:
    """Was this event counted for this user already (guard 2; guard 1 is `UserBatch.replay`)?"""
    return event_key(event_id) in state.recent_ids


def remember(state: UserState, event_id: str) -> None:
    """Record a counted event's id (the oldest beyond RECENT_IDS is forgotten)."""
    state.recent_ids.append(event_key(event_id))
    if len(state.recent_ids) > RECENT_IDS:
        del state.recent_ids[: len(state.recent_ids) - RECENT_IDS]


# -- user side ----------------------------------------------------------------------------------
class UserBatch:
    """The user rows one batch of one partition touches, in offset order.

    Each row is read once (`get`, None for a new user) and written once (`rows_to_write`, with
    `applied_offset` = the last offset that changed it); the replay test uses the row's offset
    from before the batch, so several messages of one batch for one user all count. The runtime
    reads `changed` (users whose Ψ̂ or label moved → earliest source ts), `replayed` (users whose
    last update must be re-sent) and `memberships()` (upserts to send, one per (user, item)).
    """

    def __init__(self, get: Callable[[str], UserState | None], n_personas: int) -> None:
        self.get, self.n_personas = get, n_personas
        self.rows: dict[str, UserState] = {}
        self.base: dict[str, int] = {}  # each row's applied_offset before the batch
        self.dirty: dict[str, int] = {}  # rows to write → last offset applied
        self.changed: dict[str, float] = {}  # rows whose Ψ̂ moved → earliest source ts
        self.members: dict[tuple[str, str], float] = {}  # (user, item) to tell → source ts
        self.replayed: set[str] = set()
        self.replays = 0
        self.label_moves: list[tuple[tuple[int, ...], tuple[int, ...]]] = []  # (old, new) label personas
        self.labeled: dict[str, tuple[int, ...]] = {}  # user → label personas applied in this batch

    @overload
    def state(self, user: str, create: Literal[True] = ...) -> UserState: ...
    @overload
    def state(self, user: str, create: bool) -> UserState | None: ...
    def state(self, user: str, create: bool = True) -> UserState | None:
        """The batch's row of `user`, loaded on first use (created empty unless `create` is False)."""
        state = self.rows.get(user)
        if state is None:
            state = self.get(user)
            if state is None:
                if not create:
                    return None
                state = UserState(self.n_personas)
            self.rows[user] = state
            self.base[user] = state.applied_offset
        return state

    def replay(self, user: str, offset: int) -> bool:
        """Was `offset` applied to this row before (a crash replay)? Then the row is written
        again: a store may keep a row whose changelog record was lost with the crash, and without
        a rewrite the changelog (what a worker with a new disk rebuilds from) stays behind."""
        if offset <= self.base[user]:
            self.dirty.setdefault(user, self.base[user])
            self.replays += 1
            return True
        return False

    def applied(self, user: str, offset: int) -> None:
        self.dirty[user] = offset

    def change(self, user: str, source_ts: float) -> None:
        self.changed[user] = min(self.changed.get(user, source_ts), source_ts)

    def membership(self, user: str, item: str, source_ts: float) -> None:
        key = (user, item)
        self.members[key] = min(self.members.get(key, source_ts), source_ts)

    def purchase(self, offset: int, event_id: str, user: str, item: str, name: str, quantity: int,
                 source_ts: float) -> str:
        """Count one purchase event; returns "replay", "duplicate", "edge" (a new edge: its
        membership is queued) or "repeat" (another purchase of a known item)."""
        state = self.state(user)
        assert state is not None
        if self.replay(user, offset):  # re-send, change nothing
            self.membership(user, item, source_ts)
            return "replay"
        if is_duplicate(state, event_id):
            return "duplicate"
        remember(state, event_id)
        new_edge = user_purchase(state, item, quantity, name)
        self.applied(user, offset)
        if not new_edge:
            return "repeat"
        self.membership(user, item, source_ts)
        return "edge"

    def value(self, offset: int, item: str, seq: int, value: np.ndarray, users: Iterable[str],
              source_ts: float) -> list[str]:
        """Apply an item's M̃ to its buyers in this partition; returns the users this batch has
        no row for (skipped)."""
        unknown = []
        for user in users:
            state = self.state(user, create=False)
            if state is None:
                unknown.append(user)
                continue
            if user_apply_value(state, item, seq, value):
                self.applied(user, offset)
                self.change(user, source_ts)
            elif self.replay(user, offset) and state.published:
                self.replayed.add(user)
        return unknown

    def label_is_noop(self, offset: int, user: str, personas: tuple[int, ...], source_ts: float) -> bool:
        """True when a label record changes nothing: a replay (its memberships and the user's
        last update are re-sent) or the same label again. Check before `set_label`."""
        existing = self.state(user, create=False)
        if existing is not None and self.replay(user, offset):
            for item in existing.items:
                self.membership(user, item, source_ts)
            if existing.published:  # the "labelled" update may have been lost with the crash
                self.replayed.add(user)
            return True
        return existing is not None and bool(personas) and personas == existing.label_personas

    def set_label(self, offset: int, user: str, personas: tuple[int, ...], source_ts: float) -> UserState:
        """Make `user` a prototype with `personas` (validated by the runtime): new label version,
        a membership per item it bought, and a label-count move."""
        state = self.state(user)
        assert state is not None
        self.label_moves.append((state.label_personas, personas))
        self.labeled[user] = personas
        for m in user_set_label(state, user, label_vector(personas, self.n_personas)):
            self.membership(user, m.item, source_ts)
        state.label_personas = personas
        self.applied(user, offset)
        return state

    def refresh(self, offset: int, users: Iterable[str], source_ts: float) -> None:
        """A new persona model: unlabeled users decide again."""
        for user in users:
            state = self.state(user, create=False)
            if state is not None and state.label is None and not self.replay(user, offset):
                self.applied(user, offset)
                self.change(user, source_ts)

    def rows_to_write(self) -> dict[str, UserState]:
        """Every row to write, its `applied_offset` set (call once, after the batch's decisions)."""
        for user, offset in self.dirty.items():
            self.rows[user].applied_offset = offset
        return {user: self.rows[user] for user in self.dirty}

    def memberships(self) -> list[tuple[Membership, float]]:
        """The upserts to send to items, with their source ts."""
        return [(user_membership(self.rows[user], user, item), ts) for (user, item), ts in self.members.items()]


# -- item side ------------------------------------------------------------------------------------
@dataclass
class ItemBatch:
    """What one item-side batch did: rows to write (applied_offset set), one value per item that
    owes one (to every buyer after a push or a replay, else to new buyers), with the earliest
    source ts, and how many pushes happened."""

    rows: dict[str, ItemState] = field(default_factory=dict)
    values: list[tuple[ItemValue, float]] = field(default_factory=list)
    pushes: int = 0


def apply_item_batch(get: Callable[[str], ItemState | None],
                     batch: Sequence[tuple[int, Iterable[tuple[Membership, float]]]],
                     n_personas: int, theta: float) -> ItemBatch:
    """Apply a batch of (offset, buyer upserts with source ts) of one item partition, in offset order."""
    out = ItemBatch()
    base: dict[str, int] = {}
    dirty: dict[str, int] = {}
    tell: dict[str, set[str]] = {}
    tell_all: set[str] = set()
    ts: dict[str, float] = {}
    for offset, members in batch:
        for member, source_ts in members:
            item = member.item
            state = out.rows.get(item)
            if state is None:
                state = out.rows[item] = get(item) or ItemState(n_personas)
                base[item], tell[item] = state.applied_offset, set()
            upsert = item_upsert(state, item, member, theta)
            ts[item] = min(ts.get(item, source_ts), source_ts)
            if offset <= base[item]:  # replay: tell everyone again, write the row again
                dirty.setdefault(item, base[item])
                if state.seq > 0:
                    tell_all.add(item)
            else:
                dirty[item] = offset
                if upsert.pushed:
                    out.pushes += 1
                    tell_all.add(item)
                    continue
            if upsert.told is not None:
                tell[item].update(upsert.told.users)
    for item, offset in dirty.items():
        out.rows[item].applied_offset = offset
    for item, state in out.rows.items():
        users = state.buyers if item in tell_all else tell[item]
        if users:
            out.values.append((item_value(state, item, users), ts[item]))
    return out


def count_labels(counts: np.ndarray | None, old: Sequence[int], new: Sequence[int], n_personas: int) -> np.ndarray:
    """Label counts after one user's label personas moved from `old` to `new` (never negative;
    a missing or mis-sized row starts at zero)."""
    counts = np.zeros(n_personas) if counts is None or len(counts) != n_personas else np.array(counts, dtype=np.float64)
    counts[list(old)] -= 1
    counts[list(new)] += 1
    return np.maximum(counts, 0)
