"""The D-Bus contract's names, bounds and errors, spelled once: the daemon, the client
library, the CLI, the QEMU adapter, the tests and the docs' checks all take them from here.

Constants, the error classes and pure string functions only: no I/O and no imports, so
the pure core and every client may use it.
"""

BUS_NAME = "org.liveupdate1"
MANAGER_INTERFACE = "org.liveupdate1.Manager"
SESSION_INTERFACE = "org.liveupdate1.Session"
ERROR_PREFIX = "org.liveupdate1.Error."
MANAGER_PATH = "/org/liveupdate1"
SESSION_PATH_PREFIX = "/org/liveupdate1/session/"

MAX_NAME_LENGTH = 63  # the kernel's 64-byte session name, with its NUL
# Admission bounds: every record a call can produce stays far below the journal's frame
# bound (16 fds x 32 requires x 63 characters is about 40 KB), so no caller can write a
# frame the reader would take for damage.
MAX_REQUIRES = 32  # tokens one fd may require (a session holds at most 128 fds)
MAX_FDS_PER_CALL = 16  # dbus-daemon's default max_message_unix_fds: more drop the sender
MAX_REASON_LENGTH = 200  # DropSession's reason, kept in the journal and the log
HISTORY_KEPT = 16  # update cycles Manager.GetHistory keeps, across compaction

# org.liveupdate1.Error.<name>, one exception class each below (ALL_ERRORS).
ERRORS = (
    "InvalidArgument", "SessionExists", "NoSuchSession", "TokenExists", "NoSuchToken",
    "WrongState", "AccessDenied", "UnsupportedFd", "DependencyMissing", "QuotaExceeded",
    "Corrupted", "Timeout", "Storage",
)

# What each method fails with, besides QuotaExceeded when its connection has too many
# calls in flight (any method). docs/API.md and org.liveupdate1(5) say the same; tests
# hold both to this table, and the core's behaviour under random calls to it.
_SESSION_CHANGE = ("AccessDenied", "NoSuchSession", "WrongState", "Storage")
FAILS_WITH: dict[str, tuple[str, ...]] = {
    "Manager.CreateSession": (
        "InvalidArgument", "SessionExists", "WrongState", "QuotaExceeded", "Storage"),
    "Manager.RetrieveSession": (
        "InvalidArgument", "NoSuchSession", "AccessDenied", "WrongState"),
    "Manager.ListSessions": (),
    "Manager.Prepare": ("AccessDenied", "WrongState", "UnsupportedFd", "QuotaExceeded",
                        "Storage"),
    "Manager.Freeze": (
        "AccessDenied", "DependencyMissing", "QuotaExceeded", "Timeout", "WrongState",
        "Storage"),
    "Manager.Cancel": ("AccessDenied", "WrongState"),
    "Manager.Reboot": ("AccessDenied", "WrongState", "Storage"),
    "Manager.Finish": ("AccessDenied", "WrongState", "Storage"),
    "Manager.DropSession": (
        "AccessDenied", "InvalidArgument", "NoSuchSession", "WrongState", "Storage"),
    "Manager.ListQuarantined": (),
    "Manager.RetrieveQuarantined": ("AccessDenied", "InvalidArgument", "NoSuchToken"),
    "Manager.ReleaseQuarantined": (
        "AccessDenied", "InvalidArgument", "NoSuchToken", "Storage"),
    "Manager.GetHistory": (),
    "Manager.Check": ("AccessDenied",),
    "Session.PreserveFd": (
        "InvalidArgument", "TokenExists", "UnsupportedFd", "QuotaExceeded", *_SESSION_CHANGE),
    "Session.PreserveFds": (
        "InvalidArgument", "TokenExists", "UnsupportedFd", "QuotaExceeded", *_SESSION_CHANGE),
    "Session.UnpreserveFd": (
        "InvalidArgument", "NoSuchToken", "DependencyMissing", *_SESSION_CHANGE),
    "Session.RetrieveFd": (
        "InvalidArgument", "NoSuchToken", "Corrupted", "AccessDenied", "NoSuchSession",
        "WrongState"),
    "Session.RetrieveFds": (
        "InvalidArgument", "NoSuchToken", "Corrupted", "AccessDenied", "NoSuchSession",
        "WrongState"),
    "Session.ListFds": ("AccessDenied", "NoSuchSession"),
    "Session.FdNames": ("AccessDenied", "NoSuchSession"),
    "Session.DelayFreeze": _SESSION_CHANGE,
    "Session.ReadyForFreeze": _SESSION_CHANGE,
    "Session.Finish": _SESSION_CHANGE,
    "Session.Close": _SESSION_CHANGE,
}


# ---- object paths ---------------------------------------------------------------------

_PLAIN = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")


def escape_path_label(label: str) -> str:
    """Escape one object-path label exactly as sd_bus_path_encode() does: `_xx` (lower-case
    hex) for each byte outside [A-Za-z0-9], and for a leading digit too (`65534-probe` is
    `_365534_2dprobe`), so that a C client computes the same path; "" is `_`."""
    if not label:
        return "_"
    raw = label.encode()
    return "".join(
        chr(b) if b in _PLAIN and not (i == 0 and 0x30 <= b <= 0x39) else f"_{b:02x}"
        for i, b in enumerate(raw)
    )


def session_path(name: str) -> str:
    """The object path of session `name` (what CreateSession and RetrieveSession return)."""
    return SESSION_PATH_PREFIX + escape_path_label(name)


def session_name_of(path: str) -> str | None:
    """The session name whose object path is `path` (session_path's inverse), or None
    when `path` is no session's path as session_path spells them."""
    label = path[len(SESSION_PATH_PREFIX):] if path.startswith(SESSION_PATH_PREFIX) else ""
    raw = bytearray()
    i = 0
    while i < len(label):
        if label[i] == "_":
            digits = label[i + 1:i + 3]
            if len(digits) != 2 or digits.strip("0123456789abcdef"):
                return None
            raw.append(int(digits, 16))
            i += 3
        else:
            raw += label[i].encode()
            i += 1
    try:
        name = raw.decode()
    except UnicodeDecodeError:
        return None
    return name if name and session_path(name) == path else None


# ---- Manager.Check ----------------------------------------------------------------------

# Its items, in the order it checks and reports them, and the verdicts of each.
CHECK_ITEMS = (
    "state", "backend", "reboot-action", "kexec-kernel", "fd-kinds", "quarantine",
    "requires", "handover-room",
)
CHECK_OK = "ok"
CHECK_FAIL = "fail"  # an update would be refused: the only verdict that stops one
CHECK_WARN = "warn"
CHECK_VERDICTS = (CHECK_OK, CHECK_FAIL, CHECK_WARN)

# ---- errors -----------------------------------------------------------------------------

# An org.liveupdate1.Error.* reply's body: the message a person reads (what sd-bus,
# libdbus and dbus-fast take as the error's message), then details as data, so that no
# client parses the message. Errors of the bus itself (org.freedesktop.DBus.Error.*) keep
# the plain (s) body.
ERROR_SIGNATURE = "sa{sv}"
# Every key a details dict may have, with the D-Bus type of its value. An error carries
# the keys that apply to it (docs/API.md, "Errors", lists them per error) and never more
# than its message tells that caller: a tenant learns no other uid's or the host's usage.
ERROR_DETAILS: dict[str, str] = {
    "command": "s",  # the method that refused: Manager.<Member> or Session.<Member>
    "state": "s",  # the phase when it refused: normal, prepared, frozen or updated
    "allowed": "as",  # the phases the method is allowed in
    "under_way": "s",  # the host command under way that refused it (Prepare, Freeze, ...)
    "session": "s",  # the session the error is about
    "token": "s",  # the token the error is about (in "session")
    "id": "s",  # the quarantined fd the error is about: q<N>
    "required_by": "as",  # the tokens of "session" that require "token"
    "blocking": "as",  # the sessions that block Freeze
    "quarantined": "as",  # the quarantined fds (q<N>) that block Freeze
    "limit": "s",  # the limit reached: a daemon option (max-sessions, ...) or a bus bound
    "maximum": "t",  # that limit's value, when the caller may know it
    "uid": "u",  # the uid whose budget is reached
}

Details = dict[str, str | int | list[str]]


class LiveUpdateError(Exception):
    """Base of all contract errors; `name` is the suffix of org.liveupdate1.Error.*.
    `str(exc)` is the message; `details` the error's data (keys of ERROR_DETAILS)."""

    name = "Failed"

    def __init__(self, message: str = "", details: Details | None = None) -> None:
        super().__init__(message)
        self.details: Details = dict(details or {})


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


def method_name(command: str) -> str:
    """The qualified name (a key of FAILS_WITH) of a method named as the messages name it:
    "Prepare" is Manager.Prepare, "PreserveFd" Session.PreserveFd; the two Finishes are
    told apart by the messages ("Finish", "Session.Finish")."""
    if "." in command:
        return command
    return f"Manager.{command}" if f"Manager.{command}" in FAILS_WITH else f"Session.{command}"
