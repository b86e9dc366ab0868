"""APScheduler jobs: delivery (coalesced, one at a time), the lease sweeper, retention purge.

New events wake the delivery job at once through a `Waker`: the receiver calls it in-process,
and a LISTEN thread calls it on PostgreSQL notifications from other processes.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from apscheduler.schedulers.background import BackgroundScheduler

from relay.notifier import NOTIFY_CHANNEL
from relay.settings import Settings

if TYPE_CHECKING:
    from relay.worker import Worker

log = logging.getLogger(__name__)

SWEEP_SECONDS = 30
PURGE_HOURS = 24
DELIVER_JOB = "deliver"


class Waker:
    """Runs the delivery job now, or, if it is running, makes it look again before it stops."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = False
        self._again = False
        self._scheduler: BackgroundScheduler | None = None

    def attach(self, scheduler: BackgroundScheduler) -> None:
        self._scheduler = scheduler

    def wake(self) -> None:
        with self._lock:
            if self._running:
                self._again = True
                return
        if self._scheduler is not None and self._scheduler.running:
            try:
                self._scheduler.modify_job(DELIVER_JOB, next_run_time=datetime.now().astimezone())
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


class _BusyDeliveryFilter(logging.Filter):
    """While a delivery run goes on (it runs on as long as wake-ups arrive), the interval
    trigger finding it busy is the design, not a problem: APScheduler's warning about it is
    dropped instead of being printed every poll interval under steady traffic."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (DELIVER_JOB in str(record.args)
                    and "maximum number of running instances" in str(record.msg))


def build_scheduler(worker: Worker, settings: Settings, waker: Waker) -> BackgroundScheduler:
    apscheduler_log = logging.getLogger("apscheduler.scheduler")
    if not any(isinstance(f, _BusyDeliveryFilter) for f in apscheduler_log.filters):
        apscheduler_log.addFilter(_BusyDeliveryFilter())
    scheduler = BackgroundScheduler(
        timezone="UTC", job_defaults={"coalesce": True, "max_instances": 1,
                                      "misfire_grace_time": 30})

    def deliver() -> None:
        waker.begin()
        finished = False
        try:
            while not worker.stopping.is_set():
                worker.drain(again=waker.look_again)
                if waker.finish():
                    finished = True
                    break
        finally:
            if not finished:
                waker.end()

    def purge() -> None:
        from relay import retention

        counts = retention.purge(worker.db, settings.retention_days)
        log.info("retention purge: %s", counts)

    now = datetime.now().astimezone()
    scheduler.add_job(deliver, "interval", seconds=settings.poll_interval, id=DELIVER_JOB,
                      next_run_time=now)
    scheduler.add_job(worker.sweep, "interval", seconds=SWEEP_SECONDS, id="sweep_leases")
    scheduler.add_job(purge, "interval", hours=PURGE_HOURS, id="retention_purge",
                      next_run_time=now + timedelta(minutes=5))
    waker.attach(scheduler)
    return scheduler


def listen_for_events(database_url: str, waker: Waker, stop: threading.Event) -> None:
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
