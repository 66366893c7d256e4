"""The events of the live update: what the core decides and the journal makes durable.

The core's state is exactly the fold of these records (`Orchestrator.apply`), so replaying
the journal rebuilds it. Records are frozen dataclasses, one union told apart by `type`,
read and written by the strict codec (`core.codec`): pydantic's import (~0.25 s) sat on
the blackout path.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from liveupdated.core.codec import DecodeError, Tagged, loads


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionCreated:
    type: Literal["session_created"] = "session_created"
    session: str
    uid: int
    unit: str
    client: str  # unique bus name of the creating connection
    # The id of the bus it is on (org.freedesktop.DBus.GetId): a new bus reuses unique
    # names, so a client is known by both. "": written before it was recorded.
    bus: str = ""
    # The session has been through Prepare: it is never dropped for a departed client
    # (compaction keeps this; replay also sets it from the PhaseChanged to prepared).
    prepared: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class FdPreserved:
    type: Literal["fd_preserved"] = "fd_preserved"
    session: str
    token: str
    kind: str
    requires: tuple[str, ...]
    size: int
    name: str
    seals: int
    # Which file it is (st_dev, st_ino): recovery tells the acknowledged fd from any other
    # under the same name in the fd store. 0: not recorded (journals of earlier versions).
    dev: int = 0
    ino: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class FdReleased:
    """The daemon no longer holds this fd (unpreserved, session dropped, finished)."""

    type: Literal["fd_released"] = "fd_released"
    session: str
    token: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class FdLost:
    """The journal knew this fd but the restarted daemon got no fd for it back."""

    type: Literal["fd_lost"] = "fd_lost"
    session: str
    token: str


@dataclass(frozen=True, slots=True, kw_only=True)
class FdCorrupted:
    """The fd store gave back an fd whose journal record failed its checksum."""

    type: Literal["fd_corrupted"] = "fd_corrupted"
    session: str
    token: str
    size: int


@dataclass(frozen=True, slots=True, kw_only=True)
class FdRestored:
    """After the reboot: the fd was rebuilt and is held until Finish."""

    type: Literal["fd_restored"] = "fd_restored"
    session: str
    token: str
    at_usec: int = 0
    dev: int = 0  # the file now held (a rebuilt fd is a new file); 0: not recorded
    ino: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionDropped:
    type: Literal["session_dropped"] = "session_dropped"
    session: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class FreezeDelaySet:
    type: Literal["freeze_delay_set"] = "freeze_delay_set"
    session: str
    enabled: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionReady:
    type: Literal["session_ready"] = "session_ready"
    session: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionFinished:
    type: Literal["session_finished"] = "session_finished"
    session: str


@dataclass(frozen=True, slots=True, kw_only=True)
class PhaseChanged:
    type: Literal["phase_changed"] = "phase_changed"
    old: str
    new: str
    at_usec: int  # CLOCK_REALTIME: the only clock that spans a kexec
    by_uid: int = -1  # who asked (-1: not recorded, as in journals of earlier versions)


@dataclass(frozen=True, slots=True, kw_only=True)
class Rebooted:
    """First record of a new boot: the handover from the previous kernel was found."""

    type: Literal["rebooted"] = "rebooted"
    boot_id: str
    blackout_usec: int
    at_usec: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class RebootStarted:
    """Reboot was decided: the handover for the next kernel is being written. Only a
    later start that has evidence of a new boot (another boot id, or the old daemon's
    KexecSimulated) takes the handover; any other start is a crash in FROZEN."""

    type: Literal["reboot_started"] = "reboot_started"
    boot_id: str  # of the boot that writes the handover
    at_usec: int
    by_uid: int = -1
    # systemd's SoftRebootsCount and KExecCount at Reboot, where the backend relies on
    # them (fdstore): more of either later is a new boot with the same boot id. None in
    # journals written before they were recorded, and for the other backends.
    soft_reboots: int | None = None
    kexecs: int | None = None
    # PID 1's start time (/proc/1/stat field 22, clock ticks since the kernel booted): a
    # container's boot changes it though the boot id (the host's, behind the unit's
    # sandboxing) may not. None: not read, or a journal of an earlier version.
    pid1_start: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RebootFailed:
    """The handover was not completed (a write failed, or the daemon restarted before
    the kexec): back to a plain FROZEN, from which Cancel or another Reboot works."""

    type: Literal["reboot_failed"] = "reboot_failed"
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class HandoverWritten:
    """The handover is complete: the kexec may come (not waited for: history only)."""

    type: Literal["handover_written"] = "handover_written"
    at_usec: int
    fds: int
    bytes: int


@dataclass(frozen=True, slots=True, kw_only=True)
class UpdateCycle:
    """One update, Prepare to its end, as the update history keeps it. Times are
    CLOCK_REALTIME microseconds (0: that phase was not reached); uids -1: not known."""

    started_usec: int
    prepared_by: int = -1
    frozen_usec: int = 0
    frozen_by: int = -1
    reboot_usec: int = 0
    reboot_by: int = -1
    handover_written_usec: int = 0
    rebooted_usec: int = 0
    first_fd_usec: int = 0
    last_fd_usec: int = 0
    ended_usec: int = 0
    ended_by: int = -1
    outcome: str = "in progress"  # finished, failed (fds lost or corrupted), cancelled
    fds_carried: int = 0
    bytes_carried: int = 0
    fds_retrieved: int = 0
    fds_lost: int = 0
    fds_corrupted: int = 0
    reboots_failed: int = 0
    # What recovery and failed reboots said during this update, oldest first.
    notes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class CycleRecorded:
    """An update cycle as compaction keeps it: the history survives it."""

    type: Literal["cycle_recorded"] = "cycle_recorded"
    cycle: UpdateCycle


@dataclass(frozen=True, slots=True, kw_only=True)
class KexecSimulated:
    """The old daemon's last act after a completed Reboot with no real reboot to follow
    (--reboot-action exit): the evidence of a "new boot" that keeps the boot id."""

    type: Literal["kexec_simulated"] = "kexec_simulated"
    boot_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class FdQuarantined:
    """An fd from the fd store that the journal cannot explain (its session's records
    were damaged, or a PreserveFd was never acknowledged): held under an id of its own
    (`q<N>`, never a live session/token key), reported, handed out or released only by
    an admin."""

    type: Literal["fd_quarantined"] = "fd_quarantined"
    session: str
    token: str
    size: int
    reason: str
    id: str = ""  # "": a journal of an earlier version (replay gives it the next id)


@dataclass(frozen=True, slots=True, kw_only=True)
class QuarantineReleased:
    type: Literal["quarantine_released"] = "quarantine_released"
    session: str
    token: str
    by_uid: int
    id: str = ""  # "": a journal of an earlier version (the entry of session/token)


@dataclass(frozen=True, slots=True, kw_only=True)
class DaemonStarted:
    """A start of the daemon, after its recovery: which release ran in which boot (the
    journal outlives both an upgrade of the package and the kexec). Only the latest is
    kept: it changes nothing else."""

    type: Literal["daemon_started"] = "daemon_started"
    version: str
    boot_id: str
    at_usec: int  # CLOCK_REALTIME
    # It had systemd's fd store: an fd missing from the store at the next start is then
    # evidence (of a lost store, or of a PreserveFd never acknowledged), else it is not.
    fd_store: bool = False
    pid1_start: int | None = None  # as in RebootStarted


@dataclass(frozen=True, slots=True, kw_only=True)
class RecoveryDecided:
    """What recovery did at a start whose evidence needed a decision (a handover used
    while no new boot was seen, fds released as never acknowledged...), with the evidence:
    shown in the update's history."""

    type: Literal["recovery_decided"] = "recovery_decided"
    decision: str
    evidence: str
    at_usec: int = 0


Record = (
    SessionCreated
    | FdPreserved
    | FdReleased
    | FdLost
    | FdCorrupted
    | FdRestored
    | SessionDropped
    | FreezeDelaySet
    | SessionReady
    | SessionFinished
    | PhaseChanged
    | Rebooted
    | RebootStarted
    | RebootFailed
    | KexecSimulated
    | FdQuarantined
    | QuarantineReleased
    | HandoverWritten
    | CycleRecorded
    | DaemonStarted
    | RecoveryDecided
)

_RECORD: Tagged[Record] = Tagged("Record", get_args(Record))


def decode_record(payload: bytes | str) -> Record:
    """One record from its JSON; DecodeError (a ValueError) if it is not a valid one."""
    return _RECORD.from_json(payload)


def decode_group(payload: bytes) -> list[Record]:
    """The records of a payload holding one record, or a list of them (a decision of
    several records, written whole); DecodeError if any one is not valid."""
    if payload[:1] != b"[":
        return [decode_record(payload)]
    values = loads(payload, "Record")
    if not isinstance(values, list):
        raise DecodeError("Record: a group of records that is not a list")
    return _RECORD.from_dicts(values)


def decode_records(payloads: Sequence[bytes]) -> list[Record]:
    """Many payloads (each as for `decode_group`) at once, one JSON parse for all;
    DecodeError if any one is not valid (`decode_group` on each finds which)."""
    values = loads(b"[" + b",".join(payloads) + b"]", "Record")
    if len(values) != len(payloads):  # a payload holding two values, or none
        raise DecodeError(f"Record: {len(payloads)} payloads hold {len(values)} values")
    if any(isinstance(value, list) for value in values):
        values = [r for v in values for r in (v if isinstance(v, list) else [v])]
    return _RECORD.from_dicts(values)
