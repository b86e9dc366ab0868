"""Each Braze environment's delivery state, shared by every worker through the database.

A refused key (401/403) pauses that environment without counting attempts; the worker probes it
again after a pause and resumes by itself. The admin banner and `/readyz` read this state.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from relay.db import utcnow
from relay.models import EnvironmentState
from relay.settings import ENVIRONMENTS, Settings

OK, MISSING, REFUSED = "ok", "missing", "refused"


def _state(session: Session, environment: str) -> EnvironmentState:
    state = session.get(EnvironmentState, environment, with_for_update=False)
    if state is None:
        state = EnvironmentState(environment=environment, key_state=OK, updated_at=utcnow())
        session.add(state)
        session.flush()
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
    state = _state(session, environment)
    now = utcnow()
    state.key_state = REFUSED
    state.paused_until = now + timedelta(seconds=pause)
    state.last_error = error[:1000]
    state.updated_at = now
    return state.paused_until


def mark_ok(session: Session, environment: str) -> None:
    state = session.get(EnvironmentState, environment)
    if state is not None and (state.key_state != OK or state.paused_until is not None):
        state.key_state, state.paused_until, state.last_error = OK, None, None
        state.updated_at = utcnow()


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
