"""Batch loaders that turn purchase files into the canonical purchases frame.

The canonical frame has exactly the fields of `PurchaseEvent` (event_id, user_id, item_id,
item_name: str; quantity: int64; price, ts: float64 unix seconds), sorted by `ts`. Every loader
stages its source into those columns and hands them to the one cleaning function, `clean_purchases`,
which drops bad rows by reason and counts them in a `LoadReport`: a bad row never crashes a load
and is never lost silently.

>>> import io
>>> csv = io.StringIO("u,i,q,p,t\\nA,mug,2,3.5,2024-01-01\\nB,mug,-1,3.5,2024-01-02\\n")
>>> frame, report = load_table(csv, {"user_id": "u", "item_id": "i", "quantity": "q",
...                                  "price": "p", "ts": "t"})
>>> len(frame), report.dropped
(1, {'non_positive_quantity': 1})
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
import pandas as pd

from core.events import _MAX_TEXT, PurchaseEvent  # one length limit for loaders and the stream

__all__ = [
    "CANONICAL_COLUMNS",
    "LoadReport",
    "clean_purchases",
    "load_online_retail",
    "load_table",
    "load_purchases",
    "load_schema",
    "parse_columns",
    "source_options",
    "iter_events",
    "PAPER_EXCLUDED_COUNTRIES",
]

log = logging.getLogger(__name__)

CANONICAL_COLUMNS: tuple[str, ...] = tuple(PurchaseEvent.__dataclass_fields__)
_TEXT = ("event_id", "user_id", "item_id", "item_name")
_PY_TYPES = (str, str, str, str, np.int64, np.float64, np.float64)

# Drop reasons in the order they are checked; a row is counted under its first failing reason.
REASONS: tuple[str, ...] = (
    "missing_customer",
    "missing_item",
    "field_too_long",
    "unparseable_number",
    "non_integer_quantity",
    "non_positive_quantity",
    "non_positive_price",
    "unparseable_timestamp",
    "duplicate",
)

# The re-export the paper used lacks these countries (see the data README).
PAPER_EXCLUDED_COUNTRIES = frozenset({
    "Canada", "Channel Islands", "Cyprus", "Czech Republic", "Denmark", "EIRE",
    "European Community", "Finland",
})
_RETAIL_COLUMNS = ("InvoiceNo", "StockCode", "Description", "Quantity", "InvoiceDate",
                   "UnitPrice", "CustomerID", "Country")

PathLike = str | Path | IO[str] | IO[bytes]


@dataclass(frozen=True)
class LoadReport:
    """How many rows came in, how many were kept, and why each other row was dropped."""

    rows_in: int
    rows_kept: int
    dropped: dict[str, int] = field(default_factory=dict)
    source: str = ""
    columns: tuple[tuple[str, str], ...] = ()  # (canonical, where it came from), for the user
    notes: tuple[str, ...] = ()  # what the loader assumed (no price, no ts, ...)

    def __post_init__(self) -> None:
        if self.rows_in != self.rows_kept + sum(self.dropped.values()):
            raise ValueError("LoadReport does not add up: rows_in != rows_kept + dropped")

    def summary(self) -> str:
        """One readable line, e.g. ``x.csv: 10 rows read, 8 kept (80.0%); dropped 2: duplicate 2``."""
        share = 100.0 * self.rows_kept / self.rows_in if self.rows_in else 100.0
        head = f"{self.source + ': ' if self.source else ''}{self.rows_in:,} rows read, " \
               f"{self.rows_kept:,} kept ({share:.1f}%)"
        if not self.dropped:
            return head + "; nothing dropped"
        parts = ", ".join(f"{reason} {n:,}" for reason, n in self.dropped.items())
        return f"{head}; dropped {self.rows_in - self.rows_kept:,}: {parts}"

    def describe(self) -> str:
        """The column mapping, the cleaning summary and the loader's assumptions, one line each:
        what every command prints before it starts, so a wrong mapping shows at once."""
        lines = []
        if self.columns:
            lines.append("columns: " + ", ".join(f"{c} <- {src}" for c, src in self.columns))
        lines.append(self.summary())
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


# -- the one cleaning function -------------------------------------------------------------------
def _as_text(values: pd.Series) -> pd.Series:
    """Strings with surrounding blanks removed; missing stays missing.

    Integral float ids (17850.0, as pandas reads an int column with gaps) become "17850".
    """
    if pd.api.types.is_float_dtype(values.dtype):
        finite = values.dropna()
        if len(finite) and np.all(np.mod(finite.to_numpy(), 1) == 0):
            values = values.astype("Int64")
    out = values.astype("string").str.strip()
    return out.mask(out == "")


def _to_number(values: pd.Series) -> pd.Series:
    """float64 with NaN where a value is missing or not a finite number."""
    num = pd.to_numeric(values, errors="coerce").astype(np.float64)
    return num.where(np.isfinite(num))


def _to_unix_seconds(values: pd.Series, ts_format: str | None, ts_unit: str) -> pd.Series:
    """Unix seconds from numbers (in `ts_unit`), datetimes or date strings; NaN when unparseable.

    Naive dates are read as UTC. Without `ts_format`, numbers written as text count as numbers,
    ISO 8601 is tried next (fast) and only the remaining rows go through the per-value parser.
    """
    per_unit = pd.Timedelta(1, ts_unit).total_seconds()
    if pd.api.types.is_datetime64_any_dtype(values.dtype):
        parsed = pd.to_datetime(values, utc=True)
        return (parsed - pd.Timestamp(0, tz="UTC")).dt.total_seconds().astype(np.float64)
    if pd.api.types.is_numeric_dtype(values.dtype) and not pd.api.types.is_bool_dtype(values.dtype):
        return pd.to_numeric(values, errors="coerce").astype(np.float64) * per_unit
    text = values.astype("string").str.strip()
    if ts_format is not None:
        parsed = pd.to_datetime(text, format=ts_format, errors="coerce", utc=True)
        return (parsed - pd.Timestamp(0, tz="UTC")).dt.total_seconds().astype(np.float64)
    seconds = pd.Series(np.nan, index=text.index)
    numeric = text.str.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?").fillna(False).to_numpy(bool)
    seconds[numeric] = pd.to_numeric(text[numeric], errors="coerce").astype(np.float64) * per_unit
    dates = seconds.isna() & text.notna()
    if dates.any():
        parsed = pd.to_datetime(text[dates], format="ISO8601", errors="coerce", utc=True)
        retry = parsed.isna()
        if retry.any():
            parsed[retry] = pd.to_datetime(text[dates][retry], format="mixed", errors="coerce", utc=True)
        seconds[dates] = (parsed - pd.Timestamp(0, tz="UTC")).dt.total_seconds()
    return seconds


def clean_purchases(
    staged: pd.DataFrame,
    *,
    flags: Mapping[str, np.ndarray | pd.Series] | None = None,
    drop_zero_price: bool = True,
    ts_format: str | None = None,
    ts_unit: str = "s",
    event_ids: pd.Series | None = None,
    source: str = "",
) -> tuple[pd.DataFrame, LoadReport]:
    """Validate staged purchases and return (canonical frame sorted by ts, report).

    `staged` holds the canonical columns in any raw form (item_name, quantity, price and event_id
    are optional); extra columns only count towards exact-duplicate detection. `flags` are
    source-specific drop rules (reason -> boolean mask), checked first in their order.
    `event_ids`, when given, names the rows that lack an id (the staged event_id column wins).
    """
    n = len(staged)
    staged = staged.reset_index(drop=True)
    reason = np.full(n, "", dtype=object)

    def drop(name: str, mask: np.ndarray | pd.Series) -> None:
        mask = np.asarray(mask, dtype=bool) & (reason == "")
        reason[mask] = name

    for name, mask in (flags or {}).items():
        drop(name, mask)

    text = {c: _as_text(staged[c]) for c in _TEXT if c in staged}
    if "item_name" not in text:
        text["item_name"] = text["item_id"]
    name_given = "item_name" in staged
    drop("missing_customer", text["user_id"].isna())
    drop("missing_item", text["item_id"].isna() | (text["item_name"].isna() if name_given else False))
    too_long = np.zeros(n, dtype=bool)
    for values in text.values():
        too_long |= (values.str.len() > _MAX_TEXT).fillna(False).to_numpy(dtype=bool)
    drop("field_too_long", too_long)

    quantity = _to_number(staged["quantity"]) if "quantity" in staged else pd.Series(np.ones(n))
    price = _to_number(staged["price"]) if "price" in staged else pd.Series(np.zeros(n))
    notes: list[str] = []
    priced = "price" in staged
    if priced and n and bool((price == 0).all()):
        # A shop without prices often exports a column of zeros: that is "no price", not n bad rows.
        priced = False
        notes.append("price column is all zero: treated as no price (monetary value is constant)")
    drop("unparseable_number", quantity.isna() | price.isna())
    drop("non_integer_quantity", np.mod(quantity.fillna(0), 1) != 0)
    drop("non_positive_quantity", quantity <= 0)
    drop("non_positive_price", (price <= 0) if drop_zero_price and priced else price < 0)
    ts = _to_unix_seconds(staged["ts"], ts_format, ts_unit)
    drop("unparseable_timestamp", ts.isna() | ~np.isfinite(ts.fillna(0)))

    clean = pd.DataFrame({c: text[c] for c in ("user_id", "item_id", "item_name")})
    clean["quantity"], clean["price"], clean["ts"] = quantity, price, ts
    extras = [c for c in staged.columns if c not in CANONICAL_COLUMNS]
    for c in extras:
        clean[c] = staged[c]
    ok = reason == ""
    dup = np.zeros(n, dtype=bool)
    if "event_id" in text:  # a source id names the event: a repeated id is the same purchase
        dup[ok] = text["event_id"][ok].duplicated(keep="first") & text["event_id"][ok].notna()
        missing_id = text["event_id"].isna()
    else:
        dup[ok] = clean[ok].duplicated(keep="first").to_numpy()
        missing_id = pd.Series(np.ones(n, dtype=bool))
    drop("duplicate", dup)

    keep = reason == ""
    frame = clean.loc[keep, ["user_id", "item_id", "item_name", "quantity", "price", "ts"]]
    ids = text["event_id"] if "event_id" in text else pd.Series(pd.NA, index=clean.index, dtype="string")
    fill = missing_id.to_numpy(dtype=bool) & keep
    if fill.any():
        generated = event_ids if event_ids is not None else _content_ids(clean)
        ids = ids.astype("string").mask(pd.Series(fill), generated.astype("string"))
    frame.insert(0, "event_id", ids[keep])
    frame = _canonical(frame)

    counts = pd.Series(reason[~keep]).value_counts()
    order = list((flags or {}).keys()) + list(REASONS)
    report = LoadReport(n, int(keep.sum()), {r: int(counts[r]) for r in order if r in counts}, source,
                        notes=tuple(notes))
    log.debug("%s", report.summary())  # commands print report.describe() themselves
    return frame, report


def _content_ids(clean: pd.DataFrame) -> pd.Series:
    """Deterministic ids from row content, so reloading the same file gives the same ids."""
    cols = ["user_id", "item_id", "quantity", "price", "ts"]
    h = pd.util.hash_pandas_object(clean[cols], index=False).to_numpy(dtype=np.uint64)
    return pd.Series([f"h{v:016x}" for v in h.tolist()], index=clean.index)


def _canonical(frame: pd.DataFrame) -> pd.DataFrame:
    """Fix the dtypes and the time order (stable, so ties keep file order)."""
    out = pd.DataFrame({
        "event_id": frame["event_id"].astype(str),
        "user_id": frame["user_id"].astype(str),
        "item_id": frame["item_id"].astype(str),
        "item_name": frame["item_name"].astype(str),
        "quantity": frame["quantity"].astype(np.int64),
        "price": frame["price"].astype(np.float64),
        "ts": frame["ts"].astype(np.float64),
    })
    return out.sort_values("ts", kind="stable").reset_index(drop=True)


# -- loaders ---------------------------------------------------------------------------------------
def _source_name(path: PathLike) -> str:
    return Path(path).name if isinstance(path, (str, Path)) else getattr(path, "name", "<stream>")


def _read_csv_text(path: PathLike, **kw: Any) -> pd.DataFrame:
    """Every column as text, blanks as missing: parsing is the cleaner's job, not pandas'."""
    return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""], **kw)


def _require(columns: pd.Index, needed: list[str], source: str) -> None:
    missing = [c for c in needed if c not in columns]
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing}; the file has {list(columns)}")


# -- column mappings: one parser for every command -------------------------------------------
SCHEMA_OPTIONS = ("columns", "ts_format", "ts_unit")
_DEFAULTS = {"event_id": "(generated)", "item_name": "(item_id)", "quantity": "(1)",
             "price": "(none)", "ts": "(file order)"}


def parse_columns(text: str) -> dict[str, str]:
    """`user_id=customer,item_id=product_id` -> {"user_id": "customer", "item_id": "product_id"}.

    >>> parse_columns("user_id=customer, ts=order_number")
    {'user_id': 'customer', 'ts': 'order_number'}
    """
    mapping: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, column = (x.strip() for x in part.partition("="))
        if not sep or not name or not column:
            raise ValueError(f"column mapping {part!r}: expected CANONICAL=SOURCE, e.g. user_id=customer")
        if name in mapping:
            raise ValueError(f"column mapping names {name!r} twice")
        mapping[name] = column
    _check_canonical(mapping)
    return mapping


def _check_canonical(mapping: Mapping[str, str]) -> None:
    unknown = set(mapping) - set(CANONICAL_COLUMNS)
    if unknown:
        raise ValueError(f"mapping has unknown canonical column(s) {sorted(unknown)}; "
                         f"known: {list(CANONICAL_COLUMNS)}")


def load_schema(path: str | Path) -> dict[str, object]:
    """`load_table` keyword arguments from a YAML or JSON schema file.

    Either a flat mapping (`user_id: customer`) or `{columns: {...}, ts_format: ..., ts_unit: ...}`.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"schema {path}: {exc.strerror or exc}") from None
    import yaml

    try:  # JSON is YAML too; a .json file is parsed as JSON for exact error positions
        raw = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        detail = " ".join(str(exc).split())
        raise ValueError(f"schema {path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'} "
                         f"({detail})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"schema {path}: expected a mapping such as {{user_id: customer, item_id: sku}}")
    if "columns" not in raw:
        raw = {"columns": raw}
    unknown = set(raw) - set(SCHEMA_OPTIONS)
    if unknown:
        raise ValueError(f"schema {path}: unknown key(s) {sorted(unknown)}; allowed: {list(SCHEMA_OPTIONS)}")
    columns = raw["columns"]
    if not isinstance(columns, dict) or not all(isinstance(v, (str, int)) for v in columns.values()):
        raise ValueError(f"schema {path}: 'columns' must map canonical names to source column names")
    mapping = {str(k): str(v) for k, v in columns.items()}
    _check_canonical(mapping)
    out: dict[str, object] = {"mapping": mapping}
    out.update({k: str(raw[k]) for k in ("ts_format", "ts_unit") if raw.get(k) is not None})
    return out


def source_options(columns: str | None = None, schema: str | Path | None = None) -> dict[str, object]:
    """Loader keyword arguments from `--schema FILE` and `--columns ...` (the flags win)."""
    options: dict[str, object] = load_schema(schema) if schema else {}
    if columns:
        mapping = options.get("mapping", {})
        options["mapping"] = {**(mapping if isinstance(mapping, dict) else {}), **parse_columns(columns)}
    return options


def load_online_retail(path: PathLike, paper_filter: bool = False) -> tuple[pd.DataFrame, LoadReport]:
    """Load the raw UCI Online Retail CSV (`InvoiceNo, StockCode, ..., Country`).

    Normal mode: item_id = StockCode, item_name = Description, all countries, zero prices dropped.
    `paper_filter=True` reproduces the SIGIR paper's graph (4,297 users, 3,846 items, 263,267
    pairs): the 8 countries missing from its re-export are dropped, rows with any missing value
    are dropped, items are unique Descriptions (item_id = Description), and free (price 0) lines
    are kept as the paper kept them. event_id = ``invoice:stockcode:occurrence`` in the raw file
    either way, so the same line has the same id in both modes.
    """
    source = _source_name(path)
    raw = _read_csv_text(path)
    _require(raw.columns, list(_RETAIL_COLUMNS), source)
    customer = raw["CustomerID"].str.strip().str.replace(r"\.0+$", "", regex=True)
    staged = pd.DataFrame({
        "user_id": customer,
        "item_id": raw["Description"] if paper_filter else raw["StockCode"],
        "item_name": raw["Description"],
        "quantity": raw["Quantity"],
        "price": raw["UnitPrice"],
        "ts": raw["InvoiceDate"],
        "invoice": raw["InvoiceNo"],
        "stock_code": raw["StockCode"],
        "country": raw["Country"],
    })
    invoice = raw["InvoiceNo"].fillna("").str.strip()
    flags: dict[str, pd.Series] = {"cancelled": invoice.str.upper().str.startswith("C")}
    if paper_filter:
        flags["excluded_country"] = raw["Country"].str.strip().isin(PAPER_EXCLUDED_COUNTRIES)
        flags["missing_value"] = raw[["InvoiceNo", "StockCode", "InvoiceDate", "Country"]].isna().any(axis=1)
    stock = raw["StockCode"].fillna("").str.strip()
    occurrence = raw.groupby([invoice, stock], sort=False).cumcount().astype(str)
    event_ids = invoice + ":" + stock + ":" + occurrence
    frame, report = clean_purchases(
        staged, flags=flags, drop_zero_price=not paper_filter, event_ids=event_ids, source=source,
    )
    columns = (("event_id", "InvoiceNo:StockCode:n"), ("user_id", "CustomerID"),
               ("item_id", "Description" if paper_filter else "StockCode"), ("item_name", "Description"),
               ("quantity", "Quantity"), ("price", "UnitPrice"), ("ts", "InvoiceDate"))
    return frame, replace(report, columns=columns)


def _suffix_format(path: PathLike) -> Literal["csv", "parquet"]:
    name = _source_name(path).lower()
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".csv", ".csv.gz", ".csv.bz2", ".csv.zip", ".csv.xz", ".tsv", ".txt")) \
            or not isinstance(path, (str, Path)):
        return "csv"
    raise ValueError(f"{name}: unsupported file type (expected .csv[.gz] or .parquet)")


def load_table(
    path: PathLike,
    mapping: Mapping[str, str] | None = None,
    ts_format: str | None = None,
    ts_unit: str = "s",
    drop_zero_price: bool = True,
    require_ts: bool = True,
) -> tuple[pd.DataFrame, LoadReport]:
    """Load a CSV or Parquet purchases table (by suffix; open text streams are read as CSV).

    `mapping` maps canonical names to source columns; canonical names it does not mention are
    looked up under their own name. user_id and item_id are required, ts too unless
    `require_ts=False` (batch commands: the rows then keep file order); event_id is generated
    from row content when absent, item_name defaults to item_id, quantity to 1, price to 0 (a
    price column of zeros counts as no price). Numeric ts are in `ts_unit` ("s", "ms", ...), so
    order sequence numbers work too; text ts are parsed with `ts_format` (strftime) or, without
    it, as ISO 8601 with a slower fallback for other layouts.
    """
    source = _source_name(path)
    mapping = dict(mapping or {})
    _check_canonical(mapping)
    if _suffix_format(path) == "parquet":
        raw = pd.read_parquet(path)
    else:
        sep = "\t" if source.lower().endswith(".tsv") else ","
        raw = _read_csv_text(path, sep=sep)
    ts_col = mapping.get("ts", "ts")
    has_ts = "ts" in mapping or ts_col in raw.columns
    needed = [mapping.get(c, c) for c in ("user_id", "item_id")] + ([ts_col] if has_ts or require_ts else [])
    _require(raw.columns, list(dict.fromkeys([*mapping.values(), *needed])), source)
    staged = pd.DataFrame({
        c: raw[mapping.get(c, c)] for c in CANONICAL_COLUMNS if mapping.get(c, c) in raw.columns
    })
    notes = []
    if not has_ts:
        staged["ts"] = np.arange(len(raw), dtype=np.float64)
        notes.append("no ts column: purchases keep the file's order")
    frame, report = clean_purchases(staged, drop_zero_price=drop_zero_price, ts_format=ts_format,
                                    ts_unit=ts_unit, source=source)
    if has_ts and len(frame) and frame["ts"].abs().max() < 1e6:
        notes.append(f"ts values are small numbers (max {frame['ts'].max():g}): read as a sequence, "
                     "not as dates")
    columns = tuple((c, mapping.get(c, c) if mapping.get(c, c) in raw.columns else _DEFAULTS[c])
                    for c in CANONICAL_COLUMNS)
    return frame, replace(report, columns=columns, notes=report.notes + tuple(notes))


def _looks_like_online_retail(path: PathLike) -> bool:
    if _suffix_format(path) == "parquet":
        import pyarrow.parquet as pq

        columns = pq.read_schema(path).names
    else:
        columns = list(pd.read_csv(path, nrows=0).columns)
        if hasattr(path, "seek"):
            path.seek(0)
    return {"InvoiceNo", "StockCode", "CustomerID"} <= set(columns)


def load_purchases(
    path: PathLike,
    fmt: Literal["auto", "online-retail", "table"] = "auto",
    **kw: Any,
) -> tuple[pd.DataFrame, LoadReport]:
    """Dispatch for the CLI: `auto` picks the Online Retail loader when its columns are present."""
    if fmt == "auto":
        mapped = any(kw.get(k) for k in ("mapping", "ts_format"))
        fmt = "table" if mapped or not _looks_like_online_retail(path) else "online-retail"
    if fmt == "online-retail":
        kw.pop("require_ts", None)
        return load_online_retail(path, **kw)
    if fmt == "table":
        return load_table(path, **kw)
    raise ValueError(f"unknown format {fmt!r}; use auto, online-retail or table")


def iter_events(frame: pd.DataFrame, chunk: int = 65_536) -> Iterator[PurchaseEvent]:
    """Yield the frame's rows as `PurchaseEvent`s in time order (stable for equal timestamps)."""
    missing = [c for c in CANONICAL_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"not a canonical purchases frame: missing {missing}")
    ordered = frame if frame["ts"].is_monotonic_increasing else frame.sort_values("ts", kind="stable")
    ordered = ordered[list(CANONICAL_COLUMNS)]
    for start in range(0, len(ordered), chunk):
        part = ordered.iloc[start:start + chunk]
        columns = [part[c].astype(t).tolist() for c, t in zip(CANONICAL_COLUMNS, _PY_TYPES)]
        for row in zip(*columns):  # tolist() gives plain Python str/int/float
            yield PurchaseEvent(*row)
