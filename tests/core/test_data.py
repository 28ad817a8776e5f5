"""Loaders: every kind of dirt is dropped and counted by reason; kept rows are canonical."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.data import (
    CANONICAL_COLUMNS,
    LoadReport,
    clean_purchases,
    iter_events,
    load_online_retail,
    load_purchases,
    load_table,
)
from core.events import PurchaseEvent, parse_purchase
from core.synthetic import make_shop

RETAIL = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "online_retail"
T0 = pd.Timestamp("2024-01-01", tz="UTC").timestamp()

# One clean row per customer A..C plus every kind of dirt, each reason with a known count.
DIRTY_CSV = """\
customer,sku,name,qty,unit_price,when
A,m1,Mug,2,3.5,2024-01-01 10:00:00
B,m2,Plate,1,4.0,2024-01-01 09:00:00
C,m1,Mug,3,3.5,2024-01-02T08:00:00Z
 ,m1,Mug,1,3.5,2024-01-01 10:00:00
,m1,Mug,1,3.5,2024-01-01 10:00:00
A,,Mug,1,3.5,2024-01-01 10:00:00
{long},m1,Mug,1,3.5,2024-01-01 10:00:00
A,m1,Mug,abc,3.5,2024-01-01 10:00:00
A,m1,Mug,2,,2024-01-01 10:00:00
A,m1,Mug,2.5,3.5,2024-01-01 10:00:00
A,m1,Mug,0,3.5,2024-01-01 10:00:00
A,m1,Mug,-3,3.5,2024-01-01 10:00:00
A,m1,Mug,1,0,2024-01-01 10:00:00
A,m1,Mug,1,-2,2024-01-01 10:00:00
A,m1,Mug,1,3.5,not a date
A,m1,Mug,1,3.5,2024-13-45 10:00:00
A,m1,Mug,2,3.5,2024-01-01 10:00:00
""".format(long="x" * 600)
MAPPING = {"user_id": "customer", "item_id": "sku", "item_name": "name", "quantity": "qty",
           "price": "unit_price", "ts": "when"}
EXPECTED_DROPS = {
    "missing_customer": 2, "missing_item": 1, "field_too_long": 1, "unparseable_number": 2,
    "non_integer_quantity": 1, "non_positive_quantity": 2, "non_positive_price": 2,
    "unparseable_timestamp": 2, "duplicate": 1,
}


@pytest.fixture
def dirty_csv(tmp_path: Path) -> Path:
    path = tmp_path / "purchases.csv"
    path.write_text(DIRTY_CSV)
    return path


def test_table_csv_counts_every_reason(dirty_csv: Path):
    frame, report = load_table(dirty_csv, MAPPING)
    assert report.rows_in == 17 and report.rows_kept == 3
    assert report.dropped == EXPECTED_DROPS
    assert list(frame.columns) == list(CANONICAL_COLUMNS)
    assert frame["user_id"].tolist() == ["B", "A", "C"]  # sorted by ts
    assert frame["quantity"].tolist() == [1, 2, 3]
    assert frame["ts"].tolist() == [T0 + 9 * 3600, T0 + 10 * 3600, T0 + 86400 + 8 * 3600]
    assert frame["item_name"].tolist() == ["Plate", "Mug", "Mug"]
    assert frame.dtypes.astype(str).tolist()[4:] == ["int64", "float64", "float64"]
    assert frame["event_id"].is_unique
    again, _ = load_table(dirty_csv, MAPPING)
    assert again["event_id"].tolist() == frame["event_id"].tolist()  # content-based ids


def test_report_summary_is_readable(dirty_csv: Path):
    _, report = load_table(dirty_csv, MAPPING)
    text = report.summary()
    assert text.startswith("purchases.csv: 17 rows read, 3 kept (17.6%); dropped 14:")
    assert "duplicate 1" in text and "unparseable_timestamp 2" in text
    assert LoadReport(0, 0).summary() == "0 rows read, 0 kept (100.0%); nothing dropped"
    with pytest.raises(ValueError):
        LoadReport(5, 3, {"duplicate": 1})


def test_table_parquet_with_native_types(tmp_path: Path):
    raw = pd.DataFrame({
        "event_id": ["e1", "e2", "e2", None, "e4", "e5"],
        "user_id": [17850.0, 17851.0, 17851.0, 17852.0, np.nan, 17853.0],
        "item_id": ["a", "b", "b", "c", "d", "e"],
        "quantity": [1, 2, 2, 3, 1, -1],
        "price": [1.0, 2.0, 2.0, 3.0, 1.0, 1.0],
        "ts": pd.to_datetime(["2024-01-03", "2024-01-02", "2024-01-02", "2024-01-01",
                              "2024-01-01", "2024-01-01"], utc=True),
    })
    path = tmp_path / "p.parquet"
    raw.to_parquet(path)
    frame, report = load_table(path)
    assert report.dropped == {"missing_customer": 1, "non_positive_quantity": 1, "duplicate": 1}
    assert frame["user_id"].tolist() == ["17852", "17851", "17850"]  # integral float ids
    assert frame["event_id"].tolist()[1:] == ["e2", "e1"]
    assert frame["event_id"][0].startswith("h")  # generated for the row without an id
    assert frame["item_name"].tolist() == ["c", "b", "a"]  # defaults to item_id
    assert frame["ts"].tolist() == [T0, T0 + 86400, T0 + 2 * 86400]


@pytest.mark.parametrize(
    ("values", "kw", "expected"),
    [
        (["1704067200", "1704067200.5"], {}, [T0, T0 + 0.5]),
        (["1704067200000"], {"ts_unit": "ms"}, [T0]),
        (["02/01/2024 03:04"], {"ts_format": "%d/%m/%Y %H:%M"}, [T0 + 86400 + 3 * 3600 + 4 * 60]),
        (["1/1/2024 8:26", "2024-01-01"], {}, [T0, T0 + 8 * 3600 + 26 * 60]),
        (["2024-01-01T01:00:00+01:00"], {}, [T0]),
    ],
)
def test_timestamp_layouts(tmp_path: Path, values, kw, expected):
    path = tmp_path / "t.csv"
    rows = [f"u{k},i,1,1.0,{v}" for k, v in enumerate(values)]
    path.write_text("user_id,item_id,quantity,price,ts\n" + "\n".join(rows) + "\n")
    frame, report = load_table(path, **kw)
    assert report.rows_kept == len(values)
    assert sorted(frame["ts"].tolist()) == expected


def test_numeric_timestamps_in_milliseconds_from_parquet(tmp_path: Path):
    raw = pd.DataFrame({"u": ["a"], "i": ["b"], "quantity": [1], "price": [2.0], "t": [1704067200000]})
    raw.to_parquet(tmp_path / "x.pq")
    frame, _ = load_table(tmp_path / "x.pq", {"user_id": "u", "item_id": "i", "ts": "t"}, ts_unit="ms")
    assert frame["ts"].tolist() == [T0]


def test_missing_price_defaults_to_free_and_quantity_to_one(tmp_path: Path):
    (tmp_path / "m.csv").write_text("user_id,item_id,ts\na,b,2024-01-01\n")
    frame, report = load_table(tmp_path / "m.csv")
    assert report.rows_kept == 1 and frame["quantity"].tolist() == [1] and frame["price"].tolist() == [0.0]


def test_clear_errors_for_unusable_files(tmp_path: Path, dirty_csv: Path):
    with pytest.raises(ValueError, match=r"missing column\(s\) \['client'\]"):
        load_table(dirty_csv, {**MAPPING, "user_id": "client"})
    with pytest.raises(ValueError, match="unknown canonical"):
        load_table(dirty_csv, {"customer": "user_id"})
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_table(tmp_path / "x.json")
    with pytest.raises(ValueError, match="unknown format"):
        load_purchases(dirty_csv, fmt="xml")


RAW_RETAIL = """\
InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country
536365,85123A,WHITE HANGING HEART T-LIGHT HOLDER,6.0,2010-12-01 08:26:00,2.55,17850.0,United Kingdom
536365,71053,WHITE METAL LANTERN,6.0,2010-12-01 08:26:00,3.39,17850.0,United Kingdom
536365,71053,WHITE METAL LANTERN,2.0,2010-12-01 08:26:00,3.39,17850.0,United Kingdom
536365,71053,WHITE METAL LANTERN,2.0,2010-12-01 08:26:00,3.39,17850.0,United Kingdom
C536379,D,Discount,-1.0,2010-12-01 09:41:00,27.5,14527.0,United Kingdom
536414,22139,,56.0,2010-12-01 11:52:00,0.0,,United Kingdom
536544,21773,DECORATIVE ROSE BATHROOM BOTTLE,1.0,2010-12-01 14:32:00,2.51,,United Kingdom
536370,22728,ALARM CLOCK BAKELIKE PINK,24.0,2010-12-01 08:45:00,3.75,12583.0,EIRE
536370,22727,ALARM CLOCK BAKELIKE RED,24.0,2010-12-01 08:45:00,0.0,12583.0,France
536380,22961,JAM MAKING SET PRINTED,-24.0,2010-12-01 09:41:00,1.45,17809.0,United Kingdom
536381,22139,RETROSPOT TEA SET CERAMIC 11 PC,1.0,yesterday,4.95,15311.0,United Kingdom
"""


@pytest.fixture
def raw_retail(tmp_path: Path) -> Path:
    path = tmp_path / "online_retail.csv.gz"
    with gzip.open(path, "wt") as fh:
        fh.write(RAW_RETAIL)
    return path


def test_online_retail_normal_mode(raw_retail: Path):
    frame, report = load_online_retail(raw_retail)
    assert report.rows_in == 11
    assert report.dropped == {"cancelled": 1, "missing_customer": 2, "non_positive_quantity": 1,
                              "non_positive_price": 1, "unparseable_timestamp": 1, "duplicate": 1}
    assert frame["event_id"].tolist() == ["536365:85123A:0", "536365:71053:0", "536365:71053:1",
                                          "536370:22728:0"]
    assert frame["item_id"].tolist() == ["85123A", "71053", "71053", "22728"]
    assert frame["user_id"].tolist() == ["17850", "17850", "17850", "12583"]
    assert frame["quantity"].tolist() == [6, 6, 2, 24]
    assert frame["ts"].iloc[0] == pd.Timestamp("2010-12-01 08:26:00", tz="UTC").timestamp()


def test_online_retail_paper_mode(raw_retail: Path):
    frame, report = load_online_retail(raw_retail, paper_filter=True)
    assert report.dropped == {"cancelled": 1, "excluded_country": 1, "missing_customer": 2,
                              "non_positive_quantity": 1, "unparseable_timestamp": 1, "duplicate": 1}
    assert frame["item_id"].tolist()[-1] == "ALARM CLOCK BAKELIKE RED"  # items are descriptions
    assert frame["price"].tolist()[-1] == 0.0  # the paper kept free lines
    assert frame["event_id"].tolist()[-1] == "536370:22727:0"  # same ids as in normal mode


def test_load_purchases_detects_the_format(raw_retail: Path, dirty_csv: Path):
    retail, _ = load_purchases(raw_retail)
    assert retail["event_id"].iloc[0] == "536365:85123A:0"
    table, report = load_purchases(dirty_csv, mapping=MAPPING)
    assert report.rows_kept == 3
    paper, _ = load_purchases(raw_retail, fmt="online-retail", paper_filter=True)
    assert "ALARM CLOCK BAKELIKE RED" in set(paper["item_id"])


@pytest.mark.skipif(not (RETAIL / "online_retail.csv.gz").exists(), reason="shared data absent")
def test_paper_filter_reproduces_the_paper_graph():
    frame, report = load_online_retail(RETAIL / "online_retail.csv.gz", paper_filter=True)
    assert report.rows_in == 541_909
    assert frame["user_id"].nunique() == 4_297
    assert frame["item_id"].nunique() == 3_846
    pairs = frame[["user_id", "item_id"]].drop_duplicates()
    assert len(pairs) == 263_267
    split = pd.read_csv(RETAIL / "split.csv.gz", dtype=str, usecols=["CustomerID", "Description"])
    split.columns = ["user_id", "item_id"]
    both = pairs.merge(split, how="outer", indicator=True)
    assert len(both) == 263_267 and (both["_merge"] == "both").all()
    assert frame["event_id"].is_unique


def test_iter_events_round_trip_in_time_order():
    shop = make_shop(n_users=60, n_items=50, n_personas=4, seed=5)
    shuffled = shop.frame.sample(frac=1.0, random_state=0)
    events = list(iter_events(shuffled))
    assert len(events) == len(shop.frame)
    assert [e.ts for e in events] == sorted(e.ts for e in events)
    for event in events:
        assert parse_purchase(event.to_json()) == event
        assert type(event.quantity) is int and type(event.price) is float
    assert pd.DataFrame([e.to_dict() for e in events]).equals(shop.frame)
    with pytest.raises(ValueError, match="missing"):
        next(iter_events(shop.frame.drop(columns="price")))


_cells = st.sampled_from(["", " ", "a", "b", "17850.0", "1", "2", "-1", "0", "2.5", "x", "nan",
                          "2024-01-01", "2024-02-30", "1704067200"])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(_cells, _cells, _cells, _cells, _cells), min_size=0, max_size=25))
def test_any_rows_are_all_accounted_for_and_kept_rows_are_valid(rows):
    staged = pd.DataFrame(rows, columns=["user_id", "item_id", "quantity", "price", "ts"], dtype=object)
    frame, report = clean_purchases(staged.replace({"": None}))
    assert report.rows_in == len(rows) == report.rows_kept + sum(report.dropped.values())
    assert len(frame) == report.rows_kept and frame["event_id"].is_unique
    no_price = bool(rows) and all(r[3] == "0" for r in rows)  # a column of zeros means "no price"
    assert no_price == any("all zero" in n for n in report.notes)
    for event in iter_events(frame):
        assert parse_purchase(event.to_dict()) == event
        assert event.quantity > 0 and np.isfinite(event.ts)
        assert event.price == 0 if no_price else event.price > 0
    assert not frame.duplicated(subset=[c for c in CANONICAL_COLUMNS if c != "event_id"]).any()


def test_events_and_frame_share_one_schema():
    assert CANONICAL_COLUMNS == tuple(PurchaseEvent.__dataclass_fields__)


# -- column mappings, optional ts, shops without prices (issue 11) ------------------------------
GROCERY = """\
order_id,customer,order_number,product_id,product_name,price
o1,u1,1,p1,Bananas,0
o1,u1,1,p2,Milk,0
o2,u2,1,p1,Bananas,0
o3,u1,2,p3,Bread,0
"""


def test_column_mapping_from_flags_and_schema_files(tmp_path: Path):
    from core.data import load_schema, parse_columns, source_options

    flags = "user_id=customer,item_id=product_id,item_name=product_name,ts=order_number"
    expected = {"user_id": "customer", "item_id": "product_id", "item_name": "product_name", "ts": "order_number"}
    assert parse_columns(flags) == expected
    (tmp_path / "flat.yaml").write_text("".join(f"{k}: {v}\n" for k, v in expected.items()))
    (tmp_path / "nested.json").write_text('{"columns": {"user_id": "customer"}, "ts_unit": "D"}')
    assert load_schema(tmp_path / "flat.yaml") == {"mapping": expected}
    assert load_schema(tmp_path / "nested.json") == {"mapping": {"user_id": "customer"}, "ts_unit": "D"}
    merged = source_options("item_id=sku", tmp_path / "nested.json")  # the flags win over the file
    assert merged == {"mapping": {"user_id": "customer", "item_id": "sku"}, "ts_unit": "D"}
    for bad, message in (("user_id", "expected CANONICAL=SOURCE"), ("customer=user_id", "unknown canonical"),
                         ("user_id=a,user_id=b", "twice")):
        with pytest.raises(ValueError, match=message):
            parse_columns(bad)
    (tmp_path / "typo.yaml").write_text("columns: {user_id: a}\nts_fromat: '%Y'\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['ts_fromat'\]"):
        load_schema(tmp_path / "typo.yaml")
    with pytest.raises(ValueError, match="no such file|No such file"):
        load_schema(tmp_path / "absent.yaml")


def test_order_numbers_as_ts_and_a_zero_price_column_is_no_price(tmp_path: Path):
    path = tmp_path / "orders.csv"
    path.write_text(GROCERY)
    mapping = {"user_id": "customer", "item_id": "product_id", "item_name": "product_name", "ts": "order_number"}
    frame, report = load_table(path, mapping)
    assert report.rows_kept == 4 and not report.dropped  # not 4 x non_positive_price
    assert frame["price"].tolist() == [0.0] * 4 and frame["ts"].tolist() == [1.0, 1.0, 1.0, 2.0]
    text = report.describe()
    assert "user_id <- customer" in text and "ts <- order_number" in text and "event_id <- (generated)" in text
    assert "price column is all zero" in text and "read as a sequence" in text
    # one real price among zeros: the zeros are bad rows again
    path.write_text(GROCERY.replace("p3,Bread,0", "p3,Bread,2.5"))
    _, report = load_table(path, mapping)
    assert report.dropped == {"non_positive_price": 3}


def test_ts_is_optional_only_when_not_required(tmp_path: Path):
    path = tmp_path / "orders.csv"
    path.write_text(GROCERY)
    mapping = {"user_id": "customer", "item_id": "product_id"}
    with pytest.raises(ValueError, match=r"missing column\(s\) \['ts'\]; the file has \['order_id', 'customer'"):
        load_table(path, mapping)
    frame, report = load_table(path, mapping, require_ts=False)
    assert frame["user_id"].tolist() == ["u1", "u1", "u2", "u1"]  # file order kept
    assert frame["ts"].tolist() == [0.0, 1.0, 2.0, 3.0] and "ts <- (file order)" in report.describe()
    with pytest.raises(ValueError, match=r"missing column\(s\) \['when'\]"):  # a named ts must exist
        load_table(path, {**mapping, "ts": "when"}, require_ts=False)
    frame, _ = load_purchases(path, mapping=mapping, require_ts=False)  # auto: a mapping means a table
    assert len(frame) == 4


def test_a_broken_schema_file_is_one_clear_error(tmp_path: Path):
    from core.data import load_schema

    (tmp_path / "s.yaml").write_text("columns: [user_id: a\n")
    (tmp_path / "s.json").write_text('{"user_id": ')
    (tmp_path / "list.yaml").write_text("- user_id\n")
    for name, message in (("s.yaml", "not valid YAML"), ("s.json", "not valid JSON"),
                          ("list.yaml", "expected a mapping")):
        with pytest.raises(ValueError, match=message) as exc:
            load_schema(tmp_path / name)
        assert "\n" not in str(exc.value)
