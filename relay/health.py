"""The operational endpoints: `/healthz`, `/readyz` and (from relay.metrics) `/metrics`.

`/healthz` answers while the process runs; `/readyz` only while the database answers at the newest
schema, so a load balancer stops sending webhooks to a relay that could not store them.
"""

from __future__ import annotations

from typing import Any

from alembic.script import ScriptDirectory
from flask import Blueprint, Flask, Response, current_app, jsonify
from sqlalchemy.exc import SQLAlchemyError

from relay import metrics, migrate
from relay.braze_state import environment_report
from relay.db import get_db
from relay.exceptions import DatabaseUnavailable

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    """Readiness stays 200 while a Braze key is refused: the receiver keeps accepting."""
    body: dict[str, Any] = {"status": "ok"}
    db = get_db()
    try:
        current = migrate.current_revision(db.engine)
        problem = schema_problem(current)
        if problem:
            body.update(status="unavailable", reason=problem)
        else:
            if current != migrate.head_revision():
                body["schema"] = (f"{current} is newer than this relay: restart it with the "
                                  "new version")
            with db.session() as session:
                body["braze"] = environment_report(session, current_app.config["RELAY_SETTINGS"])
    except (DatabaseUnavailable, SQLAlchemyError) as outage:
        body.update(status="unavailable", reason=describe_outage(outage))
    return jsonify(body), 200 if body["status"] == "ok" else 503


def schema_problem(current: str | None) -> str | None:
    """Why this code cannot work on the schema, or None when it can.

    A schema newer than the code (a revision it does not know) is no problem: upgrading runs
    `relay db upgrade` first, then restarts, and migrations keep the previous release working,
    so the processes still running the old code must stay ready meanwhile.
    """
    head = migrate.head_revision()
    if current == head:
        return None
    if current is None:
        return f"database schema is missing (newest is {head}): run `relay db upgrade`"
    if not _known(current):
        return None
    return f"database schema is at {current}, newest is {head}: run `relay db upgrade`"


def _known(revision: str) -> bool:
    script = ScriptDirectory.from_config(migrate.alembic_config("sqlite://"))
    try:
        return script.get_revision(revision) is not None
    except Exception:  # noqa: BLE001 - alembic raises several kinds for an unknown revision
        return False


def describe_outage(error: Exception) -> str:
    """One line naming the failure, from the driver's message (which never holds a password)."""
    if isinstance(error, DatabaseUnavailable):
        return str(error)
    original = getattr(error, "orig", None) or error
    lines = str(original).strip().splitlines()
    detail = f": {lines[0]}" if lines else ""
    return f"database unavailable: {type(original).__name__}{detail}"[:300]


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
    metrics.init_app(app)
