"""Durations and read schedules: parsing, ordering, rejection of bad text, formatting."""

import math

import pytest

from hwctl.schedule import ScheduleError, format_duration, parse_duration_s, parse_schedule

MINUTE_S = 60.0
HOUR_S = 60 * MINUTE_S
DAY_S = 24 * HOUR_S


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("25s", 25.0),
        ("250ms", 0.25),
        ("10min", 10 * MINUTE_S),
        ("1.5h", 1.5 * HOUR_S),
        ("1d", DAY_S),
        ("2w", 14 * DAY_S),
        ("3600", 3600.0),
        (" 25 s ", 25.0),
        ("1H", HOUR_S),
        ("1e3s", 1000.0),
        (".5min", 30.0),
        (3600, 3600.0),
        (2.5, 2.5),
    ],
)
def test_duration_units(text, seconds):
    assert parse_duration_s(text) == pytest.approx(seconds, rel=1e-12)


def test_duration_unknown_unit_names_text_and_units():
    with pytest.raises(ScheduleError) as error:
        parse_duration_s("5m")
    message = str(error.value)
    assert "'5m'" in message
    assert "unknown unit 'm'" in message
    for unit in ("ms", "s", "min", "h", "d", "w"):
        assert unit in message


@pytest.mark.parametrize("text", ["", "abc", "1h30min", "h", "1..5s", "--1s"])
def test_duration_malformed_text(text):
    with pytest.raises(ScheduleError, match="invalid duration"):
        parse_duration_s(text)


@pytest.mark.parametrize("value", ["-1s", -5, math.inf, math.nan, "inf"])
def test_duration_negative_or_not_finite(value):
    with pytest.raises(ScheduleError):
        parse_duration_s(value)


@pytest.mark.parametrize("value", [True, None, [1]])
def test_duration_wrong_type(value):
    with pytest.raises(ScheduleError, match="expected a number of seconds"):
        parse_duration_s(value)


def test_schedule_sorted_in_seconds():
    assert parse_schedule("1d,25s, 1h") == [25.0, HOUR_S, DAY_S]


def test_schedule_accepts_sequence_of_mixed_entries():
    assert parse_schedule(["1h", 30, "250ms"]) == [0.25, 30.0, HOUR_S]


def test_schedule_result_strictly_increasing():
    times = parse_schedule("3d,1s,2h,45min,10s,1w")
    assert all(later > earlier for earlier, later in zip(times, times[1:], strict=False))


@pytest.mark.parametrize("text", ["60s,1min", "0.1h,360s", "1h,1h"])
def test_schedule_rejects_same_time_twice(text):
    with pytest.raises(ScheduleError, match="same time"):
        parse_schedule(text)


@pytest.mark.parametrize("text", ["0s,1h", "0"])
def test_schedule_rejects_zero(text):
    with pytest.raises(ScheduleError, match="after programming"):
        parse_schedule(text)


@pytest.mark.parametrize("value", ["", "  ", []])
def test_schedule_rejects_empty(value):
    with pytest.raises(ScheduleError, match="empty"):
        parse_schedule(value)


def test_schedule_rejects_empty_entry():
    with pytest.raises(ScheduleError, match="empty entry"):
        parse_schedule("25s,,1h")


def test_schedule_error_names_bad_entry():
    with pytest.raises(ScheduleError, match="'2x'"):
        parse_schedule("25s,2x")


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (25, "25s"),
        (HOUR_S, "1h"),
        (DAY_S, "1d"),
        (1.5 * HOUR_S, "1.5h"),
        (90, "1.5min"),
        (0.25, "250ms"),
        (0.0005, "0.5ms"),
        (0, "0s"),
        (-30, "-30s"),
        (7 * DAY_S, "7d"),
        (1000, "16.67min"),
        (5000 * DAY_S, "5000d"),
    ],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize("seconds", [25, 0.25, 90, HOUR_S, 1.5 * HOUR_S, DAY_S, 3 * DAY_S])
def test_format_then_parse_round_trip(seconds):
    assert parse_duration_s(format_duration(seconds)) == pytest.approx(seconds, rel=1e-12)


def test_format_duration_rejects_nan():
    with pytest.raises(ValueError, match="finite"):
        format_duration(math.nan)
