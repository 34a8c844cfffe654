"""Opening the registry database: SQLite (embedded, WAL) by default, PostgreSQL by URL.

>>> database = open_database("sqlite:///:memory:")
>>> database.dialect
'sqlite'

``open_database`` applies the schema migrations before it returns, so every
``Database`` it hands out holds the schema this code expects. Work happens
in short transactions: :meth:`Database.read` for queries and
:meth:`Database.write` for changes (on SQLite a write transaction takes the
write lock when it starts, so two writers queue on the busy timeout instead
of failing when one upgrades a read lock). SQLAlchemy's errors leave these
context managers as :class:`~shoal.core.errors.RegistryError`.

A ``read`` or ``write`` opened on a thread that already holds a write
transaction of the same database joins it: its changes commit with the
outer block's, or not at all. That is how a round's records (its version,
audit entries, head signature, participants and policy decisions) become one
transaction. A joined block that fails dooms the outer transaction: even if
its caller catches the error, the outer block rolls back and raises, so no
part of a failed write is ever committed.

A reader may keep what it read of a table while the database's
:meth:`Database.change_mark` for it stays the same (on SQLite: no other
connection committed, and this process changed nothing of that table).

A SQLite file's write-ahead log is copied back into the database (a
checkpoint) by a thread of the :class:`Database`'s own, woken after each
write transaction, rather than by the connection that commits: SQLite's
automatic checkpoint runs in line, inside the commit that crosses its
threshold, and made a selection that rewrites 1,000 sample keys wait about
60 ms for it. The automatic checkpoint stays on as a backstop, at a
threshold the background one keeps the log well under.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.pool import StaticPool

from shoal.core.errors import ConfigError, MissingExtraError, RegistryError, RunError
from shoal.core.folders import lock_exclusively, writable_folder

DEFAULT_FILE_NAME = "registry.db"
BUSY_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 5
SQLITE_CACHE_KIB = 64 * 1024
SQLITE_MMAP_BYTES = 1 << 30
SQLITE_BACKSTOP_CHECKPOINT_PAGES = 16_384
"""The log's size (in pages, 64 MiB) at which a committing connection checkpoints in line:
only if the background checkpointer falls behind."""
CHECKPOINT_SETTLE_S = 0.25
"""How long the background checkpointer lets writes gather before it copies them back."""

_BEGIN_OPTION = "shoal_sqlite_begin"


class Checkpointer:
    """Checkpoints a SQLite file's write-ahead log from a thread of its own.

    :meth:`wake` (after each write transaction) asks for a passive
    checkpoint: it copies what the log holds into the database without
    waiting on readers or writers, on a connection of its own. The thread
    starts at the first wake and sleeps on an event in between, costing
    nothing while the database is idle; :meth:`stop` ends it.

    A wake is answered ``settle_s`` later, with one checkpoint for every
    wake in between: a simulation commits a round every few milliseconds,
    and a checkpoint per commit cost its rounds 3-7% in the thread's turns
    at the interpreter. A commit is durable against a crash of the process
    when it returns; against a power loss (``synchronous = NORMAL``, which
    syncs at checkpoints) within ``settle_s`` plus the checkpoint.
    """

    def __init__(self, path: str, *, settle_s: float = CHECKPOINT_SETTLE_S) -> None:
        self.path = path
        self.settle_s = settle_s
        self._wanted = threading.Event()
        self._stopped = threading.Event()  # set by stop(); it also cuts a settling wait short
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.checkpoints = 0  # passive checkpoints run (for tests and diagnostics)

    @property
    def running(self) -> bool:
        """Whether the thread is alive (started by a write, not yet stopped)."""
        return self._thread is not None and self._thread.is_alive()

    def wake(self) -> None:
        with self._lock:
            if self._stopped.is_set():
                return
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"shoal-checkpoint:{Path(self.path).name}", daemon=True
                )
                self._thread.start()
        self._wanted.set()

    def stop(self) -> None:
        """End the thread after the checkpoint it may be running (idempotent)."""
        with self._lock:
            self._stopped.set()
            thread = self._thread
        self._wanted.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=BUSY_TIMEOUT_S)

    def _run(self) -> None:
        try:
            connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S)
        except sqlite3.Error:
            return  # the folder is gone: the backstop checkpoints, if anyone writes again
        try:
            while True:
                self._wanted.wait()
                if self._stopped.wait(self.settle_s):  # the wakes meanwhile join this one
                    return
                self._wanted.clear()
                connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                self.checkpoints += 1
        except sqlite3.Error:
            return  # as above: a lost file ends the thread, never the writer
        finally:
            connection.close()


@dataclass(frozen=True, slots=True)
class Database:
    """A SQLAlchemy engine holding the registry schema, and its transactions.

    ``checkpointer``: a SQLite file's background checkpointer (None for an
    in-memory database and for PostgreSQL).
    """

    engine: Engine
    checkpointer: Checkpointer | None = field(default=None, compare=False)
    # the write transaction each thread holds open, which a nested read or write joins
    _open: threading.local = field(default_factory=threading.local, compare=False, repr=False)
    # how many times this process changed each table that readers keep (see change_mark)
    _changed: dict[str, int] = field(default_factory=dict, compare=False, repr=False)
    _changed_lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)

    @property
    def dialect(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self.engine.dialect.name

    @property
    def url(self) -> str:
        """The database URL, password hidden."""
        return self.engine.url.render_as_string(hide_password=True)

    @contextmanager
    def read(self, *, snapshot: bool = False) -> Iterator[Connection]:
        """A transaction for queries; committed (a no-op) when the block ends. Inside this
        thread's write transaction, that transaction (its own changes visible). ``snapshot``:
        every query of the block sees the same commits (PostgreSQL's REPEATABLE READ; its
        default gives each statement its own; a SQLite read transaction is one already)."""
        if self._joined() is not None:
            with self._join(writes=False) as connection:
                yield connection
            return
        with self._transaction(immediate=False, snapshot=snapshot) as connection:
            yield connection

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A transaction for changes: committed when the block ends, rolled back on error.
        Inside this thread's write transaction, a part of it (see the module docstring)."""
        if self._joined() is not None:
            with self._join(writes=True) as connection:
                yield connection
            return
        with self._transaction(immediate=True) as connection:
            self._open.connection, self._open.doomed, self._open.awaited = connection, None, []
            try:
                yield connection
                if self._open.doomed is not None:
                    raise RegistryError(
                        f"a write inside this transaction failed ({self._open.doomed}); "
                        "nothing of the transaction was committed"
                    )
                for work in self._open.awaited:
                    work.result()  # its error rolls the transaction back
            finally:
                self._open.connection = self._open.doomed = self._open.awaited = None
        if self.checkpointer is not None:
            self.checkpointer.wake()  # the log's new pages go to the database off this path

    def change_mark(self, table: str) -> ChangeMark | None:
        """What tells whether ``table`` changed since: two equal marks mean that nothing was
        committed to the database by another connection (another process, another thread)
        and that this process changed nothing of ``table`` in between (its writers call
        :meth:`changed`), so a read made after the first is still true. None where that
        cannot be told: PostgreSQL (no such counter), and inside this thread's write
        transaction (whose own changes are not committed yet).

        SQLite's ``PRAGMA data_version`` counts the commits of other connections as one
        connection sees them; it is asked on a connection of the pool, whose identity is
        part of the mark (a mark taken on another connection never equals it)."""
        if self.dialect != "sqlite" or self._joined() is not None:
            return None
        changed = self._changed.get(table, 0)
        with self.engine.connect() as connection:
            raw = connection.connection.dbapi_connection
            assert raw is not None
            version = raw.execute("PRAGMA data_version").fetchone()[0]
        return ChangeMark(raw, int(version), changed)

    def changed(self, table: str) -> None:
        """This process is changing ``table``: marks taken before no longer equal later ones.
        A change on another connection needs no more (its commit moves the commit counter of
        every other connection, and none of them sees it before); this counts the changes
        that a mark taken on the writing connection itself would miss."""
        with self._changed_lock:  # never two bumps read the same count and write one more
            self._changed[table] = self._changed.get(table, 0) + 1

    def commit_after(self, work: Future[Any] | None) -> None:
        """This thread's open write transaction commits only once ``work`` is done, and not at
        all if it fails (a blob the transaction's rows name, being written). Outside a write
        transaction, wait for it now."""
        if work is None:
            return
        if self._joined() is None:
            work.result()
        else:
            self._open.awaited.append(work)

    def writing(self) -> bool:
        """Whether this thread holds a write transaction open (what it writes now commits only
        when that transaction does)."""
        return self._joined() is not None

    def _joined(self) -> Connection | None:
        connection: Connection | None = getattr(self._open, "connection", None)
        return connection

    @contextmanager
    def _join(self, *, writes: bool) -> Iterator[Connection]:
        """This thread's open write transaction, for a nested block. A failed statement dooms
        it, and so does any error of a nested write block (it may have changed something)."""
        connection = self._joined()
        assert connection is not None
        try:
            yield connection
        except SQLAlchemyError as exc:
            self._doom(exc)
            raise translate_error(exc, url=self.url) from exc
        except BaseException as exc:
            if writes:
                self._doom(exc)
            raise

    def _doom(self, exc: BaseException) -> None:
        if self._open.doomed is None:
            self._open.doomed = f"{type(exc).__name__}: {exc}"[:200]

    @contextmanager
    def _transaction(self, *, immediate: bool, snapshot: bool = False) -> Iterator[Connection]:
        try:
            with self.engine.connect() as connection:
                if immediate:
                    connection = connection.execution_options(**{_BEGIN_OPTION: "IMMEDIATE"})
                if snapshot and self.dialect == "postgresql":
                    connection = connection.execution_options(isolation_level="REPEATABLE READ")
                with connection.begin():
                    yield connection
        except SQLAlchemyError as exc:
            raise translate_error(exc, url=self.url) from exc

    def hold(self, name: str, *, what: str) -> Held:
        """Hold ``name`` in this database for this process alone, until :meth:`Held.release`
        or the process ends (``kill -9`` included); one :class:`RunError` naming ``what`` when
        another process holds it.

        On PostgreSQL a session-level advisory lock on a connection of its own
        (the server lets it go when that connection drops); on a SQLite file,
        an ``flock`` on a file beside it named after ``name``; an in-memory
        database is this process's already.
        """
        if self.dialect == "postgresql":
            return _hold_advisory(self, name, what=what)
        path = self.engine.url.database
        if path in (None, "", ":memory:"):
            return Held(lambda: None)
        digest = hashlib.sha256(name.encode()).hexdigest()[:16]
        lock = Path(str(path)).with_name(f"{Path(str(path)).name}.hold-{digest}")
        descriptor = lock_exclusively(
            lock,
            what=f"{what}: {lock}",
            in_use=lambda: (
                f"{what} is in use by another shoal process ({self.url}): "
                "wait for it to end, or use another run name"
            ),
        )
        return Held(lambda: os.close(descriptor))

    def close(self) -> None:
        """Close every pooled connection (and stop the background checkpointer)."""
        if self.checkpointer is not None:
            self.checkpointer.stop()
        self.engine.dispose()

    def __enter__(self) -> Database:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


@dataclass(frozen=True, slots=True)
class ChangeMark:
    """A point in a SQLite database's history, as :meth:`Database.change_mark` takes it."""

    connection: Any  # the pool's connection the commit counter was read on (equal: the same)
    data_version: int  # the commits of other connections it had seen
    changed: int  # this process's changes of the table


# The first of pg_advisory_xact_lock's two keys for Shoal's locks: "Shoa" in ASCII.
ADVISORY_LOCK_CLASS = 0x53686F61


class Held:
    """A name :meth:`Database.hold` holds for this process; releasing twice is a no-op."""

    def __init__(self, release: Callable[[], None]) -> None:
        self._release: Callable[[], None] | None = release

    @property
    def held(self) -> bool:
        return self._release is not None

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()


_HOLDER = sa.text(
    "SELECT a.pid, a.client_addr, a.application_name FROM pg_locks l "
    "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' "
    "AND l.granted AND l.classid::bigint = (:lock_class)::bigint & 4294967295 "
    "AND l.objid::bigint = hashtext(current_schema() || :name)::bigint & 4294967295 "
    "AND l.objsubid = 2 LIMIT 1"
)


def _hold_advisory(database: Database, name: str, *, what: str) -> Held:
    """A PostgreSQL session-level advisory lock on ``name``, on a connection of its own."""
    key = {"lock_class": ADVISORY_LOCK_CLASS, "name": f"/hold/{name}"}
    try:
        connection = database.engine.connect()
        try:
            taken = connection.execute(
                sa.text(
                    "SELECT pg_try_advisory_lock(:lock_class, hashtext(current_schema() || :name))"
                ),
                key,
            ).scalar()
            holder = None if taken else connection.execute(_HOLDER, key).first()
            connection.commit()
        except BaseException:
            connection.close()
            raise
    except SQLAlchemyError as exc:
        raise translate_error(exc, url=database.url) from exc
    if not taken:
        connection.close()
        by = (
            ""
            if holder is None
            else f" (PostgreSQL backend {holder[0]}, from {holder[1] or 'a local socket'})"
        )
        raise RunError(
            f"{what} is in use by another shoal process{by} in {database.url}: "
            "wait for it to end, or use another run name"
        )

    def release() -> None:
        # the pool would keep the session, and the lock with it: end the session
        connection.invalidate()
        connection.close()

    return Held(release)


def lock_name(connection: Connection, name: str) -> None:
    """Serialize write transactions that touch ``name`` until this transaction ends.

    On PostgreSQL a transaction-scoped advisory lock keyed by ``name`` and
    the current schema; on SQLite a write transaction already holds the
    database's write lock, so there is nothing more to take.
    """
    if connection.dialect.name == "postgresql":
        connection.execute(
            sa.text(
                "SELECT pg_advisory_xact_lock(:lock_class, hashtext(current_schema() || :name))"
            ),
            {"lock_class": ADVISORY_LOCK_CLASS, "name": f"/{name}"},
        )


def _use_wal(cursor: Any) -> None:
    """Switch a SQLite file to WAL, waiting out other connections doing the same.

    Changing the journal mode needs the database to itself, and SQLite
    answers "locked" at once rather than through the busy timeout when
    several processes open a new file together. WAL is persistent, so once
    one of them has switched, the others find it already on.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    delay = 0.005
    while True:
        try:
            if str(cursor.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal":
                return
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(delay)  # a bounded wait for a lock SQLite will not wait on itself
            delay = min(delay * 2, 0.2)


def translate_error(exc: SQLAlchemyError, *, url: str) -> RegistryError:
    """Shoal's error for a SQLAlchemy one (the caller raises it ``from exc``)."""
    original = str(getattr(exc, "orig", None) or exc).strip()
    detail = original.splitlines()[0] if original else type(exc).__name__
    if isinstance(exc, sa.exc.OperationalError):
        return RegistryError(f"database {url} is unreachable or failed: {detail}")
    return RegistryError(f"database {url} refused the request: {detail}")


def open_database(url: str | None, *, folder: Path | None = None, migrate: bool = True) -> Database:
    """Open (and migrate) the registry database.

    ``url`` None means the embedded default, the SQLite file
    ``folder/registry.db`` (the folder is created). ``postgresql://`` and
    ``postgres://`` URLs use the psycopg (v3) driver; ``sqlite:///:memory:``
    gives a private in-memory database (one connection, for tests).
    ``migrate=False`` opens it for reading only: nothing is written, and a
    database whose schema is not the one this code expects is refused.
    """
    from shoal.registry.migrations import apply_migrations, check_schema_version

    resolved = resolve_database_url(url, folder=folder)
    engine = create_engine(resolved)
    database = Database(engine, checkpointer_for(resolved))
    try:
        if migrate:
            apply_migrations(database)
        else:
            check_schema_version(database)
    except BaseException:
        engine.dispose()
        raise
    return database


def checkpointer_for(url: sa.URL) -> Checkpointer | None:
    """The background checkpointer of a SQLite file (None for anything else)."""
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Checkpointer(str(url.database))


class EncodedJSON:
    """A JSON column's value encoded already: :func:`strict_json` writes its text as it is."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


_STRICT = json.JSONEncoder(allow_nan=False)  # what json.dumps(allow_nan=False) makes per call


def strict_json(value: Any) -> str:
    """A JSON column's text: strict JSON (NaN and infinity refused, as PostgreSQL's ``json``
    refuses them), on SQLite as on PostgreSQL; an :class:`EncodedJSON`'s own text."""
    if isinstance(value, EncodedJSON):
        return value.text
    return _STRICT.encode(value)


def create_engine(url: sa.URL) -> Engine:
    """An engine configured for the registry (no migrations applied)."""
    try:
        if url.get_backend_name() == "sqlite":
            return _sqlite_engine(url)
        return _postgresql_engine(url)
    except NoSuchModuleError as exc:
        raise ConfigError(f"no SQLAlchemy driver for {url.drivername!r}: {exc}") from exc
    except ArgumentError as exc:
        raise ConfigError(f"bad database URL: {exc}") from exc


def resolve_database_url(url: str | None, *, folder: Path | None = None) -> sa.URL:
    """The URL ``open_database`` connects to: the default SQLite file, or ``url`` normalised."""
    if url is None:
        if folder is None:
            raise ConfigError("the registry needs a database URL or a folder for its SQLite file")
        writable_folder(folder, what="registry folder")
        return sa.URL.create("sqlite", database=str(Path(folder) / DEFAULT_FILE_NAME))
    try:
        parsed = sa.make_url(url)
    except ArgumentError as exc:
        raise ConfigError(f"not a database URL: {url!r}") from exc
    if parsed.drivername in ("postgresql", "postgres"):
        return parsed.set(drivername="postgresql+psycopg")
    if parsed.drivername in ("postgresql+psycopg", "sqlite", "sqlite+pysqlite"):
        return parsed
    raise ConfigError(
        f"unsupported registry database {parsed.drivername!r}: "
        "use sqlite:///PATH or postgresql://USER@HOST/DATABASE"
    )


def _sqlite_engine(url: sa.URL) -> Engine:
    in_memory = url.database in (None, "", ":memory:")
    extra: dict[str, Any] = {}
    if in_memory:
        # one shared connection, so every checkout sees the same database
        extra = {"poolclass": StaticPool}
    engine = sa.create_engine(
        url,
        connect_args={"timeout": BUSY_TIMEOUT_S, "check_same_thread": False},
        json_serializer=strict_json,
        **extra,
    )

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: object) -> None:
        # SQLAlchemy, not the sqlite3 module, decides when a transaction begins
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        if not in_memory:
            _use_wal(cursor)
            cursor.execute("PRAGMA synchronous = NORMAL")  # durable at checkpoints, never corrupt
            # the Database's thread checkpoints; a commit does so in line only as a backstop
            cursor.execute(f"PRAGMA wal_autocheckpoint = {SQLITE_BACKSTOP_CHECKPOINT_PAGES}")
            # the default 2 MiB page cache thrashes on a registry of a million clients
            cursor.execute(f"PRAGMA cache_size = -{SQLITE_CACHE_KIB}")
            cursor.execute(f"PRAGMA mmap_size = {SQLITE_MMAP_BYTES}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        mode = connection.get_execution_options().get(_BEGIN_OPTION, "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")

    return engine


def _postgresql_engine(url: sa.URL) -> Engine:
    try:
        import psycopg  # noqa: F401
    except ImportError as exc:
        raise MissingExtraError(
            extra="postgres", package="psycopg", feature="a PostgreSQL registry"
        ) from exc
    connect_args: dict[str, Any] = {}
    if "connect_timeout" not in url.query:
        connect_args["connect_timeout"] = CONNECT_TIMEOUT_S
    return sa.create_engine(
        url, connect_args=connect_args, pool_pre_ping=True, json_serializer=strict_json
    )
