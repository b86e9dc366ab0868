"""The `relay` command line: thin click wrappers over plain functions (Flask's CLI group).

Errors the operator can act on end the command with one line on stderr and an exit code a script
can tell apart (see `EXIT_CODES`), never a traceback. Nothing here imports prometheus_client at
module level: `relay serve` must set PROMETHEUS_MULTIPROC_DIR before the first import.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import click
from flask import Flask
from flask.cli import FlaskGroup
from sqlalchemy.exc import ProgrammingError, SQLAlchemyError

from relay import create_app, localsetup, migrate
from relay.db import describe_error
from relay.exceptions import (
    DatabaseUnavailable,
    EventNotFound,
    FilterError,
    InvalidTransition,
    MigrationError,
    RelayError,
    SettingsError,
    TriggerNotFound,
)
from relay.models import Status, TriggerState
from relay.settings import ENVIRONMENTS, Settings, load_settings

STATUSES = tuple(status.value for status in Status)
TRIGGER_STATES = tuple(state.value for state in TriggerState)
# 1: a check or operation failed; 2: invalid setting or usage (as click); then one code per kind.
EXIT_CODES: dict[type[Exception], int] = {
    SettingsError: 2,
    EventNotFound: 3,
    TriggerNotFound: 3,
    InvalidTransition: 4,
    DatabaseUnavailable: 5,
    MigrationError: 5,
}


def _operator_line(error: Exception) -> tuple[str, int]:
    """A RelayError (or a database error) as one line for `relay: <line>`, with its kind's exit
    code."""
    if isinstance(error, SQLAlchemyError):
        hint = " (is the schema current? `relay db current`)" if isinstance(
            error, ProgrammingError) else ""
        return describe_error(error) + hint, 5
    code = next((c for kind, c in EXIT_CODES.items() if isinstance(error, kind)), 1)
    prefix = "invalid setting: " if isinstance(error, SettingsError) else ""
    return f"{prefix}{error}", code


class RelayGroup(FlaskGroup):
    """Flask's group without building the app unless a command asks for it.

    FlaskGroup builds the app to look for `app.cli` commands and before every command; relay has
    no app commands, and its commands work from the settings. Building the app for `relay --help`
    would read the settings (a traceback when one is invalid) and create `instance/`; building it
    in `relay serve` would import prometheus-client before multiprocess mode is set up. A command
    that needs an app context says so with `with_appcontext=True`.
    """

    # Decorator factories only (`@cli.command()`), as Flask's AppGroup declares them too.
    def command(  # type: ignore[override]
            self, *args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], click.Command]:
        kwargs.setdefault("with_appcontext", False)
        return super().command(*args, **kwargs)

    def group(  # type: ignore[override]
            self, *args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], click.Group]:
        kwargs.setdefault("cls", click.Group)
        decorator: Callable[[Callable[..., Any]], click.Group] = click.Group.group(
            self, *args, **kwargs)
        return decorator

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return click.Group.get_command(self, ctx, name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return click.Group.list_commands(self, ctx)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (RelayError, SQLAlchemyError) as error:
            line, code = _operator_line(error)
            click.echo(f"relay: {line}", err=True)
            ctx.exit(code)


def _create_app() -> Flask:
    return create_app()


@click.group(cls=RelayGroup, create_app=_create_app, add_default_commands=False,
             add_version_option=False, load_dotenv=False,
             context_settings={"max_content_width": 100})
@click.version_option(package_name="relay")
def cli() -> None:
    """relay: delivers Extole's outbound webhooks into Braze.

    Settings come from the environment, then .env, then instance/.env (see README,
    "Configuration"); `-e FILE` loads another file first.
    """


# Flask's --app and --debug mean nothing for relay; keep --env-file, which loads a settings file.
cli.params = [p for p in cli.params if p.name not in ("app", "debug")]


@contextlib.contextmanager
def _database(settings: Settings | None = None) -> Iterator[Any]:
    from relay import logs
    from relay.db import Database

    settings = settings or load_settings()
    logs.configure(settings.log_format)
    db = Database(settings.database_url)
    try:
        yield db
    finally:
        db.dispose()


# --- serving ------------------------------------------------------------------------------------


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=int, help="Port to listen on.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1, 64),
              help="Gunicorn worker processes.")
@click.option("--threads", default=8, show_default=True, type=click.IntRange(1, 256),
              help="Threads per worker (admin streams hold one each).")
@click.option("--with-worker", is_flag=True, help="Also run delivery in the server processes.")
def serve(host: str, port: int, workers: int, threads: int, with_worker: bool) -> None:
    """Serve webhooks, admin, health and metrics (gunicorn)."""
    from relay.server import serve as run

    settings = load_settings()
    localsetup.warn_if_not_migrated(settings)
    run(host, port, workers, threads, with_worker)


@cli.command()
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=None,
              help="Expose this worker's Prometheus metrics on this port.")
@click.option("--metrics-host", default="127.0.0.1", show_default=True,
              help="Address the metrics port listens on (0.0.0.0: every interface).")
def worker(metrics_port: int | None, metrics_host: str) -> None:
    """Deliver events to Braze until stopped (SIGTERM)."""
    from relay.scheduler import run_worker

    run_worker(load_settings(), metrics_port=metrics_port, metrics_host=metrics_host)


# --- database -----------------------------------------------------------------------------------


@cli.group()
def db() -> None:
    """Database schema: upgrade, current, history."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Target revision.")
def db_upgrade(revision: str) -> None:
    """Apply migrations up to the newest schema."""
    settings = load_settings()
    migrate.upgrade(settings.database_url, revision)
    click.echo(f"database at {migrate.head_revision() if revision == 'head' else revision}")


@db.command("current")
def db_current() -> None:
    """Print the schema revision the database is at."""
    from relay.db import make_engine

    engine = make_engine(load_settings().database_url)
    try:
        current, head = migrate.current_revision(engine), migrate.head_revision()
    finally:
        engine.dispose()
    if current == head:
        state = "newest"
    elif current is not None and not migrate.is_known(current):
        state = f"newer than this relay's {head}: install the newer relay"
    else:
        state = f"behind {head}: run `relay db upgrade`"
    click.echo(f"{current or 'empty'} ({state})")


@db.command("history")
def db_history() -> None:
    """List the migrations, newest first."""
    for revision, down, message in migrate.history():
        click.echo(f"{down or '<base>'} -> {revision}: {message.strip()}")


# --- events -------------------------------------------------------------------------------------


@cli.group()
def events() -> None:
    """Inspect, retry and replay events in the outbox."""


@events.command("list")
@click.option("--status", type=click.Choice(STATUSES), help="Only events in this status.")
@click.option("--environment", type=click.Choice(ENVIRONMENTS), help="Only this environment.")
@click.option("--name", help="Braze event name, e.g. 'Earned Reward'.")
@click.option("--q", help="An email, external_id or Extole event id (exact).")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 1000))
@click.option("--before", type=int, help="Only ids below this one (the next page).")
def events_list(status: str | None, environment: str | None, name: str | None, q: str | None,
                limit: int, before: int | None) -> None:
    """List events, newest first, as a table."""
    from relay.outbox import queries
    from relay.outbox.filters import EventFilter

    event_filter = EventFilter(status=status, environment=environment, name=name, q=q)
    with _database() as database, database.session() as session:
        found, next_cursor = queries.list_events(session, event_filter, limit=limit,
                                                 cursor=before)
        rows = [_event_row(queries.event_json(event)) for event in found]
    if not rows:
        click.echo("no events match")
        return
    click.echo(_table(["id", "received (UTC)", "env", "status", "tries", "braze event",
                       "extole event id", "person", "last error"], rows))
    if next_cursor is not None:
        click.echo(f"more: add --before {next_cursor}")


def _event_row(event: dict[str, Any]) -> list[str]:
    received = (event["received_at"] or "")[:19].replace("T", " ")
    return [str(event["id"]), received, event["environment"], event["status"],
            str(event["attempts"]), event["braze_event"] or "-", event["extole_event_id"] or "-",
            event["external_id"] or event["email"] or "-", event["last_error"] or ""]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], width: int = 40) -> str:
    """A plain aligned table; long cells are cut so one event stays on one line."""
    cells = [[" ".join(c.split()) for c in row] for row in rows]
    cells = [[c if len(c) <= width else c[: width - 1] + "…" for c in row] for row in cells]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


@events.command("show")
@click.argument("event_id", type=int)
def events_show(event_id: int) -> None:
    """Print one event with its inbound request and attempts (JSON)."""
    from relay.outbox import queries

    with _database() as database, database.session() as session:
        detail = queries.event_detail(session, event_id)
    click.echo(json.dumps(detail, indent=2, ensure_ascii=False, default=str))


@events.command("retry")
@click.argument("event_id", type=int)
def events_retry(event_id: int) -> None:
    """Make a dead or retrying event due now."""
    from relay.outbox import operator

    with _database() as database, database.session() as session:
        operator.retry(session, event_id)
    click.echo(f"event {event_id} is pending, due now")


@events.command("replay")
@click.argument("event_id", type=int, required=False)
@click.option("--status", type=click.Choice(STATUSES), default="dead", show_default=True,
              help="Replay every event in this status (without EVENT_ID).")
@click.option("--environment", type=click.Choice(ENVIRONMENTS), help="Only this environment.")
@click.option("--name", help="Only this Braze event name.")
@click.option("--q", help="Only this email, external_id or Extole event id.")
@click.option("--since", help="Only events received at or after this ISO-8601 time.")
@click.option("--yes", is_flag=True, help="Do not ask before replaying events that are not dead.")
def events_replay(event_id: int | None, status: str, environment: str | None, name: str | None,
                  q: str | None, since: str | None, yes: bool) -> None:
    """Send events again: one by id, or all matching a filter.

    Without EVENT_ID, every event matching the filter (by default all dead events) goes back to
    pending and is sent again; the count is printed. Their history of attempts is kept.
    Replaying delivered events sends them to Braze a second time, so that asks first.
    """
    from relay.outbox import operator
    from relay.outbox.filters import EventFilter, parse_since

    try:
        moment = parse_since(since)
    except FilterError as error:
        raise click.BadParameter(str(error), param_hint="--since") from None
    with _database() as database:
        if event_id is not None:
            with database.session() as session:
                operator.replay(session, event_id)
            click.echo(f"event {event_id} is pending, due now")
            return
        event_filter = EventFilter(status=status, environment=environment, name=name, q=q,
                                   since=moment)
        if status != "dead" and not yes:
            with database.session() as session:
                matching = operator.count_matching(session, event_filter)
            click.confirm(f"Send {matching} {status} events to Braze again?", abort=True)
        with database.session() as session:
            count = operator.replay_matching(session, event_filter)
    click.echo(f"requeued {count} {status} event{'s' if count != 1 else ''}")


# --- campaign and Canvas triggers ---------------------------------------------------------------


@cli.group()
def triggers() -> None:
    """Campaign and Canvas triggers: list, resend, drop.

    See the README, "Campaign and Canvas triggers".
    """


@triggers.command("list")
@click.option("--state", type=click.Choice(TRIGGER_STATES), help="Only triggers in this state.")
@click.option("--environment", type=click.Choice(ENVIRONMENTS), help="Only this environment.")
@click.option("--kind", type=click.Choice(("campaign", "canvas")), help="Only this kind.")
@click.option("--event", "event_id", type=click.IntRange(1), help="Only this event's.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 1000))
@click.option("--before", type=int, help="Only ids below this one (the next page).")
def triggers_list(state: str | None, environment: str | None, kind: str | None,
                  event_id: int | None, limit: int, before: int | None) -> None:
    """List triggers, newest first, as a table."""
    from relay import triggers as store

    filters = store.parse_filter(state, environment, kind)
    with _database() as database, database.session() as session:
        found, next_cursor = store.list_triggers(session, filters, limit=limit, cursor=before,
                                                 event_id=event_id)
        rows = [_trigger_row(store.trigger_json(t)) for t in found]
    if not rows:
        click.echo("no triggers match")
        return
    click.echo(_table(["id", "event", "env", "kind", "target", "state", "sends", "sent (UTC)",
                       "recipient", "last error"], rows))
    if next_cursor is not None:
        click.echo(f"more: add --before {next_cursor}")


def _trigger_row(trigger: dict[str, Any]) -> list[str]:
    recipient = trigger["recipient"] or {}
    who = recipient.get("external_user_id") or (recipient.get("user_alias") or {}).get(
        "alias_name") or "-"
    return [str(trigger["id"]), str(trigger["event_id"]), trigger["environment"],
            trigger["kind"], trigger["target_id"], trigger["state"], str(trigger["sends"]),
            (trigger["sent_at"] or "-")[:19].replace("T", " "), who,
            trigger["last_error"] or ""]


@triggers.command("resend")
@click.argument("trigger_id", type=int)
@click.option("--yes", is_flag=True, help="Do not ask first.")
def triggers_resend(trigger_id: int, yes: bool) -> None:
    """Send an uncertain (or failed) trigger again, once.

    Check in Braze first that the person did not get the message: Braze does not de-duplicate
    trigger requests, so a second request is a second message.
    """
    from relay import triggers as store

    if not yes:
        click.confirm(f"Send trigger {trigger_id} to Braze again (a second message if the first "
                      "reached the person)?", abort=True)
    with _database() as database, database.session() as session:
        store.resend(session, trigger_id)
    click.echo(f"trigger {trigger_id} is due, to be sent once")


@triggers.command("drop")
@click.argument("trigger_id", type=int)
def triggers_drop(trigger_id: int) -> None:
    """Never send this (due, uncertain or failed) trigger: state `dropped`."""
    from relay import triggers as store

    with _database() as database, database.session() as session:
        store.drop(session, trigger_id)
    click.echo(f"trigger {trigger_id} is dropped")


# --- personal data and retention ----------------------------------------------------------------


@cli.command()
@click.option("--email", help="The person's email (any case).")
@click.option("--external-id", help="The person's Braze external_id.")
@click.option("--wait", "wait_seconds", type=click.FloatRange(0), default=120.0,
              show_default=True,
              help="Seconds to wait for deliveries of their events already in flight.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def forget(email: str | None, external_id: str | None, wait_seconds: float, yes: bool) -> None:
    """Erase one person's personal data from every table.

    Their events (rejected ones included) keep their ids, times and statuses but lose every
    personal field; raw inbound bodies and Braze requests that mention them, in any JSON
    spelling, are redacted; their identity cache entries and campaign/Canvas triggers are
    deleted. Deliveries of their events already in flight are waited for (--wait), new ones held
    back meanwhile, so none writes the data back. On SQLite the write-ahead log is checkpointed
    and truncated. This cannot be undone. Braze's own copy is not touched (use Braze's user
    deletion).
    """
    from relay import privacy

    if not (email and email.strip()) and not (external_id and external_id.strip()):
        raise click.UsageError("give --email, --external-id or both")
    who = " and ".join(f"{label} {value}" for label, value in
                       (("email", email), ("external_id", external_id)) if value)
    if not yes:
        click.confirm(f"Erase all personal data of {who} from the relay's database? "
                      "This cannot be undone", abort=True)

    def waiting(busy: dict[int, Any]) -> None:
        click.echo(f"waiting (up to {wait_seconds:g} s) for {len(busy)} of their events being "
                   "delivered right now", err=True)

    with _database() as database:
        done = privacy.forget(database, email=email, external_id=external_id,
                              wait_seconds=wait_seconds, on_wait=waiting)
    for kind, count in done.counts.items():
        verb = "deleted" if kind in ("identity_cache", "triggers", "dedup_keys") else "redacted"
        click.echo(f"{kind}: {count} {verb}")
    if done.checkpointed is False:
        raise RelayError(
            "the data is erased from every table, but SQLite's write-ahead log could not be "
            "checkpointed (another connection kept reading): older copies stay in the -wal "
            "file until SQLite's next checkpoint; run forget again to retry")


@cli.command()
@click.option("--older-than", "days", type=click.IntRange(1), default=None,
              help="Days to keep [default: RELAY_RETENTION_DAYS].")
def purge(days: int | None) -> None:
    """Delete delivered/skipped events and logs past retention.

    The de-duplication keys of purged events stay until RELAY_DEDUP_DAYS after their receipt,
    so a replayed request is still recognised; older ones are deleted too.
    """
    from relay import retention

    settings = load_settings()
    days = days or settings.retention_days
    with _database(settings) as database:
        counts = retention.purge(database, days, dedup_days=settings.dedup_days)
    click.echo(f"purged rows received more than {days} days ago "
               f"(keys of purged events: {settings.dedup_days} days):")
    for kind, count in counts.items():
        click.echo(f"  {kind}: {count}")


# --- reconciliation -----------------------------------------------------------------------------

SHOWN_BACKFILLS = 50


@cli.command(short_help="Recover reward states Extole never delivered.")
@click.option("--environment", type=click.Choice(ENVIRONMENTS),
              help="Only this environment [default: every one with an Extole API token].")
@click.option("--since", help="Look back to this ISO-8601 time instead of "
                              "RELAY_RECONCILE_WINDOW.")
@click.option("--dry-run", is_flag=True, help="Say what would be backfilled; store nothing.")
def reconcile(environment: str | None, since: str | None, dry_run: bool) -> None:
    """Recover reward events Extole never delivered, from its rewards API.

    Reads Extole's rewards over the window and stores, as reward events delivered like any
    other, each reward state the environment does not hold yet; prints what it saw and
    backfilled. Exit code 1 when an environment could not be reconciled (a refused token,
    Extole unavailable, another run in progress).
    """
    from relay.eventmap import EventMap
    from relay.exceptions import ReconcileBusy
    from relay.outbox.filters import parse_since
    from relay.reconcile import Reconciler

    try:
        moment = parse_since(since)
    except FilterError as error:
        raise click.BadParameter(str(error), param_hint="--since") from None
    settings = load_settings()
    with _database(settings) as database:
        reconciler = Reconciler(settings, database, EventMap.load(settings.event_map))
        environments = [environment] if environment else reconciler.environments()
        if not environments:
            raise RelayError("no Extole API token is set (EXTOLE_API_TOKEN, "
                             "EXTOLE_STAGING_API_TOKEN): nothing to reconcile")
        failed = 0
        for name in environments:
            try:
                report = reconciler.run(name, since=moment, dry_run=dry_run)
            except ReconcileBusy as busy:
                click.echo(f"{busy}: not started")
                failed += 1
                continue
            assert report is not None  # only the worker's due-only runs answer None
            click.echo(report.summary())
            verb = "would backfill" if dry_run else "backfilled"
            for extole_id in report.backfilled_ids[:SHOWN_BACKFILLS]:
                click.echo(f"  {verb} {extole_id}")
            if len(report.backfilled_ids) > SHOWN_BACKFILLS:
                click.echo(f"  … and {len(report.backfilled_ids) - SHOWN_BACKFILLS} more")
            for problem in report.problems:
                click.echo(f"  error: {problem}")
            failed += not report.ok
    if failed:
        raise RelayError(f"{failed} environment{'s' if failed != 1 else ''} not reconciled")


# --- checking -----------------------------------------------------------------------------------


@cli.command("check-config", short_help="Validate settings, Braze keys, Extole tokens.")
def check_config() -> None:
    """Validate settings and try each Braze key and Extole API token."""
    from relay import checks

    settings = load_settings()  # an invalid value stops here with one line and exit code 2
    click.echo("settings: OK")
    problems = 0
    for check in checks.run_checks(settings):
        click.echo(str(check))
        problems += check.problem
    if problems:
        raise RelayError(f"{problems} problem{'s' if problems != 1 else ''} found")


# --- local use ----------------------------------------------------------------------------------


@cli.command(short_help="Write instance/.env with local secrets.")
def init() -> None:
    """Write instance/.env with random local secrets (never overwrites) and print how to start."""
    created = localsetup.write_local_env()
    click.echo("wrote instance/.env with new random secrets" if created
               else "instance/.env exists: kept as it is")
    click.echo(localsetup.instructions(load_settings()))


@cli.command(short_help="Run a local imitation of Braze and Extole's rewards API.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=9010, show_default=True, type=int)
@click.option("--api-key", "api_keys", multiple=True,
              help="Accepted key, KEY or NAME=KEY (repeatable; none: any key).")
@click.option("--fail-rate", default=0.0, type=click.FloatRange(0, 1), show_default=True,
              help="Fraction of requests answered with --fail-status.")
@click.option("--fail-status", default=503, type=int, show_default=True)
@click.option("--latency-ms", default=0, type=click.IntRange(0), show_default=True)
@click.option("--rate-limit", default=None, help="e.g. 20/3s: requests allowed per window.")
@click.option("--reject-key", "reject_keys", multiple=True, help="Key answered 401.")
@click.option("--extole-token", "extole_tokens", multiple=True,
              help="Extole API token, PROGRAM=TOKEN or TOKEN (repeatable; none: any token "
                   "reads program production).")
@click.option("--fault-path", "fault_paths", multiple=True,
              type=click.Choice(("/users/track", "/users/export/ids", "/campaigns/trigger/send",
                                 "/canvas/trigger/send")),
              help="Apply --fail-rate and --latency-ms only here (repeatable; none: everywhere).")
def sandbox(host: str, port: int, api_keys: tuple[str, ...], fail_rate: float,
            fail_status: int, latency_ms: int, rate_limit: str | None,
            reject_keys: tuple[str, ...], extole_tokens: tuple[str, ...],
            fault_paths: tuple[str, ...]) -> None:
    """Run a local imitation of Braze's /users/track, /users/export/ids,
    /campaigns/trigger/send and /canvas/trigger/send, and of Extole's GET /v2/rewards over the
    rewards posted to /sandbox/extole/rewards."""
    from relay.sandbox import SandboxConfig, run_sandbox

    if rate_limit:
        try:
            SandboxConfig.parse_rate_limit(rate_limit)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--rate-limit") from None
    config = SandboxConfig(api_keys=list(api_keys), fail_rate=fail_rate,
                           fail_status=fail_status, latency_ms=latency_ms,
                           rate_limit=rate_limit, reject_keys=list(reject_keys),
                           extole_tokens=list(extole_tokens), fault_paths=list(fault_paths))
    click.echo(f"Braze sandbox on http://{host}:{port} (profiles: /sandbox/profiles, "
               "triggers: /sandbox/triggers)")
    run_sandbox(host, port, config)


def main() -> None:
    """The console script; errors raised outside a command (rare) still end in one line."""
    try:
        cli.main(prog_name="relay")
    except SettingsError as error:
        click.echo(f"relay: invalid setting: {error}", err=True)
        sys.exit(2)
    except RelayError as error:
        click.echo(f"relay: {error}", err=True)
        sys.exit(1)
