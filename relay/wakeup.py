"""Wake-ups: how a committed webhook reaches a delivery worker within milliseconds.

The whole path lives here. After its commit the receiver calls `wake_after_commit`: a delivery
worker in the same process (`relay serve --with-worker`) is woken directly through its `Waker`;
worker processes elsewhere (`relay worker`) through a PostgreSQL NOTIFY on `NOTIFY_CHANNEL`, sent
by this process's `Notifier` and received by each worker's `listen` loop, which wakes its `Waker`.
SQLite has no NOTIFY: there, workers in other processes find new events by polling.

Wake-ups only make delivery prompt; they are never needed for correctness. The worker is woken
only after the events are committed, so it always finds them; if a wake-up is lost (an outage, a
process killed between commit and NOTIFY), its RELAY_POLL_INTERVAL poll delivers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from flask import current_app
from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError

from relay import dialect
from relay.db import Database, get_db

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "relay_events"
NOTIFY_INTERVAL = 0.025  # at most one NOTIFY transaction per 25 ms per process
WAKER_EXTENSION = "relay.waker"  # the in-process worker's Waker, on the Flask app


def wake_after_commit(environment: str) -> None:
    """After the receiver's commit: the in-process worker directly, other processes by NOTIFY."""
    waker: Waker | None = current_app.extensions.get(WAKER_EXTENSION)
    if waker is not None:
        waker.wake()
    notifier = get_db().notifier()
    if notifier is not None:
        notifier.poke(environment)


class Waker:
    """Runs the delivery job now, or, if it is running, makes it look again before it stops."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = False
        self._again = False
        self._run_now: Callable[[], None] | None = None

    def attach(self, run_now: Callable[[], None]) -> None:
        """`run_now` starts the delivery job at once (the scheduler provides it)."""
        self._run_now = run_now

    def wake(self) -> None:
        with self._lock:
            if self._running:
                self._again = True
                return
        if self._run_now is not None:
            try:
                self._run_now()
            except Exception:  # noqa: BLE001 - the poll picks the events up anyway
                log.debug("wake-up missed; polling will deliver", exc_info=True)

    def begin(self) -> None:
        with self._lock:
            self._running, self._again = True, False

    def look_again(self) -> bool:
        """Called when a drain found nothing: True once per wake-up received meanwhile."""
        with self._lock:
            again, self._again = self._again, False
            return again

    def end(self) -> None:
        with self._lock:
            self._running = False

    def finish(self) -> bool:
        """End a run, unless a wake-up arrived since the last look: then False, run on.

        Checked under the lock, so a wake-up between the drain's last look and the end of the
        run is never lost (it would otherwise wait for the next poll).
        """
        with self._lock:
            if self._again:
                self._again = False
                return False
            self._running = False
            return True


class Notifier:
    """One PostgreSQL NOTIFY per burst of committed webhooks, sent after the commit.

    A NOTIFY inside the receiving transaction serialises every commit on PostgreSQL's
    notification queue lock, one WAL flush at a time with no group commit (on the 2-core
    benchmark machine: about 2,400 commits/s with it against 8,700 without). The receiver
    instead pokes this notifier after its commit; a background thread sends `pg_notify` in its
    own short transaction, and the pokes that arrive meanwhile ride on the next one, at most one
    NOTIFY every `interval` seconds per process (a few dozen NOTIFY transactions a second at
    most, whatever the webhook rate).
    """

    def __init__(self, engine: Engine, channel: str = NOTIFY_CHANNEL,
                 interval: float = NOTIFY_INTERVAL) -> None:
        self.engine = engine
        self.channel = channel
        self.interval = interval
        self._lock = threading.Lock()
        self._pending: set[str] = set()
        self._poked = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None

    def poke(self, environment: str) -> None:
        """Ask for a NOTIFY carrying `environment`; never blocks on the database."""
        with self._lock:
            if self._closed:
                return
            self._pending.add(environment)
            if self._thread is None or not self._thread.is_alive():
                # Started lazily, so a gunicorn worker starts its own after the fork.
                self._thread = threading.Thread(target=self._run, name="relay-notify",
                                                daemon=True)
                self._thread.start()
        self._poked.set()

    def close(self) -> None:
        """Send what is pending, then stop the thread (before the engine is disposed)."""
        with self._lock:
            self._closed = True
            thread = self._thread
        self._poked.set()
        if thread is not None:
            thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            self._poked.wait()
            self._poked.clear()
            with self._lock:
                environments, self._pending = sorted(self._pending), set()
                closed = self._closed
            if not environments and closed:
                return
            try:
                with self.engine.connect() as connection:
                    for environment in environments:
                        connection.execute(text("SELECT pg_notify(:channel, :env)"),
                                           {"channel": self.channel, "env": environment})
                    connection.commit()
            except SQLAlchemyError as error:
                log.debug("NOTIFY not sent (%s); workers poll meanwhile", type(error).__name__)
            if closed:
                return
            time.sleep(self.interval)


def make_notifier(engine: Engine) -> Notifier | None:
    """The NOTIFY sender for this engine's database; None where there is no NOTIFY (SQLite)."""
    return Notifier(engine) if dialect.is_postgresql(engine) else None


def listen(database_url: str, waker: Waker, stop: threading.Event) -> None:
    """Wake the worker on every NOTIFY from a receiver; reconnect after outages."""
    import psycopg

    conninfo = database_url.replace("postgresql+psycopg://", "postgresql://", 1)
    while not stop.is_set():
        try:
            with psycopg.connect(conninfo, autocommit=True, connect_timeout=3) as connection:
                connection.execute(f"LISTEN {NOTIFY_CHANNEL}")
                log.info("listening for new events on PostgreSQL channel %s", NOTIFY_CHANNEL)
                waker.wake()
                while not stop.is_set():
                    for _ in connection.notifies(timeout=1.0, stop_after=1):
                        waker.wake()
        except psycopg.Error as error:
            log.warning("LISTEN connection lost (%s); polling meanwhile", type(error).__name__)
            stop.wait(2.0)


def start_listener(db: Database, waker: Waker,
                   stop: threading.Event) -> threading.Thread | None:
    """A thread running `listen` until `stop` is set; None where there is no NOTIFY (SQLite)."""
    if not dialect.is_postgresql(db.engine):
        return None
    listener = threading.Thread(target=listen, args=(db.url, waker, stop), name="relay-listen",
                                daemon=True)
    listener.start()
    return listener
