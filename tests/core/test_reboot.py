"""Manager.Reboot in the core: Orchestrator.check_reboot (the admin's; state frozen; no
host command under way), then begin_reboot, journaled before the handover is written
(with systemd's reboot counts, and who asked); reboot_failed back to a plain frozen;
handover_written and rebooted (the new boot found the handover: updated, with the
blackout). Whether a start is a new boot is is_new_boot's (tested with recovery)."""

import pytest

from liveupdated.core.errors import AccessDenied, WrongState
from liveupdated.core.orchestrator import Phase
from liveupdated.core.records import HandoverWritten, Rebooted, RebootFailed, RebootStarted
from tests.core.steps import ALICE, PAGE, ROOT, VM, in_phase, refused, replayed, seen


def test_reboot_is_journaled_before_the_handover_with_the_counts_and_who() -> None:
    core = in_phase(Phase.FROZEN, "ram", "rom")
    core.check_reboot(ROOT)
    [record] = core.begin_reboot(ROOT, "old-boot", soft_reboots=2, kexecs=0)
    assert isinstance(record, RebootStarted)
    assert (record.boot_id, record.soft_reboots, record.kexecs, record.by_uid) == (
        "old-boot", 2, 0, 0)
    assert (core.phase, core.in_flight, core.reboot) == (Phase.FROZEN, "Reboot", record)
    assert core.cycle is not None
    assert (core.cycle.reboot_usec, core.cycle.fds_carried, core.cycle.bytes_carried) == (
        record.at_usec, 2, 2 * PAGE)
    # A restart finds it in the journal, and compaction keeps it: a handover was under way.
    assert replayed(core.snapshot()).reboot == record


def test_the_handover_written_is_counted_in_the_cycle() -> None:
    core = in_phase(Phase.FROZEN, "ram")
    core.begin_reboot(ROOT, "old-boot")
    [record] = core.handover_written(fds=1, size=PAGE)
    assert isinstance(record, HandoverWritten)
    assert core.cycle is not None
    assert (core.cycle.handover_written_usec, core.cycle.fds_carried,
            core.cycle.bytes_carried) == (record.at_usec, 1, PAGE)


def test_a_failed_reboot_is_a_plain_frozen_again() -> None:
    core = in_phase(Phase.FROZEN, "ram")
    core.begin_reboot(ROOT, "old-boot")
    assert core.reboot_failed("x" * 300) == [RebootFailed(reason="x" * 200)]
    assert (core.phase, core.in_flight, core.reboot) == (Phase.FROZEN, "", None)
    assert core.cycle is not None
    assert (core.cycle.reboots_failed, core.cycle.reboot_usec) == (1, 0)
    core.check_reboot(ROOT)  # may be asked again


def test_a_reboot_that_failed_before_its_record_records_nothing() -> None:
    core = in_phase(Phase.FROZEN, "ram")
    before = seen(core)
    assert core.reboot_failed("systemd did not answer") == []
    assert seen(core) == before


def test_the_new_boot_is_updated_with_the_blackout_since_freeze() -> None:
    core = in_phase(Phase.FROZEN, "ram")
    frozen_at = core.freeze_started_usec
    core.begin_reboot(ROOT, "old-boot")
    [record] = core.rebooted("new-boot")
    assert isinstance(record, Rebooted)
    assert record.boot_id == "new-boot"
    # From Freeze to the new boot finding the handover (the clock is read once for the
    # blackout and once for at_usec: one reading apart).
    assert 0 < record.blackout_usec <= record.at_usec - frozen_at
    assert (core.phase, core.in_flight, core.reboot) == (Phase.UPDATED, "", None)
    assert core.last_blackout_usec == record.blackout_usec
    assert core.session_state(core.sessions[VM]) == "incoming"
    assert core.cycle is not None and core.cycle.rebooted_usec == record.at_usec
    assert replayed(core.snapshot()).snapshot() == core.snapshot()


@pytest.mark.parametrize("phase", [Phase.NORMAL, Phase.PREPARED, Phase.UPDATED])
def test_a_handover_is_taken_only_in_frozen(phase: Phase) -> None:
    core = in_phase(phase, "ram")
    with refused(core, WrongState, f"a handover was found but the journal says {phase.value}"):
        core.rebooted("new-boot")


def test_the_admins() -> None:
    core = in_phase(Phase.FROZEN)
    with refused(core, AccessDenied, "org.liveupdate1.manage"):
        core.begin_reboot(ALICE, "old-boot")
    with refused(core, AccessDenied):
        core.check_reboot(ALICE)


@pytest.mark.parametrize("phase", [Phase.NORMAL, Phase.PREPARED, Phase.UPDATED])
def test_only_in_frozen(phase: Phase) -> None:
    core = in_phase(phase)
    with refused(core, WrongState, f"Reboot is allowed in state frozen, not {phase.value}"):
        core.begin_reboot(ROOT, "old-boot")


def test_not_twice() -> None:
    core = in_phase(Phase.FROZEN)
    core.begin_reboot(ROOT, "old-boot")
    with refused(core, WrongState, "a Reboot is under way"):
        core.begin_reboot(ROOT, "old-boot")
