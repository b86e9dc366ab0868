"""Reconciliation: reward events Extole never delivered, recovered from its rewards API.

Extole drops a webhook it could not deliver after seven days; its rewards API still lists the
rewards, each in its current state. A run reads `GET /v2/rewards` over a window (README,
"Reconciliation") and turns every reward into the item Extole's reward webhook would have posted
(`reward_item`): type = its state, Extole event id `reconciled:<reward_id>:<STATE>`, event time
`created_at`. The items go through the receiver's own ingest (`relay.outbox.ingest`), so mapping,
identity and the duplicate rule are the webhook's: a reward state the environment already holds,
by webhook or an earlier run, is a duplicate there and counts as `present`; the others are stored
and delivered like any event (`backfilled`).

One run per environment at a time, across processes and hosts: a lease row in `reconcile_locks`
taken with one conditional upsert, renewed after every page and expiring by itself when its
holder died. The lock only saves work: two runs that overlapped anyway (a lease that expired
under a stalled process) still store each reward state once, because the ingest decides.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from relay import dialect, metrics
from relay.db import Database, rowcount, utcnow
from relay.eventmap import EventMap
from relay.exceptions import ExtoleError, ReconcileBusy, RejectedEvent, RelayError
from relay.extole import EVENT_ID, EVENT_TIME, EVENT_TYPE, RECONCILED_PREFIX, Event, normalise
from relay.extoleapi import MAX_LIMIT, REWARDS_PATH, TOKEN_VARIABLES, ExtoleClient, interval
from relay.models import InboundRequest, OutboxEvent, ReconcileLock, ReconcileRun
from relay.outbox import dedup
from relay.outbox.ingest import store_webhook
from relay.settings import ENVIRONMENTS, Settings

log = logging.getLogger(__name__)

LEASE_SECONDS = 300
MAX_PROBLEMS = 20

# Of a reward as the API lists it, these become the item's envelope (type, event id, time):
# the reward's own spellings are left out so the item carries exactly one of each.
_ENVELOPE = frozenset({"state", *EVENT_ID, *EVENT_TYPE, *EVENT_TIME})


def reward_item(reward: Any) -> dict[str, Any]:
    """The reward webhook item Extole would have posted for this element of GET /v2/rewards.

    Raises RejectedEvent naming what is missing: a reward without an id, a state or a
    `created_at` cannot be stored as the webhook would have been.
    """
    if not isinstance(reward, dict):
        raise RejectedEvent(f"reward is not a JSON object but {type(reward).__name__}")
    fields = {str(key).lower(): value for key, value in reward.items()}
    reward_id = fields.get("reward_id")
    if isinstance(reward_id, bool) or not isinstance(reward_id, str | int) or not str(
            reward_id).strip():
        raise RejectedEvent("reward has no reward_id")
    reward_id = str(reward_id).strip()
    state = fields.get("state")
    if not isinstance(state, str) or not state.strip():
        raise RejectedEvent(f"reward {reward_id} has no state")
    created_at = fields.get("created_at")
    if created_at is None or created_at == "":
        raise RejectedEvent(f"reward {reward_id} has no created_at")
    state = state.strip().upper()
    return {
        "type": state,
        "event_id": f"{RECONCILED_PREFIX}{reward_id}:{state}",
        "event_time": created_at,
        **{key: value for key, value in reward.items() if str(key).lower() not in _ENVELOPE},
    }


@dataclass
class RunReport:
    """What one run did; `error` says why it stopped early (None: it read every page)."""

    environment: str
    trigger: str
    window_start: datetime
    window_end: datetime
    dry_run: bool = False
    started_at: datetime = field(default_factory=utcnow)
    seen: int = 0
    present: int = 0
    backfilled: int = 0
    errors: int = 0
    error: str | None = None
    problems: list[str] = field(default_factory=list)
    duration_ms: float = 0.0
    # The Extole event ids (`reconciled:<reward_id>:<STATE>`) stored, or a dry run would store.
    backfilled_ids: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None

    def problem(self, text: str) -> None:
        """A reward that could not be used: counted, and its reason kept (the first few)."""
        self.errors += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(text)

    def summary(self) -> str:
        verb = "would backfill" if self.dry_run else "backfilled"
        line = (f"{self.environment}: {interval(self.window_start, self.window_end)}: "
                f"seen {self.seen}, present {self.present}, {verb} {self.backfilled}, "
                f"errors {self.errors} ({self.duration_ms / 1000:.1f} s)")
        return line + (f"; stopped: {self.error}" if self.error else "")


class Reconciler:
    """Runs reconciliation for the environments that have an Extole token.

    `client_for` makes the Extole client of an environment (tests give one with a fake sleep);
    `wake` is told of an environment whose new events are committed (the in-process worker, or
    NOTIFY for the others); `stopping` ends a run between pages when the worker shuts down.
    """

    def __init__(self, settings: Settings, db: Database, event_map: EventMap, *,
                 client_for: Callable[[str], ExtoleClient] | None = None,
                 wake: Callable[[str], None] | None = None,
                 stopping: threading.Event | None = None,
                 clock: Callable[[], datetime] = utcnow, owner: str | None = None) -> None:
        self.settings = settings
        self.db = db
        self.event_map = event_map
        self._client_for = client_for or self._client
        self._wake = wake or self._notify
        self.stopping = stopping or threading.Event()
        self._clock = clock
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"

    def environments(self) -> list[str]:
        """The environments with a token, in the usual order."""
        return [env for env in ENVIRONMENTS if self.settings.extole_token(env)]

    def run(self, environment: str, *, since: datetime | None = None, dry_run: bool = False,
            trigger: str = "command", only_if_due: bool = False) -> RunReport | None:
        """One run over [since or now - RELAY_RECONCILE_WINDOW, now].

        ReconcileBusy when another run holds the environment. `only_if_due` (the worker's job):
        None, quietly, when another run holds it or the last run started less than
        RELAY_RECONCILE_INTERVAL ago, so that many workers together run once per interval.
        A dry run takes no lock and stores nothing, not even its record.
        """
        if not self.settings.extole_token(environment):
            raise RelayError(f"{TOKEN_VARIABLES.get(environment, 'the Extole API token')} is not "
                             f"set: {environment} is not reconciled")
        now = self._clock()
        start = since if since is not None else now - timedelta(
            seconds=self.settings.reconcile_window)
        if start >= now:
            raise RelayError(f"--since {start.isoformat()}Z is not in the past")
        report = RunReport(environment, trigger, start, now, dry_run=dry_run, started_at=now)
        if dry_run:
            self._read(report)
            return report
        if only_if_due and not self._due(environment, now):
            return None  # read only: most of the worker's looks end here, writing nothing
        if not self._acquire(environment, now):
            if only_if_due:
                return None
            raise ReconcileBusy(f"{environment}: {self._holder(environment)}")
        try:
            if only_if_due and not self._due(environment, now):
                return None  # another worker ran it between our look and our lock
            self._read(report)
            self._record(report)
        finally:
            self._release(environment)
        return report

    # -- reading and storing ---------------------------------------------------------------

    def _read(self, report: RunReport) -> None:
        started = time.monotonic()
        client = self._client_for(report.environment)
        try:
            for offset, page in client.reward_pages(report.window_start, report.window_end):
                self._page(report, offset, page)
                if self.stopping.is_set():
                    report.error = "the worker is shutting down"
                    break
                if not report.dry_run and not self._renew(report.environment):
                    report.error = "its lock expired and another run took it over"
                    break
        except ExtoleError as error:
            report.error = str(error)
        finally:
            client.close()
            report.duration_ms = (time.monotonic() - started) * 1000
        level = logging.INFO if report.ok and not report.errors else logging.WARNING
        log.log(level, "reconcile %s", report.summary())
        for problem in report.problems:
            log.warning("reconcile %s: %s", report.environment, problem)

    def _page(self, report: RunReport, offset: int, page: Sequence[Any]) -> None:
        """Check each reward of a page, then store those the environment lacks."""
        report.seen += len(page)
        usable: list[tuple[dict[str, Any], Event]] = []
        for index, reward in enumerate(page):
            try:
                item = reward_item(reward)
                usable.append((item, normalise(
                    item, self.event_map, report.started_at,
                    external_id_from=self.settings.external_id_from)))
            except RejectedEvent as rejection:
                report.problem(f"reward {offset + index} of the window: {rejection}")
        with self.db.session() as session:
            held = self._held(session, report.environment, [event for _, event in usable])
        missing = [(item, event) for (item, event), present in zip(usable, held, strict=True)
                   if not present]
        report.present += len(usable) - len(missing)
        if report.dry_run:
            report.backfilled += len(missing)
            report.backfilled_ids += [event.extole_event_id for _, event in missing]
        elif missing:
            self._store(report, offset, missing)

    def _held(self, session: Session, environment: str, events: Sequence[Event]) -> list[bool]:
        """Whether the environment already holds each event by one of its de-duplication keys
        (its event id, or its reward and state): read only, a first sort so that a run over
        rewards that are all present writes nothing. The ingest's insert decides."""
        keys = [dedup.keys_of(event) for event in events]
        taken = dedup.held(session.connection(), environment, {k for each in keys for k in each})
        return [not taken.isdisjoint(each) for each in keys]

    def _store(self, report: RunReport, offset: int,
               missing: Sequence[tuple[dict[str, Any], Event]]) -> None:
        """The missing rewards' items through the receiver's ingest, as one inbound request
        (GET /v2/rewards at this offset) whose body is the items stored."""
        items = [item for item, _ in missing]
        body = json.dumps(items, ensure_ascii=False, separators=(",", ":")).encode()
        path = (f"{REWARDS_PATH}?time_interval="
                f"{interval(report.window_start, report.window_end)}&success_only=false"
                f"&limit={MAX_LIMIT}&offset={offset}")
        now = utcnow()
        inbound = InboundRequest(
            received_at=now, environment=report.environment, method="GET", path=path[:255],
            remote_addr=None, headers={}, body=body, body_size=len(body), status_code=200,
            outcome="reconciled", auth_method="token", error=None)
        with self.db.session() as session:
            receipt = store_webhook(session, inbound, items, report.environment,
                                    self.event_map,
                                    external_id_from=self.settings.external_id_from)
        report.present += receipt.duplicates
        report.backfilled += receipt.accepted
        for rejection in receipt.rejected:
            report.problem(f"reward {items[rejection['index']].get('reward_id')}: "
                           f"{rejection['error']}")
        if receipt.ids:
            with self.db.session() as session:
                report.backfilled_ids += [str(extole_id) for extole_id in session.scalars(
                    select(OutboxEvent.extole_event_id).where(OutboxEvent.id.in_(receipt.ids))
                    .order_by(OutboxEvent.id))]
        if receipt.accepted:
            self._wake(report.environment)

    # -- the lock and the record -----------------------------------------------------------

    def _acquire(self, environment: str, now: datetime) -> bool:
        """Take the environment's lease unless a live one is held: one statement, so two
        processes asking at once cannot both get it."""
        table = ReconcileLock.__table__
        values = {"environment": environment, "owner": self.owner, "acquired_at": now,
                  "expires_at": now + timedelta(seconds=LEASE_SECONDS)}
        with self.db.session() as session:
            statement = dialect.upsert(session, table, values, ["environment"],
                                       where=table.c.expires_at <= now)
            return session.execute(statement.returning(table.c.owner)).scalar() == self.owner

    def _renew(self, environment: str) -> bool:
        """Extend our lease after a page; False when it is no longer ours."""
        with self.db.session() as session:
            return rowcount(session.execute(
                update(ReconcileLock)
                .where(ReconcileLock.environment == environment,
                       ReconcileLock.owner == self.owner)
                .values(expires_at=self._clock() + timedelta(seconds=LEASE_SECONDS)))) == 1

    def _release(self, environment: str) -> None:
        try:
            with self.db.session() as session:
                session.execute(delete(ReconcileLock).where(
                    ReconcileLock.environment == environment, ReconcileLock.owner == self.owner))
        except Exception:  # noqa: BLE001 - the lease expires by itself; the first error matters
            log.warning("reconcile %s: lock not released (it expires by itself)", environment,
                        exc_info=True)

    def _holder(self, environment: str) -> str:
        with self.db.session() as session:
            lock = session.get(ReconcileLock, environment)
        if lock is None:
            return "another run is in progress"
        return (f"another run ({lock.owner}) has been in progress since "
                f"{lock.acquired_at.isoformat(timespec='seconds')}Z")

    def _due(self, environment: str, now: datetime) -> bool:
        with self.db.session() as session:
            last = session.scalar(select(ReconcileRun.started_at)
                                  .where(ReconcileRun.environment == environment)
                                  .order_by(ReconcileRun.id.desc()).limit(1))
        return last is None or (now - last).total_seconds() >= self.settings.reconcile_interval

    def _record(self, report: RunReport) -> None:
        with self.db.session() as session:
            session.add(ReconcileRun(
                environment=report.environment, trigger=report.trigger,
                started_at=report.started_at, finished_at=utcnow(),
                window_start=report.window_start, window_end=report.window_end,
                seen=report.seen, present=report.present, backfilled=report.backfilled,
                errors=report.errors, error=report.error, problems=report.problems or None,
                duration_ms=report.duration_ms))
        for result, count in (("present", report.present), ("backfilled", report.backfilled),
                              ("error", report.errors)):
            if count:
                metrics.RECONCILE_REWARDS.labels(report.environment, result).inc(count)

    # -- defaults --------------------------------------------------------------------------

    def _client(self, environment: str) -> ExtoleClient:
        token = self.settings.extole_token(environment)
        assert token is not None  # run() checked
        return ExtoleClient(self.settings.extole_api_url, token, environment=environment)

    def _notify(self, environment: str) -> None:
        notifier = self.db.notifier()
        if notifier is not None:
            notifier.poke(environment)

