"""The checkpoint store: every answer, committed to SQLite as it arrives.

One SQLite file per job (WAL mode, synchronous=FULL): the results, keyed by (row id,
requested model, fingerprint), with everything needed to rebuild the output without a
request, and a row per run. Answers are buffered and committed by one writer in short
transactions (every COMMIT_INTERVAL_S, off the event loop), so a kill -9 loses at most the
requests in flight and the last fraction of a second of answers, and a reboot no more
(docs/guarantees.md, the durability contract). Reads go through a second connection: WAL lets
it read the last commit while the writer commits the next, so a read never waits on a commit.

Schema changes are numbered migrations, applied in order when the store opens.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import functools
import json
import logging
import operator
import os
import socket
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from batchrunner.costs import ZERO_USD
from batchrunner.errors import Problem, RunHalted, SpecError
from batchrunner.files import open_no_follow

if TYPE_CHECKING:
    import polars as pl

    from batchrunner.records import Bill, RowResult

# polars and records.py (whose column types are polars') are imported by what reads or writes results, not at
# import: `batchrunner status` opens the checkpoint and counts without them (offline.job_status)

# A new checkpoint's page: a 64 KB answer takes 4 pages, not 16 (SQLite's default, 4 KB) chained page by page: its
# commit and its read back for the output cost a third less (bench/speed.py --long-only).
PAGE_SIZE = 16_384
COMMIT_INTERVAL_S = 0.2  # how often answers are committed: what a kill -9 can lose, beyond those in flight

log = logging.getLogger("batchrunner")
T = TypeVar("T")
R = TypeVar("R")

# Row ids per `IN (...)` query: SQLite before 3.32 allows 999 parameters a statement, later 32766.
MAX_PARAMETERS = 5000 if sqlite3.sqlite_version_info >= (3, 32) else 900
RUN_COLUMNS = ("run_id", "answered_at", "server")  # what the store adds to each result's record: who, when, where
CLOSE_TRIES = 3  # commits tried at close before unsaved answers go to the spill file
SPILL_SUFFIX = ".unsaved.jsonl"


def record_columns() -> list[str]:
    """Every column of a stored record, by name: the pair, the store's own, every STORED_SCHEMA column. Read from
    the schema when asked (not frozen at import), so nothing here lists a result column."""
    from batchrunner.records import PAIR_COLUMNS, STORED_SCHEMA

    return [*PAIR_COLUMNS, *RUN_COLUMNS, *STORED_SCHEMA]


def _insert(columns: Sequence[str]) -> str:
    """The statement that writes one record, its values in the order of `columns` (records are dicts by name;
    flush takes each one's values in that order: SQLite binds positional values about twice as fast as named)."""
    return f"INSERT OR REPLACE INTO results ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


# The spill file's lines as versions before named records wrote them: positional lists of the pair, the store's
# own columns, then the result columns of the day. Each layout has its own length, which tells them apart; the
# file is read by the next open, perhaps by a newer batchrunner, so every layout ever written is known here.
_RESULTS_AT_4 = (  # the result columns as of migration 4 (billed tokens), when the spill file was introduced
    "model", "requested_model", "status", "response", "error", "finish_reason",
    "prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens",
    "billed_prompt_tokens", "billed_completion_tokens",
    "cost_usd", "cost_source", "latency_s", "attempts", "generation_id", "provider",
)  # fmt: skip
_AFTER_COST = _RESULTS_AT_4.index("cost_usd") + 1
_AFTER_LATENCY = _RESULTS_AT_4.index("latency_s") + 1


def _spilled_layout(*results: str) -> tuple[str, ...]:
    """A positional spill line's columns, with the result columns a version had."""
    pair_and_run = ("row_id", "fingerprint", "row_index", "model_position", "run_id", "answered_at", "server")
    return (*pair_and_run, *results, "parsed", "tool_calls")


_SPILLED_LAYOUTS: dict[int, tuple[str, ...]] = {
    len(layout): layout
    for layout in (
        _spilled_layout(*_RESULTS_AT_4),
        _spilled_layout(*_RESULTS_AT_4, "deduped_from"),  # migration 6
        _spilled_layout(  # migration 7
            *_RESULTS_AT_4[:_AFTER_LATENCY], "ttft_s", *_RESULTS_AT_4[_AFTER_LATENCY:], "deduped_from"
        ),
        _spilled_layout(  # migration 11, the last positional layout
            *_RESULTS_AT_4[:_AFTER_COST],
            "upstream_cost_usd",
            *_RESULTS_AT_4[_AFTER_COST:_AFTER_LATENCY],
            "ttft_s",
            *_RESULTS_AT_4[_AFTER_LATENCY:],
            "service_tier",
            "deduped_from",
        ),
    )
}


def _migration_1(db: sqlite3.Connection) -> None:
    """The results and runs tables (columns as of version 1: later ones come in later migrations)."""
    statements = """
        CREATE TABLE results (
            row_id TEXT NOT NULL,
            requested_model TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            row_index INTEGER NOT NULL,
            model_position INTEGER NOT NULL,
            run_id INTEGER,
            answered_at TEXT NOT NULL,
            model TEXT, status TEXT, response TEXT, error TEXT, finish_reason TEXT,
            prompt_tokens INTEGER, completion_tokens INTEGER, cached_tokens INTEGER, reasoning_tokens INTEGER,
            cost_usd TEXT, latency_s REAL, attempts INTEGER, generation_id TEXT, provider TEXT,
            PRIMARY KEY (row_id, requested_model, fingerprint)
        ) WITHOUT ROWID;
        CREATE TABLE runs (
            run_id INTEGER PRIMARY KEY,
            started_at TEXT NOT NULL,
            finished_at TEXT,
            outcome TEXT,
            rows_ok INTEGER DEFAULT 0,
            rows_failed INTEGER DEFAULT 0,
            cost_usd TEXT DEFAULT '0',
            pid INTEGER,
            host TEXT
        );
        """
    for statement in statements.split(";"):  # not executescript: it would commit the migration's transaction
        if statement.strip():
            db.execute(statement)


def _migration_2(db: sqlite3.Connection) -> None:
    """cost_source: whether cost_usd was reported by the server or computed from prices."""
    db.execute("ALTER TABLE results ADD COLUMN cost_source TEXT")


def _migration_3(db: sqlite3.Connection) -> None:
    """Structured answers (parsed JSON) and tool calls."""
    db.execute("ALTER TABLE results ADD COLUMN parsed TEXT")
    db.execute("ALTER TABLE results ADD COLUMN tool_calls TEXT")


def _migration_4(db: sqlite3.Connection) -> None:
    """Tokens of every billed attempt, and which server answered (sandbox answers are never real ones).

    Rows answered before this kept only the answering attempt's tokens: they are its bill."""
    db.execute("ALTER TABLE results ADD COLUMN billed_prompt_tokens INTEGER")
    db.execute("ALTER TABLE results ADD COLUMN billed_completion_tokens INTEGER")
    db.execute("UPDATE results SET billed_prompt_tokens = prompt_tokens, billed_completion_tokens = completion_tokens")
    db.execute("ALTER TABLE results ADD COLUMN server TEXT")


def _migration_5(db: sqlite3.Connection) -> None:
    """Batches submitted to the Batch API: written before the submit call, so nothing is submitted twice."""
    db.execute(
        """CREATE TABLE batches (
            intent_id TEXT PRIMARY KEY,
            batch_id TEXT,
            model TEXT NOT NULL,
            requests INTEGER NOT NULL,
            keys TEXT NOT NULL,
            state TEXT NOT NULL,
            created_at TEXT NOT NULL,
            created_s REAL NOT NULL
        )"""
    )


def _migration_6(db: sqlite3.Connection) -> None:
    """Deduplication: which row paid for a copied answer, and answers found by their request alone."""
    db.execute("ALTER TABLE results ADD COLUMN deduped_from TEXT")
    db.execute("CREATE INDEX results_by_request ON results (fingerprint, requested_model)")


def _migration_7(db: sqlite3.Connection) -> None:
    """Streamed answers: the time to their first token."""
    db.execute("ALTER TABLE results ADD COLUMN ttft_s REAL")


def _migration_8(db: sqlite3.Connection) -> None:
    """Facts about the job as a whole (e.g. that a run left nothing to do, and the state it left)."""
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")


def _migration_9(db: sqlite3.Connection) -> None:
    """The job the checkpoint belongs to (its spec's `name`), one row, written by the first job to open it.

    A checkpoint from before this has none: the first job to open it adopts it, answers and all."""
    db.execute("CREATE TABLE job (only INTEGER PRIMARY KEY CHECK (only = 1), name TEXT NOT NULL, since TEXT NOT NULL)")


def _migration_10(db: sqlite3.Connection) -> None:
    """What a batch holds against the budget until it is collected, where a paged download of its results got to,
    what a cancelled batch was billed (it has no result rows to carry it), and the server it went to."""
    db.execute("ALTER TABLE batches ADD COLUMN reserved_usd TEXT")
    db.execute("ALTER TABLE batches ADD COLUMN cursor TEXT")
    db.execute("ALTER TABLE batches ADD COLUMN cost_usd TEXT")
    db.execute("ALTER TABLE batches ADD COLUMN server TEXT")


def _migration_11_byok_and_service_tier(db: sqlite3.Connection) -> None:
    """BYOK: the providers' part of a row's cost (upstream_cost_usd, exact decimal text; cost_usd stays the whole);
    and the service tier that served its answer. Each column is added only where it is missing, so the migration
    is safe to run over a checkpoint that already has one (another branch's migration, renumbered on a merge)."""
    have = {row[1] for row in db.execute("PRAGMA table_info(results)")}
    for column in ("upstream_cost_usd", "service_tier"):
        if column not in have:
            db.execute(f"ALTER TABLE results ADD COLUMN {column} TEXT")


def _migration_12_audits(db: sqlite3.Connection) -> None:
    """What `batchrunner audit` learned of each generation (what OpenRouter kept, as audit.KeptRecord's JSON; or
    that it had no record yet), so a rerun asks only what is left and an interrupted audit keeps what it did.
    IF NOT EXISTS: safe over a checkpoint that has the table from another branch's migration, renumbered."""
    db.execute(
        """CREATE TABLE IF NOT EXISTS audits (
            generation_id TEXT PRIMARY KEY,
            state TEXT NOT NULL,
            kept TEXT,
            asked_at TEXT NOT NULL,
            tries INTEGER NOT NULL DEFAULT 1
        )"""
    )


def _migration_13_endpoint(db: sqlite3.Connection) -> None:
    """Which server of a pool (api.endpoints) answered a row. Added only where missing, as migration 11 is."""
    if "endpoint" not in {row[1] for row in db.execute("PRAGMA table_info(results)")}:
        db.execute("ALTER TABLE results ADD COLUMN endpoint TEXT")


def _migration_14_run_states(db: sqlite3.Connection) -> None:
    """Each run's state of the job (rerun.unread_state), and the results by input position: a rerun of the job as
    a killed run left it knows that run's answers by position without rendering their rows (Store.settled)."""
    if "state" not in {row[1] for row in db.execute("PRAGMA table_info(runs)")}:  # only where missing, as 11 and 13
        db.execute("ALTER TABLE runs ADD COLUMN state TEXT")
    db.execute("CREATE INDEX IF NOT EXISTS results_by_position ON results (row_index)")


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [
    _migration_1,
    _migration_2,
    _migration_3,
    _migration_4,
    _migration_5,
    _migration_6,
    _migration_7,
    _migration_8,
    _migration_9,
    _migration_10,
    _migration_11_byok_and_service_tier,
    _migration_12_audits,
    _migration_13_endpoint,
    _migration_14_run_states,
]


def _now() -> str:
    return _timestamp(int(time.time()))


@functools.lru_cache(maxsize=1)
def _timestamp(epoch_s: int) -> str:
    """The second's ISO 8601 text, made once a second rather than once an answer."""
    return dt.datetime.fromtimestamp(epoch_s, dt.UTC).isoformat(timespec="seconds")


class Store:
    """A job's checkpoint file. Use `Store.open(path)`; one writer, many short transactions."""

    def __init__(self, path: Path, db: sqlite3.Connection, reader: sqlite3.Connection) -> None:
        self.path = path
        self._db = db  # the writer: commits (the flush thread's), and every write
        self._lock = threading.Lock()  # the writer is shared with the flush thread
        # The reader: every query, beside the writer (WAL), so none waits on a commit; each query a snapshot of the
        # last commit (a read transaction ends with its statement: every query here is read to its end).
        self._reader = reader
        self._read_lock = threading.Lock()
        self._columnar: tuple[Any, Any] | None = None  # ADBC's database and connection, for fetch(), once used
        self._columnar_lock = threading.Lock()
        self._buffer_lock = threading.Lock()  # add() on the loop, flush() on a thread
        self._pending: list[dict[str, Any]] = []  # records by column name (RowResult.to_row and the store's own)
        self.run_id: int | None = None
        self.server = ""
        self.spilled = 0  # answers the checkpoint could not take, written to the spill file at close
        self.lost = 0  # answers that could be saved nowhere (reported, never silent)

    @classmethod
    def open(cls, path: Path, *, server: str = "", job: str | None = None) -> Store:
        """Open (or create) the checkpoint, migrate it, and merge answers an earlier run had to spill.

        `server` names who answers this run's requests ("" for OpenRouter, "sandbox", or a
        base URL); it is recorded with each answer, for `status`. `job` is the spec's name: the
        checkpoint belongs to the first job that opens it, and another job is refused (a SpecError),
        so one job's status never counts another's spending and its --fresh never deletes another's
        answers. None (tests, tools that act for no job) checks nothing."""
        planted = [p for p in (path, *(path.with_name(path.name + s) for s in _COMPANIONS)) if p.is_symlink()]
        if planted:
            raise SpecError(
                Problem(
                    "checkpoint",
                    f"{planted[0]} is a symlink, which batchrunner will not write through; remove it "
                    "(or point `checkpoint:` at the real file)",
                )
            )
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise _unusable(path, exc) from None
        try:
            db.execute(f"PRAGMA page_size={PAGE_SIZE}")  # a new file's; SQLite ignores it for one that has pages
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA busy_timeout=5000")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise SpecError(
                    Problem(
                        "checkpoint",
                        f"{path} was written by a newer batchrunner (schema {version}, this one knows "
                        f"{len(MIGRATIONS)}); upgrade batchrunner",
                    )
                )
            for number, migration in enumerate(MIGRATIONS[version:], start=version + 1):
                db.execute("BEGIN IMMEDIATE")
                migration(db)
                db.execute(f"PRAGMA user_version={number}")
                db.execute("COMMIT")
            db.execute("SELECT count(*) FROM results WHERE 0").fetchone()  # the tables are ours
            if job is not None:
                _claim(db, path, job)
        except (sqlite3.Error, OSError, SpecError) as exc:
            db.close()
            if isinstance(exc, SpecError):
                raise
            raise _unusable(path, exc) from None
        try:
            reader = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            reader.execute("PRAGMA busy_timeout=5000")
            reader.execute("PRAGMA query_only=1")
        except (OSError, sqlite3.Error) as exc:
            db.close()
            raise _unusable(path, exc) from None
        store = cls(path, db, reader)
        store.server = server
        store._merge_spilled()
        return store

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Commit what is buffered and close. Answers the checkpoint still cannot take (a full disk) are
        written to the spill file beside it, which the next open merges; never raised, never silent."""
        for attempt in range(CLOSE_TRIES):
            try:
                self.flush()
                break
            except (sqlite3.Error, OSError) as exc:
                if attempt + 1 < CLOSE_TRIES:
                    time.sleep(0.2)
                    continue
                self._spill(exc)
        with self._columnar_lock, contextlib.suppress(Exception):  # ADBC's errors are its own
            if self._columnar is not None:
                for handle in reversed(self._columnar):
                    handle.close()
        with self._read_lock, contextlib.suppress(sqlite3.Error):
            self._reader.close()  # first: the writer, closing last, folds the WAL into the file and removes it
        with self._lock, contextlib.suppress(sqlite3.Error):
            self._db.close()

    @property
    def spill_path(self) -> Path:
        """out/triage.checkpoint.sqlite -> out/triage.checkpoint.sqlite.unsaved.jsonl"""
        return self.path.with_name(self.path.name + SPILL_SUFFIX)

    def _spill(self, error: BaseException) -> None:
        """Write the buffered records to the spill file, one JSON object by column name a line."""
        with self._buffer_lock:
            batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            fd = open_no_follow(self.spill_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "a", encoding="utf-8") as spill:
                for record in batch:
                    spill.write(json.dumps(record, ensure_ascii=False) + "\n")
                spill.flush()
                os.fsync(spill.fileno())
        except OSError as exc:
            self.lost = len(batch)
            log.error(
                "%d answers could be saved neither to %s (%s) nor to %s (%s); they are lost",
                len(batch),
                self.path,
                error,
                self.spill_path,
                exc,
            )
            return
        self.spilled = len(batch)
        log.error(
            "%d answers could not be saved to %s (%s); they are in %s, and the next run adds them to the checkpoint",
            len(batch),
            self.path,
            error,
            self.spill_path,
        )

    def _merge_spilled(self) -> None:
        """Take in what a run could not save to the checkpoint (see `_spill`), then delete the spill file.

        A line is a record by column name, or a positional list as versions before named records wrote it (each
        layout known by its length); a column it lacks (added since) is NULL. A line cut off by the disk
        filling up is skipped, everything before it kept; a line of no known shape is skipped, and said so."""
        if not self.spill_path.exists():
            return
        columns = record_columns()
        records = []
        for number, line in enumerate(self.spill_path.read_text(encoding="utf-8").splitlines(), start=1):
            try:
                record = json.loads(line)
            except ValueError:
                log.warning("%s: line %d is incomplete and was skipped", self.spill_path, number)
                continue
            if isinstance(record, list) and len(record) in _SPILLED_LAYOUTS:
                record = dict(zip(_SPILLED_LAYOUTS[len(record)], record, strict=True))
            if not isinstance(record, dict):
                log.warning("%s: line %d is not an answer this batchrunner can read; skipped", self.spill_path, number)
                continue
            records.append({name: record.get(name) for name in columns})
        with self._buffer_lock:
            self._pending[:0] = records
        self.flush()
        self.spill_path.unlink()
        log.info("added %d answers an earlier run could not save from %s", len(records), self.spill_path)

    # -- runs -------------------------------------------------------------------------------

    def begin_run(self, state: str | None = None) -> int:
        """Record a run's start; `state` (rerun.unread_state) only when every answer it stores has a key computed
        for the job in that state, by this run (see `settled`)."""
        with self._lock:
            cursor = self._db.execute(
                "INSERT INTO runs (started_at, pid, host, state) VALUES (?, ?, ?, ?)",
                (_now(), os.getpid(), socket.gethostname(), state),
            )
        self.run_id = int(cursor.lastrowid or 0)
        return self.run_id

    def ran_in(self, state: str) -> bool:
        """Whether a run before this one recorded `state` (begin_run): only then can `settled` find anything."""
        with self._read_lock:
            row = self._reader.execute(
                "SELECT 1 FROM runs WHERE state = ? AND run_id IS NOT ? LIMIT 1", (state, self.run_id)
            ).fetchone()
        return row is not None

    def end_run(self, outcome: str, *, ok: int, failed: int, cost_usd: Decimal) -> None:
        """Record how the run ended; a checkpoint that cannot be written is left to `close`, not raised."""
        try:
            self.flush()
            with self._lock:
                self._db.execute(
                    "UPDATE runs SET finished_at = ?, outcome = ?, rows_ok = ?, rows_failed = ?, cost_usd = ? "
                    "WHERE run_id = ?",
                    (_now(), outcome, ok, failed, str(cost_usd), self.run_id),
                )
        except (sqlite3.Error, OSError) as exc:
            log.warning("could not record the end of the run in %s (%s)", self.path, exc)

    def meta(self, key: str) -> str | None:
        with self._read_lock:
            return _meta_in(self._reader, key)

    @staticmethod
    def peek(path: Path, key: str) -> str | None:
        """A fact about the job (`meta`), read without opening the checkpoint as `open` does: read-only, so no
        migration, owner or spilled answer is written. None when there is none, or it cannot be read so."""
        try:
            db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        except (OSError, ValueError, sqlite3.Error):
            return None
        try:
            return _meta_in(db, key)
        except sqlite3.Error:
            return None
        finally:
            db.close()

    def set_meta(self, key: str, value: str | None) -> None:
        """Set (or, with None, forget) a fact about the job."""
        with self._lock:
            if value is None:
                self._db.execute("DELETE FROM meta WHERE key = ?", (key,))
            else:
                self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def runs(self) -> list[dict[str, Any]]:
        """Each run's record, as `status` shows it: its state (begin_run) is the checkpoint's own, not shown."""
        with self._read_lock:
            cursor = self._reader.execute("SELECT * FROM runs ORDER BY run_id")
            names = [d[0] for d in cursor.description]
            records = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
        for record in records:
            record.pop("state", None)
        return records

    def spent_usd(self, server: str = "") -> Decimal:
        """What this checkpoint's answers from `server` cost ("" is OpenRouter), failed and unfinished
        rows' billed attempts included.

        Read from the answers themselves, not from per-run totals written at the end, so it
        is right while a run is going and after one was killed. Each record carries its row's
        whole bill (a retried row starts from what it was billed before), so the sum counts
        every billed attempt once."""
        total = ZERO_USD
        with self._read_lock:
            costs = self._reader.execute(
                "SELECT cost_usd FROM results WHERE cost_usd IS NOT NULL AND coalesce(server, '') = ? UNION ALL "
                "SELECT cost_usd FROM batches WHERE cost_usd IS NOT NULL AND coalesce(server, '') = ?",
                (server, server),
            ).fetchall()
        for (cost,) in costs:
            total += Decimal(cost)
        return total

    def unpriced(self, server: str = "") -> int:
        """Answers from `server` with an attempt whose cost is unknown: while not 0, spent_usd is a lower bound."""
        with self._read_lock:
            row = self._reader.execute(
                "SELECT count(*) FROM results WHERE cost_source = 'unknown' AND coalesce(server, '') = ?", (server,)
            ).fetchone()
        return int(row[0])

    # -- results ----------------------------------------------------------------------------

    def resumed(self, count: int) -> None:
        """Nothing to keep: those answers are already here."""

    def add(self, result: RowResult) -> None:
        """Buffer a result's record, by column name; `flush` (or the flusher task) commits it."""
        record = result.to_row()
        record["run_id"], record["answered_at"], record["server"] = self.run_id, _now(), self.server
        with self._buffer_lock:
            self._pending.append(record)

    def flush(self) -> int:
        """Commit what is buffered, in one transaction; safe to call from a worker thread."""
        with self._buffer_lock:
            batch, self._pending = self._pending, []
        if not batch:
            return 0
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                columns = record_columns()
                self._db.executemany(_insert(columns), map(operator.itemgetter(*columns), batch))
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                with self._buffer_lock:
                    self._pending[:0] = batch
                raise
        return len(batch)

    async def flush_every(self, interval_s: float, on_error: Callable[[Exception], None] | None = None) -> None:
        """Commit buffered answers every `interval_s` (from the start of one commit to the next), off the event
        loop, until cancelled.

        A failed commit (a full disk, or anything else) keeps the answers buffered and is
        tried again; `on_error` hears of it, so the run stops paying for answers it cannot
        keep. This task never dies of an error: a dead flusher would save nothing more."""
        import asyncio  # here, not at the top: commands that only read the checkpoint never need it

        took = 0.0
        try:
            while True:
                # a commit that took the interval or longer (long answers) is followed by the next at once: what
                # arrived meanwhile is already due, and the flush thread's idle time would only grow the backlog
                await asyncio.sleep(max(0.0, interval_s - took))
                started = time.monotonic()
                try:
                    await asyncio.to_thread(self.flush)
                except Exception as exc:
                    if on_error is not None:
                        on_error(exc)
                took = time.monotonic() - started
        finally:
            with contextlib.suppress(Exception):
                self.flush()

    @property
    def unsaved(self) -> int:
        """Answers received but not (yet) committed."""
        with self._buffer_lock:
            return len(self._pending)

    @contextlib.contextmanager
    def _reading(self, *, columnar: bool = False) -> Iterator[None]:
        """The reader (or, `columnar`, fetch()'s), for the queries a run makes as it reads its rows; a checkpoint
        that fails them mid-run (a disk error) stops the run with a sentence naming it, not as an input or internal
        error."""
        errors: tuple[type[Exception], ...] = (sqlite3.Error,)
        if columnar:
            import adbc_driver_manager

            errors = (adbc_driver_manager.Error, *errors)
        with self._columnar_lock if columnar else self._read_lock:
            try:
                yield
            except errors as exc:
                raise RunHalted(
                    f"cannot read the checkpoint {self.path} ({str(exc).strip() or type(exc).__name__}); "
                    "check the disk, then rerun"
                ) from exc

    def answered(self, row_ids: Sequence[str]) -> set[tuple[str, str, str]]:
        """(row id, requested model, fingerprint) of every answer stored for these rows."""
        found: set[tuple[str, str, str]] = set()
        with self._reading():
            for chunk in _chunks(row_ids, MAX_PARAMETERS):
                marks = ",".join("?" * len(chunk))
                query = f"SELECT row_id, requested_model, fingerprint FROM results WHERE status = 'ok' AND row_id IN ({marks})"
                found.update(self._reader.execute(query, chunk).fetchall())
        return found

    def unfinished(self, row_ids: Sequence[str]) -> dict[tuple[str, str, str], tuple[str, Bill]]:
        """The status ("failed" or "pending") and bill of these rows' unanswered records, by checkpoint key:
        a retry starts from the bill."""
        from batchrunner.records import KEY_COLUMNS

        found: dict[tuple[str, str, str], tuple[str, Bill]] = {}
        names = (*KEY_COLUMNS, "status", *_BILL_COLUMNS)
        with self._reading():
            for chunk in _chunks(row_ids, MAX_PARAMETERS):
                marks = ",".join("?" * len(chunk))
                query = f"SELECT {', '.join(names)} FROM results WHERE status != 'ok' AND row_id IN ({marks})"
                for values in self._reader.execute(query, chunk).fetchall():
                    record = dict(zip(names, values, strict=True))
                    key = (record["row_id"], record["requested_model"], record["fingerprint"])
                    found[key] = (record["status"], _bill(record))
        return found

    def answers_by_server(self) -> dict[str, int]:
        """How many answers each server gave ("" is OpenRouter; answers from before servers were recorded count as it)."""
        with self._read_lock:
            rows = self._reader.execute(
                "SELECT coalesce(server, ''), count(*) FROM results WHERE status = 'ok' GROUP BY 1"
            ).fetchall()
        return {server: int(n) for server, n in rows}

    def completion_tokens_by_model(self) -> dict[str, tuple[int, int]]:
        """(answers, completion tokens) per requested model: how long this job's answers run."""
        with self._read_lock:
            rows = self._reader.execute(
                "SELECT requested_model, count(*), sum(completion_tokens) FROM results WHERE status = 'ok' GROUP BY requested_model"
            ).fetchall()
        return {model: (int(n), int(total or 0)) for model, n, total in rows}

    def answers_to(self, requests: Iterable[tuple[str, str]]) -> dict[tuple[str, str], dict[str, Any]]:
        """The stored answer (any row's, `status: ok`, not itself a copy) to each (requested model, fingerprint),
        as its record by column name (PAIR_COLUMNS and STORED_SCHEMA's; RowResult.from_row reads it): what
        dedupe copies instead of asking again. Answers not yet committed are seen too, so an answer is never
        asked for twice in the gap before a commit."""
        from batchrunner.records import PAIR_COLUMNS, STORED_SCHEMA

        wanted = set(requests)
        found: dict[tuple[str, str], dict[str, Any]] = {}
        names = [*PAIR_COLUMNS, *STORED_SCHEMA]
        with self._buffer_lock:
            buffered = list(self._pending)
        for record in buffered:
            key = (record["requested_model"], record["fingerprint"])
            if key in wanted and record["status"] == "ok" and record["deduped_from"] is None:
                found.setdefault(key, {name: record[name] for name in names})
        fingerprints = sorted({fingerprint for model, fingerprint in wanted if (model, fingerprint) not in found})
        with self._reading():
            for chunk in _chunks(fingerprints, MAX_PARAMETERS):
                marks = ",".join("?" * len(chunk))
                query = (
                    f"SELECT {', '.join(names)} FROM results WHERE fingerprint IN ({marks}) "
                    "AND status = 'ok' AND deduped_from IS NULL"
                )
                for row in self._reader.execute(query, chunk).fetchall():
                    values = dict(zip(names, row, strict=True))
                    key = (values["requested_model"], values["fingerprint"])
                    if key in wanted:
                        found.setdefault(key, values)
        return found

    def fetch(self, row_ids: Sequence[str]) -> pl.DataFrame:
        """Every answered or failed record of these rows (not the unfinished ones), as a frame with named
        columns: fetched_schema()'s, `fingerprint`, `row_id` and STORED_SCHEMA's (money as exact decimal text).

        Read as columns (ADBC's SQLite driver: Arrow batches straight into polars), never as a Python value per
        cell: the output of a run is made of every stored answer, and building each as a Python string, then a
        list, then a Series was most of an output's time (bench/resume.py, bench/speed.py --long-only). The ids
        go in as one JSON array (json_each): no limit on how many, no statement per chunk."""
        import polars as pl

        where = "status != 'pending' AND row_id IN (SELECT value FROM json_each(?))"
        return self._columns(fetched_schema(), where, pl.DataFrame({"ids": [json.dumps(list(row_ids))]}))

    def settled(self, state: str, first_row: int, last_row: int) -> pl.DataFrame:
        """The answers to input rows `first_row` to `last_row` stored by runs of the job in `state` (runs whose
        every answer's key was computed for the job in that state: Store.begin_run), by position: `row_index`,
        `model_position`, `row_id`, `requested_model`, `fingerprint`. With the job in that state still, each is the
        answer to the pair at its position, known without rendering the row."""
        import polars as pl

        schema = {
            "row_index": pl.Int64(),
            "model_position": pl.Int64(),
            "row_id": pl.String(),
            "requested_model": pl.String(),
            "fingerprint": pl.String(),
        }
        where = "row_index BETWEEN ? AND ? AND status = 'ok' AND run_id IN (SELECT run_id FROM runs WHERE state = ?)"
        params = pl.DataFrame({"first": [first_row], "last": [last_row], "state": [state]})
        return self._columns(schema, where, params)

    def _columns(self, schema: dict[str, pl.DataType], where: str, params: pl.DataFrame) -> pl.DataFrame:
        """The `schema` columns of the results `where` selects (its ? bound to `params`' one row), read as columns."""
        import polars as pl

        with self._reading(columnar=True):
            statement = self._columnar_statement()
            try:
                statement.set_sql_query(_typed_select(schema, where))
                statement.bind_stream(params)
                stream, _ = statement.execute_query()
                frame = pl.DataFrame(stream)
            finally:
                statement.close()  # a statement left open holds its snapshot: later reads would not see commits
        typing = frame.get_column(TYPING_ROW)
        if frame.is_empty() or typing[0] != 1 or typing.sum() != 1:  # SQLite promises no order without ORDER BY
            raise RunHalted(f"cannot read the checkpoint {self.path} (its rows came out of order); rerun")
        return frame.slice(1).drop(TYPING_ROW).cast(pl.Schema(schema))  # less _typed_select's first row

    def _columnar_statement(self) -> Any:
        """The columnar reader (ADBC), opened at its first use, read-only beside the writer (WAL) as the reader
        is; closed before the writer (close())."""
        import adbc_driver_manager
        import adbc_driver_sqlite

        if self._columnar is None:
            database = adbc_driver_sqlite.connect(f"file:{urllib.parse.quote(str(self.path.resolve()))}?mode=ro")
            self._columnar = (database, adbc_driver_manager.AdbcConnection(database))
        return adbc_driver_manager.AdbcStatement(self._columnar[1])

    # -- audits (batchrunner audit) --------------------------------------------------------

    def audit_rows(self, server: str = "") -> list[dict[str, Any]]:
        """The records `audit` checks, by column name: the rows `server` answered ("" OpenRouter, as for answers
        from before servers were recorded) that carry a generation id and paid for it (a dedupe copy, which
        names the row that paid, is left out), in a fixed order (by generation id) for a reproducible sample."""
        names = (
            "generation_id",
            "row_id",
            "requested_model",
            "cost_usd",
            "cost_source",
            "prompt_tokens",
            "completion_tokens",
            "billed_prompt_tokens",
            "billed_completion_tokens",
            "attempts",
        )
        with self._reading():
            rows = self._reader.execute(
                f"SELECT {', '.join(names)} FROM results WHERE generation_id IS NOT NULL AND deduped_from IS NULL "
                "AND status != 'pending' AND coalesce(server, '') = ? ORDER BY generation_id, row_id",
                (server,),
            ).fetchall()
        return [dict(zip(names, row, strict=True)) for row in rows]

    def audited(self) -> dict[str, tuple[str, str | None]]:
        """What earlier audits learned: generation id -> (state, what was kept as JSON text). State "found" is
        final; "unknown" (no record yet) is asked again."""
        with self._reading():
            rows = self._reader.execute("SELECT generation_id, state, kept FROM audits").fetchall()
        return {generation_id: (state, kept) for generation_id, state, kept in rows}

    def record_audit(self, generation_id: str, state: str, kept: str | None) -> None:
        """Keep what one lookup learned, committed at once: an audit stopped half-way keeps every answer it had."""
        with self._lock:
            self._db.execute(
                "INSERT INTO audits (generation_id, state, kept, asked_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (generation_id) DO UPDATE SET state = excluded.state, kept = excluded.kept, "
                "asked_at = excluded.asked_at, tries = tries + 1",
                (generation_id, state, kept, _now()),
            )

    # -- batches --------------------------------------------------------------------------

    def record_batch(
        self,
        intent_id: str,
        model: str,
        keys: dict[str, list[str]],
        created_s: float,
        *,
        reserved_usd: Decimal = ZERO_USD,
    ) -> None:
        """A batch about to be submitted: its custom ids and the checkpoint keys they stand for, committed
        before the submit call, so a lost answer to it can be reconciled instead of submitted again."""
        with self._lock:
            self._db.execute(
                "INSERT INTO batches (intent_id, batch_id, model, requests, keys, state, created_at, created_s, "
                "reserved_usd, server) VALUES (?, NULL, ?, ?, ?, 'submitting', ?, ?, ?, ?)",
                (intent_id, model, len(keys), json.dumps(keys), _now(), created_s, str(reserved_usd), self.server),
            )

    def batch_submitted(self, intent_id: str, batch_id: str) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE batches SET batch_id = ?, state = 'submitted' WHERE intent_id = ?", (batch_id, intent_id)
            )

    def batch_state(self, intent_id: str, state: str) -> None:
        """`collected`, `requeued` (expired, cancelled, failed or never submitted), `cancelling` (a cancel was
        asked: still open until the batch says it ended), or `submitted`."""
        with self._lock:
            self._db.execute("UPDATE batches SET state = ? WHERE intent_id = ?", (state, intent_id))

    def batch_cursor(self, intent_id: str, cursor: str | None) -> None:
        """Where the paged download of a batch's results got to: every result before it is committed."""
        self.flush()  # the page's answers first: a crash after this resumes after them, never before
        with self._lock:
            self._db.execute("UPDATE batches SET cursor = ? WHERE intent_id = ?", (cursor, intent_id))

    def batch_cost(self, intent_id: str, cost_usd: Decimal) -> None:
        """What a batch without result rows (cancelled) was billed: it counts in the job's spending."""
        with self._lock:
            self._db.execute("UPDATE batches SET cost_usd = ? WHERE intent_id = ?", (str(cost_usd), intent_id))

    def open_batches(self) -> list[dict[str, Any]]:
        """Batches submitted (or being submitted) and not yet collected, oldest first."""
        with self._read_lock:
            cursor = self._reader.execute(
                "SELECT intent_id, batch_id, model, requests, keys, state, created_s, reserved_usd, cursor "
                "FROM batches WHERE state IN ('submitting', 'submitted', 'cancelling') ORDER BY created_s"
            )
            names = [d[0] for d in cursor.description]
            rows = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
        for row in rows:
            row["keys"] = json.loads(row["keys"])
            row["reserved_usd"] = Decimal(row["reserved_usd"] or "0")
        return rows

    def all_batches(self) -> list[dict[str, Any]]:
        """Every batch this job submitted, for `status`."""
        with self._read_lock:
            cursor = self._reader.execute(
                "SELECT intent_id, batch_id, model, requests, state, created_at FROM batches ORDER BY created_s"
            )
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def delete_all(self) -> None:
        with self._lock:
            self._db.execute("DELETE FROM results")
            self._db.execute("DELETE FROM runs")
            self._db.execute("DELETE FROM meta")
            self._db.execute("DELETE FROM audits")


def _meta_in(db: sqlite3.Connection, key: str) -> str | None:
    """A fact about the job from the meta table, through `db`: the store's reader, or `peek`'s read-only one."""
    row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def fetched_schema() -> dict[str, pl.DataType]:
    """The columns, with their types, of the frame fetch() returns."""
    import polars as pl

    from batchrunner.records import STORED_SCHEMA

    return {"fingerprint": pl.String(), "row_id": pl.String(), **STORED_SCHEMA}


_COMPANIONS = ("-wal", "-shm", "-journal", SPILL_SUFFIX)  # files SQLite (and the spill) keep beside the checkpoint


def _claim(db: sqlite3.Connection, path: Path, job: str) -> None:
    """Record `job` as the checkpoint's owner if it has none (new, or written before owners were recorded);
    refuse it if the checkpoint is another job's. One transaction: of two jobs opening it at once, one owns it."""
    db.execute("BEGIN IMMEDIATE")  # on an error the caller closes the connection, which rolls it back
    row = db.execute("SELECT name FROM job").fetchone()
    if row is None:
        db.execute("INSERT INTO job (only, name, since) VALUES (1, ?, ?)", (job, _now()))
    db.execute("COMMIT")
    if row is not None and row[0] != job:
        raise SpecError(
            Problem(
                "checkpoint",
                f"{path} holds the answers of job {row[0]!r}, not of this job {job!r}; give this job its own "
                f"file with `checkpoint:` (or, if this job is {row[0]!r} renamed, set `name: {row[0]}` back)",
            )
        )


def _unusable(path: Path, exc: BaseException) -> SpecError:
    """A checkpoint SQLite cannot open or write, as a one-line problem with the fix."""
    detail = str(exc).strip() or type(exc).__name__
    if "readonly" in detail or "read-only" in detail or isinstance(exc, PermissionError):
        fix = "it is read-only: make it and its folder writable, or point `checkpoint:` elsewhere"
    elif "not a database" in detail or "malformed" in detail or "no such table" in detail:
        fix = "it is not a batchrunner checkpoint (or it is damaged): move it away, or point `checkpoint:` elsewhere"
    else:
        fix = "check the file and its folder, or point `checkpoint:` elsewhere"
    return SpecError(Problem("checkpoint", f"{path}: cannot use it as the checkpoint ({detail}); {fix}"))


# What a retry starts from: the columns of a row's whole bill (records.Bill), every attempt in every run.
_BILL_COLUMNS = (
    "cost_usd",
    "cost_source",
    "billed_prompt_tokens",
    "billed_completion_tokens",
    "attempts",
    "upstream_cost_usd",
)


def _bill(record: dict[str, Any]) -> Bill:
    """A row's whole bill from its stored record, by column name (a NULL, from before a column was kept, as none)."""
    from batchrunner.records import Bill

    upstream = record["upstream_cost_usd"]
    return Bill(
        Decimal(record["cost_usd"] or "0"),
        {record["cost_source"] or "reported"},
        record["billed_prompt_tokens"] or 0,
        record["billed_completion_tokens"] or 0,
        record["attempts"] or 0,
        None if upstream is None else Decimal(upstream),
    )


def read_ahead(
    items: Iterable[T], read: Callable[[T], R], *, ahead_after: Callable[[R], bool] = lambda _: True
) -> Iterator[tuple[T, R]]:
    """Each item with `read(item)`, read on a thread one item ahead of its use: the checkpoint's reads (SQLite
    and ADBC, in C without the GIL) beside polars' and Python's work on the item before, on the other core. After
    a result `ahead_after` refuses (a large one), the next is read only once that item has been used. A read's
    error is raised where its item is taken, after the items before it."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="batchrunner-read") as pool:
        previous: tuple[T, concurrent.futures.Future[R]] | None = None
        for item in items:
            if previous is None:
                previous = (item, pool.submit(read, item))
                continue
            result = previous[1].result()
            ahead = pool.submit(read, item) if ahead_after(result) else None
            yield previous[0], result
            previous = (item, ahead if ahead is not None else pool.submit(read, item))
        if previous is not None:
            yield previous[0], previous[1].result()


TYPING_ROW = "__typing_row"  # a column of _typed_select's: 1 in the row that types the columns, 0 in the records


def _typed_select(schema: dict[str, pl.DataType], where: str) -> str:
    """A query of the results table whose columns come out with their schema's types, for ADBC: its SQLite driver
    types a column by the first values it reads (NULLs first made a text column an integer one, and the first text
    an error). Each value is CAST to its column's type, and a first row of one value of each type leads the rows
    (the caller drops it)."""
    import polars as pl

    sql_types = {pl.String(): ("TEXT", "''"), pl.Int64(): ("INTEGER", "0"), pl.Float64(): ("REAL", "0.0")}
    first = ", ".join(f"{sql_types[dtype][1]} AS {name}" for name, dtype in schema.items())
    cast = ", ".join(f"CAST({name} AS {sql_types[dtype][0]}) AS {name}" for name, dtype in schema.items())
    # TYPING_ROW marks the first row, for the caller to see it is first: a row taken for it would be an answer lost
    return f"SELECT 1 AS {TYPING_ROW}, {first} UNION ALL SELECT 0 AS {TYPING_ROW}, {cast} FROM results WHERE {where}"


def _chunks(items: Sequence[str], size: int) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
