"""liveupdated-qemu: run one QEMU VM so that liveupdated carries it across a kexec.

  python -m liveupdated.vmm --name NAME --ram SIZE [options] [-- QEMU-ARGS...]

At start it resumes the VM when liveupdated (state `updated`) holds its session, and
boots it fresh otherwise. QEMU gets the guest RAM (a memfd this process owns) through
`-object memory-backend-file,...,share=on,mem-path=/proc/self/fd/N`, `-machine
TYPE,memory-backend=...`, `-m` and a QMP socket; everything after `--` is passed on.
Exit statuses: 0 stopped (or handed over to the next boot), 1 failure, 2 usage,
65 the saved state is missing or QEMU refused it, 66 the guest RAM is missing,
69 QEMU cannot run or is older than 8.2, 70 QEMU exited while the guest ran.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
from pathlib import Path

import structlog

from liveupdated import logs

from .adapter import Adapter, Options
from .qemu import AdapterError, QemuSpec, parse_size


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="liveupdated-qemu", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="the VM's name (the unit's instance)")
    p.add_argument("--ram", required=True, type=parse_size, help="guest RAM size: 64M, 2G")
    p.add_argument("--machine", default="q35", help="QEMU machine type (default q35)")
    p.add_argument("--qemu", default="qemu-system-x86_64",
                   help="QEMU command, split like a shell would (a wrapper may come first)")
    p.add_argument("--session", help="liveupdated session name (default qemu-NAME, "
                   "prefixed with UID- when not root)")
    p.add_argument("--bus", default="system", help="system, session or a D-Bus address")
    p.add_argument("--qmp", type=Path, help="QMP socket path (default "
                   "$RUNTIME_DIRECTORY/qmp.sock, else /run/liveupdated-qemu/NAME/qmp.sock)")
    p.add_argument("--state-size", type=parse_size, default=1 << 20,
                   help="initial size of the device-state memfd (default 1M)")
    p.add_argument("--config", type=Path, help="a file of more arguments, split like a "
                   "shell would (# comments): options, then -- and QEMU's arguments")
    p.add_argument("--log-level", default="info",
                   choices=("debug", "info", "warning", "error"))
    p.add_argument("qemu_args", nargs="*", metavar="QEMU-ARGS")
    return p


def arguments(argv: list[str]) -> argparse.Namespace:
    """The command line with --config FILE's contents merged in (options first, its
    QEMU arguments before those of the command line)."""
    cut = argv.index("--") if "--" in argv else len(argv)
    own, qemu = argv[:cut], argv[cut + 1:]
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path)
    first = pre.parse_known_args(own)[0]
    if first.config is not None:
        try:
            tokens = shlex.split(first.config.read_text(), comments=True)
        except (OSError, ValueError) as exc:
            parser().error(f"--config {first.config}: {exc}")
        file_own = tokens[: tokens.index("--")] if "--" in tokens else tokens
        file_qemu = tokens[tokens.index("--") + 1:] if "--" in tokens else []
        own, qemu = file_own + own, file_qemu + qemu
    return parser().parse_args([*own, "--", *qemu])


def options(args: argparse.Namespace) -> Options:
    session = args.session or f"qemu-{args.name}"
    if args.session is None and os.getuid() != 0:
        session = f"{os.getuid()}-{session}"
    qmp = args.qmp
    if qmp is None:
        runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
        directory = Path(runtime) if runtime else Path("/run/liveupdated-qemu") / args.name
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        qmp = directory / "qmp.sock"
    spec = QemuSpec(shlex.split(args.qemu), args.ram, args.machine, list(args.qemu_args), qmp)
    return Options(spec, session, args.bus, args.state_size)


def main(argv: list[str] | None = None) -> None:
    args = arguments(sys.argv[1:] if argv is None else argv)
    logs.configure(args.log_level)
    if args.ram % (1 << 20) or args.ram == 0:
        parser().error("--ram must be a positive whole number of MiB")
    try:
        status = asyncio.run(Adapter(options(args)).run())
    except AdapterError as exc:
        structlog.get_logger("liveupdated-qemu").error("failed", error=str(exc),
                                                       status=exc.status)
        sys.exit(exc.status)
    sys.exit(status)


if __name__ == "__main__":
    main()
