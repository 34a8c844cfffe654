"""The phone-context features in plain Python and NumPy (float64): the readable reference.

``features.wat`` computes the same six features for every client; this module says
what each one is, in the plainest code, so the test can hold the module to it.

A record is ``INPUTS`` in order: ``timestamp_ms`` (milliseconds since
1970-01-01T00:00:00Z, negative before it), ``latitude`` and ``longitude`` in degrees,
``battery_level`` in 0..1. Its features are ``OUTPUTS`` in order:

- ``hour_sin``, ``hour_cos``: the UTC time of day as a point on the circle, the sine
  and cosine of ``2 * pi * h / 24`` for the fractional hour ``h`` in [0, 24), so
  23:59 sits next to 00:00. The timestamp counts whole milliseconds (a fraction is
  dropped: floor).
- ``is_weekend``: 1.0 on Saturday and Sunday (UTC), else 0.0. Day 0 (1970-01-01) was
  a Thursday; days before it count down with floor division, so 1969-12-28 is a
  Sunday.
- ``battery_bucket``: ``floor(battery_level * 10)`` clamped to 0..9: ten buckets, a
  full battery in the top one (not an eleventh).
- ``geocell_lat``, ``geocell_lon``: the row and column of the record's geohash-5
  cell. Precision 5 is 25 bits interleaved starting with longitude: 13 longitude
  bits (columns 0..8191) and 12 latitude bits (rows 0..4095), given as
  ``row / 4095`` and ``column / 8191`` in [0, 1]. Each bit halves the interval and is
  1 for the upper half, which includes its midpoint; 90 and 180 are in the last
  row and column.

A record is refused (``ValueError`` naming its index) when its timestamp is NaN,
infinite or beyond +-8.64e15 ms (a JavaScript Date's range), its latitude NaN or
outside [-90, 90], its longitude NaN or outside [-180, 180], or its battery level
NaN.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

INPUTS = ("timestamp_ms", "latitude", "longitude", "battery_level")
OUTPUTS = (
    "hour_sin",
    "hour_cos",
    "is_weekend",
    "battery_bucket",
    "geocell_lat",
    "geocell_lon",
)

MS_PER_HOUR = 3_600_000
MS_PER_DAY = 24 * MS_PER_HOUR
MAX_ABS_TIMESTAMP_MS = 8.64e15  # +-100,000,000 days, the range of a JavaScript Date
THURSDAY = 3  # weekday of 1970-01-01, Monday = 0
LAT_BITS, LON_BITS = 12, 13  # geohash precision 5: 25 bits, longitude first
BASE32 = "0123456789bcdefghjkmnpqrstuvwxyz"  # geohash's alphabet (no a, i, l, o)


def refused(records: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
    """Which records the module refuses (NaN compares false, so it fails every test)."""
    ts, lat, lon, battery = records.T
    ok: npt.NDArray[np.bool_] = (
        (np.abs(ts) <= MAX_ABS_TIMESTAMP_MS)
        & ~np.isnan(battery)
        & (lat >= -90)
        & (lat <= 90)
        & (lon >= -180)
        & (lon <= 180)
    )
    return ~ok


def cell_index(
    values: npt.NDArray[np.float64], lo: float, hi: float, bits: int
) -> npt.NDArray[np.int64]:
    """The geohash way: halve [lo, hi] ``bits`` times, a 1 bit for the upper half.

    The midpoints are dyadic fractions of the interval, exact in float64, so the
    comparisons are exact (``floor((v - lo) / (hi - lo) * 2**bits)`` would round).
    """
    index = np.zeros(values.shape, dtype=np.int64)
    low = np.full(values.shape, lo)
    high = np.full(values.shape, hi)
    for _ in range(bits):
        mid = (low + high) / 2
        upper = values >= mid
        index = 2 * index + upper
        low = np.where(upper, mid, low)
        high = np.where(upper, high, mid)
    return index


def geohash(latitude: float, longitude: float, precision: int = 5) -> str:
    """The geohash string of a point: longitude and latitude bits interleaved, base 32."""
    bits = 5 * precision
    lon_bits, lat_bits = (bits + 1) // 2, bits // 2
    column = int(cell_index(np.array([longitude]), -180.0, 180.0, lon_bits)[0])
    row = int(cell_index(np.array([latitude]), -90.0, 90.0, lat_bits)[0])
    interleaved = 0
    for k in range(bits):  # bit k from the top: even k longitude, odd k latitude
        if k % 2 == 0:
            bit = (column >> (lon_bits - 1 - k // 2)) & 1
        else:
            bit = (row >> (lat_bits - 1 - k // 2)) & 1
        interleaved = 2 * interleaved + bit
    return "".join(BASE32[(interleaved >> (bits - 5 * (j + 1))) & 31] for j in range(precision))


def phone_context(records: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """The (n, 6) features of an (n, 4) array of records in ``INPUTS`` order."""
    data = np.asarray(records, dtype=np.float64)
    if data.ndim != 2 or data.shape[1] != len(INPUTS):
        raise ValueError(f"records must be an (n, {len(INPUTS)}) array, not {data.shape}")
    bad = np.flatnonzero(refused(data))
    if bad.size:
        raise ValueError(f"record {int(bad[0])} cannot be computed: {data[bad[0]].tolist()}")
    ts, lat, lon, battery = data.T
    out = np.empty((len(data), len(OUTPUTS)), dtype=np.float64)

    # Whole milliseconds as exact integers: floor division and modulo round down, also
    # before 1970.
    t = np.floor(ts).astype(np.int64)
    day = t // MS_PER_DAY
    ms_of_day = t % MS_PER_DAY
    hour = ms_of_day / MS_PER_HOUR
    angle = 2 * math.pi * hour / 24
    out[:, 0] = np.sin(angle)
    out[:, 1] = np.cos(angle)

    weekday = (day + THURSDAY) % 7  # Monday = 0 .. Saturday = 5, Sunday = 6
    out[:, 2] = (weekday >= 5).astype(np.float64)

    out[:, 3] = np.clip(np.floor(battery * 10), 0, 9)

    out[:, 4] = cell_index(lat, -90.0, 90.0, LAT_BITS) / (2**LAT_BITS - 1)
    out[:, 5] = cell_index(lon, -180.0, 180.0, LON_BITS) / (2**LON_BITS - 1)
    return out
