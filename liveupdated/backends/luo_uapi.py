"""The Live Update Orchestrator uAPI (include/uapi/linux/liveupdate.h, Linux 7.2) in ctypes.

Structs, ioctl numbers and one thin call per ioctl; each raises OSError with the kernel's
errno. Policy (what an errno means for liveupdated) lives in kernel.py, never here.
tests/test_kernel_uapi.py checks every size and offset against the header.
"""

import ctypes
import fcntl
import os

DEVICE = "/dev/liveupdate"
IOCTL_TYPE = 0xBA
SESSION_NAME_LENGTH = 64  # including the terminating NUL


def _io(nr: int) -> int:
    """_IO(LIVEUPDATE_IOCTL_TYPE, nr): the header declares every command without a size."""
    return (IOCTL_TYPE << 8) | nr


CREATE_SESSION = _io(0x00)
RETRIEVE_SESSION = _io(0x01)
SESSION_PRESERVE_FD = _io(0x40)
SESSION_RETRIEVE_FD = _io(0x41)
SESSION_FINISH = _io(0x42)
SESSION_GET_NAME = _io(0x43)

SessionName = ctypes.c_uint8 * SESSION_NAME_LENGTH


class CreateSession(ctypes.Structure):
    """struct liveupdate_ioctl_create_session."""

    _fields_ = (("size", ctypes.c_uint32), ("fd", ctypes.c_int32), ("name", SessionName))


class RetrieveSession(ctypes.Structure):
    """struct liveupdate_ioctl_retrieve_session."""

    _fields_ = (("size", ctypes.c_uint32), ("fd", ctypes.c_int32), ("name", SessionName))


class PreserveFd(ctypes.Structure):
    """struct liveupdate_session_preserve_fd; the token is an __aligned_u64."""

    _fields_ = (("size", ctypes.c_uint32), ("fd", ctypes.c_int32), ("token", ctypes.c_uint64))


class RetrieveFd(ctypes.Structure):
    """struct liveupdate_session_retrieve_fd."""

    _fields_ = (("size", ctypes.c_uint32), ("fd", ctypes.c_int32), ("token", ctypes.c_uint64))


class SessionFinish(ctypes.Structure):
    """struct liveupdate_session_finish."""

    _fields_ = (("size", ctypes.c_uint32), ("reserved", ctypes.c_uint32))


class SessionGetName(ctypes.Structure):
    """struct liveupdate_session_get_name."""

    _fields_ = (("size", ctypes.c_uint32), ("reserved", ctypes.c_uint32), ("name", SessionName))


def encode_name(name: str) -> bytes:
    raw = name.encode()
    if not raw or len(raw) >= SESSION_NAME_LENGTH or b"\0" in raw:
        raise ValueError(f"a LUO session name is 1-{SESSION_NAME_LENGTH - 1} bytes: {name!r}")
    return raw


def _call(fd: int, request: int, arg: ctypes.Structure) -> None:
    arg.size = ctypes.sizeof(arg)
    fcntl.ioctl(fd, request, arg, True)


def open_device(path: str = DEVICE) -> int:
    """The one open of /dev/liveupdate the kernel allows (EBUSY while another is open)."""
    return os.open(path, os.O_RDWR | os.O_CLOEXEC)


def create_session(device: int, name: str) -> int:
    arg = CreateSession(fd=-1)
    ctypes.memmove(arg.name, encode_name(name), len(name.encode()))
    _call(device, CREATE_SESSION, arg)
    return int(arg.fd)


def retrieve_session(device: int, name: str) -> int:
    """A session the previous kernel handed over; ENOENT if there is none by that name."""
    arg = RetrieveSession(fd=-1)
    ctypes.memmove(arg.name, encode_name(name), len(name.encode()))
    _call(device, RETRIEVE_SESSION, arg)
    return int(arg.fd)


def preserve_fd(session: int, fd: int, token: int) -> None:
    _call(session, SESSION_PRESERVE_FD, PreserveFd(fd=fd, token=token))


def retrieve_fd(session: int, token: int) -> int:
    """The restored file under `token`, as a new O_CLOEXEC fd."""
    arg = RetrieveFd(fd=-1, token=token)
    _call(session, SESSION_RETRIEVE_FD, arg)
    return int(arg.fd)


def finish_session(session: int) -> None:
    _call(session, SESSION_FINISH, SessionFinish())


def session_name(session: int) -> str:
    arg = SessionGetName()
    _call(session, SESSION_GET_NAME, arg)
    return bytes(arg.name).split(b"\0", 1)[0].decode()


# ---- kexec: load the next kernel, and jump into it ------------------------------------

KEXEC_FILE_NO_INITRAMFS = 0x4
LINUX_REBOOT_CMD_KEXEC = 0x45584543
_NR_KEXEC_FILE_LOAD = {"x86_64": 320, "aarch64": 294}
_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def kexec_file_load(kernel: int, initrd: int | None, cmdline: str) -> None:
    """kexec_file_load(2): stage `kernel` (and `initrd`) as the kernel of the next kexec."""
    number = _NR_KEXEC_FILE_LOAD.get(os.uname().machine)
    if number is None:
        raise OSError(38, f"kexec_file_load is not wired up for {os.uname().machine} here")
    raw = cmdline.encode() + b"\0"
    flags = KEXEC_FILE_NO_INITRAMFS if initrd is None else 0
    _check(_libc.syscall(ctypes.c_long(number), ctypes.c_int(kernel),
                         ctypes.c_int(-1 if initrd is None else initrd),
                         ctypes.c_ulong(len(raw)), ctypes.c_char_p(raw), ctypes.c_ulong(flags)))


def kexec_loaded() -> bool:
    try:
        with open("/sys/kernel/kexec_loaded") as f:
            return f.read().strip() == "1"
    except FileNotFoundError:
        return False


def reboot_kexec() -> None:
    """reboot(LINUX_REBOOT_CMD_KEXEC): LUO serializes the open sessions and jumps. No return."""
    os.sync()
    _check(_libc.reboot(ctypes.c_int(LINUX_REBOOT_CMD_KEXEC)))


def main(argv: list[str] | None = None) -> None:
    """`load KERNEL [--initrd FILE] [--append CMDLINE]` stages the next kernel (the command
    line defaults to this boot's); `kexec` jumps into it now: as a reboot action, from the
    daemon that still holds the sessions, it is the kexec call without a shutdown."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m liveupdated.backends.luo_uapi")
    commands = parser.add_subparsers(dest="command", required=True)
    load = commands.add_parser("load", help="kexec_file_load KERNEL for the next kexec")
    load.add_argument("kernel")
    load.add_argument("--initrd")
    load.add_argument("--append", help="the next kernel's command line (default: this one's)")
    commands.add_parser("kexec", help="sync, then reboot(LINUX_REBOOT_CMD_KEXEC)")
    args = parser.parse_args(argv)
    try:
        if args.command == "load":
            with open("/proc/cmdline") as f:
                cmdline = args.append if args.append is not None else f.read().strip()
            with open(args.kernel, "rb") as kernel:
                if args.initrd is None:
                    kexec_file_load(kernel.fileno(), None, cmdline)
                else:
                    with open(args.initrd, "rb") as initrd:
                        kexec_file_load(kernel.fileno(), initrd.fileno(), cmdline)
        else:
            reboot_kexec()
    except OSError as exc:
        parser.exit(1, f"{args.command}: {exc.strerror} (errno {exc.errno})\n")


if __name__ == "__main__":
    main()
