"""Group commit: the single-event webhooks of one process share a transaction and its commit.

Each request normalises its webhook itself (`relay.outbox.ingest.prepare_single`) and hands the
prepared row to this process's `GroupWriter`; the writer's thread stores everything queued so
far in one pipelined transaction (`ingest.store_group`: each row by the same statement as
alone, so duplicates and ids per request are exactly what one-by-one storing gives), commits
once, and wakes each waiting request with its own receipt. One commit, one WAL flush and one
round trip serve a whole group; while a group is being written the next one queues up, so
groups grow with the load and a lone webhook waits for nobody.

Guarantees kept: a request is answered 200 only after the commit that stored it. A failed
group stores nothing of anyone; its members are then stored one by one, each by its own
statement, so one bad request cannot fail the others. A request waits at most `wait` seconds
and is then answered 503 with nothing of it stored: still queued, it is withdrawn; in a group
that is still running (waiting for a lock, a slow disk), that group's transaction is cancelled,
and its other members are stored one by one. Only when the cancel meets the commit itself can
a 503'd webhook end up stored; Extole's retry is then answered as a duplicate, as after any
answer lost on the way.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from sqlalchemy import Engine

from relay.exceptions import DatabaseUnavailable
from relay.outbox import ingest
from relay.outbox.ingest import Receipt, SingleRow

log = logging.getLogger(__name__)

WAIT_SECONDS = 10.0  # the longest a webhook waits for its group's commit before a 503
MOST_PER_GROUP = 64  # rows in one transaction; the rest go in the next group

_QUEUED: Final = "queued"
_WRITING: Final = "writing"
_DONE: Final = "done"
_WITHDRAWN: Final = "withdrawn"


class _Alone:
    """The member's group failed: the member stores its row by itself."""


ALONE = _Alone()


@dataclass(eq=False)
class _Member:
    row: SingleRow
    state: str = _QUEUED
    outcome: Receipt | None | _Alone | BaseException = None
    done: threading.Event = field(default_factory=threading.Event)


class GroupWriter:
    """One per process and database: a thread that writes queued rows in groups.

    Started on first use, in the process that uses it (gunicorn forks its workers before any
    request), and stopped by `close` (`relay.db.Database.dispose`).
    """

    def __init__(self, engine: Engine, *, wait: float = WAIT_SECONDS,
                 most: int = MOST_PER_GROUP) -> None:
        self.engine = engine
        self.wait = wait
        self.most = most
        self._cond = threading.Condition()
        self._queue: list[_Member] = []
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._closed = False
        # How to cancel the group being written, while it is written (`relay.dialect.Running`).
        self._cancel: Callable[[], None] | None = None
        self._cancel_lock = threading.Lock()

    def store(self, row: SingleRow) -> Receipt | None:
        """Store one prepared row with whatever else is queued, and answer its receipt once the
        commit is done; None when the general (transaction) path must decide (as
        `ingest.store_prepared`). Raises DatabaseUnavailable when the wait runs out, and the
        database's own error when the row failed by itself."""
        member = _Member(row)
        with self._cond:
            if self._closed:
                raise DatabaseUnavailable("database unavailable: the receiver is shutting down")
            self._start()
            self._queue.append(member)
            self._cond.notify()
        if not member.done.wait(self.wait):
            with self._cond:
                queued = member.state == _QUEUED
                if queued:
                    self._queue.remove(member)
                    member.state = _WITHDRAWN
            if not queued:
                self._cancel_running()
                member.done.wait(self.wait)  # a cancelled group ends at once
            if not isinstance(member.outcome, Receipt):
                # Withdrawn, cancelled, or (cancel impossible) still running: only a commit
                # that won the race against the cancel stored it, and then it is answered so.
                raise DatabaseUnavailable(
                    f"database unavailable: not committed within {self.wait:g} s")
        outcome = member.outcome
        if isinstance(outcome, _Alone):
            return ingest.store_prepared(self.engine, row)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def queued(self) -> int:
        """Rows waiting for the next group (not those being written)."""
        with self._cond:
            return len(self._queue)

    def close(self) -> None:
        """Write what is queued, then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(self.wait)

    def _running(self, cancel: Callable[[], None] | None) -> None:
        with self._cancel_lock:
            self._cancel = cancel

    def _cancel_running(self) -> None:
        """Cancel the group being written (once). Under the lock that `_running(None)` takes,
        so a cancel never reaches the connection after the group has handed it back."""
        with self._cancel_lock:
            if self._cancel is not None:
                cancel, self._cancel = self._cancel, None
                try:
                    cancel()
                except Exception:  # noqa: BLE001 - then the group simply runs on
                    log.warning("could not cancel a group of webhooks", exc_info=True)

    def _start(self) -> None:
        # A forked child inherits the object but not the thread: start one of its own.
        if self._pid != os.getpid():
            self._queue = []  # a forked child's copy of its parent's queue: nobody waits on it
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._run, name="relay-group-commit",
                                            daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                group, self._queue = self._queue[:self.most], self._queue[self.most:]
                for member in group:
                    member.state = _WRITING
            outcomes = self._write([member.row for member in group])
            with self._cond:
                for member, outcome in zip(group, outcomes, strict=True):
                    member.outcome, member.state = outcome, _DONE
                    member.done.set()

    def _write(self, rows: list[SingleRow]) -> list[Receipt | None | _Alone | BaseException]:
        """Each row's outcome: its receipt, or ALONE when the group failed."""
        if len(rows) == 1:
            try:
                return [ingest.store_prepared(self.engine, rows[0], self._running)]
            except Exception as error:  # noqa: BLE001 - handed to the request, which answers
                return [error]
        try:
            return list(ingest.store_group(self.engine, rows, self._running))
        except Exception as error:  # noqa: BLE001 - every member tries again by itself
            log.info("a group of %d webhooks failed (%s): storing each by itself", len(rows),
                     type(error).__name__)
            return [ALONE] * len(rows)
