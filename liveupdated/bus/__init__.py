"""The D-Bus edge: parse, authorize, call the service, translate results and errors."""

BUS_NAME = "org.liveupdate1"
MANAGER_INTERFACE = "org.liveupdate1.Manager"
SESSION_INTERFACE = "org.liveupdate1.Session"
ERROR_PREFIX = "org.liveupdate1.Error."
MAX_FDS_PER_MESSAGE = 16  # dbus-daemon's default max_message_unix_fds: more drop the sender
