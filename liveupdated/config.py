"""The daemon's configuration: its command line (liveupdated(8)) into one checked, frozen
value."""

import argparse
import functools
import math
import os
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from liveupdated import __version__
from liveupdated.core.orchestrator import Limits

LIMIT_DEFAULTS = Limits()
BACKENDS = ("simulated", "kernel", "fdstore", "auto")  # --backend's choices
# --backend auto takes the first of these the host can serve (resolved_backend).
AUTO_BACKEND_ORDER: tuple[Literal["simulated", "kernel", "fdstore"], ...] = (
    "fdstore", "kernel", "simulated")
# --reboot-action's named actions; anything else is a command run after the handover.
REBOOT_ACTIONS = ("auto", "exit", "kexec", "soft-reboot")


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    bus: str = "system"
    state_dir: Path = Path("/var/lib/liveupdated")
    handover_dir: Path | None = None
    backend: Literal["simulated", "kernel", "fdstore", "auto"] = "auto"
    reboot_action: str = "auto"
    freeze_timeout: float = 10.0
    # Seconds after a reboot action that did not fail, for its SIGTERM, when PID 1 shows
    # no reboot under way; then the reboot counts as failed (the daemon stays, frozen).
    reboot_timeout: float = 120.0
    max_sessions: int = LIMIT_DEFAULTS.max_sessions
    max_fds_per_session: int = LIMIT_DEFAULTS.max_fds_per_session
    max_sessions_per_uid: int = LIMIT_DEFAULTS.max_sessions_per_uid
    max_preserved_bytes: int = LIMIT_DEFAULTS.max_preserved_bytes
    max_fds_per_uid: int = LIMIT_DEFAULTS.max_fds_per_uid
    max_bytes_per_uid: int = LIMIT_DEFAULTS.max_bytes_per_uid  # 0: a quarter of the host's
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
            max_fds_per_uid=self.max_fds_per_uid,
            max_bytes_per_uid=self.max_bytes_per_uid,
        )

    def resolved_backend(self) -> Literal["simulated", "kernel", "fdstore"]:
        """`auto` by capability, not version: the fd store carried by PID 1 where it can
        (soft-reboot, or kexec on a LUO kernel), the kernel backend where /dev/liveupdate
        exists and PID 1 cannot carry it, the handover area otherwise (a private bus, an
        old systemd, not under systemd)."""
        if self.backend != "auto":
            return self.backend
        luo = os.path.exists(LUO_DEVICE)
        can = {
            "fdstore": self.bus == "system" and _pid1_carries_fds(luo),
            "kernel": luo,
            "simulated": True,
        }
        return next(b for b in AUTO_BACKEND_ORDER if can[b])

    def unserved_backend(self) -> str:
        """Why this host cannot serve the backend asked for by name, on one line; "" when
        it can (and always for `auto`, which picks one it can). Asked at start-up: a
        configuration no restart can fix is refused there, not at the first Prepare."""
        if self.backend == "kernel" and not os.path.exists(LUO_DEVICE):
            return (f"--backend kernel: no {LUO_DEVICE} on this host (boot a kernel with "
                    "CONFIG_LIVEUPDATE and liveupdate=on, or use --backend auto)")
        if self.backend == "fdstore":
            from liveupdated.systemd import under_systemd

            if not under_systemd():
                return ("--backend fdstore: not started by systemd as a service, so no "
                        "service manager carries an fd store (use --backend auto)")
            kexec = self.resolved_reboot_action() == "kexec"
            if not _pid1_carries_fds(kexec):
                since = "261 on a Live Update Orchestrator kernel" if kexec else "254"
                return ("--backend fdstore: PID 1 cannot carry this unit's fd store across "
                        f"the reboot (needs systemd >= {since} and the unit's "
                        "FileDescriptorStorePreserve=yes; use --backend auto)")
        return ""

    def resolved_reboot_action(self) -> str:
        """`exit`, `kexec`, `soft-reboot`, or the command that reboots the host after the
        handover is written. With the fdstore backend `kexec` and `soft-reboot` are asked
        of systemd over D-Bus (PID 1 holds the fds); with the kernel backend `kexec` is the
        syscall, from the process holding the sessions."""
        if self.reboot_action != "auto":
            return self.reboot_action
        if not os.environ.get("INVOCATION_ID"):  # not started by systemd: demo, tests
            return "exit"
        backend = self.resolved_backend()
        if backend == "fdstore":
            return "kexec" if os.path.exists(LUO_DEVICE) else "soft-reboot"
        if backend == "kernel":
            return "systemctl kexec"
        return "systemctl reboot"


LUO_DEVICE = "/dev/liveupdate"


@functools.cache
def _pid1_carries_fds(kexec: bool) -> bool:
    """Asked of systemd once a process: start-up and the reboot action want the same."""
    from liveupdated.systemd import under_systemd

    if not under_systemd():
        return False
    from liveupdated.backends.fdstore import pid1_carries_fds

    return pid1_carries_fds(kexec)


_HINTS: dict[str, Any] = typing.get_type_hints(Config)


def _fits(hint: Any, value: Any) -> bool:
    if typing.get_origin(hint) is Literal:
        return value in typing.get_args(hint)
    kinds = (int, float) if hint is float else typing.get_args(hint) or hint
    return isinstance(value, kinds) and not isinstance(value, bool)


SYSTEM_STATE_DIR = Path("/var/lib/liveupdated")

# One address of a `;`-separated list: `transport:key=value,...` (D-Bus spec, "Server
# Addresses"). Whether the transport and keys make sense is for the connection to say.
_ADDRESS = re.compile(r"[a-z][a-z0-9-]*:([^=,;]+=[^,;]*(,[^=,;]+=[^,;]*)*)?")


def default_state_dir(bus: str) -> Path | None:
    """The state dir of `--bus system` or `--bus session`; None for an address, which
    must be given its own: a daemon on a private bus never shares the installed
    service's journal."""
    if bus == "system":
        return SYSTEM_STATE_DIR
    if bus == "session":
        state_home = os.environ.get("XDG_STATE_HOME", "")
        if not os.path.isabs(state_home):  # unset or relative: ignored, as the spec says
            state_home = os.path.join(os.path.expanduser("~"), ".local", "state")
        return Path(state_home) / "liveupdated"
    return None


def _bus(text: str) -> str:
    addresses = [part for part in text.split(";") if part]
    if text in ("system", "session") or (
        addresses and all(_ADDRESS.fullmatch(part) for part in addresses)
    ):
        return text
    raise argparse.ArgumentTypeError(
        f"{text!r} is neither system, session nor a D-Bus address such as "
        "unix:path=/run/dbus/system_bus_socket"
    )


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: must be more than 0 seconds")
    return value


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        """One line, not the whole usage: the journal of a unit shows it as the reason."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv: list[str] | None = None) -> Config:
    """The command line into a Config; a usage error is one line and exit status 2."""
    p = _Parser(
        prog="liveupdated",
        description="Carries VMM file descriptors across a kernel live update. A session "
                    "lives with the bus connection that created it until Prepare; from "
                    "Prepare on it survives its client, and the daemon carries its fds "
                    "across the reboot.",
        epilog="exit status: 0 stopped cleanly, 2 usage, 69 no D-Bus at the address, "
               "73 the disk refused a write and no fds are held, 75 the state dir is "
               "locked by another liveupdated, org.liveupdate1 is owned by another "
               "process (or a refused write while fds are held), 78 a bad state dir, "
               "handover area or bus address, or a --backend this host cannot serve "
               "while no fds are held, 1 anything else.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--bus", type=_bus, default="system",
                   help="system, session or a D-Bus address such as unix:path=/run/x/bus "
                        "(an address needs --state-dir; default: system)")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="journal and lock (default: /var/lib/liveupdated for the system "
                        "bus, $XDG_STATE_HOME/liveupdated for the session bus)")
    p.add_argument("--handover-dir", type=Path, default=None,
                   help="the simulated backend's handover area (default STATE_DIR/handover)")
    p.add_argument("--backend", choices=list(BACKENDS),
                   default="auto",
                   help="where the fds go across the reboot: simulated (a handover area "
                        "on disk), kernel (/dev/liveupdate), fdstore (systemd carries the "
                        "unit's fd store; systemd >= 254, FileDescriptorStorePreserve=yes) "
                        "or auto (by what this host can do)")
    p.add_argument("--reboot-action", default="auto",
                   help="after Reboot(): 'exit'; 'kexec' (kernel backend: the syscall, no "
                        "shutdown; fdstore backend: systemd's KExec over D-Bus); "
                        "'soft-reboot' (systemd's SoftReboot over D-Bus: the simulated "
                        "kexec of the fdstore backend); or a command such as 'systemctl "
                        "kexec' (default: exit unless run by systemd, then by backend: "
                        "systemctl reboot, systemctl kexec, soft-reboot or kexec)")
    p.add_argument("--reboot-timeout", type=_seconds, default=120.0,
                   help="seconds the daemon waits for the reboot to stop it after a reboot "
                        "action that did not fail, when PID 1 shows no reboot under way; "
                        "then the reboot counts as failed: the daemon stays, frozen, and "
                        "signals RebootFailed (default: %(default)s)")
    p.add_argument("--freeze-timeout", type=_seconds, default=10.0,
                   help="seconds Freeze waits for sessions that asked for DelayFreeze "
                        "(default: %(default)s)")
    p.add_argument("--max-sessions", type=_at_least_one, default=LIMIT_DEFAULTS.max_sessions,
                   help="sessions in all (default: %(default)s, the kernel's limit)")
    p.add_argument("--max-fds-per-session", type=_at_least_one,
                   default=LIMIT_DEFAULTS.max_fds_per_session,
                   help="fds in one session (default: %(default)s, the kernel's limit)")
    p.add_argument("--max-sessions-per-uid", type=_at_least_one,
                   default=LIMIT_DEFAULTS.max_sessions_per_uid,
                   help="sessions of one uid other than root (default: %(default)s)")
    p.add_argument("--max-preserved-bytes", type=_at_least_one,
                   default=LIMIT_DEFAULTS.max_preserved_bytes,
                   help="bytes (apparent sizes) all sessions may hold together "
                        "(default %(default)s: 4 TiB)")
    p.add_argument("--max-fds-per-uid", type=_at_least_one,
                   default=LIMIT_DEFAULTS.max_fds_per_uid,
                   help="fds the sessions of one uid other than root may hold "
                        "(default %(default)s)")
    p.add_argument("--max-bytes-per-uid", type=_at_least_one, default=None,
                   help="bytes the sessions of one uid other than root may hold "
                        "(default: a quarter of --max-preserved-bytes)")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"],
                   help="the least severe log events written, as JSON lines on stderr "
                        "(default: %(default)s)")
    args = p.parse_args(argv)
    if args.state_dir is None:
        args.state_dir = default_state_dir(args.bus)
        if args.state_dir is None:
            p.error(f"--bus {args.bus} needs --state-dir: only the system and session "
                    "buses have a default state dir")
    if args.max_bytes_per_uid is None:
        args.max_bytes_per_uid = 0  # Limits' own default: a quarter of the host's
    return Config(**{k: v for k, v in vars(args).items()})
