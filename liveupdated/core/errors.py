"""The errors of the live-update contract, one class per org.liveupdate1.Error name.

They are defined in liveupdated/contract.py (clients raise the same classes); this is
where the daemon's parts take them from. Raised by the core and the edges; only
bus/errors.py turns them into D-Bus errors, with their details.
"""

from liveupdated.contract import (
    ALL_ERRORS,
    AccessDenied,
    Corrupted,
    DependencyMissing,
    Details,
    InvalidArgument,
    LiveUpdateError,
    NoSuchSession,
    NoSuchToken,
    QuotaExceeded,
    SessionExists,
    Storage,
    Timeout,
    TokenExists,
    UnsupportedFd,
    WrongState,
)

__all__ = [
    "ALL_ERRORS", "AccessDenied", "Corrupted", "DependencyMissing", "Details", "InvalidArgument",
    "LiveUpdateError", "NoSuchSession", "NoSuchToken", "QuotaExceeded", "SessionExists",
    "Storage", "Timeout", "TokenExists", "UnsupportedFd", "WrongState",
]
