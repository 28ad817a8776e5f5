"""`parse_purchase` never raises anything but `InvalidEvent`, and bounds every check (issue 9)."""
from __future__ import annotations

import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.events import MAX_DEPTH, REASONS, InvalidEvent, decode_json, json_depth, parse_purchase
from tests.core.poison import POISON, valid


@pytest.mark.parametrize("kind,payload,reason", POISON, ids=[k for k, _, _ in POISON])
def test_each_poison_kind_is_rejected_with_its_reason(kind, payload, reason):
    with pytest.raises(InvalidEvent) as err:
        parse_purchase(payload)
    assert err.value.reason == reason, (kind, err.value)
    assert reason in REASONS


def test_poison_is_rejected_in_bounded_time():
    start = time.process_time()
    for _, payload, _ in POISON:
        with pytest.raises(InvalidEvent):
            parse_purchase(payload)
    assert time.process_time() - start < 5.0  # the quadratic regex scan took minutes


def test_limits_are_inclusive_at_the_edge():
    assert parse_purchase(json.dumps(valid("e", quantity=2**31 - 1)).encode()).quantity == 2**31 - 1
    assert parse_purchase(json.dumps(valid("e", price=1e12)).encode()).price == 1e12
    nested_ok = json.dumps({**valid("e"), "extra": json.loads("[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1))})
    assert parse_purchase(nested_ok.encode()).event_id == "e"
    too_deep = json.dumps({**valid("e"), "extra": json.loads("[" * MAX_DEPTH + "]" * MAX_DEPTH)})
    with pytest.raises(InvalidEvent, match="too_deep"):
        parse_purchase(too_deep.encode())


def test_brackets_inside_strings_do_not_count_as_depth():
    name = "[{" * 200 + '\\"' + "]}" * 5
    event = parse_purchase(json.dumps(valid("e", item_name=name[:500])).encode())
    assert event.item_name.startswith("[{[{")
    assert json_depth('{"a": "[[[[\\"[[[[", "b": [[1]]}', 2) == 3


def test_str_payload_with_a_lone_surrogate_is_invalid_text():
    with pytest.raises(InvalidEvent, match="invalid_text"):
        decode_json('{"user_id": "\ud800"}')


_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                     st.text(max_size=30))
_json = st.recursive(
    _scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(["event_id", "user_id", "item_id", "item_name", "quantity", "price", "ts"]),
       value=_json)
def test_any_field_value_is_accepted_or_rejected_never_crashes(field, value):
    try:
        payload = json.dumps({**valid("e"), field: value}).encode()
    except ValueError:
        return
    try:
        event = parse_purchase(payload)
    except InvalidEvent as exc:
        assert exc.reason in REASONS
        return
    assert 1 <= event.quantity < 2**31 and 0 <= event.price <= 1e12
    event.user_id.encode("utf-8"), event.item_id.encode("utf-8")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_any_bytes_are_accepted_or_rejected_never_crash(raw):
    try:
        parse_purchase(raw)
    except InvalidEvent as exc:
        assert exc.reason in REASONS
