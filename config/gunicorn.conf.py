"""Gunicorn settings for running `gunicorn -c config/gunicorn.conf.py wsgi:app` directly.

`relay serve` applies the same values itself; use this file behind your own process manager.
Threaded workers keep the admin's server-sent event streams from starving the receiver.
"""

import os

bind = os.environ.get("RELAY_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("RELAY_WORKERS", "2"))
worker_class = "gthread"
threads = int(os.environ.get("RELAY_THREADS", "8"))
timeout = 60
graceful_timeout = 20
keepalive = 5
accesslog = None
errorlog = "-"
loglevel = "info"
limit_request_field_size = 8190
limit_request_fields = 100
logconfig = os.environ.get("RELAY_GUNICORN_LOGCONFIG") or None
