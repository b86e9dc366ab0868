"""`/healthz` (the process runs) and `/readyz` (the database answers at the newest schema)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify
from sqlalchemy.exc import SQLAlchemyError

from relay import migrate
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
        head = migrate.head_revision()
        if current != head:
            body.update(status="unavailable",
                        reason=f"database schema is at {current or 'nothing'}, newest is {head}: "
                               "run `relay db upgrade`")
        else:
            with db.session() as session:
                body["braze"] = environment_report(session, current_app.config["RELAY_SETTINGS"])
    except (DatabaseUnavailable, SQLAlchemyError) as outage:
        reason = str(outage) if isinstance(outage, DatabaseUnavailable) else (
            f"database unavailable: {type(outage).__name__}")
        body.update(status="unavailable", reason=reason)
    return jsonify(body), 200 if body["status"] == "ok" else 503


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
