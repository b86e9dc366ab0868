"""Each Braze environment's delivery state, shared by every worker through the database.

A refused key (401/403) pauses that environment without counting attempts; the worker probes it
again after a pause and resumes by itself. The admin banner and `/readyz` read this state.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from relay import dialect
from relay.db import utcnow
from relay.models import EnvironmentState
from relay.settings import ENVIRONMENTS, Settings

OK, MISSING, REFUSED = "ok", "missing", "refused"


def _state(session: Session, environment: str) -> EnvironmentState:
    state = session.get(EnvironmentState, environment, with_for_update=False)
    if state is None:
        # Concurrent first writers (two threads' 429s at once, two workers) must not collide on
        # the primary key: a plain INSERT would fail one of them and roll its answer back.
        session.execute(dialect.insert(session, EnvironmentState)
                        .values(environment=environment, key_state=OK, updated_at=utcnow())
                        .on_conflict_do_nothing(index_elements=["environment"]))
        state = session.scalars(select(EnvironmentState)
                                .where(EnvironmentState.environment == environment)).one()
    return state


def environment_report(session: Session, settings: Settings) -> dict[str, str]:
    """`ok`, `missing` (no key configured) or `refused` (Braze answered 401/403 last)."""
    stored = {s.environment: s for s in session.scalars(select(EnvironmentState))}
    report: dict[str, str] = {}
    for environment in ENVIRONMENTS:
        if not settings.braze_key(environment) or not settings.braze_endpoint(environment):
            report[environment] = MISSING
        elif (state := stored.get(environment)) is not None and state.key_state == REFUSED:
            report[environment] = REFUSED
        else:
            report[environment] = OK
    return report


def mark_refused(session: Session, environment: str, error: str, pause: float) -> datetime:
    """Pause the environment; `updated_at` keeps the moment the key was first refused."""
    state = _state(session, environment)
    now = utcnow()
    if state.key_state != REFUSED:
        state.key_state = REFUSED
        state.updated_at = now
    state.paused_until = now + timedelta(seconds=pause)
    state.last_error = error[:1000]
    return state.paused_until


def mark_ok(session: Session, environment: str) -> float:
    """The key works: resume. Answers how long it had been refused (0 if it was not)."""
    state = session.get(EnvironmentState, environment)
    if state is None or state.key_state == OK:
        return 0.0
    # Parallel requests may all see the refusal end: lock and look again, so only the first
    # answers the refused time (and credits it to the failure clocks) and the others get 0.
    session.refresh(state, with_for_update=True)
    if state.key_state == OK:
        return 0.0
    now = utcnow()
    refused_for = max(0.0, (now - state.updated_at).total_seconds())
    state.key_state, state.paused_until, state.last_error = OK, None, None
    state.updated_at = now
    return refused_for


def mark_rate_limited(session: Session, environment: str, until: datetime) -> None:
    state = _state(session, environment)
    if state.rate_limited_until is None or state.rate_limited_until < until:
        state.rate_limited_until = until
        state.updated_at = utcnow()


def blocked_until(session: Session, environment: str) -> datetime | None:
    """When this environment may send again (pause or rate-limit), or None if it may now."""
    state = session.get(EnvironmentState, environment)
    if state is None:
        return None
    now = utcnow()
    times = [t for t in (state.paused_until, state.rate_limited_until) if t and t > now]
    return max(times) if times else None


def paused_until(session: Session, environment: str) -> datetime | None:
    """When a refused key's pause ends, or None: the rate limit of /users/track is not the
    trigger endpoints', so only the pause stops triggers."""
    state = session.get(EnvironmentState, environment)
    if state is None or state.paused_until is None or state.paused_until <= utcnow():
        return None
    return state.paused_until
