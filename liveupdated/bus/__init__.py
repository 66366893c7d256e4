"""The D-Bus edge: parse, authorize, call the service, translate results and errors."""

from liveupdated.contract import (
    BUS_NAME,
    ERROR_PREFIX,
    MANAGER_INTERFACE,
    SESSION_INTERFACE,
)
from liveupdated.contract import MAX_FDS_PER_CALL as MAX_FDS_PER_MESSAGE

__all__ = [
    "BUS_NAME", "ERROR_PREFIX", "MANAGER_INTERFACE", "MAX_FDS_PER_MESSAGE", "SESSION_INTERFACE",
]
