"""Fixtures that start real things: a private dbus-daemon and liveupdated processes."""

import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from liveupdated.client import Client
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
    """Start liveupdated on the test bus (same state dir each time: a restart or a boot)."""
    started: list[DaemonProcess] = []
    log = (tmp_path / "daemon.log").open("ab")

    def start(*args: str, env: dict[str, str] | None = None) -> DaemonProcess:
        daemon = DaemonProcess(
            bus.address, state_dir, "--backend", "simulated", *args, log=log, env=env
        )
        started.append(daemon)
        return daemon.start()

    yield start
    for daemon in started:
        daemon.close()
    log.close()


@pytest.fixture
def daemon(start_daemon: DaemonFactory) -> DaemonProcess:
    return start_daemon()


@pytest.fixture
async def client(bus: PrivateBus, daemon: DaemonProcess) -> AsyncIterator[Client]:
    async with await Client.connect(bus.address) as c:
        yield c


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


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


@pytest.fixture
def store() -> Iterator[Notifications]:
    notes = Notifications()
    yield notes
    notes.close()


class Host:
    """Successive daemon processes sharing one state dir and one fd store."""

    def __init__(self, bus: PrivateBus, state: Path, store: Notifications, log: Path) -> None:
        self.bus, self.state, self.store = bus, state, store
        self.log = log.open("ab")
        self.daemons: list[DaemonProcess] = []

    def start(self, store: Notifications | None = None) -> DaemonProcess:
        daemon = DaemonProcess(self.bus.address, self.state, "--backend", "simulated",
                               log=self.log, notifications=store or self.store)
        self.daemons.append(daemon)
        return daemon.start()

    def crash(self) -> DaemonProcess:
        """kill -9 the running daemon and start the next one."""
        self.daemons[-1].process.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
        self.daemons[-1].wait()
        return self.start()

    def close(self) -> None:
        for daemon in self.daemons:
            daemon.kill()
        self.log.close()


@pytest.fixture
def host(bus: PrivateBus, tmp_path: Path, store: Notifications) -> Iterator[Host]:
    h = Host(bus, tmp_path / "state", store, tmp_path / "daemon.log")
    yield h
    h.close()
