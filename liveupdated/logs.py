"""Structured logs: one JSON object a line, prefixed with its syslog priority for journald.

journald reads a leading `<N>` as the line's priority, so `journalctl -p err` works.
"""

import json
import logging
import sys
from typing import Any

import structlog
from structlog.typing import EventDict, WrappedLogger

_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2, "exception": 3}


def _render(_: WrappedLogger, method: str, event: EventDict) -> str:
    priority = _PRIORITY.get(method, 6)
    return f"<{priority}>" + json.dumps(event, default=_fallback)


def _fallback(value: Any) -> str:
    return str(value)


def configure(level: str = "info") -> None:
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(),  # epoch seconds: cheaper than ISO text
            structlog.processors.format_exc_info,
            _render,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
