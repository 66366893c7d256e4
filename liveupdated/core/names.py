"""Session names, tokens and the object paths derived from them.

Pure string rules of the core and the bus edge; no I/O. The paths themselves
(escape_path_label, session_path) are the contract's, which clients use too.
"""

import re

from liveupdated.contract import (
    MANAGER_PATH,
    MAX_FDS_PER_CALL,
    MAX_NAME_LENGTH,
    MAX_REASON_LENGTH,
    MAX_REQUIRES,
    SESSION_PATH_PREFIX,
    escape_path_label,
    session_path,
)
from liveupdated.core.errors import InvalidArgument

__all__ = [
    "MANAGER_PATH", "MAX_FDS_PER_CALL", "MAX_NAME_LENGTH", "MAX_REASON_LENGTH", "MAX_REQUIRES",
    "SESSION_PATH_PREFIX", "check_name", "check_reason", "check_session_name_for",
    "escape_path_label", "is_name", "session_path",
]

_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,63}")


def check_name(value: str, what: str) -> str:
    """Return `value` if it is a valid session name or token, else raise InvalidArgument."""
    if not _NAME_RE.fullmatch(value):
        raise InvalidArgument(
            f"invalid {what} {value!r}: use 1-{MAX_NAME_LENGTH} characters of [A-Za-z0-9_.-]"
        )
    return value


def is_name(value: str) -> bool:
    return bool(_NAME_RE.fullmatch(value))


def check_session_name_for(uid: int, admin: bool, name: str) -> str:
    """A session name `uid` may create: admins name freely, anyone else's names start
    with their uid and a dash (`1000-vm42`), so no tenant can take a name that a VMM of
    root's (or of another uid) will ask for."""
    check_name(name, "session name")
    if not admin and not name.startswith(f"{uid}-"):
        raise InvalidArgument(
            f"invalid session name {name!r}: a session of uid {uid} must be named "
            f"'{uid}-<name>' (e.g. '{uid}-vm42'); only root names sessions freely"
        )
    return name


def check_reason(reason: str) -> str:
    if len(reason) > MAX_REASON_LENGTH or not reason.isprintable():
        raise InvalidArgument(
            f"the reason must be at most {MAX_REASON_LENGTH} printable characters"
        )
    return reason
