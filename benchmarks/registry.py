"""Benchmark of the client registry: cohort selection among 1M clients, and heartbeat ingest.

Fills a registry with ``--clients`` clients (1,000,000 by default; bulk
inserts on SQLite, COPY on PostgreSQL), about half of them eligible for the
seed's query (charging, on WiFi, app >= 2.4, >= 2 GB of RAM, seen within an
hour, ACTIVE, not expired, compatible with the model's versioning matrix).
Then, on each database:

- ``select``: the median time of ``Selector.select`` for ``--count`` clients
  (the real path, which also gives the chosen clients fresh sample keys, and
  the read-only variant), against the naive ``... WHERE <the same filters>
  ORDER BY random() LIMIT n``, which reads every eligible row;
- ``select_policy``: the same selector under a job's ``[selection]`` policy
  of four criteria (charging, WiFi, app version above 2.4, at least 2 GB of
  RAM), as a live coordinator applies it, against the uniform selector (no
  criterion: every ACTIVE client) in the same run;
- ``heartbeats``: heartbeats per second through ``record_heartbeats`` in
  batches of ``--batch``, against one heartbeat per transaction.

PostgreSQL runs when ``SHOAL_TEST_POSTGRES_URL`` or ``--postgres-url`` is
given, in a schema of its own that is dropped at the end. Prints one JSON
object per measurement.

    python benchmarks/registry.py --clients 1000000
    python benchmarks/registry.py --measure policy  # the [selection] policy only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import sqlalchemy as sa

from shoal.config import SelectionSection
from shoal.registry import (
    ClientRegistry,
    Component,
    Database,
    Heartbeat,
    SelectionCriteria,
    Selector,
    VersionMatrix,
    open_database,
    version_key,
)
from shoal.registry.database import resolve_database_url
from shoal.registry.schema import clients
from shoal.registry.selector import eligible_clause

NOW = datetime(2026, 3, 20, 10, 0, tzinfo=UTC)
MODEL = "mobilenet-v3"
CRITERIA = SelectionCriteria(
    model=MODEL, min_app_version="2.4", min_ram_gb=2.0, seen_within=timedelta(hours=1)
)
# the policy of a job: with these app versions, "above 2.4" is "at least 2.4.1"
POLICY = SelectionSection(
    require_charging=True, require_wifi=True, min_app_version="2.4.1", min_ram_gb=2.0
)
APP_VERSIONS = ["2.3.0", "2.4.0", "2.4.1", "2.10.0"]
APP_WEIGHTS = [0.1, 0.3, 0.3, 0.3]
RUNTIME_VERSIONS = ["1.1.0", "1.2.0", "1.3.0"]
RUNTIME_WEIGHTS = [0.02, 0.49, 0.49]
STATUSES = ["ACTIVE", "SUSPENDED", "RETIRED"]
COLUMNS = [
    "client_id", "device_class", "battery_level", "charging", "wifi", "ram_gb", "idle",
    "app_version", "app_version_key", "runtime_version", "runtime_version_key",
    "model_architecture_version", "model_architecture_version_key",
    "feature_extractor_version", "feature_extractor_version_key",
    "status", "can_train", "sample_key", "enrolled_at", "last_seen", "expires_at",
]  # fmt: skip


def population(size: int, rng: np.random.Generator) -> Iterator[list[tuple[Any, ...]]]:
    """Rows of the clients table (in ``COLUMNS`` order) in chunks, about half eligible."""
    chunk = 100_000
    now = np.datetime64(NOW.replace(tzinfo=None), "us")
    for start in range(0, size, chunk):
        n = min(chunk, size - start)
        app = rng.choice(len(APP_VERSIONS), n, p=APP_WEIGHTS)
        runtime = rng.choice(len(RUNTIME_VERSIONS), n, p=RUNTIME_WEIGHTS)
        minutes_ago = np.where(rng.random(n) < 0.95, rng.integers(0, 60, n), 120)
        seen = _timestamps(now - minutes_ago.astype("m8[m]"))
        expired = rng.random(n) < 0.01
        expires = _timestamps(
            np.where(expired, now - np.timedelta64(1, "D"), now + np.timedelta64(1, "D"))
        )
        columns: dict[str, Sequence[Any]] = {
            "client_id": [f"client-{start + index:07d}" for index in range(n)],
            "device_class": ["phone"] * n,
            "battery_level": np.round(rng.random(n), 3).tolist(),
            "charging": (rng.random(n) < 0.8).tolist(),
            "wifi": (rng.random(n) < 0.85).tolist(),
            "ram_gb": rng.choice([1.0, 2.0, 4.0, 8.0], n, p=[0.1, 0.3, 0.3, 0.3]).tolist(),
            "idle": (rng.random(n) < 0.5).tolist(),
            "app_version": [APP_VERSIONS[index] for index in app],
            "app_version_key": [version_key(APP_VERSIONS[index]) for index in app],
            "runtime_version": [RUNTIME_VERSIONS[index] for index in runtime],
            "runtime_version_key": [version_key(RUNTIME_VERSIONS[index]) for index in runtime],
            "model_architecture_version": [MODEL] * n,
            "model_architecture_version_key": [None] * n,
            "feature_extractor_version": ["3.0"] * n,
            "feature_extractor_version_key": [version_key("3.0")] * n,
            "status": rng.choice(STATUSES, n, p=[0.97, 0.02, 0.01]).tolist(),
            "can_train": [True] * n,
            "sample_key": rng.integers(0, 2**63, n, dtype=np.int64).tolist(),
            "enrolled_at": seen,
            "last_seen": seen,
            "expires_at": expires,
        }
        yield list(zip(*(columns[name] for name in COLUMNS), strict=True))


def _timestamps(values: npt.NDArray[np.datetime64]) -> list[str]:
    """Naive UTC timestamps in the text form SQLAlchemy stores (and PostgreSQL parses)."""
    return [text.replace("T", " ") for text in np.datetime_as_string(values, unit="us")]


def fill(database: Database, size: int, seed: int) -> float:
    """Bulk-load ``size`` clients (COPY, or one executemany per chunk); returns the seconds."""
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    names = ", ".join(COLUMNS)
    raw = database.engine.raw_connection()
    try:
        cursor: Any = raw.cursor()
        if database.dialect == "postgresql":
            with cursor.copy(f"COPY clients ({names}) FROM STDIN") as copy:
                for rows in population(size, rng):
                    for row in rows:
                        copy.write_row(row)
        else:
            insert = f"INSERT INTO clients ({names}) VALUES ({', '.join('?' * len(COLUMNS))})"
            cursor.execute("BEGIN")
            for rows in population(size, rng):
                cursor.executemany(insert, rows)
        raw.commit()
        cursor.execute("ANALYZE")
        raw.commit()
    finally:
        raw.close()
    return time.perf_counter() - start


def median_ms(function: Callable[[int], object], *, repeats: int) -> float:
    timings = []
    for repeat in range(repeats):
        start = time.perf_counter()
        function(repeat)
        timings.append(time.perf_counter() - start)
    return 1000 * statistics.median(timings)


def measure_selection(database: Database, *, count: int, repeats: int) -> dict[str, Any]:
    registry = ClientRegistry(database)
    matrix = VersionMatrix(database)
    matrix.require(MODEL, Component.APP, minimum="2.4.0")
    matrix.require(MODEL, Component.RUNTIME, allowed=["1.2.0", "1.3.0"])
    selector = Selector(registry, matrix)
    condition = eligible_clause(CRITERIA, matrix.requirements(MODEL), now=NOW)
    with database.read() as connection:
        eligible = connection.execute(
            sa.select(sa.func.count()).select_from(clients).where(condition)
        ).scalar_one()
        total = connection.execute(sa.select(sa.func.count()).select_from(clients)).scalar_one()
    naive = sa.select(clients.c.client_id).where(condition).order_by(sa.func.random()).limit(count)

    def baseline(_: int) -> list[str]:
        with database.read() as connection:
            return list(connection.execute(naive).scalars())

    def select(repeat: int, *, refresh_keys: bool = True) -> list[str]:
        chosen = selector.select(CRITERIA, count, rng=repeat, now=NOW, refresh_keys=refresh_keys)
        assert len(chosen) == count
        return chosen

    select(repeats)  # warm the caches, as a running coordinator's would be
    ours = median_ms(select, repeats=repeats)
    read_only = median_ms(lambda r: select(r, refresh_keys=False), repeats=repeats)
    naive_ms = median_ms(baseline, repeats=max(3, repeats // 3))
    return {
        "benchmark": "select",
        "backend": database.dialect,
        "clients": total,
        "eligible": eligible,
        "count": count,
        "median_ms": round(ours, 2),
        "read_only_median_ms": round(read_only, 2),
        "baseline_order_by_random_median_ms": round(naive_ms, 2),
        "speedup_vs_baseline": round(naive_ms / ours, 1),
        "read_only_speedup_vs_baseline": round(naive_ms / read_only, 1),
        "target_ms": 100,
        "repeats": repeats,
    }


def measure_policy(database: Database, *, count: int, repeats: int) -> dict[str, Any]:
    """The selector under the four-criterion policy, against the uniform selector."""
    selector = Selector(ClientRegistry(database))
    policy = SelectionCriteria.from_section(POLICY, model=None)
    uniform = SelectionCriteria.from_section(SelectionSection(), model=None)
    with database.read() as connection:
        eligible = connection.execute(
            sa.select(sa.func.count())
            .select_from(clients)
            .where(eligible_clause(policy, (), now=NOW))
        ).scalar_one()
        total = connection.execute(sa.select(sa.func.count()).select_from(clients)).scalar_one()

    def select(criteria: SelectionCriteria, *, refresh_keys: bool) -> Callable[[int], object]:
        def draw(repeat: int) -> None:
            chosen = selector.select(
                criteria, count, rng=repeat, now=NOW, refresh_keys=refresh_keys
            )
            assert len(chosen) == count

        return draw

    draws = {
        f"{name}{'' if refresh else '_read_only'}_median_ms": select(criteria, refresh_keys=refresh)
        for name, criteria in (("policy", policy), ("uniform", uniform))
        for refresh in (True, False)
    }
    timings: dict[str, list[float]] = {key: [] for key in draws}
    for draw in draws.values():
        draw(repeats)  # warm the caches, as a running coordinator's would be
    for repeat in range(repeats):  # interleaved: a change of the machine's load hits all alike
        for key, draw in draws.items():
            start = time.perf_counter()
            draw(repeat)
            timings[key].append(time.perf_counter() - start)
    figures = {key: 1000 * statistics.median(values) for key, values in timings.items()}
    return {
        "benchmark": "select_policy",
        "backend": database.dialect,
        "clients": total,
        "eligible": eligible,
        "criteria": list(POLICY.criteria()),
        "count": count,
        **{key: round(value, 2) for key, value in figures.items()},
        "ratio_to_uniform": round(figures["policy_median_ms"] / figures["uniform_median_ms"], 2),
        "read_only_ratio_to_uniform": round(
            figures["policy_read_only_median_ms"] / figures["uniform_read_only_median_ms"], 2
        ),
        "target_ms": 100,
        "repeats": repeats,
    }


def measure_heartbeats(
    database: Database, *, clients_total: int, total: int, batch: int, baseline_total: int
) -> dict[str, Any]:
    registry = ClientRegistry(database)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, clients_total, total + baseline_total)
    beats = [
        Heartbeat(
            client_id=f"client-{int(index):07d}",
            seen_at=NOW + timedelta(seconds=1, microseconds=position),
            battery_level=0.5,
            charging=bool(position % 5),
            wifi=True,
        )
        for position, index in enumerate(ids)
    ]
    batched, single = beats[:total], beats[total:]
    start = time.perf_counter()
    written = sum(
        registry.record_heartbeats(batched[offset : offset + batch])
        for offset in range(0, total, batch)
    )
    batched_rate = total / (time.perf_counter() - start)
    start = time.perf_counter()
    for heartbeat in single:
        registry.record_heartbeats([heartbeat])
    single_rate = baseline_total / (time.perf_counter() - start)
    return {
        "benchmark": "heartbeats",
        "backend": database.dialect,
        "batch": batch,
        "heartbeats": total,
        "rows_written": written,
        "per_second": round(batched_rate),
        "baseline_one_per_transaction_per_second": round(single_rate),
        "speedup_vs_baseline": round(batched_rate / single_rate, 1),
        "target_per_second": 20_000,
    }


@contextmanager
def postgres_schema(url: str) -> Iterator[str]:
    """A fresh schema on the server, as a URL whose connections use it; dropped afterwards."""
    server = resolve_database_url(url)
    schema = f"shoal_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(server)
    with admin.begin() as connection:
        connection.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        scoped = server.update_query_dict({"options": f"-csearch_path={schema}"})
        yield scoped.render_as_string(hide_password=False)
    finally:
        with admin.begin() as connection:
            connection.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def run(url: str, args: argparse.Namespace) -> None:
    database = open_database(url)
    try:
        seconds = fill(database, args.clients, args.seed)
        row = {"benchmark": "fill", "backend": database.dialect, "clients": args.clients}
        print(json.dumps(row | {"seconds": round(seconds, 1)}), flush=True)
        if "select" in args.measure:
            row = measure_selection(database, count=args.count, repeats=args.repeats)
            print(json.dumps(row), flush=True)
        if "policy" in args.measure:
            row = measure_policy(database, count=args.count, repeats=args.repeats)
            print(json.dumps(row), flush=True)
        if "heartbeats" in args.measure:
            row = measure_heartbeats(
                database,
                clients_total=args.clients,
                total=args.heartbeats,
                batch=args.batch,
                baseline_total=args.baseline_heartbeats,
            )
            print(json.dumps(row), flush=True)
    finally:
        database.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1_000_000)
    parser.add_argument("--count", type=int, default=1000, help="clients per selection")
    parser.add_argument("--repeats", type=int, default=15, help="selections; the median counts")
    parser.add_argument("--heartbeats", type=int, default=100_000)
    parser.add_argument("--baseline-heartbeats", type=int, default=3_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--postgres-url", default=os.environ.get("SHOAL_TEST_POSTGRES_URL"))
    parser.add_argument("--skip-sqlite", action="store_true")
    parser.add_argument(
        "--measure",
        nargs="+",
        choices=["select", "policy", "heartbeats"],
        default=["select", "policy", "heartbeats"],
        help="what to measure after the fill (default: all)",
    )
    args = parser.parse_args(argv)
    if not args.skip_sqlite:
        with tempfile.TemporaryDirectory() as folder:
            run(f"sqlite:///{Path(folder) / 'registry.db'}", args)
    if args.postgres_url:
        with postgres_schema(args.postgres_url) as url:
            run(url, args)


if __name__ == "__main__":
    main()
