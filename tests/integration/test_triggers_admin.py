"""What an operator sees and does with campaign/Canvas triggers: the admin API (list, resend,
drop; auth and CSRF as every write), the pages (the event's triggers, the triggers list, the live
page's banner while any is uncertain), `relay triggers list|resend|drop`, `forget` and the stats.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from click.testing import Result
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.orm import undefer_group

from relay import privacy
from relay.db import get_db, utcnow
from relay.models import OutboxEvent, Trigger
from tests.integration.test_admin_api import basic, login
from tests.support import post_ids

ANN = {"external_user_id": "cust-1"}


def delivered_with_trigger(app: Flask, post_webhook: Any, state: str = "uncertain",
                           number: int = 1, recipient: dict[str, Any] | None = None) -> tuple[
                               int, int]:
    """An event stored delivered with one campaign trigger in `state`: (event id, trigger id)."""
    [event_id] = post_ids(post_webhook, {
        "type": "shared", "event_id": f"sh-{number}", "event_time": "2026-11-20T10:00:00Z",
        "partner_user_id": f"cust-{number}", "email": f"p{number}@example.com"})
    now = utcnow()
    with get_db(app).session() as session:
        event = session.get(OutboxEvent, event_id, options=[undefer_group("queue")])
        assert event is not None
        event.status, event.delivered_at = "delivered", now
        event.identity = {"external_id": f"cust-{number}"}
        trigger = Trigger(event_id=event_id, environment="production", kind="campaign",
                          target_id="cmp-1",
                          recipient=recipient or {"external_user_id": f"cust-{number}"},
                          state=state, due_at=now if state == "due" else None, sends=1,
                          last_error="timeout: Braze may have sent the message"
                          if state == "uncertain" else None, created_at=now, updated_at=now)
        session.add(trigger)
        session.flush()
        return event_id, trigger.id


def trigger_state(app: Flask, trigger_id: int) -> str | None:
    with get_db(app).session() as session:
        found = session.get(Trigger, trigger_id)
        return found.state if found else None


# --- API ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/admin/api/triggers/1/resend", "/admin/api/triggers/1/drop"])
def test_trigger_writes_without_credentials_are_401(client: FlaskClient, path: str) -> None:
    assert client.post(path, json={}).status_code == 401


def test_trigger_list_without_credentials_is_401(client: FlaskClient) -> None:
    assert client.get("/admin/api/triggers").status_code == 401


def test_list_filters_and_shows_the_contract_fields(app: Flask, client: FlaskClient,
                                                    post_webhook: Any) -> None:
    _, uncertain = delivered_with_trigger(app, post_webhook, "uncertain", 1)
    _, sent = delivered_with_trigger(app, post_webhook, "sent", 2)
    answer = client.get("/admin/api/triggers", headers=basic())
    assert answer.status_code == 200
    assert [t["id"] for t in answer.json["triggers"]] == [sent, uncertain]  # newest first
    first = answer.json["triggers"][1]
    assert {"id", "event_id", "environment", "kind", "target_id", "state", "sent_at",
            "last_error"} <= set(first)
    assert (first["kind"], first["target_id"], first["state"]) == ("campaign", "cmp-1",
                                                                   "uncertain")
    only = client.get("/admin/api/triggers?state=uncertain", headers=basic()).json
    assert [t["id"] for t in only["triggers"]] == [uncertain]
    assert client.get("/admin/api/triggers?kind=canvas", headers=basic()).json["triggers"] == []
    bad = client.get("/admin/api/triggers?state=lost", headers=basic())
    assert bad.status_code == 400 and "state must be one of" in bad.json["error"]


def test_resend_and_drop_through_the_api(app: Flask, client: FlaskClient,
                                         post_webhook: Any) -> None:
    _, first = delivered_with_trigger(app, post_webhook, "uncertain", 1)
    _, second = delivered_with_trigger(app, post_webhook, "uncertain", 2)
    resent = client.post(f"/admin/api/triggers/{first}/resend", headers=basic(),
                         content_type="application/json")
    assert resent.status_code == 200 and resent.json["state"] == "due"
    assert trigger_state(app, first) == "due"
    again = client.post(f"/admin/api/triggers/{first}/resend", headers=basic(),
                        content_type="application/json")
    assert again.status_code == 409 and "only an uncertain or failed" in again.json["error"]
    dropped = client.post(f"/admin/api/triggers/{second}/drop", headers=basic(),
                          content_type="application/json")
    assert dropped.status_code == 200 and trigger_state(app, second) == "dropped"
    assert client.post("/admin/api/triggers/999/drop", headers=basic(),
                       content_type="application/json").status_code == 404
    assert client.post("/admin/api/triggers/x/drop", headers=basic(),
                       content_type="application/json").status_code == 404


def test_a_sent_trigger_cannot_be_resent(app: Flask, client: FlaskClient,
                                         post_webhook: Any) -> None:
    _, sent = delivered_with_trigger(app, post_webhook, "sent")
    for action in ("resend", "drop"):
        answer = client.post(f"/admin/api/triggers/{sent}/{action}", headers=basic(),
                             content_type="application/json")
        assert answer.status_code == 409
    assert trigger_state(app, sent) == "sent"


@pytest.mark.parametrize("token", [None, "wrong"])
def test_session_writes_need_the_csrf_header(app: Flask, client: FlaskClient, post_webhook: Any,
                                            token: str | None) -> None:
    _, trigger_id = delivered_with_trigger(app, post_webhook)
    login(client)
    headers = {"X-CSRF-Token": token} if token else {}
    answer = client.post(f"/admin/api/triggers/{trigger_id}/resend", headers=headers,
                         content_type="application/json")
    assert answer.status_code == 403
    assert trigger_state(app, trigger_id) == "uncertain"


def test_session_write_with_the_csrf_header_works(app: Flask, client: FlaskClient,
                                                  post_webhook: Any) -> None:
    _, trigger_id = delivered_with_trigger(app, post_webhook)
    token = login(client)
    answer = client.post(f"/admin/api/triggers/{trigger_id}/drop",
                         headers={"X-CSRF-Token": token}, content_type="application/json")
    assert answer.status_code == 200 and trigger_state(app, trigger_id) == "dropped"


def test_event_detail_and_stats_show_triggers(app: Flask, client: FlaskClient,
                                              post_webhook: Any) -> None:
    event_id, trigger_id = delivered_with_trigger(app, post_webhook)
    detail = client.get(f"/admin/api/events/{event_id}", headers=basic()).json
    assert [(t["id"], t["state"]) for t in detail["triggers"]] == [(trigger_id, "uncertain")]
    stats = client.get("/admin/api/stats", headers=basic()).json
    assert stats["triggers"]["uncertain"] == 1 and stats["triggers"]["sent"] == 0


# --- pages --------------------------------------------------------------------------------------

BANNER = "1 campaign/Canvas trigger is uncertain"


def test_the_live_page_has_a_banner_while_a_trigger_is_uncertain(
        app: Flask, client: FlaskClient, post_webhook: Any) -> None:
    login(client)
    assert BANNER not in client.get("/admin/").text
    _, trigger_id = delivered_with_trigger(app, post_webhook)
    app.extensions.pop("relay.admin.stats", None)  # the stats cache lives one second
    assert BANNER in client.get("/admin/").text
    with get_db(app).session() as session:
        found = session.get(Trigger, trigger_id)
        assert found is not None
        found.state = "dropped"
    app.extensions.pop("relay.admin.stats", None)
    assert "trigger is uncertain" not in client.get("/admin/").text


def test_the_event_page_shows_its_trigger_and_resends_it(
        app: Flask, client: FlaskClient, post_webhook: Any) -> None:
    event_id, trigger_id = delivered_with_trigger(app, post_webhook)
    login(client)
    page = client.get(f"/admin/events/{event_id}").text
    assert "Campaign and Canvas triggers" in page and "cmp-1" in page
    assert f'action="/admin/triggers/{trigger_id}/resend"' in page
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    refused = client.post(f"/admin/triggers/{trigger_id}/resend", data={"event_id": event_id})
    assert refused.status_code == 403 and trigger_state(app, trigger_id) == "uncertain"
    done = client.post(f"/admin/triggers/{trigger_id}/resend",
                       data={"csrf_token": token, "event_id": str(event_id)})
    assert done.status_code == 302 and done.headers["Location"].endswith(
        f"/admin/events/{event_id}")
    assert trigger_state(app, trigger_id) == "due"
    assert f"Trigger {trigger_id} is due again" in client.get(done.headers["Location"]).text


def test_the_triggers_page_lists_filters_and_drops(
        app: Flask, client: FlaskClient, post_webhook: Any) -> None:
    _, uncertain = delivered_with_trigger(app, post_webhook, "uncertain", 1)
    _, sent = delivered_with_trigger(app, post_webhook, "sent", 2)
    login(client)
    page = client.get("/admin/triggers?state=uncertain").text
    assert f'data-trigger-id="{uncertain}"' in page and f'data-trigger-id="{sent}"' not in page
    assert client.get("/admin/triggers?state=lost").status_code == 400
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    done = client.post(f"/admin/triggers/{uncertain}/drop", data={"csrf_token": token})
    assert done.status_code == 302 and done.headers["Location"].endswith("/admin/triggers")
    assert trigger_state(app, uncertain) == "dropped"
    assert client.get("/admin/triggers").status_code == 200


def test_the_triggers_page_needs_a_login(client: FlaskClient) -> None:
    answer = client.get("/admin/triggers")
    assert answer.status_code == 302 and "/admin/login" in answer.headers["Location"]


# --- command line -------------------------------------------------------------------------------

def test_cli_lists_resends_and_drops(app: Flask, post_webhook: Any,
                                     relay: Callable[..., Result]) -> None:
    _, uncertain = delivered_with_trigger(app, post_webhook, "uncertain", 1)
    _, failed = delivered_with_trigger(app, post_webhook, "failed", 2)
    listed = relay("triggers", "list", "--state", "uncertain")
    assert listed.exit_code == 0
    lines = listed.stdout.splitlines()
    assert lines[0].split()[:6] == ["id", "event", "env", "kind", "target", "state"]
    assert [line.split()[0] for line in lines[1:]] == [str(uncertain)]
    assert "cust-1" in lines[1] and "uncertain" in lines[1]
    assert relay("triggers", "list", "--kind", "canvas").stdout == "no triggers match\n"

    declined = relay("triggers", "resend", str(uncertain), input="n\n")
    assert declined.exit_code == 1 and trigger_state(app, uncertain) == "uncertain"
    resent = relay("triggers", "resend", str(uncertain), "--yes")
    assert resent.exit_code == 0
    assert resent.stdout == f"trigger {uncertain} is due, to be sent once\n"
    assert trigger_state(app, uncertain) == "due"

    dropped = relay("triggers", "drop", str(failed))
    assert dropped.stdout == f"trigger {failed} is dropped\n" and trigger_state(app, failed) == (
        "dropped")
    again = relay("triggers", "drop", str(failed))
    assert again.exit_code == 4 and "only a due, uncertain or failed" in again.stderr
    missing = relay("triggers", "resend", "999", "--yes")
    assert missing.exit_code == 3 and "no trigger with id 999" in missing.stderr


# --- forget -------------------------------------------------------------------------------------

def test_forget_removes_a_persons_triggers_and_only_theirs(app: Flask,
                                                           post_webhook: Any) -> None:
    _, theirs = delivered_with_trigger(app, post_webhook, "due", 1)
    _, other = delivered_with_trigger(app, post_webhook, "sent", 2)
    alias = {"user_alias": {"alias_name": "p1@example.com", "alias_label": "email"}}
    _, by_alias = delivered_with_trigger(app, post_webhook, "uncertain", 3, recipient=alias)
    counts = privacy.forget(get_db(app), email="P1@example.com", external_id="cust-1").counts
    assert counts["triggers"] == 2
    with get_db(app).session() as session:
        assert list(session.scalars(select(Trigger.id))) == [other]
    assert theirs != by_alias


def test_resend_makes_an_uncertain_trigger_due_now(app: Flask, post_webhook: Any,
                                                   client: FlaskClient) -> None:
    _, trigger_id = delivered_with_trigger(app, post_webhook)
    before = utcnow()
    client.post(f"/admin/api/triggers/{trigger_id}/resend", headers=basic(),
                content_type="application/json")
    with get_db(app).session() as session:
        found = session.get(Trigger, trigger_id)
        assert found is not None and found.due_at is not None
        assert before - timedelta(seconds=1) <= found.due_at and found.last_error is None
