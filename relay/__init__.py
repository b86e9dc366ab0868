"""relay: delivers Extole's outbound webhooks into Braze.

`create_app` builds the Flask application: settings first (validated once), then the database,
the event map, logging and one blueprint per concern.
"""

from __future__ import annotations

from typing import Any, cast

from flask import Flask
from flask.json.provider import DefaultJSONProvider

from relay.settings import Settings, load_settings

__version__ = "0.1.0"


def create_app(settings: Settings | None = None, **config: Any) -> Flask:
    """Application factory; `settings` overrides the environment (tests pass their own)."""
    from relay import admin, db, health, logs, receiver
    from relay.eventmap import EventMap

    settings = settings or load_settings()
    app = Flask(__name__)
    app.config.update(
        RELAY_SETTINGS=settings,
        SECRET_KEY=settings.secret_key,
        MAX_CONTENT_LENGTH=None,
        JSON_SORT_KEYS=False,
    )
    app.config.update(config)
    cast(DefaultJSONProvider, app.json).sort_keys = False
    logs.configure(settings.log_format)
    app.extensions["relay.event_map"] = EventMap.load(settings.event_map)
    db.init_app(app)
    app.register_blueprint(receiver.bp)
    health.init_app(app)
    admin.init_app(app)
    if settings.proxy_fix:
        from werkzeug.middleware.proxy_fix import ProxyFix

        n = settings.proxy_fix
        # Flask's documented way to wrap its WSGI callable.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=n, x_proto=n,  # type: ignore[method-assign]
                                x_host=n)
    return app
