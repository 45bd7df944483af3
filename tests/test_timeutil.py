"""Timestamps: Frotcom's ISO-8601 text in, one canonical UTC text out (SPEC "Precise rules")."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.mapping import provider_event_id
from relay.timeutil import (
    _MAX_MS,
    _MIN_MS,
    format_epoch,
    format_ms,
    now_iso,
    parse_instant,
    parse_timestamp,
)

BASE_MS = 1698251371087  # 2023-10-25T16:29:31.087Z
BASE_S = 1698251371000  # 2023-10-25T16:29:31.000Z


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2023-10-25T16:29:31.087Z", "2023-10-25T16:29:31.087Z"),
        ("2023-10-25T16:29:31.087z", "2023-10-25T16:29:31.087Z"),
        ("2023-10-25T16:29:31.087+00:00", "2023-10-25T16:29:31.087Z"),
        ("2023-10-25T16:29:31.087-00:00", "2023-10-25T16:29:31.087Z"),
        # explicit offsets are converted to UTC
        ("2023-10-25T18:29:31.087+02:00", "2023-10-25T16:29:31.087Z"),
        ("2023-10-25T18:29:31.087+0200", "2023-10-25T16:29:31.087Z"),
        ("2023-10-25T18:29:31.087+02", "2023-10-25T16:29:31.087Z"),
        ("2023-10-25T11:59:31.087-04:30", "2023-10-25T16:29:31.087Z"),
        # an offset that crosses midnight and a year boundary
        ("2024-01-01T01:00:00+02:00", "2023-12-31T23:00:00.000Z"),
        # no zone: UTC, as Frotcom documents
        ("2023-10-25T16:29:31.087", "2023-10-25T16:29:31.087Z"),
        ("2023-10-25 16:29:31.087", "2023-10-25T16:29:31.087Z"),
        # no fraction: .000
        ("2023-10-25T16:29:31Z", "2023-10-25T16:29:31.000Z"),
        ("2023-10-25T16:29Z", "2023-10-25T16:29:00.000Z"),
        # fewer than 3 digits are padded, more are truncated (never rounded up)
        ("2023-10-25T16:29:31.5Z", "2023-10-25T16:29:31.500Z"),
        ("2023-10-25T16:29:31.08Z", "2023-10-25T16:29:31.080Z"),
        ("2023-10-25T16:29:31.0879Z", "2023-10-25T16:29:31.087Z"),
        ("2023-10-25T16:29:31.0870000Z", "2023-10-25T16:29:31.087Z"),
        ("2023-10-25T16:29:31.999999999Z", "2023-10-25T16:29:31.999Z"),
        ("2023-10-25T16:29:31.9999+01:00", "2023-10-25T15:29:31.999Z"),
        # leap day, and epoch boundaries
        ("2024-02-29T00:00:00Z", "2024-02-29T00:00:00.000Z"),
        ("1970-01-01T00:00:00Z", "1970-01-01T00:00:00.000Z"),
        ("1969-12-31T23:59:59.999Z", "1969-12-31T23:59:59.999Z"),
        ("9999-12-31T23:59:59.999Z", "9999-12-31T23:59:59.999Z"),
        ("0001-01-01T00:00:00Z", "0001-01-01T00:00:00.000Z"),
    ],
)
def test_parse_then_format_is_canonical_utc(text: str, expected: str) -> None:
    assert format_ms(parse_timestamp(text)) == expected
    # The hot path's shortcut for canonical text gives the same answer as the long way.
    assert parse_instant(text) == (parse_timestamp(text), expected)


@given(st.integers(min_value=_MIN_MS, max_value=_MAX_MS))
def test_canonical_text_round_trips(ms: int) -> None:
    assert parse_instant(format_ms(ms)) == (ms, format_ms(ms))


def test_parse_gives_epoch_milliseconds() -> None:
    assert parse_timestamp("2023-10-25T16:29:31.087Z") == BASE_MS
    assert parse_timestamp("2023-10-25T16:29:31Z") == BASE_S
    assert parse_timestamp("1970-01-01T00:00:00Z") == 0
    assert parse_timestamp("1969-12-31T23:59:59.999Z") == -1


@pytest.mark.parametrize(
    "text",
    [
        "",
        "garbage",
        "2023-10-25",  # a bare date
        "16:29:31",  # a bare time
        "2023-W43-3T16:29:31Z",  # week date
        "2023-298T16:29:31Z",  # ordinal date
        "20231025T162931Z",  # basic format
        "2023-10-25T16:29:31,087Z",  # comma fraction
        "2023-10-25T16:29:31.Z",  # empty fraction
        "2023-10-25T16:29:31.0870000000Z",  # 10 fraction digits
        "2023-10-25t16:29:31Z",
        "2023-10-25T16:29:31 Z",
        " 2023-10-25T16:29:31Z",
        "2023-10-25T16:29:31Z\n",
        "2023-10-25T16:29:31UTC",
        "2023-10-25T16:29:31+2:00",
        "2023-10-25T16:29:31+02:00:00",
        "2023-13-25T16:29:31Z",  # month 13
        "2023-02-29T16:29:31Z",  # not a leap year
        "2023-10-32T16:29:31Z",
        "2023-10-25T24:00:00Z",
        "2023-10-25T16:60:00Z",
        "2023-10-25T23:59:60Z",  # leap second
        "2023-10-25T16:29:31+24:00",  # offset out of range
        "0000-01-01T00:00:00Z",
        "0000-01-01T00:00:00.000Z",  # canonical in shape, but no year 0
        "2023-02-29T16:29:31.000Z",
        "2023-10-25T24:00:00.000Z",
        "\u0662\u0660\u0662\u0663-10-25T16:29:31Z",  # Arabic-Indic digits
        "\uff12\uff10\uff12\uff13-10-25T16:29:31Z",  # fullwidth digits
        # in range locally, out of range in UTC: not formattable, so not an instant
        "9999-12-31T23:59:59-01:00",
        "0001-01-01T00:30:00+01:00",
    ],
)
def test_garbage_is_rejected_with_value_error(text: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the message is for logs only
        parse_timestamp(text)
    with pytest.raises(ValueError):  # noqa: PT011
        parse_instant(text)


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ("2023-10-25T16:29:31.087Z", "2023-10-25T18:29:31.087+02:00"),
        ("2023-10-25T16:29:31.087Z", "2023-10-25T16:29:31.087"),
        ("2023-10-25T16:29:31Z", "2023-10-25T16:29:31.000Z"),
        ("2023-10-25T16:29:31Z", "2023-10-25T16:29:31.000999+00:00"),
        ("2023-10-25T16:29:00Z", "2023-10-25T16:29Z"),
    ],
)
def test_two_spellings_of_one_instant_give_one_provider_event_id(one: str, other: str) -> None:
    assert provider_event_id("frotcom", "9876543", parse_timestamp(one)) == provider_event_id(
        "frotcom", "9876543", parse_timestamp(other)
    )


def test_provider_event_id_shape() -> None:
    assert (
        provider_event_id("frotcom", "9876543", BASE_S)
        == "frotcom:9876543:2023-10-25T16:29:31.000Z"
    )


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "1970-01-01T00:00:00.000Z"),
        (1, "1970-01-01T00:00:00.001Z"),
        (-1, "1969-12-31T23:59:59.999Z"),
        (BASE_MS, "2023-10-25T16:29:31.087Z"),
    ],
)
def test_format_ms(ms: int, text: str) -> None:
    assert format_ms(ms) == text


def test_formatted_text_sorts_like_time() -> None:
    # The outbox orders by event_ts text; that only works if text order is time order.
    instants = [-1, 0, 1, 999, 1000, BASE_S, BASE_MS, BASE_MS + 86_400_000 * 400]
    assert sorted(format_ms(ms) for ms in instants) == [format_ms(ms) for ms in instants]


def test_format_epoch_and_now_iso_use_the_clock() -> None:
    assert format_epoch(1698251371.0875) == "2023-10-25T16:29:31.087Z"
    assert now_iso(lambda: 1698251371.0) == "2023-10-25T16:29:31.000Z"
