"""One scoring run per output: a lock object ``OUT/_lock.json`` on the output's storage.

The lock holds a random run id, the start time, the time of its last heartbeat and how long
it may go without one; nothing about the host, paths or patients. It is taken atomically
(:func:`covidray.storage.create_exclusive`: ``If-None-Match: *`` on S3, ``O_EXCL`` on local
files), renewed by a heartbeat thread every quarter of ``stale_after_s`` (a conditional
replace: a holder whose lock was taken over notices and stops renewing it), and removed at the
end only if it is still this run's. A lock whose heartbeat is older than its ``stale_after_s``
belongs to a run that crashed or was killed: the next run takes it over with a conditional
replace, so of two runs that find it stale only one wins. Staleness compares the holder's
clock (the heartbeat time it wrote) with the reader's: clocks must agree to well within
``stale_after_s``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from datetime import UTC, datetime
from types import TracebackType

from pydantic import BaseModel, ValidationError

from .. import storage

LOCK_NAME = "_lock.json"
KIND = "covidray score"

log = logging.getLogger(__name__)


class LockHeld(ValueError):
    """Another run holds the output's lock (a ValueError: the CLI prints it and exits 2)."""


class LockLost(ValueError):
    """Another run took this run's lock over: it stops writing (one line, a non-zero exit)."""


class LockRecord(BaseModel):
    """The lock object's content."""

    kind: str = KIND
    run_id: str
    started_at: datetime
    heartbeat_at: datetime
    stale_after_s: float

    def age_s(self, now: float) -> float:
        """Seconds since the last heartbeat, by the reader's clock ``now``."""
        return now - self.heartbeat_at.timestamp()


def _now() -> datetime:
    return datetime.now(UTC)


class OutputLock:
    """``with OutputLock(out):`` holds ``out``'s lock for the block; :class:`LockHeld` if
    another live run has it. ``wait_s``: how long to wait for it to be released or to go
    stale before giving up (0: give up at once)."""

    def __init__(self, out: str, *, stale_after_s: float = 600.0, wait_s: float = 0.0) -> None:
        if stale_after_s <= 0:
            raise ValueError("stale_after_s must be positive")
        self.uri = storage.join(out, LOCK_NAME)
        self.stale_after_s = float(stale_after_s)
        self.wait_s = float(wait_s)
        self.run_id = uuid.uuid4().hex
        self.lost = False  # set when another run took the lock over while this one held it
        self._record: LockRecord | None = None
        self._version = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> None:
        """Raise :class:`LockLost` if another run took the lock over: called before each batch
        a run writes or publishes, so that two runs never both write."""
        if self.lost:
            raise LockLost(
                "another run took this output's lock over (this run's heartbeat was late by "
                f"more than {self.stale_after_s:.0f} s): stopped before writing more"
            )

    @property
    def held(self) -> bool:
        return self._record is not None and not self.lost

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock (or a stale one over) and start the heartbeat."""
        deadline = time.monotonic() + self.wait_s
        waiting = False
        while True:
            holder = self._try_acquire()
            if holder is None:
                break
            if time.monotonic() >= deadline:
                raise LockHeld(_held_message(holder))
            if not waiting:
                waiting = True
                log.warning(
                    "the output is locked by run %s; waiting up to %.0f s for it to end",
                    holder.run_id[:8],
                    self.wait_s,
                )
            time.sleep(min(5.0, self.stale_after_s / 4, max(0.1, deadline - time.monotonic())))
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="covidray-lock", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still this run's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if self._record is not None and not self.lost:
            if not storage.remove_if(self.uri, self._version):
                log.warning("the output's lock was no longer this run's at the end")
        self._record = None

    def _try_acquire(self) -> LockRecord | None:
        """Take the lock: None when taken, else the live holder's record."""
        while True:  # again when the lock changed hands between our requests
            start = _now()
            record = LockRecord(
                run_id=self.run_id, started_at=start, heartbeat_at=start,
                stale_after_s=self.stale_after_s,
            )  # fmt: skip
            data = record.model_dump_json().encode()
            try:
                self._version = storage.create_exclusive(self.uri, data)
                self._record = record
                return None
            except FileExistsError:
                pass
            current = storage.read_versioned(self.uri)
            if current is None:  # released meanwhile
                continue
            holder = _parse(current.data)
            if holder is not None and holder.run_id == self.run_id:  # our own PUT, retried
                self._version, self._record = current.version, holder
                return None
            now = time.time()
            if holder is None:  # unreadable (a write cut short): judge by the object's age
                idle = now - current.modified
                stale = idle > self.stale_after_s
            else:
                idle = holder.age_s(now)
                stale = idle > holder.stale_after_s
            if not stale:
                return holder or _unknown_holder(current.modified, self.stale_after_s)
            try:
                self._version = storage.replace_if(self.uri, data, current.version)
            except storage.ObjectChanged:  # another run took it over first, or it was released
                continue
            run = holder.run_id[:8] if holder else "unknown"
            log.warning("took over the stale lock of run %s (no heartbeat for %.0f s)", run, idle)
            self._record = record
            return None

    def _beat(self) -> None:
        interval = max(0.05, self.stale_after_s / 4)
        while not self._stop.wait(interval):
            if self._record is None:
                return
            record = self._record.model_copy(update={"heartbeat_at": _now()})
            try:
                self._version = storage.replace_if(
                    self.uri, record.model_dump_json().encode(), self._version
                )
                self._record = record
            except storage.ObjectChanged:
                self.lost = True
                log.error(
                    "another run took this output's lock over (this run's heartbeat was late by "
                    "more than %.0f s); this run stops at its next batch",
                    self.stale_after_s,
                )
                return
            except Exception as err:  # a storage hiccup: try again at the next beat
                log.warning("lock heartbeat failed (%s); retrying", type(err).__name__)


def _parse(data: bytes) -> LockRecord | None:
    try:
        return LockRecord.model_validate(json.loads(data))
    except (ValueError, ValidationError):
        return None


def _unknown_holder(modified: float, stale_after_s: float) -> LockRecord:
    when = datetime.fromtimestamp(modified, UTC)
    return LockRecord(
        run_id="unknown", started_at=when, heartbeat_at=when, stale_after_s=stale_after_s
    )


def _held_message(holder: LockRecord) -> str:
    age = max(0.0, holder.age_s(time.time()))
    return (
        f"another covidray score run is writing to this output (run {holder.run_id[:8]}, "
        f"started {holder.started_at:%Y-%m-%d %H:%M:%S} UTC, last heartbeat {age:.0f} s ago); "
        f"its lock ({LOCK_NAME}) goes stale {holder.stale_after_s:.0f} s after its last "
        "heartbeat. Try again when that run ends."
    )
