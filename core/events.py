"""The one purchase record shared by the batch loaders and the stream.

`parse_purchase` is the single validation gate: the stream sends whatever it rejects to the
dead-letter topic with the `InvalidEvent.reason`, and the loaders count rows by the same reasons.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["PurchaseEvent", "InvalidEvent", "parse_purchase", "decode_json", "check_text", "MAX_PAYLOAD_BYTES",
           "MAX_DEPTH", "REASONS"]

MAX_PAYLOAD_BYTES = 64 * 1024
_MAX_TEXT = 512
#: JSON nesting a purchase may have (it is a flat object: 1). Checked by a linear pre-scan before
#: `json.loads`, whose recursive decoder raises RecursionError a few thousand levels down.
MAX_DEPTH = 16
#: Digits a JSON number may have: int("9" * 5000) raises (Python's int digit limit) and a
#: 400-digit integer overflows float(); no valid field needs more than ~20.
MAX_NUMBER_CHARS = 40
MAX_QUANTITY = 2**31 - 1
MAX_PRICE = 1e12
MAX_ABS_TS = 1e11  # unix seconds: year ~5100; milliseconds by mistake land beyond it
#: Every reason `parse_purchase` can give (docs/operations.md lists what each means).
REASONS = ("oversized", "malformed_json", "too_deep", "not_an_object", "missing_field", "wrong_type",
           "field_too_long", "invalid_text", "out_of_range", "non_positive_quantity", "negative_price")

class InvalidEvent(ValueError):
    """A purchase that cannot be used; `reason` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class PurchaseEvent:
    """One purchase line: `quantity` units of `item_id` bought by `user_id` at `ts` (unix seconds)."""

    event_id: str
    user_id: str
    item_id: str
    item_name: str
    quantity: int
    price: float
    ts: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()


_TEXT_FIELDS = ("event_id", "user_id", "item_id")
_SURROGATE = re.compile("[\ud800-\udfff]")
_STRUCTURE = re.compile(r'[\[\]{}"\\]')


class _Huge(str):
    """A JSON number with more than MAX_NUMBER_CHARS characters, kept as text (never converted)."""


def _bounded_int(text: str) -> int | _Huge:
    return int(text) if len(text) <= MAX_NUMBER_CHARS else _Huge(text)


def _bounded_float(text: str) -> float | _Huge:
    return float(text) if len(text) <= MAX_NUMBER_CHARS else _Huge(text)


def json_depth(text: str, limit: int) -> int:
    """Deepest bracket nesting of JSON `text` outside strings, stopping once past `limit`.

    Linear: it visits only brackets, quotes and backslashes (a valid purchase has two brackets,
    so the count test below skips the walk)."""
    if text.count("[") + text.count("{") <= limit:
        return 0
    depth = deepest = 0
    in_string = False
    skip = -1
    for match in _STRUCTURE.finditer(text):
        pos, char = match.start(), match.group()
        if pos == skip:
            continue
        if in_string:
            if char == "\\":
                skip = pos + 1  # the escaped character, whatever it is
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    return deepest
        elif char in "]}":
            depth -= 1
    return deepest


def decode_json(payload: bytes | str, max_bytes: int = MAX_PAYLOAD_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """JSON text → value, raising only `InvalidEvent` (oversized, malformed_json, too_deep,
    invalid_text): size, UTF-8, nesting depth and number lengths are checked before the
    decoder could recurse, overflow or hit Python's int digit limit. Numbers longer than
    MAX_NUMBER_CHARS come back as text (a `str` subclass), which every numeric check rejects."""
    if isinstance(payload, str):
        if len(payload) > max_bytes:
            raise InvalidEvent("oversized", f"{len(payload)} characters > {max_bytes}")
        try:
            raw = payload.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidEvent("invalid_text", "not encodable as UTF-8 (lone surrogate)") from None
    else:
        raw = bytes(payload)
    if len(raw) > max_bytes:
        raise InvalidEvent("oversized", f"{len(raw)} bytes > {max_bytes}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidEvent("malformed_json", f"not UTF-8: {exc}"[:200]) from None
    depth = json_depth(text, max_depth)
    if depth > max_depth:
        raise InvalidEvent("too_deep", f"nesting deeper than {max_depth}")
    try:
        return json.loads(text, parse_int=_bounded_int, parse_float=_bounded_float)
    except (json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise InvalidEvent("malformed_json", str(exc)[:200]) from None


def check_text(value: Any, key: str, max_len: int = _MAX_TEXT, allow_int: bool = False) -> str:
    """A non-empty, stripped string of at most `max_len` characters that encodes to UTF-8
    (Kafka keys and partition hashes need the bytes); else `InvalidEvent`."""
    if isinstance(value, _Huge) or (isinstance(value, int) and not isinstance(value, bool)
                                    and allow_int and abs(value) >= 10**MAX_NUMBER_CHARS):
        raise InvalidEvent("out_of_range", f"{key} has too many digits")
    if isinstance(value, bool) or not isinstance(value, (str, int) if allow_int else str):
        raise InvalidEvent("wrong_type", f"{key} must be a string")
    text = str(value)
    if len(text) > max_len * 4:  # before strip(): bounded work on hostile input
        raise InvalidEvent("field_too_long", key)
    text = text.strip()
    if not text:
        raise InvalidEvent("missing_field", key)
    if len(text) > max_len:
        raise InvalidEvent("field_too_long", key)
    if _SURROGATE.search(text):
        raise InvalidEvent("invalid_text", f"{key} holds a lone UTF-16 surrogate")
    return text


def _text(payload: Mapping[str, Any], key: str, required: bool = True) -> str:
    if key not in payload or payload[key] is None:
        if required:
            raise InvalidEvent("missing_field", key)
        return ""
    value = payload[key]
    if not required and isinstance(value, str) and not value.strip():
        return ""
    return check_text(value, key, allow_int=True)


def _number(payload: Mapping[str, Any], key: str, low: float, high: float) -> float:
    """A finite number in [low, high], range-checked before any conversion."""
    if key not in payload or payload[key] is None:
        raise InvalidEvent("missing_field", key)
    value = payload[key]
    if isinstance(value, _Huge):
        raise InvalidEvent("out_of_range", f"{key} has more than {MAX_NUMBER_CHARS} characters")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidEvent("wrong_type", f"{key} must be a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidEvent("wrong_type", f"{key} must be finite")
    if not low <= value <= high:  # int vs float comparison is exact in Python, never overflows
        raise InvalidEvent("out_of_range", f"{key} outside [{low:g}, {high:g}]")
    return float(value)


def parse_purchase(payload: bytes | str | Mapping[str, Any]) -> PurchaseEvent:
    """Validate raw JSON (or an already decoded mapping) into a `PurchaseEvent`.

    Raises `InvalidEvent` (never anything else) with one of `REASONS`: oversized,
    malformed_json, too_deep, not_an_object, missing_field, wrong_type, field_too_long,
    invalid_text (a lone surrogate), out_of_range (quantity > 2^31-1, price > 1e12,
    |ts| > 1e11, a number of more than 40 characters), non_positive_quantity, negative_price.

    >>> parse_purchase(b'{"event_id":"e1","user_id":"u","item_id":"i","item_name":"Mug",'
    ...                b'"quantity":2,"price":1.5,"ts":0}').quantity
    2
    """
    if isinstance(payload, (bytes, bytearray, memoryview, str)):
        payload = decode_json(payload)
    if not isinstance(payload, Mapping):
        raise InvalidEvent("not_an_object", type(payload).__name__)
    event_id, user_id, item_id = (_text(payload, k) for k in _TEXT_FIELDS)
    item_name = _text(payload, "item_name", required=False) or item_id
    quantity = _number(payload, "quantity", -math.inf, MAX_QUANTITY)
    if quantity != int(quantity):
        raise InvalidEvent("wrong_type", "quantity must be an integer")
    if quantity <= 0:
        raise InvalidEvent("non_positive_quantity", f"{quantity:g}")
    price = _number(payload, "price", -math.inf, MAX_PRICE)
    if price < 0:
        raise InvalidEvent("negative_price", f"{price:g}")
    ts = _number(payload, "ts", -MAX_ABS_TS, MAX_ABS_TS)
    return PurchaseEvent(event_id, user_id, item_id, item_name, int(quantity), price, ts)
