"""Predictive-maintenance data by the AI4I 2020 rules (Matzka 2020), at any size, for demos and tests.

The failure rules are the paper's. Where the paper leaves a constant open (how speed follows torque, how
often a worn tool fails rather than being replaced), the constants below are chosen so that the columns
match the published 10,000-row dataset: air 300 +- 2 K, process 310 +- 1.48 K, speed 1538 +- 179 rpm with
corr(speed, torque) -0.88, torque 40 +- 10 Nm. Failures come out at ~3.9 % against its 3.4 %, each mode
within about a tenth of a point of its published share.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

FEATURES: tuple[str, ...] = (
    "type_code",
    "air_temperature",
    "process_temperature",
    "rotational_speed",
    "torque",
    "tool_wear",
)
TARGET = "machine_failure"

_PRODUCT_TYPES = np.array(["L", "M", "H"])
_FAILURE_TYPES = np.array(["none", "TWF", "HDF", "PWF", "OSF", "RNF"])

_TYPE_SHARES = (0.5, 0.3, 0.2)
_WEAR_PER_PROCESS_MIN = np.array([2.0, 3.0, 5.0])
_OVERSTRAIN_LIMIT_MIN_NM = np.array([11_000.0, 12_000.0, 13_000.0])
_TOOL_LIMIT_MIN = (200.0, 240.0)
# The paper's tool-wear failures: of 120 tools that reached their limit, 51 failed and 69 were replaced.
_WORN_TOOL_FAILS = 51 / 120
_RANDOM_FAILURE_RATE = 0.001

# Speed is what a ~2860 W drive gives against the cut's torque: base + P / (torque + offset), in rpm. The
# offset keeps a near-zero torque from asking for an absurd speed; with the base and noise it reproduces
# the dataset's mean, spread and correlation with torque, and its ~1 % of power failures.
_DRIVE_POWER_W = 2860.0
_TORQUE_OFFSET_NM = 5.5
_BASE_SPEED_RPM = 903.0
_SPEED_NOISE_RPM = 40.0
_RPM_PER_RAD_S = 60.0 / (2.0 * math.pi)

# The process runs 10 K above the air with 1 K of noise, but in the published data that noise is not
# independent of the air: process temperature has sd 1.48 K and correlates 0.88 with the air, as if the
# process's cooling pulls it back toward 310 K. So hot air narrows the gap, which is why heat-dissipation
# failures there come with high air temperatures. Losing 0.35 K of gap per K of air reproduces both figures.
_GAP_K = 10.0
_GAP_LOST_PER_AIR_K = 0.35
_GAP_NOISE_K = math.sqrt(1.0 - (2.0 * _GAP_LOST_PER_AIR_K) ** 2)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def generate(
    n_rows: int,
    *,
    seed: int = 0,
    start: datetime = datetime(2024, 1, 1, tzinfo=UTC),
    interval: timedelta = timedelta(minutes=10),
) -> pa.Table:
    """`n_rows` consecutive processes, one per `interval` from `start` (naive datetimes are read as UTC)."""
    if n_rows < 1:
        raise ValueError(f"n_rows must be at least 1, not {n_rows}")
    if interval <= timedelta(0):
        raise ValueError("interval must be positive")
    rng = np.random.default_rng(seed)
    type_code = rng.choice(len(_PRODUCT_TYPES), size=n_rows, p=_TYPE_SHARES)
    air = _air_temperature(rng, n_rows)
    torque = np.clip(rng.normal(40.0, 10.0, n_rows), 0.0, None)
    columns = {
        "type_code": type_code.astype(np.float64),
        "air_temperature": air,
        "process_temperature": _process_temperature(rng, air),
        "rotational_speed": _rotational_speed(rng, torque),
        "torque": torque,
    }
    columns["tool_wear"], at_tool_limit = _tool_wear(rng, type_code)
    failure = _failure_codes(rng, columns, type_code, at_tool_limit)
    return pa.table(
        {
            "timestamp": _timestamps(n_rows, start, interval),
            "product_type": pa.array(_PRODUCT_TYPES[type_code], type=pa.string()),
            **columns,
            TARGET: (failure > 0).astype(np.int64),
            "failure_type": pa.array(_FAILURE_TYPES[failure], type=pa.string()),
        }
    )


def write_csv(table: pa.Table, path: Path) -> None:
    pa_csv.write_csv(table, path)


def write_parquet(table: pa.Table, path: Path) -> None:
    pq.write_table(table, path)


def _air_temperature(rng: np.random.Generator, n_rows: int) -> np.ndarray:
    """The paper's random walk, rescaled to 300 K +- 2 K so its drift cannot leave the plausible range."""
    walk = np.cumsum(rng.normal(size=n_rows))
    spread = float(walk.std()) or 1.0
    return 300.0 + (2.0 / spread) * (walk - float(walk.mean()))


def _process_temperature(rng: np.random.Generator, air: np.ndarray) -> np.ndarray:
    gap = _GAP_K - _GAP_LOST_PER_AIR_K * (air - 300.0) + rng.normal(0.0, _GAP_NOISE_K, air.shape[0])
    return air + gap


def _rotational_speed(rng: np.random.Generator, torque: np.ndarray) -> np.ndarray:
    driven = _DRIVE_POWER_W / (torque + _TORQUE_OFFSET_NM) * _RPM_PER_RAD_S
    return _BASE_SPEED_RPM + driven + rng.normal(0.0, _SPEED_NOISE_RPM, torque.shape[0])


def _tool_wear(rng: np.random.Generator, type_code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minutes on the tool when each process starts, and which processes meet the tool's wear limit.

    Each tool gets a limit drawn from 200-240 min; the process that starts at or past it is the tool's
    last, and the next one starts on a fresh tool. One searchsorted per tool keeps this vectorised.
    """
    n_rows = type_code.shape[0]
    added = _WEAR_PER_PROCESS_MIN[type_code]
    worked = np.cumsum(added) - added
    # A process adds at most 5 min, so a tool lasts at least 200 / 5 processes: this many limits suffice.
    limits = rng.uniform(*_TOOL_LIMIT_MIN, size=n_rows // 40 + 1)
    wear = np.empty(n_rows)
    at_limit = np.zeros(n_rows, dtype=bool)
    first = 0
    for limit in limits:
        if first >= n_rows:
            break
        last = int(np.searchsorted(worked, worked[first] + limit, side="left"))
        if last < n_rows:
            at_limit[last] = True
        stop = min(last, n_rows - 1) + 1
        wear[first:stop] = worked[first:stop] - worked[first]
        first = stop
    return wear, at_limit


def _failure_codes(
    rng: np.random.Generator, columns: dict[str, np.ndarray], type_code: np.ndarray, at_tool_limit: np.ndarray
) -> np.ndarray:
    """Index into _FAILURE_TYPES per row: the first mode that fired, in the paper's order, or 0 for none."""
    n_rows = type_code.shape[0]
    speed, torque, wear = columns["rotational_speed"], columns["torque"], columns["tool_wear"]
    power_w = torque * speed / _RPM_PER_RAD_S
    fired = {
        "TWF": at_tool_limit & (rng.random(n_rows) < _WORN_TOOL_FAILS),
        "HDF": (columns["process_temperature"] - columns["air_temperature"] < 8.6) & (speed < 1380.0),
        "PWF": (power_w < 3500.0) | (power_w > 9000.0),
        "OSF": wear * torque > _OVERSTRAIN_LIMIT_MIN_NM[type_code],
        "RNF": rng.random(n_rows) < _RANDOM_FAILURE_RATE,
    }
    first_fired: np.ndarray = np.select(
        list(fired.values()), [_FAILURE_TYPES.tolist().index(mode) for mode in fired], default=0
    )
    return first_fired


def _timestamps(n_rows: int, start: datetime, interval: timedelta) -> pa.Array:
    if start.tzinfo is None:
        start = start.replace(tzinfo=UTC)
    first_us = (start - _EPOCH) // _MICROSECOND
    step_us = interval // _MICROSECOND
    return pa.array(first_us + np.arange(n_rows, dtype=np.int64) * step_us, type=pa.timestamp("us", tz="UTC"))
