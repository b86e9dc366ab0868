"""The operational endpoints: `/healthz`, `/readyz` and (from relay.metrics) `/metrics`.

`/healthz` answers while the process runs; `/readyz` only while the database answers at the newest
schema, so a load balancer stops sending webhooks to a relay that could not store them.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify
from sqlalchemy.exc import SQLAlchemyError

from relay import metrics, migrate
from relay.braze_state import environment_report
from relay.db import describe_error, get_db
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
        problem = migrate.schema_problem(current)
        if problem:
            body.update(status="unavailable", reason=problem)
        else:
            if current != migrate.head_revision():
                body["schema"] = (f"{current} is newer than this relay: restart it with the "
                                  "new version")
            with db.session() as session:
                body["braze"] = environment_report(session, current_app.config["RELAY_SETTINGS"])
    except (DatabaseUnavailable, SQLAlchemyError) as outage:
        body.update(status="unavailable", reason=describe_error(outage))
    return jsonify(body), 200 if body["status"] == "ok" else 503


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
    metrics.init_app(app)
