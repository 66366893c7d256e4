"""The fdstore backend (systemd carries the fds) and the evidence of a new boot it rests on:
systemd's reboot counts recorded at Reboot, recovery that keeps the carried fds, `auto`."""

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from liveupdated import config as config_module
from liveupdated.backends import UNKNOWN_BOOT, RebootCounts
from liveupdated.backends import fdstore as fdstore_module
from liveupdated.backends.fdstore import FdStoreBackend, check_pid1_can_hold, pid1_fd_limit
from liveupdated.config import Config
from liveupdated.core.codec import from_json, to_json
from liveupdated.core.errors import (
    Corrupted,
    NoSuchToken,
    QuotaExceeded,
    UnsupportedFd,
    WrongState,
)
from liveupdated.core.orchestrator import Orchestrator, Phase
from liveupdated.core.records import RebootStarted, Record
from liveupdated.core.recovery import (
    Adopt,
    BootEvidence,
    HandoverFound,
    Hold,
    Spare,
    StartFacts,
    StoredFd,
    recover,
)
from liveupdated.systemd import Pid1Error, systemd_version
from tests.test_core import ROOT, VM, core_with, freeze, prepare, replayed

BOOT = "0123456789abcdef0123456789abcdef"


def frozen_after_reboot(soft: int | None, kexecs: int | None) -> tuple[Orchestrator, list[Record]]:
    core = core_with("ram", "state")
    records = [*core.snapshot(), *prepare(core), *freeze(core)]
    records += core.begin_reboot(ROOT, BOOT, soft, kexecs)
    return replayed(core, records), records


# ---- evidence ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("now", "new_boot"),
    [
        ((3, 0), False),  # a plain restart: the counts did not move
        ((4, 0), True),  # a soft-reboot
        ((3, 1), True),  # a kexec carrying the fd store
        ((None, None), False),  # systemd could not say: no evidence
        ((2, 0), False),  # fewer: not more, so no evidence (a new machine would reset)
    ],
)
def test_more_soft_reboots_or_kexecs_than_at_reboot_is_a_new_boot(
    now: tuple[int | None, int | None], new_boot: bool
) -> None:
    core, _ = frozen_after_reboot(3, 0)
    assert core.phase is Phase.FROZEN and core.reboot is not None
    assert core.reboot.soft_reboots == 3 and core.reboot.kexecs == 0
    assert core.is_new_boot(UNKNOWN_BOOT, BOOT, readable=False,
                            soft_reboots=now[0], kexecs=now[1]) is new_boot


def test_another_boot_id_is_evidence_without_counts() -> None:
    core, _ = frozen_after_reboot(None, None)
    assert core.is_new_boot(UNKNOWN_BOOT, "another-boot", readable=False)
    assert not core.is_new_boot(UNKNOWN_BOOT, BOOT, readable=False, soft_reboots=9, kexecs=9)


def test_counts_without_a_journaled_reboot_are_no_evidence() -> None:
    core = core_with("ram")
    prepare(core)
    freeze(core)
    assert not core.is_new_boot(UNKNOWN_BOOT, BOOT, readable=False, soft_reboots=5, kexecs=5)


def test_counts_survive_compaction_and_older_journals_still_replay() -> None:
    core, _ = frozen_after_reboot(7, 2)
    again = replayed(core, core.snapshot())
    assert again.reboot is not None
    assert (again.reboot.soft_reboots, again.reboot.kexecs) == (7, 2)
    old = b'{"type":"reboot_started","boot_id":"' + BOOT.encode() + b'","at_usec":1}'
    decoded = from_json(RebootStarted, old)
    assert (decoded.soft_reboots, decoded.kexecs) == (None, None)
    assert from_json(RebootStarted, to_json(core.reboot)) == core.reboot


# ---- the backend --------------------------------------------------------------------------


def memfd(data: bytes, name: str = "guest-ram") -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.write(fd, data)
    return fd


@pytest.fixture
def pid1(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A stand-in for systemd on the system bus: what it answers, and the calls it got."""
    answers: dict[str, Any] = {"FileDescriptorStorePreserve": "yes", "Version": "262.1-1",
                               "SoftRebootsCount": 0, "KExecCount": 0, "calls": []}

    def fake(manager_props: tuple[str, ...] = (), unit_props: tuple[str, ...] = (),
             call: str = "", args: tuple[object, ...] = (), signature: str = "") -> dict[str, Any]:
        if answers.get("down"):
            raise Pid1Error("no system bus")
        if call:
            answers["calls"].append((call, args))
        return {k: answers[k] for k in (*manager_props, *unit_props) if k in answers}

    monkeypatch.setattr(fdstore_module, "pid1", fake)
    return answers


def test_reboot_checks_that_the_unit_keeps_its_store_and_every_fd_is_a_memfd(
    pid1: dict[str, Any],
) -> None:
    backend = FdStoreBackend()
    ram = memfd(b"x" * 4096)
    left, right = socket.socketpair()
    try:
        backend.check_carried({("vm", "ram"): ram})
        with pytest.raises(UnsupportedFd, match="vm/sock cannot be carried"):
            backend.check_carried({("vm", "ram"): ram, ("vm", "sock"): left.fileno()})
        pid1["FileDescriptorStorePreserve"] = "restart"
        with pytest.raises(WrongState, match="FileDescriptorStorePreserve=restart"):
            backend.check_carried({("vm", "ram"): ram})
        del pid1["FileDescriptorStorePreserve"]  # systemd 252 has no such property
        with pytest.raises(WrongState, match="unsupported"):
            backend.check_carried({})
        pid1["down"] = True
        with pytest.raises(WrongState, match="no system bus"):
            backend.check_carried({})
        assert backend.reboot_counts() is None
    finally:
        os.close(ram)
        left.close()
        right.close()


def test_reboot_counts_come_from_the_manager(pid1: dict[str, Any]) -> None:
    pid1.update(SoftRebootsCount=4, KExecCount=1)
    assert FdStoreBackend().reboot_counts() == RebootCounts(soft_reboots=4, kexecs=1)
    del pid1["KExecCount"]
    assert FdStoreBackend().reboot_counts() == RebootCounts(soft_reboots=4, kexecs=None)


def test_retrieve_is_a_dup_of_the_carried_file_and_finish_releases_the_rest() -> None:
    forgotten: list[str] = []
    backend = FdStoreBackend(forgotten.append)
    ram, state = memfd(b"guest memory"), memfd(b"device state", "vm-state")
    backend.adopt((VM, "ram"), ram)
    backend.adopt((VM, "state"), state)
    entry = replayed(core_with("ram"), core_with("ram").snapshot()).sessions[VM].fds["ram"]

    got = backend.retrieve_fd((VM, "ram"), entry)
    try:
        assert got != ram
        assert (os.fstat(got).st_ino, os.fstat(got).st_dev) == (
            os.fstat(ram).st_ino, os.fstat(ram).st_dev)  # the same file: nothing copied
        assert os.pread(got, 12, 0) == b"guest memory"
    finally:
        os.close(got)
    with pytest.raises(NoSuchToken, match="did not come back"):
        backend.retrieve_fd((VM, "other"), entry)

    backend.finish_session(VM, ["state"])
    assert forgotten == [f"{VM}/state"]
    with pytest.raises(OSError):
        os.fstat(state)  # closed
    backend.finish()
    assert forgotten == [f"{VM}/state", f"{VM}/ram"]
    assert backend.carried() == frozenset()


def test_a_sealed_memfd_of_another_size_is_corrupted() -> None:
    import fcntl

    backend = FdStoreBackend()
    fd = os.memfd_create("state", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, b"12345")
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK)
    backend.adopt((VM, "state"), fd)
    entry = core_with("state").sessions[VM].fds["state"]  # its record says 4096 bytes
    sealed = type(entry)(**{**entry.__dict__, "seals": fcntl.F_SEAL_GROW})
    with pytest.raises(Corrupted, match="5 bytes"):
        backend.retrieve_fd((VM, "state"), sealed)
    backend.finish()


def test_the_handover_is_what_came_back_in_the_fd_store(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LISTEN_FDNAMES", f"{VM}/ram:{VM}/state")
    handover = FdStoreBackend().find_handover()
    assert handover is not None and handover.boot_id == UNKNOWN_BOOT
    assert handover.keys == {(VM, "ram"), (VM, "state")}
    assert os.environ["LISTEN_FDNAMES"]  # left for recovery to take


# ---- recovery -----------------------------------------------------------------------------


class Notes:
    """A Notifier stand-in that records fd store messages."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def store_fd(self, name: str, fd: int) -> None:
        self.messages.append(f"store {name}")

    def remove_fd(self, name: str) -> None:
        self.messages.append(f"remove {name}")


def _facts(core: Orchestrator, names: list[str], keys: frozenset[tuple[str, str]], *,
           soft_reboots: int, in_store: bool = True) -> StartFacts:
    stored = tuple(StoredFd(i, name, 1, 100 + i, 4096) for i, name in enumerate(names))
    return StartFacts(
        stored=stored, has_store=True, store_survived=True,
        handover=HandoverFound(boot_id="unknown", keys=keys, in_store=in_store),
        boot=BootEvidence(BOOT, soft_reboots=soft_reboots, kexecs=0),
        carrier_keeps_store=in_store,
    )


def test_after_a_soft_reboot_the_carried_fds_are_adopted_and_a_restart_is_no_new_boot() -> None:
    _, records = frozen_after_reboot(0, 0)
    names = [f"{VM}/ram", f"{VM}/state"]
    keys = frozenset((VM, t) for t in ("ram", "state"))

    # A restart after Reboot, before systemd's soft-reboot: no evidence, still frozen.
    restarted = replayed(Orchestrator(), records)
    recovery = recover(restarted, _facts(restarted, names, keys, soft_reboots=0))
    assert restarted.phase is Phase.FROZEN and restarted.reboot is None
    assert [type(e) for e in recovery.effects] == [Hold, Hold]

    # The soft-reboot: SoftRebootsCount 0 -> 1; the store comes back with both fds.
    core = replayed(Orchestrator(), records)
    recovery = recover(core, _facts(core, names, keys, soft_reboots=1))
    assert core.phase is Phase.UPDATED
    assert [r.type for r in recovery.records] == ["rebooted"]
    assert recovery.records[0].boot_id == BOOT  # type: ignore[union-attr]
    assert recovery.effects == [Adopt(0, (VM, "ram")), Adopt(1, (VM, "state"))]


def test_without_a_carrier_the_old_boots_fds_are_kept_as_spares_until_finish() -> None:
    """The handover carries their content; the old boot's own files are not closed on
    that belief but kept, never handed out, until the durable Finish releases them."""
    core, _ = frozen_after_reboot(None, None)
    core.rebooted("previous")
    facts = StartFacts(stored=(StoredFd(0, f"{VM}/ram", 1, 7, 4096),), has_store=True,
                       store_survived=True, carrier_keeps_store=False)
    recovery = recover(core, facts)
    assert recovery.effects == [Spare(0, (VM, "ram"))]
    assert recovery.records == []


# ---- auto ---------------------------------------------------------------------------------


def test_auto_picks_the_fd_store_where_pid1_carries_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INVOCATION_ID", "0" * 32)
    monkeypatch.setattr(config_module, "_pid1_carries_fds", lambda kexec: True)
    assert Config().resolved_backend() == "fdstore"
    assert Config().resolved_reboot_action() in ("soft-reboot", "kexec")
    assert Config(bus="unix:path=/run/private").resolved_backend() in ("simulated", "kernel")
    monkeypatch.setattr(config_module, "_pid1_carries_fds", lambda kexec: False)
    assert Config().resolved_backend() in ("simulated", "kernel")
    assert Config(backend="fdstore").resolved_backend() == "fdstore"


def test_auto_off_systemd_never_asks_pid1(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    config_module._pid1_carries_fds.cache_clear()
    monkeypatch.setattr(fdstore_module, "pid1", lambda **kw: pytest.fail("asked PID 1"))
    assert not config_module._pid1_carries_fds(False)
    config_module._pid1_carries_fds.cache_clear()


def test_pid1_capability_by_version_and_unit_property(pid1: dict[str, Any]) -> None:
    assert fdstore_module.pid1_carries_fds(kexec=False)
    assert fdstore_module.pid1_carries_fds(kexec=True)
    pid1["Version"] = "257.9-1~deb13u1"  # trixie: soft-reboot, no LUO kexec
    assert fdstore_module.pid1_carries_fds(kexec=False)
    assert not fdstore_module.pid1_carries_fds(kexec=True)
    pid1["Version"] = "252.38-1~deb12u1"
    del pid1["FileDescriptorStorePreserve"]  # bookworm
    assert not fdstore_module.pid1_carries_fds(kexec=False)
    pid1["Version"] = "262.1"
    pid1["FileDescriptorStorePreserve"] = "no"  # capable, but this unit does not keep it
    assert not fdstore_module.pid1_carries_fds(kexec=False)


@pytest.mark.parametrize(
    ("text", "major"),
    [("262.1-1", 262), ("252.38-1~deb12u1", 252), ("v257", 257), ("", 0), ("x", 0)],
)
def test_systemd_version(text: str, major: int) -> None:
    assert systemd_version(text) == major


# ---- PID 1's fd limit: it copies every stored fd at the reboot ----------------------------


def test_pid1_fd_limit_is_read_from_its_limits(tmp_path: Path) -> None:
    limits = tmp_path / "limits"
    limits.write_text(
        "Limit                     Soft Limit           Hard Limit           Units     \n"
        "Max open files            20000                20000                files     \n")
    assert pid1_fd_limit(str(limits)) == 20000
    limits.write_text("Max open files            unlimited            unlimited   files\n")
    assert pid1_fd_limit(str(limits)) is None
    assert pid1_fd_limit(str(tmp_path / "missing")) is None
    assert isinstance(pid1_fd_limit(), int | None)  # this machine's PID 1


@pytest.mark.parametrize(("stored", "limit", "refused"), [
    (10_000, 20_000, True),  # what lost every store in a container here
    (256, 20_000, False),
    (7_952, 20_000, False),
    (7_953, 20_000, True),
    (95_232, None, False),  # unknown: not refused on a guess
])
def test_prepare_is_refused_when_pid1_could_not_copy_the_stores(
    stored: int, limit: int | None, refused: bool
) -> None:
    if refused:
        with pytest.raises(QuotaExceeded, match="PID 1 may hold"):
            check_pid1_can_hold(stored, limit)
    else:
        check_pid1_can_hold(stored, limit)


def test_the_start_asks_pid1_once_for_the_backend_and_the_reboot_counts(
    pid1: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Choosing the backend reads the counts too: recovery's look at them at start-up
    costs no second connection to PID 1; a later Reboot asks afresh."""
    asked: list[tuple[str, ...]] = []
    answer: Callable[..., dict[str, Any]] = fdstore_module.pid1  # type: ignore[attr-defined]

    def counting(manager_props: tuple[str, ...] = (), **rest: Any) -> dict[str, Any]:
        asked.append(manager_props)
        return answer(manager_props, **rest)

    monkeypatch.setattr(fdstore_module, "pid1", counting)
    monkeypatch.setattr(fdstore_module, "_AT_START", {})
    assert fdstore_module.pid1_carries_fds(kexec=False)
    pid1["SoftRebootsCount"] = 3
    backend = FdStoreBackend()
    assert backend.reboot_counts() == RebootCounts(soft_reboots=0, kexecs=0)  # the start's
    assert len(asked) == 1
    assert backend.reboot_counts() == RebootCounts(soft_reboots=3, kexecs=0)  # afresh
    assert len(asked) == 2
