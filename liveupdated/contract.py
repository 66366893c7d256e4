"""The D-Bus contract's names and bounds, spelled once: the daemon, the client library,
the tests and the docs' checks all take them from here.

Constants only: no I/O and no imports, so the pure core may use it too.
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

# org.liveupdate1.Error.<name>, one exception class each in liveupdated.core.errors.
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
