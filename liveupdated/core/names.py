"""Session names, tokens and the object paths derived from them.

Pure string rules shared by the core, the bus edge and the client; no I/O.
"""

import re

from liveupdated.core.errors import InvalidArgument

MANAGER_PATH = "/org/liveupdate1"
SESSION_PATH_PREFIX = "/org/liveupdate1/session/"
MAX_NAME_LENGTH = 63  # the kernel's 64-byte session name, with its NUL
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,63}")
_PLAIN = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")


def check_name(value: str, what: str) -> str:
    """Return `value` if it is a valid session name or token, else raise InvalidArgument."""
    if not _NAME_RE.fullmatch(value):
        raise InvalidArgument(
            f"invalid {what} {value!r}: use 1-{MAX_NAME_LENGTH} characters of [A-Za-z0-9_.-]"
        )
    return value


def escape_path_label(label: str) -> str:
    """Escape one object-path label as systemd does: `_xx` for each byte outside [A-Za-z0-9]."""
    if not label:
        return "_"
    return "".join(chr(b) if b in _PLAIN else f"_{b:02x}" for b in label.encode())


def session_path(name: str) -> str:
    return SESSION_PATH_PREFIX + escape_path_label(name)
