"""UTC (UNIX time) -> GPS week and time of week, with leap seconds.

GPS time does not have leap seconds: it runs ahead of UTC by the number of leap seconds
inserted since 1980-01-06. GPS_INPUT needs the real GPS week and milliseconds of week.
"""
from __future__ import annotations

import calendar

GPS_EPOCH_UNIX_S = calendar.timegm((1980, 1, 6, 0, 0, 0))
SECONDS_PER_WEEK = 7 * 24 * 3600

# (UTC date from which it applies, GPS - UTC seconds), every step since the GPS epoch (0 then):
# TAI - UTC of IERS Bulletin C less 19. IERS announces new ones six months ahead; none has
# been added since 2017-01-01. Extend here when one is.
_LEAP_TABLE = [
    ((1981, 7, 1), 1), ((1982, 7, 1), 2), ((1983, 7, 1), 3), ((1985, 7, 1), 4),
    ((1988, 1, 1), 5), ((1990, 1, 1), 6), ((1991, 1, 1), 7), ((1992, 7, 1), 8),
    ((1993, 7, 1), 9), ((1994, 7, 1), 10), ((1996, 1, 1), 11), ((1997, 7, 1), 12),
    ((1999, 1, 1), 13),
    ((2006, 1, 1), 14),
    ((2009, 1, 1), 15),
    ((2012, 7, 1), 16),
    ((2015, 7, 1), 17),
    ((2017, 1, 1), 18),
]
_LEAP_TABLE_UNIX = [(calendar.timegm((y, m, d, 0, 0, 0)), s) for (y, m, d), s in _LEAP_TABLE]


def gps_minus_utc_s(unix_s: float) -> int:
    """Leap seconds between GPS time and UTC at UNIX time `unix_s` (18 since 2017)."""
    offset = 0
    for start, seconds in _LEAP_TABLE_UNIX:
        if unix_s >= start:
            offset = seconds
    return offset


def gps_week_and_ms(unix_s: float, leap_seconds: int | None = None) -> tuple[int, int]:
    """UNIX time (UTC seconds) -> (GPS week number, milliseconds of the GPS week)."""
    leap = gps_minus_utc_s(unix_s) if leap_seconds is None else leap_seconds
    gps_s = unix_s - GPS_EPOCH_UNIX_S + leap
    week = int(gps_s // SECONDS_PER_WEEK)
    ms = int(round((gps_s - week * SECONDS_PER_WEEK) * 1000.0))
    if ms >= SECONDS_PER_WEEK * 1000:   # rounding up into the next week
        week, ms = week + 1, ms - SECONDS_PER_WEEK * 1000
    return week, ms
