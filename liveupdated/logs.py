"""Structured logs: to the journal as native fields under systemd, else one JSON object a
line on stderr, prefixed with its syslog priority.

Under systemd (JOURNAL_STREAM names our stderr or stdout and the journal's socket
exists) each event is one datagram of the journal's native
protocol on /run/systemd/journal/socket: MESSAGE (a line a person reads), PRIORITY,
SESSION=, TOKEN=, PHASE= where the event has them, MESSAGE_ID= for the events the
catalog explains (packaging/liveupdated.catalog), and every other field in upper case
with a LIVEUPDATED_ prefix. So `journalctl -u liveupdated SESSION=vm-42` finds a
session's events. A datagram the journal refuses falls back to the JSON line; logging
never raises into the daemon.
"""

import json
import logging
import os
import re
import socket
import sys
from typing import Any

import structlog
from structlog.typing import EventDict, WrappedLogger

_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2, "exception": 3}
JOURNAL_SOCKET = "/run/systemd/journal/socket"

# The events the catalog explains, by structlog event name (liveupdated.catalog).
MESSAGE_IDS = {
    "update_started": "5a1c3e0b8f2d4d6c9e7a1b2c3d4e5f60",
    "update_finished": "5a1c3e0b8f2d4d6c9e7a1b2c3d4e5f61",
    "update_failed": "5a1c3e0b8f2d4d6c9e7a1b2c3d4e5f62",
    "fd_lost": "5a1c3e0b8f2d4d6c9e7a1b2c3d4e5f63",
    "fd_quarantined": "5a1c3e0b8f2d4d6c9e7a1b2c3d4e5f64",
}
# What marks each of them among the daemon's events: a phase change names the update's
# start and end, a failed reboot its failure.
_PHASE_EVENTS = {("normal", "prepared"): "update_started",
                 ("updated", "normal"): "update_finished"}
_FAILED_EVENTS = frozenset({"reboot_failed", "reboot_action_failed", "reboot_interrupted"})
_FIELDS = {"session": "SESSION", "token": "TOKEN", "phase": "PHASE"}
_KEY = re.compile(r"[^A-Z0-9_]")


def message_id_of(event: EventDict) -> str | None:
    name = str(event.get("event", ""))
    if name in MESSAGE_IDS:
        return MESSAGE_IDS[name]
    if name in _FAILED_EVENTS:
        return MESSAGE_IDS["update_failed"]
    changed = _PHASE_EVENTS.get((str(event.get("old", "")), str(event.get("new", ""))))
    return MESSAGE_IDS[changed] if changed else None


def _readable(event: EventDict) -> str:
    """`fd lost: session=vm-42 token=ram (hint)`: the event's name as words, then its
    fields."""
    name = str(event.get("event", "")).replace("_", " ")
    rest = {k: v for k, v in event.items()
            if k not in ("event", "level", "timestamp", "exc_info", "hint", "exception")}
    text = name + (": " + " ".join(f"{k}={v}" for k, v in rest.items()) if rest else "")
    if "hint" in event:
        text += f" ({event['hint']})"
    return text


def journal_fields(priority: int, event: EventDict) -> bytes:
    """One datagram of the native protocol: KEY=value lines; a value with a newline is
    sent as KEY, a newline, its length (64-bit little endian) and its bytes."""
    fields: dict[str, str] = {
        "MESSAGE": _readable(event), "PRIORITY": str(priority),
        "SYSLOG_IDENTIFIER": "liveupdated",
    }
    message_id = message_id_of(event)
    if message_id:
        fields["MESSAGE_ID"] = message_id
    for key, value in event.items():
        if key in ("level", "timestamp"):
            continue
        name = _FIELDS.get(key) or "LIVEUPDATED_" + _KEY.sub("_", key.upper())
        fields[name] = str(value)
    if "new" in event and "PHASE" not in fields:
        fields["PHASE"] = str(event["new"])
    out = bytearray()
    for key, value in fields.items():
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + len(data).to_bytes(8, "little") + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


def stream_is_journal(stream: Any) -> bool:
    """JOURNAL_STREAM (`dev:ino`) names this stream: systemd connected it to the journal."""
    said = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return said == f"{st.st_dev}:{st.st_ino}"


def to_the_journal(socket_path: str = JOURNAL_SOCKET) -> bool:
    if not os.path.exists(socket_path):
        return False
    # Not INVOCATION_ID alone: a process a unit starts with its output elsewhere (a test
    # run's daemon writing to a file) keeps writing there.
    return stream_is_journal(sys.stderr) or stream_is_journal(sys.stdout)


class JournalLogger:
    """structlog's logger: a datagram to the journal, the JSON line if that fails."""

    def __init__(self, socket_path: str = JOURNAL_SOCKET) -> None:
        self._path = socket_path
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def msg(self, payload: tuple[int, EventDict, str]) -> None:
        priority, event, line = payload
        try:
            self._socket.sendto(journal_fields(priority, event), self._path)
        except OSError:
            print(line, file=sys.stderr, flush=True)

    log = debug = info = warning = warn = error = critical = exception = fatal = failure = msg


def _render(_: WrappedLogger, method: str, event: EventDict) -> str:
    priority = _PRIORITY.get(method, 6)
    return f"<{priority}>" + json.dumps(event, default=_fallback)


def _render_both(_: WrappedLogger, method: str, event: EventDict) -> Any:
    """(args, kwargs) for JournalLogger.msg: the fields and the JSON line to fall back on."""
    priority = _PRIORITY.get(method, 6)
    line = f"<{priority}>" + json.dumps(event, default=_fallback)
    return ((priority, event, line),), {}


def _fallback(value: Any) -> str:
    return str(value)


_SINKS: dict[str, JournalLogger] = {}  # one socket a journal, for the process's life


def _sink(path: str) -> JournalLogger:
    if path not in _SINKS:
        _SINKS[path] = JournalLogger(path)
    return _SINKS[path]


def configure(level: str = "info", journal: str | None = None) -> None:
    """`journal`: the journal's socket to send to; None: decide by the environment."""
    native = journal is not None or to_the_journal()
    sink = _sink(journal or JOURNAL_SOCKET) if native else None
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(),  # epoch seconds: cheaper than ISO text
            structlog.processors.format_exc_info,
            _render_both if native else _render,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=(
            (lambda *_: sink) if sink is not None else structlog.PrintLoggerFactory(sys.stderr)
        ),
        cache_logger_on_first_use=True,
    )
