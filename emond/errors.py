"""What emond refuses or cannot do, in the domain's words: no HTTP here.

Models, decoders, engines and the storage access layer raise these; the API
answers them at its edge (``emond.api.http.ERROR_ANSWERS``: one table of status,
body and headers per class). Each carries the message the client reads,
emoncms's words where emoncms has them, and what else the answer needs
(the seconds to wait, the feeds that do not exist).
"""

from __future__ import annotations

from typing import Sequence


class EmondError(Exception):
    """A request emond refuses or cannot serve now; ``message`` is the client's."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Invalid(EmondError):
    """The request is malformed, or names what the caller cannot use (emoncms answers a
    missing feed or input this way too: ``Feed does not exist``)."""


class UnknownFeeds(Invalid):
    """A data request naming feeds that do not exist; emoncms lists them (``feeds``)."""

    def __init__(self, message: str, feeds: Sequence[int]) -> None:
        super().__init__(message)
        self.feeds = list(feeds)


class Unauthenticated(EmondError):
    """The route needs a caller, and none is known."""


class InvalidApiKey(Unauthenticated):
    """An API key was given and is nobody's."""

    def __init__(self) -> None:
        super().__init__("Invalid API key")


class Forbidden(EmondError):
    """The caller is known and may not do this."""


class LimitReached(EmondError):
    """A per-user quota is full (feeds per user): nothing more until some are deleted."""


class NotFound(EmondError):
    """What the request names does not exist (a route, a user)."""


class TooLarge(EmondError):
    """The request carries more than one request may (values, frames, bytes)."""


class TooMany(EmondError):
    """Too many requests or attempts: try again after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Failed(EmondError):
    """A step that should have worked did not (an engine could not create a feed's files)."""


class Unavailable(EmondError):
    """A part the request needs cannot serve it now (starting, a storage server not
    connected or busy)."""


class TimedOut(EmondError):
    """A part the request needs did not answer in time (a storage server's read)."""


__all__ = [
    "EmondError", "Invalid", "UnknownFeeds", "Unauthenticated", "InvalidApiKey", "Forbidden", "LimitReached",
    "NotFound", "TooLarge", "TooMany", "Failed", "Unavailable", "TimedOut",
]
