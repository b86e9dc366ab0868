"""The relay's own errors: one root, specific subclasses whose docstring is the default message.

Every error the relay raises on purpose derives from `RelayError`, so a caller (the command line,
an HTTP handler) can tell "the relay said no, for this reason" from a bug. The Braze client's
errors live with the client (`relay.braze`), under `BrazeError`, itself a `RelayError`; the
receiver's refusals (`relay.receiver.Refusal`) likewise. Driver errors are translated where they
are met (`relay.db.describe_error` names a database failure in one line).
"""

from __future__ import annotations


class RelayError(Exception):
    """Something went wrong in the relay."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


# --- configuration and the database -------------------------------------------------------------


class SettingsError(RelayError):
    """A setting has an invalid value."""


class EventMapError(RelayError):
    """The event map file is not valid."""


class DatabaseUnavailable(RelayError):
    """The database is unavailable; retry later."""


class MigrationError(RelayError):
    """The database schema cannot be migrated by this relay."""


# --- webhooks -----------------------------------------------------------------------------------


class AuthenticationFailed(RelayError):
    """Credentials are missing or wrong; the message is safe to return to the caller."""


class InvalidBody(RelayError):
    """The body is not JSON we can use; the message is the 400 error text."""


class RejectedEvent(RelayError):
    """This event cannot be used."""


# --- operators ----------------------------------------------------------------------------------


class FilterError(RelayError):
    """A filter parameter has an invalid value."""


class EventNotFound(RelayError):
    """No event with that id."""


class InvalidTransition(RelayError):
    """The event is not in a state that allows this."""


class TriggerNotFound(RelayError):
    """No trigger with that id."""


class DeliveryInFlight(RelayError):
    """A delivery of this person's events is still in flight; nothing was erased."""


# --- Extole's API (reconciliation) --------------------------------------------------------------


class ExtoleError(RelayError):
    """Extole's API request failed."""

    def __init__(self, message: str | None = None, *, status: int | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class ExtoleTokenRefused(ExtoleError):
    """Extole refused the API token (401/403): check EXTOLE_API_TOKEN."""


class ExtoleBadRequest(ExtoleError):
    """Extole refused a parameter of the request (400)."""


class ExtoleUnavailable(ExtoleError):
    """Extole did not answer usefully (429, 5xx, timeout or connection error) after retries."""


class ExtoleBadAnswer(ExtoleError):
    """Extole's answer is not what its API documents (not JSON, not a list of rewards)."""


class ReconcileBusy(RelayError):
    """Another reconciliation run of this environment is in progress."""
