"""Group commit: the single-event webhooks of one process share a transaction and its commit.

Each request normalises its webhook itself (`relay.outbox.ingest.prepare_single`) and queues the
prepared row. When no group is being written, the request writes one itself (it "leads"): it
takes everything queued so far, its own row included, stores it in one pipelined transaction
(`ingest.store_group`: each row by the same statement as alone, so duplicates and ids per
request are exactly what one-by-one storing gives), commits once, and wakes each waiting
request with its own receipt. Requests that arrive meanwhile queue up; the leader hands the
next group to the first of them. One commit, one WAL flush and one round trip serve a whole
group; groups grow with the load, and a lone webhook writes at once, waiting for nobody. No
thread of its own: the request that leads was going to wait for the database anyway.

Guarantees kept: a request is answered 200 only after the commit that stored it. A failed
group stores nothing of anyone; its members are then stored one by one, each by its own
statement, so one bad request cannot fail the others. A request waits at most `wait` seconds
and is then answered 503 with nothing of it stored: still queued, it is withdrawn; in a group
that is still running (waiting for a lock, a slow disk), that group's transaction is cancelled
and all its members are answered 503. Only a cancel that meets the commit itself can leave a
503'd webhook stored; Extole's retry is then answered as a duplicate, as after any answer lost
on the way.
"""

from __future__ import annotations

import logging
import os
import threading
import time
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
_LEAD: Final = "lead"  # handed the next group: writes it
_WRITING: Final = "writing"
_DONE: Final = "done"
_WITHDRAWN: Final = "withdrawn"


class _Alone:
    """The member's group failed: the member stores its row by itself."""


ALONE = _Alone()
Outcome = Receipt | None | _Alone | BaseException


@dataclass(eq=False)
class _Member:
    row: SingleRow
    queued_at: float = field(default_factory=time.monotonic)
    state: str = _QUEUED
    outcome: Outcome = None
    wake: threading.Event = field(default_factory=threading.Event)


@dataclass(eq=False)
class _Group:
    members: list[_Member]
    # How to cancel its transaction while it runs (`relay.dialect.Running`).
    cancel: Callable[[], None] | None = None
    cancelled: bool = False


class GroupWriter:
    """One per process and database (`relay.db.Database.group_writer`)."""

    def __init__(self, engine: Engine, *, wait: float = WAIT_SECONDS,
                 most: int = MOST_PER_GROUP) -> None:
        self.engine = engine
        self.wait = wait
        self.most = most
        self._lock = threading.Lock()
        self._queue: list[_Member] = []
        self._writing = False  # a leader is writing a group or about to
        self._running: _Group | None = None
        self._cancel_lock = threading.Lock()
        self._watchdog: threading.Thread | None = None
        self._pid = os.getpid()
        self._closed = False
        self._stop = threading.Event()

    def store(self, row: SingleRow) -> Receipt | None:
        """Store one prepared row with whatever else is queued, and answer its receipt once the
        commit is done; None when the general (transaction) path must decide (as
        `ingest.store_prepared`). Raises DatabaseUnavailable when the wait runs out, and the
        database's own error when the row failed by itself."""
        member = _Member(row)
        with self._lock:
            if self._closed:
                raise DatabaseUnavailable("database unavailable: the receiver is shutting down")
            if self._pid != os.getpid():  # a forked child: nobody waits on its parent's queue
                self._queue, self._writing, self._running = [], False, None
                self._pid, self._watchdog = os.getpid(), None
            self._queue.append(member)
            lead = not self._writing
            self._writing = True
        if lead:
            self._lead()
        else:
            self._follow(member)
        outcome = member.outcome
        if isinstance(outcome, _Alone):
            return ingest.store_prepared(self.engine, row)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def queued(self) -> int:
        """Rows waiting for the next group (not those being written)."""
        with self._lock:
            return len(self._queue)

    def close(self) -> None:
        """Refuse new rows; stop the watchdog."""
        with self._lock:
            self._closed = True
        self._stop.set()

    # --- following ------------------------------------------------------------------------

    def _follow(self, member: _Member) -> None:
        """Wait for a leader to write this row, or to be handed the next group."""
        deadline = member.queued_at + self.wait
        while True:
            member.wake.wait(max(0.0, deadline - time.monotonic()))
            with self._lock:
                state = member.state
                if state == _LEAD:
                    member.wake.clear()
                    if time.monotonic() >= deadline:
                        # Too late for itself; it still leads the others.
                        self._queue.remove(member)
                        member.outcome = self._timed_out()
                        member.state = _WITHDRAWN
                elif state == _QUEUED and time.monotonic() >= deadline:
                    self._queue.remove(member)
                    member.state, member.outcome = _WITHDRAWN, self._timed_out()
                    return
                elif state == _DONE:
                    return
                group = self._running if state == _WRITING else None
            if state == _LEAD:
                self._lead()
                return
            if group is not None and time.monotonic() >= deadline:
                self._cancel(group)
                member.wake.wait(self.wait)  # a cancelled group ends at once
                with self._lock:
                    if member.state != _DONE:  # could not be cancelled: answer anyway
                        member.outcome = self._timed_out()
                return

    # --- leading ----------------------------------------------------------------------------

    def _lead(self) -> None:
        """Write one group (everything queued, up to `most`), then hand the next one on."""
        self._start_watchdog()
        with self._lock:
            members, self._queue = self._queue[:self.most], self._queue[self.most:]
            for member in members:
                member.state = _WRITING
            group = self._running = _Group(members)
        outcomes: list[Outcome] = [self._timed_out()] * len(members)
        try:
            outcomes = self._write(group) if members else []
        finally:  # whatever happens, the members are answered and the next group is led
            with self._lock:
                self._running = None
                for member, outcome in zip(members, outcomes, strict=True):
                    member.outcome, member.state = outcome, _DONE
                    member.wake.set()
                self._hand_on()

    def _hand_on(self) -> None:
        """The first queued member leads the next group; none queued: nobody writes."""
        if self._queue:
            following = self._queue[0]
            following.state = _LEAD
            following.wake.set()
        else:
            self._writing = False

    def _write(self, group: _Group) -> list[Outcome]:
        """Each row's outcome: its receipt, ALONE when the group failed, a 503 when the group
        was cancelled for taking too long."""
        rows = [member.row for member in group.members]
        try:
            if len(rows) == 1:
                try:
                    return [ingest.store_prepared(self.engine, rows[0],
                                                  lambda cancel: self._running_as(group, cancel))]
                except Exception as error:  # noqa: BLE001 - handed to the request, which answers
                    if group.cancelled:
                        return [self._timed_out()]
                    return [error]
            return list(ingest.store_group(self.engine, rows,
                                           lambda cancel: self._running_as(group, cancel)))
        except Exception as error:  # noqa: BLE001 - every member tries again by itself
            if group.cancelled:
                return [self._timed_out()] * len(rows)
            log.info("a group of %d webhooks failed (%s): storing each by itself", len(rows),
                     type(error).__name__)
            return [ALONE] * len(rows)

    def _timed_out(self) -> DatabaseUnavailable:
        return DatabaseUnavailable(f"database unavailable: not committed within {self.wait:g} s")

    # --- cancelling -------------------------------------------------------------------------

    def _running_as(self, group: _Group, cancel: Callable[[], None] | None) -> None:
        with self._cancel_lock:
            group.cancel = cancel

    def _cancel(self, group: _Group) -> None:
        """Cancel a group's transaction (once). Under the lock that `_running_as(None)` takes,
        so a cancel never reaches the connection after the group has handed it back."""
        with self._cancel_lock:
            if group.cancel is not None and not group.cancelled:
                group.cancelled = True
                try:
                    group.cancel()
                except Exception:  # noqa: BLE001 - then the group simply runs on
                    log.warning("could not cancel a group of webhooks", exc_info=True)

    def _start_watchdog(self) -> None:
        """A group nobody else waits for (its leader alone) is cancelled past the wait too."""
        if self._watchdog is None:
            with self._lock:
                if self._watchdog is None:
                    self._watchdog = threading.Thread(target=self._watch, daemon=True,
                                                      name="relay-group-commit-watchdog")
                    self._watchdog.start()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.wait / 4)):
            with self._lock:
                group = self._running
            if group is not None and group.members and (
                    time.monotonic() - group.members[0].queued_at > self.wait):
                self._cancel(group)
