"""The errors of the live-update contract, one class per org.liveupdate1.Error name.

Raised by the core and the edges; only bus/errors.py turns them into D-Bus errors.
"""


class LiveUpdateError(Exception):
    """Base of all contract errors; `name` is the suffix of org.liveupdate1.Error.*."""

    name = "Failed"


class InvalidArgument(LiveUpdateError):
    name = "InvalidArgument"


class SessionExists(LiveUpdateError):
    name = "SessionExists"


class NoSuchSession(LiveUpdateError):
    name = "NoSuchSession"


class TokenExists(LiveUpdateError):
    name = "TokenExists"


class NoSuchToken(LiveUpdateError):
    name = "NoSuchToken"


class WrongState(LiveUpdateError):
    name = "WrongState"


class AccessDenied(LiveUpdateError):
    name = "AccessDenied"


class UnsupportedFd(LiveUpdateError):
    name = "UnsupportedFd"


class DependencyMissing(LiveUpdateError):
    name = "DependencyMissing"


class QuotaExceeded(LiveUpdateError):
    name = "QuotaExceeded"


class Corrupted(LiveUpdateError):
    name = "Corrupted"


class Timeout(LiveUpdateError):
    name = "Timeout"


class Storage(LiveUpdateError):
    """The daemon's disk refused a write (read-only, full, I/O error): nothing changed.
    The message names the errno; held fds stay held and RetrieveFd and Cancel still work."""

    name = "Storage"


ALL_ERRORS: tuple[type[LiveUpdateError], ...] = (
    InvalidArgument,
    SessionExists,
    NoSuchSession,
    TokenExists,
    NoSuchToken,
    WrongState,
    AccessDenied,
    UnsupportedFd,
    DependencyMissing,
    QuotaExceeded,
    Corrupted,
    Timeout,
    Storage,
)
