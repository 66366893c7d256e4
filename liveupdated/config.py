"""The daemon's configuration: command line (DESIGN.md §4) into one checked, frozen value."""

import argparse
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from liveupdated.core.orchestrator import Limits

LIMIT_DEFAULTS = Limits()


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    bus: str = "system"
    state_dir: Path = Path("/var/lib/liveupdated")
    handover_dir: Path | None = None
    backend: Literal["simulated", "kernel", "auto"] = "auto"
    reboot_action: str = "auto"
    freeze_timeout: float = 10.0
    max_sessions: int = LIMIT_DEFAULTS.max_sessions
    max_fds_per_session: int = LIMIT_DEFAULTS.max_fds_per_session
    max_sessions_per_uid: int = LIMIT_DEFAULTS.max_sessions_per_uid
    max_preserved_bytes: int = LIMIT_DEFAULTS.max_preserved_bytes
    log_level: str = "info"

    def __post_init__(self) -> None:
        """Each field of its type (an int will do for a float), the backend by name."""
        for name, hint in _HINTS.items():
            value = getattr(self, name)
            if not _fits(hint, value):
                kind = hint.__name__ if isinstance(hint, type) else hint
                raise ValueError(f"Config.{name}: {value!r} is not a {kind}")

    @property
    def handover_area(self) -> Path:
        return self.handover_dir or self.state_dir / "handover"

    @property
    def limits(self) -> Limits:
        return Limits(
            max_sessions=self.max_sessions,
            max_fds_per_session=self.max_fds_per_session,
            max_sessions_per_uid=self.max_sessions_per_uid,
            max_preserved_bytes=self.max_preserved_bytes,
        )

    def resolved_backend(self) -> Literal["simulated", "kernel"]:
        if self.backend == "auto":
            return "kernel" if os.path.exists("/dev/liveupdate") else "simulated"
        return self.backend

    def resolved_reboot_action(self) -> str:
        """`exit`, or the command that reboots the host after the handover is written."""
        if self.reboot_action != "auto":
            return self.reboot_action
        if not os.environ.get("INVOCATION_ID"):  # not started by systemd: demo, tests
            return "exit"
        if self.resolved_backend() == "kernel":
            return "systemctl kexec"
        return "systemctl reboot"


_HINTS: dict[str, Any] = typing.get_type_hints(Config)


def _fits(hint: Any, value: Any) -> bool:
    if typing.get_origin(hint) is Literal:
        return value in typing.get_args(hint)
    kinds = (int, float) if hint is float else typing.get_args(hint) or hint
    return isinstance(value, kinds) and not isinstance(value, bool)


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(
        prog="liveupdated",
        description="Carries VMM file descriptors across a kernel live update.",
    )
    p.add_argument("--bus", default="system", help="system, session or a D-Bus address")
    p.add_argument("--state-dir", type=Path, default=Path("/var/lib/liveupdated"))
    p.add_argument("--handover-dir", type=Path, default=None,
                   help="the simulated backend's handover area (default STATE_DIR/handover)")
    p.add_argument("--backend", choices=["simulated", "kernel", "auto"], default="auto")
    p.add_argument("--reboot-action", default="auto",
                   help="after Reboot(): 'exit', 'kexec' (the syscall, no shutdown), or a "
                        "command such as 'systemctl kexec' (default: exit unless run by "
                        "systemd, then systemctl reboot or kexec by backend)")
    p.add_argument("--freeze-timeout", type=float, default=10.0,
                   help="seconds Freeze waits for sessions that asked for DelayFreeze")
    p.add_argument("--max-sessions", type=int, default=LIMIT_DEFAULTS.max_sessions)
    p.add_argument("--max-fds-per-session", type=int,
                   default=LIMIT_DEFAULTS.max_fds_per_session)
    p.add_argument("--max-sessions-per-uid", type=int,
                   default=LIMIT_DEFAULTS.max_sessions_per_uid)
    p.add_argument("--max-preserved-bytes", type=int,
                   default=LIMIT_DEFAULTS.max_preserved_bytes)
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"])
    args = p.parse_args(argv)
    return Config(**{k: v for k, v in vars(args).items()})
