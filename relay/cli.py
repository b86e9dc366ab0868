"""The `relay` command line: thin click wrappers over plain functions (Flask's CLI group)."""

from __future__ import annotations

import sys

import click
from flask import Flask
from flask.cli import FlaskGroup

from relay import create_app, localsetup, migrate
from relay.exceptions import RelayError, SettingsError
from relay.settings import load_settings


def _create_app() -> Flask:
    return create_app()


@click.group(cls=FlaskGroup, create_app=_create_app, add_default_commands=False,
             add_version_option=False, load_dotenv=False)
@click.version_option(package_name="relay")
def cli() -> None:
    """relay: delivers Extole's outbound webhooks into Braze."""


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=int, help="Port to listen on.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1, 64),
              help="Gunicorn worker processes.")
@click.option("--threads", default=8, show_default=True, type=click.IntRange(1, 256),
              help="Threads per worker (admin streams hold one each).")
@click.option("--with-worker", is_flag=True, help="Also run delivery in the server processes.")
def serve(host: str, port: int, workers: int, threads: int, with_worker: bool) -> None:
    """Serve receiver, admin and health endpoints with gunicorn."""
    from relay.server import serve as run

    settings = load_settings()
    localsetup.warn_if_not_migrated(settings)
    run(host, port, workers, threads, with_worker)


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
    current, head = migrate.current_revision(engine), migrate.head_revision()
    engine.dispose()
    state = "newest" if current == head else f"behind {head}: run `relay db upgrade`"
    click.echo(f"{current or 'empty'} ({state})")


@db.command("history")
def db_history() -> None:
    """List the migrations, newest first."""
    for revision, down, message in migrate.history():
        click.echo(f"{down or '<base>'} -> {revision}: {message.strip()}")


@cli.command()
def init() -> None:
    """Write instance/.env with random local secrets (never overwrites) and print how to start."""
    created = localsetup.write_local_env()
    click.echo("wrote instance/.env with new random secrets" if created
               else "instance/.env exists: kept as it is")
    click.echo(localsetup.instructions(load_settings()))


@cli.command()
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
def sandbox(host: str, port: int, api_keys: tuple[str, ...], fail_rate: float,
            fail_status: int, latency_ms: int, rate_limit: str | None,
            reject_keys: tuple[str, ...]) -> None:
    """Run a local imitation of Braze's /users/track and /users/export/ids."""
    from relay.sandbox import SandboxConfig, run_sandbox

    if rate_limit:
        try:
            SandboxConfig.parse_rate_limit(rate_limit)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--rate-limit") from None
    config = SandboxConfig(api_keys=list(api_keys), fail_rate=fail_rate,
                           fail_status=fail_status, latency_ms=latency_ms,
                           rate_limit=rate_limit, reject_keys=list(reject_keys))
    click.echo(f"Braze sandbox on http://{host}:{port} (profiles: /sandbox/profiles)")
    run_sandbox(host, port, config)


def main() -> None:
    try:
        cli.main(prog_name="relay")
    except SettingsError as error:
        click.echo(f"relay: invalid setting: {error}", err=True)
        sys.exit(2)
    except RelayError as error:
        click.echo(f"relay: {error}", err=True)
        sys.exit(1)
