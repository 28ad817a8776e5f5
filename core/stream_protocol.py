"""The stream's delivery protocol on a user row, without Kafka: which purchase events to count.

Purchase counts are the one non-idempotent effect in the stream (everything else is an
absolute upsert, `core.incremental`), so each event must be counted once although the stream
is at-least-once. Three guards, all kept *inside* the user row so they are written atomically
with the counts they protect, and all bounded in size:

1. **Replay of the user-side message** (the user worker crashed after writing the row, before
   committing its input offset): `UserState.applied_offset` is the last user-ops offset the row
   reflects; a message at or below it changes nothing (the runtime re-sends its outputs).
2. **Replay of the purchases reader** (it crashed after sending a batch, before committing the
   purchases offsets, so the same events arrive again in a later user-side message):
   `UserState.sources` maps each purchases partition to the highest purchases offset counted
   for this user; an event at or below it is a replay. Exact, for any replay length, because a
   purchases partition's events reach a user row in offset order (one reader per partition,
   one ordered send per batch). One entry per purchases partition the user's events came from.
3. **Producer retries** (the shop's producer sent one event twice, at two purchases offsets):
   the last `RECENT_IDS` event ids of the user (64-bit hashes, `event_key`) are kept, and an id
   among them is a duplicate.

What is *not* guaranteed: a producer duplicate of an event arriving after `RECENT_IDS` newer
events of the same user were counted is counted again (retries arrive within a producer's
delivery timeout, minutes, far fewer purchases than that for one customer); and a purchases
topic deleted and recreated under the same app id restarts its offsets, so its events look
like replays (guard 2) — start such a deployment with fresh state. Two distinct ids colliding
in 64 bits within one user's window (probability ~ RECENT_IDS² / 2⁶⁵) would drop one event.
"""
from __future__ import annotations

import hashlib

from core.incremental import UserState

__all__ = ["RECENT_IDS", "event_key", "is_duplicate", "remember"]

#: Event ids remembered per user for producer-retry de-duplication (8 bytes each in the row).
RECENT_IDS = 128


def event_key(event_id: str) -> int:
    """64-bit hash of an event id (what a row keeps instead of the id: fixed 8 bytes)."""
    digest = hashlib.blake2b(event_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def is_duplicate(state: UserState, event_id: str, source: tuple[int, int] | None) -> bool:
    """Was this event (from purchases `source` = (partition, offset), None when unknown) counted
    for this user already? Guards 2 and 3 of the module docstring; guard 1 is the caller's."""
    if source is not None and source[1] >= 0 and source[1] <= state.sources.get(source[0], -1):
        return True
    return event_key(event_id) in state.recent_ids


def remember(state: UserState, event_id: str, source: tuple[int, int] | None) -> None:
    """Record a counted event: its purchases offset and its id (the oldest id beyond
    RECENT_IDS is forgotten)."""
    if source is not None and source[1] >= 0:
        state.sources[source[0]] = max(state.sources.get(source[0], -1), source[1])
    state.recent_ids.append(event_key(event_id))
    if len(state.recent_ids) > RECENT_IDS:
        del state.recent_ids[: len(state.recent_ids) - RECENT_IDS]
