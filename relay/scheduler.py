"""What runs when: the delivery worker's jobs, and the processes that run them.

APScheduler jobs: delivery (every RELAY_POLL_INTERVAL, and at once when `relay.wakeup` wakes it;
coalesced, one run at a time), campaign and Canvas triggers (every RELAY_POLL_INTERVAL, one run at
a time: `relay.triggers`), the lease sweeper (every SWEEP_SECONDS: events of dead workers come
back), the retention purge (daily, the first run 5 minutes after start) and reconciliation from
Extole (when a token is set and RELAY_RECONCILE_INTERVAL is not 0: it looks every
RECONCILE_TICK_SECONDS at most, and each environment runs once per interval across all workers,
`relay.reconcile`). They run
inside the web processes (`start_in_process`, for `relay serve --with-worker`) or in a process of
their own (`run_worker`, for `relay worker`, which stops on SIGTERM after the batch in flight).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from types import FrameType

from apscheduler.schedulers.background import BackgroundScheduler
from flask import Flask
from sqlalchemy.exc import SQLAlchemyError

from relay import retention
from relay.db import Database, describe_error, get_db, utcnow
from relay.eventmap import EventMap
from relay.exceptions import DatabaseUnavailable, RelayError
from relay.outbox import leases
from relay.reconcile import Reconciler
from relay.settings import Settings
from relay.wakeup import WAKER_EXTENSION, Waker, start_listener
from relay.worker import Worker

log = logging.getLogger(__name__)

SWEEP_SECONDS = 30
PURGE_HOURS = 24
FIRST_PURGE_AFTER = timedelta(minutes=5)
RECONCILE_TICK_SECONDS = 60
FIRST_RECONCILE_AFTER = timedelta(seconds=30)
DELIVER_JOB = "deliver"
TRIGGER_JOB = "triggers"
WORKER_EXTENSION = "relay.worker"  # (Worker, scheduler) of `serve --with-worker`, on the app


class _BusyDeliveryFilter(logging.Filter):
    """While a delivery run goes on (it runs on as long as wake-ups arrive), the interval
    trigger finding it busy is the design, not a problem: APScheduler's warning about it is
    dropped instead of being printed every poll interval under steady traffic."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not ((DELIVER_JOB in str(record.args) or TRIGGER_JOB in str(record.args))
                    and "maximum number of running instances" in str(record.msg))


def deliver(worker: Worker, waker: Waker) -> None:
    """The delivery job: drain what is due, and go on while wake-ups keep arriving."""
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


def send_triggers(worker: Worker) -> None:
    """The trigger job (`relay.triggers`): a database outage waits for the next run."""
    try:
        worker.send_triggers()
    except DatabaseUnavailable as outage:
        log.warning("triggers paused: %s", outage)


def sweep_leases(db: Database) -> int:
    """The sweeper job: leases of workers that died expire, and their events come back."""
    with db.session() as session:
        return leases.sweep_expired_leases(session, utcnow())


def purge(db: Database, retention_days: int, dedup_days: int) -> None:
    """The retention job (`relay purge` runs the same now)."""
    counts = retention.purge(db, retention_days, dedup_days=dedup_days)
    log.info("retention purge: %s", counts)


def reconcile(reconciler: Reconciler) -> None:
    """The reconciliation job: each environment with a token whose last run (by any worker)
    started at least RELAY_RECONCILE_INTERVAL ago. A run's own failures (a refused token, Extole
    unavailable) are in its record; one that could not even be recorded (the database is
    down) is logged, and the next tick tries again."""
    for environment in reconciler.environments():
        if reconciler.stopping.is_set():
            return
        try:
            reconciler.run(environment, trigger="worker", only_if_due=True)
        except (RelayError, SQLAlchemyError) as error:
            log.warning("reconcile %s: not run: %s", environment, describe_error(error))


def _wake_all(waker: Waker, db: Database) -> Callable[[str], None]:
    """After reconciliation stored events: this process's delivery now, the others by NOTIFY."""

    def wake(environment: str) -> None:
        waker.wake()
        notifier = db.notifier()
        if notifier is not None:
            notifier.poke(environment)

    return wake


def _run_now(scheduler: BackgroundScheduler) -> Callable[[], None]:
    def run_now() -> None:
        if scheduler.running:
            scheduler.modify_job(DELIVER_JOB, next_run_time=datetime.now().astimezone())

    return run_now


def build_scheduler(worker: Worker, settings: Settings, waker: Waker) -> BackgroundScheduler:
    apscheduler_log = logging.getLogger("apscheduler.scheduler")
    if not any(isinstance(f, _BusyDeliveryFilter) for f in apscheduler_log.filters):
        apscheduler_log.addFilter(_BusyDeliveryFilter())
    scheduler = BackgroundScheduler(
        timezone="UTC", job_defaults={"coalesce": True, "max_instances": 1,
                                      "misfire_grace_time": 30})
    now = datetime.now().astimezone()
    scheduler.add_job(deliver, "interval", args=(worker, waker),
                      seconds=settings.poll_interval, id=DELIVER_JOB, next_run_time=now)
    scheduler.add_job(send_triggers, "interval", args=(worker,), seconds=settings.poll_interval,
                      id=TRIGGER_JOB, next_run_time=now)
    scheduler.add_job(sweep_leases, "interval", args=(worker.db,), seconds=SWEEP_SECONDS,
                      id="sweep_leases")
    scheduler.add_job(purge, "interval",
                      args=(worker.db, settings.retention_days, settings.dedup_days),
                      hours=PURGE_HOURS, id="retention_purge",
                      next_run_time=now + FIRST_PURGE_AFTER)
    reconciler = Reconciler(settings, worker.db, EventMap.load(settings.event_map),
                            wake=_wake_all(waker, worker.db), stopping=worker.stopping)
    if settings.reconcile_interval and reconciler.environments():
        scheduler.add_job(reconcile, "interval", args=(reconciler,), id="reconcile",
                          seconds=min(settings.reconcile_interval, RECONCILE_TICK_SECONDS),
                          next_run_time=now + FIRST_RECONCILE_AFTER)
    waker.attach(_run_now(scheduler))
    return scheduler


def start_in_process(app: Flask) -> Worker:
    """`relay serve --with-worker`: delivery threads inside this web process, woken in-process
    by the receiver."""
    settings: Settings = app.config["RELAY_SETTINGS"]
    worker = Worker(settings, get_db(app))
    waker = Waker()
    scheduler = build_scheduler(worker, settings, waker)
    scheduler.start()
    app.extensions[WAKER_EXTENSION] = waker
    app.extensions[WORKER_EXTENSION] = (worker, scheduler)
    log.info("in-process delivery worker %s started", worker.owner)
    return worker


def run_worker(settings: Settings, metrics_port: int | None = None,
               metrics_host: str = "127.0.0.1") -> None:
    """`relay worker`: deliver until SIGTERM or SIGINT, then finish the batch in flight."""
    from relay import logs

    logs.configure(settings.log_format)
    db = Database(settings.database_url)
    if metrics_port:  # first: a port in use ends the command before anything has started
        from relay.metrics import serve_worker_metrics

        serve_worker_metrics(metrics_port, db=db, host=metrics_host)
    worker = Worker(settings, db)
    waker = Waker()
    scheduler = build_scheduler(worker, settings, waker)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("worker %s stopping (signal %d)", worker.owner, signum)
        worker.stopping.set()
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    start_listener(db, waker, stop)
    scheduler.start()
    log.info("worker %s started on %s", worker.owner, db.dialect)
    stop.wait()
    scheduler.shutdown(wait=True)
    worker.close()
    db.dispose()
    log.info("worker %s stopped", worker.owner)
