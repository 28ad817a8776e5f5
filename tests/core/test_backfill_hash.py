"""`core.event_hash.event_keys` is `core.stream_protocol.event_key` for every id (the backfilled
rows' remembered ids must match what the worker checks a retried event against)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from core.event_hash import event_keys
from core.stream_protocol import event_key


def _ids(seed: int, n: int) -> list[str]:
    rng = np.random.default_rng(seed)
    alphabet = list("abcXYZ0189:-_ é漢✓\u0000") + ["\U0001f600"]
    return ["".join(rng.choice(alphabet, size=int(rng.integers(0, 300)))) for _ in range(n)]


def test_every_length_and_block_boundary() -> None:
    """Empty, one byte, 127/128/129 and 255/256/257 bytes (BLAKE2b's 128-byte blocks), and random
    strings with multi-byte UTF-8."""
    ids = ["", "a"] + ["x" * n for n in (127, 128, 129, 255, 256, 257)] + _ids(0, 500)
    assert event_keys(ids).tolist() == [event_key(i) for i in ids]


def test_pandas_columns_and_slices() -> None:
    """An Arrow-backed pandas column and a slice of it (buffers with an offset) hash as the ids do."""
    ids = _ids(1, 400)
    column = pd.Series(ids).astype(str)
    want = [event_key(i) for i in ids]
    assert event_keys(column).tolist() == want
    assert event_keys(column.iloc[150:300]).tolist() == want[150:300]
    assert event_keys(column.to_numpy(dtype=object)).tolist() == want
    assert len(set(want)) == len(set(ids))  # the check is not vacuous: distinct ids, distinct keys


def test_ids_arrow_cannot_hold() -> None:
    """A lone surrogate (not UTF-8; the worker encodes it with surrogatepass) still hashes as the
    worker hashes it; no ids, no keys."""
    ids = ["ok", "bad\udc80", "also ok"]
    assert event_keys(ids).tolist() == [event_key(i) for i in ids]
    assert event_keys([]).dtype == np.int64 and len(event_keys([])) == 0


def test_repeats_are_confirmed_on_the_ids() -> None:
    """`HistoryIndex` finds repeated event ids on their hashes; two distinct ids with one hash
    (a collision, forced here) are both counted, a true repeat is dropped."""
    from core.backfill import _repeated

    ids = pd.Series(["a", "b", "a", "c", "b", "d"]).astype(str)
    honest = event_keys(ids)
    assert _repeated(honest, ids).tolist() == [False, False, True, False, True, False]
    collided = honest.copy()
    collided[3] = collided[0]  # "c" hashes as "a"
    assert _repeated(collided, ids).tolist() == [False, False, True, False, True, False]
