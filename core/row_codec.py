"""Compact, lossless encodings of the arrays in a stored table row.

Why: at grocery density a user row is mostly per-item numbers — m told values and three counters
for each of ~65 items — and an item row mostly per-buyer label versions and labels, all written
again on every change and read back on every recovery. Told values are half zeros (an item's
buyers share few personas) and fit float32 (`core.incremental.told_value`); counters and versions
are small. So:

* `narrow_ints`: integers in the narrowest of int8/16/32/64 that holds them all;
* `sparse_floats`: a row-wise bitmap of the non-zero entries plus those entries, as float32 when
  that is exact for every one of them, else float64.

Both are exact (a NaN, −0.0 or a value float32 cannot hold stays as it was) and self-describing
from their lengths and the row count, so no format flag is stored. `streams.tables` encodes one
row with them; `core.backfill` builds the same bytes for many rows at once with the `*_rows`
variants, which are defined through the same width decisions (so both agree byte for byte).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["narrow_ints", "wide_ints", "narrow_int_rows", "sparse_floats", "dense_floats", "sparse_float_rows"]

_INT_TYPES = (np.int8, np.int16, np.int32, np.int64)
_BOUNDS = [(int(np.iinfo(t).min), int(np.iinfo(t).max)) for t in _INT_TYPES]
_BY_WIDTH: dict[int, np.dtype] = {np.dtype(t).itemsize: np.dtype(t) for t in _INT_TYPES}
_BY_FLOAT_WIDTH: dict[int, np.dtype] = {4: np.dtype(np.float32), 8: np.dtype(np.float64)}


def _int_code(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Per group with values in [lo, hi]: the index in `_INT_TYPES` of the narrowest that holds them."""
    code = np.full(np.shape(lo), len(_INT_TYPES) - 1, dtype=np.int64)
    for k in range(len(_INT_TYPES) - 2, -1, -1):
        code[(lo >= _BOUNDS[k][0]) & (hi <= _BOUNDS[k][1])] = k
    return code


def _narrowest(lo: int, hi: int) -> int:
    """`_int_code` of one group (plain ints: a row is encoded on every write)."""
    return next(k for k, (low, high) in enumerate(_BOUNDS) if low <= lo and hi <= high)


def narrow_ints(a: np.ndarray) -> bytes:
    """`a` (any shape, integers) as raw bytes of the narrowest integer type that holds every entry."""
    flat = np.ascontiguousarray(a, dtype=np.int64).ravel()
    if not flat.size:
        return b""
    return flat.astype(_INT_TYPES[_narrowest(int(flat.min()), int(flat.max()))]).tobytes()


def wide_ints(raw: bytes, count: int) -> np.ndarray:
    """Inverse of `narrow_ints` for `count` entries: int64 (flat, a writable copy)."""
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    width, rest = divmod(len(raw), count)
    if rest or width not in _BY_WIDTH:
        raise ValueError(f"narrow ints: {len(raw)} bytes do not hold {count} entries")
    out: np.ndarray = np.frombuffer(raw, dtype=_BY_WIDTH[width]).astype(np.int64)
    return out


def narrow_int_rows(a: np.ndarray, ptr: Sequence[int] | np.ndarray) -> list[bytes]:
    """`narrow_ints` of each group of rows j = ptr[j]:ptr[j+1], at once (`a`: exactly the rows
    ptr[0]..ptr[-1], rows × columns or flat, integers)."""
    a = np.ascontiguousarray(a, dtype=np.int64)
    bounds = np.asarray(ptr, dtype=np.int64)
    bounds = bounds - (bounds[0] if len(bounds) else 0)
    lo_row, hi_row = (a.min(axis=1), a.max(axis=1)) if a.ndim > 1 else (a, a)
    filled = bounds[1:] > bounds[:-1]
    lo = np.zeros(len(bounds) - 1, dtype=np.int64)
    hi = np.zeros(len(bounds) - 1, dtype=np.int64)
    if filled.any():
        starts = bounds[:-1][filled]
        lo[filled] = np.minimum.reduceat(lo_row, starts) if len(lo_row) else 0
        hi[filled] = np.maximum.reduceat(hi_row, starts) if len(hi_row) else 0
    codes = _int_code(lo, hi)
    row_width = a[0].size if a.ndim > 1 and len(a) else 1
    blobs = {int(k): a.astype(_INT_TYPES[int(k)]).tobytes() for k in np.unique(codes[filled])}
    out = []
    for j, (start, stop) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist())):
        if start == stop:
            out.append(b"")
            continue
        w = np.dtype(_INT_TYPES[codes[j]]).itemsize * row_width
        out.append(blobs[int(codes[j])][start * w:stop * w])
    return out


def _kept(a: np.ndarray) -> np.ndarray:
    """Entries a dense decode would not restore by itself: all but +0.0."""
    kept: np.ndarray = (a != 0) | np.signbit(a)
    return kept


def _exact32(values: np.ndarray) -> np.ndarray:
    """Per entry: float32 holds it exactly (NaN included)."""
    exact: np.ndarray = (values.astype(np.float32).astype(np.float64) == values) | np.isnan(values)
    return exact


def sparse_floats(a: np.ndarray) -> tuple[bytes, bytes]:
    """(bitmap of the kept entries per row, their values) of a rows × m float64 array."""
    a = np.asarray(a, dtype=np.float64)
    kept = _kept(a)
    values = a[kept]
    dtype = np.float32 if _exact32(values).all() else np.float64
    return np.packbits(kept, axis=1, bitorder="little").tobytes(), values.astype(dtype).tobytes()


def dense_floats(mask: bytes, values: bytes, rows: int, m: int) -> np.ndarray:
    """Inverse of `sparse_floats`: rows × m float64 (a writable array)."""
    out = np.zeros((rows, m), dtype=np.float64)
    if not rows or not m:
        return out
    bits = np.unpackbits(np.frombuffer(mask, dtype=np.uint8).reshape(rows, -1), axis=1, count=m,
                         bitorder="little").astype(bool)
    count = int(bits.sum())
    if count:
        width, rest = divmod(len(values), count)
        if rest or width not in _BY_FLOAT_WIDTH:
            raise ValueError(f"sparse floats: {len(values)} bytes do not hold {count} values")
        out[bits] = np.frombuffer(values, dtype=_BY_FLOAT_WIDTH[width])
    elif values:
        raise ValueError("sparse floats: values without entries")
    return out


def sparse_float_rows(a: np.ndarray, ptr: Sequence[int] | np.ndarray) -> tuple[list[bytes], list[bytes]]:
    """`sparse_floats` of each group of rows j = ptr[j]:ptr[j+1], at once (`a`: exactly the rows
    ptr[0]..ptr[-1], rows × m float64)."""
    a = np.ascontiguousarray(a, dtype=np.float64)
    bounds = np.asarray(ptr, dtype=np.int64)
    base = int(bounds[0]) if len(bounds) else 0
    kept = _kept(a)
    mask = np.packbits(kept, axis=1, bitorder="little")
    mb = mask.shape[1] if mask.ndim > 1 else 0
    mask_blob = mask.tobytes()
    values = a[kept]
    at = np.concatenate([[0], np.cumsum(kept.sum(axis=1))]).astype(np.int64)  # value offset per row
    vptr = at[bounds - base]
    # a group is float32 iff every value in it is exact in float32
    inexact = np.concatenate([[0], np.cumsum(~_exact32(values))]).astype(np.int64)
    wide = (inexact[vptr[1:]] - inexact[vptr[:-1]]) > 0
    f32 = values.astype(np.float32).tobytes()
    f64 = values.tobytes() if wide.any() else b""
    masks, out = [], []
    for j, (start, stop) in enumerate(zip((bounds[:-1] - base).tolist(), (bounds[1:] - base).tolist())):
        masks.append(mask_blob[start * mb:stop * mb])
        v0, v1 = int(vptr[j]), int(vptr[j + 1])
        out.append(f64[8 * v0:8 * v1] if wide[j] else f32[4 * v0:4 * v1])
    return masks, out
