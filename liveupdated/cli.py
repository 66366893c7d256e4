"""liveupdatectl: the operator's and the shell VMM's command line.

Every failure is one line on stderr and one of the exit statuses below (also in
`liveupdatectl --help` and liveupdatectl(1)); none prints a traceback.
"""

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import sys
import textwrap
import time
import typing
from collections.abc import Callable, Sequence
from typing import Any

from liveupdated import __version__
from liveupdated.client import BusError, Client, SessionClient
from liveupdated.config import _bus as _bus_spec
from liveupdated.core.errors import LiveUpdateError
from liveupdated.core.names import session_path
from liveupdated.demo import MAX_SIZE, MIN_SIZE, parse_size

EXIT_OK = 0
EXIT_REFUSED = 1  # the daemon refused the call; its error on one line
EXIT_USAGE = 2  # bad command line, or an fd not inherited from the caller
EXIT_UNREACHABLE = 3  # no bus, or no daemon on it, or the connection was lost
EXIT_VERIFY = 4  # the demo's verification failed
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
    command("reboot", "Reboot(): write the handover, then the daemon stops (root)",
            "Reboot(): replies once the handover is written; the daemon then stops and "
            "runs its reboot action (kexec, a reboot, or nothing with --reboot-action "
            "exit). The state stays frozen until the new boot (root).")
    command("finish", "Finish(): end the update on the new boot (root)",
            "Finish(): on the new boot, releases every fd not retrieved; state normal "
            "(root).")
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
    return p


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
    sessions = await client.list_sessions()
    props["Sessions"] = len(sessions)
    props["Fds"] = sum(s.fd_count for s in sessions)
    history = await client.get_history()
    props["LastUpdate"] = {**history[-1], **_phases(history[-1])} if history else None
    if as_json:
        print(json.dumps(props))
        return
    for key in ("State", "Backend", "Version", "BootId", "LastBlackoutUSec", "Sessions", "Fds"):
        print(f"{key + ':':18} {props[key]}")
    cycles = await client.get_history()
    if cycles:
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
            c["prepared_by"] if c["prepared_by"] >= 0 else "-",
        ])
    _print_table(rows, ["STARTED", "OUTCOME", "BLACKOUT_MS", "HANDOVER_MS", "KEXEC+START_MS",
                        "FIRST_FD_MS", "LAST_FD_MS", "FDS_BACK", "LOST", "BY_UID"])


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


async def _retrieve(client: Client, args: argparse.Namespace) -> int:
    if await client.state() == "updated":
        session = await client.retrieve_session(args.session)
    else:
        session = SessionClient(client, args.session, session_path(args.session))
    fd = await session.retrieve_fd(args.token)
    client.close()
    os.dup2(fd, 3, inheritable=True)
    if fd != 3:
        os.close(fd)
    os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES=args.token)
    try:
        os.execv(args.program, args.exec_)
    except OSError as exc:
        raise CommandError(
            EXIT_CANNOT_EXEC, f"retrieve --exec: {args.exec_[0]}: {exc.strerror or exc}"
        ) from None


def _say(args: argparse.Namespace, result: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(result))


# A daemon's message names the D-Bus method that refused; say the command the user typed.
_ALLOWED_IN = re.compile(r"^([A-Z][A-Za-z]+) is allowed in state")
_ADVICE = {
    "; UnpreserveFd it first": "; `liveupdatectl unpreserve {session} {token}` first",
    ": UnpreserveFd it and preserve it again":
        ": `liveupdatectl unpreserve {session} {token}`, then preserve it again",
}


async def _explain(client: Client, args: argparse.Namespace, exc: LiveUpdateError) -> str:
    """The daemon's refusal in the terms of the command the user ran."""
    text = _one_line(str(exc))
    if (said := _ALLOWED_IN.match(text)) and said[1].lower() != args.command:
        text = f"{args.command}{text[len(said[1]):]}"
    for advice, instead in _ADVICE.items():
        if advice not in text:
            continue
        try:
            state = await client.state()
        except (LiveUpdateError, BusError, OSError):
            state = "?"
        if state == "normal":
            text = text.replace(advice, instead.format(session=getattr(args, "session", ""),
                                                       token=getattr(args, "token", "")))
        else:  # UnpreserveFd is refused outside normal
            text = text.replace(advice, "; Finish releases it" if state == "updated" else "")
    return f"{exc.name}: {text}"


async def _run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from liveupdated.demo import run_demo

        return await run_demo(args.size, args.json)
    try:
        client = await Client.connect(args.bus)
    except (OSError, ValueError, BusError) as exc:
        print(f"liveupdatectl: cannot reach the bus {args.bus!r}: {_one_line(str(exc))}",
              file=sys.stderr)
        return EXIT_UNREACHABLE
    try:
        match args.command:
            case "status":
                await _status(client, args.json)
            case "list":
                await _list(client, args.json)
            case "history":
                await _history(client, args.json)
            case "prepare" | "freeze" | "cancel" | "finish":
                await getattr(client, args.command)()
                state = await client.state()
                _say(args, {"command": args.command, "state": state})
                if not args.json:
                    print(f"{args.command}: ok, state {state}")
            case "reboot":
                await client.reboot()
                _say(args, {"command": "reboot", "state": "frozen", "handover": "written"})
                if not args.json:
                    print("reboot: ok, handover written; state frozen until the new boot, "
                          "the daemon stops and runs its reboot action")
            case "preserve":
                await _preserve(client, args)
            case "unpreserve":
                await SessionClient(client, args.session,
                                    session_path(args.session)).unpreserve_fd(args.token)
                _say(args, {"session": args.session, "token": args.token, "preserved": False})
            case "retrieve":
                return await _retrieve(client, args)
    except LiveUpdateError as exc:
        print(f"liveupdatectl: {await _explain(client, args, exc)}", file=sys.stderr)
        return EXIT_REFUSED
    except BusError as exc:
        print(f"liveupdatectl: {_one_line(str(exc))}", file=sys.stderr)
        unreachable = exc.name.endswith(("ServiceUnknown", "NameHasNoOwner", "NoReply",
                                         "Disconnected"))
        return EXIT_UNREACHABLE if unreachable else EXIT_REFUSED
    except Disconnected:
        return EXIT_UNREACHABLE
    except Interrupted:
        return EXIT_INTERRUPTED
    finally:
        client.close()
    return EXIT_OK


def _check(args: argparse.Namespace, inherited: frozenset[int], bus_given: bool) -> None:
    """What argparse cannot check; UsageError or CommandError."""
    if args.command == "demo" and bus_given:
        raise UsageError("demo runs on a private bus of its own; --bus does not apply")
    if args.command == "preserve" and args.fd not in inherited:
        raise UsageError(
            f"fd {args.fd} was not passed to liveupdatectl: open it in the calling shell, "
            f"e.g. `liveupdatectl preserve {args.session} {args.token} {args.fd} "
            f"{args.fd}<>/proc/PID/fd/N`"
        )
    if args.command == "retrieve":
        if not args.exec_:
            raise UsageError("retrieve needs --exec CMD [ARG...]")
        args.program = _command_path(args.exec_[0])


def main(argv: list[str] | None = None) -> None:
    inherited = inherited_fds()  # first: before the event loop or the bus open any fd
    args = _parser().parse_args(argv)
    bus_given = hasattr(args, "bus")
    args.bus = getattr(args, "bus", "system")
    args.json = getattr(args, "json", False)
    try:
        _check(args, inherited, bus_given)
        code = asyncio.run(_run(args))
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
    sys.exit(code)


if __name__ == "__main__":
    main()
