"""The kernel backend against a model of LUO (no /dev/liveupdate needed: default suite).

FakeLuo stands in for luo_uapi's calls with the kernel's rules as read in its source
(kernel/liveupdate/luo_session.c, luo_file.c, mm/memfd_luo.c): one opener; closing an
outgoing session unpreserves it; a file is preserved once; a retrieved memfd is nameless,
fully allocated, at its old position and with its seals. The real kernel is in
test_kexec.py.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import itertools
import os
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from liveupdated import daemon as daemon_module
from liveupdated.backends import kernel, luo_uapi
from liveupdated.config import Config
from liveupdated.core.errors import (
    NoSuchSession,
    NoSuchToken,
    SessionExists,
    UnsupportedFd,
    WrongState,
)
from liveupdated.core.orchestrator import Caller, FdEntry, Phase
from liveupdated.daemon import Daemon
from liveupdated.fds import memfd
from liveupdated.sandbox import Notifications
from liveupdated.service import LiveUpdate
from liveupdated.systemd import boot_id

MIB = 1 << 20


def _fail(code: int) -> OSError:
    return OSError(code, os.strerror(code))


@dataclass
class FakeSession:
    name: str
    files: dict[int, int] = field(default_factory=dict)  # token -> the kernel's reference
    retrieved: bool = False


@dataclass
class FakeLuo:
    """LUO as a dict: handles are memfds with unique names, so that a handle closed by
    the backend (os.close) is seen as closed even if its number is reused."""

    loaded: bool = True
    device: int | None = None
    outgoing: dict[int, FakeSession] = field(default_factory=dict)
    incoming: dict[str, FakeSession] = field(default_factory=dict)
    handles: dict[int, FakeSession] = field(default_factory=dict)
    _names: Iterator[int] = field(default_factory=itertools.count)

    def _handle(self, tag: str) -> int:
        return os.memfd_create(f"fake-luo-{tag}-{next(self._names)}", os.MFD_CLOEXEC)

    def _open(self, fd: int) -> bool:
        try:
            return os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:fake-luo-")
        except OSError:
            return False

    def _live_outgoing(self) -> dict[int, FakeSession]:
        """Outgoing sessions whose fd is still open; the others were unpreserved."""
        for fd in [fd for fd in self.outgoing if not self._open(fd)]:
            for ref in self.outgoing.pop(fd).files.values():
                os.close(ref)
        return self.outgoing

    def open_device(self, path: str = luo_uapi.DEVICE) -> int:
        if self.device is not None and self._open(self.device):
            raise _fail(errno.EBUSY)
        self.device = self._handle("device")
        return self.device

    def create_session(self, device: int, name: str) -> int:
        luo_uapi.encode_name(name)
        if any(s.name == name for s in self._live_outgoing().values()):
            raise _fail(errno.EEXIST)
        fd = self._handle("session")
        self.outgoing[fd] = FakeSession(name)
        return fd

    def preserve_fd(self, session: int, fd: int, token: int) -> None:
        files = self.outgoing[session].files
        if token in files:
            raise _fail(errno.EEXIST)
        if memfd.memfd_name(os.readlink(f"/proc/self/fd/{fd}")) is None:
            raise _fail(errno.ENOENT)
        inode = os.fstat(fd).st_ino
        preserved = (r for s in self._live_outgoing().values() for r in s.files.values())
        if any(os.fstat(r).st_ino == inode for r in preserved):
            raise _fail(errno.EBUSY)
        files[token] = os.dup(fd)

    def kexec(self) -> None:
        """What the next kernel finds: every open session, each memfd copied nameless with
        every page allocated, its position and seals."""
        assert self.loaded
        self.incoming = {}
        for session in self._live_outgoing().values():
            carried = FakeSession(session.name)
            for token, ref in session.files.items():
                size = os.fstat(ref).st_size
                copy = os.memfd_create("", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
                os.pwrite(copy, os.pread(ref, size, 0) if size else b"", 0)
                os.ftruncate(copy, size)
                os.lseek(copy, os.lseek(ref, 0, os.SEEK_CUR), os.SEEK_SET)
                fcntl.fcntl(copy, fcntl.F_ADD_SEALS, memfd.seals_of(ref))
                carried.files[token] = copy
                os.close(ref)
            self.incoming[session.name] = carried
        for fd in [*self.outgoing, *self.handles, self.device]:
            if fd is not None and self._open(fd):
                os.close(fd)  # the old boot's processes are gone
        self.outgoing, self.handles, self.device = {}, {}, None

    def retrieve_session(self, device: int, name: str) -> int:
        session = self.incoming.get(name)
        if session is None:
            raise _fail(errno.ENOENT)
        if session.retrieved:
            raise _fail(errno.EINVAL)
        session.retrieved = True
        fd = self._handle("incoming")
        self.handles[fd] = session
        return fd

    def retrieve_fd(self, session: int, token: int) -> int:
        ref = self.handles[session].files.get(token)
        if ref is None:
            raise _fail(errno.ENOENT)
        fd = os.dup(ref)
        os.set_inheritable(fd, False)
        return fd

    def finish_session(self, session: int) -> None:
        finished = self.handles[session]
        for ref in finished.files.values():
            os.close(ref)
        del self.incoming[finished.name]

    def kexec_loaded(self) -> bool:
        return self.loaded


@pytest.fixture
def luo(monkeypatch: pytest.MonkeyPatch) -> FakeLuo:
    fake = FakeLuo()
    for call in ("open_device", "create_session", "preserve_fd", "retrieve_session",
                 "retrieve_fd", "finish_session", "kexec_loaded"):
        monkeypatch.setattr(luo_uapi, call, getattr(fake, call))
    monkeypatch.setattr(kernel, "pid1_preserves_fd_stores", lambda: None)  # not this host's
    return fake


def backend_(*, exact_names: bool = True) -> kernel.KernelBackend:
    return kernel.KernelBackend(exact_names=exact_names, holder=False)


def guest_memory(name: str = "guest-ram", size: int = 4 * MIB) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    os.pwrite(fd, b"\x5a" * 8192, MIB)
    os.pwrite(fd, b"tail", size - 4)
    os.lseek(fd, 12345, os.SEEK_SET)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


def entry_of(token: str, fd: int, requires: tuple[str, ...] = ()) -> FdEntry:
    facts = memfd.inspect(fd)
    return FdEntry(token, facts.kind, requires, facts.size, facts.name, facts.seals)


def facts(fd: int) -> tuple[object, ...]:
    size = os.fstat(fd).st_size
    return (size, os.pread(fd, size, 0), memfd.seals_of(fd), memfd.data_extents(fd, size),
            os.lseek(fd, 0, os.SEEK_CUR),
            memfd.memfd_name(os.readlink(f"/proc/self/fd/{fd}")))


def held() -> tuple[dict[tuple[str, str], int], dict[tuple[str, str], FdEntry]]:
    fds = {("vm1", "ram"): guest_memory(), ("vm1", "state"): guest_memory("state", 8192),
           ("vm2", "ram"): guest_memory("other-ram", 2 * MIB)}
    entries = {key: entry_of(key[1], fd) for key, fd in fds.items()}
    return fds, entries


def handed_over(luo: FakeLuo) -> dict[tuple[str, str], FdEntry]:
    """The fds of held(), preserved and handed over by one backend, then a kexec: their
    entries, for the backend of the next kernel."""
    fds, entries = held()
    old = backend_()
    old.prepare_handover(fds, entries)
    old.write_handover(fds, entries, "old-boot", lambda n: None)
    luo.kexec()
    return entries


def test_a_kexec_hands_every_fd_back_exactly(luo: FakeLuo) -> None:
    fds, entries = held()
    before = {key: facts(fd) for key, fd in fds.items()}
    old = backend_()
    assert old.find_handover() is None
    old.prepare_handover(fds, entries)
    carried = old.write_handover(fds, entries, "old-boot", lambda n: None)
    assert carried == sum(os.fstat(fd).st_size for fd in fds.values())
    luo.kexec()

    new = backend_()
    handover = new.find_handover()
    assert handover is not None
    assert handover.boot_id == "old-boot"
    assert handover.keys == set(fds)
    for key, entry in entries.items():
        fd = new.retrieve_fd(key, entry)
        assert facts(fd) == before[key]
        os.close(fd)
    new.finish()
    assert luo.incoming == {}


def test_finishing_a_session_frees_what_it_did_not_retrieve(luo: FakeLuo) -> None:
    entries = handed_over(luo)
    new = backend_()
    new.find_handover()
    os.close(new.retrieve_fd(("vm1", "ram"), entries["vm1", "ram"]))
    new.finish_session("vm1", ["state"])
    assert sorted(luo.incoming) == ["liveupdated:index", "vm2"]
    new.finish()
    assert luo.incoming == {}


def test_a_damaged_index_is_reported_and_released_by_finish(luo: FakeLuo) -> None:
    handed_over(luo)
    index = luo.incoming[kernel.INDEX_SESSION].files[kernel.MANIFEST_TOKEN]
    damaged = os.memfd_create("", os.MFD_CLOEXEC)
    os.write(damaged, b"{not json")
    os.dup2(damaged, index)
    os.close(damaged)
    new = backend_()
    handover = new.find_handover()
    assert handover is not None
    assert handover.damage is not None
    assert "manifest" in handover.damage
    new.finish()
    assert kernel.INDEX_SESSION not in luo.incoming


def test_by_default_the_kernels_memfd_comes_back_uncopied(luo: FakeLuo) -> None:
    """No copy (which would need the guest memory twice until Finish): the memfd as the
    kernel restores it, nameless and fully allocated, with its content, seals and
    position; the name it had is the journal's (Session.FdNames)."""
    fds, _ = held()
    before = facts(fds["vm1", "ram"])
    entries = handed_over(luo)
    new = kernel.KernelBackend(holder=False)
    assert new.exact_names is False
    new.find_handover()
    fd = new.retrieve_fd(("vm1", "ram"), entries["vm1", "ram"])
    after = facts(fd)
    assert after[5] == ""  # the name: the kernel's memfd, not a copy
    assert after[3] == [(0, after[0])]  # every page allocated
    assert (after[0], after[1], after[2], after[4]) == (
        before[0], before[1], before[2], before[4])
    os.close(fd)


def test_cancel_leaves_nothing_preserved(luo: FakeLuo) -> None:
    fds, entries = held()
    backend = backend_()
    backend.prepare_handover(fds, entries)
    backend.discard_handover()
    assert luo._live_outgoing() == {}
    backend.prepare_handover(fds, entries)  # and Prepare works again
    assert len(luo._live_outgoing()) == 2


def test_a_restarted_daemon_prepares_again_at_reboot(luo: FakeLuo) -> None:
    fds, entries = held()
    first = backend_()
    first.prepare_handover(fds, entries)
    for session_fd in [luo.device, *luo.outgoing]:  # the daemon dies: its fds close
        assert session_fd is not None
        os.close(session_fd)
    second = backend_()
    second.write_handover(fds, entries, "old-boot", lambda n: None)
    luo.kexec()
    assert backend_().find_handover() is not None


def test_reboot_can_be_retried(luo: FakeLuo) -> None:
    fds, entries = held()
    backend = backend_()
    backend.prepare_handover(fds, entries)
    backend.write_handover(fds, entries, "old-boot", lambda n: None)
    backend.write_handover(fds, entries, "old-boot", lambda n: None)
    luo.kexec()
    handover = backend_().find_handover()
    assert handover is not None
    assert handover.keys == set(fds)


def test_reboot_needs_a_loaded_kernel(luo: FakeLuo) -> None:
    fds, entries = held()
    luo.loaded = False
    backend = backend_()
    backend.prepare_handover(fds, entries)
    with pytest.raises(WrongState, match="kexec_loaded"):
        backend.write_handover(fds, entries, "old-boot", lambda n: None)


def test_kernel_errors_become_contract_errors_naming_the_errno(luo: FakeLuo) -> None:
    backend = backend_()
    read_end, write_end = os.pipe()
    pipe_entry = FdEntry("pipe", "memfd", (), 0, "", 0)
    with pytest.raises(UnsupportedFd, match="ENOENT"):
        backend.prepare_handover({("vm1", "pipe"): read_end}, {("vm1", "pipe"): pipe_entry})
    assert luo._live_outgoing() == {}  # rolled back
    fd = guest_memory()
    twice = {("vm1", "a"): fd, ("vm1", "b"): fd}
    with pytest.raises(UnsupportedFd, match="EBUSY"):
        backend.prepare_handover(twice, {k: entry_of(k[1], fd) for k in twice})
    with pytest.raises(WrongState, match="EBUSY"):
        backend_()  # one opener at a time
    luo.create_session(0, "taken")
    with pytest.raises(SessionExists, match="EEXIST"):
        backend.prepare_handover({("taken", "a"): fd}, {("taken", "a"): entry_of("a", fd)})
    for end in (read_end, write_end):
        os.close(end)


def test_a_token_missing_from_the_handover_is_no_such_token(luo: FakeLuo) -> None:
    entries = handed_over(luo)
    new = backend_()
    with pytest.raises(NoSuchToken):
        new.retrieve_fd(("vm1", "nothing"), entries["vm1", "ram"])
    with pytest.raises(NoSuchToken):
        new.retrieve_fd(("vm9", "ram"), entries["vm1", "ram"])


def test_zero_pages_are_holes_after_restore() -> None:
    fd = os.memfd_create("scan", os.MFD_CLOEXEC)
    os.ftruncate(fd, 8 * MIB + 100)
    os.pwrite(fd, b"x", 3 * MIB + 5)
    os.pwrite(fd, b"y" * 5000, 5 * MIB - 10)
    os.pwrite(fd, bytes(4096), 6 * MIB)  # written zeros count as a hole
    os.pwrite(fd, b"z", 8 * MIB + 99)
    assert kernel.nonzero_extents(fd, 8 * MIB + 100) == [
        (3 * MIB, 4096), (5 * MIB - 4096, 3 * 4096), (8 * MIB, 100)]
    assert kernel.nonzero_extents(fd, 0) == []


def test_the_holder_keeps_the_sessions_after_the_daemon_is_gone(luo: FakeLuo) -> None:
    fds, entries = held()
    backend = kernel.KernelBackend(holder=True)
    backend.prepare_handover(fds, entries)
    backend.write_handover(fds, entries, "old-boot", lambda n: None)
    holder = backend.holder_process
    assert holder is not None
    try:
        assert kernel._cmdline(holder.pid).startswith(b"@liveupdated-luo-holder")
        fd_dir = f"/proc/{holder.pid}/fd"
        links = [os.readlink(f"{fd_dir}/{n}") for n in os.listdir(fd_dir)]
        held_handles = [link for link in links if link.startswith("/memfd:fake-luo-")]
        assert len(held_handles) == 4  # the device, vm1, vm2 and the index
    finally:
        holder.kill()
        holder.wait()


def _spawned_holder(luo: FakeLuo) -> tuple[kernel.KernelBackend, subprocess.Popen[bytes]]:
    fds, entries = held()
    backend = kernel.KernelBackend(holder=True)
    backend.prepare_handover(fds, entries)
    backend.write_handover(fds, entries, "old-boot", lambda n: None)
    assert backend.holder_process is not None
    return backend, backend.holder_process


def test_cancel_after_reboot_ends_the_holder(luo: FakeLuo) -> None:
    """Cancel, or a Reboot whose kexec fails: no holder is left owning /dev/liveupdate."""
    backend, holder = _spawned_holder(luo)
    try:
        backend.discard_handover()
        assert holder.poll() is not None
        assert backend.holder_process is None
        assert luo._live_outgoing() == {}
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_a_retried_reboot_leaves_one_holder(luo: FakeLuo) -> None:
    backend, first = _spawned_holder(luo)
    fds, entries = held()
    try:
        backend.prepare_handover(fds, entries)
        backend.write_handover(fds, entries, "old-boot", lambda n: None)
        assert first.poll() is not None
        assert backend.holder_process is not None
        assert backend.holder_process.poll() is None
    finally:
        backend.discard_handover()
        if first.poll() is None:
            first.kill()
            first.wait()


def test_the_next_daemon_stops_a_holder_whose_kexec_never_came(
    luo: FakeLuo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reboot action failed (or the daemon crashed after Reboot): the restarted
    daemon finds the device busy with the old holder, stops it and opens the device."""
    old, holder = _spawned_holder(luo)
    old.holder_process = None  # the old daemon is gone; its holder is not
    assert luo.device is not None
    device = os.readlink(f"/proc/self/fd/{luo.device}")
    for fd in [luo.device, *luo.outgoing]:
        os.close(fd)
    find = kernel.holder_pids
    monkeypatch.setattr(kernel, "holder_pids", lambda path: find(device))
    opened = luo.open_device

    def busy_while_held(path: str = luo_uapi.DEVICE) -> int:
        if holder.poll() is None:
            raise _fail(errno.EBUSY)
        return opened(path)

    monkeypatch.setattr(luo_uapi, "open_device", busy_while_held)
    try:
        assert find(device) == [holder.pid]
        new = kernel.KernelBackend(holder=False)
        assert holder.poll() is not None
        assert new.find_handover() is None
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_no_holder_where_pid1_preserves_fd_stores(
    luo: FakeLuo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """systemd >= 261 preserves fd stores through LUO in systemd-shutdown, which needs
    /dev/liveupdate: the kernel backend refuses at Prepare instead of spawning a holder
    that would make every store be lost."""
    monkeypatch.setattr(kernel, "pid1_preserves_fd_stores", lambda: 262)
    fds, entries = held()
    with pytest.raises(WrongState, match=r"systemd 262 .*--backend fdstore"):
        kernel.KernelBackend(holder=True).prepare_handover(fds, entries)
    assert luo._live_outgoing() == {}
    luo.device = None  # that backend is dropped; its device with it
    kernel.KernelBackend(holder=False).prepare_handover(fds, entries)  # no holder: no risk


def test_pid1_preservation_is_only_systemds_from_261(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernel, "under_systemd", lambda: True)
    for version, expected in (("260.1-1", None), ("261", 261), ("262.1-1", 262)):
        monkeypatch.setattr(kernel, "pid1", lambda manager_props, v=version: {"Version": v})
        assert kernel.pid1_preserves_fd_stores() == expected
    monkeypatch.setattr(kernel, "under_systemd", lambda: False)
    assert kernel.pid1_preserves_fd_stores() is None


# ---- the daemon on this backend: Session.Finish pipelined with Manager.Finish ----------


def daemon_on(luo: FakeLuo, state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Daemon:
    """A daemon as `liveupdated --backend kernel` builds it, in this process (where the
    model of LUO is), without its session holder: the kexec here is the model's."""

    def kernel_backend(config: Config, forget: Callable[[str], None],
                       inherited: Sequence[str] | None, store: Callable[[str, int], None],
                       adopted: Mapping[str, int] | None) -> kernel.KernelBackend:
        return kernel.KernelBackend(holder=False, store=store, forget=forget, adopted=adopted)

    monkeypatch.setattr(daemon_module, "make_backend", kernel_backend)
    return Daemon(Config(state_dir=state_dir, backend="kernel", reboot_action="exit"))


class AtOnce:
    """How many calls of the backend's, which run in threads, were under way at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = self.most = 0
        self.started = threading.Event()

    def counted(self, method: Callable[..., None]) -> Callable[..., None]:
        def call(*args: object) -> None:
            with self.lock:
                self.running += 1
                self.most = max(self.most, self.running)
            self.started.set()
            try:
                # A kernel's FINISH takes its time (it frees what was not retrieved):
                # calls that could overlap do, instead of finishing first by chance.
                time.sleep(0.05)
                method(*args)
            finally:
                with self.lock:
                    self.running -= 1
        return call


async def through_a_kexec(luo: FakeLuo, state_dir: Path, monkeypatch: pytest.MonkeyPatch,
                          vmm: Caller, names: Sequence[str]) -> LiveUpdate:
    """Sessions `names` of two memfds each, carried by one daemon through Reboot and the
    model's kexec: the next daemon's service."""
    old = daemon_on(luo, state_dir, monkeypatch).recover()
    try:
        for n, name in enumerate(names):
            await old.create_session(vmm, name)
            fds = [(token, guest_memory(f"{name}-{token}", MIB * (n + 1)), ())
                   for token in ("ram", "state")]
            await old.preserve_fds(vmm, name, fds, "PreserveFds")
        await old.prepare(vmm)
        await old.freeze(vmm)
        await old.reboot(vmm)
        with old.core.unconditional():  # the exit that stands for the kexec (daemon.run)
            old.journal.enqueue(old.core.simulated_kexec_done(boot_id()))
    finally:
        await old.journal.aclose()
        old.notifier.close()
    luo.kexec()
    return daemon_on(luo, state_dir, monkeypatch).recover()


@pytest.mark.parametrize(
    "order", ["session first", "manager first", "together", "while the kernel finishes one"])
async def test_session_finish_pipelined_with_manager_finish_finishes_each_kernel_session_once(
    luo: FakeLuo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, order: str
) -> None:
    """On the kernel backend a Finish is the kernel's: a session finished twice, or
    retrieved from after its finish, is an error the kernel answers. Whatever lands
    first, each one is finished once and every call is answered: done, or as the
    contract says of a session the update's end has let go (NoSuchSession, WrongState)."""
    store = Notifications()
    monkeypatch.setenv("NOTIFY_SOCKET", str(store.path))
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    calls_at_once = AtOnce()
    for method in ("finish_session", "finish"):
        monkeypatch.setattr(kernel.KernelBackend, method,
                            calls_at_once.counted(getattr(kernel.KernelBackend, method)))
    vmm = Caller(uid=0, unit="", client=":1.7", admin=True)
    names = [f"vm{n}" for n in range(4)]
    new = await through_a_kexec(luo, tmp_path / "state", monkeypatch, vmm, names)
    try:
        assert [new.core.phase] == [Phase.UPDATED]  # (a list: the phase changes below)
        assert sorted(luo.incoming) == sorted([*names, kernel.INDEX_SESSION])
        for name in names:
            new.retrieve_session(vmm, name)
        os.close(await new.retrieve_fd(vmm, names[0], "ram"))  # one handed out

        finishes: list[Awaitable[None]] = [new.finish_session(vmm, name) for name in names]
        if order == "session first":
            calls = [*finishes, new.finish(vmm)]
        elif order == "manager first":
            calls = [new.finish(vmm), *finishes]
        elif order == "together":
            calls = [finishes[0], new.finish(vmm), *finishes[1:]]
        else:
            first = asyncio.ensure_future(finishes[0])
            await asyncio.to_thread(calls_at_once.started.wait, 10)
            calls = [first, new.finish(vmm), *finishes[1:]]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        for outcome in outcomes:
            assert outcome is None or isinstance(outcome, NoSuchSession | WrongState), outcome
        assert outcomes[0] is None  # the first call always does its part
        assert new.core.phase is Phase.NORMAL
        assert calls_at_once.most == 1
        assert luo.incoming == {}  # each finished, none twice (the model raises then)
        assert new.core.sessions == {}
    finally:
        await new.journal.aclose()
        new.notifier.close()
        store.close()
