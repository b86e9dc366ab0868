"""The outbox: every Extole event on its way to Braze, and the only code that writes its status.

One module per audience, each imported by name (`from relay.outbox import leases`):

- `ingest`: the receiver stores a webhook's events with its inbound log row, in one transaction;
- `leases`: the delivery worker claims due events under a lease and marks what Braze answered;
- `operator`: retry, replay and bulk replay, from the admin page, its API and `relay events`;
- `queries`: read-only lists, details and counts for the admin, the metrics and the command line;
- `filters`: `EventFilter`, the one filter those share.
"""
