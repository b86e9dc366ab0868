"""The relay's own errors: one root, specific subclasses whose docstring is the default message."""

from __future__ import annotations


class RelayError(Exception):
    """Something went wrong in the relay."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class SettingsError(RelayError):
    """A setting has an invalid value."""


class DatabaseUnavailable(RelayError):
    """The database is unavailable; retry later."""


class MigrationError(RelayError):
    """The database schema cannot be migrated by this relay."""


class EventMapError(RelayError):
    """The event map file is not valid."""


class RejectedEvent(RelayError):
    """This event cannot be used."""


class FilterError(RelayError):
    """A filter parameter has an invalid value."""


class EventNotFound(RelayError):
    """No event with that id."""


class InvalidTransition(RelayError):
    """The event is not in a state that allows this."""
