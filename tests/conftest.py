"""Fixtures that start real things: a private dbus-daemon and liveupdated processes."""

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Self

import pytest

from liveupdated.backends.simulated import DATA_DIR, RECORD_NAME, KexecRecord
from liveupdated.client import Client
from liveupdated.core.codec import from_json
from liveupdated.core.records import Record
from liveupdated.journal import decode
from liveupdated.privatebus import PrivateBus
from liveupdated.sandbox import DaemonProcess, Notifications

DaemonFactory = Callable[..., DaemonProcess]


@pytest.fixture
def bus() -> Iterator[PrivateBus]:
    """A private dbus-daemon whose socket any uid can reach (pytest's tmp dirs are 0700)."""
    directory = Path(tempfile.mkdtemp(prefix="lud-bus-"))
    with PrivateBus(directory) as private_bus:
        yield private_bus
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def start_daemon(
    bus: PrivateBus, state_dir: Path, tmp_path: Path
) -> Iterator[DaemonFactory]:
    """Start liveupdated on the test bus through the one harness (`Host`): the same state
    dir each time, a fresh fd store each start (a new boot, or a daemon without one)."""
    stores: list[Notifications] = []
    with Host(bus, tmp_path, state_dir=state_dir) as host:

        def start(*args: str, env: dict[str, str] | None = None) -> DaemonProcess:
            stores.append(Notifications())
            return host.start_now(*args, store=stores[-1], env=env)

        yield start
    for store in stores:
        store.close()


@pytest.fixture
def daemon(start_daemon: DaemonFactory) -> DaemonProcess:
    return start_daemon()


@pytest.fixture
async def client(bus: PrivateBus, daemon: DaemonProcess) -> AsyncIterator[Client]:
    async with await Client.connect(bus.address) as c:
        yield c


def open_fds(pid: int) -> int:
    """The open fds of the daemon `pid`, not counting its fd store barriers in flight: a
    flush no call waits on (the one after a departed client's sessions are dropped) may
    start one after its change is visible. tests/test_notify.py shows that each ends."""
    return sum(not is_barrier(link) for link in fd_links(pid))


def fd_links(pid: int) -> list[str]:
    """What each open fd of `pid` is, in one listing."""
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # closed while listed
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return links


def is_barrier(link: str) -> bool:
    """An fd store barrier the daemon waits on: the read end of a pipe, held until the
    service manager has read the messages before it (the daemon holds no other pipes)."""
    return link.startswith("pipe:")

@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs of its own (the storage tests fill it)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mount)],
                   check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill_disk(disk: Path) -> Path:
    """Take every free byte of the disk; the file that did it."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\xff" * 4096)
    finally:
        os.close(fd)
    return filler


def memfds_held(pid: int) -> int:
    """The VMs' memfds process `pid` holds (not the daemon's own journal watermark)."""
    links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    return sum(link.startswith("/memfd:") and "journal-mark" not in link for link in links)


def make_memfd(size: int = 1 << 20, data: bytes = b"guest", name: str = "ram") -> int:
    fd = os.memfd_create(name, os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    os.pwrite(fd, data, 0)
    return fd


def closes_cycle(requires_of: Mapping[str, Sequence[str]], token: str,
                 requires: Sequence[str]) -> bool:
    """The models' own statement of the rule: would `token` requiring `requires` close a
    cycle through the tokens already held (`requires_of`: token -> what it requires)?"""
    todo, seen = list(requires), set()
    while todo:
        current = todo.pop()
        if current == token:
            return True
        if current not in seen and current in requires_of:
            seen.add(current)
            todo += requires_of[current]
    return False


class Host:
    """The one daemon harness: a machine under test. The test bus, a state directory,
    systemd's fd store (`sandbox.Notifications`), and the liveupdated processes that run
    on them in turn: restarts and crashes (same fd store), reboots (a new boot: a fresh
    fd store); and what a test inspects afterwards: journal, handover area, open fds.
    Async tests use `start`/`restart`/`reboot`/`stop`; plain ones `start_now`/`crash_now`.
    """

    def __init__(
        self,
        bus: PrivateBus,
        directory: Path,
        *,
        state_dir: Path | None = None,
        notifications: Notifications | None = None,
    ) -> None:
        self.bus = bus
        self.state_dir = state_dir or directory / "state"
        self._log = (directory / "daemon.log").open("ab")
        self._own_notifications = notifications is None
        self.notifications = notifications or Notifications()  # the fd store of this boot
        self.args: tuple[str, ...] = ()
        self.daemons: list[DaemonProcess] = []  # every process started, the last running

    @property
    def daemon(self) -> DaemonProcess | None:
        return self.daemons[-1] if self.daemons else None

    # Shorter names of the plain tests.
    @property
    def store(self) -> Notifications:
        return self.notifications

    @property
    def state(self) -> Path:
        return self.state_dir

    @property
    def log(self) -> BinaryIO:
        return self._log

    def start_now(
        self, *args: str, store: Notifications | None = None, env: dict[str, str] | None = None
    ) -> DaemonProcess:
        """Start liveupdated (simulated backend), blocking until READY=1; `store`: another
        fd store for this start only; `env`: more environment."""
        self.args = args
        daemon = DaemonProcess(
            self.bus.address, self.state_dir, "--backend", "simulated", *args,
            log=self._log, notifications=store or self.notifications, env=env,
        )
        self.daemons.append(daemon)
        return daemon.start()

    def crash_now(self) -> DaemonProcess:
        """kill -9 the running daemon and start the next one (same fd store)."""
        assert self.daemon is not None
        self.daemon.kill()
        return self.start_now(*self.args)

    @property
    def address(self) -> str:
        return self.bus.address

    @property
    def handover_dir(self) -> Path:
        return self.state_dir / "handover"

    @property
    def journal_path(self) -> Path:
        return self.state_dir / "journal"

    @property
    def pid(self) -> int:
        assert self.daemon is not None
        return self.daemon.pid

    async def start(self, *args: str) -> DaemonProcess:
        """Start liveupdated (simulated backend) and return once it sent READY=1."""
        return await asyncio.to_thread(self.start_now, *args)

    async def restart(self, *, crash: bool = False) -> DaemonProcess:
        """Stop (SIGTERM) or kill (SIGKILL) the daemon and start it again, same boot."""
        await self.stop(crash=crash)
        return await self.start(*self.args)

    async def reboot(
        self, client: Client, between: Callable[[], None] | None = None
    ) -> DaemonProcess:
        """Reboot() through `client`, wait for the old daemon to exit 0, boot a new one
        (after calling `between`, to play with what the old kernel left).

        A new boot starts with an empty fd store, as systemd does after a real kexec.
        """
        assert self.daemon is not None
        await client.reboot()
        status = await asyncio.to_thread(self.daemon.wait, 60)
        assert status == 0, f"the old daemon exited {status} after Reboot()"
        self.notifications.close()
        self.notifications = Notifications()
        if between is not None:
            between()
        return await self.start(*self.args)

    async def stop(self, *, crash: bool = False) -> None:
        """SIGTERM the daemon and wait for it, or SIGKILL it (a crash)."""
        assert self.daemon is not None
        await asyncio.to_thread(self.daemon.kill if crash else self.daemon.stop)

    def connect(self) -> Awaitable[Client]:
        return Client.connect(self.bus.address)

    async def open_fds(self, client: Client) -> int:
        """open_fds() after a round trip through `client`: a reply's fds are closed once
        it is written, so by the time the daemon answers the next call."""
        await client.state()
        return open_fds(self.pid)

    def journal_records(self) -> list[Record]:
        """The journal as it is on disk now, read without touching it (daemon running)."""
        records, damages, _ = decode(self.journal_path.read_bytes())
        assert damages == [], f"the journal is damaged: {damages}"
        return records

    def handover_files(self) -> list[str]:
        """Every file left in the handover area, relative to it."""
        if not self.handover_dir.exists():
            return []
        return sorted(
            str(p.relative_to(self.handover_dir)) for p in self.handover_dir.rglob("*")
            if not p.is_dir()
        )

    def stored_fd_names(self) -> set[str]:
        with self.notifications.changed:
            return set(self.notifications.store)

    def close(self) -> None:
        for daemon in self.daemons:
            daemon.kill()
        if self._own_notifications:
            self.notifications.close()
        self._log.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


@pytest.fixture
def host(bus: PrivateBus, tmp_path: Path) -> Iterator[Host]:
    with Host(bus, tmp_path) as h:
        yield h


def carried_data(area: Path, session: str, token: str) -> tuple[Path, int]:
    """Where the handover area (simulated backend) keeps an fd's data: its file, and
    the offset of the fd's byte 0 in it (small fds share their session's pack)."""
    body = (area / RECORD_NAME).read_bytes().rpartition(b"\n")[0]
    (carried,) = [f for f in from_json(KexecRecord, body).fds
                  if (f.session, f.token) == (session, token)]
    return area / DATA_DIR / carried.file, carried.offset
