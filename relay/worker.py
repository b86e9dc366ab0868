"""The delivery worker: claims due events and hands them to `Delivery`, until none are due.

It runs as `relay worker` (its own process; PostgreSQL LISTEN/NOTIFY wakes it) or inside the web
processes with `relay serve --with-worker` (the receiver wakes it in-process). Polling every
RELAY_POLL_INTERVAL seconds remains the safety net either way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from types import FrameType
from typing import Any

from flask import Flask

from relay import braze_state
from relay.braze import BrazeClient
from relay.db import Database, get_db, utcnow
from relay.delivery import Delivery
from relay.exceptions import DatabaseUnavailable
from relay.outbox import leases
from relay.scheduler import Waker, build_scheduler, listen_for_events
from relay.settings import ENVIRONMENTS, Settings

log = logging.getLogger(__name__)

MAX_DRAIN_SECONDS = 30.0
DRAIN_LANES = 2  # concurrent claim-and-deliver loops while a backlog lasts


class Worker:
    def __init__(self, settings: Settings, db: Database, owner: str | None = None) -> None:
        self.settings = settings
        self.db = db
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._clients: dict[str, BrazeClient] = {}
        self._clients_lock = threading.Lock()
        self.pool = ThreadPoolExecutor(settings.worker_threads, thread_name_prefix="braze")
        self.delivery = Delivery(settings, db, self.owner, self.client, self.pool)
        self.stopping = threading.Event()

    def client(self, environment: str) -> BrazeClient:
        """One client per environment: production's key never carries staging events."""
        with self._clients_lock:
            if environment not in self._clients:
                endpoint = self.settings.braze_endpoint(environment)
                key = self.settings.braze_key(environment)
                if not endpoint or not key:
                    raise RuntimeError(f"no Braze endpoint and key for {environment}")
                self._clients[environment] = BrazeClient(
                    endpoint, key, environment=environment,
                    connect_timeout=self.settings.braze_connect_timeout,
                    read_timeout=self.settings.braze_read_timeout)
            return self._clients[environment]

    def deliverable_environments(self) -> list[str]:
        """Environments with a key and endpoint, not paused; staging without a key is skipped."""
        ready = []
        with self.db.session() as session:
            for environment in ENVIRONMENTS:
                configured = bool(self.settings.braze_key(environment)
                                  and self.settings.braze_endpoint(environment))
                if not configured:
                    if environment == "staging":
                        leases.skip_unconfigured(session, environment,
                                                 "BRAZE_STAGING_API_KEY is not set")
                    continue
                if braze_state.blocked_until(session, environment) is None:
                    ready.append(environment)
        return ready

    def run_once(self) -> int:
        """Claim one batch and deliver it; answers how many events were claimed."""
        environments = self.deliverable_environments()
        if not environments:
            return 0
        with self.db.session() as session:
            events = leases.claim_due(session, self.owner, environments=environments,
                                      limit=self.settings.worker_batch_size,
                                      lease_seconds=self.settings.lease_seconds)
        if events:
            with self._keeping_leases(events):
                self.delivery.deliver(events)
        return len(events)

    @contextlib.contextmanager
    def _keeping_leases(self, events: list[Any]) -> Iterator[None]:
        """Renew the batch's leases while it is delivered: a slow batch (rate-limit pacing, a
        slow Braze) must not be claimed by another worker meanwhile; only a dead worker's
        leases expire."""
        ids = [event.id for event in events]
        done = threading.Event()

        def renew() -> None:
            while not done.wait(self.settings.lease_seconds / 3):
                try:
                    with self.db.session() as session:
                        leases.renew_leases(session, self.owner, ids, self.settings.lease_seconds)
                except DatabaseUnavailable as outage:
                    log.warning("leases not renewed: %s", outage)

        keeper = threading.Thread(target=renew, name="relay-lease", daemon=True)
        keeper.start()
        try:
            yield
        finally:
            done.set()
            keeper.join()

    def drain(self, max_seconds: float = MAX_DRAIN_SECONDS, again: Any = None) -> int:
        """Deliver until nothing is due (or time is up, so other jobs get their turn).

        A second lane claims and delivers beside the first while a backlog lasts, so one
        batch's claim and database work overlap the other's Braze requests. Two lanes share the
        work like two workers do (SKIP LOCKED claims, per-person order kept by the claim).
        """
        deadline = time.monotonic() + max_seconds
        first = self._lane(deadline, again, stop_after_one=True)
        if first[1] == 0:
            return first[0]
        with ThreadPoolExecutor(DRAIN_LANES - 1, thread_name_prefix="relay-lane") as lanes:
            others = [lanes.submit(self._lane, deadline, again)
                      for _ in range(DRAIN_LANES - 1)]
            total = first[0] + self._lane(deadline, again)[0]
            return total + sum(lane.result()[0] for lane in others)

    def _lane(self, deadline: float, again: Any,
              stop_after_one: bool = False) -> tuple[int, int]:
        """Claim-and-deliver until nothing is due; (events claimed, size of the last claim)."""
        total, claimed = 0, 0
        while not self.stopping.is_set() and time.monotonic() < deadline:
            try:
                claimed = self.run_once()
            except DatabaseUnavailable as outage:
                log.warning("delivery paused: %s", outage)
                return total, 0
            total += claimed
            if claimed == 0 and not (again and again()):
                break
            if stop_after_one and claimed >= self.settings.worker_batch_size:
                break
        return total, claimed

    def sweep(self) -> None:
        with self.db.session() as session:
            leases.sweep_expired_leases(session, utcnow())

    def close(self) -> None:
        self.stopping.set()
        self.pool.shutdown(wait=True)
        for client in self._clients.values():
            client.close()


def start_in_process(app: Flask) -> Worker:
    """`relay serve --with-worker`: delivery threads inside this web process."""
    settings: Settings = app.config["RELAY_SETTINGS"]
    worker = Worker(settings, get_db(app))
    waker = Waker()
    scheduler = build_scheduler(worker, settings, waker)
    scheduler.start()
    app.extensions["relay.waker"] = waker
    app.extensions["relay.worker"] = (worker, scheduler)
    log.info("in-process delivery worker %s started", worker.owner)
    return worker


def run_worker(settings: Settings, metrics_port: int | None = None) -> None:
    """`relay worker`: deliver until SIGTERM or SIGINT, then finish the batch in flight."""
    from relay import logs

    logs.configure(settings.log_format)
    db = Database(settings.database_url)
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
    if metrics_port:
        from relay.metrics import serve_worker_metrics

        serve_worker_metrics(metrics_port, db=db)
    listener = None
    if db.dialect == "postgresql":
        listener = threading.Thread(target=listen_for_events,
                                    args=(settings.database_url, waker, stop),
                                    name="relay-listen", daemon=True)
        listener.start()
    scheduler.start()
    log.info("worker %s started on %s", worker.owner, db.dialect)
    stop.wait()
    scheduler.shutdown(wait=True)
    worker.close()
    db.dispose()
    log.info("worker %s stopped", worker.owner)
