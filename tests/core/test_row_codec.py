"""`core.row_codec`: the compact row encodings are exact, and the bulk (`*_rows`) variants give
the single-row bytes for every group, empty groups and mixed widths included."""
from __future__ import annotations

import numpy as np
import pytest

from core.row_codec import dense_floats, narrow_int_rows, narrow_ints, sparse_float_rows, sparse_floats, wide_ints

EDGES = [0, 1, -1, 127, -128, 128, -129, 2**15 - 1, -(2**15), 2**15, 2**31 - 1, -(2**31), 2**31, 2**62, -(2**63)]


def _ints(rng: np.random.Generator, n: int) -> np.ndarray:
    """n × 3 integers, each row's scale drawn so that every width occurs."""
    scale = rng.choice([1, 100, 30_000, 2**30, 2**40], size=(n, 1))
    return (rng.integers(-1, 2, size=(n, 3)) * rng.integers(0, scale + 1, size=(n, 3))).astype(np.int64)


def _floats(rng: np.random.Generator, n: int, m: int) -> np.ndarray:
    """n × m: half zeros, float32-exact and not, NaN rows, −0.0."""
    a = np.where(rng.random((n, m)) < 0.5, 0.0, rng.random((n, m)))
    exact = rng.random(n) < 0.5
    a[exact] = a[exact].astype(np.float32).astype(np.float64)
    a[rng.random(n) < 0.1] = np.nan
    a[rng.random((n, m)) < 0.05] = -0.0
    return a


@pytest.mark.parametrize("value", EDGES)
def test_narrow_ints_exact_at_every_width_edge(value):
    a = np.array([[value, 0, 1]], dtype=np.int64)
    raw = narrow_ints(a)
    assert wide_ints(raw, 3).tolist() == a.ravel().tolist()
    width = next(w for w, t in [(1, np.int8), (2, np.int16), (4, np.int32), (8, np.int64)]
                 if np.iinfo(t).min <= value <= np.iinfo(t).max)
    assert len(raw) == 3 * width  # the narrowest that holds it


@pytest.mark.parametrize("seed", range(5))
def test_ints_roundtrip_and_bulk_equal_single(seed):
    rng = np.random.default_rng(seed)
    a = _ints(rng, 200)
    ptr = np.concatenate([[0], np.sort(rng.integers(0, 201, 30)), [200]])  # empty groups included
    rows = narrow_int_rows(a, ptr)
    for j, raw in enumerate(rows):
        part = a[ptr[j]:ptr[j + 1]]
        assert raw == narrow_ints(part)
        assert wide_ints(raw, part.size).tolist() == part.ravel().tolist()
    assert narrow_int_rows(a[ptr[3]:], ptr[3:]) == rows[3:]  # `a` holds rows ptr[0]..ptr[-1]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("m", [1, 6, 16, 17])
def test_floats_roundtrip_exactly_and_bulk_equal_single(seed, m):
    rng = np.random.default_rng(seed)
    a = _floats(rng, 120, m)
    ptr = np.concatenate([[0], np.sort(rng.integers(0, 121, 20)), [120]])
    masks, values = sparse_float_rows(a, ptr)
    for j in range(len(ptr) - 1):
        part = a[ptr[j]:ptr[j + 1]]
        assert (masks[j], values[j]) == sparse_floats(part)
        back = dense_floats(masks[j], values[j], len(part), m)
        assert back.tobytes() == part.tobytes()  # bit for bit: NaN, −0.0, float64-only values
    assert sparse_float_rows(a[ptr[3]:], ptr[3:]) == (masks[3:], values[3:])


def test_floats_take_float32_only_when_exact():
    exact = np.array([[0.0, 0.25, 0.0, 1 / 3]]).astype(np.float32).astype(np.float64)
    assert len(sparse_floats(exact)[1]) == 2 * 4
    assert len(sparse_floats(np.array([[0.0, 0.25, 0.0, 1 / 3]]))[1]) == 2 * 8
    assert sparse_floats(np.zeros((3, 16))) == (bytes(6), b"")


def test_bad_lengths_fail_loudly():
    with pytest.raises(ValueError):
        wide_ints(b"\x00" * 5, 2)
    mask, values = sparse_floats(np.array([[1.5, 0.0, 2.5]]))
    with pytest.raises(ValueError):
        dense_floats(mask, values + b"\x00", 1, 3)
