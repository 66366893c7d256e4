"""liveupdatectl: the operator's and the shell VMM's command line (DESIGN.md §4).

Exit codes: 0 success, 1 the daemon refused (its error on one line), 2 usage,
3 the daemon or bus is unreachable, 4 the demo's verification failed.
"""

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from liveupdated.client import BusError, Client, SessionClient
from liveupdated.core.errors import LiveUpdateError
from liveupdated.core.names import session_path

EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_VERIFY = 1, 2, 3, 4


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--bus", default=argparse.SUPPRESS,
                        help="system, session or a D-Bus address (default system)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="machine-readable output")
    p = argparse.ArgumentParser(prog="liveupdatectl", description="Drive liveupdated.",
                                parents=[common])
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, parents=[common])

    command("status", "state of the update and of the daemon")
    command("list", "sessions and their fds")
    for name in ("prepare", "freeze", "cancel", "reboot", "finish"):
        command(name, f"{name.capitalize()}() the host's update (root)")
    pre = command("preserve", "hand over an inherited fd, e.g. 3<>file")
    pre.add_argument("session")
    pre.add_argument("token")
    pre.add_argument("fd", type=int)
    pre.add_argument("--requires", default="", help="comma-separated tokens it needs")
    ret = command("retrieve", "get an fd back and run CMD with it as fd 3")
    ret.add_argument("session")
    ret.add_argument("token")
    ret.add_argument("--exec", dest="exec_", nargs=argparse.REMAINDER, required=True,
                     metavar="CMD")
    demo = command("demo", "a whole update on a private bus, with a timeline")
    demo.add_argument("--size", default="1G", help="guest memory size (default 1G)")
    return p


def _print_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> None:
    cells = [list(map(str, header)), *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


async def _status(client: Client, as_json: bool) -> None:
    props = await client.properties()
    sessions = await client.list_sessions()
    props["Sessions"] = len(sessions)
    props["Fds"] = sum(s.fd_count for s in sessions)
    if as_json:
        print(json.dumps(props))
        return
    for key in ("State", "Backend", "Version", "BootId", "LastBlackoutUSec", "Sessions", "Fds"):
        print(f"{key + ':':18} {props[key]}")


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
        # The session lives as long as its creator's connection until Prepare.
        print(f"holding session {args.session} until the update is prepared", file=sys.stderr)
        await _wait_until_not_normal(client)


async def _wait_until_not_normal(client: Client) -> None:
    changed = asyncio.Event()

    def on_signal(msg: Any) -> bool:
        if getattr(msg, "member", None) == "StateChanged":
            changed.set()
        return False

    client.bus.add_message_handler(on_signal)
    await client.add_match(
        "type='signal',interface='org.liveupdate1.Manager',member='StateChanged'"
    )
    while await client.state() == "normal":
        await changed.wait()
        changed.clear()


async def _retrieve(client: Client, args: argparse.Namespace) -> int:
    if not args.exec_:
        print("liveupdatectl: retrieve needs --exec CMD", file=sys.stderr)
        return EXIT_USAGE
    if await client.state() == "updated":
        session = await client.retrieve_session(args.session)
    else:
        session = SessionClient(client, args.session, session_path(args.session))
    fd = await session.retrieve_fd(args.token)
    client.close()
    os.dup2(fd, 3)
    if fd != 3:
        os.close(fd)
    os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES=args.token)
    os.execvp(args.exec_[0], args.exec_)


def _say(args: argparse.Namespace, result: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(result))


async def _run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from liveupdated.demo import run_demo

        return await run_demo(args.size, args.json)
    try:
        client = await Client.connect(args.bus)
    except (OSError, ValueError, BusError) as exc:
        print(f"liveupdatectl: cannot reach the bus {args.bus!r}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    try:
        match args.command:
            case "status":
                await _status(client, args.json)
            case "list":
                await _list(client, args.json)
            case "prepare" | "freeze" | "cancel" | "reboot" | "finish":
                await getattr(client, args.command)()
                state = "rebooting" if args.command == "reboot" else await client.state()
                _say(args, {"command": args.command, "state": state})
                if not args.json:
                    print(f"{args.command}: ok, state {state}")
            case "preserve":
                await _preserve(client, args)
            case "retrieve":
                return await _retrieve(client, args)
    except LiveUpdateError as exc:
        print(f"liveupdatectl: {exc.name}: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except BusError as exc:
        print(f"liveupdatectl: {exc}", file=sys.stderr)
        unreachable = exc.name.endswith(("ServiceUnknown", "NameHasNoOwner", "NoReply"))
        return EXIT_UNREACHABLE if unreachable else EXIT_REFUSED
    finally:
        client.close()
    return 0


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    args.bus = getattr(args, "bus", "system")
    args.json = getattr(args, "json", False)
    sys.exit(asyncio.run(_run(args)))



if __name__ == "__main__":
    main()
