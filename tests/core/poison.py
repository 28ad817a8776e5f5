"""Hostile purchase records, each with the dead-letter reason it must get (issue 9).

Shared by the unit test of `core.events.parse_purchase` and the broker test of the worker
(tests/streams/test_poison.py), so both check the same kinds.
"""
from __future__ import annotations

import json

__all__ = ["valid", "POISON"]


def valid(event_id: str, user: str = "u", item: str = "i", **over) -> dict:
    body = {"event_id": event_id, "user_id": user, "item_id": item, "item_name": item,
            "quantity": 1, "price": 2.5, "ts": 1_700_000_000}
    body.update(over)
    return body


def _raw(body: dict, key: str, literal: str) -> bytes:
    """`body` as JSON with field `key` replaced by the literal JSON text `literal`."""
    marker = "\u0000MARK\u0000"
    return json.dumps({**body, key: marker}).replace(json.dumps(marker), literal).encode()


_DEEP = 10_000
#: (kind, payload bytes, reason)
POISON: list[tuple[str, bytes, str]] = [
    ("deep_array", b"[" * _DEEP + b"]" * _DEEP, "too_deep"),
    ("deep_object_in_field", _raw(valid("p1"), "item_name", '{"a":' * 5000 + "1" + "}" * 5000), "too_deep"),
    ("deep_inside_string_ok_then_deep", _raw(valid("p2", item_name="[[[[[[[[[[[[[[[[[[[[[[[[["), "x",
                                                  "[" * 3000 + "]" * 3000), "too_deep"),
    ("huge_int_quantity", _raw(valid("p3"), "quantity", "9" * 400), "out_of_range"),
    ("huge_int_price", _raw(valid("p4"), "price", "7" * 300), "out_of_range"),
    ("huge_int_ts_5000_digits", _raw(valid("p5"), "ts", "1" * 5000), "out_of_range"),
    ("huge_int_event_id", _raw(valid("p6"), "event_id", "3" * 5000), "out_of_range"),
    ("lone_surrogate_user", _raw(valid("p7"), "user_id", '"ab\\ud800cd"'), "invalid_text"),
    ("lone_surrogate_item", _raw(valid("p8"), "item_id", '"\\udfff"'), "invalid_text"),
    ("lone_surrogate_item_name", _raw(valid("p9"), "item_name", '"mug \\ud83d"'), "invalid_text"),
    ("quantity_2_pow_63", _raw(valid("p10"), "quantity", str(2**63)), "out_of_range"),
    ("quantity_2_pow_31", _raw(valid("p11"), "quantity", str(2**31)), "out_of_range"),
    ("item_name_900_kb", json.dumps(valid("p12", item_name="z" * 900_000)).encode(), "oversized"),
    ("price_1e400", _raw(valid("p13"), "price", "1e400"), "wrong_type"),
    ("ts_NaN", _raw(valid("p14"), "ts", "NaN"), "wrong_type"),
    ("quantity_-Infinity", _raw(valid("p15"), "quantity", "-Infinity"), "wrong_type"),
    ("ts_1e300", _raw(valid("p16"), "ts", "1e300"), "out_of_range"),
    ("price_1e13", _raw(valid("p17"), "price", "1e13"), "out_of_range"),
    ("invalid_utf8", b'{"event_id": "p18", "user_id": "\xff\xfe"}', "malformed_json"),
    ("utf8_bom", b"\xef\xbb\xbf" + json.dumps(valid("p19")).encode(), "malformed_json"),
    ("truncated", json.dumps(valid("p20")).encode()[:-5], "malformed_json"),
    ("empty", b"", "malformed_json"),
    ("json_null", b"null", "not_an_object"),
    ("user_object", json.dumps(valid("p21", user={"a": 1})).encode(), "wrong_type"),
    ("user_list", json.dumps(valid("p22", user=["a"])).encode(), "wrong_type"),
    ("user_blank", json.dumps(valid("p23", user="   ")).encode(), "missing_field"),
    ("quantity_bool", json.dumps(valid("p24", quantity=True)).encode(), "wrong_type"),
    ("quantity_fraction", json.dumps(valid("p25", quantity=2.5)).encode(), "wrong_type"),
    ("quantity_zero", json.dumps(valid("p26", quantity=0)).encode(), "non_positive_quantity"),
    ("price_negative", json.dumps(valid("p27", price=-1)).encode(), "negative_price"),
    ("item_id_600_chars", json.dumps(valid("p28", item="i" * 600)).encode(), "field_too_long"),
    ("quote_backslash_flood", b'"' + b'\\"' * 30_000, "malformed_json"),
    ("bracket_flood_in_strings_is_fine_but_truncated", b'{"a": "' + b"[" * 40_000, "malformed_json"),
]
