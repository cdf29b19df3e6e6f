"""The cache index: one SQLite database per cache directory, shared by every process using it.

``<dir>/index.sqlite3`` (WAL mode) records each block's size and last-access time, and the
pins: ``pins(key, owner)``, with the names an owner was asked by in ``pin_names(name,
owner)``. An owner is whatever pinned the blocks (``fedmount stage --pin`` pins a
collection's blocks with its portable data hash as the owner and the IDs it was given as
names); the empty owner stands for pins taken without one. A block is pinned while any
owner pins it, so two staged collections that share a block keep it pinned until both are
unpinned; a pinned block is never evicted by any process, and pins survive restarts.

Eviction. After a block is stored, if the blocks' total size exceeds the process's bound,
the least recently used blocks that are neither pinned nor kept by the caller are deleted
(their files unlinked) inside one write transaction, so two processes never over- or
double-evict. Access times are written when a process first reads a block and then at most
once a minute per block (disk.py), not on every read.

Repair. The index is checked (``PRAGMA quick_check``) when a process opens it; a corrupt
one is rebuilt from the block files on disk (every file a key, its size from the key, its
access time from the file), keeping the pins that can still be read, under a lock file so
that one process rebuilds it; the new file replaces the old one (whose WAL is removed
first, never to be replayed into it), and a process that finds the index replaced
reconnects. Updates made on the read path (access times, discarding a block) wait at most
`READ_PATH_WAIT` for another process's write and are best effort: a failure is logged once
and reads go on.

Older layouts are migrated once, when a process opens the directory: a ``pins`` table
without owners (its pins get the empty owner), and ``locality-pins.json`` (`PIN_FILE_V1`,
where earlier versions of ``fedmount stage`` kept the owners), whose entries become owned
pins and which is then removed.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from .files import private
from .format import KEY_NAME

log = logging.getLogger("fedmount.cache")
T = TypeVar("T")

INDEX = "index.sqlite3"
INDEX_FILES = (INDEX, INDEX + "-wal", INDEX + "-shm")
PIN_FILE_V1 = "locality-pins.json"  # {"version": 1, "pins": {"<pdh>": {"ids": [...], "keys": [...]}}}
CORRUPT_INDEX = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
INDEX_WAIT = 60.0  # seconds a write to the index waits for another process's
READ_PATH_WAIT = 0.1  # the same for the read path's best-effort updates (a reader waits for them)
NO_OWNER = ""


class Index:
    """The SQLite index of one cache directory; every method runs in a worker thread (or at start-up).

    `block_files` lists ``(key, size, access time)`` of the block files on disk, for a rebuild."""

    def __init__(self, directory: str, block_files: Callable[[], Iterable[tuple[str, int, float]]]):
        self.directory = directory
        self._block_files = block_files
        self._path = os.path.join(directory, INDEX)
        self._lock = threading.Lock()
        self._db, self._inode = self._connect()
        self._trouble = False  # an update from the read path failed (logged once)
        self._migrate_pin_file()

    # connection and repair -----------------------------------------------------------

    def _connect(self, rebuilt: bool = False) -> tuple[sqlite3.Connection, int]:
        """Open the index (made 0600 first: SQLite gives its -wal and -shm the same mode), rebuilding
        it from the block files if it is corrupt."""
        os.close(os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
        db = sqlite3.connect(self._path, timeout=INDEX_WAIT, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            _create_tables(db)
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {check}")
        except sqlite3.DatabaseError as exc:
            db.close()
            if rebuilt or isinstance(exc, sqlite3.OperationalError):
                raise
            self._rebuild(exc)
            return self._connect(rebuilt=True)
        return db, os.stat(self._path).st_ino

    def _rebuild(self, why: BaseException) -> None:
        """Replace a corrupt index with one listing the block files on disk, keeping what pins can be
        read from the old one. One process at a time (a lock file); if another one rebuilt it
        meanwhile, there is nothing left to do."""
        with open(os.path.join(self.directory, "index.lock"), "a", opener=private) as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if _is_sound(self._path):
                return
            pins, names = _readable_pins(self._path)
            fresh = f"{self._path}.rebuild.{secrets.token_hex(4)}"
            db = sqlite3.connect(fresh, isolation_level=None)
            try:
                os.chmod(fresh, 0o600)
                _create_tables(db)
                rows = list(self._block_files())
                db.execute("BEGIN")
                db.executemany("INSERT OR REPLACE INTO blocks VALUES (?, ?, ?)", rows)
                db.executemany("INSERT OR IGNORE INTO pins VALUES (?, ?)", pins)
                db.executemany("INSERT OR IGNORE INTO pin_names VALUES (?, ?)", names)
                db.execute("COMMIT")
            finally:
                db.close()
            for name in INDEX_FILES[1:]:  # the old WAL must never be replayed into the new file
                try:
                    os.unlink(os.path.join(self.directory, name))
                except FileNotFoundError:
                    pass
            os.rename(fresh, self._path)
        log.warning(
            "block cache: the index %s was corrupt (%s); rebuilt it from the %d block files on disk, "
            "%d pins kept",
            self._path, why, len(rows), len({key for key, _ in pins}),
        )  # fmt: skip

    def call(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work` on the index; once more after reconnecting if another process replaced the index
        file, or after rebuilding it if it is corrupt."""
        with self._lock:
            try:
                return work(self._db)
            except sqlite3.DatabaseError as exc:
                replaced = self._replaced()
                if not replaced and (
                    isinstance(exc, sqlite3.OperationalError)
                    or getattr(exc, "sqlite_errorcode", None) not in CORRUPT_INDEX
                ):
                    raise
                self._db.close()
                if not replaced:
                    self._rebuild(exc)
                self._db, self._inode = self._connect()
                return work(self._db)

    def _replaced(self) -> bool:
        try:
            return os.stat(self._path).st_ino != self._inode
        except FileNotFoundError:
            return True

    def _sql(self, query: str, args: Iterable[object] = ()) -> list[tuple]:
        params = tuple(args)
        return self.call(lambda db: db.execute(query, params).fetchall())

    def _best_effort(self, query: str, args: tuple[object, ...]) -> None:
        """Update the index from the read path, waiting at most `READ_PATH_WAIT` for another process's
        write: a failure is logged once and reads go on; the index may then be behind the files
        until it works again."""

        def work(db: sqlite3.Connection) -> None:
            db.execute(f"PRAGMA busy_timeout = {int(READ_PATH_WAIT * 1000)}")
            try:
                db.execute(query, args)
            finally:
                db.execute(f"PRAGMA busy_timeout = {int(INDEX_WAIT * 1000)}")

        try:
            self.call(work)
        except sqlite3.Error as exc:
            if not self._trouble:
                log.warning("block cache: cannot update %s (%s); reads go on", self._path, exc)
            self._trouble = True
        else:
            self._trouble = False

    # blocks --------------------------------------------------------------------------

    def stored(self, key: str, size: int) -> None:
        """A block file was published: record it as just used."""
        self._sql("INSERT OR REPLACE INTO blocks VALUES (?, ?, ?)", (key, size, time.time()))

    def touched(self, key: str, size: int, now: float) -> None:
        """A block was read (best effort: see `READ_PATH_WAIT`)."""
        self._best_effort(
            "INSERT INTO blocks VALUES (?, ?, ?) ON CONFLICT(key) DO UPDATE SET atime=?",
            (key, size, now, now),
        )

    def forget(self, key: str) -> None:
        """A block file was discarded (best effort)."""
        self._best_effort("DELETE FROM blocks WHERE key = ?", (key,))

    def evict(
        self, limit: int, keep: set[str] | frozenset[str], remove: Callable[[str], None]
    ) -> tuple[list[str], int]:
        """Delete least recently used blocks, neither pinned nor in `keep`, until the total is within
        `limit`; `remove` unlinks each one's file inside the transaction. Returns (the keys
        evicted, bytes of the blocks left)."""

        def work(db: sqlite3.Connection) -> tuple[list[str], int]:
            evicted: list[str] = []
            db.execute("BEGIN IMMEDIATE")
            try:
                total = db.execute("SELECT COALESCE(SUM(size), 0) FROM blocks").fetchone()[0]
                if total > limit:
                    rows = db.execute(
                        "SELECT key, size FROM blocks WHERE key NOT IN (SELECT key FROM pins) ORDER BY atime"
                    )
                    for key, size in rows.fetchall():
                        if total <= limit:
                            break
                        if key not in keep:
                            evicted.append(key)
                            total -= size
                    db.executemany("DELETE FROM blocks WHERE key = ?", [(k,) for k in evicted])
                    for key in evicted:
                        remove(key)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return evicted, total

        return self.call(work)

    # pins ----------------------------------------------------------------------------

    def pin(self, keys: Iterable[str], owner: str = NO_OWNER, names: Sequence[str] = ()) -> None:
        """Pin `keys` for `owner`, known also by `names` (the empty owner has no names)."""
        aliases = [(n, owner) for n in names if n != owner] if owner != NO_OWNER else []
        self._add_pins([(k, owner) for k in keys], aliases)

    def _add_pins(self, rows: list[tuple[str, str]], names: list[tuple[str, str]]) -> None:
        """Insert (key, owner) pins and (name, owner) names in one transaction."""

        def work(db: sqlite3.Connection) -> None:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany("INSERT OR IGNORE INTO pins VALUES (?, ?)", rows)
                db.executemany("INSERT OR IGNORE INTO pin_names VALUES (?, ?)", names)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

        self.call(work)

    def unpin(self, keys: Iterable[str], owner: str = NO_OWNER) -> list[str]:
        """Release `owner`'s pins (all of them, and its names, if it is not the empty owner) and the
        ownerless pins of `keys`; the keys of `keys` no owner pins any more."""
        wanted = list(dict.fromkeys(keys))

        def work(db: sqlite3.Connection) -> list[str]:
            db.execute("BEGIN IMMEDIATE")
            try:
                ownerless = [(k, NO_OWNER) for k in wanted]
                db.executemany("DELETE FROM pins WHERE key = ? AND owner = ?", ownerless)
                if owner != NO_OWNER:
                    db.execute("DELETE FROM pins WHERE owner = ?", (owner,))
                    db.execute("DELETE FROM pin_names WHERE owner = ?", (owner,))
                still = {k for (k,) in db.execute("SELECT DISTINCT key FROM pins")}
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return [k for k in wanted if k not in still]

        return self.call(work)

    def pins_of(self, name: str) -> tuple[str, list[str]] | None:
        """(owner, its keys) for an owner named `name` or known by that name, or None."""
        rows = self._sql(
            "SELECT owner FROM pins WHERE owner = ? AND owner != '' "
            "UNION SELECT owner FROM pin_names WHERE name = ? LIMIT 1",
            (name, name),
        )
        if not rows:
            return None
        owner = rows[0][0]
        return owner, [k for (k,) in self._sql("SELECT key FROM pins WHERE owner = ? ORDER BY key", (owner,))]

    def pinned(self) -> set[str]:
        return {k for (k,) in self._sql("SELECT key FROM pins")}

    def _migrate_pin_file(self) -> None:
        """Move the owners of ``locality-pins.json`` into the index, then remove the file (once)."""
        path = os.path.join(self.directory, PIN_FILE_V1)
        try:
            with open(path, encoding="utf-8") as f:
                entries = dict(json.load(f).get("pins", {}))
            rows = [(str(k), str(pdh)) for pdh, e in entries.items() for k in e.get("keys", ())]
            names = [(str(n), str(pdh)) for pdh, e in entries.items() for n in e.get("ids", ()) if n != pdh]
        except FileNotFoundError:
            return
        except (OSError, ValueError, AttributeError, TypeError) as exc:
            log.warning("block cache: ignoring unreadable pin record %s (%s)", path, exc)
            return
        self._add_pins(rows, names)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        log.info("block cache: moved the pins of %d collections from %s into the index", len(entries), path)


def held_bytes(directory: str) -> int:
    """What the blocks in the index of `directory` add up to (0 without a readable index)."""
    index = os.path.join(directory, INDEX)
    if not os.path.exists(index):
        return 0
    try:
        db = sqlite3.connect(f"file:{index}?mode=ro", uri=True, timeout=60)
        try:
            return db.execute("SELECT COALESCE(SUM(size), 0) FROM blocks").fetchone()[0]
        finally:
            db.close()
    except sqlite3.Error:
        return 0


def _create_tables(db: sqlite3.Connection) -> None:
    db.execute(
        "CREATE TABLE IF NOT EXISTS blocks (key TEXT PRIMARY KEY, size INTEGER NOT NULL, atime REAL NOT NULL)"
    )
    db.execute("CREATE INDEX IF NOT EXISTS blocks_atime ON blocks(atime)")
    db.execute(
        "CREATE TABLE IF NOT EXISTS pin_names (name TEXT NOT NULL, owner TEXT NOT NULL,"
        " PRIMARY KEY (name, owner))"
    )
    if _has_owners(db):
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        if not _has_owners(db):  # another process may have migrated it meanwhile
            exists = db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='pins'").fetchone()
            if exists:
                db.execute("ALTER TABLE pins RENAME TO pins_without_owners")
            db.execute(
                "CREATE TABLE pins (key TEXT NOT NULL, owner TEXT NOT NULL DEFAULT '',"
                " PRIMARY KEY (key, owner))"
            )
            if exists:
                db.execute("INSERT OR IGNORE INTO pins SELECT key, '' FROM pins_without_owners")
                db.execute("DROP TABLE pins_without_owners")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _has_owners(db: sqlite3.Connection) -> bool:
    return any(row[1] == "owner" for row in db.execute("PRAGMA table_info(pins)"))


def _is_sound(index: str) -> bool:
    try:
        db = sqlite3.connect(f"file:{index}?mode=ro", uri=True, timeout=60)
        try:
            return db.execute("PRAGMA quick_check").fetchone()[0] == "ok"
        finally:
            db.close()
    except sqlite3.Error:
        return False


def _readable_pins(index: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """What can still be read of a corrupt index's pins and pin names (nothing if that fails)."""
    pins: list[tuple[str, str]] = []
    names: list[tuple[str, str]] = []
    try:
        db = sqlite3.connect(f"file:{index}?mode=ro", uri=True, timeout=5)
        try:
            try:
                pins = [(str(k), str(o)) for k, o in db.execute("SELECT key, owner FROM pins")]
            except sqlite3.OperationalError:  # a table without owners
                pins = [(str(k), NO_OWNER) for (k,) in db.execute("SELECT key FROM pins")]
            try:
                names = [(str(n), str(o)) for n, o in db.execute("SELECT name, owner FROM pin_names")]
            except sqlite3.Error:
                names = []
        finally:
            db.close()
    except sqlite3.Error:
        return [], []
    return [(k, o) for k, o in pins if KEY_NAME.fullmatch(k)], names
