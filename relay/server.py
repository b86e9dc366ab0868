"""`relay serve`: gunicorn with threaded workers, optionally running delivery in-process."""

from __future__ import annotations

from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication

DEFAULT_THREADS = 8


class RelayServer(BaseApplication):  # type: ignore[misc]
    """Gunicorn embedded: each worker process builds its own app after the fork."""

    def __init__(self, options: dict[str, Any], with_worker: bool = False) -> None:
        self.options = options
        self.with_worker = with_worker
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            if key in self.cfg.settings and value is not None:
                self.cfg.set(key.lower(), value)

    def load(self) -> Flask:
        from relay import create_app

        app = create_app()
        if self.with_worker:
            from relay.worker import start_in_process

            start_in_process(app)
        return app


def serve(host: str, port: int, workers: int, threads: int = DEFAULT_THREADS,
          with_worker: bool = False, extra: dict[str, Any] | None = None) -> None:
    options = {
        "bind": f"{host}:{port}",
        "workers": workers,
        "worker_class": "gthread",
        "threads": threads,
        "timeout": 60,
        "graceful_timeout": 20,
        "keepalive": 5,
        "accesslog": None,
        "errorlog": "-",
        "loglevel": "info",
        "limit_request_field_size": 8190,
        "limit_request_fields": 100,
        **(extra or {}),
    }
    RelayServer(options, with_worker=with_worker).run()
