"""The delivery worker: claims due events and hands them to `Delivery`, until none are due.

It only claims and delivers: `relay.scheduler` runs it (as `relay worker`, or inside the web
processes with `relay serve --with-worker`) with the other jobs, and `relay.wakeup` wakes it when
events arrive. Leases are renewed while a batch is being sent, so only a dead worker's events go
back to the others.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from relay import braze_state, triggers
from relay.braze import BrazeClient
from relay.db import Database
from relay.delivery import Delivery
from relay.exceptions import DatabaseUnavailable
from relay.outbox import leases
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
        self.triggers = triggers.TriggerSender(settings, db, self.owner, self.client)
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

    def send_triggers(self) -> int:
        """The trigger job: stale `sending` triggers become uncertain, then due ones are sent;
        answers how many requests went to Braze."""
        with self.db.session() as session:
            environments = triggers.sendable_environments(session, self.settings, ENVIRONMENTS)
        return self.triggers.run(environments, stopping=self.stopping.is_set)

    def close(self) -> None:
        self.stopping.set()
        self.pool.shutdown(wait=True)
        for client in self._clients.values():
            client.close()
