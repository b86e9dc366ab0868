"""The baseline of the ingest benchmark: a bare Flask endpoint answering 200, no database.

Served by the same gunicorn configuration as the relay (`config/gunicorn.conf.py`), so the ratio
relay / bare shows what authentication, parsing and the durable commit cost.
"""

from flask import Flask, jsonify, request

app = Flask(__name__)


@app.post("/webhooks/extole/production")
def receive():  # type: ignore[no-untyped-def]
    request.get_data()
    return jsonify({"accepted": 1, "duplicates": 0, "rejected": [], "rejected_count": 0,
                    "ids": [1]}), 200


@app.get("/healthz")
def healthz():  # type: ignore[no-untyped-def]
    return jsonify({"status": "ok"})
