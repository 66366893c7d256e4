"""liveupdatectl: the operator's and the shell VMM's command line.

Every failure is one line on stderr and one of the exit statuses below (also in
`liveupdatectl --help` and liveupdatectl(1)); none prints a traceback.
"""

import argparse
import asyncio
import contextlib
import errno
import fcntl
import io
import json
import logging
import os
import shutil
import signal
import sys
import textwrap
import time
import typing
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from liveupdated import __version__
from liveupdated.client import (
    BusError,
    Client,
    Corrupted,
    LiveUpdateError,
    SessionClient,
    TokenExists,
    WrongState,
)
from liveupdated.config import _bus as _bus_spec
from liveupdated.contract import (
    BUS_NAME,
    CHECK_FAIL,
    MANAGER_INTERFACE,
    MANAGER_PATH,
    SESSION_INTERFACE,
    session_path,
)
from liveupdated.demo import MAX_SIZE, MIN_SIZE, parse_size
from liveupdated.durable import describe

EXIT_OK = 0
EXIT_REFUSED = 1  # the daemon refused the call; its error on one line
EXIT_USAGE = 2  # bad command line, or an fd not inherited from the caller
EXIT_UNREACHABLE = 3  # no bus, or no daemon on it, or the connection was lost
EXIT_VERIFY = 4  # the demo's verification failed
EXIT_PREFLIGHT = 5  # update/check: the preflight failed; nothing changed
EXIT_CANCELLED = 6  # update: a step failed, Cancel succeeded: back to normal
EXIT_CANCEL_FAILED = 7  # update: a step failed and Cancel failed too
EXIT_NO_REBOOT = 8  # update: the handover is written but no reboot followed
EXIT_WAIT_TIMEOUT = 9  # finish --wait: not every session had its fds back; no Finish
EXIT_SOFTWARE = 70  # an unexpected failure of liveupdatectl itself (a bug: please report)
EXIT_CANNOT_EXEC = 126  # retrieve --exec: the command was found but could not be run
EXIT_NOT_FOUND = 127  # retrieve --exec: no such command
EXIT_INTERRUPTED = 130  # SIGINT (Ctrl-C) or SIGTERM (128 + SIGINT, for both)

EXIT_STATUSES = """\
exit status:
  0    success
  1    the daemon refused the call (its error on one line)
  2    usage: a bad argument, or an fd that was not inherited from the caller
  3    the bus or the daemon cannot be reached, or the connection was lost
  4    demo: the memfd that came back differs from the one handed over
  5    update, check: the preflight failed; nothing was changed
  6    update: a step failed and Cancel brought the host back to normal
  7    update: a step failed and Cancel failed too (see status)
  8    update: the handover was written but the reboot did not follow
  9    finish --wait: not every session had its fds back in time; Finish not called
  70   an unexpected failure of liveupdatectl itself
  126  retrieve --exec: the command could not be run
  127  retrieve --exec: the command was not found
  130  interrupted (Ctrl-C or SIGTERM); preserve: the session it held is dropped
"""

SESSION_LIFETIME = """\
A session lives with the bus connection that created it until Prepare: if that
connection closes first, the daemon drops the session and its fds. `preserve` that
creates a session therefore keeps running, holding the session, until the update is
prepared (then the session survives its creator); run it in the background, e.g.
  liveupdatectl preserve vm-42 guest-ram 3 3<>/proc/$VMM_PID/fd/7 &
"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written (they hold lists and examples)."""


def _fill(*paragraphs: str) -> str:
    """Paragraphs wrapped for --help; one that ends in a newline is kept as written."""
    return "\n".join(p if p.endswith("\n") else textwrap.fill(p, 79) + "\n"
                     for p in paragraphs)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        """One line, not the whole usage."""
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


class UsageError(Exception):
    """A command line that parses but cannot be carried out: one line, exit 2."""


def _fd_number(text: str) -> int:
    try:
        fd = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an fd number") from None
    if fd < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: an fd number is 0 or more")
    return fd


def _size(text: str) -> int:
    try:
        size = parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size: a number of bytes with an optional K, M, G or T "
            "suffix, e.g. 512M"
        ) from None
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise argparse.ArgumentTypeError(f"{text!r}: the size must be from 4K to 1T")
    return size


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < 1e9:
        raise argparse.ArgumentTypeError(f"{text!r}: must be more than 0 seconds")
    return value


DEFAULT_STEP = 120.0  # update --timeout: Prepare's brownout copy may take a while
DEFAULT_REBOOT = 120.0  # update --reboot-timeout
DEFAULT_WAIT = 300.0  # finish --wait --timeout


def _parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument(
        "--bus", type=_bus_spec, default=argparse.SUPPRESS, metavar="BUS",
        help="system, session or a D-Bus address such as unix:path=/run/x/bus "
             "(default: system)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print the result as one line of JSON")
    p = _Parser(
        prog="liveupdatectl", formatter_class=_Formatter, parents=[common],
        description=_fill("Drive liveupdated, the daemon that carries VMM file "
                          "descriptors across a kernel live update.", SESSION_LIFETIME),
        epilog=EXIT_STATUSES,
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           parser_class=_Parser)

    def command(name: str, text: str, *description: str, bus: bool = True,
                ) -> argparse.ArgumentParser:
        return sub.add_parser(
            name, help=text,
            description=_fill(*(description or [text[0].upper() + text[1:] + "."])),
            formatter_class=_Formatter, parents=[common] if bus else [],
            epilog=EXIT_STATUSES,
        )

    command("status", "the state of the update and of the daemon, with counts")
    command("list", "the sessions you may see and their fds")
    command("history", "the last update cycles, phase by phase",
            "The last 16 update cycles, oldest first (the one under way last): when each "
            "phase began, how long the blackout lasted and where its time went, how many "
            "fds were carried, retrieved, lost or corrupted, who asked, and the outcome.")
    command("prepare", "start the update: Prepare() (root)",
            "Prepare(): the sessions survive their creators from now on; no new session "
            "or fd is taken (root).")
    command("freeze", "Freeze(): the barrier, then the blackout (root)",
            "Freeze(): waits for the sessions that asked for DelayFreeze, checks every "
            "session's dependencies and budgets; the VMs' blackout starts (root).")
    command("cancel", "Cancel(): back to normal from prepared or frozen (root)")
    command("reboot", "Reboot(): write the handover, then the daemon reboots (root)",
            "Reboot(): replies once the handover is written; the daemon then runs its "
            "reboot action (a soft-reboot, kexec, a reboot command, or its own exit with "
            "--reboot-action exit). The state stays frozen until the new boot; if the "
            "action fails or no reboot follows, the daemon says RebootFailed and stays "
            "frozen with the handover kept: reboot again, or cancel. `liveupdatectl "
            "update` waits for that outcome (root).")
    _update_commands(command)
    _more_commands(command)
    _host_tools(command, sub, common)
    return p


def _update_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    fin = command(
        "finish", "Finish(): end the update on the new boot (root)",
        "Finish(): on the new boot, releases every fd not retrieved; state normal (root). "
        "With --wait it first waits until every session has its fds back (each session "
        "finished, or every fd carried retrieved), at most --timeout seconds; when the "
        "wait times out it exits 9 and Finish is not called.")
    fin.add_argument("--wait", action="store_true",
                     help="wait until every session has its fds back before Finish")
    fin.add_argument("--timeout", type=_seconds, default=DEFAULT_WAIT, metavar="SECONDS",
                     help=f"how long --wait waits (default: {DEFAULT_WAIT:g})")
    upd = command(
        "update", "the whole update: check, prepare, freeze, reboot (root)",
        "The preflight (as `check`), then Prepare, Freeze and Reboot, each but Reboot "
        "bounded by --timeout. A step that fails is followed by Cancel (retried while the "
        "step is still under way), and the reason is one line. After Reboot's reply it "
        "waits until the daemon goes (the reboot is under way: exit 0) or says the "
        "reboot failed (RebootFailed: exit 8). Exit 5: the preflight failed and nothing "
        "changed; 6: a step failed and Cancel brought the host back to normal; 7: "
        "Cancel failed too.")
    upd.add_argument("--timeout", type=_seconds, default=DEFAULT_STEP, metavar="SECONDS",
                     help=f"bound of each of Prepare and Freeze, and of the Cancel after a "
                          f"failure (default: {DEFAULT_STEP:g})")
    upd.add_argument("--reboot-timeout", type=_seconds, default=DEFAULT_REBOOT,
                     metavar="SECONDS",
                     help="how long to wait after Reboot's reply for the daemon to go "
                          f"before exit 8 (default: {DEFAULT_REBOOT:g})")
    command("check", "the preflight of an update alone: changes nothing (root)",
            "Manager.Check(): the backend and reboot action that will run, a kexec kernel "
            "loaded when the reboot action is kexec, every fd of a kind the backend "
            "carries, no quarantined fd, every requires met, room for the handover. One "
            "line per item (ok, warn, fail); exit 5 when an item failed. Changes nothing.")


def _host_tools(command: Callable[..., argparse.ArgumentParser], sub: Any,
                common: argparse.ArgumentParser) -> None:
    show = command(
        "show", "properties as NAME=VALUE, like systemctl show",
        "The Manager's properties (or SESSION's) as NAME=VALUE lines, like systemctl "
        "show; -p picks some, --value prints the values alone.")
    show.add_argument("session", nargs="?", metavar="SESSION",
                      help="a session's properties instead of the Manager's")
    show.add_argument("-p", "--property", action="append", default=[], metavar="NAME",
                      help="only this property (repeat it, or NAME,NAME)")
    show.add_argument("--value", action="store_true",
                      help="print the values alone, one a line")
    drop = command("drop-session", "DropSession(): drop a session and its fds (root)",
                   "DropSession(): drop SESSION and every fd it holds, in state normal or "
                   "prepared (a session that blocks Freeze, say); logged with who and why "
                   "(root).")
    drop.add_argument("session", metavar="SESSION", help="session name")
    drop.add_argument("--reason", default="", metavar="TEXT",
                      help="why, kept in the journal and the log (at most 200 characters)")
    delay = command("delay-freeze", "DelayFreeze(): Freeze waits for SESSION's ReadyForFreeze",
                    "DelayFreeze(true) of a session the caller's uid holds (normal only): "
                    "Freeze then waits for its ready-for-freeze, at most the daemon's "
                    "--freeze-timeout. --off takes it back.")
    delay.add_argument("session", metavar="SESSION", help="session name")
    delay.add_argument("--off", action="store_true", help="DelayFreeze(false)")
    ready = command("ready-for-freeze", "ReadyForFreeze(): SESSION is ready (prepared only)")
    ready.add_argument("session", metavar="SESSION", help="session name")
    quar = command(
        "quarantine", "list, retrieve or release quarantined fds",
        "Fds the journal could not explain after a crash or damage, each under an id "
        "q<N>. `list` shows them (root: all); `retrieve ID --exec CMD` runs CMD with a "
        "dup of one as fd 3 to salvage it (root); `release ID` lets it go, the only way "
        "one is closed (root).")
    quar.add_argument("action", choices=["list", "retrieve", "release"], metavar="ACTION",
                      help="list, retrieve or release")
    quar.add_argument("id", nargs="?", metavar="ID",
                      help="the quarantined fd's id, q<N> as list shows it (retrieve, release)")
    quar.add_argument("--exec", dest="exec_", nargs=argparse.REMAINDER, default=None,
                      metavar="CMD", help="retrieve: the command to run with the fd as fd 3")
    names = sub.add_parser("complete-names", parents=[common], add_help=False,
                           description="Names for shell completion, one a line.")
    names.add_argument("what", choices=["sessions", "tokens", "quarantine"],
                       help="sessions, a session's tokens, or quarantined fds' ids")
    names.add_argument("session", nargs="?", help="the session, for tokens")


def _more_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    pre = command(
        "preserve", "hand over an inherited fd (a memfd); holds a new session until Prepare",
        "Hand over an fd inherited from the caller, e.g. a VMM's memfd opened by the shell "
        "with 3<>/proc/PID/fd/N, under TOKEN in SESSION. The session is created if it "
        "does not exist.", SESSION_LIFETIME, "It prints a line saying so and "
        "exits 0 once the update is prepared; Ctrl-C (or SIGTERM) before that drops the "
        "session and its fds and exits 130. Into a session that exists already it "
        "returns at once.",
    )
    pre.add_argument("session", metavar="SESSION",
                     help="session name: 1-63 of [A-Za-z0-9_.-]; not root: UID-NAME")
    pre.add_argument("token", metavar="TOKEN", help="the fd's name in the session")
    pre.add_argument("fd", type=_fd_number, metavar="FD",
                     help="an fd number this command inherited, e.g. 3 with 3<>FILE")
    pre.add_argument("--requires", default="", metavar="TOKENS",
                     help="comma-separated tokens of the same session this fd needs "
                          "restored first (default: none)")
    unp = command("unpreserve", "give a preserved fd back up: UnpreserveFd() (normal only)")
    unp.add_argument("session", metavar="SESSION", help="session name")
    unp.add_argument("token", metavar="TOKEN", help="the fd's token")
    ret = command(
        "retrieve", "get an fd back and run CMD with it as fd 3",
        "Get the fd preserved under TOKEN back (on the new boot: the restored fd; before "
        "the update: a copy of the held one) and exec CMD with it as fd 3, with "
        "LISTEN_FDS=1, LISTEN_PID and LISTEN_FDNAMES=TOKEN set as systemd sets them.",
    )
    ret.add_argument("session", metavar="SESSION", help="session name")
    ret.add_argument("token", metavar="TOKEN", help="the fd's token")
    ret.add_argument("--exec", dest="exec_", nargs=argparse.REMAINDER, required=True,
                     metavar="CMD",
                     help="the command and its arguments: everything after --exec")
    demo = command(
        "demo", "a whole update on a private bus of its own, with a timeline",
        "A whole update on a private bus and state dir of its own (no installed daemon "
        "is involved): a VMM hands over a sparse memfd, the host prepares, freezes and "
        "reboots (simulated), a new daemon starts and the VMM gets the memfd back, "
        "checked byte for byte. Exits 4 if it differs.", bus=False,
    )
    demo.add_argument("--size", type=_size, default="1G", metavar="SIZE",
                      help="guest memory size, 4K to 1T, with K, M, G or T (default: 1G)")
    demo.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                      help="print the report as one line of JSON")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _print_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> None:
    cells = [list(map(str, header)), *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


class Interrupted(Exception):
    """SIGINT or SIGTERM came while a command waited."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Disconnected(Exception):
    """The bus connection went away while a command waited."""


def inherited_fds() -> frozenset[int]:
    """The fds open now, at the start of main(): those the caller passed. Only these may
    be preserved: a number the caller did not open would name one of liveupdatectl's own
    (its event loop's, its bus socket) once they exist."""
    names = os.listdir("/proc/self/fd")  # its own directory fd is listed, then closed
    fds = set()
    for name in names:
        fd = int(name)
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, fcntl.F_GETFD)
            fds.add(fd)
    return frozenset(fds)


async def _status(client: Client, as_json: bool) -> None:
    props = await client.properties()
    # One blackout: Freeze to the last fd back (GetHistory). LastBlackoutUSec ends when the
    # new daemon found the handover, before any VM had its memory: `show` still has it.
    props.pop("LastBlackoutUSec", None)
    sessions = await client.list_sessions()
    props["Sessions"] = len(sessions)
    props["Fds"] = sum(s.fd_count for s in sessions)
    history = await client.get_history()
    props["LastUpdate"] = {**history[-1], **_phases(history[-1])} if history else None
    if as_json:
        print(json.dumps(props))
        return
    for key in ("State", "Backend", "Version", "BootId", "Sessions", "Fds"):
        print(f"{key + ':':18} {props[key]}")
    if history:
        blackout = _phases(history[-1])["blackout_ms"]
        print(f"{'Last blackout:':18} "
              f"{'-' if blackout is None else f'{blackout} ms'} (Freeze to the last fd back)")
        print("Last update:")
        await _history(client, as_json=False, last_only=True)


def _phases(cycle: dict[str, Any]) -> dict[str, int | None]:
    """Milliseconds of each phase of a cycle (None: not reached), in order."""
    def span(start: str, end: str) -> int | None:
        a, b = cycle[start], cycle[end]
        return (b - a) // 1000 if a and b and b >= a else None

    last = "last_fd_usec" if cycle["last_fd_usec"] else "rebooted_usec"
    return {
        "brownout_ms": span("started_usec", "frozen_usec"),
        "freeze_to_reboot_ms": span("frozen_usec", "reboot_usec"),
        "handover_ms": span("reboot_usec", "handover_written_usec"),
        "kexec_and_start_ms": span("handover_written_usec", "rebooted_usec"),
        "first_fd_ms": span("rebooted_usec", "first_fd_usec"),
        "last_fd_ms": span("rebooted_usec", "last_fd_usec"),
        "blackout_ms": span("frozen_usec", last),
    }


def _when(usec: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(usec / 1e6)) if usec else "-"


async def _history(client: Client, as_json: bool, last_only: bool = False) -> None:
    cycles = await client.get_history()
    if last_only:
        cycles = cycles[-1:]
    if as_json:
        print(json.dumps([{**c, **_phases(c)} for c in cycles]))
        return
    if not cycles:
        print("no update yet")
        return
    rows = []
    for c in cycles:
        p = _phases(c)
        rows.append([
            _when(c["started_usec"]), c["outcome"],
            *("-" if p[k] is None else p[k] for k in (
                "blackout_ms", "handover_ms", "kexec_and_start_ms", "first_fd_ms",
                "last_fd_ms")),
            f"{c['fds_retrieved']}/{c['fds_carried']}", c["fds_lost"] + c["fds_corrupted"],
            c.get("reboots_failed", 0),
            c["prepared_by"] if c["prepared_by"] >= 0 else "-",
        ])
    _print_table(rows, ["STARTED", "OUTCOME", "BLACKOUT_MS", "HANDOVER_MS", "KEXEC+START_MS",
                        "FIRST_FD_MS", "LAST_FD_MS", "FDS_BACK", "LOST", "REBOOTS_FAILED",
                        "BY_UID"])
    # What recovery decided and why reboots failed, by cycle: the table has no room for it.
    for c in cycles:
        for note in c.get("notes", []):
            print(f"{_when(c['started_usec'])}: {note}")


async def _list(client: Client, as_json: bool) -> None:
    out = []
    for info in await client.list_sessions():
        fds = await SessionClient(client, info.name, info.path).list_fds()
        out.append({**info.__dict__, "fds": [f.__dict__ for f in fds]})
    if as_json:
        print(json.dumps(out))
        return
    rows = [
        [s["name"], s["owner"], s["state"], f["token"], f["kind"], ",".join(f["requires"]),
         f["size"]]
        for s in out
        for f in (s["fds"] or [{"token": "-", "kind": "-", "requires": [], "size": "-"}])
    ]
    _print_table(rows, ["SESSION", "OWNER", "STATE", "TOKEN", "TYPE", "REQUIRES", "BYTES"])


async def _preserve(client: Client, args: argparse.Namespace) -> None:
    requires = [t for t in args.requires.split(",") if t]
    created = False
    try:
        session = await client.create_session(args.session)
        created = True
    except LiveUpdateError as exc:
        if exc.name != "SessionExists":
            raise
        session = SessionClient(client, args.session, session_path(args.session))
    await session.preserve_fd(args.token, args.fd, requires)
    _say(args, {"session": args.session, "token": args.token, "preserved": True})
    if created:
        def holding() -> None:
            print(f"liveupdatectl: holding session {args.session} until the update is "
                  "prepared (it is dropped with its fds if this command stops before)",
                  file=sys.stderr, flush=True)

        try:
            await _wait_until_not_normal(client, holding)
        except Interrupted:
            print(f"liveupdatectl: interrupted before Prepare: session {args.session} is "
                  "dropped with its fds", file=sys.stderr)
            raise
        except Disconnected:
            print(f"liveupdatectl: lost the bus connection before Prepare: session "
                  f"{args.session} is dropped with its fds", file=sys.stderr)
            raise


async def _wait_until_not_normal(client: Client, waiting: Callable[[], None]) -> None:
    """Until the state leaves normal; Interrupted on SIGINT/SIGTERM, Disconnected if the
    bus connection goes away. `waiting()` once the signals are handled here."""
    loop = asyncio.get_running_loop()
    changed = asyncio.Event()
    stop: asyncio.Future[int] = loop.create_future()

    def on_signal(msg: Any) -> bool:
        if getattr(msg, "member", None) == "StateChanged":
            changed.set()
        return False

    def on_stop(signum: int) -> None:
        if not stop.done():
            stop.set_result(signum)

    client.bus.add_message_handler(on_signal)
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_stop, signum)
    gone: asyncio.Future[Any] = asyncio.ensure_future(
        client.bus.wait_for_disconnect()  # type: ignore[no-untyped-call]
    )
    try:
        await client.add_match(
            "type='signal',interface='org.liveupdate1.Manager',member='StateChanged'"
        )
        waiting()
        while await client.state() == "normal":
            waiter: asyncio.Future[Any] = asyncio.ensure_future(changed.wait())
            either: set[asyncio.Future[Any]] = {waiter, stop, gone}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if stop.done():
                raise Interrupted(stop.result())
            if gone.done():
                raise Disconnected()
            changed.clear()
    finally:
        gone.cancel()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def _command_path(program: str) -> str:
    """CMD's path as execvp would find it; UsageError-like failures as exit codes."""
    found = shutil.which(program) if "/" not in program else program
    if found is None or not os.path.exists(found):
        raise CommandError(EXIT_NOT_FOUND, f"retrieve --exec: {program}: command not found")
    if os.path.isdir(found) or not os.access(found, os.X_OK):
        raise CommandError(EXIT_CANNOT_EXEC, f"retrieve --exec: {program}: not an "
                                             "executable file")
    return found


class CommandError(Exception):
    """Fails the command with `status` and the one line `message`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Exec:
    """retrieve --exec: run `program` with `fd` as fd 3, once the event loop is gone (its
    own fds, the epoll one among them, may be fd 3: dup2 over it inside the loop broke
    the loop's shutdown when the exec then failed)."""

    program: str
    argv: list[str]
    fd: int
    token: str

    def run(self) -> typing.NoReturn:
        os.dup2(self.fd, 3, inheritable=True)
        if self.fd != 3:
            os.close(self.fd)
        os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()),
                          LISTEN_FDNAMES=self.token)
        with contextlib.suppress(OSError):
            sys.stdout.flush()
        try:
            os.execv(self.program, self.argv)
        except OSError as exc:
            raise CommandError(
                EXIT_CANNOT_EXEC, f"retrieve --exec: {self.argv[0]}: "
                f"{exc.strerror or exc}") from None


async def _retrieve(client: Client, args: argparse.Namespace) -> Exec:
    if await client.state() == "updated":
        session = await client.retrieve_session(args.session)
    else:
        session = SessionClient(client, args.session, session_path(args.session))
    fd = await session.retrieve_fd(args.token)
    return Exec(args.program, args.exec_, fd, args.token)


def _say(args: argparse.Namespace, result: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(result))


def _explain(args: argparse.Namespace, exc: LiveUpdateError) -> str:
    """The daemon's refusal in the terms of the command the user ran: its message names
    the D-Bus method that refused and the method to call; its details (the method, the
    state, the session and token) say them as data, so they are said here again as the
    command and the liveupdatectl command to run."""
    text = _one_line(str(exc))
    details = exc.details
    command = args.command if args.command != "update" else ""
    method = str(details.get("command", "")).rsplit(".", 1)[-1]
    allowed, state = details.get("allowed"), details.get("state")
    if (isinstance(exc, WrongState) and isinstance(allowed, list) and command and method
            and method.lower() != command):
        text = f"{command} is allowed in state {' or '.join(allowed)}, not {state}"
    session, token = details.get("session"), details.get("token")
    unpreserve = f"`liveupdatectl unpreserve {session} {token}`"
    if isinstance(exc, TokenExists) and session is not None and token is not None:
        text = f"session {session!r} already holds token {token!r}; {unpreserve} first"
    elif (isinstance(exc, Corrupted) and state == "normal" and session is not None
          and token is not None):  # outside normal its message says what to do already
        text = (f"the journal record of {session}/{token} failed its checksum; the fd is "
                f"held but never handed out: {unpreserve}, then preserve it again")
    return f"{exc.name}: {text}"


# ---- the preflight, the update and the end of it ---------------------------------------

CheckItem = tuple[str, str, str]  # Manager.Check's (item, verdict, detail)


def _check_passed(items: Iterable[CheckItem]) -> bool:
    """Nothing failed (a warning does not stop an update)."""
    return all(verdict != CHECK_FAIL for _, verdict, _ in items)


def _check_failures(items: Iterable[CheckItem]) -> str:
    """The failed items on one line."""
    return "; ".join(f"{item}: {detail}" for item, verdict, detail in items
                     if verdict == CHECK_FAIL)


async def _check_items(client: Client) -> list[CheckItem]:
    (rows,) = await client.call(MANAGER_PATH, MANAGER_INTERFACE, "Check")
    return [(str(item), str(verdict), str(detail)) for item, verdict, detail in rows]


def _print_check(items: Sequence[CheckItem], as_json: bool) -> None:
    if as_json:
        print(json.dumps([{"item": i, "verdict": v, "detail": d} for i, v, d in items]))
        return
    _print_table([(i, v, d) for i, v, d in items], ["ITEM", "VERDICT", "DETAIL"])


async def _check(client: Client, args: argparse.Namespace) -> int:
    items = await _check_items(client)
    _print_check(items, args.json)
    return EXIT_OK if _check_passed(items) else EXIT_PREFLIGHT


def _progress(args: argparse.Namespace, step: str, text: str) -> None:
    """One line a step; with --json the steps are in the final line instead."""
    args.steps.append({"step": step, "outcome": text})
    if not args.json:
        print(f"{step}: {text}", flush=True)


class StepFailed(Exception):
    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"{step} failed: {reason}")
        self.step = step
        self.reason = reason


async def _step(args: argparse.Namespace, name: str,
                call: Callable[[], Awaitable[None]], seconds: float | None) -> None:
    try:
        async with asyncio.timeout(seconds):
            await call()
    except TimeoutError:
        raise StepFailed(name, f"no reply within {seconds:g}s (--timeout)") from None
    except LiveUpdateError as exc:
        raise StepFailed(name, _explain(args, exc)) from None
    except BusError as exc:
        raise StepFailed(name, _bus_error_text(exc, args.bus)) from None


async def _cancel_after_failure(client: Client, seconds: float) -> str:
    """Cancel, retried while the failed step is still under way (Cancel says WrongState
    naming it); "" once the state is normal, else why it could not be."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    pause = 0.05
    while True:
        try:
            async with asyncio.timeout(max(0.0, deadline - loop.time())):
                await client.cancel()
            return ""
        except WrongState as exc:
            if await client.state() == "normal" and "under_way" not in exc.details:
                return ""  # the step undid itself (Prepare's backend refused)
            last = f"{exc.name}: {_one_line(str(exc))}"
        except TimeoutError:
            return f"no reply to Cancel within {seconds:g}s"
        except LiveUpdateError as exc:
            return f"{exc.name}: {_one_line(str(exc))}"
        if loop.time() + pause >= deadline:
            return f"{last} (still, after {seconds:g}s)"
        await asyncio.sleep(pause)  # a retry while the step ends: no event says when
        pause = min(pause * 2, 1.0)


async def _watch_reboot(client: Client) -> tuple[asyncio.Future[str], Callable[[], None]]:
    """A future set to "" when the daemon goes (its name lost, or our connection), or to
    the reason of a RebootFailed signal. Subscribed before Reboot is called."""
    loop = asyncio.get_running_loop()
    outcome: asyncio.Future[str] = loop.create_future()

    def on_message(msg: Any) -> bool:
        if outcome.done():
            return False
        if (getattr(msg, "member", None) == "RebootFailed"
                and getattr(msg, "interface", None) == MANAGER_INTERFACE):
            body = getattr(msg, "body", None) or ["the daemon said the reboot failed"]
            outcome.set_result(str(body[0]) or "the reboot action failed")
        elif (getattr(msg, "member", None) == "NameOwnerChanged"
              and list(getattr(msg, "body", []))[:1] == [BUS_NAME]
              and not msg.body[2]):
            outcome.set_result("")
        return False

    client.bus.add_message_handler(on_message)
    await client.add_match(f"type='signal',interface='{MANAGER_INTERFACE}',"
                           "member='RebootFailed'")
    await client.add_match("type='signal',sender='org.freedesktop.DBus',"
                           "member='NameOwnerChanged',arg0='org.liveupdate1'")
    gone = asyncio.ensure_future(client.bus.wait_for_disconnect())  # type: ignore[no-untyped-call]

    def went(_: object) -> None:
        if not outcome.done():
            outcome.set_result("")

    gone.add_done_callback(went)

    def stop() -> None:
        gone.cancel()
        client.bus.remove_message_handler(on_message)

    return outcome, stop


async def _update(client: Client, args: argparse.Namespace) -> int:
    args.steps = []
    items = await _check_items(client)
    if not _check_passed(items):
        reason = _check_failures(items)
        _say(args, {"command": "update", "outcome": "preflight failed", "reason": reason,
                    "check": [list(i) for i in items]})
        print(f"liveupdatectl: update: preflight failed, nothing changed: {reason}",
              file=sys.stderr)
        return EXIT_PREFLIGHT
    _progress(args, "check", "ok")
    try:
        await _step(args, "prepare", client.prepare, args.timeout)
        _progress(args, "prepare", "ok")
        await _step(args, "freeze", client.freeze, args.timeout)
        _progress(args, "freeze", "ok")
        outcome, stop = await _watch_reboot(client)
        try:
            await _step(args, "reboot", client.reboot, None)
            _progress(args, "reboot", "handover written")
            try:
                async with asyncio.timeout(args.reboot_timeout):
                    failed = await outcome
            except TimeoutError:
                failed = (f"the daemon was still there {args.reboot_timeout:g}s after "
                          "Reboot (--reboot-timeout)")
        finally:
            stop()
    except StepFailed as exc:
        problem = await _cancel_after_failure(client, args.timeout)
        status = EXIT_CANCEL_FAILED if problem else EXIT_CANCELLED
        end = f"Cancel failed too: {problem}" if problem else "cancelled, state normal"
        _say(args, {"command": "update", "outcome": "failed", "step": exc.step,
                    "reason": exc.reason, "cancelled": not problem, "steps": args.steps})
        print(f"liveupdatectl: update: {exc.step} failed: {exc.reason}; {end}",
              file=sys.stderr)
        return status
    if failed:
        _say(args, {"command": "update", "outcome": "reboot failed", "reason": failed,
                    "steps": args.steps})
        print(f"liveupdatectl: update: the reboot did not follow: {failed}; the state is "
              "frozen (liveupdatectl reboot again, or cancel)", file=sys.stderr)
        return EXIT_NO_REBOOT
    _progress(args, "reboot", "under way")
    _say(args, {"command": "update", "outcome": "rebooting", "steps": args.steps})
    return EXIT_OK


async def _sessions_not_back(client: Client) -> list[str]:
    """Sessions still waiting for fds after the reboot, each with what it lacks; [] when
    every session finished or every fd carried was retrieved (or is lost)."""
    sessions = await client.list_sessions()
    waiting = [s for s in sessions if s.state != "finished"]
    if not waiting:
        return []
    history = await client.get_history()
    cycle = history[-1] if history else None
    if cycle and cycle["fds_retrieved"] + cycle["fds_lost"] + cycle["fds_corrupted"] \
            >= cycle["fds_carried"]:
        return []
    return [f"{s.name} ({s.fd_count} fds, {s.state})" for s in waiting]


async def _finish(client: Client, args: argparse.Namespace) -> int:
    if args.wait:
        if await client.state() != "updated":
            raise CommandError(EXIT_REFUSED, "finish --wait: the state is "
                               f"{await client.state()}, not updated: nothing to wait for")
        changed = asyncio.Event()

        def on_change(msg: Any) -> bool:
            if getattr(msg, "member", None) == "PropertiesChanged":
                changed.set()
            return False

        client.bus.add_message_handler(on_change)
        await client.add_match("type='signal',interface='org.freedesktop.DBus.Properties',"
                               "member='PropertiesChanged',path_namespace='/org/liveupdate1'")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + args.timeout
        while waiting := await _sessions_not_back(client):
            remaining = deadline - loop.time()
            if remaining <= 0:
                print(f"liveupdatectl: finish --wait: after {args.timeout:g}s not every "
                      f"session has its fds back: {', '.join(waiting)}; Finish not called",
                      file=sys.stderr)
                return EXIT_WAIT_TIMEOUT
            changed.clear()
            # A session's State changes with a signal; a RetrieveFd does not: look again
            # at least once a second.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, 1.0)):
                    await changed.wait()
        client.bus.remove_message_handler(on_change)
    await client.finish()
    state = await client.state()
    _say(args, {"command": "finish", "state": state})
    if not args.json:
        print(f"finish: ok, state {state}")
    return EXIT_OK


# ---- host tools -----------------------------------------------------------------------

def _show_value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return " ".join(map(str, value))
    return str(value)


async def _show(client: Client, args: argparse.Namespace) -> None:
    if args.session:
        props = await client.properties(session_path(args.session), SESSION_INTERFACE)
    else:
        props = await client.properties()
    wanted = [p for item in args.property for p in item.split(",") if p]
    unknown = [p for p in wanted if p not in props]
    if unknown:
        raise CommandError(EXIT_USAGE, f"show: no property {', '.join(unknown)} (there are: "
                           f"{', '.join(sorted(props))})")
    names = sorted(set(wanted)) or sorted(props)
    if args.json:
        print(json.dumps({name: props[name] for name in names}))
        return
    for name in names:
        value = _show_value(props[name])
        print(value if args.value else f"{name}={value}")


async def _quarantine(client: Client, args: argparse.Namespace) -> Exec | None:
    if args.action == "list":
        rows = await client.list_quarantined()
        if args.json:
            print(json.dumps([r.__dict__ for r in rows]))
        elif rows:
            _print_table([(r.id, r.session, r.token, r.size, r.reason) for r in rows],
                         ["ID", "SESSION", "TOKEN", "BYTES", "REASON"])
        else:
            print("no quarantined fd")
        return None
    if args.action == "release":
        await client.release_quarantined(args.id)
        _say(args, {"id": args.id, "released": True})
        if not args.json:
            print(f"quarantine release: {args.id} let go")
        return None
    fd = await client.retrieve_quarantined(args.id)
    return Exec(args.program, args.exec_, fd, args.id)


async def _complete_names(client: Client, args: argparse.Namespace) -> None:
    if args.what == "sessions":
        print("\n".join(s.name for s in await client.list_sessions()))
    elif args.what == "quarantine":
        print("\n".join(q.id for q in await client.list_quarantined()))
    elif args.session:
        session = SessionClient(client, args.session, session_path(args.session))
        print("\n".join(f.token for f in await session.list_fds()))


async def _session_call(client: Client, args: argparse.Namespace) -> None:
    session = SessionClient(client, args.session, session_path(args.session))
    if args.command == "delay-freeze":
        await session.delay_freeze(not args.off)
        done = {"session": args.session, "delay_freeze": not args.off}
        text = f"delay-freeze: {args.session}: Freeze " + (
            "does not wait for it" if args.off else "waits for its ready-for-freeze")
    else:
        await session.ready_for_freeze()
        done = {"session": args.session, "ready": True}
        text = f"ready-for-freeze: {args.session} is ready"
    _say(args, done)
    if not args.json:
        print(text)


# ---- running a command ----------------------------------------------------------------

# Commands that change nothing: a closed stdout ends them quietly. Any other command runs
# to its end whatever becomes of stdout, and only then reports a write error.
READ_ONLY = frozenset({"status", "list", "history", "check", "show", "complete-names"})


def _read_only(args: argparse.Namespace) -> bool:
    return args.command in READ_ONLY or (
        args.command == "quarantine" and args.action == "list")


def _bus_address(spec: str) -> str:
    """The address `--bus` stands for, to name in a message."""
    if spec == "system":
        return os.environ.get("DBUS_SYSTEM_BUS_ADDRESS",
                              "unix:path=/run/dbus/system_bus_socket")
    if spec == "session":
        return os.environ.get("DBUS_SESSION_BUS_ADDRESS", "(DBUS_SESSION_BUS_ADDRESS unset)")
    return spec


def _bus_error_text(exc: BusError, bus: str) -> str:
    if exc.name.endswith(("ServiceUnknown", "NameHasNoOwner")):
        where = f"the {bus} bus" if bus in ("system", "session") else f"the bus {bus}"
        return (f"liveupdated is not running on {where} (no one owns {BUS_NAME}; "
                "systemctl start liveupdated)")
    return _one_line(str(exc))


def _unreachable(exc: BaseException, bus: str) -> str:
    address = _bus_address(bus)
    reason = (describe(exc) if isinstance(exc, OSError) else
              _one_line(str(exc)) or type(exc).__name__)
    what = f"the {bus} bus" if bus in ("system", "session") else "the bus"
    return f"cannot reach {what} at {address}: {reason}"


async def _dispatch(client: Client, args: argparse.Namespace) -> int | Exec:
    match args.command:
        case "status":
            await _status(client, args.json)
        case "list":
            await _list(client, args.json)
        case "history":
            await _history(client, args.json)
        case "check":
            return await _check(client, args)
        case "show":
            await _show(client, args)
        case "update":
            return await _update(client, args)
        case "finish":
            return await _finish(client, args)
        case "prepare" | "freeze" | "cancel":
            await getattr(client, args.command)()
            state = await client.state()
            _say(args, {"command": args.command, "state": state})
            if not args.json:
                print(f"{args.command}: ok, state {state}")
        case "reboot":
            await client.reboot()
            _say(args, {"command": "reboot", "state": "frozen", "handover": "written"})
            if not args.json:
                print("reboot: ok, handover written; state frozen until the new boot "
                      "(the daemon runs its reboot action; RebootFailed if none follows)")
        case "preserve":
            await _preserve(client, args)
        case "unpreserve":
            await SessionClient(client, args.session,
                                session_path(args.session)).unpreserve_fd(args.token)
            _say(args, {"session": args.session, "token": args.token, "preserved": False})
        case "retrieve":
            return await _retrieve(client, args)
        case "drop-session":
            await client.drop_session(args.session, args.reason)
            _say(args, {"command": "drop-session", "session": args.session})
            if not args.json:
                print(f"drop-session: {args.session} dropped with its fds")
        case "delay-freeze" | "ready-for-freeze":
            await _session_call(client, args)
        case "quarantine":
            return await _quarantine(client, args) or EXIT_OK
        case "complete-names":
            await _complete_names(client, args)
    return EXIT_OK


async def _run(args: argparse.Namespace) -> int | Exec:
    if args.command == "demo":
        from liveupdated.demo import run_demo

        return await run_demo(args.size, args.json)
    try:
        client = await Client.connect(args.bus)
    except (OSError, ValueError, BusError) as exc:
        if args.command == "complete-names":
            return EXIT_UNREACHABLE
        print(f"liveupdatectl: {_unreachable(exc, args.bus)}", file=sys.stderr)
        return EXIT_UNREACHABLE
    quiet = args.command == "complete-names"
    try:
        return await _dispatch(client, args)
    except LiveUpdateError as exc:
        if not quiet:
            print(f"liveupdatectl: {_explain(args, exc)}", file=sys.stderr)
        return EXIT_REFUSED
    except BusError as exc:
        if not quiet:
            print(f"liveupdatectl: {_bus_error_text(exc, args.bus)}", file=sys.stderr)
        unreachable = exc.name.endswith(("ServiceUnknown", "NameHasNoOwner", "NoReply",
                                         "Disconnected"))
        return EXIT_UNREACHABLE if unreachable else EXIT_REFUSED
    except Disconnected:
        return EXIT_UNREACHABLE
    except Interrupted:
        return EXIT_INTERRUPTED
    finally:
        client.close()


def _check_args(args: argparse.Namespace, inherited: frozenset[int], bus_given: bool) -> None:
    """What argparse cannot check; UsageError or CommandError."""
    if args.command == "demo" and bus_given:
        raise UsageError("demo runs on a private bus of its own; --bus does not apply")
    if args.command == "preserve" and args.fd not in inherited:
        raise UsageError(
            f"fd {args.fd} was not passed to liveupdatectl: open it in the calling shell, "
            f"e.g. `liveupdatectl preserve {args.session} {args.token} {args.fd} "
            f"{args.fd}<>/proc/PID/fd/N`"
        )
    if args.command == "quarantine":
        if args.action != "list" and not args.id:
            raise UsageError(f"quarantine {args.action} needs an ID (q<N>, from list)")
        if args.action == "list" and args.id:
            raise UsageError("quarantine list takes no ID")
        if args.action == "retrieve" and not args.exec_:
            raise UsageError("quarantine retrieve needs --exec CMD [ARG...]")
        if args.action != "retrieve" and args.exec_ is not None:
            raise UsageError(f"--exec does not apply to quarantine {args.action}")
        if args.action == "retrieve":
            args.program = _command_path(args.exec_[0])
    if args.command == "retrieve":
        if not args.exec_:
            raise UsageError("retrieve needs --exec CMD [ARG...]")
        args.program = _command_path(args.exec_[0])


class _StdoutClosed(Exception):
    """The reader of a read-only command's output went away: stop, quietly."""


class _Output(io.TextIOBase):
    """stdout that never lets a write error interrupt a command that changes state: the
    first error is kept and reported once the command is done; a read-only command whose
    reader went away (EPIPE) stops quietly."""

    def __init__(self, real: typing.TextIO, read_only: bool) -> None:
        self._real = real
        self._read_only = read_only
        self.error: OSError | None = None

    def _failed(self, exc: OSError) -> None:
        if self.error is None:
            self.error = exc
        if self._read_only:
            raise _StdoutClosed() from exc

    def write(self, text: str) -> int:
        if self.error is None:
            try:
                self._real.write(text)
            except OSError as exc:
                self._failed(exc)
        return len(text)

    def flush(self) -> None:
        if self.error is None:
            try:
                self._real.flush()
            except OSError as exc:
                self._failed(exc)

    def isatty(self) -> bool:
        return self._real.isatty()

    def fileno(self) -> int:
        return self._real.fileno()


def _finish_output(out: _Output, code: int) -> int:
    """Flush what is left; a write error is one line and exit 1 (unless the command
    failed otherwise); a reader gone away is not an error of ours."""
    with contextlib.suppress(_StdoutClosed):
        out.flush()
    sys.stdout = out._real
    if out.error is not None:
        # Nothing more may reach the broken stdout, not even at the interpreter's exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)
        if out.error.errno != errno.EPIPE:
            print(f"liveupdatectl: cannot write the output: {describe(out.error)}",
                  file=sys.stderr)
            return code or EXIT_WRITE
    return code


EXIT_WRITE = 1  # the output could not be written (ENOSPC, EIO)


def main(argv: list[str] | None = None) -> None:
    inherited = inherited_fds()  # first: before the event loop or the bus open any fd
    args = _parser().parse_args(argv)
    bus_given = hasattr(args, "bus")
    args.bus = getattr(args, "bus", "system")
    args.json = getattr(args, "json", False)
    out = _Output(sys.stdout, _read_only(args))
    sys.stdout = out
    # dbus-fast logs what its own handlers meet with a traceback on stderr (a Ping from the
    # daemon answered as the connection closes, say): every failure of this command is
    # one line of its own, so the library's are not shown.
    logging.getLogger("dbus_fast").setLevel(logging.CRITICAL + 1)
    to_exec: Exec | None = None
    try:
        _check_args(args, inherited, bus_given)
        result = asyncio.run(_run(args))
        if isinstance(result, Exec):
            to_exec, code = result, EXIT_OK
        else:
            code = result
    except _StdoutClosed:
        code = EXIT_OK
    except UsageError as exc:
        print(f"liveupdatectl: error: {exc}", file=sys.stderr)
        code = EXIT_USAGE
    except CommandError as exc:
        print(f"liveupdatectl: {exc.message}", file=sys.stderr)
        code = exc.status
    except KeyboardInterrupt:
        print("liveupdatectl: interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except Exception as exc:  # one line, never a traceback
        print(f"liveupdatectl: unexpected failure: {type(exc).__name__}: "
              f"{_one_line(str(exc))}", file=sys.stderr)
        code = EXIT_SOFTWARE
    code = _finish_output(out, code)
    if to_exec is not None and code == EXIT_OK:
        try:
            to_exec.run()
        except CommandError as exc:
            print(f"liveupdatectl: {exc.message}", file=sys.stderr)
            code = exc.status
    sys.exit(code)


if __name__ == "__main__":
    main()
